"""PruneConfig: every option checked, alone and in combination, before any work starts."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import llmrank
from llmrank.cli import build_parser, main, prune_config
from llmrank.ir.errors import ConfigError, VerificationError
from llmrank.passes.config import CLI_DEFAULTS, PruneConfig, cli_options
from llmrank.passes.scorers import ChainLayer, mpr_chain


@pytest.mark.parametrize("options,match", [
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"), (dict(sparsity=float("nan")), "sparsity"),
    (dict(sparsity="0.3"), "sparsity"), (dict(scorer="pagerank"), "unknown scorer"), (dict(representation="x"), "representation"),
    (dict(pruner="greedy"), "pruner"), (dict(theta=1.5), "theta"), (dict(gamma=-0.1), "gamma"), (dict(p=0), "p must"),
    (dict(multiple=0), "multiple"), (dict(multiple=2.5), "multiple"), (dict(min_width=0), "min_width"), (dict(ridge=-1), "ridge"),
    (dict(batch_size=0), "batch_size"), (dict(seed=-1), "seed"), (dict(mode="prune"), "unknown mode"),
    (dict(compensation="ols"), "unknown compensation"), (dict(verify="yes"), "verify"),
])
def test_each_bad_value_is_refused_with_its_name(options, match):
    with pytest.raises(ConfigError, match=match):
        PruneConfig(**options)


@pytest.mark.parametrize("options,match", [
    (dict(mode="mask", compensation="lstsq"), "needs mode 'shrink'"),
    (dict(mode="mask-paper", compensation="bias"), "needs mode 'shrink'"),
    (dict(mode="mask-paper", pruner="global"), "pruner 'local'"),
    (dict(scorer="wpr", z_importance=0.3), "mpr"),
])
def test_bad_combinations_are_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        PruneConfig(**options)


def test_config_is_frozen_and_with_checks_again():
    config = PruneConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sparsity = 0.5  # type: ignore[misc]
    assert config.with_(sparsity=0.5).sparsity == 0.5 and config.sparsity == 0.3
    with pytest.raises(ConfigError, match="unknown option"):
        config.with_(sparsty=0.5)
    with pytest.raises(ConfigError, match="sparsity"):
        config.with_(sparsity=2)


def test_cli_flags_are_generated_from_the_config():
    """Every CLI-exposed option has a flag with the library's default (or the documented CLI one)."""
    from llmrank.presets import preset_fields

    prune_parser = build_parser()._subparsers._group_actions[0].choices["prune"]
    defaults = {a.dest: a.default for a in prune_parser._actions}
    for name, default, meta in cli_options():
        assert name in defaults, f"no --{name} flag"
        library = getattr(PruneConfig(), name)
        # an option a preset sets defaults to None on the parser: prune_config fills it (tests/test_presets.py)
        # and so does --multiple, whose default depends on --gguf (tests/test_gguf.py)
        later = name in preset_fields() or name == "multiple"
        assert defaults[name] == (None if later else CLI_DEFAULTS.get(name, library))
    assert prune_config(prune_parser.parse_args(["m", "--out", "o"])).multiple == PruneConfig().multiple
    assert CLI_DEFAULTS == {"compensation": "lstsq"}


@pytest.mark.parametrize("argv,match", [
    (["--sparsity", "1.2"], "sparsity"),
    (["--mode", "mask"], "needs mode 'shrink'"),  # the default refit with a mask mode
    (["--multiple", "0"], "multiple"),
    (["--min-width", "0"], "min_width"),
    (["--samples", "0"], "--samples"),
    (["--ridge", "-1"], "ridge"),
])
def test_cli_refuses_bad_options_before_loading_anything(argv, match, tmp_path, monkeypatch, capsys):
    import llmrank.workflow as workflow

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(workflow, "load", no_load)
    code = main(["prune", "no-such-model", "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert match in err


def test_cli_refuses_an_unwritable_out_before_loading(tmp_path, monkeypatch, capsys):
    import llmrank.workflow as workflow

    monkeypatch.setattr(workflow, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["prune", "no-such-model", "--out", str(blocker / "out")])
    assert code != 0 and "loaded" not in capsys.readouterr().err


def test_effective_sparsity_and_clamp_notes_are_reported(tiny_llama):
    """--multiple 64 --sparsity 0.9 on width 64 keeps 64: the report says so (issue 14.10)."""
    result = llmrank.prune(tiny_llama.model, tiny_llama.calib, sparsity=0.9, multiple=64, traced=tiny_llama.traced, progress=False)
    assert result.config["sparsity"] == 0.9 and result.config["effective_sparsity"] == 0.0
    assert any("asked for sparsity 0.9" in note for note in result.notes)
    floored = llmrank.prune(tiny_llama.model, tiny_llama.calib, sparsity=0.3, min_width=100, traced=tiny_llama.traced, progress=False)
    assert any("min_width 100" in note for note in floored.notes)
    plain = llmrank.prune(tiny_llama.model, tiny_llama.calib, sparsity=0.25, traced=tiny_llama.traced, progress=False)
    assert plain.notes == () and plain.config["effective_sparsity"] == pytest.approx(0.25)


def test_non_finite_final_model_is_refused(tiny_llama):
    """Huge but finite weights overflow the refit's Gram matrix: the final check catches it (issue 14.2)."""
    model = copy.deepcopy(tiny_llama.model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(1e30)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(VerificationError, match="NaN/Inf"):
        llmrank.prune(model, tiny_llama.calib, sparsity=0.3, compensation="lstsq", progress=False)


def test_the_final_check_reports_what_the_refit_did(tiny_llama):
    result = llmrank.prune(tiny_llama.model, tiny_llama.calib, sparsity=0.3, compensation="lstsq", traced=tiny_llama.traced, progress=False)
    check = result.output_check
    assert check.finite and check.relative_error_without_refit is not None
    # independent: the relative logit error of the slim model against the dense one on the same sample
    probe = tiny_llama.calib[:2, :64]
    with torch.no_grad():
        dense = tiny_llama.model(input_ids=probe, use_cache=False).logits.double()
        slim = result.model(input_ids=probe, use_cache=False).logits.double()
    assert check.relative_error == pytest.approx(float((slim - dense).norm() / dense.norm()), rel=1e-6)


def test_mpr_z_importance_zeroes_int_width_times_amount():
    """The authors' count is int(width * amount): 3 of 10 inputs at 0.35 (round() would give 4)."""
    a_in = torch.arange(1.0, 11.0)
    layer = ChainLayer(torch.eye(10), torch.ones(10))
    out = mpr_chain([layer], a_in, z_importance=0.35)[0]
    assert int((out == 0).sum()) == 3
    assert torch.equal(out[:3], torch.zeros(3, dtype=out.dtype))


def test_every_error_has_one_base_and_an_exit_code():
    from llmrank.cli import exit_code
    from llmrank.data import TextEncodingError
    from llmrank.exporters.onnx import OnnxValidationError
    from llmrank.ir import errors as E
    from llmrank.models import SeqLenError

    assert exit_code(E.ConfigError("x")) == 2 and exit_code(SeqLenError("x")) == 2
    assert exit_code(TextEncodingError("x")) == 2 and exit_code(E.UnsupportedModelError("x")) == 3
    assert exit_code(E.TraceError("x")) == 3 and exit_code(E.VerificationError("x")) == 4
    assert exit_code(OnnxValidationError({"prefill": 1.0}, 1e-3)) == 5 and exit_code(E.PassError("x")) == 1
    assert exit_code(FileExistsError("x")) == 2 and exit_code(RuntimeError("x")) == 1
    for cls in (E.ConfigError, E.InputError, E.CalibrationError, E.UnsupportedModelError):
        assert issubclass(cls, (E.LLMRankError, ValueError))
