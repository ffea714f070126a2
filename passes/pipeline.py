"""The one pruning pipeline: a pass contract, a runner, and the passes in order.

Every route runs these passes: ``llmrank.prune`` (an nn.Module), ``prune_program`` (a
torch.export program), the sweep (the first four passes once, the rest per cell) and any
pipeline a user assembles. A pass maps a frozen :class:`PruneState` to
``PassResult(new_state, modified)``; it reads its options from ``state.config`` (one
:class:`~llmrank.passes.config.PruneConfig`) and never from anywhere else.

The contract, after torch.fx's pass infra and onnx-ir's ``_pass_infra``:
- ``requires`` checks the state holds what the pass reads, ``ensures`` what it wrote;
- ``in_place`` declares whether the pass may change the parameters of a model it is given.
  The runner checks the claim: a pass that declares itself functional and changes a model's
  parameters anyway is a :class:`PassError`;
- the runner logs each pass, records ``(name, modified, seconds)`` in ``state.history`` and,
  when a pass fails, names it and the passes that ran before it in the error.

    trace -> analyze -> calibrate -> gradients (taylor, fisher) -> score -> select -> compensate -> shrink -> check outputs -> verify
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from llmrank.ir.errors import CalibrationError, InputError, LLMRankError, PassError, UnsupportedModelError, VerificationError
from llmrank.ir.graph import ModelIR
from llmrank.ir.trace import Traced, trace
from llmrank.passes.allocate import removal_curves
from llmrank.passes.analyze import analyze, group_regions
from llmrank.passes.choose import Budget, budget, choose, needs_curves
from llmrank.passes.calibrate import Accumulator, CalibrationStats, Plan, collect, collect_program
from llmrank.passes.compensate import Refit, consumer_linears, plan_refit
from llmrank.passes.config import PruneConfig
from llmrank.passes.gradients import FirstOrder, backward_walk, first_order_kind
from llmrank.passes.headscore import variance_linears
from llmrank.passes.heap import trim_heap
from llmrank.passes import exported as P
from llmrank.passes import routes
from llmrank.passes.probe import group_loss_increases, probe_sequences
from llmrank.passes.sequential import plan_sequential_refit, solve_refits
from llmrank.passes.registry import ScoreRequest, ScorerSpec, get_scorer
from llmrank.passes.score import Scores, Upstream, score
from llmrank.passes.shrink import mask, mask_paper, shrink
from llmrank.passes.verify import OutputCheck, Verification, outputs, sample_tokens

log = logging.getLogger(__name__)

ScorerFn = Callable[[ScoreRequest], "Scores | dict[str, torch.Tensor]"]


@dataclass(frozen=True)
class PassRecord:
    name: str
    modified: bool
    seconds: float


@dataclass(frozen=True)
class PruneState:
    """Everything the passes read and write; a field stays None until a pass fills it.

    ``model`` is the dense model the passes read (``ep.module()`` on the program route);
    ``slim`` the rewritten model, ``slim_program`` its re-export (program route only).
    ``batches`` feed the scoring statistics, ``refit_batches`` (default: ``batches``) the
    compensation moments.

    ``block`` is set on the block route, where ``model`` is one decoder block streamed from a
    checkpoint (the route's own object, so the rewrite changes it in place); ``upstream`` is
    what the blocks before it passed on to its scores.
    """

    config: PruneConfig = field(default_factory=PruneConfig)
    model: nn.Module | None = None
    program: ExportedProgram | None = None
    batches: tuple = ()
    refit_batches: tuple | None = None
    example_inputs: tuple | None = None
    dynamic_shapes: Any = None
    progress: bool = False
    traced: Traced | None = None
    ir: ModelIR | None = None
    stats: CalibrationStats | None = None
    first_order: FirstOrder | None = None
    scores: Scores | None = None
    budget: Budget | None = None
    kept: dict[str, torch.Tensor] | None = None
    refits: dict[str, Refit] | None = None
    slim: nn.Module | None = None
    slim_program: ExportedProgram | None = None
    rewrites: tuple[str, ...] = ()
    verification: Verification | None = None
    output_check: OutputCheck | None = None
    reference_output: torch.Tensor | None = None
    block: int | None = None
    upstream: Upstream | None = None
    notes: tuple[str, ...] = ()
    history: tuple[PassRecord, ...] = ()

    @property
    def from_program(self) -> bool:
        return self.program is not None

    @property
    def route(self) -> routes.Route:
        """The route this state is fed by (``routes.py``): its options were checked against it."""
        return routes.PROGRAM if self.from_program else routes.BLOCKS if self.block is not None else routes.IN_MEMORY

    @property
    def rewrites_in_place(self) -> bool:
        """The rewrite changes ``model`` itself: the caller asked (``inplace``), or it is the block route's own copy."""
        return self.config.inplace or self.block is not None

    @property
    def norms(self):
        return self.stats.norms if self.stats is not None else None

    @property
    def timings(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for record in self.history:
            out[record.name] = out.get(record.name, 0.0) + record.seconds
        return out

    def update(self, **changes: Any) -> PruneState:
        return replace(self, **changes)

    def verification_inputs(self) -> tuple:
        """A small sample to compare models on: the example inputs, else the first batch."""
        if self.example_inputs is not None:
            return tuple(self.example_inputs)
        for batch in self.batches:
            if isinstance(batch, torch.Tensor):
                return (batch[:2, :64] if batch.dim() == 2 and batch.dtype == torch.long else batch[:2],)
            if isinstance(batch, (tuple, list)):
                return tuple(batch)
        if self.traced is not None:
            return tuple(self.traced.program.example_inputs[0])
        raise InputError("no inputs to verify on: give calibration batches or example_inputs")


class PassResult(tuple):
    """What a pass returns: ``(state, modified)``."""

    __slots__ = ()

    def __new__(cls, state: PruneState, modified: bool) -> PassResult:
        return super().__new__(cls, (state, bool(modified)))

    @property
    def state(self) -> PruneState:
        return self[0]

    @property
    def modified(self) -> bool:
        return self[1]


_MAKERS = {"traced": "Trace", "ir": "Analyze", "stats": "Calibrate", "scores": "Score", "kept": "Select",
           "refits": "Compensate", "slim": "Shrink", "model": "the pipeline's input (run(model))"}


class Pass:
    """Base of every pass: ``requires`` -> ``call`` -> ``ensures``.

    ``needs`` / ``makes`` name PruneState fields. ``in_place``: whether ``call`` may change
    the parameters of a model in the state it is given (only the rewrite with
    ``config.inplace`` and user passes that say so).
    """

    needs: tuple[str, ...] = ()
    makes: tuple[str, ...] = ()
    in_place: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def call(self, state: PruneState) -> PassResult:
        raise NotImplementedError

    def mutates(self, state: PruneState) -> bool:
        """Whether this run may change a given model's parameters (``in_place``, unless an
        option decides, as ``config.inplace`` does for the rewrite)."""
        return self.in_place

    def requires(self, state: PruneState) -> None:
        missing = [f for f in self.needs if getattr(state, f) is None]
        if missing:
            maker = _MAKERS.get(missing[0])
            raise PassError(f"{self.name} needs {', '.join(missing)} in the state: "
                            + (f"run {maker} before it" if maker else "set it before running the pipeline"))

    def ensures(self, state: PruneState) -> None:
        missing = [f for f in self.makes if getattr(state, f) is None]
        if missing:
            raise PassError(f"{self.name} did not set {', '.join(missing)}")

    def __call__(self, state: PruneState) -> PassResult:
        self.requires(state)
        result = self.call(state)
        if not isinstance(result, PassResult):
            raise PassError(f"pass {self.name} returned {type(result).__name__}, not PassResult")
        self.ensures(result.state)
        return result

    def __repr__(self) -> str:
        return f"{self.name}()"


class FunctionPass(Pass):
    """Wrap a function ``state -> PruneState | None`` (None: nothing changed)."""

    def __init__(self, fn: Callable[[PruneState], PruneState | None], name: str | None = None, *, in_place: bool = False):
        self.fn, self._name, self.in_place = fn, name or getattr(fn, "__name__", "FunctionPass"), in_place

    @property
    def name(self) -> str:
        return self._name

    def call(self, state: PruneState) -> PassResult:
        out = self.fn(state)
        return PassResult(state if out is None else out, out is not None)


# ---------------------------------------------------------------------- the passes


class Trace(Pass):
    """model -> traced (torch.export); a program is adapted instead (its own graph)."""

    makes = ("traced", "model")

    def requires(self, state: PruneState) -> None:
        if state.model is None and state.program is None:
            raise PassError("Trace needs a model or a program: Pipeline.run(model) or run(exported_program)")

    def call(self, state: PruneState) -> PassResult:
        if state.traced is not None:  # traced by the caller (e.g. once for many prunes)
            if not state.from_program:
                check_weights(state.model)
            return PassResult(state, False)
        if state.from_program:
            module = state.model if state.model is not None else state.program.module()
            return PassResult(state.update(model=module, traced=P.program_traced(state.program, module)), True)
        check_weights(state.model)
        return PassResult(state.update(traced=trace(state.model, state.example_inputs)), True)


class Analyze(Pass):
    """traced -> ir: channel groups, the dataflow DAG and what is blocked, read from the graph."""

    needs = ("traced",)
    makes = ("ir",)

    def call(self, state: PruneState) -> PassResult:
        ir = analyze(state.traced, prune_tied=state.config.prune_tied)
        if state.from_program and not ir.linears:
            raise InputError("the program has no aten.linear/aten.addmm with a weight parameter: analyse the program from "
                             "torch.export.export BEFORE run_decompositions() (the default table turns linear into mm)")
        if state.config.heads:
            _check_heads(state, ir)
        if not ir.groups:
            model = state.traced.model
            if any("expert" in type(m).__name__.lower() or "moe" in type(m).__name__.lower() for m in model.modules()):
                raise UnsupportedModelError(
                    f"{ir.model_class} is a mixture-of-experts model whose experts are stored as 3-D tensors (not Linear "
                    "layers); llmrank does not prune them yet. Dense FFNs and shared experts built from nn.Linear are supported.")
            raise UnsupportedModelError(
                f"{ir.model_class} has no prunable channel group: no Linear's output feeds another Linear only through "
                f"element-wise ops. Blocked: {dict(list(ir.blocked.items())[:4])}")
        return PassResult(state.update(ir=ir), True)


def _check_heads(state: PruneState, ir: ModelIR) -> None:
    """Head pruning needs head groups (the route was checked before: ``routes.py``)."""
    if not ir.head_groups:
        reasons = {k: v for k, v in ir.blocked.items() if k.startswith("heads:")}
        raise UnsupportedModelError(f"{ir.model_class} has no attention heads llmrank can cut"
                                    + (f": {dict(list(reasons.items())[:2])}" if reasons else " (no attention op found in the graph)")
                                    + "; use head_sparsity 0")


class Calibrate(Pass):
    """model + ir + batches -> stats: scoring norms and refit moments, in one walk over the data."""

    needs = ("model", "ir")
    makes = ("stats",)

    def call(self, state: PruneState) -> PassResult:
        config, ir = state.config, state.ir
        wants_norms = bool(state.batches) or not config.scorer_spec.weight_only
        if not wants_norms and not config.needs_moments:
            return PassResult(state.update(stats=CalibrationStats()), False)
        require_calibration(config, state.batches, state.refit_batches)
        batches = state.batches or ()
        plan = Plan.build(batches, state.refit_batches, norms=wants_norms and bool(batches), moments=config.needs_moments)
        acc = Accumulator(ir.calibration_linears() if wants_norms else (),
                          consumer_linears(ir, heads=config.heads) if config.needs_moments else (),
                          second_moment=config.second_moment,
                          variance_linears=variance_linears(ir) if config.needs_variances else ())
        if state.from_program:
            stats = collect_program(state.model, ir, plan, acc)
        else:
            stats = collect(state.model, plan, acc, progress=state.progress)
        if wants_norms and stats.norms is None:
            raise CalibrationError("calibration data is empty: give at least one batch of token ids")
        return PassResult(state.update(stats=stats), True)


def require_calibration(config: PruneConfig, batches: Sequence[Any], refit_batches: Sequence[Any] | None) -> None:
    """Calibration data must be there when the scorer or the refit reads activations."""
    if config.needs_calibration and not batches and not refit_batches:
        raise CalibrationError(f"scorer {config.scorer!r} with compensation {config.compensation!r} needs calibration data: "
                               "give token ids [N, L] (e.g. llmrank.data.calibration_tokens)")


class Gradients(Pass):
    """model + ir + batches -> the loss gradients, in one backward walk (``passes/gradients.py``):
    ``first_order`` (w * dL/dw per group channel) for the taylor scorers, ``stats.sensitivity``
    (the squared dL/dy per consumer output) for allocation 'fisher'. Other configs skip it, and
    so does what the state already holds."""

    needs = ("model", "ir")

    def call(self, state: PruneState) -> PassResult:
        c = state.config
        kind = first_order_kind(c.scorer)
        have = state.first_order
        taylor = kind is not None and (have is None or getattr(have, "kind", None) not in (None, kind))
        fisher = c.allocation == "fisher" and not (state.stats is not None and state.stats.sensitivity)
        if not taylor and not fisher:
            return PassResult(state, False)
        if fisher and state.stats is None:
            raise PassError("Gradients with allocation 'fisher' adds to the calibration statistics: run Calibrate before it")
        if taylor:
            require_calibration(c, state.batches, None)
        batches = state.batches if taylor else state.batches or state.refit_batches or ()
        walk = backward_walk(state.model, list(batches), ir=state.ir, first_order=kind if taylor else None,
                             sensitivity=consumer_linears(state.ir) if fisher else (), progress=state.progress)
        changes: dict[str, Any] = {}
        if taylor:
            changes["first_order"] = walk.first_order
        if fisher:
            changes["stats"] = replace(state.stats, sensitivity=walk.sensitivity)
        return PassResult(state.update(**changes), True)


class Score(Pass):
    """model + ir + norms -> scores, by the configured scorer or one given here.

    ``Score()`` runs the scorer ``state.config`` names (``llmrank.passes.registry``); ``Score(x)``
    runs ``x``: a registered name, a ``ScorerSpec``, or a function ``fn(request) -> Scores |
    {group name: 1-D tensor}`` (the registry's contract; declared as needing activations and
    not sliceable). Register the function instead to use it by name on every route.
    """

    needs = ("model", "ir", "stats")
    makes = ("scores",)

    def __init__(self, scorer: ScorerFn | ScorerSpec | str | None = None):
        if isinstance(scorer, str):
            scorer = get_scorer(scorer)
        elif scorer is not None and not isinstance(scorer, ScorerSpec):
            if not callable(scorer):
                raise TypeError(f"Score takes a scorer name, a ScorerSpec or a function (ScoreRequest) -> Scores, "
                                f"got {type(scorer).__name__}")
            scorer = ScorerSpec(getattr(scorer, "__name__", type(scorer).__name__), scorer)
        self.scorer: ScorerSpec | None = scorer

    @property
    def name(self) -> str:
        return "Score" if self.scorer is None else f"Score[{self.scorer.name}]"

    def call(self, state: PruneState) -> PassResult:
        c = state.config
        return PassResult(state.update(scores=score(state.model, state.ir, state.norms, c.scoring, upstream=state.upstream,
                                                    head_scorer=c.head_scoring if c.heads else None,
                                                    variances=state.stats.variances, first_order=state.first_order,
                                                    scorer=self.scorer)), True)


class Select(Pass):
    """ir + scores -> kept channel indices per group and kept heads (``choose.py``); notes say
    where rounding moved the target.

    A ``budget`` already in the state is used as it is: the block route sets it once for the
    whole model (``target_params`` counts every block) and selects block by block, then words
    the rounding notes once over every block."""

    needs = ("ir", "scores")
    makes = ("kept",)

    def requires(self, state: PruneState) -> None:
        super().requires(state)
        if needs_curves(state.config):
            missing = [f for f in ("model", "stats") if getattr(state, f) is None]
            if missing:
                raise PassError(f"Select with allocation {state.config.allocation!r} / selection {state.config.selection!r} "
                                f"reads the refit's moments: run {_MAKERS[missing[0]]} before it")

    def call(self, state: PruneState) -> PassResult:
        c = state.config
        preset = state.budget is not None
        plan = state.budget if preset else budget(c, state.ir, state.scores.heads, sum(p.numel() for p in state.model.parameters()))
        curves = None
        if needs_curves(c):
            curves = removal_curves(state.model, state.ir, state.scores.groups, state.stats.moments, plan.sparsity,
                                    allocation=c.allocation, selection=c.selection, multiple=c.multiple,
                                    min_width=c.min_width, ridge=c.ridge, centred=c.compensation == "lstsq+bias",
                                    row_weights=state.stats.sensitivity)
        choice = choose(c, state.ir, state.scores.groups, state.scores.heads, plan, curves=curves,
                        loss_probe=self._loss_probe(state) if c.allocation == "loss" else None, notes=state.block is None)
        notes = ([] if preset else list(plan.notes)) + choice.notes
        for note in notes:
            log.warning(note)
        return PassResult(state.update(kept=choice.kept, budget=plan, notes=state.notes + tuple(notes)), True)

    @staticmethod
    def _loss_probe(state: PruneState):
        """kept per group -> each group's measured loss increase when cut alone (allocation 'loss')."""
        c = state.config
        sequences = probe_sequences(list(state.batches or state.refit_batches or ()), c.probe_samples)
        return lambda kept: group_loss_increases(state.model, state.ir, kept, state.stats.moments, sequences,
                                                 method=c.compensation, ridge=c.ridge, progress=state.progress)


class Compensate(Pass):
    """model + kept + moments -> refits: new consumer weights from the dense weights (pure)."""

    needs = ("model", "ir", "kept", "stats")
    makes = ("refits",)

    def call(self, state: PruneState) -> PassResult:
        c, ir, kept = state.config, state.ir, state.kept
        target = "self" if c.refit_inputs == "pruned-self" else "dense"
        if c.compensation == "none":
            refits = {}
        elif c.refit_inputs != "dense" and state.stats.cross:  # the route measured the pruned stream (block by block)
            cut = [g for g in ir.groups if kept[g.name].numel() < g.width]
            refits = solve_refits(state.model, ir, cut, kept, state.stats.cross, method=c.compensation, ridge=c.ridge,
                                  target=target)
        elif c.refit_inputs != "dense":
            batches = state.refit_batches if state.refit_batches is not None else state.batches
            refits = plan_sequential_refit(state.model, ir, kept, list(batches), method=c.compensation, ridge=c.ridge,
                                           target=target, progress=state.progress)
        else:
            refits = plan_refit(state.model, ir, kept, state.stats.moments, method=c.compensation, ridge=c.ridge)
        # the refit is the last reader of the moments; their Gram matrices (d_ff^2 float64 per FFN) are the
        # largest thing the state holds, so they go before the rewrite and the verification allocate
        spent = replace(state.stats, moments={}, cross={})
        return PassResult(state.update(refits=refits, stats=spent), bool(refits))


class Shrink(Pass):
    """model + kept (+ refits) -> slim: smaller tensors (or zeroed ones in the mask modes).

    On the program route the widths hard-coded in the groups' graph regions are rewritten
    and the module is re-exported with the input program's dynamic dims.
    """

    needs = ("model", "ir", "kept")
    makes = ("slim",)

    def mutates(self, state: PruneState) -> bool:
        return state.rewrites_in_place

    def call(self, state: PruneState) -> PassResult:
        c, refits, inplace = state.config, state.refits or {}, state.rewrites_in_place
        if c.mode == "mask-paper":
            slim = mask_paper(state.model, state.ir, state.scores.groups, state.scores.outputs, c.sparsity, inplace=inplace)
            return PassResult(state.update(slim=slim), True)
        if c.mode == "mask":
            return PassResult(state.update(slim=mask(state.model, state.ir, state.kept, inplace=inplace, refits=refits)), True)
        if not state.from_program:
            # in place, the dense weights are gone after the rewrite: Verify's reference output is taken now
            reference = masked_output(state) if inplace and c.verify else None
            slim = shrink(state.model, state.ir, state.kept, inplace=inplace, refits=refits)
            return PassResult(state.update(slim=slim, reference_output=reference), True)
        slim, rewrites = P.shrink_program(state.model, state.ir, state.kept, group_regions(state.traced, state.ir), refits=refits)
        args, kwargs = P.example_inputs(state.program, list(state.batches))
        shapes = state.dynamic_shapes if state.dynamic_shapes is not None else P.program_dynamic_shapes(state.program)
        program = P.reexport(slim, args, shapes, kwargs=kwargs)
        return PassResult(state.update(slim=slim, slim_program=program, rewrites=tuple(rewrites)), True)



class Verify(Pass):
    """slim == the dense model with the same channels zeroed (and the same refit), on a sample."""

    needs = ("model", "ir", "kept", "slim")
    makes = ()

    def call(self, state: PruneState) -> PassResult:
        c = state.config
        if not c.verify or c.mode != "shrink":
            return PassResult(state, False)
        inputs = state.verification_inputs()
        candidate = state.slim_program.module() if state.slim_program is not None else state.slim
        if state.reference_output is not None:  # an in-place rewrite: Shrink took the masked output before it
            reference, expected = None, state.reference_output
        elif state.rewrites_in_place:
            raise PassError("Verify after an in-place rewrite needs the masked reference output Shrink takes: run Shrink before it")
        else:
            reference = mask(state.model, state.ir, state.kept, refits=state.refits)
            expected = _first_output(reference, inputs)
        ver = Verification.compare(expected, _first_output(candidate, inputs), inputs, atol=c.verify_atol, rtol=c.verify_rtol)
        notes = state.notes
        if not ver.ok:
            exact = None if state.slim_program is not None or reference is None else _in_float64(reference, candidate, inputs, c)
            if exact is None or not exact.ok:
                what = "model" if state.block is None else "block"
                raise VerificationError(
                    ("" if state.block is None else f"block {state.block}: ")
                    + f"the shrunk {what} differs from the masked dense {what} by {ver.max_abs_diff:.3g} (bound {ver.atol:g} + "
                    f"{ver.rtol:g} x {ver.reference_scale:.3g})"
                    + (f", and by {exact.max_abs_diff:.3g} in float64" if exact is not None else "")
                    + "; this is a bug: please report the model")
            notes += (f"shrunk vs masked: {ver.max_abs_diff:.3g} apart in {ver.reference_scale:.3g} (above the fp32 bound), "
                      f"{exact.max_abs_diff:.3g} in float64: rounding amplified by a deep cut, not a wrong cut",)
            ver = replace(ver, ok=True)
        return PassResult(state.update(verification=ver, notes=notes), True)


def masked_output(state: PruneState) -> torch.Tensor:
    """The output of the dense model with the cut channels zeroed (and the same refit) on the
    verification sample: what the shrunk model must reproduce. The masked copy goes at once."""
    return _first_output(mask(state.model, state.ir, state.kept, refits=state.refits), state.verification_inputs())


#: Above this many parameters, a failed fp32 verification is not re-run in float64 (memory).
FLOAT64_RECHECK_MAX_PARAMS = 500_000_000


def _in_float64(reference: nn.Module, candidate: nn.Module, inputs: tuple, c: PruneConfig) -> Verification | None:
    """The same comparison on float64 copies: rounding differences vanish there, a wrong cut does not.

    A deep, heavy cut (most heads of 30 layers) can amplify fp32 summation-order differences
    above the fp32 bound; None when the model is not float32 or too large to copy.
    """
    params = list(candidate.parameters())
    if not params or params[0].dtype != torch.float32 or sum(p.numel() for p in params) > FLOAT64_RECHECK_MAX_PARAMS:
        return None
    ref64, cand64 = reference.double(), copy.deepcopy(candidate).double()
    return Verification.compare(_first_output(ref64, inputs), _first_output(cand64, inputs), inputs,
                                atol=c.verify_atol, rtol=c.verify_rtol)


class CheckOutputs(Pass):
    """The final model must produce finite outputs; report how far it is from the dense model."""

    needs = ("model", "slim")
    makes = ("output_check",)

    def call(self, state: PruneState) -> PassResult:
        if state.config.inplace:
            return PassResult(state.update(output_check=_finite_only(state)), True)
        inputs = state.verification_inputs()
        dense = _first_output(state.model, inputs).double()
        final = _first_output(state.slim_program.module() if state.slim_program is not None else state.slim, inputs).double()
        finite = bool(torch.isfinite(final).all())
        without = None
        if state.refits:
            cut = _first_output(mask(state.model, state.ir, state.kept), inputs).double()
            without = _relative(cut, dense)
        check = OutputCheck(finite, _relative(final, dense) if finite else math.inf, without, sample_tokens(inputs))
        if not finite:
            raise VerificationError(
                "the pruned model produces NaN/Inf outputs"
                + (f" after the {state.config.compensation!r} refit (before it: relative error {without:.3g})" if state.refits else "")
                + ": the weights or calibration activations overflow; check the checkpoint, or use compensation 'none'")
        return PassResult(state.update(output_check=check), True)


def _finite_only(state: PruneState) -> OutputCheck:
    out = _first_output(state.slim, state.verification_inputs())
    if not torch.isfinite(out).all():
        raise VerificationError("the pruned model produces NaN/Inf outputs: check the checkpoint, or use compensation 'none'")
    return OutputCheck(True, math.nan)


def _relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def _first_output(model: nn.Module, inputs: tuple) -> torch.Tensor:
    """The model's (first) output in eval mode: dropout would make two runs incomparable.

    An exported program's module has its mode fixed at export time (it refuses ``eval()``).
    """
    if isinstance(model, torch.fx.GraphModule):
        with torch.no_grad():
            return pytree.tree_leaves(model(*inputs))[0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return outputs(model, inputs)
    finally:
        model.train(was_training)


def check_weights(model: nn.Module) -> None:
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise InputError(f"the model has NaN/Inf weights in {bad[:3]}{' ...' if len(bad) > 3 else ''}; fix or reload the checkpoint before pruning")


# ---------------------------------------------------------------------- the runner


def _fingerprint(state: PruneState) -> dict[tuple[str, str], tuple[int, tuple[int, ...]]]:
    """Identity and shape of every parameter of the state's models (cheap: no data is read)."""
    out = {}
    for field_name in ("model", "slim"):
        model = getattr(state, field_name)
        if isinstance(model, nn.Module):
            for name, p in model.named_parameters(remove_duplicate=False):
                out[(field_name, name)] = (p.data_ptr(), tuple(p.shape))
    return out


class Pipeline:
    """An ordered list of passes; ``run`` feeds each the state the previous one returned.

    A Pipeline is itself a pass, so pipelines nest. ``checks`` run on the state after each pass.
    """

    def __init__(self, passes: Sequence[Pass], *, checks: Sequence[Callable[[PruneState], None]] = ()):
        self.passes = list(passes)
        self.checks = list(checks)

    name = "Pipeline"
    in_place = False

    def mutates(self, state: PruneState) -> bool:
        return False  # each inner pass is checked on its own

    @classmethod
    def default(cls) -> Pipeline:
        """The passes every route runs, in order (the scorer is the one ``config.scorer`` names)."""
        data, decide = cls.stages()
        return cls(data.passes + decide.passes[1:])  # the decision stage's Gradients only re-checks the data stage's

    @classmethod
    def stages(cls) -> tuple[Pipeline, Pipeline]:
        """The one supported split of ``default()``: the data stage (Trace .. Gradients: the model and
        its calibration data, run once) and the decision stage (Score .. Verify: one configuration's
        choice and rewrite). The sweep runs the data stage once and the decision stage per cell; the
        decision stage's Gradients computes only what the cell needs and the data stage lacked."""
        return (cls([Trace(), Analyze(), Calibrate(), Gradients()]),
                cls([Gradients(), Score(), Select(), Compensate(), Shrink(), CheckOutputs(), Verify()]))

    def __call__(self, state: PruneState) -> PassResult:
        routes.check(state.config, state.route)  # before any pass runs
        modified, ran = False, [r.name for r in state.history]
        for p in self.passes:
            name = getattr(p, "name", type(p).__name__)
            mutates = p.mutates(state) if hasattr(p, "mutates") else getattr(p, "in_place", False)
            before = None if mutates else _fingerprint(state)
            log.info("pass %s", name)
            clock = time.perf_counter()
            try:
                result = p(state)
            except LLMRankError as error:
                if error.pass_name is None:
                    error.pass_name, error.passes_before = name, tuple(ran)
                raise
            except Exception as error:  # noqa: BLE001 - an unexpected failure, re-raised with the pass named
                raise _pass_error(name, ran, error) from error
            seconds = time.perf_counter() - clock
            if not isinstance(result, PassResult):
                raise _pass_error(name, ran, PassError(f"returned {type(result).__name__}, not PassResult"))
            if before is not None and _fingerprint(state) != before:
                raise _pass_error(name, ran, PassError("declared functional (in_place=False) but changed a model's parameters"))
            log.info("pass %s: %.2f s%s", name, seconds, "" if result.modified else " (no change)")
            state = result.state
            trim_heap()  # what the pass freed goes back to the system (heap.py), not into a fragmented heap
            if not isinstance(p, Pipeline):
                state = state.update(history=state.history + (PassRecord(name, result.modified, seconds),))
            ran.append(name)
            modified = modified or result.modified
            for check in self.checks:
                check(state)
        return PassResult(state, modified)

    def run(self, target: nn.Module | ExportedProgram | PruneState, config: PruneConfig | None = None, **fields: Any) -> PruneState:
        """Run on a model, a program or a ready state; ``fields`` fill the state (batches=...)."""
        if isinstance(target, PruneState):
            state = target
        elif isinstance(target, ExportedProgram):
            state = PruneState(program=target)
        elif isinstance(target, nn.Module):
            state = PruneState(model=target)
        else:
            raise TypeError(f"Pipeline.run takes an nn.Module, an ExportedProgram or a PruneState, got {type(target).__name__}")
        if config is not None:
            state = state.update(config=config)
        if fields:
            state = state.update(**{k: tuple(v) if k in ("batches", "refit_batches", "example_inputs") and v is not None else v
                                    for k, v in fields.items()})
        return self(state).state

    def __repr__(self) -> str:
        return "Pipeline([" + ", ".join(repr(p) for p in self.passes) + "])"


def _pass_error(name: str, ran: list[str], error: Exception) -> PassError:
    text = str(error).strip().splitlines()
    wrapped = PassError(f"{type(error).__name__}: {text[0] if text else ''}" if not isinstance(error, PassError) else str(error))
    wrapped.pass_name, wrapped.passes_before = name, tuple(ran)
    return wrapped

