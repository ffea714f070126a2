"""Presets: named sets of pruning options, so that a user picks a trade-off, not the method's knobs.

Each preset is a handful of PruneConfig values plus the number of calibration sequences behind
the least-squares refit. Their measured quality and prune time on SmolLM2-135M, Gemma-3-270M
and Qwen2.5-Coder-0.5B are in benchmarks/README.md (``benchmarks/bench_presets.py``). An option
given on the command line next to ``--preset`` wins over the preset's value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from llmrank.ir.errors import ConfigError

__all__ = ["Preset", "PRESETS", "DEFAULT_PRESET", "preset", "preset_fields", "with_preset"]


@dataclass(frozen=True)
class Preset:
    """A trade-off between prune time and quality."""

    name: str
    options: Mapping[str, Any]  # PruneConfig field -> value
    compensation_samples: int  # calibration sequences behind the refit's statistics
    summary: str = field(default="", compare=False)

    def cell_fields(self) -> dict[str, Any]:
        """The preset as the sweep's cell fields (scorer, representation, compensation, ...)."""
        return {**self.options, "compensation_samples": self.compensation_samples}


_CORE = {"scorer": "wpr", "representation": "dataflow", "gamma": 0.5, "theta": 0.5, "compensation": "lstsq"}

PRESETS: Mapping[str, Preset] = MappingProxyType({
    "fast": Preset("fast", MappingProxyType({**_CORE, "allocation": "uniform", "selection": "score"}), 16,
                   "dataflow WPR, the same width per layer, refit on 16 calibration sequences"),
    "balanced": Preset("balanced", MappingProxyType({**_CORE, "allocation": "uniform", "selection": "score"}), 64,
                       "dataflow WPR, the same width per layer, refit on 64 calibration sequences"),
    "best": Preset("best", MappingProxyType({**_CORE, "allocation": "fisher", "selection": "refit"}), 64,
                   "widths from the loss's sensitivity (fisher), channels chosen by the refit's error, refit on 64"),
})

#: The preset a plain ``llmrank prune`` runs (see benchmarks/README.md for the measurement behind it).
DEFAULT_PRESET = "balanced"


def preset(name: str) -> Preset:
    """The preset called ``name``; a ConfigError naming the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None


def preset_fields() -> set[str]:
    """The PruneConfig fields some preset sets (their flags default to the preset's value)."""
    return {name for p in PRESETS.values() for name in p.options}


def with_preset(name: str | None, config: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Keyword options of ``llmrank.prune`` with a preset's values under them (a keyword wins).

    A preset and ``config=`` together are refused: both would say what every option is."""
    if name is None:
        return options
    if config is not None:
        raise ConfigError("give preset= or config=, not both: a PruneConfig already sets every option "
                          "(use config.with_(**preset(name).options) to start from a preset)")
    return {**preset(name).options, **options}
