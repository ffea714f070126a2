"""Rewrite passes: physically shrink the channels a selection drops, or zero them (mask modes).

Both work slot by slot from the IR (parameter, axis, block offset), so fused layers (Phi-3
gate_up_proj), biases and Conv1D's transposed weights need no special cases. They copy the
model unless ``inplace=True``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from llmrank.ir.errors import ConfigError
from llmrank.ir.graph import ModelIR
from llmrank.passes.compensate import Refit, apply_refit
from llmrank.passes.headcut import channel_masks, check_kept, update_head_counts

FFN_CONFIG_FIELDS = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size")


def _keep_masks(model: nn.Module, ir: ModelIR, kept: dict[str, torch.Tensor]) -> dict[tuple[str, int], torch.Tensor]:
    """Per (parameter path, axis): a boolean keep mask over that axis (channel groups and heads).

    Keyed by axis too: a Linear in the middle of an MLP is the consumer of one group (its
    columns) and the producer of the next (its rows), so one parameter can need two masks.
    """
    masks: dict[tuple[str, int], torch.Tensor] = {}
    for g in ir.groups:
        if g.name not in kept:  # a cut of heads alone leaves every channel group whole
            continue
        idx = kept[g.name].to(torch.long)
        for slot in g.slots:
            param = model.get_parameter(slot.param)
            key = (slot.param, slot.axis)
            mask = masks.get(key)
            if mask is None:
                mask = torch.ones(param.shape[slot.axis], dtype=torch.bool)
            block = torch.zeros(g.width, dtype=torch.bool)
            block[idx] = True
            mask[slot.offset:slot.offset + g.width] = block
            masks[key] = mask
    for hg in ir.head_groups:
        if hg.name not in kept:
            continue
        check_kept(hg, kept[hg.name])
        q_keep, kv_keep = channel_masks(hg, kept[hg.name])
        for slots, block in ((hg.q_slots, q_keep), (hg.kv_slots, kv_keep)):
            for slot in slots:
                key = (slot.param, slot.axis)
                mask = masks.get(key)
                if mask is None:
                    mask = torch.ones(model.get_parameter(slot.param).shape[slot.axis], dtype=torch.bool)
                mask[slot.offset:slot.offset + block.numel()] = block
                masks[key] = mask
    return masks


def _replace(model: nn.Module, path: str, value: torch.Tensor) -> None:
    owner_path, _, attr = path.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    old = getattr(owner, attr)
    setattr(owner, attr, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def shrink(
    model: nn.Module, ir: ModelIR, kept: dict[str, torch.Tensor], *, inplace: bool = False, refits: dict[str, Refit] | None = None
) -> nn.Module:
    """Return a model whose groups keep only ``kept`` channels, with smaller tensors.

    ``refits`` (from ``compensate.plan_refit``) replace the shrunk consumer weights.
    """
    target = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for (path, axis), mask in _keep_masks(target, ir, kept).items():
            param = target.get_parameter(path)
            _replace(target, path, param.index_select(axis, mask.nonzero().squeeze(1).to(param.device)))
    if refits:
        apply_refit(target, ir, refits, shrunk=True)
    for lin in ir.linears.values():
        _sync_shape(target.get_submodule(lin.name))
    _update_config(target, ir, kept)
    update_head_counts(target, ir, kept)
    return target


def _sync_shape(module: nn.Module) -> None:
    """Keep a layer's size attributes true to its new weight (repr, exporters, reload)."""
    weight = module.weight
    if hasattr(module, "nf"):  # transformers Conv1D stores weight as (in, out)
        module.nx, module.nf = int(weight.shape[0]), int(weight.shape[1])
    if hasattr(module, "in_features"):
        module.out_features, module.in_features = int(weight.shape[0]), int(weight.shape[1])


def _update_config(model: nn.Module, ir: ModelIR, kept: dict[str, torch.Tensor]) -> None:
    """With one width everywhere, the FFN size field of the config says it (stock reload)."""
    config = getattr(model, "config", None)
    if config is None or not ir.groups or any(g.name not in kept for g in ir.groups):
        return
    widths = {len(kept[g.name]) for g in ir.groups}
    originals = {g.width for g in ir.groups}
    if len(widths) != 1 or len(originals) != 1:
        return
    new = widths.pop()
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for field in FFN_CONFIG_FIELDS:
            value = getattr(cfg, field, "absent")
            # GPT-2's n_inner=None means 4 * n_embd: it must become explicit.
            if isinstance(value, int) or (field == "n_inner" and value is None):
                setattr(cfg, field, new)


def mask(
    model: nn.Module, ir: ModelIR, kept: dict[str, torch.Tensor], *, inplace: bool = False, refits: dict[str, Refit] | None = None
) -> nn.Module:
    """Zero the dropped channels in every slot (same shapes): the reference for verification.

    ``refits`` are written into the kept columns, so the reference matches a refitted shrink.
    """
    target = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for (path, axis), keep in _keep_masks(target, ir, kept).items():
            param = target.get_parameter(path)
            shape = [1] * param.dim()
            shape[axis] = -1
            param.mul_(keep.to(device=param.device, dtype=param.dtype).view(shape))
    if refits:
        apply_refit(target, ir, refits, shrunk=False)
    return target


def mask_paper(
    model: nn.Module, ir: ModelIR, scores_mid: dict[str, torch.Tensor], scores_out: dict[str, torch.Tensor], sparsity: float, *, inplace: bool = False
) -> nn.Module:
    """The authors' scheme: zero the lowest round(s * rows) rows of up_proj and of down_proj.

    gate_proj and biases are untouched; nothing shrinks. For paper-faithful experiments only.
    """
    missing = [g.name for g in ir.groups if g.name not in scores_out]
    if missing:
        raise ConfigError(f"mode 'mask-paper' masks down_proj's output rows by the scorer's exit scores (Scores.outputs), "
                          f"and the scorer gave none for {missing[0]!r}: return Scores(groups=..., outputs=...) or use "
                          "mode 'shrink' or 'mask'")
    target = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for g in ir.groups:
            up, down = ir.linears[g.primary.linear], ir.linears[g.consumers[0].linear]
            _zero_rows(target.get_parameter(up.weight), up.out_axis, g.primary.offset, _lowest(scores_mid[g.name], sparsity))
            _zero_rows(target.get_parameter(down.weight), down.out_axis, 0, _lowest(scores_out[g.name], sparsity))
    return target


def _lowest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    return torch.sort(scores.to(torch.float64), stable=True).indices[: round(sparsity * scores.numel())]


def _zero_rows(weight: torch.Tensor, axis: int, offset: int, rows: torch.Tensor) -> None:
    weight.index_fill_(axis, rows + offset, 0.0)
