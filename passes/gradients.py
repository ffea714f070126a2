"""The loss gradients, in one backward walk: w * dL/dw per group channel (the taylor scorers)
and the squared dL/dy per consumer output feature (allocation 'fisher').

L is the next-token cross-entropy of a causal LM on the calibration sequences
(``passes/lmloss.py``); the walk runs one sequence at a time (the logits of a 262k vocabulary
are large) and reduces what it reads right away, so memory is one sequence's backward plus the
gradients of the group parameters, whatever the number of batches. The caller's model comes
back as it was (requires_grad flags, .grad, train/eval mode, weights).

- First order (``taylor``, ``taylor-element``): L is the mean over sequences of each
  sequence's mean loss; only group parameters get gradients. ``taylor`` sums w * dL/dw over
  each channel per sequence (it is linear in the gradient); ``taylor-element`` sums
  |w * dL/dw| with dL/dw the whole calibration loss's gradient, so the gradients accumulate
  over every sequence before the absolute value.
- Output sensitivity (``fisher``): an error e added to a consumer's output y raises the summed
  loss by about 1/2 sum_r E[g_r^2] E[e_r^2] (g = dL/dy, the diagonal of the empirical Fisher,
  taking g and e as independent). The refit's residual per output row, weighted by E[g_r^2],
  is then an estimate of the loss increase, comparable across layers, which the plain output
  energy (an error relative to the layer's own output) is not. Here L is the summed loss and
  only activation gradients are formed.

When both are asked, each sequence runs forward once and back twice (each loss as it always
was, so either result is the one it would be alone).

The block-by-block route (``llmrank.passes.blocks.driver``) cannot run this: the loss needs the
whole model's logits, and a backward through every block at once is exactly what it avoids.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llmrank.ir.errors import CalibrationError, UnsupportedModelError
from llmrank.ir.graph import ModelIR
from llmrank.passes import scorers as S
from llmrank.passes.hooks import forward_hooks
from llmrank.passes.lmloss import lm_logits, next_token_loss

#: what the first-order statistics sum: w * dL/dw per channel, or |w * dL/dw| per weight
FIRST_ORDER_KINDS = ("signed", "absolute")


class FirstOrder(dict):
    """(parameter name, axis) -> sum over the other axes of w * dL/dw (float64), and ``kind``,
    which of FIRST_ORDER_KINDS it holds (None: not recorded, e.g. a plain dict's contents), so a
    pass given statistics of the other kind computes its own."""

    def __init__(self, *args: Any, kind: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.kind = kind


def first_order_kind(scorer: str) -> str | None:
    """The first-order statistics a scorer reads (None: it reads none)."""
    return {"taylor": "signed", "taylor-element": "absolute"}.get(scorer)


@dataclass
class LossGradients:
    """What one backward walk read: the first-order sums (None unless asked) and E[(dL/dy_r)^2]
    per output feature of each asked Linear (fp64; empty unless asked)."""

    first_order: FirstOrder | None = None
    sensitivity: dict[str, torch.Tensor] | None = None


def _who(first_order: str | None) -> str:
    return "the taylor scorer" if first_order else "allocation 'fisher'"


def _sequences(batches: Sequence[Any], who: str) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for batch in batches:
        ids = batch.get("input_ids") if isinstance(batch, dict) else batch
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 2 or ids.shape[1] < 2:
            raise CalibrationError(f"{who} needs calibration token ids [N, L] with L >= 2 (a loss needs a next token)")
        out.extend(ids.split(1))
    if not out:
        raise CalibrationError(f"{who} needs calibration data: give at least one sequence of token ids")
    return out


@contextmanager
def _only_grads_of(model: nn.Module, names: set[str]) -> Iterator[dict[str, nn.Parameter]]:
    """Gradients for ``names`` only (none: activation gradients only), in eval mode; every
    flag, .grad and the mode restored after."""
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


class _Outputs:
    """Forward hooks keeping the outputs of the watched Linears (this sequence's), and one on the
    input embeddings that makes their output a leaf needing a gradient when nothing before the
    Linears does (so the loss reaches them with no parameter's gradient formed)."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no input embeddings: allocation 'fisher' needs a causal "
                                        "language model; use allocation 'error'")
        self.names, self.seen = list(names), {}
        self.hooks: dict = {name: self._keep(name) for name in self.names}
        self.hooks[embeddings] = lambda _m, _a, out: None if out.requires_grad else out.detach().requires_grad_(True)

    def _keep(self, name: str):
        def record(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if out.requires_grad:
                self.seen.setdefault(name, []).append(out)
        return record


def backward_walk(model: nn.Module, batches: Sequence[Any], *, ir: ModelIR | None = None, first_order: str | None = None,
                  sensitivity: Iterable[str] = (), progress: bool = False) -> LossGradients:
    """One forward per calibration sequence, and the backward(s) that what is asked needs.

    ``first_order`` ("signed" / "absolute", see FIRST_ORDER_KINDS): the taylor sums over every
    (parameter, axis) of ``ir``'s group slots; ``sensitivity``: the Linears whose output
    sensitivities are wanted.
    """
    names = sorted(set(sensitivity))
    if first_order is not None and first_order not in FIRST_ORDER_KINDS:
        raise ValueError(f"first_order must be one of {FIRST_ORDER_KINDS}, got {first_order!r}")
    if first_order is None and not names:
        return LossGradients()
    keys = sorted({(s.param, s.axis) for g in ir.groups for s in g.slots}) if first_order else []
    who = _who(first_order)
    sequences = _sequences(batches, who)
    watch = _Outputs(model, names) if names else None
    result = LossGradients(first_order=FirstOrder(kind=first_order) if first_order else None, sensitivity={} if names else None)
    tokens = 0
    hooks = watch.hooks if watch is not None else {}
    with _only_grads_of(model, {name for name, _ in keys}) as params, torch.enable_grad(), forward_hooks(model, hooks):
        for ids in tqdm(sequences, desc="gradients", unit="seq", disable=not progress):
            if watch is not None:
                watch.seen = {}
            logits = lm_logits(model, ids, needed_by=who)
            if watch is not None:
                _add_sensitivity(result.sensitivity, watch, next_token_loss(logits, ids, reduction="sum"), retain=bool(keys))
                tokens += ids.numel()
            if keys:
                (next_token_loss(logits, ids) / len(sequences)).backward()
                if first_order == "signed":
                    _add_first_order(result.first_order, params, keys)
        if first_order == "absolute":
            _add_first_order(result.first_order, params, keys, absolute=True)
    if watch is not None:
        if tokens == 0 or set(result.sensitivity) != set(names):
            raise CalibrationError("no loss gradient reached the consumers: allocation 'fisher' needs calibration token ids")
        result.sensitivity = {n: s / tokens for n, s in result.sensitivity.items()}
    return result


def _add_sensitivity(sums: dict[str, torch.Tensor], watch: _Outputs, loss: torch.Tensor, *, retain: bool) -> None:
    """Add sum over tokens of (dL/dy_r)^2 for every watched output of this sequence."""
    outs = [(name, out) for name in watch.names for out in watch.seen.get(name, ())]
    if not outs:
        return
    grads = torch.autograd.grad(loss, [out for _, out in outs], retain_graph=retain, allow_unused=True)
    for (name, _), g in zip(outs, grads):
        if g is not None:
            part = g.detach().reshape(-1, g.shape[-1]).double().pow(2).sum(0)
            sums[name] = part if name not in sums else sums[name] + part


def _add_first_order(out: FirstOrder, params: dict[str, nn.Parameter], keys: list[tuple[str, int]], *,
                     absolute: bool = False) -> None:
    """Add this gradient's first-order vectors, then clear the gradients (``absolute``: the
    gradients are the whole loss's, read once at the end)."""
    for name, axis in keys:
        p = params[name]
        if p.grad is None:
            raise CalibrationError(f"no gradient reached {name!r}: the loss does not depend on it")
        part = S.first_order(p, p.grad, axis, absolute=absolute)
        out[(name, axis)] = part if (name, axis) not in out else out[(name, axis)] + part
    if not absolute:
        for p in params.values():
            p.grad = None


def first_order(model: nn.Module, ir: ModelIR, batches: Sequence[Any], *, progress: bool = False,
                elementwise: bool = False) -> FirstOrder:
    """sum w * dL/dw per channel of every (parameter, axis) that holds a group's channels;
    ``elementwise``: sum |w * dL/dw| instead (see the module's docstring)."""
    walk = backward_walk(model, batches, ir=ir, first_order="absolute" if elementwise else "signed", progress=progress)
    return walk.first_order


def output_sensitivity(model: nn.Module, names: Iterable[str], batches: Sequence[Any]) -> dict[str, torch.Tensor]:
    """E over tokens of (dL/dy_r)^2 for each output feature r of each named Linear (fp64), with L
    the summed next-token cross-entropy of a causal LM on ``batches`` (token ids [N, L])."""
    return backward_walk(model, batches, sensitivity=names).sensitivity


def group_parts(ir: ModelIR, grads: FirstOrder) -> dict[str, list[torch.Tensor]]:
    """Per group: the first-order vector of each of its slots, cut to the group's block."""
    return {g.name: [grads[(s.param, s.axis)][s.offset:s.offset + g.width] for s in g.slots] for g in ir.groups}
