"""Sequential refit (refit_inputs='pruned') and the loss sensitivities of allocation='fisher',
each against a computation by hand on a tiny random Llama."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import llmrank
from llmrank.ir.errors import ConfigError
from llmrank.passes.compensate import collect_input_stats, plan_refit
from llmrank.passes.config import PruneConfig
from llmrank.passes.gradients import output_sensitivity
from llmrank.passes.sequential import plan_sequential_refit
from llmrank.passes.shrink import mask

RIDGE = 1e-3


def consumer_inputs(model: nn.Module, name: str, batches: list[torch.Tensor]) -> np.ndarray:
    """The input rows of Linear ``name`` over whole forwards of ``model`` (float64 numpy)."""
    rows = []
    handle = model.get_submodule(name).register_forward_hook(lambda _m, a, _o: rows.append(a[0].detach().double().reshape(-1, a[0].shape[-1]).numpy()))
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b, use_cache=False)
    finally:
        handle.remove()
    return np.concatenate(rows)


@pytest.fixture(scope="module")
def tiny(llama_factory):
    model = llama_factory(seed=2)
    ir = llmrank.analyze(llmrank.trace(model))
    gen = torch.Generator().manual_seed(4)
    batches = list(torch.randint(0, 128, (8, 24), generator=gen).split(4))
    kept = {g.name: torch.sort(torch.randperm(g.width, generator=gen)[: g.width // 2]).values for g in ir.groups}
    return model, ir, batches, kept


@pytest.mark.parametrize("method,target", [("lstsq", "dense"), ("lstsq+bias", "dense"), ("lstsq", "self")])
def test_sequential_refit_equals_a_layer_by_layer_fit_by_hand(tiny, state_bytes_of, method, target):
    model, ir, batches, kept = tiny
    before = state_bytes_of(model)
    refits = plan_sequential_refit(model, ir, kept, batches, method=method, ridge=RIDGE, target=target)
    assert state_bytes_of(model) == before  # the dense model is only read
    pruned = mask(model, ir, kept)
    for i, g in enumerate(ir.groups):  # depth order, one group per layer
        name = g.consumers[0].linear
        xd, xp = consumer_inputs(model, name, batches), consumer_inputs(pruned, name, batches)
        cols = kept[g.name].numpy()
        a = xp[:, cols]
        w = model.get_submodule(name).weight.detach().double().numpy()
        if target == "dense":
            y = xd @ w.T
        else:  # the dense weights on the whole input this layer gets from the pruned layers before it
            whole = copy.deepcopy(pruned)
            whole.model.layers[i].mlp = copy.deepcopy(model.model.layers[i].mlp)
            y = consumer_inputs(whole, name, batches) @ w.T
            assert not np.allclose(y, xp @ w.T)  # the cut channels are zero in xp, not in the whole input
        if method == "lstsq+bias":
            a_c, y_c = a - a.mean(0), y - y.mean(0)
        else:
            a_c, y_c = a, y
        t = len(a)
        lam = RIDGE * np.mean(np.diag(a_c.T @ a_c / t))
        coef, *_ = np.linalg.lstsq(np.vstack([a_c, np.sqrt(lam * t) * np.eye(len(cols))]),
                                   np.vstack([y_c, np.zeros((len(cols), w.shape[0]))]), rcond=None)
        got = refits[name]
        assert got.columns.tolist() == cols.tolist()
        np.testing.assert_allclose(got.weight.numpy(), coef.T, rtol=1e-5, atol=1e-7)
        if method == "lstsq+bias":
            np.testing.assert_allclose(got.bias.numpy(), y.mean(0) - coef.T @ a.mean(0), rtol=1e-5, atol=1e-7)
        with torch.no_grad():  # the next layer sees this layer refitted, as the walk did
            layer = pruned.get_submodule(name)
            layer.weight[:, cols] = torch.from_numpy(coef.T).float()
            if got.bias is not None:
                layer.bias = nn.Parameter(got.bias.float())


def test_first_layer_of_the_sequential_refit_is_the_plain_refit(tiny):
    model, ir, batches, kept = tiny
    plain = plan_refit(model, ir, kept, collect_input_stats(model, ir, batches, progress=False), ridge=RIDGE)
    seq = plan_sequential_refit(model, ir, kept, batches, ridge=RIDGE)
    first, later = ir.groups[0].consumers[0].linear, ir.groups[-1].consumers[0].linear
    torch.testing.assert_close(seq[first].weight, plain[first].weight, rtol=1e-6, atol=1e-8)
    assert not torch.allclose(seq[later].weight, plain[later].weight, rtol=1e-3)


@pytest.mark.slow
def test_pipeline_with_sequential_refit_verifies(tiny):
    model, _, batches, _ = tiny
    calib = torch.cat(batches)
    dense = llmrank.prune(model, calib, sparsity=0.5, compensation="lstsq")
    seq = llmrank.prune(model, calib, sparsity=0.5, compensation="lstsq", refit_inputs="pruned")
    assert seq.verification.ok
    for g in dense.kept:
        assert torch.equal(seq.kept[g], dense.kept[g])
    last = sorted({c.linear for g in dense.ir.groups for c in g.consumers})[-1]
    a, b = dense.model.get_submodule(last).weight, seq.model.get_submodule(last).weight
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_loss_sensitivity_equals_the_gradient_of_an_added_zero(tiny):
    model, ir, batches, _ = tiny
    names = sorted({c.linear for g in ir.groups for c in g.consumers})
    got = output_sensitivity(model, names, batches)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # switched back, nothing accumulated
    ref = {n: 0.0 for n in names}
    tokens = 0
    for ids in torch.cat(batches).split(1):
        deltas = {}

        def add_zero(name):
            def hook(_m, _a, out):
                deltas[name] = torch.zeros_like(out, requires_grad=True)
                return out + deltas[name]
            return hook

        handles = [model.get_submodule(n).register_forward_hook(add_zero(n)) for n in names]
        try:
            logits = model(input_ids=ids, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        grads = torch.autograd.grad(loss, [deltas[n] for n in names])
        for n, g in zip(names, grads):
            ref[n] = ref[n] + g.double().pow(2).reshape(-1, g.shape[-1]).sum(0)
        tokens += ids.numel()
    for n in names:
        torch.testing.assert_close(got[n], ref[n] / tokens, rtol=1e-4, atol=1e-12)


def test_options_need_the_least_squares_refit():
    with pytest.raises(ConfigError, match="lstsq"):
        PruneConfig(refit_inputs="pruned", compensation="bias")
    PruneConfig(refit_inputs="pruned", compensation="lstsq", pruner="global")  # widths from pooled scores, refit on pruned inputs
    assert not PruneConfig(refit_inputs="pruned", compensation="lstsq").needs_moments  # it gathers its own
    assert PruneConfig(refit_inputs="pruned", compensation="lstsq", allocation="error").needs_moments
