"""Compensation: repair what a cut removes, from calibration moments of the dense model.

For a consumer Linear y = W x + b whose input channels (the group's) lose the set R:
- ``bias``: the removed channels' mean contribution goes into the bias,
  b' = b + W[:, R] @ mean(x_R) (a bias is added when the layer has none);
- ``lstsq``: the kept columns are refitted so that W' x_K best reproduces W x on the
  calibration tokens (ridge-regularised closed form):
      W' = W G[:, K] (G[K, K] + lambda I)^-1,  G = E[x x^T]
  with lambda = ridge * mean(diag G[K, K]); ``lstsq+bias`` fits the affine term too, on the
  centred covariance C = G - mu mu^T, with b' = b + W mu - W' mu_K.

:func:`plan_refit` is pure: it reads the *dense* weights and returns the new consumer weights
(a :class:`Refit` per consumer), before anything is rewritten, so an in-place rewrite cannot
feed it already-shrunk weights. The rewrite passes apply the plan (``shrink`` and ``mask`` both
take ``refits``), which makes "shrunk == masked" verification cover the refit as well. A group
that loses no channel gets no refit: nothing removed means nothing changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from llmrank.ir.errors import ConfigError, InputError
from llmrank.ir.graph import LinearInfo, ModelIR
from llmrank.passes.calibrate import Accumulator, InputStats, Plan, collect
from llmrank.passes.headcut import kept_channels

METHODS = ("none", "bias", "lstsq", "lstsq+bias")


@dataclass(frozen=True)
class Refit:
    """New parameters of one consumer Linear after its group was cut.

    ``weight`` is in (out x kept-in) orientation over ``columns`` (indices of the kept input
    channels in the dense layout, ascending); ``bias`` is the whole new bias, or None when the
    bias does not change.
    """

    linear: str
    columns: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


def consumer_linears(ir: ModelIR, *, heads: bool = False) -> list[str]:
    """Linears whose inputs the refit needs moments of: every group's consumers (and, when
    heads are cut, every head group's o_proj)."""
    names = {c.linear for g in ir.groups for c in g.consumers}
    if heads:
        names.update(hg.o.linear for hg in ir.head_groups)
    return sorted(names)


def plan_refit(
    dense: nn.Module,
    ir: ModelIR,
    kept: dict[str, torch.Tensor],
    moments: dict[str, InputStats],
    *,
    method: str = "lstsq",
    ridge: float = 1e-3,
) -> dict[str, Refit]:
    """The refit of every consumer whose group loses channels (and of every o_proj whose
    layer loses heads: the kept heads' columns), from ``dense``'s weights."""
    if method not in METHODS:
        raise ConfigError(f"unknown compensation {method!r}; choose one of {', '.join(METHODS)}")
    if ridge < 0:
        raise ConfigError(f"ridge must be >= 0, got {ridge}")
    refits: dict[str, Refit] = {}
    if method == "none":
        return refits
    cuts = [(port, kept[g.name].to(torch.long), g.width) for g in ir.groups if g.name in kept for port in g.consumers]
    cuts += [(hg.o, kept_channels(hg, kept[hg.name]), hg.heads * hg.head_dim) for hg in ir.head_groups if hg.name in kept]
    with torch.no_grad():
        for port, keep, width in cuts:
            if keep.numel() == width:
                continue
            info = ir.linears[port.linear]
            stats = moments.get(info.name)
            if stats is None or stats.count == 0:
                raise InputError(f"no calibration moments for {info.name!r}: the refit data never reached it")
            columns, w_new, shift = _solve(dense_weight(dense, info), stats, keep, port.offset, width, method, ridge)
            refits[info.name] = Refit(info.name, columns, w_new, shifted_bias(dense, info, shift))
    return refits


def dense_weight(dense: nn.Module, info: LinearInfo) -> torch.Tensor:
    """A consumer's dense weight as out x in, float64 (GPT-2's Conv1D stores in x out)."""
    w = dense.get_parameter(info.weight).detach().to(torch.float64)
    return w.t() if info.kind == "conv1d" else w


def shifted_bias(dense: nn.Module, info: LinearInfo, shift: torch.Tensor | None) -> torch.Tensor | None:
    """The consumer's bias plus a refit's shift (None: the refit keeps the bias as it is)."""
    if shift is None:
        return None
    old = dense.get_parameter(info.bias).detach().to(torch.float64) if info.bias else torch.zeros_like(shift)
    return old + shift


def kept_columns(n: int, keep: torch.Tensor, offset: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, removed) input columns of a consumer with ``n`` inputs whose group sits at
    ``offset`` with ``width`` channels, of which ``keep`` stay; columns outside the group stay."""
    cols = torch.arange(n)
    block = cols[offset:offset + width]
    removed = block[torch.ones(width, dtype=torch.bool).index_fill_(0, keep, False)]
    return torch.cat([cols[:offset], block[keep], cols[offset + width:]]), removed


def _solve(w: torch.Tensor, s: InputStats, keep: torch.Tensor, offset: int, width: int, method: str, ridge: float):
    kept_cols, removed = kept_columns(w.shape[1], keep, offset, width)
    if method == "bias":
        return kept_cols, w[:, kept_cols], w[:, removed] @ s.mean[removed]
    # Only the kept rows of the (centred) second moment are formed: at 8B width the full
    # normalised copy alone is 1.6 GB. Row by row the values are those of (G / n)[K], exactly.
    mean = s.mean
    rows = s.gram[kept_cols] / float(s.count)
    if method == "lstsq+bias":
        rows -= torch.outer(mean[kept_cols], mean)
    rhs = rows @ w.T
    w_new = ridge_solve(rows[:, kept_cols], rhs, ridge).T
    if method == "lstsq+bias":
        return kept_cols, w_new, w @ mean - w_new @ mean[kept_cols]
    return kept_cols, w_new, None


def ridge_solve(a: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve (a + lambda I) x = rhs; ``a`` is a temporary the caller gives up (its diagonal is
    raised in place, which equals adding lambda I without an n x n identity in memory)."""
    lam = ridge * float(a.diagonal().mean().clamp_min(1e-12))
    a.diagonal().add_(lam)
    return torch.linalg.solve(a, rhs)


def apply_refit(model: nn.Module, ir: ModelIR, refits: dict[str, Refit], *, shrunk: bool) -> None:
    """Write ``refits`` into ``model`` in place: into the shrunk weights, or (``shrunk=False``)
    into the kept columns of a masked model whose dropped columns are already zero."""
    with torch.no_grad():
        for name, refit in refits.items():
            info = ir.linears[name]
            module = model.get_submodule(name)
            param = module.weight
            new = refit.weight.to(param.dtype)
            if shrunk:
                value = new
            else:
                value = (param.detach().t() if info.kind == "conv1d" else param.detach()).clone()
                value[:, refit.columns] = new
            value = value.t() if info.kind == "conv1d" else value
            module.weight = nn.Parameter(value.contiguous(), requires_grad=param.requires_grad)
            if refit.bias is not None:
                bias = refit.bias.to(param.dtype).clone()
                old = getattr(module, "bias", None)
                module.bias = nn.Parameter(bias, requires_grad=True if old is None else old.requires_grad)


# ---------------------------------------------------------------------- the earlier entry points


def collect_input_stats(
    model: nn.Module, ir: ModelIR, batches: Iterable, *, second_moment: bool = True, progress: bool = True, heads: bool = False
) -> dict[str, InputStats]:
    """Moments of every group consumer's input (and with ``heads`` every o_proj's) on ``batches``
    (the dense model is not changed)."""
    plan = Plan.build(list(batches), None, norms=False, moments=True)
    acc = Accumulator((), consumer_linears(ir, heads=heads), second_moment=second_moment)
    return collect(model, plan, acc, progress=progress).moments


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
    """Refit the consumers of the shrunk ``model`` in place from ``dense`` and return it."""
    apply_refit(model, ir, plan_refit(dense, ir, kept, stats, method=method, ridge=ridge), shrunk=True)
    return model
