"""Which heads an attention layer keeps, and what that means for its tensors and attributes.

The stock attention repeats each KV head ``n_rep`` times, so a cut must leave every kept KV
group with the same number of query heads: kept = kv' groups x r' heads, with kv' <= kv_heads
and r' <= n_rep. Selection picks, per layer, the feasible (kv', r') nearest the asked count with
the highest summed score: the best r' heads inside each group, then the best kv' groups. A KV
head is kept exactly when one of its query heads is. Kept query heads stay in their order, so
query head i of the cut layer still reads KV head i // r'.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from llmrank.ir.errors import ConfigError, InputError
from llmrank.ir.graph import HeadGroup, ModelIR

#: Attention-module attributes that hold head counts, across transformers families.
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_CONFIG_HEADS = ("num_attention_heads", "n_head")
_CONFIG_KV = ("num_key_value_heads",)


def check_head_sparsity(value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or not 0.0 <= value < 1.0:
        raise ConfigError(f"head_sparsity must be in [0, 1) (the fraction of query heads to remove per layer), got {value!r}")


def feasible_counts(hg: HeadGroup) -> list[int]:
    """Query-head counts a layer can keep: kv' x r' with kv' <= kv_heads and r' <= n_rep."""
    return sorted({kv * r for kv in range(1, hg.kv_heads + 1) for r in range(1, hg.n_rep + 1)})


def kept_kv(hg: HeadGroup, heads: torch.Tensor) -> torch.Tensor:
    """KV heads that serve at least one kept query head."""
    return torch.unique(heads.to(torch.long) // hg.n_rep)


def check_kept(hg: HeadGroup, heads: torch.Tensor) -> None:
    """Kept query heads must be sorted, in range, and the same count in every kept KV group."""
    heads = heads.to(torch.long)
    if heads.numel() == 0 or bool((heads[1:] <= heads[:-1]).any()) or int(heads.min()) < 0 or int(heads.max()) >= hg.heads:
        raise InputError(f"{hg.name}: kept heads must be distinct ascending indices in [0, {hg.heads}), got {heads.tolist()}")
    counts = torch.bincount(heads // hg.n_rep, minlength=hg.kv_heads)
    if len({int(c) for c in counts if c > 0}) != 1:
        raise InputError(f"{hg.name}: every kept KV group must keep the same number of query heads (the attention repeats "
                         f"each KV head equally), got {counts.tolist()} per KV group")


def channel_masks(hg: HeadGroup, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep masks over the ``heads * head_dim`` query channels and ``kv_heads * head_dim`` KV channels."""
    q = torch.zeros(hg.heads, dtype=torch.bool)
    q[heads.to(torch.long)] = True
    kv = torch.zeros(hg.kv_heads, dtype=torch.bool)
    kv[kept_kv(hg, heads)] = True
    return q.repeat_interleave(hg.head_dim), kv.repeat_interleave(hg.head_dim)


def kept_channels(hg: HeadGroup, heads: torch.Tensor) -> torch.Tensor:
    """Indices of the kept o_proj input channels (the kept heads' blocks)."""
    return channel_masks(hg, heads)[0].nonzero().squeeze(1)


def select_heads(ir: ModelIR, scores: dict[str, torch.Tensor], head_sparsity: float) -> dict[str, torch.Tensor]:
    """Kept query heads per head group: round(head_sparsity * heads) removed, moved to the
    nearest feasible count (ties keep more), the best-scored feasible set."""
    check_head_sparsity(head_sparsity)
    kept: dict[str, torch.Tensor] = {}
    for hg in ir.head_groups:
        target = hg.heads - round(head_sparsity * hg.heads)
        count = min(feasible_counts(hg), key=lambda c: (abs(c - target), -c))
        if head_sparsity > 0 and count == hg.heads:
            raise ConfigError(
                f"head_sparsity {head_sparsity:g} asks {hg.name} to drop {hg.heads - target} of its {hg.heads} query heads, but every KV "
                f"group must keep the same number of query heads ({hg.kv_heads} KV groups of {hg.n_rep}): the layer can keep "
                f"{', '.join(map(str, feasible_counts(hg)))} heads; raise head_sparsity to at least {_least(hg):.3g}")
        s = scores.get(hg.name)
        if s is None or tuple(s.shape) != (hg.heads,):
            raise InputError(f"no head scores of shape ({hg.heads},) for {hg.name}")
        kept[hg.name] = _best(hg, s.to(torch.float64), count)
    return kept


def _least(hg: HeadGroup) -> float:
    """The smallest head_sparsity that removes a head of ``hg``."""
    below = max(c for c in feasible_counts(hg) if c < hg.heads) if hg.heads > 1 else hg.heads
    return (hg.heads - below) / hg.heads


def _best(hg: HeadGroup, scores: torch.Tensor, count: int) -> torch.Tensor:
    best: tuple[float, torch.Tensor] | None = None
    for r in range(1, hg.n_rep + 1):
        if count % r or count // r > hg.kv_heads:
            continue
        per_group = scores.view(hg.kv_heads, hg.n_rep)
        order = torch.sort(-per_group, dim=1, stable=True).indices[:, :r]
        group_score = per_group.gather(1, order).sum(1)
        groups = torch.sort(torch.sort(-group_score, stable=True).indices[: count // r]).values
        heads = torch.sort((groups[:, None] * hg.n_rep + torch.sort(order[groups], dim=1).values).reshape(-1)).values
        total = float(scores[heads].sum())
        if best is None or total > best[0] + 1e-15:
            best = (total, heads)
    assert best is not None
    return best[1]


def set_head_counts(model: nn.Module, module_path: str, heads: int, kv_heads: int) -> None:
    """Make an attention module's head-count attributes (and, where its forward reads them from
    its config, a per-layer copy of that config) say ``heads`` / ``kv_heads``."""
    module = model.get_submodule(module_path)
    _set_ints(module, _HEAD_ATTRS, heads)
    _set_ints(module, _KV_ATTRS, kv_heads)
    if isinstance(getattr(module, "num_key_value_groups", None), int):
        module.num_key_value_groups = heads // kv_heads
    config = getattr(module, "config", None)
    if config is None or not any(hasattr(config, f) for f in _CONFIG_HEADS):
        return
    if _config_counts(config) != (heads, kv_heads):
        own = copy.copy(config)
        _write_counts(own, heads, kv_heads)
        module.config = own


def _config_counts(config) -> tuple[int | None, int | None]:
    heads = next((getattr(config, f) for f in _CONFIG_HEADS if isinstance(getattr(config, f, None), int)), None)
    kv = next((getattr(config, f) for f in _CONFIG_KV if isinstance(getattr(config, f, None), int)), heads)
    return heads, kv


def _write_counts(config, heads: int, kv_heads: int) -> None:
    _set_ints(config, _CONFIG_HEADS, heads)
    _set_ints(config, _CONFIG_KV, kv_heads)


def _set_ints(owner: object, names: tuple[str, ...], value: int) -> None:
    """Set each of ``names`` that ``owner`` holds as an int (absent or None ones stay)."""
    for name in names:
        if isinstance(getattr(owner, name, None), int):
            setattr(owner, name, value)


def update_head_counts(model: nn.Module, ir: ModelIR, kept: dict[str, torch.Tensor]) -> None:
    """After a cut: the config says the counts when every layer agrees (stock reload), with an
    explicit head_dim; each attention module says its own counts."""
    counts = {hg.name: (len(kept[hg.name]), len(kept_kv(hg, kept[hg.name]))) for hg in ir.head_groups if hg.name in kept}
    if not counts:
        return
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if config is not None and hasattr(config, "get_text_config") else config
    head_dims = {hg.head_dim for hg in ir.head_groups}
    if text is not None and len(set(counts.values())) == 1 and len(counts) == len(ir.head_groups) and len(head_dims) == 1:
        heads, kv = next(iter(counts.values()))
        if getattr(text, "head_dim", None) is None and any(hasattr(text, f) for f in _CONFIG_HEADS):
            text.head_dim = next(iter(head_dims))
        _write_counts(text, heads, kv)
    for hg in ir.head_groups:
        if hg.name in counts:
            set_head_counts(model, hg.module, *counts[hg.name])


def layer_heads(model: nn.Module) -> dict[str, list[int]]:
    """[query heads, KV heads] per attention module, read from its q and k projections' shapes
    and head_dim (empty for modules that do not say their head_dim)."""
    out: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        head_dim = getattr(module, "head_dim", None)
        q, k = getattr(module, "q_proj", None), getattr(module, "k_proj", None)
        if isinstance(head_dim, int) and isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
            out[name] = [q.out_features // head_dim, k.out_features // head_dim]
        elif isinstance(head_dim, int) and isinstance(getattr(module, "qkv_proj", None), nn.Linear):
            kv = getattr(module, "num_key_value_heads", None)
            if isinstance(kv, int):
                out[name] = [(module.qkv_proj.out_features - 2 * kv * head_dim) // head_dim, kv]
    return out


def head_notes(ir: ModelIR, kept: dict[str, torch.Tensor], head_sparsity: float) -> list[str]:
    """Where the GQA constraint moved a layer's head count away from what was asked, in words."""
    moved = []
    for hg in ir.head_groups:
        want = hg.heads - round(head_sparsity * hg.heads)
        if hg.name in kept and len(kept[hg.name]) != want:
            moved.append(f"{hg.name} keeps {len(kept[hg.name])} of {hg.heads} query heads (asked {want}: every KV group must keep "
                         "the same count)")
    return moved[:1] + ([f"... and {len(moved) - 1} more layer(s) alike"] if len(moved) > 1 else [])


def heads_kept(ir: ModelIR, kept: dict[str, torch.Tensor]) -> dict[str, dict[str, object]]:
    """Per head group: query and KV heads before and after, and which query heads stay (report, JSON)."""
    out = {}
    for hg in ir.head_groups:
        heads = kept.get(hg.name, torch.arange(hg.heads))
        out[hg.name] = {"heads": [hg.heads, len(heads)], "kv_heads": [hg.kv_heads, len(kept_kv(hg, heads))],
                        "kept": heads.tolist()}
    return out
