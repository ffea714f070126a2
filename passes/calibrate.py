"""Calibration pass: per-feature L2 activation norms of every Linear in the IR.

ALGORITHM.md defines a_in[j] as the mean over batches of ||X_b[:, :, j]||_2 (the norm over
batch and sequence of one batch, then the mean of those per-batch norms). Hooks reduce each
batch to one vector per Linear at once, so memory stays O(parameters), never O(activations).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llmrank.ir.graph import ModelIR
from llmrank.ir.trace import accepts_cache, is_hf_model


@dataclass
class ActivationNorms:
    """a_in / a_out per Linear name, the mean of per-batch L2 norms, plus the batch count."""

    a_in: dict[str, torch.Tensor] = field(default_factory=dict)
    a_out: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: int = 0
    tokens: int = 0


class CalibrationError(ValueError):
    """The calibration data cannot produce norms (empty, wrong dtype or shape)."""


def _batch_norm(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    return flat.pow(2).sum(0).sqrt()


def calibrate(
    model: nn.Module,
    ir: ModelIR,
    batches: Iterable[torch.Tensor | dict],
    *,
    linears: Iterable[str] | None = None,
    progress: bool = True,
    total: int | None = None,
) -> ActivationNorms:
    """Run ``batches`` (token tensors or kwargs dicts) through ``model`` and average norms.

    ``linears`` restricts the hooks (default: every Linear in the IR). The model is run in
    eval mode under no_grad and is not modified.
    """
    names = list(linears) if linears is not None else list(ir.linears)
    sums_in = {n: None for n in names}
    sums_out = {n: None for n in names}
    handles = []

    def hook(name: str):
        def record(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            a_in, a_out = _batch_norm(args[0]), _batch_norm(output)
            sums_in[name] = a_in if sums_in[name] is None else sums_in[name] + a_in
            sums_out[name] = a_out if sums_out[name] is None else sums_out[name] + a_out
        return record

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
    norms = ActivationNorms()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibrating", unit="batch", total=total, disable=not progress):
                norms.tokens += _run(model, batch)
                norms.batches += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if norms.batches == 0:
        raise CalibrationError("calibration data is empty: give at least one batch of token ids (e.g. --samples 16)")
    for name in names:
        if sums_in[name] is None:
            continue  # a Linear the calibration inputs never reach
        norms.a_in[name] = (sums_in[name] / norms.batches).to(torch.float32)
        norms.a_out[name] = (sums_out[name] / norms.batches).to(torch.float32)
    return norms


def _run(model: nn.Module, batch: torch.Tensor | dict) -> int:
    if isinstance(batch, dict):
        model(**batch)
        ids = next(iter(batch.values()))
        return int(ids.numel())
    if not isinstance(batch, torch.Tensor) or batch.numel() == 0:
        raise CalibrationError(f"a calibration batch must be a non-empty tensor or dict of tensors, got {type(batch).__name__}")
    if is_hf_model(model):
        _check_token_ids(model, batch)
    if hasattr(model, "config") and batch.dtype == torch.long:
        kwargs = {"use_cache": False} if accepts_cache(model) else {}
        model(input_ids=batch, **kwargs)
    else:
        model(batch)
    return int(batch.shape[0] * (batch.shape[1] if batch.dim() > 1 else 1))


def _check_token_ids(model: nn.Module, batch: torch.Tensor) -> None:
    """A Hugging Face model takes token ids: integers inside its embedding table."""
    if batch.is_floating_point() or batch.is_complex() or batch.dtype == torch.bool:
        raise CalibrationError(f"calibration batches for {type(model).__name__} must be integer token ids, got dtype {batch.dtype}")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    low, high = int(batch.min()), int(batch.max())
    if vocab is not None and (low < 0 or high >= vocab):
        raise CalibrationError(f"calibration token ids must be in [0, {vocab}) for {type(model).__name__}, got ids from {low} to {high}: wrong tokenizer?")
