"""Gradient calibration: sum of w * dL/dw per channel of every group slot, for the taylor scorer.

L is the causal-LM loss on the calibration batches: the mean over sequences of each
sequence's mean next-token cross-entropy. Everything the scorer needs is linear in the
gradient, so the walk runs one sequence at a time and reduces w * grad to one vector per
(parameter, axis) right away: memory is one sequence's backward plus the gradients of the
group parameters, whatever the number of batches. Only group parameters get gradients; the
caller's model comes back as it was (requires_grad flags, .grad, train/eval mode, weights).

The block-by-block route (``llmrank.passes.layerwise``) cannot run this: the loss needs the
whole model's logits, and a backward through every block at once is exactly what it avoids.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from llmrank.ir.errors import CalibrationError, ConfigError
from llmrank.ir.graph import ModelIR
from llmrank.passes import scorers as S

#: (parameter name, axis) -> sum over the other axes of w * dL/dw, float64
FirstOrder = dict[tuple[str, int], torch.Tensor]


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of token ids [B, T] (fp32), from the model's logits."""
    kwargs = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
    out = model(input_ids=ids, **kwargs) if hasattr(model, "config") else model(ids)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise ConfigError("the taylor scorer needs a causal language model: token ids [B, T] in, logits [B, T, vocab] out")
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _sequences(batches: Sequence[Any]) -> Iterator[torch.Tensor]:
    for batch in batches:
        ids = batch.get("input_ids") if isinstance(batch, dict) else batch
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 2 or ids.shape[1] < 2:
            raise CalibrationError("the taylor scorer needs calibration token ids [N, L] with L >= 2 (a loss needs a next token)")
        yield from ids.split(1)


@contextmanager
def _only_grads_of(model: nn.Module, names: set[str]) -> Iterator[dict[str, nn.Parameter]]:
    """Gradients for ``names`` only, in eval mode; every flag, .grad and the mode restored after."""
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    was_training = model.training
    try:
        for n, p in params.items():
            p.requires_grad_(n in names)
            p.grad = None
        model.eval()
        yield {n: params[n] for n in names}
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = grads[n]
        model.train(was_training)


def first_order(model: nn.Module, ir: ModelIR, batches: Sequence[Any], *, progress: bool = False,
                elementwise: bool = False) -> FirstOrder:
    """sum w * dL/dw per channel of every (parameter, axis) that holds a group's channels;
    ``elementwise``: sum |w * dL/dw| instead, with dL/dw the gradient of the whole calibration
    loss (so the gradients are accumulated over every sequence before the absolute value:
    memory for one gradient per group parameter)."""
    keys = sorted({(s.param, s.axis) for g in ir.groups for s in g.slots})
    sequences = list(_sequences(batches))
    if not sequences:
        raise CalibrationError("the taylor scorer needs calibration data: give at least one sequence of token ids")
    out: FirstOrder = {}
    with _only_grads_of(model, {name for name, _ in keys}) as params, torch.enable_grad():
        for ids in tqdm(sequences, desc="gradients", unit="seq", disable=not progress):
            (causal_lm_loss(model, ids) / len(sequences)).backward()
            if elementwise:
                continue
            for name, axis in keys:
                p = params[name]
                if p.grad is None:
                    raise CalibrationError(f"no gradient reached {name!r}: the loss does not depend on it")
                part = S.first_order(p, p.grad, axis)
                out[(name, axis)] = part if (name, axis) not in out else out[(name, axis)] + part
            for p in params.values():
                p.grad = None
        if elementwise:
            for name, axis in keys:
                p = params[name]
                if p.grad is None:
                    raise CalibrationError(f"no gradient reached {name!r}: the loss does not depend on it")
                out[(name, axis)] = S.first_order(p, p.grad, axis, absolute=True)
    return out


def group_parts(ir: ModelIR, grads: FirstOrder) -> dict[str, list[torch.Tensor]]:
    """Per group: the first-order vector of each of its slots, cut to the group's block."""
    return {g.name: [grads[(s.param, s.axis)][s.offset:s.offset + g.width] for s in g.slots] for g in ir.groups}
