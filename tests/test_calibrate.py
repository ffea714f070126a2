"""The calibration accumulator: one walk over the data, two taps (hooks, FX interpreter), same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.export import Dim

import llmrank
from llmrank.ir.trace import TensorOutput
from llmrank.passes.calibrate import Accumulator, Plan, collect, collect_program
from llmrank.passes.compensate import consumer_linears
from llmrank.passes.program import program_traced


def _forward_counter(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def test_scoring_batches_that_prefix_the_refit_sample_share_one_walk(tiny_llama):
    scoring = list(tiny_llama.calib[:4].split(2))
    refit = list(tiny_llama.calib.split(2))
    plan = Plan.build(scoring, refit, norms=True, moments=True)
    assert [(s.norms, s.moments) for s in plan.steps] == [(True, True), (True, True), (False, True)]
    separate = Plan.build(scoring, list(tiny_llama.calib.flip(0).split(2)), norms=True, moments=True)
    assert len(separate.steps) == 5  # not a prefix: two walks

    ir = tiny_llama.ir
    calls, handle = _forward_counter(tiny_llama.model)
    try:
        stats = collect(tiny_llama.model, plan, Accumulator(ir.calibration_linears(), consumer_linears(ir)))
    finally:
        handle.remove()
    assert len(calls) == 3  # one forward per refit batch, nothing more
    alone = llmrank.calibrate(tiny_llama.model, ir, scoring, linears=ir.calibration_linears(), progress=False)
    assert stats.norms.batches == 2 and stats.norms.tokens == 4 * 16
    for name in alone.a_in:
        assert torch.equal(stats.norms.a_in[name], alone.a_in[name])
        assert torch.equal(stats.norms.a_out[name], alone.a_out[name])
    assert stats.refit_tokens == 6 * 16


def test_moments_equal_an_independent_sum_over_tokens(tiny_llama):
    ir = tiny_llama.ir
    down = "model.layers.1.mlp.down_proj"
    seen = []
    handle = tiny_llama.model.get_submodule(down).register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach().double()))
    try:
        with torch.no_grad():
            tiny_llama.model(input_ids=tiny_llama.calib, use_cache=False)
    finally:
        handle.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1]).numpy()
    plan = Plan.build(list(tiny_llama.calib.split(4)), None, norms=False, moments=True)
    stats = collect(tiny_llama.model, plan, Accumulator((), consumer_linears(ir)))
    got = stats.moments[down]
    assert got.count == x.shape[0]
    np.testing.assert_allclose(got.total.numpy(), x.sum(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.gram.numpy(), x.T @ x, rtol=1e-4, atol=1e-5)


def test_hook_and_interpreter_taps_agree(tiny_llama):
    model = tiny_llama.model
    ep = torch.export.export(TensorOutput(model), (tiny_llama.calib[:2],), strict=False,
                             dynamic_shapes=({0: Dim("batch"), 1: Dim("seq", max=64)},))
    module = ep.module()
    ir_program = llmrank.analyze(program_traced(ep, module))
    batches = list(tiny_llama.calib.split(4))
    by_hooks = collect(model, Plan.build(batches, None, norms=True, moments=True),
                       Accumulator(tiny_llama.ir.calibration_linears(), consumer_linears(tiny_llama.ir)))
    by_graph = collect_program(module, ir_program, Plan.build([(b,) for b in batches], None, norms=True, moments=True),
                               Accumulator(ir_program.calibration_linears(), consumer_linears(ir_program)))
    assert by_graph.norms.batches == by_hooks.norms.batches and by_graph.norms.tokens == by_hooks.norms.tokens
    for name, value in by_hooks.norms.a_in.items():
        torch.testing.assert_close(by_graph.norms.a_in[f"model.{name}"], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(by_graph.norms.a_out[f"model.{name}"], by_hooks.norms.a_out[name], rtol=1e-5, atol=1e-6)
    for name, value in by_hooks.moments.items():
        other = by_graph.moments[f"model.{name}"]
        assert other.count == value.count
        torch.testing.assert_close(other.gram, value.gram, rtol=1e-5, atol=1e-6)


def test_calibration_leaves_training_mode_and_weights_alone(tiny_llama, state_bytes_of):
    import copy

    model = copy.deepcopy(tiny_llama.model)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5  # dropout that only training mode applies
    model.train()
    before = state_bytes_of(model)
    in_training = llmrank.prune(model, tiny_llama.calib, sparsity=0.3, compensation="lstsq", progress=False)
    assert model.training and state_bytes_of(model) == before
    in_eval = llmrank.prune(copy.deepcopy(model).eval(), tiny_llama.calib, sparsity=0.3, compensation="lstsq", progress=False)
    for name in in_training.kept:
        assert torch.equal(in_training.kept[name], in_eval.kept[name])
    for name, param in in_eval.model.named_parameters():  # the refit saw no dropout either
        assert torch.equal(in_training.model.get_parameter(name), param), name


@pytest.mark.parametrize("inplace", [False, True])
def test_inplace_refit_reads_the_dense_weights(tiny_llama, inplace):
    """prune(inplace=True, compensation='lstsq') refits from the dense weights, like a copy does (issue 10)."""
    import copy

    reference = llmrank.prune(tiny_llama.model, tiny_llama.calib, sparsity=0.3, compensation="lstsq", progress=False)
    model = copy.deepcopy(tiny_llama.model)
    result = llmrank.prune(model, tiny_llama.calib, sparsity=0.3, compensation="lstsq", inplace=inplace, progress=False)
    assert (result.model is model) == inplace
    for name, param in reference.model.named_parameters():
        torch.testing.assert_close(result.model.get_parameter(name), param, rtol=0, atol=0)


def test_forwards_stop_after_the_last_watched_layer(tiny_llama, norms_of):
    """After the first (whole) batch, the LM head never runs: it feeds no statistic."""
    model, ir = tiny_llama.model, tiny_llama.ir
    batches = list(tiny_llama.calib.split(2))
    calls, handle = [], model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        norms = llmrank.calibrate(model, ir, batches, linears=ir.calibration_linears(), progress=False)
    finally:
        handle.remove()
    assert "lm_head" not in ir.calibration_linears() and len(calls) == 1
    reference = norms_of(model, ir.calibration_linears(), batches)  # whole forwards, independent hooks
    for name, (a_in, a_out) in reference.items():
        np.testing.assert_allclose(norms.a_in[name].numpy(), a_in, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(norms.a_out[name].numpy(), a_out, rtol=1e-5, atol=1e-7)


def test_a_layer_called_twice_keeps_whole_forwards():
    """Shared weights: the same Linear runs twice per forward, so no forward may end early."""
    from torch import nn

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.up, self.down, self.head = nn.Linear(4, 8), nn.Linear(8, 4), nn.Linear(4, 3)

        def forward(self, x):
            x = x + self.down(torch.relu(self.up(x)))
            x = x + self.down(torch.relu(self.up(x)))
            return self.head(x)

    model = Twice().eval()
    x = torch.randn(6, 4)
    acc = Accumulator(["up", "down"], ())
    head_calls = []
    handle = model.head.register_forward_hook(lambda *_: head_calls.append(1))
    try:
        stats = collect(model, Plan.build(list(x.split(2)), None, norms=True, moments=False), acc)
    finally:
        handle.remove()
    assert len(head_calls) == 3 and stats.norms.batches == 3


@pytest.mark.parametrize("width", [5, 768, 1000, 1536])
def test_symmetric_gram_equals_the_full_product(width):
    from llmrank.passes.calibrate import symmetric_gram

    x = torch.randn(64, width, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
    np.testing.assert_allclose(symmetric_gram(x).numpy(), (x.T @ x).numpy(), rtol=1e-12, atol=1e-10)
