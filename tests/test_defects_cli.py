"""CLI, loading and error-message defects from a user trial: each test names what a user saw.

Every model here is the tiny random Llama of test_cli (saved as a HF folder); the built-in
names are served from a prepared cache folder, so nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from llmrank import cli
from llmrank.cli import main

from test_cli import WORDS, make_tokenizer, save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("defects")
    model = save_tiny_llama(root / "tiny")
    rng = random.Random(0)
    text = root / "calib.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + " ." for _ in range(200)))
    return {"root": root, "model": model, "calib": text}


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def prune_argv(model, out, calib, *extra: str) -> list[str]:
    return ["prune", str(model), "--samples", "4", "--seq-len", "32", "--calib", str(calib), "--out", str(out),
            "--no-onnx", *extra]


# ---------------------------------------------------------------- 2: heal teacher with another tokenizer


def permuted_tokenizer():
    """A tokenizer with the same vocabulary size as make_tokenizer's but other ids for the words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(make_tokenizer().get_vocab())
    specials = ["[UNK]", "<s>", "</s>", "<pad>"]
    words = sorted((w for w in vocab if w not in specials), reverse=True)
    ids = {w: i for i, w in enumerate(specials + words)}
    assert len(ids) == len(vocab) and ids != vocab
    tok = Tokenizer(models.WordLevel(ids, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_heal_refuses_a_teacher_whose_tokenizer_differs_at_the_same_size(ws, capsys):
    teacher = ws["root"] / "teacher"
    shutil.copytree(ws["model"], teacher)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (teacher / f).unlink()
    permuted_tokenizer().save_pretrained(teacher)
    out = ws["root"] / "healed"
    code, _, err = run(["heal", str(ws["model"]), "--teacher", str(teacher), "--out", str(out), "--tokens", "64",
                        "--seq-len", "32", "--calib", str(ws["calib"]), "--no-onnx", "--quiet"], capsys)
    assert code == 2, err
    assert "tokenizer" in err and str(teacher) in err and "differ" in err
    assert not out.exists()


def test_same_tokenizer_passes_the_check():
    from llmrank.healcmd import check_same_tokenizer

    check_same_tokenizer(make_tokenizer(), make_tokenizer(), "slim", "teacher")  # no error


# ---------------------------------------------------------------- 8: generate --genai MISSING, --max-memory nan


def test_generate_with_a_missing_genai_folder_is_a_config_error(tmp_path, capsys):
    code, _, err = run(["generate", "--genai", str(tmp_path / "nope"), "--prompt", "hi"], capsys)
    assert code == 2
    assert "AttributeError" not in err and "does not exist" in err and str(tmp_path / "nope") in err


@pytest.mark.parametrize("value", ["nan", "inf", "1e400", "=-2GB"])
def test_non_finite_max_memory_is_a_config_error(ws, capsys, value):
    out = ws["root"] / f"never-{value}"
    flag = f"--max-memory{value}" if value.startswith("=") else None  # argparse reads a leading "-" as a flag
    code, _, err = run(prune_argv(ws["model"], out, ws["calib"], *([flag] if flag else ["--max-memory", value])), capsys)
    assert code == 2, err
    assert "--max-memory" in err and "ValueError" not in err and "OverflowError" not in err
    assert not out.exists()


def test_max_memory_below_one_byte_names_the_missing_unit(ws, capsys):
    code, _, err = run(prune_argv(ws["model"], ws["root"] / "never", ws["calib"], "--max-memory", "0.5"), capsys)
    assert code == 2
    assert "0.5GB" in err and "must be positive" not in err


def test_tiny_max_memory_is_warned_about(caplog):
    from llmrank.workflow import parse_size

    with caplog.at_level(logging.WARNING, logger="llmrank"):
        assert parse_size("1000") == 1000
        assert parse_size("16GB") == 16 * 10**9
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "1,000 bytes" in warned[0]


# ---------------------------------------------------------------- 9: a missing optional dependency names its extra


@pytest.mark.parametrize(("module", "extra"), [("onnxruntime_genai", "genai"), ("onnx", "onnx"), ("peft", "heal"),
                                               ("matplotlib", "plot")])
def test_missing_optional_module_names_its_extra(monkeypatch, capsys, module, extra):
    def needs(_args):
        raise ModuleNotFoundError(f"No module named '{module}'", name=module)

    monkeypatch.setitem(cli.COMMANDS, "inspect", needs)
    code, _, err = run(["inspect", "x"], capsys)
    assert code == 1
    assert f"pip install 'llmrank[{extra}]'" in err and "check the option values" not in err


def test_gguf_and_accelerate_are_core_dependencies():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]}
    assert {"gguf", "accelerate"} <= core


# ---------------------------------------------------------------- 11: the whole message, bounded


def test_error_shows_the_lines_after_the_first(monkeypatch, capsys):
    def mismatch(_args):
        nn.Linear(4, 2).load_state_dict({"weight": torch.zeros(3, 4), "bias": torch.zeros(2)})

    monkeypatch.setitem(cli.COMMANDS, "inspect", mismatch)
    code, _, err = run(["inspect", "x"], capsys)
    assert code == 1
    assert "Error(s) in loading state_dict" in err and "torch.Size([3, 4])" in err and "torch.Size([2, 4])" in err


def test_a_huge_error_message_is_cut(monkeypatch, capsys):
    def flood(_args):
        raise RuntimeError("\n".join(f"line {i}" for i in range(5000)))

    monkeypatch.setitem(cli.COMMANDS, "inspect", flood)
    _, _, err = run(["inspect", "x"], capsys)
    assert "line 0" in err and "line 4999" not in err and "more line" in err
    assert len(err.splitlines()) <= cli.MAX_ERROR_LINES + 3 and len(err) < cli.MAX_ERROR_CHARS + 500


# ---------------------------------------------------------------- 13: broken safetensors index


@pytest.fixture()
def sharded(tmp_path):
    folder = tmp_path / "sharded"
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size="30KB")
    make_tokenizer().save_pretrained(folder)
    index = json.loads((folder / INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    return folder


def break_index(folder: Path, how: str) -> str:
    """Damage the index; returns a text the error must contain."""
    path = folder / INDEX
    index = json.loads(path.read_text())
    if how == "json":
        path.write_text(path.read_text()[:-20])
        return INDEX
    if how == "no-map":
        path.write_text(json.dumps({"metadata": index["metadata"]}))
        return "weight_map"
    if how == "wrong-shard":
        shards = sorted(set(index["weight_map"].values()))
        key = next(k for k, v in sorted(index["weight_map"].items()) if v == shards[0])
        index["weight_map"][key] = shards[1]
        path.write_text(json.dumps(index))
        return shards[1]
    if how == "missing":
        path.unlink()
        return INDEX
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["json", "no-map", "wrong-shard", "missing"])
@pytest.mark.parametrize("route", [(), ("--layerwise",)])
def test_broken_index_is_named(sharded, ws, capsys, how, route):
    expect = break_index(sharded, how)
    code, _, err = run(prune_argv(sharded, sharded.parent / "out", ws["calib"], *route), capsys)
    assert code == 2, err
    assert expect in err and str(sharded) in err
    assert "JSONDecodeError" not in err and "SafetensorError" not in err and "not one" not in err


@pytest.mark.parametrize("how", ["json", "no-map"])
def test_checkpoint_names_the_broken_index(sharded, how):
    from llmrank.ir.errors import InputError
    from llmrank.passes.blocks.checkpoint import Checkpoint

    expect = break_index(sharded, how)
    with pytest.raises(InputError, match=expect) as info:
        Checkpoint(sharded)
    assert INDEX in str(info.value)


def test_checkpoint_read_names_the_shard_that_lacks_a_tensor(sharded):
    from llmrank.ir.errors import InputError
    from llmrank.passes.blocks.checkpoint import Checkpoint

    index = json.loads((sharded / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in sorted(index["weight_map"].items()) if v == shards[0])
    ckpt = Checkpoint(sharded)
    ckpt.weight_map[key] = shards[1]
    with pytest.raises(InputError, match=f"maps {key} to {shards[1]}"):
        ckpt.read([key])


# ---------------------------------------------------------------- 14 / 15: mistyped folder, no tokenizer


def test_mistyped_relative_folder_is_not_a_hub_problem(ws, capsys, monkeypatch, tmp_path):
    import llmrank.models

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(llmrank.models, "_reachable", lambda *a, **k: False)
    code, _, err = run(prune_argv("modls/lamma", tmp_path / "out", ws["calib"]), capsys)
    assert code == 2, err
    first = err.splitlines()[0]
    assert "no local folder modls/lamma exists" in first
    assert first.index("no local folder") < first.index("no model hub")


def test_folder_without_tokenizer_says_so(ws, capsys):
    bare = ws["root"] / "no-tokenizer"
    shutil.copytree(ws["model"], bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    code, _, err = run(prune_argv(bare, ws["root"] / "never", ws["calib"]), capsys)
    assert code == 2, err
    assert "has no tokenizer" in err and "save_pretrained" in err and "check the option values" not in err


# ---------------------------------------------------------------- 17 / 18: notes, hints, clamps, modes


def test_notes_show_with_quiet_and_a_coarse_multiple_is_noted(ws, capsys):
    out = ws["root"] / "coarse"
    code, stdout, err = run(prune_argv(ws["model"], out, ws["calib"], "--sparsity", "0.3", "--multiple", "32", "--quiet"),
                            capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    widths = {w["after"] for w in report["widths"].values()}
    assert widths == {32}  # 64 * 0.7 = 44.8 kept, rounded to the multiple: half the channels go
    assert stdout == ""
    assert "note: asked for sparsity 0.3, removed 0.5" in err and "multiple 32" in err


def test_written_safetensors_honour_the_umask(ws, capsys):
    out = ws["root"] / "modes"
    old = os.umask(0o022)
    try:
        code, _, err = run(prune_argv(ws["model"], out, ws["calib"], "--quiet"), capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    modes = {p.name: p.stat().st_mode & 0o777 for p in (out / "hf").iterdir()}
    assert modes["model.safetensors"] == 0o644 and modes["config.json"] == 0o644


def test_probe_samples_beyond_the_calibration_are_noted(caplog):
    from llmrank.passes.probe import probe_sequences

    with caplog.at_level(logging.WARNING):
        got = probe_sequences([torch.zeros(2, 8, dtype=torch.long)], 4)
    assert len(got) == 2
    assert any("probe_samples 4" in r.getMessage() and "only 2" in r.getMessage() for r in caplog.records)


def test_hints_follow_the_cause():
    from llmrank.ir.errors import ConfigError, InputError

    hints = {cli._hint(e) for e in (ConfigError("x"), InputError("x"), ValueError("x"), RuntimeError("x"),
                                    PermissionError("x"), ModuleNotFoundError("x", name="onnx"))}
    assert len(hints) == 6
    assert cli._hint(ConfigError("x")) == "check the option values with --help"


# ---------------------------------------------------------------- 16 / 18: export of a built-in name, quietly


@pytest.mark.onnx
def test_export_takes_a_builtin_name_and_prints_progress_without_noise(ws, tmp_path):
    cache = tmp_path / "cache"
    folder = cache / "models" / "gemma3-270m"  # what a first use of the built-in leaves in the cache
    shutil.copytree(ws["model"], folder)
    (folder / ".llmrank-complete").write_text("ok\n")
    env = {**os.environ, "LLMRANK_CACHE": str(cache)}
    out = tmp_path / "g.onnx"
    done = subprocess.run([sys.executable, "-m", "llmrank.cli", "export", "gemma3-270m", "--out", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert out.is_file() and oct(out.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    assert "ONNX export of LlamaForCausalLM" in done.stderr and "checking onnxruntime against PyTorch" in done.stderr
    for noise in ("torchvision", "FutureWarning", "deprecated"):
        assert noise not in done.stderr, done.stderr


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_prune_without_the_onnx_extra_is_refused_before_loading(ws, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    out = ws["root"] / "no-onnx-extra"
    argv = prune_argv(ws["model"], out, ws["calib"])
    argv.remove("--no-onnx")
    code, _, err = run(argv, capsys)
    assert code == 2
    assert "onnxscript" in err and "pip install 'llmrank[onnx]'" in err and "--no-onnx" in err
    assert not out.exists()
