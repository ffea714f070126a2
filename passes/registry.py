"""Scorers by name: one table and one contract for the built-in scorers and yours.

A scorer is a function of a :class:`ScoreRequest`. A neuron scorer (``unit="neurons"``) returns
``Scores`` or a dict of channel-group name -> 1-D tensor (one score per channel); a head scorer
(``unit="heads"``) returns a dict of head-group name -> 1-D tensor (one score per query head of
that attention layer). Its :class:`ScorerSpec` says what it reads besides the weights and whether
it can score one decoder block at a time; the route check (``routes.py``) and the Calibrate and
Gradients passes read those declarations, so a scorer you register runs on every route that has
what it declares, and is refused before any model is read on the others. ``PruneConfig(scorer=...)``
/ ``--scorer`` and ``head_scorer`` / ``--head-scorer`` take a registered name or an import path
``package.module:function`` (imported and registered on first use).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmrank.ir.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from llmrank.ir.graph import ModelIR
    from llmrank.passes.calibrate import ActivationNorms
    from llmrank.passes.gradients import FirstOrder
    from llmrank.passes.score import ScoreConfig, Upstream

#: What ranks: FFN (channel-group) neurons, or the query heads of attention layers.
UNITS = ("neurons", "heads")
#: What a scorer may read besides the weights, by unit: the Calibrate pass's activation norms, the
#: Gradients pass's first-order statistics of the whole model's next-token loss (neurons), and the
#: per-channel variances over calibration tokens of the heads' o_proj inputs (heads).
DATA = {"neurons": ("activations", "gradients"), "heads": ("activations", "variances")}
#: The ScoreConfig parameters a scorer may read; a sweep varies only those its scorer declares.
PARAMETERS = ("representation", "theta", "gamma", "p", "z_importance", "seed")


@dataclass(frozen=True)
class ScoreRequest:
    """Everything a scorer may read. ``norms`` is None when the scorer declared no activations
    and no calibration text was given; ``upstream`` is set only on the block route (what the
    blocks before this one passed on); ``first_order`` only for scorers that declared gradients;
    ``variances`` (o_proj input name -> per-channel variance over calibration tokens) only for
    head scorers that declared variances."""

    model: nn.Module
    ir: ModelIR
    norms: ActivationNorms | None
    config: ScoreConfig
    upstream: Upstream | None = None
    first_order: FirstOrder | None = None
    variances: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class ScorerSpec:
    """A scorer and its declarations.

    ``unit``: what it ranks (:data:`UNITS`). ``needs``: a subset of ``DATA[unit]``. ``reads``: the :data:`PARAMETERS` it reads (a sweep
    collapses cells that differ only in the others; by default it reads them all). ``sliceable``: it scores each group from that group's
    own block (its weights and norms, plus ``request.upstream``), so the block-by-block route
    gives the scores of the whole model; scorers that read other blocks' weights (hits) or the
    whole model's loss (taylor) are not.
    """

    name: str
    fn: Callable[[ScoreRequest], Any]
    needs: frozenset[str] = frozenset({"activations"})
    sliceable: bool = False
    reads: frozenset[str] = frozenset(PARAMETERS)
    about: str = ""
    builtin: bool = False
    unit: str = "neurons"

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ConfigError(f"scorer {self.name!r}: unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        unknown = set(self.needs) - set(DATA[self.unit])
        if unknown:
            raise ConfigError(f"scorer {self.name!r} declares needs {sorted(unknown)}; a {self.unit} scorer may need "
                              f"{', '.join(DATA[self.unit])}")
        if set(self.reads) - set(PARAMETERS):
            raise ConfigError(f"scorer {self.name!r} declares it reads {sorted(set(self.reads) - set(PARAMETERS))}; "
                              f"a scorer reads some of {', '.join(PARAMETERS)}")
        if not callable(self.fn):
            raise ConfigError(f"scorer {self.name!r}: fn must be callable (ScoreRequest -> Scores), got {type(self.fn).__name__}")

    @property
    def weight_only(self) -> bool:
        """Reads nothing but the weights: runs without calibration text."""
        return not self.needs


#: (unit, name) -> spec: a neuron scorer and a head scorer may share a name (wanda, random, ...).
_TABLE: dict[tuple[str, str], ScorerSpec] = {}


def register_scorer(name: str, fn: Callable[[ScoreRequest], Any], *, needs: Iterable[str] = ("activations",),
                    sliceable: bool = False, reads: Iterable[str] = PARAMETERS, about: str = "", replace: bool = False,
                    builtin: bool = False, unit: str = "neurons") -> ScorerSpec:
    """Add a scorer to the table under ``name`` (``replace=True`` to redefine one of yours)."""
    if not name or not isinstance(name, str):
        raise ConfigError(f"a scorer needs a non-empty name, got {name!r}")
    old = _TABLE.get((unit, name))
    if old is not None and (old.builtin or not replace):
        raise ConfigError(f"{_what(unit)} {name!r} is already registered" + (" (a built-in)" if old.builtin else
                                                                              "; pass replace=True to redefine it"))
    spec = ScorerSpec(name, fn, frozenset(needs), sliceable, frozenset(reads), about, builtin, unit)
    _TABLE[(unit, name)] = spec
    return spec


def scorer(name: str, *, needs: Iterable[str] = ("activations",), sliceable: bool = False, reads: Iterable[str] = PARAMETERS,
           about: str = "", unit: str = "neurons") -> Callable[[Callable[[ScoreRequest], Any]], Callable[[ScoreRequest], Any]]:
    """Decorator form of :func:`register_scorer`; returns the function unchanged."""
    def add(fn: Callable[[ScoreRequest], Any]) -> Callable[[ScoreRequest], Any]:
        register_scorer(name, fn, needs=needs, sliceable=sliceable, reads=reads, about=about, replace=True, unit=unit)
        return fn
    return add


def builtin_names(unit: str = "neurons") -> tuple[str, ...]:
    _load_builtins()
    return tuple(name for (u, name), spec in _TABLE.items() if u == unit and spec.builtin)


def scorer_names(unit: str = "neurons") -> tuple[str, ...]:
    """Every name registered for ``unit``, built-ins first."""
    _load_builtins()
    return tuple(name for u, name in _TABLE if u == unit)


def get_scorer(name: str, unit: str = "neurons") -> ScorerSpec:
    """The ``unit`` scorer registered under ``name``; an import path ``module:function`` is
    imported and registered (a :class:`ScorerSpec` there is used as it is, a bare function gets
    the defaults: needs activations, not sliceable)."""
    if unit not in UNITS:
        raise ConfigError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    _load_builtins()
    if (unit, name) in _TABLE:
        return _TABLE[(unit, name)]
    if isinstance(name, str) and ":" in name:
        return _import(name, unit)
    option, how = ("scorer", "llmrank.register_scorer") if unit == "neurons" else ("head_scorer", "llmrank.register_scorer(..., unit='heads')")
    raise ConfigError(f"unknown {option} {name!r}; choose one of {', '.join(scorer_names(unit))}, or give a function of your "
                      f"own as package.module:function (see {how})")


def _what(unit: str) -> str:
    return "scorer" if unit == "neurons" else "head scorer"


def _import(path: str, unit: str) -> ScorerSpec:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{_what(unit)} {path!r}: cannot import {module_name!r} ({e}); is it on PYTHONPATH?") from e
    target = getattr(module, attr, None)
    if target is None:
        raise ConfigError(f"{_what(unit)} {path!r}: {module_name} has no attribute {attr!r}")
    if (unit, path) in _TABLE:  # importing the module registered it (the @scorer decorator under this name)
        return _TABLE[(unit, path)]
    source = target if isinstance(target, ScorerSpec) else next((s for s in _TABLE.values() if s.fn is target), None)
    if source is not None and source.unit != unit:
        raise ConfigError(f"{path!r} is registered as a {_what(source.unit)}, not a {_what(unit)}")
    spec = (ScorerSpec(path, source.fn, source.needs, source.sliceable, source.reads, source.about, unit=unit)
            if source is not None else ScorerSpec(path, target, unit=unit))
    _TABLE[(unit, path)] = spec
    return spec


def _load_builtins() -> None:
    import llmrank.passes.score  # noqa: F401 - registers the built-in scorers on import
