"""``llmrank heal`` and ``llmrank prune --heal-tokens`` end to end on a tiny random Llama."""

from __future__ import annotations

import json
import random

import pytest
import torch

from llmrank.cli import main
from llmrank.exporters.hf import load_hf

from test_cli import WORDS, save_tiny_llama

pytest.importorskip("peft")

COMMON = ["--seq-len", "32", "--quiet"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal-cli")
    model_dir = save_tiny_llama(root / "tiny-llama", initializer_range=0.1)  # sharp enough outputs to distil
    rng = random.Random(0)
    text = root / "calib.txt"  # long enough for 4,096 held-out tokens beside the training windows
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + " ." for _ in range(600)))
    return {"root": root, "model": model_dir, "calib": text}


@pytest.fixture(scope="module")
def plain(tiny):
    """A pruned checkpoint of the tiny model, without a heal."""
    out = tiny["root"] / "plain"
    assert main(["prune", str(tiny["model"]), "--sparsity", "0.5", "--samples", "4", "--calib", str(tiny["calib"]),
                 "--out", str(out), "--no-onnx", *COMMON]) == 0
    return out


def ffn_weights(folder) -> dict[str, torch.Tensor]:
    model = load_hf(folder)
    return {k: v for k, v in model.state_dict().items() if ".mlp." in k}


@pytest.mark.slow  # 15-40 s on the shared 2-core machine: a prune, a heal and five held-out evaluations
def test_prune_heal_tokens_heals_before_export(tiny, plain):
    out = tiny["root"] / "healed"
    assert main(["prune", str(tiny["model"]), "--sparsity", "0.5", "--samples", "4", "--calib", str(tiny["calib"]),
                 "--out", str(out), "--no-onnx", "--heal-tokens", "256", "--heal-lr", "1e-3", "--heal-bf16", *COMMON]) == 0
    report = json.loads((out / "report.json").read_text())
    heal = report["heal"]
    assert heal["tokens"] == 256 and heal["stopped_by"] == "tokens" and heal["config"]["autocast_bf16"] is True
    assert heal["held_out_ppl"]["after"] < heal["held_out_ppl"]["before"]
    assert (out / "heal.png").is_file() and report["artifacts"]["heal_plot"] == "heal.png"
    cut, healed = ffn_weights(plain / "hf"), ffn_weights(out / "hf")
    assert {k: v.shape for k, v in healed.items()} == {k: v.shape for k, v in cut.items()}  # the slim shapes
    assert all(not torch.equal(healed[k], cut[k]) for k in cut)  # every pruned Linear trained (the default: its weights)


@pytest.mark.slow
def test_heal_command_writes_a_healed_checkpoint(tiny, plain):
    out = tiny["root"] / "heal-out"
    assert main(["heal", str(plain / "hf"), "--teacher", str(tiny["model"]), "--out", str(out), "--tokens", "128",
                 "--calib", str(tiny["calib"]), "--eval-points", "2", "--batch-size", "2", "--no-onnx",
                 "--schedule", "cosine", "--hidden-weight", "0.5", "--bf16", *COMMON]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["heal"]["tokens"] == 128 and [p["tokens"] for p in report["heal"]["curve"]] == [0, 64, 128]
    config = report["heal"]["config"]
    assert (config["schedule"], config["hidden_weight"], config["autocast_bf16"]) == ("cosine", 0.5, True)
    assert report["artifacts"]["hf"]["reload_max_abs_diff"] <= 1e-4
    assert (out / "hf" / "config.json").is_file() and not list(out.parent.glob(".heal-out*"))


def test_heal_refuses_to_write_over_its_input(tiny, capsys):
    slim = tiny["model"]  # refused before anything is loaded: any checkpoint folder shows it
    before = sorted(p.name for p in slim.iterdir())
    for target in (slim, slim / "sub"):
        code = main(["heal", str(slim), "--teacher", str(tiny["model"]), "--out", str(target), "--tokens", "64", "--force",
                     "--calib", str(tiny["calib"]), *COMMON])
        assert code == 2
        assert "input folder" in capsys.readouterr().err
    assert sorted(p.name for p in slim.iterdir()) == before


def test_heal_needs_a_budget_and_refuses_layerwise(tiny, capsys):
    assert main(["heal", str(tiny["model"]), "--teacher", str(tiny["model"]), "--out", str(tiny["root"] / "x"), *COMMON]) == 2
    assert "budget" in capsys.readouterr().err
    assert main(["prune", str(tiny["model"]), "--out", str(tiny["root"] / "y"), "--layerwise", "--heal-tokens", "64", *COMMON]) == 2
    assert "--layerwise" in capsys.readouterr().err


@pytest.mark.onnx
def test_healed_model_exports_to_onnx(tiny, plain):
    out = tiny["root"] / "heal-onnx"
    assert main(["heal", str(plain / "hf"), "--teacher", str(tiny["model"]), "--out", str(out), "--tokens", "64",
                 "--calib", str(tiny["calib"]), *COMMON]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / report["artifacts"]["onnx"]["path"]).is_file()
    assert max(report["artifacts"]["onnx"]["max_abs_diff"].values()) < 1e-3
