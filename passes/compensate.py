"""Compensation passes: repair what a cut removed, from calibration statistics of the dense model.

For a consumer Linear y = W x + b whose inputs x (the group's channels) lose the set R:
- ``bias``: the removed channels' mean contribution goes into the bias,
  b' = b + W[:, R] @ mean(x_R) (a bias is added when the layer has none);
- ``lstsq``: the kept columns are refitted so that W' x_K best reproduces W x on the
  calibration tokens (ridge-regularised closed form):
      W' = W G[:, K] (G[K, K] + lambda I)^-1,  G = E[x x^T]
  with lambda = ridge * mean(diag G[K, K]); ``lstsq+bias`` also fits the affine term.
Statistics are streamed per batch (sum x, sum x x^T, token count), so memory is
O(width^2) per consumer, never O(tokens).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from llmrank.ir.graph import ModelIR
from llmrank.passes.calibrate import _run

METHODS = ("none", "bias", "lstsq", "lstsq+bias")


@dataclass
class InputStats:
    """Streamed first and second moments of one consumer's input channels (float64)."""

    total: torch.Tensor
    gram: torch.Tensor | None
    count: int

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


def collect_input_stats(
    model: nn.Module, ir: ModelIR, batches: Iterable, *, second_moment: bool = True, progress: bool = True
) -> dict[str, InputStats]:
    """Moments of every group consumer's input on ``batches`` (the dense model is not changed)."""
    names = sorted({c.linear for g in ir.groups for c in g.consumers})
    stats: dict[str, InputStats] = {}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = stats.get(name)
            # One batch's Gram in fp32 (fast GEMM), accumulated across batches in fp64.
            gram = (x.T @ x).double() if second_moment else None
            if s is None:
                stats[name] = InputStats(x.double().sum(0), gram, x.shape[0])
            else:
                s.total += x.double().sum(0)
                if gram is not None:
                    s.gram += gram
                s.count += x.shape[0]
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in tqdm(list(batches), desc="collecting stats", unit="batch", disable=not progress):
                _run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return stats


def compensate(
    model: nn.Module,
    dense: nn.Module,
    ir: ModelIR,
    kept: dict[str, torch.Tensor],
    stats: dict[str, InputStats],
    *,
    method: str = "lstsq",
    ridge: float = 1e-3,
) -> nn.Module:
    """Adjust the consumers of the shrunk ``model`` in place and return it.

    ``dense`` is the model before the cut (its consumer weights are the target map); ``ir``,
    ``kept`` and ``stats`` belong to it.
    """
    if method not in METHODS:
        raise ValueError(f"unknown compensation {method!r}; choose one of {', '.join(METHODS)}")
    if method == "none":
        return model
    with torch.no_grad():
        for g in ir.groups:
            keep = kept[g.name].to(torch.long)
            for port in g.consumers:
                info = ir.linears[port.linear]
                module = model.get_submodule(info.name)
                w = dense.get_parameter(info.weight).detach().to(torch.float64)
                dense_w = w.t() if info.kind == "conv1d" else w
                w_new, shift = _solve(dense_w, stats[info.name], keep, port.offset, g.width, method, ridge)
                _set_weight(module, info.kind, w_new)
                if shift is not None:
                    _add_bias(module, shift)
    return model


def _solve(w: torch.Tensor, s: InputStats, keep: torch.Tensor, offset: int, width: int, method: str, ridge: float):
    cols = torch.arange(w.shape[1])
    block = cols[offset:offset + width]
    kept_cols = torch.cat([cols[:offset], block[keep], cols[offset + width:]])
    removed = block[torch.ones(width, dtype=torch.bool).index_fill_(0, keep, False)]
    if method == "bias":
        return w[:, kept_cols], w[:, removed] @ s.mean[removed]
    n = float(s.count)
    gram = s.gram / n
    mean = s.mean
    if method == "lstsq+bias":
        # Fit [W' b'] on [x; 1]: centred covariance for W', then b' = W mean - W' mean_K.
        cov = gram - torch.outer(mean, mean)
        a = cov[kept_cols][:, kept_cols]
        rhs = cov[kept_cols] @ w.T
        w_new = _ridge_solve(a, rhs, ridge).T
        return w_new, w @ mean - w_new @ mean[kept_cols]
    a = gram[kept_cols][:, kept_cols]
    rhs = gram[kept_cols] @ w.T
    return _ridge_solve(a, rhs, ridge).T, None


def _ridge_solve(a: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    lam = ridge * float(a.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    return torch.linalg.solve(a + lam * eye, rhs)


def _set_weight(module: nn.Module, kind: str, w: torch.Tensor) -> None:
    w = w.T if kind == "conv1d" else w
    module.weight.data = w.to(module.weight.dtype).contiguous()


def _add_bias(module: nn.Module, shift: torch.Tensor) -> None:
    shift = shift.to(module.weight.dtype)
    if getattr(module, "bias", None) is None:
        module.bias = nn.Parameter(shift.clone())
    else:
        module.bias.data += shift
