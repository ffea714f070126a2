"""Neuron scorers by name: one table and one contract for the built-in scorers and yours.

A scorer is a function of a :class:`ScoreRequest` that returns ``Scores`` (or a dict of group
name -> 1-D tensor, one score per channel). Its :class:`ScorerSpec` says what it reads besides
the weights and whether it can score one decoder block at a time; the route check
(``routes.py``) and the Calibrate and Gradients passes read those declarations, so a scorer you
register runs on every route that has what it declares, and is refused before any model is
read on the others. ``PruneConfig(scorer=...)`` and ``--scorer`` take a registered name or an
import path ``package.module:function`` (imported and registered on first use).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmrank.ir.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from llmrank.ir.graph import ModelIR
    from llmrank.passes.calibrate import ActivationNorms
    from llmrank.passes.gradients import FirstOrder
    from llmrank.passes.score import ScoreConfig, Upstream

#: What a scorer may read besides the weights: the Calibrate pass's activation norms, and the
#: Gradients pass's first-order statistics of the whole model's next-token loss.
DATA = ("activations", "gradients")
#: The ScoreConfig parameters a scorer may read; a sweep varies only those its scorer declares.
PARAMETERS = ("representation", "theta", "gamma", "p", "z_importance", "seed")


@dataclass(frozen=True)
class ScoreRequest:
    """Everything a scorer may read. ``norms`` is None when the scorer declared no activations
    and no calibration text was given; ``upstream`` is set only on the block route (what the
    blocks before this one passed on); ``first_order`` only for scorers that declared gradients."""

    model: nn.Module
    ir: ModelIR
    norms: ActivationNorms | None
    config: ScoreConfig
    upstream: Upstream | None = None
    first_order: FirstOrder | None = None


@dataclass(frozen=True)
class ScorerSpec:
    """A scorer and its declarations.

    ``needs``: a subset of :data:`DATA`. ``reads``: the :data:`PARAMETERS` it reads (a sweep
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

    def __post_init__(self) -> None:
        unknown = set(self.needs) - set(DATA)
        if unknown:
            raise ConfigError(f"scorer {self.name!r} declares needs {sorted(unknown)}; a scorer may need {', '.join(DATA)}")
        if set(self.reads) - set(PARAMETERS):
            raise ConfigError(f"scorer {self.name!r} declares it reads {sorted(set(self.reads) - set(PARAMETERS))}; "
                              f"a scorer reads some of {', '.join(PARAMETERS)}")
        if not callable(self.fn):
            raise ConfigError(f"scorer {self.name!r}: fn must be callable (ScoreRequest -> Scores), got {type(self.fn).__name__}")

    @property
    def weight_only(self) -> bool:
        """Reads nothing but the weights: runs without calibration text."""
        return not self.needs


_TABLE: dict[str, ScorerSpec] = {}


def register_scorer(name: str, fn: Callable[[ScoreRequest], Any], *, needs: Iterable[str] = ("activations",),
                    sliceable: bool = False, reads: Iterable[str] = PARAMETERS, about: str = "", replace: bool = False,
                    builtin: bool = False) -> ScorerSpec:
    """Add a scorer to the table under ``name`` (``replace=True`` to redefine one of yours)."""
    if not name or not isinstance(name, str):
        raise ConfigError(f"a scorer needs a non-empty name, got {name!r}")
    old = _TABLE.get(name)
    if old is not None and (old.builtin or not replace):
        raise ConfigError(f"scorer {name!r} is already registered" + (" (a built-in)" if old.builtin else
                                                                        "; pass replace=True to redefine it"))
    spec = ScorerSpec(name, fn, frozenset(needs), sliceable, frozenset(reads), about, builtin)
    _TABLE[name] = spec
    return spec


def scorer(name: str, *, needs: Iterable[str] = ("activations",), sliceable: bool = False, reads: Iterable[str] = PARAMETERS,
           about: str = "") -> Callable[[Callable[[ScoreRequest], Any]], Callable[[ScoreRequest], Any]]:
    """Decorator form of :func:`register_scorer`; returns the function unchanged."""
    def add(fn: Callable[[ScoreRequest], Any]) -> Callable[[ScoreRequest], Any]:
        register_scorer(name, fn, needs=needs, sliceable=sliceable, reads=reads, about=about, replace=True)
        return fn
    return add


def builtin_names() -> tuple[str, ...]:
    _load_builtins()
    return tuple(name for name, spec in _TABLE.items() if spec.builtin)


def scorer_names() -> tuple[str, ...]:
    """Every registered name, built-ins first."""
    _load_builtins()
    return tuple(_TABLE)


def get_scorer(name: str) -> ScorerSpec:
    """The spec registered under ``name``; an import path ``module:function`` is imported and
    registered (a :class:`ScorerSpec` there is used as it is, a bare function gets the defaults:
    needs activations, not sliceable)."""
    _load_builtins()
    if name in _TABLE:
        return _TABLE[name]
    if isinstance(name, str) and ":" in name:
        return _import(name)
    raise ConfigError(f"unknown scorer {name!r}; choose one of {', '.join(scorer_names())}, or give a function of your own "
                      "as package.module:function (see llmrank.register_scorer)")


def _import(path: str) -> ScorerSpec:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"scorer {path!r}: cannot import {module_name!r} ({e}); is it on PYTHONPATH?") from e
    target = getattr(module, attr, None)
    if target is None:
        raise ConfigError(f"scorer {path!r}: {module_name} has no attribute {attr!r}")
    if path in _TABLE:  # importing the module registered it (the @scorer decorator under this name)
        return _TABLE[path]
    if isinstance(target, ScorerSpec):
        spec = ScorerSpec(path, target.fn, target.needs, target.sliceable, target.reads, target.about)
    else:
        registered = next((s for s in _TABLE.values() if s.fn is target), None)
        spec = (ScorerSpec(path, target, registered.needs, registered.sliceable, registered.reads, registered.about)
                if registered
                else ScorerSpec(path, target))
    _TABLE[path] = spec
    return spec


def _load_builtins() -> None:
    import llmrank.passes.score  # noqa: F401 - registers the built-in scorers on import
