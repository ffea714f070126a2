"""Safety net for the pipeline redesign: the default path's numbers, recomputed by hand.

Every expected value here is computed independently in numpy float64 from the model's
weights and from activations recorded with this file's own forward hooks (or the shared
``hook_norms`` reference). Nothing calls llmrank's scoring or compensation helpers: llmrank is
reached only through its public API (``prune``, ``trace``, ``analyze``, ``score``,
``ScoreConfig``, ``ActivationNorms``), so these tests pin the formulas, not the code layout.

Two tolerances, for two different questions:
- ``llmrank.score`` fed float64 norms from ``hook_norms`` must match the formula to 1e-10
  relative (only summation order differs);
- ``llmrank.prune`` end to end calibrates by itself and stores the norms in float32, which
  moves the scores by ~1e-7 relative; it must match to 1e-6. Any real change of formula moves
  the scores by far more than either bound.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import llmrank

N_LAYERS = 3  # tests/conftest.py LLAMA
BATCH = 4  # llmrank.prune's default batch_size: the norms are means of per-batch norms


# --------------------------------------------------------------------------- references


def _normalize(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    total = v.sum()
    assert np.isfinite(total) and total > 0, "the reference expects strictly positive scores"
    return v / total


def _transition(w: np.ndarray, theta: float) -> np.ndarray:
    """M = theta * |W| / colsum(|W|) + (1 - theta) * 1[W != 0] / colsum(1[W != 0])."""
    a = np.abs(w)
    nz = (a != 0).astype(np.float64)
    return theta * a / a.sum(axis=0, keepdims=True) + (1.0 - theta) * nz / nz.sum(axis=0, keepdims=True)


def _w(module: nn.Module) -> np.ndarray:
    return module.weight.detach().double().numpy()


def _mlp(model: nn.Module, layer: int) -> nn.Module:
    return model.model.layers[layer].mlp


def _name(layer: int, leaf: str) -> str:
    part = "self_attn" if leaf == "o_proj" else "mlp"
    return f"model.layers.{layer}.{part}.{leaf}"


def _group(layer: int) -> str:
    return f"model.layers.{layer}.mlp"


def _all_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _batches(tokens: torch.Tensor) -> list[torch.Tensor]:
    return list(tokens.split(BATCH))


def _expected_dataflow(model: nn.Module, norms: dict, scorer: str, gamma: float, theta: float):
    """wpr / mpr on the dataflow view of a Llama, layer by layer.

    The residual stream into layer l's FFN is written by o_proj of layers 0..l (their
    normalised a_out) and by down_proj of layers 0..l-1 (their propagated exit scores); the
    embedding is no Linear. gate_proj and up_proj are both in-edges of a neuron (the mean of
    their two propagations); the neuron's own activation is down_proj's input norm.
    (Dropping the earlier o_proj / down_proj writers moves layer 1-2 scores by ~5e-3.)
    """
    a_in = {k: v[0] for k, v in norms.items()}
    a_out = {k: v[1] for k, v in norms.items()}
    groups, outputs, exits = {}, {}, []
    for layer in range(N_LAYERS):
        writers = [_normalize(a_out[_name(j, "o_proj")]) for j in range(layer + 1)] + exits
        r = _normalize(np.sum(writers, axis=0))
        mlp = _mlp(model, layer)
        w_gate, w_up, w_down = _w(mlp.gate_proj), _w(mlp.up_proj), _w(mlp.down_proj)
        mid_act = _normalize(a_in[_name(layer, "down_proj")])
        a_down = _normalize(a_out[_name(layer, "down_proj")])
        if scorer == "wpr":
            into = (_transition(w_gate, theta) @ r + _transition(w_up, theta) @ r) / 2
            mid = _normalize(gamma * into + (1 - gamma) * mid_act)
            exit_ = _normalize(gamma * (_transition(w_down, theta) @ mid) + (1 - gamma) * a_down)
        else:  # mpr, no z-importance
            into = (np.abs(w_gate) @ r + np.abs(w_up) @ r) / 2
            mid = _normalize(into * mid_act)
            exit_ = _normalize((np.abs(w_down) @ mid) * a_down)
        groups[_group(layer)], outputs[_group(layer)] = mid, exit_
        exits.append(exit_)
    return groups, outputs


def _expected_hits(model: nn.Module, norms: dict, gamma: float):
    """authority = a_in(down); hub = |W_down|^T h, h = (1-gamma) uniform + gamma normalize(downstream)."""
    groups, outputs = {}, {}
    for layer in range(N_LAYERS):
        w_down = _w(_mlp(model, layer).down_proj)
        d = w_down.shape[0]
        h = np.full(d, 1.0 / d)
        if layer + 1 < N_LAYERS and gamma > 0:
            nxt = _mlp(model, layer + 1)
            a_next = _normalize(norms[_name(layer + 1, "down_proj")][0])
            downstream = np.abs(_w(nxt.gate_proj)).T @ a_next + np.abs(_w(nxt.up_proj)).T @ a_next
            h = (1 - gamma) * h + gamma * _normalize(downstream)
        authority = _normalize(norms[_name(layer, "down_proj")][0])
        hub = np.abs(w_down).T @ h
        groups[_group(layer)] = _normalize(authority * hub)
        outputs[_group(layer)] = _normalize(norms[_name(layer, "down_proj")][1])
    return groups, outputs


def _as_norms(norms: dict) -> llmrank.ActivationNorms:
    out = llmrank.ActivationNorms()
    for name, (a_in, a_out) in norms.items():
        out.a_in[name] = torch.from_numpy(a_in)
        out.a_out[name] = torch.from_numpy(a_out)
    return out


def _assert_close(actual: torch.Tensor, expected: np.ndarray, rtol: float, what: str) -> None:
    got = actual.detach().double().numpy()
    assert got.shape == expected.shape, what
    err = float(np.max(np.abs(got - expected) / np.abs(expected)))
    assert err <= rtol, f"{what}: max relative error {err:.3e} > {rtol:.0e}"


def _assert_scores(scores: llmrank.Scores, groups: dict, outputs: dict, rtol: float) -> None:
    assert sorted(scores.groups) == sorted(groups)
    assert sorted(scores.outputs) == sorted(outputs)
    for name in groups:
        _assert_close(scores.groups[name], groups[name], rtol, f"groups[{name}]")
        _assert_close(scores.outputs[name], outputs[name], rtol, f"outputs[{name}]")


def _expected_kept(scores: np.ndarray, sparsity: float) -> np.ndarray:
    keep = len(scores) - round(sparsity * len(scores))
    return np.sort(np.argsort(-scores, kind="stable")[:keep])


def _down_inputs(model: nn.Module, tokens: torch.Tensor) -> dict[int, np.ndarray]:
    """Every down_proj's input rows (tokens x width) on ``tokens``, as float64."""
    rows: dict[int, list[np.ndarray]] = {i: [] for i in range(N_LAYERS)}
    handles = []
    for i in range(N_LAYERS):
        def hook(_m, args, _out, i=i):
            x = args[0].detach().double().numpy()
            rows[i].append(x.reshape(-1, x.shape[-1]))
        handles.append(_mlp(model, i).down_proj.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in _batches(tokens):
                model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: np.concatenate(r) for i, r in rows.items()}


@pytest.fixture(scope="module")
def refit_tokens() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, 128, (16, 16), generator=gen)


@pytest.fixture(scope="module")
def calib_norms(tiny_llama, norms_of) -> dict:
    return norms_of(tiny_llama.model, _all_linears(tiny_llama.model), _batches(tiny_llama.calib))


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize("gamma,theta", [(0.5, 0.5), (0.8, 0.3), (0.0, 0.5)])
def test_dataflow_wpr_formula(tiny_llama, calib_norms, gamma, theta):
    got = llmrank.score(tiny_llama.model, tiny_llama.ir, _as_norms(calib_norms),
                        llmrank.ScoreConfig(scorer="wpr", representation="dataflow", gamma=gamma, theta=theta))
    _assert_scores(got, *_expected_dataflow(tiny_llama.model, calib_norms, "wpr", gamma, theta), rtol=1e-10)


def test_dataflow_mpr_formula(tiny_llama, calib_norms):
    got = llmrank.score(tiny_llama.model, tiny_llama.ir, _as_norms(calib_norms),
                        llmrank.ScoreConfig(scorer="mpr", representation="dataflow"))
    _assert_scores(got, *_expected_dataflow(tiny_llama.model, calib_norms, "mpr", 0.5, 0.5), rtol=1e-10)


@pytest.mark.parametrize("gamma", [0.5, 0.0])
def test_hits_formula(tiny_llama, calib_norms, gamma):
    got = llmrank.score(tiny_llama.model, tiny_llama.ir, _as_norms(calib_norms), llmrank.ScoreConfig(scorer="hits", gamma=gamma))
    _assert_scores(got, *_expected_hits(tiny_llama.model, calib_norms, gamma), rtol=1e-10)


def test_prune_defaults_are_dataflow_wpr_half_half(tiny_llama, calib_norms, state_bytes_of):
    """End to end with every default: calibration, scores and the local selection."""
    before = state_bytes_of(tiny_llama.model)
    result = llmrank.prune(tiny_llama.model, tiny_llama.calib, sparsity=0.25, progress=False)
    assert state_bytes_of(tiny_llama.model) == before
    groups, outputs = _expected_dataflow(tiny_llama.model, calib_norms, "wpr", 0.5, 0.5)
    _assert_scores(result.scores, groups, outputs, rtol=1e-6)  # norms are stored in float32
    for name, expected in groups.items():
        np.testing.assert_array_equal(result.kept[name].numpy(), _expected_kept(expected, 0.25))


@pytest.mark.parametrize("scorer,gamma", [("mpr", 0.5), ("hits", 0.5), ("hits", 0.0)])
def test_prune_other_scorers_end_to_end(tiny_llama, calib_norms, scorer, gamma):
    result = llmrank.prune(tiny_llama.model, tiny_llama.calib, sparsity=0.25, scorer=scorer, representation="dataflow",
                           gamma=gamma, theta=0.5, progress=False)
    if scorer == "hits":
        expected = _expected_hits(tiny_llama.model, calib_norms, gamma)
    else:
        expected = _expected_dataflow(tiny_llama.model, calib_norms, scorer, gamma, 0.5)
    _assert_scores(result.scores, *expected, rtol=1e-6)


# --------------------------------------------------------------------------- compensation


def _expected_refit(x: np.ndarray, w: np.ndarray, keep: np.ndarray, method: str, ridge: float = 1e-3):
    """(W', b') from the dense down_proj inputs x (tokens x width) and its weight w (b = 0).

    lstsq:      W' = W G[:, K] (G[K, K] + lambda I)^-1, G = X^T X / n, lambda = ridge * mean diag G[K, K]
    lstsq+bias: the same with C = G - mu mu^T in place of G, and b' = W mu - W' mu_K
    bias:       W' = W[:, K], b' = W[:, R] mu_R
    """
    mu = x.mean(axis=0)
    if method == "bias":
        removed = np.setdiff1d(np.arange(w.shape[1]), keep)
        return w[:, keep], w[:, removed] @ mu[removed]
    a = x.T @ x / x.shape[0]
    if method == "lstsq+bias":
        a = a - np.outer(mu, mu)
    a_kk = a[np.ix_(keep, keep)]
    lam = ridge * np.mean(np.diag(a_kk))
    w_new = w @ a[:, keep] @ np.linalg.inv(a_kk + lam * np.eye(len(keep)))
    return w_new, (w @ mu - w_new @ mu[keep] if method == "lstsq+bias" else None)


@pytest.mark.parametrize("method", ["lstsq", "lstsq+bias", "bias"])
def test_compensation_closed_form(tiny_llama, refit_tokens, method, state_bytes_of):
    """The slim down_proj equals the closed form from the DENSE model's inputs on the refit tokens.

    llmrank solves in float64 and stores float32: measured errors ~2e-7 of max|W'|.
    """
    dense = tiny_llama.model
    before = state_bytes_of(dense)
    result = llmrank.prune(dense, tiny_llama.calib, sparsity=0.25, compensation=method, compensation_data=refit_tokens, progress=False)
    assert state_bytes_of(dense) == before
    xs = _down_inputs(dense, refit_tokens)
    assert xs[0].shape[0] == refit_tokens.numel()
    for layer in range(N_LAYERS):
        keep = result.kept[_group(layer)].numpy()
        assert len(keep) == 48
        w_new, b_new = _expected_refit(xs[layer], _w(_mlp(dense, layer).down_proj), keep, method)
        down = _mlp(result.model, layer).down_proj
        got_w = down.weight.detach().double().numpy()
        assert got_w.shape == w_new.shape == (32, 48)
        w_err = np.abs(got_w - w_new).max() / np.abs(w_new).max()
        assert w_err <= 1e-6, f"layer {layer}: weight off by {w_err:.2e} of max|W'|"
        if b_new is None:
            assert down.bias is None
        else:
            assert down.bias is not None, f"layer {layer}: {method} must add a bias"
            b_err = np.abs(down.bias.detach().double().numpy() - b_new).max() / np.abs(b_new).max()
            assert b_err <= 1e-6, f"layer {layer}: bias off by {b_err:.2e} of max|b'|"



def test_lstsq_with_nothing_removed_changes_nothing(tiny_llama, refit_tokens):
    dense = tiny_llama.model
    result = llmrank.prune(dense, tiny_llama.calib, sparsity=0.0, compensation="lstsq", compensation_data=refit_tokens, progress=False)
    assert all(len(k) == 64 for k in result.kept.values())
    slim = result.model.state_dict()
    for name, value in dense.state_dict().items():
        assert name in slim, name
        assert torch.equal(slim[name], value), f"{name} changed"
