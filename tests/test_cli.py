"""The ``llmrank`` command end to end on a tiny random Llama saved with an in-memory tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers

from llmrank.cli import main

WORDS = ("the cat sat on a mat while dog ran in park with red ball and blue sky over green hill "
         "small bird sang near old tree by river under bright sun").split()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>", "<pad>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_llama(folder: Path, **overrides) -> Path:
    """A tiny random Llama (seed 0) and the word-level tokenizer, saved as a HF folder."""
    cfg = transformers.LlamaConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=64, max_position_embeddings=128,
                                             bos_token_id=1, eos_token_id=2, pad_token_id=3), **overrides})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = save_tiny_llama(root / "tiny-llama")
    rng = random.Random(0)
    text = root / "calib.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + " ." for _ in range(40)))
    out = root / "out"
    code = main(["prune", str(model_dir), "--sparsity", "0.25", "--samples", "4", "--seq-len", "32",
                 "--calib", str(text), "--out", str(out), "--quiet"])
    return {"root": root, "model": model_dir, "calib": text, "out": out, "code": code}


def test_prune_writes_everything(workspace):
    assert workspace["code"] == 0
    out = workspace["out"]
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert report["widths"] and all(w == {"before": 64, "after": 48} for w in report["widths"].values())
    assert report["verification"]["ok"] is True
    assert (out / report["artifacts"]["onnx"]["path"]).is_file()
    assert (out / report["artifacts"]["hf"]["path"] / "config.json").is_file()
    assert (out / "scores.safetensors").is_file() and (out / "plot.png").is_file()


def test_second_prune_refused_without_force(workspace, capsys):
    out = workspace["out"]
    before = snapshot(out)
    code = main(["prune", str(workspace["model"]), "--sparsity", "0.25", "--samples", "4", "--seq-len", "32",
                 "--calib", str(workspace["calib"]), "--out", str(out), "--quiet"])
    assert code != 0
    assert snapshot(out) == before
    assert "Traceback" not in capsys.readouterr().err


def test_out_inside_model_folder_refused(workspace, capsys):
    model = workspace["model"]
    before = snapshot(model)
    code = main(["prune", str(model), "--sparsity", "0.25", "--samples", "4", "--seq-len", "32",
                 "--calib", str(workspace["calib"]), "--out", str(model / "pruned"), "--quiet"])
    assert code != 0
    assert snapshot(model) == before
    assert "Traceback" not in capsys.readouterr().err


def test_bad_sparsity_one_line_error(workspace, capsys):
    code = main(["prune", str(workspace["model"]), "--sparsity", "1.5", "--calib", str(workspace["calib"]),
                 "--out", str(workspace["root"] / "never"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("llmrank prune: error:") and "sparsity" in errors[0]
    assert not (workspace["root"] / "never").exists()


def test_inspect_prints_groups(workspace, capsys):
    assert main(["inspect", str(workspace["model"]), "--sparsity", "0.25"]) == 0
    text = capsys.readouterr().out
    assert main(["inspect", str(workspace["model"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["groups"]) == 2
    for group in report["groups"]:
        assert group in text
    assert "prunable groups" in text


@pytest.mark.onnx
def test_generate_onnx_matches_torch_greedy(workspace, capsys):
    import llmrank

    out = workspace["out"]
    prompt = "the cat sat on a"
    code = main(["generate", "--onnx", str(out / "onnx" / "model.onnx"), "--tokenizer", str(out / "hf"),
                 "--prompt", prompt, "--max-new-tokens", "8", "--json"])
    assert code == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    slim = llmrank.load(out / "hf")
    ids = make_tokenizer()(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = slim.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=3)
    assert tokens == ref[0, ids.shape[1]:].tolist()


@pytest.mark.onnx
def test_eval_hf_and_onnx_agree(workspace, capsys, monkeypatch):
    import llmrank.tasks
    from llmrank.tasks import MCItem

    items = [MCItem("the cat sat on", [" a mat", " blue sky"], 0), MCItem("", ["red ball", "ball red"], 1),
             MCItem("dog ran in", [" park", " the", " river"], 2)]
    monkeypatch.setattr(llmrank.tasks, "load_task", lambda name, limit=None, seed=0: items)
    out = workspace["out"]
    common = ["--ppl-source", str(workspace["calib"]), "--ppl-tokens", "all", "--seq-len", "32", "--tasks", "hyperbaton", "--json"]
    assert main(["eval", str(out / "hf"), *common]) == 0
    hf = json.loads(capsys.readouterr().out)
    assert main(["eval", str(out / "onnx" / "model.onnx"), "--tokenizer", str(out / "hf"), *common]) == 0
    ort = json.loads(capsys.readouterr().out)
    assert hf["target"]["kind"] == "hf-slim" and ort["target"]["kind"] == "onnx"
    assert hf["perplexity"]["n_tokens"] == ort["perplexity"]["n_tokens"] > 100
    assert ort["perplexity"]["ppl"] == pytest.approx(hf["perplexity"]["ppl"], rel=1e-3)
    assert hf["protocol"]["perplexity"]["seq_len"] == 32 and hf["protocol"]["perplexity"]["stride"] == 32
    assert hf["tasks"]["hyperbaton"]["acc"] == ort["tasks"]["hyperbaton"]["acc"]
    assert hf["tasks"]["hyperbaton"]["n"] == 3
    # The tokenizer is also found next to a prune output's ONNX file.
    assert main(["eval", str(out / "onnx" / "model.onnx"), *common[:-3], "--tasks", "none", "--quiet"]) == 0


def test_eval_errors_are_one_line(workspace, capsys):
    onnx = workspace["out"] / "onnx" / "model.onnx"
    lonely = workspace["root"] / "lonely"
    lonely.mkdir(exist_ok=True)
    (lonely / "model.onnx").write_bytes(onnx.read_bytes())
    assert main(["eval", str(lonely / "model.onnx"), "--tasks", "none"]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer" in err and "Traceback" not in err
    assert main(["eval", str(workspace["out"] / "hf"), "--ppl-tokens", "0", "--tasks", "none"]) == 2
    assert main(["eval", str(workspace["out"] / "hf"), "--tasks", "nope"]) == 2


def test_sweep_cli(workspace, capsys):
    out = workspace["root"] / "sweep"
    args = ["sweep", str(workspace["model"]), "--scorers", "l1,wpr", "--sparsities", "0.25,0.5", "--grid", "gamma=0.5",
            "--calib", str(workspace["calib"]), "--samples", "2", "--calib-seq-len", "16",
            "--ppl-source", str(workspace["calib"]), "--ppl-tokens", "96", "--seq-len", "32", "--tasks", "none",
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert {"results.json", "results.csv", "results.md", "retention_perplexity.png"} <= {p.name for p in out.iterdir()}
    assert len(list((out / "cells").glob("*.json"))) == 5
    capsys.readouterr()
    assert main([*args[:-1], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["computed"] == [] and len(report["rows"]) == 5
    assert main(["sweep", str(workspace["model"]), "--sparsities", "1.2", "--out", str(out)]) == 2


@pytest.mark.onnx
def test_prune_and_export_with_int8(workspace, capsys):
    """--quantize int8: onnxruntime's quantizer on the slim file, checked against PyTorch (issue 13.3)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from llmrank.exporters.hf import load_hf

    out = workspace["root"] / "out-int8"
    code = main(["prune", str(workspace["model"]), "--sparsity", "0.25", "--samples", "4", "--seq-len", "32",
                 "--calib", str(workspace["calib"]), "--out", str(out), "--quantize", "int8", "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    q = report["artifacts"]["onnx_int8"]
    int8 = out / q["path"]
    assert int8.is_file() and q["bytes"] < report["artifacts"]["onnx"]["bytes"]
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    # independent: onnxruntime on the int8 file against the reloaded slim checkpoint
    slim = load_hf(out / "hf")
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 32), dtype=np.int64),
            "position_ids": np.tile(np.arange(32), (2, 1))}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            feed[inp.name] = np.zeros((2, inp.shape[1], 0, inp.shape[3]), dtype=np.float32)
    got = torch.from_numpy(session.run(["logits"], feed)[0]).double()
    with torch.no_grad():
        ref = slim(input_ids=ids, use_cache=False).logits.double()
    error = float((got - ref).norm() / ref.norm())
    assert error == pytest.approx(q["relative_error"], rel=1e-3) and error <= q["bound"]["max_relative_error"]

    exported = workspace["root"] / "export-int8" / "model.int8.onnx"
    assert main(["export", str(out / "hf"), "--out", str(exported), "--quantize", "int8", "--quiet"]) == 0
    assert exported.is_file() and not exported.with_name("model.int8.onnx.data").exists()


@pytest.mark.onnx
def test_int8_outside_its_bound_is_refused_and_leaves_nothing(workspace, monkeypatch, tmp_path):
    from llmrank.exporters import quantize
    from llmrank.ir.errors import ExportError

    monkeypatch.setattr(quantize, "MAX_RELATIVE_ERROR", 0.0)
    target = tmp_path / "model.int8.onnx"
    with pytest.raises(ExportError, match="too far from the fp32 model"):
        from llmrank.exporters.hf import load_hf

        quantize.quantize_onnx(workspace["out"] / "onnx" / "model.onnx", target, load_hf(workspace["out"] / "hf"))
    assert not target.exists() and list(tmp_path.iterdir()) == []
