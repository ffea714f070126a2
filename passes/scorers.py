"""Neuron scoring formulas (docs/algorithm.md, "Scorers"), as pure functions of weights and activation norms.

Weights are in nn.Linear orientation (out x in): row i is neuron i of the layer. A *chain* is
a list of layers where the rows of layer l are the inputs (columns) of layer l+1. Every score
vector is normalised to sum to 1, with NaN turned into 0 and an all-zero vector into uniform,
so that dead calibration data never produces NaN scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChainLayer:
    """One layer of a chain: its weight (out x in) and its output activation norms a_out."""

    weight: torch.Tensor
    a_out: torch.Tensor


def normalize(v: torch.Tensor) -> torch.Tensor:
    """v / sum(v) in float64; NaN -> 0; a zero (or non-finite) sum -> uniform."""
    v = torch.nan_to_num(v.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
    total = v.sum()
    if not torch.isfinite(total) or total <= 0:
        return torch.full_like(v, 1.0 / max(v.numel(), 1))
    return v / total


def _column_normalize(a: torch.Tensor) -> torch.Tensor:
    sums = a.sum(dim=0, keepdim=True)
    return torch.nan_to_num(a / sums, nan=0.0, posinf=0.0, neginf=0.0)


def transition(weight: torch.Tensor, theta: float) -> torch.Tensor:
    """M = theta * |W| / colsum(|W|) + (1 - theta) * 1[W != 0] / colsum(1[W != 0])."""
    a = weight.detach().to(torch.float64).abs()
    return theta * _column_normalize(a) + (1.0 - theta) * _column_normalize((a != 0).to(torch.float64))


def wpr_chain(chain: list[ChainLayer], a_in: torch.Tensor, *, theta: float = 0.5, gamma: float = 0.0,
              normalized: bool = False) -> list[torch.Tensor]:
    """Weighted PageRank along a chain, one pass: the graph is a DAG.

    ``normalized``: ``a_in`` is already a score (an earlier chain's last one), used as is, so a
    chain cut in two gives the scores of the whole chain exactly.
    """
    _check_unit("theta", theta)
    _check_unit("gamma", gamma)
    p = a_in.to(torch.float64) if normalized else normalize(a_in)
    scores = []
    for layer in chain:
        p = gamma * (transition(layer.weight, theta) @ p) + (1.0 - gamma) * normalize(layer.a_out)
        p = normalize(p)
        scores.append(p)
    return scores


def mpr_chain(chain: list[ChainLayer], a_in: torch.Tensor, *, z_importance: float | None = None,
              normalized: bool = False) -> list[torch.Tensor]:
    """Modified PageRank: p_l = (|W| @ p_{l-1}) * a_out, normalised.

    ``z_importance`` (the pruning amount) zeroes the ``int(width * amount)`` lowest entries of
    p_{l-1} before they are propagated: the count the authors' code uses.
    """
    p = normalize(a_in)
    scores = []
    for layer in chain:
        if z_importance:
            p = p.clone()
            p[lowest(p, int(z_importance * p.numel()))] = 0.0
        p = normalize((layer.weight.detach().to(torch.float64).abs() @ p) * layer.a_out.to(torch.float64))
        scores.append(p)
    return scores


def lp_norm(weight: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """||W[i, :]||_p per row."""
    return normalize(torch.linalg.vector_norm(weight.detach().to(torch.float64), ord=p, dim=1))


def activation(a_out: torch.Tensor) -> torch.Tensor:
    return normalize(a_out)


def wanda(weight: torch.Tensor, a_in: torch.Tensor) -> torch.Tensor:
    """Channel-aggregated Wanda: |W| @ a_in."""
    return normalize(weight.detach().to(torch.float64).abs() @ a_in.to(torch.float64))


def hits(a_mid: torch.Tensor, w_down: torch.Tensor, downstream: torch.Tensor | None, *, gamma: float) -> torch.Tensor:
    """Hubs-and-authorities score of FFN neurons (llmrank's own, beyond the paper).

    authority_k = a_mid[k], the norm of what neuron k really emits (act(gate) * up);
    hub_k = sum_i |W_down[i, k]| * h[i], where h weighs residual channel i by how much the
    next layer reads it: h = (1 - gamma) * uniform + gamma * downstream.
    score = authority * hub. With gamma = 0 this is the neuron's contribution norm
    a_mid[k] * ||W_down[:, k]||_1.
    """
    _check_unit("gamma", gamma)
    d = w_down.shape[0]
    h = torch.full((d,), 1.0 / d, dtype=torch.float64)
    if downstream is not None and gamma > 0:
        h = (1.0 - gamma) * h + gamma * normalize(downstream)
    hub = w_down.detach().to(torch.float64).abs().T @ h
    return normalize(normalize(a_mid) * hub)


def first_order(weight: torch.Tensor, grad: torch.Tensor, axis: int, *, absolute: bool = False) -> torch.Tensor:
    """sum of w * dL/dw (``absolute``: of |w * dL/dw|) over every axis but ``axis``, in float64:
    one entry per channel of that axis (a row of a producer, a column of a consumer, an entry
    of a bias)."""
    prod = weight.detach().to(torch.float64) * grad.detach().to(torch.float64)
    prod = prod.abs() if absolute else prod
    return prod.sum(dim=tuple(d for d in range(prod.dim()) if d != axis)) if prod.dim() > 1 else prod


def taylor(parts: list[torch.Tensor]) -> torch.Tensor:
    """First-order Taylor importance of a channel group (Molchanov et al.; Torch-Pruning's and
    LLM-Pruner's group criterion): |sum over the group's slots of sum w * dL/dw|, i.e. the
    first-order change of the loss when every weight of the channel is set to zero.
    ``parts``: one :func:`first_order` vector (cut to the group's block) per slot."""
    return normalize(torch.stack([p.to(torch.float64) for p in parts]).sum(0).abs())


def random_scores(n: int, seed: int, salt: int = 0) -> torch.Tensor:
    """Seeded uniform scores; ``salt`` decorrelates layers that share one seed."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(salt))
    return normalize(torch.rand(n, generator=gen, dtype=torch.float64))


def lowest(p: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` lowest entries (ties: lower index first)."""
    order = torch.sort(p, stable=True).indices
    return order[:k]


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")

