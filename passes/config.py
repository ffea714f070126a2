"""``PruneConfig``: every pruning option in one place, checked before any work starts.

The CLI, ``llmrank.prune``, ``prune_program``, the pass pipeline and the sweep all build one
of these; the passes read their options from it and nowhere else. Each field carries its
help text and choices as dataclass metadata, so the CLI's flags are generated from here and
cannot drift from the library's defaults. Construction validates every value and every
combination, so a bad option fails in milliseconds, before a model is loaded or a text is
tokenised.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from llmrank.ir.errors import ConfigError
from llmrank.passes.allocate import ALLOCATIONS, SELECTIONS
from llmrank.passes.compensate import METHODS
from llmrank.passes.headscore import resolve as resolve_head_scorer
from llmrank.passes.registry import ScorerSpec, get_scorer, scorer_names
from llmrank.passes.score import HEAD_SCORERS, REPRESENTATIONS, SCORERS, ScoreConfig
from llmrank.passes.select import PRUNERS

MODES = ("shrink", "mask", "mask-paper")
REFIT_INPUTS = ("dense", "pruned", "pruned-self")
COMPENSATIONS = METHODS  # the refit methods compensate.py implements

#: What the ``llmrank prune`` command changes from the library defaults, and why: the command
#: line always has text to refit on, while ``llmrank.prune`` leaves the refit opt-in because it
#: wants more calibration tokens than scoring (see benchmarks/README.md).
CLI_DEFAULTS: dict[str, Any] = {"compensation": "lstsq"}


#: The CLI's help groups an option can sit in (``--help`` shows the budget and quality first).
GROUPS = ("budget", "quality", "advanced")
_GROUP = {**dict.fromkeys(("sparsity", "head_sparsity", "target_params", "head_share", "multiple", "min_width"), "budget"),
          **dict.fromkeys(("scorer", "compensation", "allocation", "pruner"), "quality")}  # the rest: research knobs


def _opt(default: Any, help: str, choices: tuple | None = None, cli: bool = True) -> Any:  # noqa: A002 - argparse's word
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli})


def option_group(name: str) -> str:
    """The ``--help`` group of an option: budget, quality or advanced (research knobs)."""
    return _GROUP.get(name, "advanced")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. Immutable; ``with_(**changes)`` returns a checked copy."""

    sparsity: float = _opt(0.3, "fraction of each group's channels to remove, in [0, 1)")
    head_sparsity: float = _opt(0.0, "fraction of each attention layer's query heads to remove, in [0, 1); every KV group keeps "
                                     "the same count, so it moves to the nearest count the layer allows")
    target_params: float | None = _opt(None, "keep this fraction of all parameters, in (0, 1): sparsity and head_sparsity "
                                             "are then derived from it (head_share splits the cut)")
    head_share: float = _opt(0.0, "with target_params: the fraction of the removed parameters taken from attention heads, in [0, 1]")
    head_scorer: str = _opt("auto", f"head score: auto (the neuron scorer's formula), {', '.join(HEAD_SCORERS)} (fluctuation: "
                                    "FLAP's), a name you registered with unit='heads', or package.module:function")
    scorer: str = _opt("wpr", f"neuron score: {', '.join(SCORERS)}, a name you registered (llmrank.register_scorer), "
                               "or package.module:function")
    representation: str = _opt("dataflow", "which Linears form the centrality chain", REPRESENTATIONS)
    pruner: str = _opt("local", "local: the same fraction per group; global: pool all scores", PRUNERS)
    theta: float = _opt(0.5, "wpr: weight of |W| against the 0/1 adjacency, in [0, 1]")
    gamma: float = _opt(0.5, "wpr/hits: weight of the graph term against the activation norm, in [0, 1]")
    p: float = _opt(1.0, "lp scorer: the norm's order (> 0)")
    z_importance: float | None = _opt(None, "mpr: zero the int(width * z) lowest inputs before propagating, in [0, 1)")
    seed: int = _opt(0, "seed of the random scorer and of calibration sampling")
    multiple: int = _opt(1, "round kept widths to a multiple (8, 64: faster GEMMs)")
    min_width: int = _opt(1, "never keep fewer channels than this per group")
    allocation: str = _opt("uniform", "per-group widths: uniform (the pruner's), or chosen to minimise the least-squares "
                           "refit's summed residual under the same budget, relative to each layer's output energy (error) "
                           "or weighted by the loss's squared gradients (fisher; one backward pass), or scaled to each "
                           "group's measured loss increase when cut alone (loss; one forward pass per group); needs "
                           "compensation lstsq", ALLOCATIONS)
    probe_samples: int = _opt(4, "allocation loss: calibration sequences each group's loss probe reads")
    selection: str = _opt("score", "which channels a group keeps: the scorer's top-k, or refit: drop greedily the channel "
                          "whose loss the refit repairs best (needs compensation lstsq)", SELECTIONS)
    mode: str = _opt("shrink", "shrink tensors, zero them (mask), or the authors' row masks (mask-paper)", MODES)
    compensation: str = _opt("none", "repair the consumers of cut channels from calibration statistics", COMPENSATIONS)
    refit_inputs: str = _opt("dense", "least-squares refit: fit each consumer on the dense model's inputs, or on the pruned "
                             "model's (sequential: earlier layers already cut and refitted) to the dense outputs (pruned) "
                             "or to the dense weights' outputs on those inputs (pruned-self)",
                             REFIT_INPUTS)
    ridge: float = _opt(1e-3, "least-squares refit: ridge, relative to the mean diagonal of the Gram matrix (>= 0)")
    verify: bool = _opt(True, "check that the shrunk model equals the dense one with the same channels zeroed", cli=False)
    verify_atol: float = _opt(1e-5, "verification bound: atol + rtol * max|reference|", cli=False)
    verify_rtol: float = _opt(1e-5, "verification bound: atol + rtol * max|reference|", cli=False)
    batch_size: int = _opt(4, "calibration sequences per forward pass")
    inplace: bool = _opt(False, "rewrite the caller's model instead of a copy", cli=False)
    prune_tied: bool = _opt(False, "also cut channels of tied parameters", cli=False)

    def __post_init__(self) -> None:
        self._check_values()
        self.scoring  # noqa: B018 - ScoreConfig checks the scorer's own fields (theta, gamma)
        self._check_combinations()

    # ------------------------------------------------------------------ checks

    def _check_values(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"unknown {f.name} {value!r}; choose one of {', '.join(choices)}")
        _number("sparsity", self.sparsity, low=0.0, high=1.0, high_open=True,
                what="the fraction of channels to remove")
        _number("head_sparsity", self.head_sparsity, low=0.0, high=1.0, high_open=True,
                what="the fraction of query heads to remove")
        if self.target_params is not None:
            _number("target_params", self.target_params, low=0.0, high=1.0, low_open=True, high_open=True,
                    what="the fraction of all parameters to keep")
        _number("head_share", self.head_share, low=0.0, high=1.0, what="the share of the cut taken from heads")
        _number("p", self.p, low=0.0, low_open=True, high=math.inf)
        if self.z_importance is not None:
            _number("z_importance", self.z_importance, low=0.0, high=1.0, high_open=True)
        _number("ridge", self.ridge, low=0.0, high=math.inf)
        _number("verify_atol", self.verify_atol, low=0.0, high=math.inf)
        _number("verify_rtol", self.verify_rtol, low=0.0, high=math.inf)
        for name in ("multiple", "min_width", "batch_size", "probe_samples"):
            _integer(name, getattr(self, name), low=1)
        _integer("seed", self.seed, low=0)
        for name in ("verify", "inplace", "prune_tied"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def _check_combinations(self) -> None:
        if self.compensation != "none" and self.mode != "shrink":
            raise ConfigError(f"compensation {self.compensation!r} rewrites shrunk weights: it needs mode 'shrink' "
                              f"(got {self.mode!r}); use compensation 'none' with the mask modes")
        if self.mode == "mask-paper" and self.pruner != "local":
            raise ConfigError("mode 'mask-paper' reproduces the authors' local pruner only; their global pruner pools "
                              "up and down row scores, which llmrank does not implement: use pruner 'local'")
        refit_aware = [f"{name} {getattr(self, name)!r}" for name, plain in (("allocation", "uniform"), ("selection", "score"),
                                                                             ("refit_inputs", "dense")) if getattr(self, name) != plain]
        if refit_aware and not self.compensation.startswith("lstsq"):
            raise ConfigError(f"{' and '.join(refit_aware)} need the least-squares refit: use compensation 'lstsq' "
                              f"or 'lstsq+bias' (got {self.compensation!r})")
        choosers = [r for r in refit_aware if not r.startswith("refit_inputs")]
        if choosers and self.pruner != "local":
            raise ConfigError(f"{' and '.join(choosers)} choose widths or channels from the refit's error, not from pooled "
                              f"scores: use pruner 'local'")
        if self.target_params is not None and (self.mode == "mask-paper" or self.pruner != "local"):
            raise ConfigError("target_params plans the cut for the local pruner in mode 'shrink' or 'mask': use pruner 'local' "
                              "and another mode than 'mask-paper'")
        if self.target_params is not None:
            given = [f"{name} {getattr(self, name):g}" for name in ("sparsity", "head_sparsity")
                     if getattr(self, name) != _default(name)]
            if given:
                raise ConfigError(f"target_params derives sparsity and head_sparsity from the parameter count; {' and '.join(given)} "
                                  "would be ignored: drop them (head_share splits the cut between heads and neurons)")
        elif self.head_share != _default("head_share"):
            raise ConfigError("head_share splits the cut of target_params: give target_params too, or use head_sparsity")
        if self.heads and self.mode == "mask-paper":
            raise ConfigError("mode 'mask-paper' reproduces the authors' FFN row masks only: use mode 'shrink' or 'mask' with head_sparsity")
        if self.head_scorer != "auto":
            self.head_scorer_spec  # noqa: B018 - an unknown name is refused whether or not heads are cut
        if self.heads and self.head_scorer == "auto" and self.head_scoring not in scorer_names("heads"):
            raise ConfigError(f"scorer {self.scorer!r} ranks FFN neurons only and has no head scorer of its name: choose one "
                              f"with head_scorer (e.g. 'fluctuation' or 'activation'; registered: {', '.join(scorer_names('heads'))})")
        if self.heads and self.refit_inputs != "dense":
            raise ConfigError(f"refit_inputs {self.refit_inputs!r} refits FFN consumers only, not o_proj after a head cut: "
                              "use refit_inputs 'dense' with head_sparsity or target_params")
        if self.z_importance is not None and self.scorer != "mpr" and self.head_scoring != "mpr":
            raise ConfigError(f"z_importance is an option of the mpr scorer, not of {self.scorer!r}")

    # ------------------------------------------------------------------ views

    @property
    def scoring(self) -> ScoreConfig:
        """The scorer's own options (what the Score pass needs)."""
        try:
            return ScoreConfig(scorer=self.scorer, representation=self.representation, theta=self.theta, gamma=self.gamma,
                               p=self.p, z_importance=self.z_importance, seed=self.seed)
        except ValueError as error:
            raise ConfigError(str(error)) from error

    @property
    def heads(self) -> bool:
        """Whether attention heads are cut (asked directly, or a share of a parameter target)."""
        return self.head_sparsity > 0 or (self.target_params is not None and self.head_share > 0)

    @property
    def head_scoring(self) -> str:
        """The head scorer in effect (``auto`` resolved against the neuron scorer)."""
        return resolve_head_scorer(self.head_scorer, self.scorer)

    @property
    def needs_calibration(self) -> bool:
        """Whether the passes need calibration data (activation scorers or a refit)."""
        heads = self.heads and not self.head_scorer_spec.weight_only
        return not self.scorer_spec.weight_only or self.compensation != "none" or heads

    @property
    def scorer_spec(self) -> ScorerSpec:
        """The registered scorer ``scorer`` names (``llmrank.passes.registry``)."""
        return get_scorer(self.scorer)

    @property
    def head_scorer_spec(self) -> ScorerSpec:
        """The registered head scorer in effect (``auto`` resolved against the neuron scorer)."""
        return get_scorer(self.head_scoring, unit="heads")

    @property
    def needs_moments(self) -> bool:
        """Dense-input moments: the plain refit's, and what error-aware widths or selection read
        (the sequential refit gathers its own)."""
        reads = self.allocation != "uniform" or self.selection != "score"
        return self.compensation != "none" and (self.refit_inputs == "dense" or reads)

    @property
    def needs_variances(self) -> bool:
        """The head scorer reads the o_proj input variances (fluctuation does)."""
        return self.heads and "variances" in self.head_scorer_spec.needs

    @property
    def second_moment(self) -> bool:
        return self.compensation.startswith("lstsq")

    def with_(self, **changes: Any) -> PruneConfig:
        """A checked copy with ``changes`` applied; unknown names are refused."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(option_names())}")
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_options(cls, config: PruneConfig | None = None, **options: Any) -> PruneConfig:
        """``config`` (or the defaults) with ``options`` applied: how every facade builds one."""
        return (config or cls()).with_(**options) if options else (config or cls())


def _default(name: str) -> Any:
    return next(f.default for f in fields(PruneConfig) if f.name == name)


def option_names() -> list[str]:
    return [f.name for f in fields(PruneConfig)]


def cli_options() -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, default, metadata) of every option the command line exposes, with its defaults."""
    out = []
    for f in fields(PruneConfig):
        if f.metadata.get("cli"):
            default = CLI_DEFAULTS.get(f.name, f.default if f.default is not MISSING else None)
            out.append((f.name, default, dict(f.metadata)))
    return out


def _number(name: str, value: Any, *, low: float, high: float, low_open: bool = False, high_open: bool = False,
            what: str = "") -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be in {interval}{f' ({what})' if what else ''}, got {value!r}")


def _integer(name: str, value: Any, *, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
