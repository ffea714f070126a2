"""Compensation passes: exact on toy layers where the right answer is known in closed form."""

from __future__ import annotations

import torch
from torch import nn

import llmrank
from llmrank.passes.compensate import collect_input_stats, compensate


def _pipeline(model: nn.Module, x: torch.Tensor, sparsity: float, scorer: str = "l1"):
    ir = llmrank.analyze(llmrank.trace(model, (x[:4],)))
    scores = llmrank.score(model, ir, None, llmrank.ScoreConfig(scorer=scorer, seed=3))
    kept = llmrank.select(ir, scores.groups, sparsity)
    return ir, kept


def test_lstsq_refit_reproduces_a_linear_map_when_dropped_channels_are_redundant():
    torch.manual_seed(0)
    # x = P z lives in a 4-dim subspace of R^8, so after dropping 4 of the 8 channels the kept
    # ones still determine the dropped ones and the refit must reproduce W x exactly.
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Linear(8, 3)).double()
    x = torch.randn(256, 4, dtype=torch.float64)
    ir, kept = _pipeline(model, x, 0.5)
    slim = llmrank.shrink(model, ir, kept)
    stats = collect_input_stats(model, ir, list(x.split(64)), progress=False)
    compensate(slim, model, ir, kept, stats, method="lstsq", ridge=0.0)
    assert slim[1].in_features == 4
    with torch.no_grad():
        assert torch.allclose(slim(x), model(x), atol=1e-5)  # Gram products are accumulated from fp32
        # without compensation the cut is visibly wrong
        assert (llmrank.shrink(model, ir, kept)(x) - model(x)).abs().max() > 1e-2


def test_lstsq_equals_independent_normal_equations():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 4, bias=False))
    x = torch.randn(300, 5)
    ir, kept = _pipeline(model, x, 0.3)
    slim = llmrank.shrink(model, ir, kept)
    stats = collect_input_stats(model, ir, list(x.split(100)), progress=False)
    compensate(slim, model, ir, kept, stats, method="lstsq", ridge=0.0)
    with torch.no_grad():
        h = torch.relu(model[0](x)).double()
    k = kept[ir.groups[0].name]
    w = model[2].weight.double()
    # min ||h_K W'^T - h W^T||: lstsq on the data itself, not on accumulated moments
    expected = torch.linalg.lstsq(h[:, k], h @ w.T).solution.T
    assert torch.allclose(slim[2].weight.double(), expected, atol=1e-4)


def test_bias_compensation_restores_the_mean_output():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5, bias=False))
    x = torch.randn(500, 6)
    ir, kept = _pipeline(model, x, 0.5)
    slim = llmrank.shrink(model, ir, kept)
    stats = collect_input_stats(model, ir, list(x.split(125)), second_moment=False, progress=False)
    compensate(slim, model, ir, kept, stats, method="bias")
    with torch.no_grad():
        h = torch.relu(model[0](x))
        removed = torch.tensor([i for i in range(12) if i not in set(kept[ir.groups[0].name].tolist())])
        shift = model[2].weight[:, removed] @ h[:, removed].mean(0)
        assert slim[2].bias is not None  # a bias was added where the layer had none
        assert torch.allclose(slim[2].bias, shift, atol=1e-5)
        assert torch.allclose(slim(x).mean(0), model(x).mean(0), atol=1e-5)


def test_compensated_prune_keeps_shapes_and_reports_it():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(cfg).eval()
    calib = torch.randint(0, 128, (8, 16))
    plain = llmrank.prune(model, calib, sparsity=0.25, progress=False)
    fixed = llmrank.prune(model, calib, sparsity=0.25, compensation="lstsq", progress=False)
    assert fixed.config["compensation"] == "lstsq"
    assert {k: v.shape for k, v in fixed.model.state_dict().items()} == {k: v.shape for k, v in plain.model.state_dict().items()}
    with torch.no_grad():
        dense = model(calib).logits
        err_plain = (plain.model(calib).logits - dense).pow(2).mean()
        err_fixed = (fixed.model(calib).logits - dense).pow(2).mean()
    assert err_fixed < err_plain


def test_compensation_data_feeds_the_refit_and_not_the_scores():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(cfg).eval()
    calib, refit = torch.randint(0, 128, (8, 16)), torch.randint(0, 128, (24, 16))
    res = llmrank.prune(model, calib, sparsity=0.25, compensation="lstsq", compensation_data=refit, progress=False)
    same_scores = llmrank.prune(model, calib, sparsity=0.25, progress=False)
    assert all(torch.equal(res.kept[k], same_scores.kept[k]) for k in res.kept)
    assert res.config["compensation_tokens"] == refit.numel()
    # by hand: the same cut, refitted from statistics of `refit` only
    stats = collect_input_stats(model, res.ir, list(refit.split(4)), progress=False)
    expect = compensate(llmrank.shrink(model, res.ir, res.kept), model, res.ir, res.kept, stats)
    with torch.no_grad():
        assert torch.allclose(res.model(calib).logits, expect(calib).logits, atol=1e-5)
