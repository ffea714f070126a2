"""How much the language-model loss cares about each output feature of a Linear.

For allocation by the loss (``allocation="fisher"``): an error e added to a consumer's output y
raises the summed next-token loss by about 1/2 sum_r E[g_r^2] E[e_r^2] (g = dL/dy, the diagonal
of the empirical Fisher, taking g and e as independent). The refit's residual per output row,
weighted by E[g_r^2], is then an estimate of the loss increase, comparable across layers, which
the plain output energy (an error relative to the layer's own output) is not.

One forward and backward per calibration sequence; only activation gradients are formed (the
parameters' ``requires_grad`` is switched off for the walk and restored).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from llmrank.ir.errors import CalibrationError, UnsupportedModelError


def output_sensitivity(model: nn.Module, names: Iterable[str], batches: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """E over tokens of (dL/dy_r)^2 for each output feature r of each named Linear (fp64), with L
    the summed next-token cross-entropy of a causal LM on ``batches`` (token ids [N, L])."""
    names = sorted(set(names))
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no input embeddings: allocation 'fisher' needs a causal language "
                                    "model; use allocation 'error'")
    sums: dict[str, torch.Tensor] = {}

    def keep_grad(name: str):
        def record(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(lambda g: _add(sums, name, g.detach().reshape(-1, g.shape[-1]).double().pow(2).sum(0)))
        return record

    handles = [model.get_submodule(n).register_forward_hook(keep_grad(n)) for n in names]
    handles.append(embeddings.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True)))
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    tokens = 0
    try:
        for p in flags:
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            for batch in batches:
                if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.is_floating_point():
                    raise CalibrationError("allocation 'fisher' takes token ids [N, L] as calibration data")
                for ids in batch.split(1):  # one sequence at a time: the logits of a 262k vocabulary are large
                    logits = model(input_ids=ids, use_cache=False).logits
                    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
                    loss.backward()
                    tokens += ids.numel()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
        for h in handles:
            h.remove()
    if tokens == 0 or set(sums) != set(names):
        raise CalibrationError("no loss gradient reached the consumers: allocation 'fisher' needs calibration token ids")
    return {n: s / tokens for n, s in sums.items()}


def _add(table: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    table[name] = value if name not in table else table[name] + value
