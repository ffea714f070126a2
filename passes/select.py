"""Selection pass: which channels each group keeps, from scores and a sparsity target.

- ``local``: every group drops round(sparsity * width) of its lowest-scored channels.
- ``global``: all groups' scores are pooled and the ceil(sparsity * total) lowest are dropped.
  Scores sum to 1 per group, so this favours cutting wide groups. Only neurons are pooled:
  a down_proj row (a residual channel) cannot be shrunk alone, so it is never a candidate.
Kept widths can then be rounded to a multiple (hardware-friendly GEMMs) and floored at a
minimum. Ties break towards the lower channel index, so selection is deterministic.
"""

from __future__ import annotations

import math

import torch

from llmrank.ir.errors import ConfigError, InputError
from llmrank.ir.graph import ModelIR

PRUNERS = ("local", "global")


def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or math.isnan(sparsity) or not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1) (the fraction of channels to remove), got {sparsity!r}")


def round_width(keep: int, width: int, multiple: int = 1, min_width: int = 1) -> int:
    """Round a kept width to the nearest multiple, within [min_width, width]."""
    if multiple < 1 or min_width < 1:
        raise ConfigError(f"multiple and min_width must be >= 1, got {multiple} and {min_width}")
    if multiple > 1:
        keep = max(multiple, int(math.floor(keep / multiple + 0.5)) * multiple)
    return max(min(keep, width), min(min_width, width))


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, ascending; ties keep the lower index."""
    order = torch.sort(-scores.to(torch.float64), stable=True).indices
    return torch.sort(order[:keep]).values


def select(
    ir: ModelIR,
    scores: dict[str, torch.Tensor],
    sparsity: float,
    *,
    pruner: str = "local",
    multiple: int = 1,
    min_width: int = 1,
) -> dict[str, torch.Tensor]:
    """Kept channel indices (sorted LongTensor) per group name."""
    check_sparsity(sparsity)
    if pruner not in PRUNERS:
        raise ConfigError(f"unknown pruner {pruner!r}; choose one of {', '.join(PRUNERS)}")
    missing = [g.name for g in ir.groups if g.name not in scores]
    if missing:
        raise InputError(f"no scores for groups {missing}")
    if pruner == "local":
        keeps = {g.name: g.width - round(sparsity * g.width) for g in ir.groups}
    else:
        keeps = _global_keeps(ir, scores, sparsity)
    return {g.name: _top(scores[g.name], round_width(keeps[g.name], g.width, multiple, min_width)) for g in ir.groups}


def _global_keeps(ir: ModelIR, scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, int]:
    pooled = torch.cat([scores[g.name].to(torch.float64) for g in ir.groups])
    owner = torch.cat([torch.full((g.width,), i) for i, g in enumerate(ir.groups)])
    n_remove = math.ceil(sparsity * pooled.numel())
    removed = torch.sort(pooled, stable=True).indices[:n_remove]
    dropped = torch.bincount(owner[removed], minlength=len(ir.groups))
    return {g.name: g.width - int(dropped[i]) for i, g in enumerate(ir.groups)}


def effective_sparsity(ir: ModelIR, kept: dict[str, torch.Tensor]) -> float:
    """The fraction of all groups' channels actually removed (after rounding and floors)."""
    total = sum(g.width for g in ir.groups)
    return 1.0 - sum(len(kept[g.name]) for g in ir.groups) / total if total else 0.0


def clamp_notes(ir: ModelIR, kept: dict[str, torch.Tensor], sparsity: float, *, multiple: int = 1, min_width: int = 1) -> list[str]:
    """Why the kept widths differ from what ``sparsity`` asked for, in words (empty if they do not)."""
    notes = []
    floored = [g.name for g in ir.groups if min_width >= g.width]
    if floored and sparsity > 0:
        notes.append(f"min_width {min_width} is at least the width of {len(floored)} group(s) (e.g. {floored[0]}): they keep every channel")
    effective = effective_sparsity(ir, kept)
    # Any move past a hundredth is noted, however coarse --multiple makes the steps: a multiple
    # of half a group's width turns 0.3 into 0.5, which is the user's to know.
    if abs(effective - sparsity) > 0.01:
        why = f"multiple {multiple} rounds each kept width to a multiple of {multiple}" if multiple > 1 else "rounding"
        notes.append(f"asked for sparsity {sparsity:g}, removed {effective:.3g} of the channels "
                     f"({why}; min_width {min_width})")
    return notes
