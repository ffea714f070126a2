"""One backward walk for the taylor scorers and allocation 'fisher' (issue 20).

The references are the two walks the merged one replaced, kept here as they were: the merged
walk must give bit for bit what each gave alone, together or apart, through the Gradients pass
as through the functions, and Calibrate no longer back-propagates.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from llmrank.ir.errors import ConfigError
from llmrank.passes import scorers as S
from llmrank.passes.compensate import consumer_linears
from llmrank.passes.config import PruneConfig
from llmrank.passes.gradients import FirstOrder, backward_walk, first_order, output_sensitivity
from llmrank.passes.pipeline import Analyze, Calibrate, Gradients, Pipeline, Trace


def old_first_order(model, ir, batches, *, elementwise=False):
    """The taylor walk as it was: its own loop, loss and restore."""
    keys = sorted({(s.param, s.axis) for g in ir.groups for s in g.slots})
    sequences = [ids for batch in batches for ids in batch.split(1)]
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    names = {name for name, _ in keys}
    out = {}
    try:
        for n, p in params.items():
            p.requires_grad_(n in names)
            p.grad = None
        with torch.enable_grad():
            for ids in sequences:
                logits = model(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
                (loss / len(sequences)).backward()
                if elementwise:
                    continue
                for name, axis in keys:
                    part = S.first_order(params[name], params[name].grad, axis)
                    out[(name, axis)] = part if (name, axis) not in out else out[(name, axis)] + part
                for n in names:
                    params[n].grad = None
            if elementwise:
                for name, axis in keys:
                    out[(name, axis)] = S.first_order(params[name], params[name].grad, axis, absolute=True)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = None
    return out


def old_output_sensitivity(model, names, batches):
    """The fisher walk as it was (passes/sensitivity.py): tensor hooks on the consumers' outputs."""
    names = sorted(set(names))
    sums = {}

    def add(name, value):
        sums[name] = value if name not in sums else sums[name] + value

    def keep_grad(name):
        def record(_m, _args, out):
            if out.requires_grad:
                out.register_hook(lambda g: add(name, g.detach().reshape(-1, g.shape[-1]).double().pow(2).sum(0)))
        return record

    handles = [model.get_submodule(n).register_forward_hook(keep_grad(n)) for n in names]
    handles.append(model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True)))
    flags = {p: p.requires_grad for p in model.parameters()}
    tokens = 0
    try:
        for p in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for batch in batches:
                for ids in batch.split(1):
                    logits = model(input_ids=ids, use_cache=False).logits
                    F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").backward()
                    tokens += ids.numel()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for h in handles:
            h.remove()
    return {n: s / tokens for n, s in sums.items()}


@pytest.fixture(scope="module")
def case(tiny_llama):
    model = tiny_llama.fresh()
    batches = list(tiny_llama.calib.split(4))
    names = consumer_linears(tiny_llama.ir)
    return model, tiny_llama.ir, batches, names


def assert_equal_tables(got, want):
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("kind", ["signed", "absolute"])
def test_the_merged_walk_gives_each_result_bit_for_bit(case, kind, state_bytes_of):
    model, ir, batches, names = case
    before = state_bytes_of(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    walk = backward_walk(model, batches, ir=ir, first_order=kind, sensitivity=names)
    assert walk.first_order.kind == kind
    assert_equal_tables(walk.first_order, old_first_order(model, ir, batches, elementwise=kind == "absolute"))
    assert_equal_tables(walk.sensitivity, old_output_sensitivity(model, names, batches))
    # the model comes back as it was: weights, flags, no gradient left behind
    assert state_bytes_of(model) == before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_each_alone_equals_the_old_walk(case):
    model, ir, batches, names = case
    assert_equal_tables(first_order(model, ir, batches), old_first_order(model, ir, batches))
    assert_equal_tables(first_order(model, ir, batches, elementwise=True), old_first_order(model, ir, batches, elementwise=True))
    assert_equal_tables(output_sensitivity(model, names, batches), old_output_sensitivity(model, names, batches))
    assert backward_walk(model, batches, ir=ir).first_order is None  # nothing asked, nothing run


def test_the_gradients_pass_runs_one_walk_for_both_and_calibrate_none(case):
    model, ir, batches, names = case
    config = PruneConfig(scorer="taylor", allocation="fisher", compensation="lstsq", sparsity=0.25)
    calibrated = Pipeline([Trace(), Analyze(), Calibrate()]).run(model, config, batches=batches)
    assert calibrated.stats.sensitivity == {}  # Calibrate no longer back-propagates
    state = Pipeline([Gradients()]).run(calibrated)
    assert_equal_tables(state.first_order, old_first_order(model, ir, batches))
    assert_equal_tables(state.stats.sensitivity, old_output_sensitivity(model, names, batches))
    assert calibrated.stats.sensitivity == {}  # the pass's input state is not written
    again = Gradients()(state)
    assert not again.modified and again.state.first_order is state.first_order  # what the state holds is reused


def test_first_order_of_the_other_kind_is_recomputed(case):
    """A sweep shares one state between taylor and taylor-element cells: each gets its own sums."""
    model, ir, batches, _ = case
    signed = backward_walk(model, batches, ir=ir, first_order="signed").first_order
    base = Pipeline([Trace(), Analyze(), Calibrate()]).run(model, PruneConfig(scorer="taylor-element"), batches=batches)
    state = Gradients()(base.update(first_order=signed)).state
    assert state.first_order.kind == "absolute"
    assert_equal_tables(state.first_order, old_first_order(model, ir, batches, elementwise=True))
    given = FirstOrder(copy.copy(dict(signed)))  # kind not recorded: the caller's statistics are used as given
    assert Gradients()(base.update(first_order=given)).state.first_order is given


def test_fisher_refuses_a_model_without_logits():
    from torch import nn

    class NoLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(16, 8), nn.Linear(8, 8)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, ids):
            return self.out(self.emb(ids)).sum(-1)

    with pytest.raises(ConfigError, match="allocation 'fisher' needs a causal language model"):
        output_sensitivity(NoLogits(), ["out"], [torch.zeros(1, 4, dtype=torch.long)])
