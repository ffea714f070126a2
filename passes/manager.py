"""A small pass manager over llmrank's passes, in the style of ``torch.fx.passes.infra``.

torch's ``PassBase`` maps a GraphModule to ``PassResult(graph_module, modified)``. Pruning
needs more than one graph (the model, its IR, calibration norms, scores, the selection), so
here a pass maps a plain :class:`PipelineState` to ``PassResult(state, modified)``; like
``PassBase`` it runs ``requires(state)``, ``call(state)`` and ``ensures(state)``. The
concrete passes are thin adapters over the existing functions (``trace``, ``analyze``,
``calibrate``, ``score``, ``select``, ``shrink``, ``verify``), so they compute exactly what
``llmrank.prune`` computes.

Example, with a custom scorer (any ``(model, ir, norms) -> Scores`` function)::

    def down_input_norm(model, ir, norms):
        return Scores(groups={g.name: norms.a_in[g.consumers[0].linear] for g in ir.groups})

    state = Pipeline([
        Trace(), Analyze(), Calibrate(batches),
        Score(down_input_norm),                # or Score(ScoreConfig("wpr", "dataflow"))
        Select(sparsity=0.3, multiple=64),
        Shrink(), Verify(),
    ]).run(model)
    state.slim, state.kept, state.verification

``run`` also takes a ``torch.export.ExportedProgram``: then Trace adapts the program,
Calibrate runs an FX interpreter, and Shrink rewrites and re-exports the program
(``state.slim_program``), as ``llmrank.passes.program.prune_program`` does.
"""

from __future__ import annotations

import abc
import time
from collections import namedtuple
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from llmrank.ir.graph import ModelIR
from llmrank.ir.trace import Traced, trace
from llmrank.passes.analyze import analyze, group_regions
from llmrank.passes.calibrate import ActivationNorms, calibrate
from llmrank.passes.score import ScoreConfig, Scores, score
from llmrank.passes.select import select
from llmrank.passes.shrink import shrink
from llmrank.passes.verify import Verification, verify

__all__ = [
    "Analyze",
    "Calibrate",
    "FunctionPass",
    "Pass",
    "PassResult",
    "Pipeline",
    "PipelineError",
    "PipelineState",
    "Score",
    "Select",
    "Shrink",
    "Trace",
    "Verify",
    "calibrated_linears",
]

ScorerFn = Callable[[nn.Module, ModelIR, "ActivationNorms | None"], "Scores | dict[str, torch.Tensor]"]


class PipelineError(ValueError):
    """A pass was run without what it needs, or a check failed; the message says which."""


class PassResult(namedtuple("PassResult", ["state", "modified"])):
    """What a pass returns: the (new) state and whether the pass changed anything."""

    __slots__ = ()


@dataclass
class PipelineState:
    """Everything the passes read and write. Fields stay None until a pass fills them.

    ``model`` is the module the passes read weights from (the user's model, or
    ``program.module()`` on the ExportedProgram route); ``slim`` is the shrunk module and
    ``slim_program`` its re-export (program route only).
    """

    model: nn.Module | None = None
    program: ExportedProgram | None = None
    example_inputs: tuple | None = None
    traced: Traced | None = None
    ir: ModelIR | None = None
    norms: ActivationNorms | None = None
    scores: Scores | None = None
    kept: dict[str, torch.Tensor] | None = None
    slim: nn.Module | None = None
    slim_program: ExportedProgram | None = None
    verification: Verification | None = None
    from_program: bool = False  # set by Trace when it adapts a program (ExportedProgram route)
    timings: dict[str, float] = field(default_factory=dict)
    history: list[tuple[str, bool]] = field(default_factory=list)



class Pass(abc.ABC):
    """Base of every pass: ``requires`` -> ``call`` -> ``ensures``, like torch's PassBase.

    ``needs`` / ``makes`` name PipelineState fields; the default checks say which pass to
    put earlier when a needed field is missing.
    """

    needs: tuple[str, ...] = ()
    makes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def __call__(self, state: PipelineState) -> PassResult:
        self.requires(state)
        result = self.call(state)
        if not isinstance(result, PassResult):
            raise PipelineError(f"pass {self.name} returned {type(result).__name__}, not PassResult")
        self.ensures(result.state)
        return result

    @abc.abstractmethod
    def call(self, state: PipelineState) -> PassResult:
        """Read fields of ``state``, write the ones in ``makes``, return PassResult(state, modified)."""

    def requires(self, state: PipelineState) -> None:
        missing = [f for f in self.needs if getattr(state, f) is None]
        if missing:
            raise PipelineError(f"{self.name} needs {', '.join(missing)} in the state: {_hint(missing[0])}")

    def ensures(self, state: PipelineState) -> None:
        missing = [f for f in self.makes if getattr(state, f) is None]
        if missing:
            raise PipelineError(f"{self.name} did not set {', '.join(missing)}")

    def __repr__(self) -> str:
        return f"{self.name}()"


_MAKERS = {"traced": "Trace", "ir": "Analyze", "norms": "Calibrate", "scores": "Score", "kept": "Select", "slim": "Shrink", "model": "run(model)"}


def _hint(field_name: str) -> str:
    maker = _MAKERS.get(field_name)
    return f"run {maker} before it" if maker else "set it before running the pipeline"


class FunctionPass(Pass):
    """Wrap a plain function ``state -> PipelineState | None`` (None: changed in place)."""

    def __init__(self, fn: Callable[[PipelineState], PipelineState | None], name: str | None = None, modified: bool = True):
        self.fn, self._name, self.modified = fn, name or getattr(fn, "__name__", "FunctionPass"), modified

    @property
    def name(self) -> str:
        return self._name

    def call(self, state: PipelineState) -> PassResult:
        out = self.fn(state)
        return PassResult(state if out is None else out, self.modified)


class Trace(Pass):
    """model -> traced (torch.export); a program is adapted instead (``program_traced``)."""

    makes = ("traced",)

    def __init__(self, example_inputs: tuple | None = None, *, dynamic: bool = True):
        self.example_inputs, self.dynamic = example_inputs, dynamic

    def requires(self, state: PipelineState) -> None:
        if state.model is None and state.program is None:
            raise PipelineError("Trace needs a model or a program: Pipeline.run(model) or run(exported_program)")

    def call(self, state: PipelineState) -> PassResult:
        if state.program is not None and state.model is None:
            from llmrank.passes.program import program_traced

            state.model = state.program.module()
            state.traced = program_traced(state.program, state.model)
            state.from_program = True
            return PassResult(state, True)
        inputs = self.example_inputs if self.example_inputs is not None else state.example_inputs
        state.traced = trace(state.model, inputs, dynamic=self.dynamic)
        if state.example_inputs is None and inputs is not None:
            state.example_inputs = tuple(inputs)
        return PassResult(state, True)


class Analyze(Pass):
    """traced -> ir (channel groups, dataflow, what is blocked)."""

    needs = ("traced",)
    makes = ("ir",)

    def __init__(self, *, prune_tied: bool = False):
        self.prune_tied = prune_tied

    def call(self, state: PipelineState) -> PassResult:
        state.ir = analyze(state.traced, prune_tied=self.prune_tied)
        if not state.ir.groups:
            raise PipelineError(f"{state.ir.model_class} has no prunable channel group. Blocked: {dict(list(state.ir.blocked.items())[:4])}")
        return PassResult(state, True)


def calibrated_linears(ir: ModelIR) -> list[str]:
    """Group members plus the Linears writing into producers (what the dataflow chain reads)."""
    return ir.calibration_linears()


class Calibrate(Pass):
    """model + ir + batches -> norms (per-batch L2 activation norms, averaged)."""

    needs = ("model", "ir")
    makes = ("norms",)

    def __init__(self, batches: Iterable[Any], *, linears: Iterable[str] | None = None, progress: bool = False):
        self.batches = list(batches)
        self.linears = None if linears is None else list(linears)
        self.progress = progress

    def call(self, state: PipelineState) -> PassResult:
        linears = self.linears if self.linears is not None else calibrated_linears(state.ir)
        if state.from_program:
            from llmrank.passes.program import calibrate_program

            state.norms = calibrate_program(state.model, state.ir, self.batches, linears=linears)
        else:
            state.norms = calibrate(state.model, state.ir, self.batches, linears=linears, progress=self.progress, total=len(self.batches))
        return PassResult(state, True)


class Score(Pass):
    """model + ir + norms -> scores, by a ScoreConfig (built-in scorers) or any callable.

    ``Score()`` / ``Score(ScoreConfig(...))`` / ``Score(scorer="wpr", representation=...)``
    use ``llmrank.passes.score.score``; ``Score(fn)`` calls ``fn(model, ir, norms)``, which
    returns a ``Scores`` or a plain ``{group name: tensor of width scores}``.
    """

    needs = ("model", "ir")
    makes = ("scores",)

    def __init__(self, config: ScoreConfig | ScorerFn | None = None, /, **kwargs: Any):
        if config is not None and kwargs:
            raise TypeError("give either a ScoreConfig / callable or ScoreConfig keyword arguments, not both")
        if config is not None and not isinstance(config, ScoreConfig) and not callable(config):
            raise TypeError(f"Score takes a ScoreConfig or a callable (model, ir, norms) -> Scores, got {type(config).__name__}")
        self.scorer = config if config is not None else ScoreConfig(**kwargs)

    @property
    def name(self) -> str:
        if isinstance(self.scorer, ScoreConfig):
            return f"Score[{self.scorer.scorer}/{self.scorer.representation}]"
        return f"Score[{getattr(self.scorer, '__name__', type(self.scorer).__name__)}]"

    def call(self, state: PipelineState) -> PassResult:
        if isinstance(self.scorer, ScoreConfig):
            state.scores = score(state.model, state.ir, state.norms, self.scorer)
        else:
            state.scores = _as_scores(self.scorer(state.model, state.ir, state.norms), state.ir)
        return PassResult(state, True)


def _as_scores(value: Any, ir: ModelIR) -> Scores:
    scores = value if isinstance(value, Scores) else Scores(groups=dict(value)) if isinstance(value, dict) else None
    if scores is None:
        raise PipelineError(f"a custom scorer must return Scores or a dict of group name -> tensor, got {type(value).__name__}")
    for g in ir.groups:
        got = scores.groups.get(g.name)
        if got is None:
            raise PipelineError(f"the custom scorer gave no scores for group {g.name!r}")
        if tuple(got.shape) != (g.width,):
            raise PipelineError(f"the custom scorer gave {tuple(got.shape)} scores for group {g.name!r} of width {g.width}")
    return scores


class Select(Pass):
    """ir + scores -> kept channel indices per group (``llmrank.passes.select.select``)."""

    needs = ("ir", "scores")
    makes = ("kept",)

    def __init__(self, sparsity: float, *, pruner: str = "local", multiple: int = 1, min_width: int = 1):
        self.sparsity, self.pruner, self.multiple, self.min_width = sparsity, pruner, multiple, min_width

    def call(self, state: PipelineState) -> PassResult:
        state.kept = select(state.ir, state.scores.groups, self.sparsity, pruner=self.pruner, multiple=self.multiple, min_width=self.min_width)
        return PassResult(state, True)


class Shrink(Pass):
    """model + ir + kept -> slim (a shrunk copy); on the program route also slim_program.

    The program route rewrites the widths hard-coded in the groups' regions and re-exports
    with the input program's dynamic dims (or ``dynamic_shapes``).
    """

    needs = ("model", "ir", "kept")
    makes = ("slim",)

    def __init__(self, *, dynamic_shapes: Any = None):
        self.dynamic_shapes = dynamic_shapes

    def call(self, state: PipelineState) -> PassResult:
        if not state.from_program:
            state.slim = shrink(state.model, state.ir, state.kept)
            return PassResult(state, True)
        from llmrank.passes import program as P

        state.slim, _ = P.shrink_program(state.model, state.ir, state.kept, group_regions(state.traced, state.ir))
        args, kwargs = P._example_inputs(state.program, [state.example_inputs] if state.example_inputs else [])
        shapes = self.dynamic_shapes if self.dynamic_shapes is not None else P.program_dynamic_shapes(state.program)
        state.slim_program = P.reexport(state.slim, args, shapes, kwargs=kwargs)
        return PassResult(state, True)


class Verify(Pass):
    """slim vs the masked dense model on ``inputs`` (default: the example / traced inputs).

    With ``strict=True`` (default) a difference above ``atol`` raises PipelineError.
    """

    needs = ("model", "ir", "kept", "slim")
    makes = ("verification",)

    def __init__(self, inputs: tuple | torch.Tensor | None = None, *, atol: float = 1e-5, strict: bool = True):
        self.inputs, self.atol, self.strict = inputs, atol, strict

    def call(self, state: PipelineState) -> PassResult:
        inputs = self._inputs(state)
        if state.from_program:
            from torch.utils import _pytree as pytree

            from llmrank.passes.program import mask_program

            candidate = state.slim_program.module() if state.slim_program is not None else state.slim
            with torch.no_grad():
                reference = pytree.tree_leaves(mask_program(state.model, state.ir, state.kept)(*inputs))[0]
                got = pytree.tree_leaves(candidate(*inputs))[0]
            state.verification = Verification.compare(reference, got, inputs, atol=self.atol)
        else:
            state.verification = verify(state.model, state.slim, state.ir, state.kept, inputs, atol=self.atol)
        if self.strict and not state.verification.ok:
            raise PipelineError(f"the shrunk model differs from the masked model by {state.verification.max_abs_diff:.3g} > {self.atol:g}")
        return PassResult(state, False)

    def _inputs(self, state: PipelineState) -> tuple:
        if isinstance(self.inputs, torch.Tensor):
            return (self.inputs,)
        if self.inputs is not None:
            return tuple(self.inputs)
        if state.example_inputs is not None:
            return tuple(state.example_inputs)
        program = state.program if state.program is not None else state.traced.program if state.traced is not None else None
        example = getattr(program, "example_inputs", None)
        if example is None:
            raise PipelineError("Verify needs inputs: Verify(inputs=(x,)) or run(model, example_inputs=(x,))")
        return tuple(example[0])


class Pipeline:
    """An ordered list of passes; ``run`` feeds each one the state the previous returned.

    ``run`` takes a module, an ExportedProgram or a ready PipelineState (to start mid-way,
    e.g. from an already traced model). Per-pass wall times go to ``state.timings`` and
    ``(pass name, modified)`` to ``state.history``. A Pipeline is itself a pass, so
    pipelines nest. ``checks`` are called on the state after every pass.
    """

    def __init__(self, passes: Sequence[Pass | Callable[[PipelineState], PassResult]], *, checks: Sequence[Callable[[PipelineState], None]] = ()):
        self.passes = list(passes)
        self.checks = list(checks)

    @property
    def name(self) -> str:
        return "Pipeline"

    def add_pass(self, p: Pass) -> None:
        self.passes.append(p)

    def insert_before(self, kind: type, p: Pass) -> None:
        """Insert ``p`` before the first pass of type ``kind``."""
        index = next((i for i, q in enumerate(self.passes) if isinstance(q, kind)), None)
        if index is None:
            raise PipelineError(f"no {kind.__name__} pass in the pipeline")
        self.passes.insert(index, p)

    def replace(self, kind: type, p: Pass) -> None:
        """Replace the first pass of type ``kind`` by ``p`` (e.g. a Score with a custom scorer)."""
        index = next((i for i, q in enumerate(self.passes) if isinstance(q, kind)), None)
        if index is None:
            raise PipelineError(f"no {kind.__name__} pass in the pipeline")
        self.passes[index] = p

    def __call__(self, state: PipelineState) -> PassResult:
        modified = False
        for p in self.passes:
            name = getattr(p, "name", None) or getattr(p, "__name__", type(p).__name__)
            clock = time.perf_counter()
            result = p(state)
            state.timings[name] = state.timings.get(name, 0.0) + time.perf_counter() - clock
            if not isinstance(result, PassResult):
                raise PipelineError(f"pass {name} returned {type(result).__name__}, not PassResult")
            state = result.state
            state.history.append((name, bool(result.modified)))
            modified = modified or bool(result.modified)
            for check in self.checks:
                check(state)
        return PassResult(state, modified)

    def run(self, target: nn.Module | ExportedProgram | PipelineState, example_inputs: tuple | None = None) -> PipelineState:
        if isinstance(target, PipelineState):
            state = target
        elif isinstance(target, ExportedProgram):
            state = PipelineState(program=target)
        elif isinstance(target, nn.Module):
            state = PipelineState(model=target)
        else:
            raise TypeError(f"Pipeline.run takes an nn.Module, an ExportedProgram or a PipelineState, got {type(target).__name__}")
        if example_inputs is not None:
            state.example_inputs = tuple(example_inputs)
        return self(state).state

    def __repr__(self) -> str:
        return "Pipeline([" + ", ".join(repr(p) for p in self.passes) + "])"


def state_fields() -> list[str]:
    """Names of the PipelineState fields (for docs and error messages)."""
    return [f.name for f in fields(PipelineState)]
