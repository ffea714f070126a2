"""Measured loss increases: what cutting one group alone (and refitting its consumers) costs the model.

Allocation by the loss (``allocation="loss"``) needs, per group, a number that compares across
layers. The refit's error curve gives each group's *shape* (how its error grows as channels
go) but not its *scale* in loss: the output energy is not comparable between layers, and the
loss's squared gradients (``fisher``) are a second-order guess that the post-FFN norms of
Gemma-3 break. Here the scale is measured: for each group, its consumers are swapped (by
forward hooks, the model itself is never written) for the refitted weights on the kept
channels, and the mean next-token loss on a few calibration sequences is compared with the
dense model's. One forward pass per group; nothing is stored but the numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from llmrank.ir.errors import CalibrationError, UnsupportedModelError
from llmrank.ir.graph import ModelIR
from llmrank.passes.calibrate import InputStats
from llmrank.passes.compensate import Refit, plan_refit
from llmrank.passes.hooks import forward_hooks
from llmrank.passes.lmloss import lm_logits, next_token_loss


def mean_next_token_loss(model: nn.Module, sequences: torch.Tensor) -> float:
    """Mean cross-entropy of each next token over ``sequences`` (token ids [N, L]), in fp64: the
    probe subtracts two of these and the differences are ~1e-4 of the loss, below fp32's
    rounding of a mean (the gradients' loss is fp32)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in sequences.split(1):
            logits = lm_logits(model, ids, needed_by="allocation 'loss'")
            total += float(next_token_loss(logits, ids, reduction="sum", dtype=torch.float64))
            count += ids.shape[1] - 1
    return total / count


def refits_swapped_in(model: nn.Module, ir: ModelIR, refits: Mapping[str, Refit]) -> AbstractContextManager[None]:
    """A context in which each refitted consumer computes its output from the kept input columns
    with the refitted weight: the cut model's function, without touching a parameter."""

    def swap_for(refit: Refit):
        info = ir.linears[refit.linear]
        bias = refit.bias if refit.bias is not None else (model.get_parameter(info.bias).detach() if info.bias else None)

        def swap(_m: nn.Module, args: tuple, _out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            w = refit.weight.to(x.dtype)
            return F.linear(x[..., refit.columns], w, None if bias is None else bias.to(x.dtype))

        return swap

    return forward_hooks(model, {ir.linears[r.linear].name: swap_for(r) for r in refits.values()})


def group_loss_increases(model: nn.Module, ir: ModelIR, kept: Mapping[str, torch.Tensor],
                         moments: Mapping[str, InputStats], sequences: torch.Tensor, *, method: str = "lstsq",
                         ridge: float = 1e-3, progress: bool = False) -> dict[str, float]:
    """Per group in ``kept``: loss(model with that group alone cut to ``kept`` and refitted) minus
    loss(dense), both on ``sequences``. Groups are independent; their sum is not the loss of the
    whole cut (the allocation treats it as additive, as the error curves do)."""
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.is_floating_point() or not len(sequences):
        raise CalibrationError("allocation 'loss' measures the next-token loss: it needs calibration token ids [N, L]")
    if not callable(getattr(model, "forward", None)) or not hasattr(model, "get_input_embeddings"):
        raise UnsupportedModelError(f"{type(model).__name__} is not a causal language model: allocation 'loss' reads its "
                                    "next-token loss; use allocation 'error'")
    dense = mean_next_token_loss(model, sequences)
    out: dict[str, float] = {}
    for name, keep in tqdm(list(kept.items()), desc="loss probe", unit="group", disable=not progress):
        refits = plan_refit(model, ir, {name: keep}, moments, method=method, ridge=ridge)
        with refits_swapped_in(model, ir, refits):
            out[name] = mean_next_token_loss(model, sequences) - dense
    return out


def probe_sequences(batches: Sequence[torch.Tensor], count: int) -> torch.Tensor:
    """The first ``count`` calibration sequences, from a list of [n, L] id batches."""
    rows = [b for b in batches if isinstance(b, torch.Tensor) and b.dim() == 2 and not b.is_floating_point()]
    if not rows:
        raise CalibrationError("allocation 'loss' measures the next-token loss: it needs calibration token ids [N, L]")
    sequences = torch.cat(rows)
    if len(sequences) < count:
        logging.getLogger(__name__).warning(
            "probe_samples %d: only %d calibration sequence(s) exist, so each group's loss probe reads %d "
            "(raise --samples for more)", count, len(sequences), len(sequences))
    return sequences[:count]
