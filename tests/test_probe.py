"""The loss probe of allocation='loss': hooked refits equal the pruned model, the measured
increase is the loss difference computed by hand, and the allocation follows the measurement."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

import llmrank
from llmrank.ir.errors import CalibrationError, ConfigError, InputError
from llmrank.passes.allocate import Curve, loss_scaled_costs
from llmrank.passes.compensate import plan_refit
from llmrank.passes.config import PruneConfig
from llmrank.passes.pipeline import Analyze, Calibrate, Pipeline, Score, Trace
from llmrank.passes.probe import group_loss_increases, mean_next_token_loss, probe_sequences, refits_swapped_in


@pytest.fixture(scope="module")
def calibrated(llama_factory):
    model = llama_factory(intermediate_size=48)
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    config = PruneConfig(sparsity=0.4, compensation="lstsq")
    state = Pipeline([Trace(), Analyze(), Calibrate(), Score()]).run(model, config, batches=list(calib.split(4)))
    return model, calib, state


def test_hooked_refits_compute_the_pruned_model(calibrated):
    model, calib, state = calibrated
    result = llmrank.prune(model, list(calib.split(4)), sparsity=0.4, compensation="lstsq", progress=False)
    kept = {g.name: result.kept[g.name] for g in state.ir.groups}
    refits = plan_refit(model, state.ir, kept, state.stats.moments)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense = model(calib[:2]).logits
    with torch.no_grad(), refits_swapped_in(model, state.ir, refits):
        hooked = model(calib[:2]).logits
    torch.testing.assert_close(hooked, result.model(calib[:2]).logits, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing written
    with torch.no_grad():  # and the hooks are gone
        assert torch.equal(model(calib[:2]).logits, dense)


def test_loss_increase_is_the_cut_models_loss_minus_the_dense_loss(calibrated):
    model, calib, state = calibrated
    group = state.ir.groups[1]
    keep = torch.arange(0, group.width, 2)
    increases = group_loss_increases(model, state.ir, {group.name: keep}, state.stats.moments, calib[:3])
    masked = copy.deepcopy(model)
    refit = plan_refit(model, state.ir, {group.name: keep}, state.stats.moments)
    with torch.no_grad():
        for r in refit.values():  # write the refit into the copy by hand: dropped columns zero, kept ones refitted
            w = masked.get_parameter(state.ir.linears[r.linear].weight)
            w.zero_()
            w[:, r.columns] = r.weight.to(w.dtype)
        by_hand = []
        for m in (masked, model):
            logits = m(calib[:3]).logits
            by_hand.append(float(F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), calib[:3, 1:].flatten())))
    assert increases[group.name] == pytest.approx(by_hand[0] - by_hand[1], rel=1e-4, abs=1e-7)
    assert mean_next_token_loss(model, calib[:3]) == pytest.approx(by_hand[1], rel=1e-9)


def test_costs_are_curves_scaled_to_the_measured_increase():
    curve = Curve(4, torch.tensor([3, 1, 0, 2]), torch.tensor([0.5, 1.0, 2.5, 4.5, 8.5], dtype=torch.float64), 10.0)
    costs = loss_scaled_costs({"g": curve, "h": curve}, {"g": 2, "h": 2}, {"g": 0.4})
    assert costs["g"] == pytest.approx({4: 0.0, 3: 0.1, 2: 0.4, 1: 0.8, 0: 1.6})
    assert costs["h"] == {k: 0.0 for k in range(5)}  # not measured: free
    assert loss_scaled_costs({"g": curve}, {"g": 2}, {"g": -0.3})["g"][0] == 0.0  # a cut that helped costs nothing


def test_loss_allocation_gives_the_costlier_group_more_width(calibrated):
    """A probe that says one group hurts 100x more: that group keeps more than the uniform width."""
    from llmrank.passes.allocate import error_select

    model, _, state = calibrated
    names = [g.name for g in state.ir.groups]
    probe = lambda kept: {n: (100.0 if n == names[0] else 1.0) for n in kept}  # noqa: E731
    kept, _ = error_select(model, state.ir, state.scores.groups, state.stats.moments, 0.4, allocation="loss",
                           selection="refit", loss_probe=probe)
    uniform = 48 - round(0.4 * 48)
    assert len(kept[names[0]]) > uniform and all(len(kept[n]) <= uniform + 1 for n in names[1:])
    assert abs(sum(len(k) for k in kept.values()) - uniform * len(names)) <= 1
    with pytest.raises(InputError, match="loss_probe"):
        error_select(model, state.ir, state.scores.groups, state.stats.moments, 0.4, allocation="loss")


@pytest.mark.slow
def test_pipeline_with_loss_allocation_verifies(calibrated):
    model, calib, _ = calibrated
    result = llmrank.prune(model, list(calib.split(4)), sparsity=0.4, compensation="lstsq", allocation="loss",
                           selection="refit", probe_samples=3, progress=False)
    assert result.verification.ok
    widths = [len(k) for k in result.kept.values()]
    assert abs(sum(widths) - len(widths) * (48 - round(0.4 * 48))) <= 1


def test_probe_inputs_are_checked(calibrated):
    model, calib, state = calibrated
    with pytest.raises(CalibrationError, match="token ids"):
        probe_sequences([torch.randn(2, 4)], 2)
    with pytest.raises(CalibrationError, match="token ids"):
        group_loss_increases(model, state.ir, {}, state.stats.moments, torch.randn(2, 4))
    assert probe_sequences(list(calib.split(4)), 5).shape == (5, 32)
    with pytest.raises(ConfigError, match="probe_samples"):
        PruneConfig(compensation="lstsq", allocation="loss", probe_samples=0)


def test_loss_allocation_refuses_an_exported_program():
    from torch import nn

    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    ep = torch.export.export(mlp, (torch.randn(3, 8),))
    with pytest.raises(ConfigError, match="exported program route"):
        llmrank.prune_program(ep, [(torch.randn(3, 8),)], compensation="lstsq", allocation="loss")
