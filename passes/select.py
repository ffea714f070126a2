"""Selection pass: which channels each group keeps, from scores and a sparsity target.

- ``local``: every group drops round(sparsity * width) of its lowest-scored channels.
- ``global``: all groups' scores are pooled and the ceil(sparsity * total) lowest are dropped.
  Scores sum to 1 per group, so this favours cutting wide groups (ALGORITHM.md).
Kept widths can then be rounded to a multiple (hardware-friendly GEMMs) and floored at a
minimum. Ties break towards the lower channel index, so selection is deterministic.
"""

from __future__ import annotations

import math

import torch

from llmrank.ir.graph import ModelIR

PRUNERS = ("local", "global")


def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or math.isnan(sparsity) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (the fraction of channels to remove), got {sparsity!r}")


def round_width(keep: int, width: int, multiple: int = 1, min_width: int = 1) -> int:
    """Round a kept width to the nearest multiple, within [min_width, width]."""
    if multiple < 1 or min_width < 1:
        raise ValueError(f"multiple and min_width must be >= 1, got {multiple} and {min_width}")
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
        raise ValueError(f"unknown pruner {pruner!r}; choose one of {', '.join(PRUNERS)}")
    missing = [g.name for g in ir.groups if g.name not in scores]
    if missing:
        raise ValueError(f"no scores for groups {missing}")
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
