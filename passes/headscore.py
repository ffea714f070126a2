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

The centrality scorers (wpr, mpr) rank heads on the dataflow graph in ``score.py``. All are
registered in ``llmrank.passes.registry`` with ``unit="heads"``, beside any you register; the
Score pass normalises every answer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from llmrank.ir.errors import CalibrationError
from llmrank.ir.graph import HeadGroup, ModelIR, Port
from llmrank.passes import scorers as S
from llmrank.passes.calibrate import ActivationNorms
from llmrank.passes.registry import ScoreRequest, register_scorer

#: The head scorer ``auto`` picks for a neuron scorer: the same formula where there is one.
_AUTO = {"hits": "activation", "lp": "l2"}


def resolve(head_scorer: str, scorer: str) -> str:
    """The head scorer in effect: ``auto`` follows the neuron scorer."""
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


def _activation(r: ScoreRequest) -> dict[str, torch.Tensor]:
    return {hg.name: per_head(hg, _need_in(r.norms, hg.o.linear).pow(2)).sqrt() for hg in r.ir.head_groups}


def _norm(p: int) -> Callable[[ScoreRequest], dict[str, torch.Tensor]]:
    def score(r: ScoreRequest) -> dict[str, torch.Tensor]:
        out = {}
        power = lambda w: w.abs().pow(p).sum(-1)  # noqa: E731 - p-th powers, summed, rooted at the end
        for hg in r.ir.head_groups:
            qd, kvd = hg.heads * hg.head_dim, hg.kv_heads * hg.head_dim
            q = per_head(hg, power(rows(r.model, r.ir, hg.q, qd)))
            o = per_head(hg, power(columns(r.model, r.ir, hg).T))
            kv = sum(per_head_kv(hg, power(rows(r.model, r.ir, port, kvd))) for port in (hg.k, hg.v))
            out[hg.name] = (q + o + kv_per_head(hg, kv)).pow(1 / p)
        return out
    return score


def _wanda(r: ScoreRequest) -> dict[str, torch.Tensor]:
    return {hg.name: per_head(hg, columns(r.model, r.ir, hg).abs().sum(0) * _need_in(r.norms, hg.o.linear))
            for hg in r.ir.head_groups}


def _fluctuation(r: ScoreRequest) -> dict[str, torch.Tensor]:
    out = {}
    for hg in r.ir.head_groups:
        if not r.variances or hg.o.linear not in r.variances:
            raise CalibrationError(f"no input variance of {hg.o.linear!r}: the fluctuation scorer needs calibration data")
        out[hg.name] = per_head(hg, r.variances[hg.o.linear].to(torch.float64) * columns(r.model, r.ir, hg).pow(2).sum(0))
    return out


def _random(r: ScoreRequest) -> dict[str, torch.Tensor]:
    # the salt keeps the layer's index in the model when a slice (one block) is scored
    first = r.upstream.head_groups if r.upstream is not None else 0
    return {hg.name: S.random_scores(hg.heads, r.config.seed, salt=10_007 + first + i) for i, hg in enumerate(r.ir.head_groups)}


#: The per-layer head scorers: name, function, what it reads besides the weights, what it is.
_BUILTINS = (
    ("activation", _activation, ("activations",), "the head's output norm"),
    ("l1", _norm(1), (), "L1 norm of the head's weights"),
    ("l2", _norm(2), (), "L2 norm of the head's weights"),
    ("wanda", _wanda, ("activations",), "|W_o| times the o_proj input norm"),
    ("fluctuation", _fluctuation, ("activations", "variances"), "FLAP: output variance times |W_o|^2"),
    ("random", _random, (), "seeded uniform"),
)
#: Their names.
PER_LAYER = tuple(entry[0] for entry in _BUILTINS)
for _name, _fn, _needs, _about in _BUILTINS:
    register_scorer(_name, _fn, needs=_needs, sliceable=True, reads=("seed",) if _name == "random" else (), about=_about,
                    builtin=True, unit="heads")


def per_head_kv(hg: HeadGroup, channels: torch.Tensor) -> torch.Tensor:
    """Sum a (kv_heads * head_dim) channel vector over each KV head's block."""
    return channels.to(torch.float64).view(hg.kv_heads, hg.head_dim).sum(1)


def variance_linears(ir: ModelIR) -> list[str]:
    """Linears whose input variance the fluctuation scorer reads: the heads' o_proj."""
    return sorted({hg.o.linear for hg in ir.head_groups})
