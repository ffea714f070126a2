"""One parameter budget for heads and neurons: ``target_params`` -> (sparsity, head_sparsity).

The split rule is one number, ``head_share``: the fraction of the removed parameters that
should come from attention heads (0: neurons only, 1: heads only). Heads are cut in whole
steps that the GQA constraint allows, so the rule first takes the head cut whose removed
parameters come closest to ``head_share`` of the budget, then fills the rest of the budget with
FFN neurons. Both are computed from the scores the selection will use, so the parameter count
the pipeline reports is the one planned here, up to the rounding of one neuron per group.
"""

from __future__ import annotations

import torch

from llmrank.ir.errors import ConfigError
from llmrank.ir.graph import ModelIR
from llmrank.passes.headcut import kept_kv, select_heads

#: Head sparsities the plan tries (the feasible counts of every layer fall between these steps).
_STEPS = 200


def removed_by_heads(ir: ModelIR, kept: dict[str, torch.Tensor]) -> int:
    """Parameters a head selection removes (q rows, o columns, k and v rows, their biases)."""
    total = 0
    for hg in ir.head_groups:
        heads = kept.get(hg.name)
        if heads is None:
            continue
        total += (hg.heads - len(heads)) * hg.head_cost(ir.linears)
        total += (hg.kv_heads - len(kept_kv(hg, heads))) * hg.kv_cost(ir.linears)
    return total


def removed_by_neurons(ir: ModelIR, sparsity: float) -> int:
    """Parameters the local pruner removes at ``sparsity`` (round(sparsity * width) per group)."""
    return sum(round(sparsity * g.width) * ir.channel_cost(g) for g in ir.groups)


def plan(ir: ModelIR, head_scores: dict[str, torch.Tensor], total_params: int, target_params: float,
         head_share: float) -> tuple[float, float, dict[str, torch.Tensor]]:
    """(sparsity, head_sparsity, kept heads) that keep about ``target_params`` of ``total_params``."""
    budget = round((1.0 - target_params) * total_params)
    # cutting no head misses the head share by all of it; a head cut is taken only when it comes closer
    # and stays within the whole budget
    best_heads: tuple[float, float, dict[str, torch.Tensor]] = (head_share * budget, 0.0, {})
    if head_share > 0 and ir.head_groups:
        for step in range(1, _STEPS):
            s = step / _STEPS
            try:
                kept = select_heads(ir, head_scores, s)
            except ConfigError:
                continue  # a step too small to remove a head in some layer
            removed = removed_by_heads(ir, kept)
            if removed > budget:
                break  # larger steps remove more
            miss = abs(removed - head_share * budget)
            if miss < best_heads[0]:
                best_heads = (miss, s, kept)
    _, head_sparsity, kept = best_heads
    rest = budget - removed_by_heads(ir, kept)
    ffn_max = removed_by_neurons(ir, 1.0)
    if rest > ffn_max:
        raise ConfigError(f"target_params {target_params:g} asks to remove {budget:,} parameters; the heads take "
                          f"{budget - rest:,} and all FFN neurons only {ffn_max:,}: raise target_params or head_share")
    lo, hi = 0.0, 1.0
    for _ in range(40):  # removed_by_neurons grows with sparsity: bisect to the budget
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed_by_neurons(ir, mid) < rest else (lo, mid)
    sparsity = min(max(hi if rest > 0 else 0.0, 0.0), 0.999)
    return sparsity, head_sparsity, kept
