"""Error-aware widths and refit-aware selection (passes/allocate.py) against independent references.

The references are numpy: an explicit ridge least-squares fit on the (augmented) data matrix,
and a brute-force greedy that refits every candidate set from scratch.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import llmrank
from llmrank.exporters.hf import load_hf, save_hf
from llmrank.ir.errors import ConfigError
from llmrank.passes.allocate import Consumer, allocate, allowed_widths, refit_error, removal_curve
from llmrank.passes.config import PruneConfig
from llmrank.passes.blocks.driver import check_config

RIDGE = 1e-3


def problem(seed: int, tokens: int = 300, n: int = 14, out: int = 6, offset: int = 2, width: int = 9):
    """Correlated inputs X (tokens x n), a consumer W (out x n); the group is columns offset..offset+width."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, n)) @ rng.standard_normal((n, n)) + rng.standard_normal(n)
    w = rng.standard_normal((out, n))
    return x, w, offset, width


def consumer(x: np.ndarray, w: np.ndarray, offset: int, width: int, d: np.ndarray | None = None) -> Consumer:
    gram = torch.from_numpy(x.T @ x / len(x))
    return Consumer(torch.from_numpy(w), gram, offset, width, None if d is None else torch.from_numpy(d))


def lstsq_error(x: np.ndarray, w: np.ndarray, offset: int, width: int, kept: list[int], d: np.ndarray | None = None) -> float:
    """min_W' |X W^T - X_S W'^T|^2 / T + lambda |W'|^2 by numpy lstsq on rows augmented with
    sqrt(lambda T) I, weighted per output row by d (default 1)."""
    t, n = x.shape
    cols = list(range(offset)) + [offset + k for k in kept] + list(range(offset + width, n))
    lam = RIDGE * np.mean(np.diag(x.T @ x / t))
    a = np.vstack([x[:, cols], np.sqrt(lam * t) * np.eye(len(cols))])
    y = np.vstack([x @ w.T, np.zeros((len(cols), w.shape[0]))])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    per_row = ((y - a @ coef) ** 2).sum(0) / t
    return float(per_row.sum() if d is None else (per_row * d).sum())


@pytest.mark.parametrize("block", [1, 4, 16])
def test_curve_along_the_scorer_order_equals_explicit_lstsq_at_every_width(block):
    x, w, offset, width = problem(0)
    d = np.random.default_rng(1).uniform(0.1, 2.0, w.shape[0])
    order = torch.tensor([4, 0, 8, 2, 7, 1, 5])
    curve = removal_curve([consumer(x, w, offset, width, d)], floor=width - len(order), ridge=RIDGE, order=order, block=block)
    assert curve.removed.tolist() == order.tolist()
    for i in range(len(order) + 1):
        kept = sorted(set(range(width)) - set(order[:i].tolist()))
        assert curve.kept(width - i).tolist() == kept
        ref = lstsq_error(x, w, offset, width, kept, d)
        assert curve.errors[i].item() == pytest.approx(ref, rel=1e-8)
        assert refit_error(consumer(x, w, offset, width, d), torch.tensor(kept), ridge=RIDGE) == pytest.approx(ref, rel=1e-8)
    energy = float(np.einsum("r,ri,ij,rj->", d, w, x.T @ x / len(x), w))
    assert curve.energy == pytest.approx(energy, rel=1e-12)
    assert torch.all(curve.errors[1:] >= curve.errors[:-1])  # removing never lowers the residual


def test_greedy_downdate_equals_brute_force_greedy():
    x, w, offset, width = problem(2)
    curve = removal_curve([consumer(x, w, offset, width)], floor=1, ridge=RIDGE, block=1)
    alive, brute = list(range(width)), []
    for _ in range(width - 1):
        costs = [lstsq_error(x, w, offset, width, [k for k in alive if k != q]) for q in alive]
        q = alive[int(np.argmin(costs))]
        brute.append(q)
        alive.remove(q)
    assert curve.removed.tolist() == brute
    assert curve.errors[-1].item() == pytest.approx(lstsq_error(x, w, offset, width, alive), rel=1e-8)


def test_two_consumers_add_their_errors_and_block_greedy_records_exact_errors():
    x, w, offset, width = problem(3)
    x2, w2, _, _ = problem(4, n=9, offset=0)
    both = [consumer(x, w, offset, width), consumer(x2, w2, 0, width)]
    curve = removal_curve(both, floor=3, ridge=RIDGE, block=3)
    for k in range(3, width + 1):
        kept = curve.kept(k).tolist()
        ref = lstsq_error(x, w, offset, width, kept) + lstsq_error(x2, w2, 0, width, kept)
        assert curve.error_at(k) == pytest.approx(ref, rel=1e-8)


def test_a_redundant_channel_goes_first_and_costs_nothing_but_the_ridge():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((400, 6))
    x = np.hstack([x, x[:, :1] + x[:, 1:2]])  # channel 6 = channel 0 + channel 1
    w = rng.standard_normal((3, 7))
    curve = removal_curve([consumer(x, w, 0, 7)], floor=6, ridge=1e-9, block=1)
    assert curve.removed.item() in (0, 1, 6)
    assert curve.errors[1].item() < 1e-6 * curve.energy


def test_allocation_respects_budget_multiple_and_floor():
    rng = np.random.default_rng(0)
    widths = {"a": 64, "b": 48, "c": 64}
    costs = {g: {k: float(rng.uniform(0.5, 3.0) * (n - k) ** 2) for k in range(10, n + 1)} for g, n in widths.items()}
    target = 120
    for multiple, min_width in [(1, 1), (8, 1), (8, 24), (1, 30)]:
        kept = allocate(costs, widths, target, multiple=multiple, min_width=min_width)
        for g, k in kept.items():
            assert k in allowed_widths(widths[g], 10, multiple, min_width)
            assert k >= min(min_width, widths[g]) and (k == widths[g] or k % multiple == 0)
        assert abs(sum(kept.values()) - target) <= multiple / 2 * len(widths)


def test_equal_curves_give_uniform_widths_and_costlier_groups_keep_more():
    widths = {name: 64 for name in "abcd"}
    same = {name: {k: (64 - k) ** 2 + 0.1 * (64 - k) for k in range(8, 65)} for name in widths}
    assert set(allocate(same, widths, 4 * 40).values()) == {40}
    assert set(allocate(same, widths, 4 * 40, multiple=8).values()) == {40}
    skewed = dict(same, a={k: 4 * v for k, v in same["a"].items()})
    kept = allocate(skewed, widths, 4 * 40)
    assert kept["a"] > 40 > kept["b"] and sum(kept.values()) == 160


def test_allocation_is_optimal_on_convex_curves():
    rng = np.random.default_rng(7)
    widths = {"a": 12, "b": 10, "c": 12}
    costs = {}
    for g, n in widths.items():
        steps = np.sort(rng.uniform(0, 1, n))  # increasing marginal costs: convex
        costs[g] = {n - r: float(steps[:r].sum()) for r in range(n + 1)}
    target = 20
    kept = allocate(costs, widths, target)
    best = min((sum(costs[g][k] for g, k in zip(widths, ks)), ks) for ks in itertools.product(*(range(n + 1) for n in widths.values()))
               if sum(ks) == target)
    assert sum(kept.values()) == target
    assert sum(costs[g][kept[g]] for g in widths) == pytest.approx(best[0], rel=1e-12)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="lstsq"):
        PruneConfig(allocation="error")
    with pytest.raises(ConfigError, match="lstsq"):
        PruneConfig(selection="refit", compensation="bias")
    with pytest.raises(ConfigError, match="local"):
        PruneConfig(allocation="error", compensation="lstsq", pruner="global")
    with pytest.raises(ConfigError, match="allocation"):
        PruneConfig(allocation="errors")
    with pytest.raises(ConfigError, match="block by block"):
        check_config(PruneConfig(allocation="fisher", compensation="lstsq"))


@pytest.mark.slow
def test_pipeline_with_refit_aware_options_verifies_and_reloads(tmp_path, llama_factory):
    from llmrank.passes.pipeline import Analyze, Calibrate, CheckOutputs, Compensate, Pipeline, Score, Select, Shrink, Trace, Verify

    model = llama_factory(intermediate_size=48)
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    base = PruneConfig(sparsity=0.4, compensation="lstsq", multiple=4)
    shared = Pipeline([Trace(), Analyze(), Calibrate()]).run(model, base, batches=list(calib.split(4)))
    rest = Pipeline([Score(), Select(), Compensate(), Shrink(), CheckOutputs(), Verify()])
    plain = rest.run(shared)
    results = {}
    for allocation, selection in [("error", "score"), ("error", "refit"), ("uniform", "refit")]:
        result = results[allocation, selection] = rest.run(shared.update(config=base.with_(allocation=allocation, selection=selection)))
        assert result.verification.ok  # shrunk == masked, the refit included
        widths = {g: len(k) for g, k in result.kept.items()}
        assert all(w % 4 == 0 for w in widths.values())
        assert abs(sum(widths.values()) - sum(len(k) for k in plain.kept.values())) <= 2 * len(widths)
        if selection == "refit":  # the greedy keeps another set than the scorer's top-k somewhere
            assert any(not torch.equal(result.kept[g], plain.kept[g]) for g in widths if len(plain.kept[g]) == widths[g])
    result = results["error", "score"]
    assert len({len(k) for k in result.kept.values()}) > 1  # per-layer widths
    save_hf(result.slim, None, tmp_path / "hf", metadata={})
    ids = calib[:2]
    with torch.no_grad():
        assert torch.allclose(load_hf(tmp_path / "hf")(ids).logits, result.slim(ids).logits, atol=1e-5)


def test_uniform_score_through_error_select_equals_plain_select(llama_factory):
    from llmrank.passes.allocate import error_select
    from llmrank.passes.pipeline import Analyze, Calibrate, Pipeline, Score, Trace

    model = llama_factory()
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    config = PruneConfig(compensation="lstsq", sparsity=0.3)
    state = Pipeline([Trace(), Analyze(), Calibrate(), Score()]).run(model, config, batches=list(calib.split(4)))
    kept, curves = error_select(model, state.ir, state.scores.groups, state.stats.moments, 0.3, allocation="uniform")
    plain = llmrank.select(state.ir, state.scores.groups, 0.3)
    for g in state.ir.groups:
        assert torch.equal(kept[g.name], plain[g.name])
        assert torch.equal(curves[g.name].kept(len(plain[g.name])), plain[g.name])


def test_refit_selection_does_not_read_the_scores(llama_factory):
    """With selection='refit' the kept set is the greedy error order's: any two scorers agree."""
    from llmrank.passes.allocate import error_select
    from llmrank.passes.pipeline import Analyze, Calibrate, Pipeline, Trace

    model = llama_factory()
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    state = Pipeline([Trace(), Analyze(), Calibrate()]).run(model, PruneConfig(compensation="lstsq"), batches=list(calib.split(4)))
    gen = torch.Generator().manual_seed(0)
    runs = []
    for _ in range(2):
        scores = {g.name: torch.rand(g.width, generator=gen) for g in state.ir.groups}
        for allocation in ("uniform", "error"):
            runs.append(error_select(model, state.ir, scores, state.stats.moments, 0.4, allocation=allocation, selection="refit")[0])
    for g in state.ir.groups:
        assert torch.equal(runs[0][g.name], runs[2][g.name]) and torch.equal(runs[1][g.name], runs[3][g.name])
