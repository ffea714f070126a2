"""The taylor scorer against a hand computation with torch.autograd on a tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

import llmrank
from llmrank.ir.errors import ConfigError
from llmrank.passes.config import PruneConfig
from llmrank.passes.blocks.driver import check_config


def reference_taylor(model, calib: torch.Tensor, elementwise: bool = False) -> dict[int, torch.Tensor]:
    """Per layer: |sum_j Wg*Gg[k,j] + sum_j Wu*Gu[k,j] + sum_i Wd*Gd[i,k]|, with G the gradient
    of the mean over sequences of each sequence's mean next-token cross-entropy
    (``elementwise``: the same sums of |W*G| per weight)."""
    m = copy.deepcopy(model)
    mlps = [layer.mlp for layer in m.model.layers]
    params = [p for mlp in mlps for p in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)]
    losses = []
    for row in calib:
        logits = m(input_ids=row[None], use_cache=False).logits[0]
        losses.append(F.cross_entropy(logits[:-1], row[1:]))
    grads = torch.autograd.grad(torch.stack(losses).mean(), params)
    out = {}
    for i in range(len(mlps)):
        (wg, wu, wd), (gg, gu, gd) = params[3 * i:3 * i + 3], grads[3 * i:3 * i + 3]
        if elementwise:
            s = ((wg * gg).abs().sum(1) + (wu * gu).abs().sum(1) + (wd * gd).abs().sum(0)).double()
        else:
            s = ((wg * gg).sum(1) + (wu * gu).sum(1) + (wd * gd).sum(0)).double().abs()
        out[i] = s / s.sum()
    return out


def test_taylor_matches_autograd_by_hand(tiny_llama, state_bytes_of):
    model = tiny_llama.fresh()
    before = state_bytes_of(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    result = llmrank.prune(model, tiny_llama.calib, scorer="taylor", sparsity=0.25, progress=False)
    ref = reference_taylor(tiny_llama.model, tiny_llama.calib)
    assert len(result.scores.groups) == len(ref)
    for i, (name, got) in enumerate(result.scores.groups.items()):
        torch.testing.assert_close(got, ref[i], rtol=1e-4, atol=1e-7, msg=name)
        keep = torch.sort(ref[i], descending=True, stable=True).indices[:48]
        assert set(result.kept[name].tolist()) == set(keep.tolist())
    assert result.verification.ok
    # the caller's model is unchanged: weights, requires_grad flags, no gradients left behind
    assert state_bytes_of(model) == before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_taylor_element_matches_autograd_by_hand(tiny_llama):
    result = llmrank.prune(tiny_llama.fresh(), tiny_llama.calib, scorer="taylor-element", sparsity=0.25, progress=False)
    ref = reference_taylor(tiny_llama.model, tiny_llama.calib, elementwise=True)
    signed = reference_taylor(tiny_llama.model, tiny_llama.calib)
    for i, (name, got) in enumerate(result.scores.groups.items()):
        torch.testing.assert_close(got, ref[i], rtol=1e-4, atol=1e-7, msg=name)
        assert not torch.allclose(ref[i], signed[i])  # the two criteria differ
    assert result.verification.ok
    with pytest.raises(ConfigError, match="whole model"):
        check_config(PruneConfig(scorer="taylor-element"))


def test_taylor_batching_does_not_change_scores(tiny_llama):
    a = llmrank.prune(tiny_llama.fresh(), tiny_llama.calib, scorer="taylor", batch_size=4, progress=False)
    b = llmrank.prune(tiny_llama.fresh(), tiny_llama.calib, scorer="taylor", batch_size=1, progress=False)
    for name in a.scores.groups:
        torch.testing.assert_close(a.scores.groups[name], b.scores.groups[name], rtol=1e-5, atol=1e-9)


def test_taylor_needs_calibration_and_refuses_layerwise(tiny_llama):
    with pytest.raises(llmrank.ir.errors.CalibrationError, match="taylor"):
        llmrank.prune(tiny_llama.fresh(), None, scorer="taylor", progress=False)
    with pytest.raises(ConfigError, match="whole model"):
        check_config(PruneConfig(scorer="taylor"))


def test_taylor_refuses_an_exported_program():
    from torch import nn

    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    ep = torch.export.export(mlp, (torch.randn(3, 8),))
    with pytest.raises(ConfigError, match="exported program"):
        llmrank.prune_program(ep, [(torch.randn(3, 8),)], scorer="taylor")
