"""The whole pipeline on a tiny random Llama, checked against independent computations.

Expected scores come from the model's own weight tensors (model.model.layers[i].mlp.*) and
activation norms collected by the test's own forward hooks (conftest.hook_norms), pushed
through a numpy transcription of ALGORITHM.md; passes/calibrate.py and llmrank/scorers.py
are not used to build any expected value.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

import llmrank
from llmrank.ir.graph import ChannelGroup, ModelIR, Port
from llmrank.passes.calibrate import ActivationNorms
from llmrank.passes.select import round_width, select

HIDDEN, INTER, LAYERS = 32, 64, 3
GROUPS = [f"model.layers.{i}.mlp" for i in range(LAYERS)]


# ---------------------------------------------------------------- numpy reference


def np_normalize(v: np.ndarray) -> np.ndarray:
    return v / v.sum()


def np_transition(w: np.ndarray, theta: float) -> np.ndarray:
    a = np.abs(w)
    adj = (a != 0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        s_w = np.nan_to_num(a / a.sum(axis=0, keepdims=True))
        s_d = np.nan_to_num(adj / adj.sum(axis=0, keepdims=True))
    return theta * s_w + (1 - theta) * s_d


def np_wpr(weights, a_in, a_outs, theta, gamma):
    p, out = np_normalize(a_in), []
    for w, a in zip(weights, a_outs):
        p = np_normalize(gamma * np_transition(w, theta) @ p + (1 - gamma) * np_normalize(a))
        out.append(p)
    return out


def np_mpr(weights, a_in, a_outs, z=None):
    p, out = np_normalize(a_in), []
    for w, a in zip(weights, a_outs):
        if z:
            p = p.copy()
            p[np.argsort(p, kind="stable")[: round(z * p.size)]] = 0.0
        p = np_normalize((np.abs(w) @ p) * a)
        out.append(p)
    return out


def weight(model, i, name) -> np.ndarray:
    return getattr(model.model.layers[i].mlp, name).weight.detach().double().numpy()


def top(scores: np.ndarray, keep: int) -> list[int]:
    """The ``keep`` highest-scoring indices, ascending."""
    return sorted(np.argsort(-scores, kind="stable")[:keep].tolist())


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def batches(tiny_llama):
    return list(tiny_llama.calib.split(4))  # prune's default batch_size=4: batches of 4 and 2


@pytest.fixture(scope="module")
def ref_norms(tiny_llama, batches, norms_of):
    names = list(tiny_llama.ir.linears)
    return norms_of(tiny_llama.model, names, batches)


def run(tiny_llama, **kwargs):
    """prune() in the paper's setting unless a test asks otherwise (the expected values follow it)."""
    kwargs.setdefault("sparsity", 0.25)
    kwargs.setdefault("representation", "chained")
    kwargs.setdefault("gamma", 0.0)
    return llmrank.prune(tiny_llama.model, tiny_llama.calib, traced=tiny_llama.traced, progress=False, **kwargs)


def expected_chain(model, norms, scorer, representation, theta=0.5, gamma=0.0, z=None):
    """[(mid, out)] per layer from the formula."""
    def layer(i):
        up, down = f"model.layers.{i}.mlp.up_proj", f"model.layers.{i}.mlp.down_proj"
        return [weight(model, i, "up_proj"), weight(model, i, "down_proj")], [norms[up][1], norms[down][1]], norms[up][0]

    def chain(ws, a_in, a_outs):
        return np_wpr(ws, a_in, a_outs, theta, gamma) if scorer == "wpr" else np_mpr(ws, a_in, a_outs, z)

    if representation == "isolated":
        result = []
        for i in range(LAYERS):
            ws, a_outs, a_in = layer(i)
            result.append(tuple(chain(ws, a_in, a_outs)))
        return result
    ws, a_outs = [], []
    for i in range(LAYERS):
        w, a, _ = layer(i)
        ws += w
        a_outs += a
    flat = chain(ws, layer(0)[2], a_outs)
    return [(flat[2 * i], flat[2 * i + 1]) for i in range(LAYERS)]


def close(got: torch.Tensor, expected: np.ndarray):
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=2e-5, atol=1e-9)


# ---------------------------------------------------------------- IR and calibration


def test_ir_groups_are_the_three_ffns(tiny_llama):
    ir = tiny_llama.ir
    assert [g.name for g in ir.groups] == GROUPS
    for i, g in enumerate(ir.groups):
        assert g.width == INTER
        assert g.primary == Port(f"model.layers.{i}.mlp.up_proj", 0)
        assert [c.linear for c in g.consumers] == [f"model.layers.{i}.mlp.down_proj"]


def test_calibrate_matches_independent_hooks(tiny_llama, batches, ref_norms):
    norms = llmrank.calibrate(tiny_llama.model, tiny_llama.ir, batches, progress=False)
    assert norms.batches == 2
    assert norms.tokens == 6 * 16
    assert set(norms.a_in) == set(ref_norms) == set(tiny_llama.ir.linears)
    for name, (a_in, a_out) in ref_norms.items():
        np.testing.assert_allclose(norms.a_in[name].double().numpy(), a_in, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(norms.a_out[name].double().numpy(), a_out, rtol=1e-5, atol=1e-7)


def test_reference_norms_are_per_batch_means_not_a_global_norm(tiny_llama, ref_norms, norms_of):
    # Guards the reference itself: with unequal batches (4 and 2 rows) the mean of per-batch
    # norms differs from the norm over all tokens, so the calibration test can tell them apart.
    name = "model.layers.1.mlp.down_proj"
    whole = norms_of(tiny_llama.model, [name], [tiny_llama.calib])[name][0]
    assert not np.allclose(whole, ref_norms[name][0], rtol=1e-3)


# ---------------------------------------------------------------- scores == formula


CASES = [
    ("wpr", dict(theta=0.5, gamma=0.0)),
    ("wpr", dict(theta=0.3, gamma=0.7)),
    ("wpr", dict(theta=1.0, gamma=0.9)),
    ("mpr", dict()),
    ("mpr", dict(z_importance=0.25)),
]


@pytest.mark.parametrize("representation", ["isolated", "chained"])
@pytest.mark.parametrize("scorer,params", CASES)
def test_prune_scores_equal_formula(tiny_llama, ref_norms, representation, scorer, params):
    r = run(tiny_llama, scorer=scorer, representation=representation, **params)
    expected = expected_chain(
        tiny_llama.model, ref_norms, scorer, representation,
        theta=params.get("theta", 0.5), gamma=params.get("gamma", 0.0), z=params.get("z_importance"),
    )
    assert list(r.scores.groups) == GROUPS
    for name, (mid, out) in zip(GROUPS, expected):
        close(r.scores.groups[name], mid)
        close(r.scores.outputs[name], out)
        assert r.kept[name].tolist() == top(mid, INTER - round(0.25 * INTER))


def test_chained_differs_from_isolated(tiny_llama, ref_norms):
    iso = expected_chain(tiny_llama.model, ref_norms, "wpr", "isolated", theta=0.5, gamma=0.9)
    cha = expected_chain(tiny_llama.model, ref_norms, "wpr", "chained", theta=0.5, gamma=0.9)
    assert np.allclose(iso[0][0], cha[0][0])  # layer 0 starts from the same a_in
    assert not np.allclose(iso[1][0], cha[1][0], rtol=1e-4)  # later layers see down_0's scores


def test_score_pass_with_own_norms(tiny_llama, ref_norms):
    norms = ActivationNorms(
        a_in={k: torch.tensor(v[0], dtype=torch.float32) for k, v in ref_norms.items()},
        a_out={k: torch.tensor(v[1], dtype=torch.float32) for k, v in ref_norms.items()},
        batches=2,
    )
    for cfg in (llmrank.ScoreConfig("wpr", "chained", theta=0.4, gamma=0.6), llmrank.ScoreConfig("mpr", "isolated")):
        scores = llmrank.score(tiny_llama.model, tiny_llama.ir, norms, cfg)
        expected = expected_chain(tiny_llama.model, ref_norms, cfg.scorer, cfg.representation, theta=cfg.theta, gamma=cfg.gamma)
        for name, (mid, out) in zip(GROUPS, expected):
            close(scores.groups[name], mid)
            close(scores.outputs[name], out)


def test_per_layer_baselines_equal_formula(tiny_llama, ref_norms):
    m = tiny_llama.model
    for scorer, p in (("l1", 1), ("lp", 2)):
        r = run(tiny_llama, scorer=scorer, p=2.0)
        for i, name in enumerate(GROUPS):
            up = weight(m, i, "up_proj")
            close(r.scores.groups[name], np_normalize((np.abs(up) ** p).sum(axis=1) ** (1 / p)))
            close(r.scores.outputs[name], np_normalize((np.abs(weight(m, i, "down_proj")) ** p).sum(axis=1) ** (1 / p)))
    r_act = run(tiny_llama, scorer="activation")
    r_wanda = run(tiny_llama, scorer="wanda")
    for i, name in enumerate(GROUPS):
        up = f"model.layers.{i}.mlp.up_proj"
        close(r_act.scores.groups[name], np_normalize(ref_norms[up][1]))
        close(r_wanda.scores.groups[name], np_normalize(np.abs(weight(m, i, "up_proj")) @ ref_norms[up][0]))


def test_wpr_gamma_zero_ranks_like_activation(tiny_llama):
    a = run(tiny_llama, scorer="wpr", gamma=0.0, theta=0.8)
    b = run(tiny_llama, scorer="activation")
    for name in GROUPS:
        assert a.kept[name].tolist() == b.kept[name].tolist()
        close(a.scores.groups[name], b.scores.groups[name].double().numpy())


def test_dataflow_gamma_zero_is_the_down_proj_input_norm(tiny_llama, ref_norms):
    r = run(tiny_llama, scorer="wpr", representation="dataflow", gamma=0.0)
    for i, name in enumerate(GROUPS):
        close(r.scores.groups[name], np_normalize(ref_norms[f"model.layers.{i}.mlp.down_proj"][0]))
    r = run(tiny_llama, scorer="wpr", representation="dataflow", gamma=0.9)
    for name in GROUPS:
        s = r.scores.groups[name]
        assert torch.isfinite(s).all() and float(s.sum()) == pytest.approx(1.0)


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize("sparsity,keep", [(0.0, 64), (0.1, 58), (0.25, 48), (0.5, 32), (0.9, 6)])
def test_local_pruner_keeps_width_minus_round(tiny_llama, sparsity, keep):
    assert keep == INTER - round(sparsity * INTER)
    r = run(tiny_llama, scorer="l1", sparsity=sparsity)
    for i, name in enumerate(GROUPS):
        scores = np_normalize(np.abs(weight(tiny_llama.model, i, "up_proj")).sum(axis=1))
        assert r.kept[name].tolist() == top(scores, keep)
        assert r.widths[name] == (INTER, keep)


def test_global_pruner_removes_the_globally_lowest(tiny_llama):
    r = run(tiny_llama, scorer="l1", pruner="global", sparsity=0.3)
    pooled = []
    for i, name in enumerate(GROUPS):
        for j, s in enumerate(np_normalize(np.abs(weight(tiny_llama.model, i, "up_proj")).sum(axis=1))):
            pooled.append((s, name, j))
    n_remove = math.ceil(0.3 * LAYERS * INTER)
    assert n_remove == 58
    removed = {(name, j) for _, name, j in sorted(pooled, key=lambda x: x[0])[:n_remove]}
    got_removed = {(name, j) for name in GROUPS for j in range(INTER) if j not in set(r.kept[name].tolist())}
    assert got_removed == removed
    assert sum(INTER - len(r.kept[n]) for n in GROUPS) == 58


def test_global_pruner_favours_wide_groups_by_hand():
    # Two fake groups of widths 4 and 8 with uniform scores 1/4 and 1/8: every channel of the
    # wide group scores lower, so a global cut of ceil(0.5 * 12) = 6 takes them all from it.
    def grp(name, width):
        return ChannelGroup(name, width, (Port(name + ".a"),), (Port(name + ".b"),), Port(name + ".a"), ())

    ir = ModelIR("Fake", {}, [grp("narrow", 4), grp("wide", 8)], {})
    scores = {"narrow": torch.full((4,), 0.25), "wide": torch.full((8,), 0.125)}
    kept = select(ir, scores, 0.5, pruner="global")
    assert kept["narrow"].tolist() == [0, 1, 2, 3]
    assert kept["wide"].tolist() == [0, 1]  # ties: the lower channel index is kept (select.py)
    local = select(ir, scores, 0.5, pruner="local")
    assert local["narrow"].tolist() == [0, 1] and local["wide"].tolist() == [0, 1, 2, 3]


def test_round_width_by_hand():
    assert round_width(45, 64, multiple=8) == 48
    assert round_width(43, 64, multiple=8) == 40
    assert round_width(44, 64, multiple=8) == 48  # half rounds up
    assert round_width(3, 64, multiple=8) == 8  # never below one multiple
    assert round_width(6, 64, min_width=16) == 16
    assert round_width(70, 64, multiple=8) == 64
    assert round_width(0, 64) == 1
    assert round_width(5, 4, min_width=10) == 4  # never above the width


def test_multiple_and_min_width(tiny_llama):
    r = run(tiny_llama, scorer="l1", sparsity=0.3, multiple=8)  # keep 45 -> 48
    r_min = run(tiny_llama, scorer="l1", sparsity=0.9, min_width=16)  # keep 6 -> 16
    r_both = run(tiny_llama, scorer="l1", sparsity=0.9, multiple=8, min_width=3)  # keep 6 -> 8
    for i, name in enumerate(GROUPS):
        scores = np_normalize(np.abs(weight(tiny_llama.model, i, "up_proj")).sum(axis=1))
        assert r.kept[name].tolist() == top(scores, 48)
        assert r_min.kept[name].tolist() == top(scores, 16)
        assert r_both.kept[name].tolist() == top(scores, 8)
    assert r.uniform_width == 48 and r.model.config.intermediate_size == 48
    assert r.verification.ok and r_min.verification.ok


# ---------------------------------------------------------------- rewriting


def my_masked(model, kept: dict[str, torch.Tensor]):
    """Zero dropped neurons by hand: rows of gate/up, columns of down."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for i, name in enumerate(GROUPS):
            drop = [j for j in range(INTER) if j not in set(kept[name].tolist())]
            mlp = masked.model.layers[i].mlp
            mlp.gate_proj.weight[drop, :] = 0
            mlp.up_proj.weight[drop, :] = 0
            mlp.down_proj.weight[:, drop] = 0
    return masked


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_shrunk_equals_masked_and_parameters_drop_exactly(tiny_llama):
    r = run(tiny_llama, scorer="wpr", gamma=0.5, sparsity=0.25)
    assert r.verification is not None and r.verification.ok and r.verification.max_abs_diff <= 1e-5
    diff = (logits(my_masked(tiny_llama.model, r.kept), tiny_llama.calib) - logits(r.model, tiny_llama.calib)).abs().max()
    assert float(diff) <= 1e-5
    # ... and the pruning did change the function (the comparison is not vacuous)
    assert float((logits(tiny_llama.model, tiny_llama.calib) - logits(r.model, tiny_llama.calib)).abs().max()) > 1e-3
    removed = LAYERS * 16
    assert r.params_before - r.params_after == removed * (2 * HIDDEN + HIDDEN)
    assert r.params_after == sum(p.numel() for p in r.model.parameters())
    assert r.params_before == sum(p.numel() for p in tiny_llama.model.parameters())
    for layer in r.model.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (48, HIDDEN)
        assert layer.mlp.up_proj.weight.shape == (48, HIDDEN)
        assert layer.mlp.down_proj.weight.shape == (HIDDEN, 48)
        assert layer.mlp.up_proj.out_features == 48 and layer.mlp.down_proj.in_features == 48
    assert r.model.config.intermediate_size == 48
    assert tiny_llama.model.config.intermediate_size == INTER


def test_mask_mode_keeps_shapes_and_zeroes_groups(tiny_llama):
    r = run(tiny_llama, scorer="l1", sparsity=0.25, mode="mask")
    mine = my_masked(tiny_llama.model, r.kept)
    for (k, a), (k2, b) in zip(r.model.state_dict().items(), mine.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert r.params_after == r.params_before


def test_callers_model_is_not_modified(tiny_llama, state_bytes_of):
    model = tiny_llama.fresh()
    model.train()
    before = state_bytes_of(model)
    r = llmrank.prune(model, tiny_llama.calib, sparsity=0.4, scorer="wpr", gamma=0.5, progress=False)  # traces itself
    assert r.model is not model
    assert state_bytes_of(model) == before
    assert model.training
    assert model.config.intermediate_size == INTER
    assert model.model.layers[0].mlp.up_proj.out_features == INTER
    for mode in ("mask", "mask-paper"):
        run(tiny_llama, mode=mode)
    assert state_bytes_of(tiny_llama.model) == state_bytes_of(tiny_llama.fresh())  # fixture intact too


def test_inplace_modifies_the_callers_model(tiny_llama):
    model = tiny_llama.fresh()
    r = llmrank.prune(model, tiny_llama.calib, sparsity=0.25, scorer="l1", inplace=True, traced=tiny_llama.traced, progress=False)
    assert r.model is model
    assert model.model.layers[0].mlp.up_proj.weight.shape == (48, HIDDEN)
    assert model.config.intermediate_size == 48


def test_determinism(tiny_llama, state_bytes_of):
    a = run(tiny_llama, scorer="random", seed=3, sparsity=0.5)
    b = run(tiny_llama, scorer="random", seed=3, sparsity=0.5)
    c = run(tiny_llama, scorer="random", seed=4, sparsity=0.5)
    for name in GROUPS:
        assert torch.equal(a.kept[name], b.kept[name])
    assert state_bytes_of(a.model) == state_bytes_of(b.model)
    assert any(not torch.equal(a.kept[n], c.kept[n]) for n in GROUPS)
    # random layers are decorrelated: the same seed does not pick the same neurons everywhere
    assert not torch.equal(a.kept[GROUPS[0]], a.kept[GROUPS[1]])
    w1, w2 = run(tiny_llama, scorer="wpr", gamma=0.9), run(tiny_llama, scorer="wpr", gamma=0.9)
    assert state_bytes_of(w1.model) == state_bytes_of(w2.model)


def test_mask_paper_zeroes_lowest_up_and_down_rows(tiny_llama, ref_norms, state_bytes_of):
    s = 0.3
    r = run(tiny_llama, scorer="mpr", representation="chained", sparsity=s, mode="mask-paper")
    expected = expected_chain(tiny_llama.model, ref_norms, "mpr", "chained")
    n_up, n_down = round(s * INTER), round(s * HIDDEN)
    assert (n_up, n_down) == (19, 10)
    orig = tiny_llama.model
    for i, layer in enumerate(r.model.model.layers):
        up, down, gate = layer.mlp.up_proj.weight, layer.mlp.down_proj.weight, layer.mlp.gate_proj.weight
        assert up.shape == (INTER, HIDDEN) and down.shape == (HIDDEN, INTER)
        zero_up = [j for j in range(INTER) if torch.all(up[j] == 0)]
        zero_down = [j for j in range(HIDDEN) if torch.all(down[j] == 0)]
        assert zero_up == sorted(np.argsort(expected[i][0], kind="stable")[:n_up].tolist())
        assert zero_down == sorted(np.argsort(expected[i][1], kind="stable")[:n_down].tolist())
        kept_up = [j for j in range(INTER) if j not in zero_up]
        assert torch.equal(up[kept_up], orig.model.layers[i].mlp.up_proj.weight[kept_up])
        assert torch.equal(gate, orig.model.layers[i].mlp.gate_proj.weight)
        assert not torch.any(torch.all(down == 0, dim=0))  # no down_proj column is zeroed
    changed = {k for k, v in state_bytes_of(r.model).items() if v != state_bytes_of(orig)[k]}
    assert changed == {f"model.layers.{i}.mlp.{p}.weight" for i in range(LAYERS) for p in ("up_proj", "down_proj")}
    assert r.params_after == r.params_before
    assert all(w == (INTER, INTER) for w in r.widths.values())


def test_result_to_dict_is_json(tiny_llama):
    r = run(tiny_llama, scorer="wpr", gamma=0.5, sparsity=0.25)
    for include in (False, True):
        d = json.loads(json.dumps(r.to_dict(include_scores=include)))
        assert d["params_before"] == r.params_before and d["params_after"] == r.params_after
        assert d["param_reduction"] == pytest.approx(1 - r.params_after / r.params_before)
        assert d["widths"] == {n: {"before": INTER, "after": 48} for n in GROUPS}
        assert d["config"]["scorer"] == "wpr" and d["config"]["sparsity"] == 0.25
        assert d["config"]["calibration_batches"] == 2 and d["config"]["calibration_tokens"] == 96
        assert d["verification"]["ok"] is True
    assert len(d["scores"][GROUPS[0]]) == INTER and d["kept"][GROUPS[0]] == r.kept[GROUPS[0]].tolist()
    assert json.loads(json.dumps(tiny_llama.ir.to_dict()))["groups"][0]["name"] == GROUPS[0]


def test_trace_restores_each_module_s_own_mode():
    """A wrapper in training mode around eval-mode blocks (the block route's holder) must get its
    blocks back in eval mode: restoring with train(True) switched GPT-2's dropout on."""
    from llmrank.ir.trace import trace

    inner = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 4)).eval()
    outer = torch.nn.Sequential(inner)
    outer.training = True  # the wrapper alone says training
    trace(outer, (torch.randn(2, 4),))
    assert outer.training and not any(m.training for m in inner.modules())
