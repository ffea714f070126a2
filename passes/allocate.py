"""Error-aware widths: how many channels each group keeps, from the refit's own residual error.

The least-squares refit of a consumer W (out x n) on the kept input set S leaves, in closed form
from the Gram matrix G = E[x x^T] of its inputs (ridge lambda as in compensate.py),

    error(S) = tr(W G W^T) - tr(W G[:, S] (G[S, S] + lambda I)^-1 G[S, :] W^T),

the regularised residual of the fit. Removing one more channel q from S raises it by
``sum_r d_r W'[r, q]^2 / [H^-1]_qq`` (optimal brain surgeon, with W' the current fit and H the
current (G[S, S] + lambda I)); the fit and H^-1 are then downdated by rank one, so a whole curve
error(k), k = width .. floor, costs O(n^2) per removed channel, never one solve per candidate.
``d_r`` weights output rows (1: the plain output energy; the loss's sensitivity to each row
otherwise).

:func:`removal_curve` gives the curve for one group, following the scorer's order or choosing
at each step the channel whose removal raises the error least (refit-aware selection);
:func:`allocate` chooses the widths minimising the summed normalised error under the global
budget. Both are pure.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llmrank.ir.errors import ConfigError, InputError
from llmrank.ir.graph import ChannelGroup, ModelIR
from llmrank.passes.calibrate import InputStats

ALLOCATIONS = ("uniform", "error", "fisher", "loss")
SELECTIONS = ("score", "refit")
#: A group loses at most this multiple of the mean fraction under error allocation (and never
#: more than MAX_GROUP_SPARSITY): it bounds the curve's cost, and no layer is emptied on the
#: strength of a second-order error model far from where it was measured.
SPREAD = 2.0
MAX_GROUP_SPARSITY = 0.9


@dataclass(frozen=True)
class Consumer:
    """One consumer's view of a group: its dense weight (out x n, fp64), the Gram matrix of its
    whole input (n x n, normalised by the token count, fp64), where the group's channels sit
    among its columns, and optional output-row weights ``d`` (None: all 1)."""

    weight: torch.Tensor
    gram: torch.Tensor
    offset: int
    width: int
    row_weights: torch.Tensor | None = None

    @property
    def energy(self) -> float:
        """tr(D W G W^T): the (weighted) output energy of the dense layer."""
        wg = self.weight @ self.gram
        rows = (wg * self.weight).sum(1)
        return float(rows.sum() if self.row_weights is None else (rows * self.row_weights).sum())


@dataclass(frozen=True)
class Curve:
    """``removed``: group channels in removal order; ``errors[i]``: the regularised residual after
    removing the first i of them (errors[0]: nothing removed); ``energy``: tr(D W G W^T)."""

    width: int
    removed: torch.Tensor
    errors: torch.Tensor
    energy: float

    @property
    def floor(self) -> int:
        return self.width - len(self.removed)

    def error_at(self, keep: int) -> float:
        return float(self.errors[self.width - keep])

    def kept(self, keep: int) -> torch.Tensor:
        """The channels left when only ``keep`` survive (ascending)."""
        if not self.floor <= keep <= self.width:
            raise InputError(f"the curve reaches widths {self.floor}..{self.width}, not {keep}")
        gone = torch.zeros(self.width, dtype=torch.bool)
        gone[self.removed[: self.width - keep]] = True
        return torch.nonzero(~gone).flatten()


class _Fit:
    """The running least-squares fit of one consumer on its alive columns (OBS state)."""

    def __init__(self, c: Consumer, ridge: float):
        g = c.gram.to(torch.float64)
        lam = ridge * float(g.diagonal().mean().clamp_min(1e-12))
        a = g.clone()
        a.diagonal().add_(lam)
        self.hinv = torch.linalg.inv(a)
        w = c.weight.to(torch.float64)
        self.fit = w @ g @ self.hinv  # W' = W G (G + lambda I)^-1
        self.cols = torch.arange(g.shape[0])  # columns of the consumer's input still in the matrices
        self.alive = torch.ones(g.shape[0], dtype=torch.bool)  # which of them are not removed yet
        self.dead = 0
        self.d = None if c.row_weights is None else c.row_weights.to(torch.float64)
        self.error = c.energy - float(self._weighted((w @ g) * self.fit).sum())
        self.offset = c.offset

    def _weighted(self, m: torch.Tensor) -> torch.Tensor:
        return m if self.d is None else m * self.d[:, None]

    def increases(self, position: torch.Tensor) -> torch.Tensor:
        """Error increase of removing each of the alive columns at ``position`` alone."""
        f = self.fit[:, position]
        return self._weighted(f * f).sum(0) / self.hinv.diagonal()[position]

    def remove(self, positions: torch.Tensor) -> torch.Tensor:
        """Remove the alive columns at ``positions``, in that order; the error increase of each.

        One block downdate, H^-1 -= H^-1[:, Q] (H^-1[Q, Q])^-1 H^-1[Q, :] (the fit likewise):
        the big matrices are touched once per block, not once per channel. The increases along
        the order come from the Cholesky factor L of H^-1[Q, Q]: with Z = F_Q L^-T, removing the
        first i of Q costs sum_{j < i} |Z[:, j]|^2 (leading blocks of a triangular inverse are
        the inverses of its leading blocks), so every step of the curve is exact.
        """
        h = self.hinv
        hqq = h[positions][:, positions]
        fq = self.fit[:, positions]
        chol = torch.linalg.cholesky(hqq)
        z = torch.linalg.solve_triangular(chol, fq.T, upper=False).T  # F_Q L^-T
        deltas = self._weighted(z * z).sum(0)
        rows = h[positions]  # (b x n)
        coef = torch.cholesky_solve(rows, chol)  # (H^-1[Q, Q])^-1 H^-1[Q, :]
        self.fit.sub_(fq @ coef)
        h.sub_(rows.T @ coef)
        h[positions] = 0.0
        h[:, positions] = 0.0
        self.fit[:, positions] = 0.0
        self.alive[positions] = False
        self.dead += len(positions)
        if self.dead * 4 > len(self.cols):
            keep = self.alive
            self.hinv = h[keep][:, keep].contiguous()
            self.fit = self.fit[:, keep].contiguous()
            self.cols = self.cols[keep]
            self.alive = torch.ones(len(self.cols), dtype=torch.bool)
            self.dead = 0
        self.error += float(deltas.sum())
        return deltas


def removal_curve(consumers: Sequence[Consumer], floor: int, *, ridge: float = 1e-3,
                  order: torch.Tensor | None = None, block: int = 16) -> Curve:
    """The refit's residual error of one group as channels go, down to ``floor`` kept channels.

    ``order`` (group channel indices, first removed first): follow it (the scorer's order);
    None: greedy, in blocks of ``block`` channels: the ``block`` channels whose removal alone
    raises the summed error least go next, cheapest first (``block=1``: pure greedy, one
    channel at a time; ties: the lower index). Every recorded error is exact for the order
    taken. Columns of a consumer outside the group are always kept.
    """
    if not consumers:
        raise InputError("a group without consumers has no refit error")
    width = consumers[0].width
    if any(c.width != width for c in consumers):
        raise InputError("the consumers of one group disagree on its width")
    if not 0 <= floor <= width:
        raise InputError(f"floor {floor} outside [0, {width}]")
    if block < 1:
        raise InputError(f"block must be >= 1, got {block}")
    if order is not None:
        order = torch.as_tensor(order, dtype=torch.long)
        if len(order) < width - floor or len(set(order[: width - floor].tolist())) != width - floor:
            raise InputError("the removal order must name each channel at most once and reach the floor")
    fits = [_Fit(c, ridge) for c in consumers]
    alive = torch.ones(width, dtype=torch.bool)
    removed: list[torch.Tensor] = []
    errors = [torch.tensor([sum(f.error for f in fits)], dtype=torch.float64)]
    done = 0
    while done < width - floor:
        b = min(block, width - floor - done)
        if order is not None:
            chosen = order[done:done + b]
        else:
            channels = torch.nonzero(alive).flatten()
            total = torch.zeros(len(channels), dtype=torch.float64)
            for f in fits:
                total += f.increases(_positions(f, channels))
            pick = torch.sort(total, stable=True).indices[:b]
            chosen = channels[pick]
        if not bool(alive[chosen].all()):
            raise InputError("a channel was removed twice: the order is not a permutation")
        step = torch.zeros(len(chosen), dtype=torch.float64)
        for f in fits:
            step += f.remove(_positions(f, chosen))
        alive[chosen] = False
        removed.append(chosen)
        errors.append(errors[-1][-1] + torch.cumsum(step, 0))
        done += b
    return Curve(width, torch.cat(removed) if removed else torch.zeros(0, dtype=torch.long), torch.cat(errors),
                 sum(c.energy for c in consumers))


def _positions(fit: _Fit, channels: torch.Tensor) -> torch.Tensor:
    """Where group channels sit among a fit's alive columns (``cols`` is ascending)."""
    return torch.searchsorted(fit.cols, channels + fit.offset)


def refit_error(consumer: Consumer, kept: torch.Tensor, *, ridge: float = 1e-3) -> float:
    """error(S) by one solve (the definition; :func:`removal_curve` reaches it by downdates)."""
    g, w = consumer.gram.to(torch.float64), consumer.weight.to(torch.float64)
    n = g.shape[0]
    lam = ridge * float(g.diagonal().mean().clamp_min(1e-12))
    gone = torch.ones(consumer.width, dtype=torch.bool)
    gone[kept] = False
    cols = torch.nonzero(~torch.cat([torch.zeros(consumer.offset, dtype=torch.bool), gone,
                                     torch.zeros(n - consumer.offset - consumer.width, dtype=torch.bool)])).flatten()
    a = g[cols][:, cols] + lam * torch.eye(len(cols), dtype=torch.float64)
    b = w @ g[:, cols]
    rows = (w @ g * w).sum(1) - (torch.linalg.solve(a, b.T).T * b).sum(1)
    return float(rows.sum() if consumer.row_weights is None else (rows * consumer.row_weights).sum())


# ---------------------------------------------------------------------- widths under a budget


def allowed_widths(width: int, floor: int, multiple: int = 1, min_width: int = 1) -> list[int]:
    """Kept widths a group may take, descending: its whole width, then multiples of ``multiple``
    at or above max(floor, min_width, multiple)."""
    low = max(floor, min(min_width, width), min(multiple, width))
    out = [width]
    k = ((width - 1) // multiple) * multiple
    while k >= low and k > 0:
        out.append(k)
        k -= multiple
    return out


def _hull(xs: Sequence[int], ys: Sequence[float]) -> list[float]:
    """The lower convex hull of points (x ascending), evaluated at every x."""
    hull: list[int] = []
    for i in range(len(xs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (ys[b] - ys[a]) * (xs[i] - xs[a]) >= (ys[i] - ys[a]) * (xs[b] - xs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    out = list(ys)
    for a, b in zip(hull, hull[1:]):
        for i in range(a + 1, b):
            out[i] = ys[a] + (ys[b] - ys[a]) * (xs[i] - xs[a]) / (xs[b] - xs[a])
    return out


def allocate(costs: Mapping[str, Mapping[int, float]], widths: Mapping[str, int], target_kept: int, *,
             multiple: int = 1, min_width: int = 1) -> dict[str, int]:
    """Kept width per group minimising the summed cost with about ``target_kept`` channels in all.

    ``costs[g][k]``: group g's (normalised) cost of keeping k channels, given at least for
    every allowed width down to the curve's floor (the smallest k given). Marginal-gain greedy
    on each curve's lower convex hull, which is optimal for the convexified costs: the cheapest
    cost per removed channel goes first; equal slopes go to the group that has lost the
    smallest fraction, so equal curves give uniform widths. Removal stops once the total is
    within half a step of the target.
    """
    steps: dict[str, list[int]] = {}
    slopes: dict[str, list[float]] = {}
    for name, width in widths.items():
        floor = min(costs[name])
        ks = allowed_widths(width, floor, multiple, min_width)
        removed = [width - k for k in ks]
        values = _hull(removed, [float(costs[name][k]) for k in ks])
        steps[name] = ks
        slopes[name] = [(values[i + 1] - values[i]) / (removed[i + 1] - removed[i]) for i in range(len(ks) - 1)]
    kept = {name: widths[name] for name in widths}
    at = {name: 0 for name in widths}
    order = {name: i for i, name in enumerate(widths)}
    heap = [(slopes[n][0], 0.0, order[n], n) for n in widths if slopes[n]]
    heapq.heapify(heap)
    total = sum(kept.values())
    while heap and total > target_kept:
        slope, _, _, name = heapq.heappop(heap)
        i = at[name]
        size = steps[name][i] - steps[name][i + 1]
        if total - size < target_kept and (target_kept - (total - size)) > (total - target_kept):
            continue  # this step overshoots more than it closes; a smaller one may fit
        kept[name] = steps[name][i + 1]
        at[name] = i + 1
        total -= size
        if at[name] < len(slopes[name]):
            heapq.heappush(heap, (slopes[name][at[name]], 1 - kept[name] / widths[name], order[name], name))
    return kept


# ---------------------------------------------------------------------- the Select pass's entry


def group_consumers(model: nn.Module, ir: ModelIR, g: ChannelGroup, moments: Mapping[str, InputStats], *, centred: bool,
                    row_weights: Mapping[str, torch.Tensor] | None = None) -> list[Consumer]:
    """The consumers of ``g`` with their dense weights and normalised (centred) Gram matrices."""
    out = []
    for port in g.consumers:
        info = ir.linears[port.linear]
        stats = moments.get(info.name)
        if stats is None or stats.count == 0 or stats.gram is None:
            raise InputError(f"no second moments for {info.name!r}: error-aware widths need the refit's calibration data")
        w = model.get_parameter(info.weight).detach().to(torch.float64)
        w = w.t() if info.kind == "conv1d" else w
        gram = stats.gram / float(stats.count)
        if centred:
            gram = gram - torch.outer(stats.mean, stats.mean)
        d = None if row_weights is None else row_weights.get(info.name)
        out.append(Consumer(w, gram, port.offset, g.width, None if d is None else d.to(torch.float64)))
    return out


def error_select(model: nn.Module, ir: ModelIR, scores: Mapping[str, torch.Tensor], moments: Mapping[str, InputStats],
                 sparsity: float, *, allocation: str = "error", selection: str = "score", multiple: int = 1,
                 min_width: int = 1, ridge: float = 1e-3, centred: bool = False,
                 row_weights: Mapping[str, torch.Tensor] | None = None,
                 loss_probe: Callable[[dict[str, torch.Tensor]], dict[str, float]] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Curve]]:
    """Kept channels per group when the widths (``allocation="error"``: the refit's residual
    relative to the layer's output energy; ``"fisher"``: the residual per output row weighted by
    the loss's squared gradient there, ``row_weights``; ``"loss"``: each curve scaled so that
    at the uniform width it equals the loss increase ``loss_probe`` measures for that group
    cut alone) or the channels (``selection="refit"``) come from the refit's error; also the
    curves it read. The two halves, :func:`removal_curves` (per group, from that group's
    moments) and :func:`kept_from_curves` (across groups), run apart on the block route."""
    curves = removal_curves(model, ir, scores, moments, sparsity, allocation=allocation, selection=selection,
                            multiple=multiple, min_width=min_width, ridge=ridge, centred=centred, row_weights=row_weights)
    kept = kept_from_curves(ir, curves, scores, sparsity, allocation=allocation, selection=selection, multiple=multiple,
                            min_width=min_width, loss_probe=loss_probe)
    return kept, curves


def _check_choice(allocation: str, selection: str) -> None:
    if allocation not in ALLOCATIONS or selection not in SELECTIONS:
        raise ConfigError(f"allocation must be one of {ALLOCATIONS} and selection one of {SELECTIONS}")


def _uniform_widths(ir: ModelIR, sparsity: float, multiple: int, min_width: int) -> dict[str, int]:
    from llmrank.passes.select import round_width

    return {g.name: round_width(g.width - round(sparsity * g.width), g.width, multiple, min_width) for g in ir.groups}


def removal_curves(model: nn.Module, ir: ModelIR, scores: Mapping[str, torch.Tensor], moments: Mapping[str, InputStats],
                   sparsity: float, *, allocation: str = "error", selection: str = "score", multiple: int = 1,
                   min_width: int = 1, ridge: float = 1e-3, centred: bool = False,
                   row_weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, Curve]:
    """Each group's refit error as its channels go, down to the narrowest width the allocation may
    give it; reads only that group's weights and moments, so a block can be done on its own."""
    _check_choice(allocation, selection)
    weighted = allocation == "fisher"
    if weighted and not row_weights:
        raise InputError("allocation 'fisher' needs the loss's output sensitivities (stats.sensitivity from the Gradients pass)")
    uniform = _uniform_widths(ir, sparsity, multiple, min_width)
    curves: dict[str, Curve] = {}
    for g in ir.groups:
        if allocation == "uniform":
            floor = uniform[g.name]
        else:
            lose = min(MAX_GROUP_SPARSITY, SPREAD * sparsity)
            floor = min(uniform[g.name], max(min(min_width, g.width), math.ceil(g.width * (1 - lose))))
        order = _score_removal_order(scores[g.name]) if selection == "score" else None
        consumers = group_consumers(model, ir, g, moments, centred=centred, row_weights=row_weights if weighted else None)
        curves[g.name] = removal_curve(consumers, floor, ridge=ridge, order=order)
    return curves


def kept_from_curves(ir: ModelIR, curves: Mapping[str, Curve], scores: Mapping[str, torch.Tensor], sparsity: float, *,
                     allocation: str = "error", selection: str = "score", multiple: int = 1, min_width: int = 1,
                     loss_probe: Callable[[dict[str, torch.Tensor]], dict[str, float]] | None = None,
                     ) -> dict[str, torch.Tensor]:
    """Widths across all groups under one budget (the allocation), then each group's survivors."""
    _check_choice(allocation, selection)
    if allocation == "loss" and loss_probe is None:
        raise InputError("allocation 'loss' needs a loss_probe (kept channels per group -> measured loss increase)")
    uniform = _uniform_widths(ir, sparsity, multiple, min_width)
    if allocation == "uniform":
        widths = uniform
    else:
        if allocation == "loss":
            # the curve's survivors: the greedy's under selection 'refit', the scorer's top-k otherwise
            at_uniform = {g.name: curves[g.name].kept(uniform[g.name]) for g in ir.groups if uniform[g.name] < g.width}
            costs = loss_scaled_costs(curves, uniform, loss_probe(at_uniform) if at_uniform else {})
        else:
            # error: relative to the layer's output energy; fisher: already an estimate of the loss increase
            relative = allocation != "fisher"
            costs = {name: {c.width - i: float(c.errors[i]) / (max(c.energy, 1e-300) if relative else 1.0)
                            for i in range(len(c.errors))} for name, c in curves.items()}
        target = sum(g.width - round(sparsity * g.width) for g in ir.groups)
        widths = allocate(costs, {g.name: g.width for g in ir.groups}, target, multiple=multiple, min_width=min_width)
    return {g.name: curves[g.name].kept(widths[g.name]) if selection == "refit" else _top(scores[g.name], widths[g.name])
            for g in ir.groups}


def loss_scaled_costs(curves: Mapping[str, Curve], probe_width: Mapping[str, int],
                      increases: Mapping[str, float]) -> dict[str, dict[int, float]]:
    """Each curve's error growth, scaled to the measured loss increase at ``probe_width``:
    cost(k) = max(increase, 0) * (error(k) - error(width)) / (error(probe) - error(width)).
    Groups without a measurement (not cut at the probe width) cost nothing."""
    costs = {}
    for name, c in curves.items():
        base = float(c.errors[0])
        span = c.error_at(probe_width[name]) - base if name in increases else 0.0
        scale = max(float(increases[name]), 0.0) / span if span > 0 else 0.0
        costs[name] = {c.width - i: scale * (float(c.errors[i]) - base) for i in range(len(c.errors))}
    return costs


def _score_removal_order(scores: torch.Tensor) -> torch.Tensor:
    """Lowest score first; ties remove the higher index first, so the survivors at every width
    are exactly select.py's top-k (which keeps the lower index on ties)."""
    keep_order = torch.sort(-scores.to(torch.float64), stable=True).indices
    return keep_order.flip(0)


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    from llmrank.passes.select import _top as top

    return top(scores, keep)
