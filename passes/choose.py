"""What the Select pass decides, as pure functions every route calls: the budget, then the kept sets.

``budget`` turns the options into the sparsities the cut will use (``target_params`` derives
them from a parameter count); ``choose`` turns scores (and, for the refit-aware options, each
group's removal curve) into kept channel indices and kept heads. The in-memory Select pass calls
both on the whole model; the block route calls them on each block when the decision is local to a
block (local pruner, uniform widths) and on all blocks at once between its walks otherwise, so
both routes keep the same channels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from llmrank.ir.errors import InputError
from llmrank.ir.graph import ModelIR
from llmrank.passes import budget as parameter_budget
from llmrank.passes.allocate import Curve, kept_from_curves
from llmrank.passes.config import PruneConfig
from llmrank.passes.headcut import head_notes, select_heads
from llmrank.passes.select import clamp_notes, select


@dataclass(frozen=True)
class Budget:
    """The cut in effect: sparsities after ``target_params`` was resolved, and the heads the
    parameter plan already chose (None: chosen from ``head_sparsity`` by ``choose``)."""

    sparsity: float
    head_sparsity: float
    heads: dict[str, torch.Tensor] | None = None
    notes: tuple[str, ...] = ()
    derived: bool = False  # from target_params

    def to_dict(self) -> dict[str, float | bool]:
        return {"sparsity": self.sparsity, "head_sparsity": self.head_sparsity, "from_target_params": self.derived}


@dataclass
class Choice:
    kept: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def is_local(config: PruneConfig) -> bool:
    """Whether each block's kept sets depend on that block alone (then the block route needs one walk)."""
    return config.pruner == "local" and config.allocation == "uniform" and config.target_params is None


def needs_curves(config: PruneConfig) -> bool:
    """Whether the choice reads the refit's removal curves (error-aware widths or channels)."""
    return config.allocation != "uniform" or config.selection != "score"


def budget(config: PruneConfig, ir: ModelIR, head_scores: Mapping[str, torch.Tensor], total_params: int) -> Budget:
    """The sparsities the cut uses; with ``target_params`` they are planned from the parameter count."""
    if config.target_params is None:
        return Budget(config.sparsity, config.head_sparsity)
    sparsity, head_sparsity, heads = parameter_budget.plan(ir, dict(head_scores), total_params, config.target_params,
                                                           config.head_share)
    notes = [f"target_params {config.target_params:g} (head_share {config.head_share:g}): sparsity {sparsity:.4g}, "
             f"head_sparsity {head_sparsity:.3g}"]
    if config.head_share > 0 and not heads:
        notes.append(f"head_share {config.head_share:g} was not reachable: no whole head could be cut within the budget, so "
                     "the cut is FFN neurons only")
    return Budget(sparsity, head_sparsity, heads or None, tuple(notes), derived=True)


def choose(config: PruneConfig, ir: ModelIR, scores: Mapping[str, torch.Tensor], head_scores: Mapping[str, torch.Tensor],
           plan: Budget, *, curves: Mapping[str, Curve] | None = None,
           loss_probe: Callable[[dict[str, torch.Tensor]], dict[str, float]] | None = None, notes: bool = True) -> Choice:
    """Kept channels of every group of ``ir`` and kept heads of every head group, under ``plan``.

    ``curves``: each group's removal curve (``allocate.removal_curves``), needed when
    :func:`needs_curves`. ``notes=False`` skips the rounding notes (the block route writes
    them once, for all blocks).
    """
    c = config
    out = Choice()
    if needs_curves(c):
        if curves is None:
            raise InputError("choose: allocation/selection read the refit's removal curves: give curves=")
        out.kept = kept_from_curves(ir, curves, scores, plan.sparsity, allocation=c.allocation, selection=c.selection,
                                    multiple=c.multiple, min_width=c.min_width, loss_probe=loss_probe)
    else:
        out.kept = select(ir, dict(scores), plan.sparsity, pruner=c.pruner, multiple=c.multiple, min_width=c.min_width)
    if notes and c.mode != "mask-paper":
        out.notes += clamp_notes(ir, out.kept, plan.sparsity, multiple=c.multiple, min_width=c.min_width)
    heads = {hg.name: plan.heads[hg.name] for hg in ir.head_groups if hg.name in plan.heads} if plan.heads else None
    if heads is None and plan.head_sparsity > 0 and ir.head_groups:
        heads = select_heads(ir, dict(head_scores), plan.head_sparsity)
        if notes:
            out.notes += head_notes(ir, heads, plan.head_sparsity)
    out.kept.update(heads or {})
    return out
