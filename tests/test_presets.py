"""Presets: what ``--preset`` fills in, that a flag wins over it, and where the knobs sit in --help."""

from __future__ import annotations

import pytest

from llmrank.cli import build_parser, compensation_samples, main, prune_config
from llmrank.passes.config import CLI_DEFAULTS, PruneConfig, option_group
from llmrank.presets import DEFAULT_PRESET, PRESETS, preset


def _parse(*argv: str):
    return build_parser().parse_args(["prune", "m", "--out", "o", *argv])


def test_no_preset_is_the_default_preset_and_the_documented_defaults():
    args = _parse()
    config = prune_config(args)
    assert config == prune_config(_parse("--preset", DEFAULT_PRESET))
    assert compensation_samples(args) == PRESETS[DEFAULT_PRESET].compensation_samples
    # balanced is what a plain prune ran before presets existed: the library defaults + the CLI's refit, 64 sequences
    assert DEFAULT_PRESET == "balanced"
    assert config == PruneConfig(**CLI_DEFAULTS)
    assert compensation_samples(args) == 64


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_sets_its_values(name):
    args = _parse("--preset", name)
    config = prune_config(args)
    for field, value in preset(name).options.items():
        assert getattr(config, field) == value, field
    assert compensation_samples(args) == preset(name).compensation_samples


def test_a_flag_beside_the_preset_wins():
    args = _parse("--preset", "best", "--selection", "score", "--compensation-samples", "8", "--sparsity", "0.5")
    config = prune_config(args)
    assert config.selection == "score" and config.allocation == "fisher"  # one value overridden, the rest kept
    assert config.sparsity == 0.5
    assert compensation_samples(args) == 8


def test_unknown_preset_is_refused_with_the_choices(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "smollm2-135m", "--out", str(tmp_path / "o"), "--preset", "fastest"])
    assert exit_info.value.code == 2
    assert "fast" in capsys.readouterr().err
    with pytest.raises(ValueError, match="choose from fast, balanced, best"):
        preset("fastest")


def test_research_knobs_sit_in_the_advanced_group():
    for knob in ("representation", "theta", "gamma", "p", "z_importance", "head_scorer", "selection", "refit_inputs",
                 "ridge", "probe_samples", "mode"):
        assert option_group(knob) == "advanced", knob
    prune_parser = build_parser()._subparsers._group_actions[0].choices["prune"]
    titles = {a.dest: g.title for g in prune_parser._action_groups for a in g._group_actions}
    assert titles["preset"].startswith("quality")
    assert titles["gamma"].startswith("advanced") and titles["selection"].startswith("advanced")


def test_api_preset_equals_its_options_and_a_keyword_wins(tiny_llama):
    import llmrank

    model, calib = tiny_llama.model, tiny_llama.calib
    by_name = llmrank.prune(model, calib, preset="best", sparsity=0.5, progress=False)
    by_hand = llmrank.prune(model, calib, sparsity=0.5, progress=False, **preset("best").options)
    assert {g: list(map(int, k)) for g, k in by_name.kept.items()} == {g: list(map(int, k)) for g, k in by_hand.kept.items()}
    assert by_name.config["allocation"] == "fisher" and by_name.config["selection"] == "refit"
    overridden = llmrank.prune(model, calib, preset="best", selection="score", sparsity=0.5, progress=False)
    assert overridden.config["selection"] == "score" and overridden.config["allocation"] == "fisher"


def test_api_refuses_preset_beside_config(tiny_llama):
    import llmrank
    from llmrank.ir.errors import ConfigError

    with pytest.raises(ConfigError, match="preset= or config="):
        llmrank.prune(tiny_llama.model, tiny_llama.calib, preset="fast", config=PruneConfig())


def test_a_route_refusing_a_preset_value_names_the_preset(tmp_path, capsys, monkeypatch):
    """--preset best on the block route: refused before any weight is read, naming the preset's value."""
    import llmrank.workflow as workflow

    monkeypatch.setattr(workflow, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    code = main(["prune", "smollm2-135m", "--layerwise", "--preset", "best", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--preset best set --allocation fisher" in err and "--preset balanced" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", sorted({tuple(sorted(p.options.items())): n for n, p in PRESETS.items()}.values()))
def test_target_params_works_with_every_preset(tiny_llama, name):
    """A parameter budget under each preset (one per distinct set of options: fast and balanced differ
    only in their refit data): the kept fraction lands on the target, and the report says which
    sparsity was applied."""
    import llmrank

    result = llmrank.prune(tiny_llama.model, tiny_llama.calib, preset=name, target_params=0.8, progress=False)
    assert result.params_after / result.params_before == pytest.approx(0.8, abs=0.03)
    applied = result.config["applied"]
    assert applied is not None and 0 < applied["sparsity"] < 1
