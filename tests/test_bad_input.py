"""Bad input gives a clear, typed error (or, for dead activations, finite scores), never NaN or a stack trace from deep inside torch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import llmrank
from llmrank import CalibrationError, ConfigError, InputError, TraceError
from llmrank.passes.select import select

X = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


@pytest.fixture(scope="module")
def traced_mlp():
    model = mlp()
    return model, llmrank.trace(model, (X[:4],))


def prune_mlp(traced_mlp, calibration=X, **kwargs):
    model, traced = traced_mlp
    kwargs.setdefault("model", model)
    return llmrank.prune(kwargs.pop("model"), calibration, example_inputs=(X[:4],), traced=traced, progress=False, **kwargs)


# ---------------------------------------------------------------- sparsity


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), float("inf"), -math.inf, "0.3", None])
def test_sparsity_outside_unit_interval(traced_mlp, sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        prune_mlp(traced_mlp, sparsity=sparsity)


def test_sparsity_is_checked_before_any_work():
    # an untraceable, weightless module: the sparsity error must come first
    with pytest.raises(ValueError, match="sparsity"):
        llmrank.prune(nn.Identity(), None, sparsity=2.0, progress=False)


def test_select_checks_sparsity_too(traced_mlp):
    ir = llmrank.analyze(traced_mlp[1])
    with pytest.raises(ValueError, match="sparsity"):
        select(ir, {g.name: torch.ones(g.width) for g in ir.groups}, float("nan"))


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights(traced_mlp, bad):
    model = mlp()
    with torch.no_grad():
        model[2].weight[1, 3] = bad
    with pytest.raises(InputError, match="NaN/Inf") as info:
        prune_mlp(traced_mlp, model=model)
    assert "2.weight" in str(info.value)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------- dead activations


@pytest.mark.parametrize("scorer,kwargs", [
    ("wpr", dict(gamma=0.0)), ("wpr", dict(gamma=0.5)), ("wpr", dict(gamma=1.0, theta=0.0)),
    ("mpr", dict()), ("mpr", dict(z_importance=0.3)), ("activation", dict()), ("wanda", dict()),
])
def test_all_zero_activations_give_finite_scores(traced_mlp, scorer, kwargs):
    model = mlp()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()  # every hidden activation (and so every output) is exactly 0
    r = prune_mlp(traced_mlp, model=model, scorer=scorer, sparsity=0.5, representation="isolated", **kwargs)
    for scores in (*r.scores.groups.values(), *r.scores.outputs.values()):
        assert torch.isfinite(scores).all()
        assert float(scores.sum()) == pytest.approx(1.0)
    assert len(r.kept["0"]) == 8
    assert r.verification.ok


def test_zero_calibration_input(traced_mlp):
    r = prune_mlp(traced_mlp, calibration=torch.zeros(8, 8), scorer="mpr", sparsity=0.25)
    for scores in r.scores.groups.values():
        assert torch.isfinite(scores).all()


@pytest.mark.parametrize("representation", ["isolated", "chained", "dataflow"])
@pytest.mark.parametrize("scorer", ["wpr", "mpr", "wanda", "activation"])
def test_llama_with_dead_embeddings_gives_finite_scores(tiny_llama, representation, scorer):
    model = tiny_llama.fresh()
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()  # every hidden state, so every norm, is 0
    r = llmrank.prune(model, tiny_llama.calib, scorer=scorer, representation=representation, gamma=0.5,
                      sparsity=0.25, traced=tiny_llama.traced, progress=False)
    for name, scores in r.scores.groups.items():
        assert torch.isfinite(scores).all(), name
        assert float(scores.sum()) == pytest.approx(1.0)
    assert r.verification.ok


# ---------------------------------------------------------------- calibration data


@pytest.mark.parametrize("calibration", [torch.empty(0, 16, dtype=torch.long), torch.empty(0, dtype=torch.long), [], iter([])])
def test_empty_calibration(tiny_llama, calibration):
    with pytest.raises(CalibrationError, match="empty"):
        llmrank.prune(tiny_llama.model, calibration, traced=tiny_llama.traced, progress=False)


def test_missing_calibration_for_an_activation_scorer(traced_mlp):
    with pytest.raises(CalibrationError, match="needs calibration data"):
        prune_mlp(traced_mlp, calibration=None, scorer="wpr")
    assert prune_mlp(traced_mlp, calibration=None, scorer="l1").verification.ok  # weight-only scorers need none


def test_empty_batch_inside_a_list(traced_mlp):
    with pytest.raises(CalibrationError, match="non-empty"):
        prune_mlp(traced_mlp, calibration=[X[:4], torch.empty(0, 8)])


def test_calibration_errors_are_value_errors():
    assert issubclass(CalibrationError, ValueError)


def test_text_calibration_needs_a_tokenizer(tiny_llama):
    with pytest.raises(InputError, match="tokenizer"):
        llmrank.prune(tiny_llama.model, "some text", traced=tiny_llama.traced, progress=False)


@pytest.mark.parametrize("calibration,message", [
    (torch.randn(4, 16), "integer token ids"),
    (torch.full((2, 8), 128), r"\[0, 128\)"),
    (torch.full((2, 8), -1), r"\[0, 128\)"),
])
def test_calibration_that_is_not_token_ids(tiny_llama, calibration, message):
    with pytest.raises(CalibrationError, match=message):
        llmrank.prune(tiny_llama.model, calibration, traced=tiny_llama.traced, progress=False)


# ---------------------------------------------------------------- nothing to prune


@pytest.mark.parametrize("model,example", [
    (nn.Linear(8, 4), torch.randn(4, 8)),
    (nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)), torch.randn(4, 8)),
])
def test_no_prunable_group(model, example):
    with pytest.raises(InputError, match="no prunable channel group"):
        llmrank.prune(model, None, scorer="l1", example_inputs=(example,), progress=False)


def test_score_pass_without_groups():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    ir = llmrank.analyze(llmrank.trace(model, (torch.randn(4, 8),)))
    assert ir.groups == [] and list(ir.linears) == ["0", "2"]
    assert "layer_norm" in ir.blocked["2"]  # the reason the channels between them cannot be cut
    with pytest.raises(ValueError, match="no prunable channel group"):
        llmrank.score(model, ir, None, llmrank.ScoreConfig("l1"))


# ---------------------------------------------------------------- unknown options


def test_unknown_scorer_lists_choices(traced_mlp):
    with pytest.raises(ValueError, match="unknown scorer 'pagerank'") as info:
        prune_mlp(traced_mlp, scorer="pagerank")
    for choice in ("wpr", "mpr", "l1", "lp", "activation", "wanda", "random"):
        assert choice in str(info.value)


def test_unknown_representation_lists_choices(traced_mlp):
    with pytest.raises(ValueError, match="unknown representation 'graph'") as info:
        prune_mlp(traced_mlp, representation="graph")
    for choice in ("isolated", "chained", "dataflow"):
        assert choice in str(info.value)


def test_unknown_pruner_lists_choices(traced_mlp):
    with pytest.raises(ValueError, match="unknown pruner 'uniform'") as info:
        prune_mlp(traced_mlp, pruner="uniform")
    assert "local" in str(info.value) and "global" in str(info.value)


def test_unknown_mode_lists_choices(traced_mlp):
    with pytest.raises(ValueError, match="unknown mode 'prune'") as info:
        prune_mlp(traced_mlp, mode="prune")
    for choice in ("shrink", "mask", "mask-paper"):
        assert choice in str(info.value)
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize("kwargs,match", [
    (dict(theta=1.5, gamma=0.5), "theta"), (dict(gamma=-0.5), "gamma"),
    (dict(multiple=0), "multiple"), (dict(min_width=0), "min_width"),
])
def test_out_of_range_parameters(traced_mlp, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune_mlp(traced_mlp, **kwargs)


def test_chained_needs_matching_widths():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    with pytest.raises(ValueError, match="representation='isolated'"):
        llmrank.prune(model, X, scorer="wpr", representation="chained", example_inputs=(X[:4],), progress=False)


# ---------------------------------------------------------------- tracing


def test_non_hf_module_without_example_inputs():
    with pytest.raises(TraceError, match="example_inputs") as info:
        llmrank.prune(mlp(), X, progress=False)
    assert "Sequential" in str(info.value) and "not a Hugging Face model" in str(info.value)
    with pytest.raises(TraceError, match="example_inputs"):
        llmrank.trace(mlp())


def test_untraceable_module_explains():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return self.b(torch.relu(self.a(x)))
            return x

    with pytest.raises(TraceError, match="torch.export failed on DataDependent.*Try: pass example_inputs"):
        llmrank.trace(DataDependent(), (torch.randn(4, 8),))


@pytest.mark.parametrize("calibration,match", [
    (torch.tensor(5), "scalar"), (torch.zeros(2, 3, 4, dtype=torch.long), r"\[N, L\] tensor"),
])
def test_malformed_calibration_tensors_are_refused(tiny_llama, calibration, match):
    with pytest.raises(CalibrationError, match=match):
        llmrank.prune(tiny_llama.model, calibration, progress=False)


def test_a_model_on_the_meta_device_is_refused():
    from llmrank.ir.errors import InputError

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(InputError, match="meta device"):
        llmrank.prune(model, torch.randn(4, 4), example_inputs=(torch.randn(2, 4),), progress=False)
