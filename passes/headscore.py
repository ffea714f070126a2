"""Per-head scores: the baselines that read one attention layer at a time.

A head's parameters are its q rows, its o_proj columns and, shared with the other query heads
of its KV group, the k and v rows (counted 1 / n_rep per head). Its output is the block of
``head_dim`` o_proj input channels it writes. Every score vector sums to 1 per layer.

- ``activation``: the head's output norm, sqrt(sum_j a_in[o][j]^2) over its block;
- ``l1`` / ``l2``: the weight norm of its parameters;
- ``wanda``: sum over its block of ||W_o[:, j]||_1 * a_in[o][j];
- ``fluctuation`` (FLAP): sum over its block of Var_tokens(x_j) * ||W_o[:, j]||_2^2, the error
  of replacing the head's output by its mean (which FLAP's bias compensation then absorbs);
- ``random``: seeded.

The centrality scorers (wpr, mpr) rank heads on the dataflow graph in ``score.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from llmrank.ir.errors import CalibrationError, ConfigError
from llmrank.ir.graph import HeadGroup, ModelIR, Port
from llmrank.passes import scorers as S
from llmrank.passes.calibrate import ActivationNorms

HEAD_SCORERS = ("auto", "wpr", "mpr", "activation", "l1", "l2", "wanda", "fluctuation", "random")
WEIGHT_ONLY_HEAD_SCORERS = ("l1", "l2", "random")
#: The head scorer ``auto`` picks for a neuron scorer: the same formula where there is one.
_AUTO = {"hits": "activation", "lp": "l2"}


def resolve(head_scorer: str, scorer: str) -> str:
    """The head scorer in effect: ``auto`` follows the neuron scorer."""
    if head_scorer not in HEAD_SCORERS:
        raise ConfigError(f"unknown head_scorer {head_scorer!r}; choose one of {', '.join(HEAD_SCORERS)}")
    return _AUTO.get(scorer, scorer) if head_scorer == "auto" else head_scorer


def rows(model: nn.Module, ir: ModelIR, port: Port, width: int) -> torch.Tensor:
    """A producer block of rows (out x in orientation) in float64."""
    info = ir.linears[port.linear]
    w = model.get_parameter(info.weight).detach().to(torch.float64)
    w = w.t() if info.kind == "conv1d" else w
    return w[port.offset:port.offset + width]


def columns(model: nn.Module, ir: ModelIR, hg: HeadGroup) -> torch.Tensor:
    """o_proj's columns of the heads (hidden x heads * head_dim) in float64."""
    info = ir.linears[hg.o.linear]
    w = model.get_parameter(info.weight).detach().to(torch.float64)
    w = w.t() if info.kind == "conv1d" else w
    return w[:, hg.o.offset:hg.o.offset + hg.heads * hg.head_dim]


def per_head(hg: HeadGroup, channels: torch.Tensor) -> torch.Tensor:
    """Sum a (heads * head_dim) channel vector over each head's block."""
    return channels.to(torch.float64).view(hg.heads, hg.head_dim).sum(1)


def kv_per_head(hg: HeadGroup, kv: torch.Tensor) -> torch.Tensor:
    """Spread a per-KV-head vector over its query heads, 1 / n_rep each."""
    return kv.repeat_interleave(hg.n_rep) / hg.n_rep


def _need_in(norms: ActivationNorms | None, name: str) -> torch.Tensor:
    if norms is None or name not in norms.a_in:
        raise CalibrationError(f"no calibration norms for {name!r}: this head scorer needs calibration data")
    return norms.a_in[name].to(torch.float64)


def head_scores(model: nn.Module, ir: ModelIR, norms: ActivationNorms | None, scorer: str, *, seed: int = 0,
                variances: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Scores of every head group's query heads by a per-layer baseline (not wpr/mpr)."""
    out: dict[str, torch.Tensor] = {}
    for i, hg in enumerate(ir.head_groups):
        qd, kvd = hg.heads * hg.head_dim, hg.kv_heads * hg.head_dim
        if scorer == "activation":
            value = per_head(hg, _need_in(norms, hg.o.linear).pow(2)).sqrt()
        elif scorer in ("l1", "l2"):
            p = 1 if scorer == "l1" else 2
            norm = lambda w: w.abs().pow(p).sum(-1)  # noqa: E731 - p-th powers, summed, rooted at the end
            q = per_head(hg, norm(rows(model, ir, hg.q, qd)))
            o = per_head(hg, norm(columns(model, ir, hg).T))
            kv = sum(per_head_kv(hg, norm(rows(model, ir, port, kvd))) for port in (hg.k, hg.v))
            value = (q + o + kv_per_head(hg, kv)).pow(1 / p)
        elif scorer == "wanda":
            value = per_head(hg, columns(model, ir, hg).abs().sum(0) * _need_in(norms, hg.o.linear))
        elif scorer == "fluctuation":
            if not variances or hg.o.linear not in variances:
                raise CalibrationError(f"no input variance of {hg.o.linear!r}: the fluctuation scorer needs calibration data")
            value = per_head(hg, variances[hg.o.linear].to(torch.float64) * columns(model, ir, hg).pow(2).sum(0))
        elif scorer == "random":
            value = S.random_scores(hg.heads, seed, salt=10_007 + i)
        else:
            raise ConfigError(f"head scorer {scorer!r} is not a per-layer baseline")
        out[hg.name] = S.normalize(value)
    return out


def per_head_kv(hg: HeadGroup, channels: torch.Tensor) -> torch.Tensor:
    """Sum a (kv_heads * head_dim) channel vector over each KV head's block."""
    return channels.to(torch.float64).view(hg.kv_heads, hg.head_dim).sum(1)


def variance_linears(ir: ModelIR) -> list[str]:
    """Linears whose input variance the fluctuation scorer reads: the heads' o_proj."""
    return sorted({hg.o.linear for hg in ir.head_groups})
