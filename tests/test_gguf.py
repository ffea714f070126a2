"""GGUF files written by llama.cpp's converter (issue 21): read back by transformers' GGUF loader,
an independent reader, and compared with the slim PyTorch model; refusals before any work.

The converter comes from the llama-cpp-python sdist (downloaded once with pip, nothing compiled);
the tests that need it skip with the reason when it cannot be obtained.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers

import llmrank
from llmrank.exporters import gguf
from llmrank.exporters.hf import load_hf, save_hf
from llmrank.ir.errors import ConfigError, InputError

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def converter() -> Path:
    try:
        return gguf.converter_dir()
    except gguf.ConverterUnavailableError as exc:
        pytest.skip(f"llama.cpp's converter is not available (needs the llama-cpp-python sdist once): {exc}")


def pruned_folder(root: Path, family: str, tokenizer, **options) -> tuple[Path, torch.nn.Module]:
    """A tiny random model of `family`, pruned at uniform widths (30 %), saved as llmrank writes hf/."""
    torch.manual_seed(0)
    cls, cfg = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config)}[family]
    model = cls(cfg(**SHAPE, vocab_size=len(tokenizer))).eval()
    calib = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(1))
    slim = llmrank.prune(model, calib, sparsity=0.3, scorer="l1", progress=False, **options).model.eval()
    assert {layer.mlp.up_proj.out_features for layer in slim.model.layers} == {67}  # uniform, and shrunk
    save_hf(slim, tokenizer, root / "hf", metadata={})
    save_hf(model, tokenizer, root / "dense", metadata={})  # the teacher of a heal
    return root / "hf", slim


@pytest.fixture(scope="module")
def slim_llama(converter, tmp_path_factory):
    from llmrank.models import load_tokenizer

    try:
        tokenizer = load_tokenizer("smollm2-135m")  # a real Llama-family BPE tokenizer (built-in, from PyPI once)
    except RuntimeError as exc:
        pytest.skip(f"SmolLM2's tokenizer is not available: {exc}")
    return pruned_folder(tmp_path_factory.mktemp("llama"), "llama", tokenizer)


@pytest.fixture(scope="module")
def slim_qwen2(converter, tmp_path_factory):
    # llama.cpp ships a vocab-only Qwen2 GGUF for its own tokenizer tests: a real Qwen2 tokenizer, offline
    tokenizer = transformers.AutoTokenizer.from_pretrained(converter / "models", gguf_file="ggml-vocab-qwen2.gguf")
    return pruned_folder(tmp_path_factory.mktemp("qwen2"), "qwen2", tokenizer)


def gguf_field(path: Path, key: str):
    """One metadata value of a GGUF file, read with the installed gguf package."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields[key]
    return field.parts[field.data[0]].tolist()[0]


def assert_reads_back(path: Path, slim: torch.nn.Module, outtype: str, arch: str, width: int = 67) -> None:
    """transformers' GGUF loader rebuilds the slim model from the file: same width, logits within the bound."""
    assert gguf._architecture(path) == arch
    assert gguf_field(path, f"{arch}.feed_forward_length") == width
    read = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, slim.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want, got = slim(ids).logits, read(ids).logits
    assert (want - got).abs().max() <= gguf.BOUNDS[outtype] * want.abs().max()


def check_result(result: gguf.GgufExportResult, path: Path, outtype: str, arch: str) -> None:
    assert result.path == path and path.is_file() and result.bytes == path.stat().st_size
    assert result.architecture == arch and result.outtype == outtype
    check = result.check
    assert check is not None and check.passed and check.tokenizer_equal and check.bound == gguf.BOUNDS[outtype]
    assert check.max_abs_diff <= check.bound * check.logit_scale
    report = json.loads(json.dumps(result.to_dict()))  # what report.json records
    assert report["check"]["passed"] is True and report["path"] == str(path)
    assert not list(path.parent.glob(f".{path.name}.*"))  # no temporary left beside it


# ------------------------------------------------------------------ refusals (no converter needed)


def test_unknown_type_is_refused():
    with pytest.raises(ConfigError, match="q4_k_m"):  # the message lists what is accepted
        gguf.check_outtype("q3")


def test_kquant_without_llama_cpp_names_the_extra(monkeypatch):
    monkeypatch.setattr(gguf, "_llama_cpp_available", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'llmrank\[gguf\]'") as info:
        gguf.check_outtype("q4_k_m")
    assert "q8_0" in str(info.value)  # and what works without it


def test_kquant_refused_before_the_converter_is_fetched(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf, "_llama_cpp_available", lambda: False)
    monkeypatch.setattr(gguf, "converter_dir", lambda **_: pytest.fail("fetched the converter before refusing"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama", "llmrank": {}}))
    with pytest.raises(ConfigError, match="llmrank\\[gguf\\]"):
        gguf.export_gguf(tmp_path / "hf", tmp_path / "m.gguf", outtype="q4_k_m")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("key, what", [("layer_widths", "FFN widths"), ("layer_heads", "attention head counts")])
def test_per_layer_checkpoint_is_refused_before_work(tmp_path, monkeypatch, key, what):
    monkeypatch.setattr(gguf, "_llama_cpp_available", lambda: False)  # a deci file is checked in llama.cpp only
    monkeypatch.setattr(gguf, "converter_dir", lambda **_: pytest.fail("fetched the converter before refusing"))
    (tmp_path / "hf").mkdir()
    value = {"model.layers.0.mlp": 40, "model.layers.1.mlp": 56} if key == "layer_widths" else {"q": [4, 2]}
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama", "llmrank": {key: value}}))
    with pytest.raises(ConfigError, match=f"per-layer {what}") as info:
        gguf.export_gguf(tmp_path / "hf", tmp_path / "m.gguf", outtype="f16")
    assert "--allocation uniform" in info.value.hint
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("config, message", [
    ({"model_type": "qwen2", "llmrank": {"layer_widths": {"model.layers.0.mlp": 40}}}, "qwen2 GGUF takes one value"),
    ({"model_type": "llama", "mlp_bias": True, "llmrank": {"layer_widths": {"model.layers.0.mlp": 40}}}, "without biases"),
])
def test_per_layer_outside_the_deci_family_is_refused_with_llama_cpp_too(tmp_path, monkeypatch, config, message):
    monkeypatch.setattr(gguf, "_llama_cpp_available", lambda: True)
    monkeypatch.setattr(gguf, "converter_dir", lambda **_: pytest.fail("fetched the converter before refusing"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message) as info:
        gguf.export_gguf(tmp_path / "hf", tmp_path / "m.gguf", outtype="f16")
    assert "--allocation uniform" in info.value.hint


def test_no_converter_offline_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRANK_CACHE", str(tmp_path))
    monkeypatch.delenv("LLMRANK_LLAMA_CPP", raising=False)
    with pytest.raises(gguf.ConverterUnavailableError) as info:
        gguf.converter_dir(download=False)
    assert f"pip download {gguf.LLAMA_CPP_PYTHON} --no-deps --no-binary llama-cpp-python -d {tmp_path / 'wheels'}" in str(info.value)


def test_sdist_is_fetched_without_wheels_or_compiling(tmp_path, monkeypatch):
    """pip is asked for the sdist of llama-cpp-python only (its build dependencies stay wheels)."""
    import subprocess

    from llmrank import cache

    seen = []

    def fake_run(cmd, **_):
        seen.append(cmd)
        folder = Path(cmd[cmd.index("-d") + 1])
        (folder / "llama_cpp_python-0.3.36.tar.gz").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setenv("LLMRANK_CACHE", str(tmp_path))
    monkeypatch.setattr(cache.subprocess, "run", fake_run)
    path = cache.pip_download(gguf.LLAMA_CPP_PYTHON, no_binary=True)
    assert path == tmp_path / "wheels" / "llama_cpp_python-0.3.36.tar.gz"
    cmd = seen[0]
    assert cmd[cmd.index("--no-binary") + 1] == "llama-cpp-python" and ":all:" not in cmd and cmd[-1] == gguf.LLAMA_CPP_PYTHON


def test_a_wrong_sdist_is_refused_by_name(tmp_path, monkeypatch):
    import tarfile

    monkeypatch.setenv("LLMRANK_CACHE", str(tmp_path))
    monkeypatch.delenv("LLMRANK_LLAMA_CPP", raising=False)
    (tmp_path / "wheels").mkdir()
    (tmp_path / "x.txt").write_text("not llama.cpp")
    with tarfile.open(tmp_path / "wheels" / "llama_cpp_python-0.3.36.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "x.txt", arcname="llama_cpp_python-0.3.36/x.txt")
    with pytest.raises(gguf.ConverterUnavailableError, match="convert_hf_to_gguf.py"):
        gguf.converter_dir(download=False)
    assert not (tmp_path / "llama.cpp" / "0.3.36").exists()  # nothing half-extracted under the final name


def test_an_existing_gguf_is_replaced_with_force_only(tmp_path):
    from llmrank.exporters.atomic import check_writable

    (tmp_path / "model-f16.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileExistsError, match="--force"):
        check_writable(tmp_path / "model-f16.gguf", force=False)
    assert check_writable(tmp_path / "model-f16.gguf", force=True) == tmp_path / "model-f16.gguf"  # one --force: ours


@pytest.mark.parametrize("architecture_first", [True, False], ids=["header", "fallback"])
def test_the_architecture_is_read_as_ggufs_reader_reads_it(tmp_path, architecture_first):
    """The header shortcut (the writers put general.architecture first) and the full reader agree;
    a file that starts with another key is read in full."""
    import gguf as gguf_py
    import numpy as np

    path = tmp_path / "m.gguf"
    writer = gguf_py.GGUFWriter(str(path), "qwen2")
    writer.add_uint32("qwen2.block_count", 1)
    if not architecture_first:
        pairs = writer.kv_data[0]
        pairs["general.architecture"] = pairs.pop("general.architecture")
    writer.add_tensor("x", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    field = gguf_py.GGUFReader(str(path)).fields["general.architecture"]
    assert gguf._architecture(path) == bytes(field.parts[field.data[0]]).decode() == "qwen2"
    first = gguf._first_string_field(path)
    assert first == (("general.architecture", "qwen2") if architecture_first else None)
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)  # absurd counts: no shortcut
    assert gguf._first_string_field(tmp_path / "bad.gguf") is None


# ------------------------------------------------------------------ written, read back, compared


def test_converter_runs_with_its_own_gguf_py_in_a_child_process(converter):
    """The converter's gguf-py is on the child's path only: this process keeps the installed gguf."""
    import gguf as installed

    assert (converter / "gguf-py" / "gguf").is_dir() and (converter / "conversion" / "llama.py").is_file()
    import sys

    assert str(converter / "gguf-py") not in sys.path
    assert not Path(installed.__file__).resolve().is_relative_to(converter.resolve())


@pytest.mark.slow  # about a minute: transformers parses the 49k-token vocabulary of each GGUF it reads
def test_llama_uniform_f32_reads_back_equal(slim_llama, tmp_path):
    hf_dir, slim = slim_llama
    path = tmp_path / "gguf" / "model-f32.gguf"
    result = gguf.export_gguf(hf_dir, path, outtype="f32")
    check_result(result, path, "f32", "llama")
    assert result.check.max_abs_diff == pytest.approx(0.0, abs=1e-5)
    assert_reads_back(path, slim, "f32", "llama")
    # `llmrank eval` takes the .gguf itself: the f32 file's perplexity is the slim checkpoint's
    from llmrank.cli import build_parser
    from llmrank.evalcmd import cmd_eval

    text = tmp_path / "text.txt"
    text.write_text(" ".join(["a slim model is scored from the file that ships, not from its source folder ."] * 40))
    common = ["--ppl-source", str(text), "--ppl-tokens", "256", "--seq-len", "64", "--tasks", "none", "--quiet",
              "--tokenizer", str(hf_dir)]
    on_gguf = cmd_eval(build_parser().parse_args(["eval", str(path), *common]))
    on_hf = cmd_eval(build_parser().parse_args(["eval", str(hf_dir), *common]))
    assert on_gguf["target"]["kind"] == "gguf" and on_gguf["perplexity"]["n_tokens"] == on_hf["perplexity"]["n_tokens"] > 200
    if gguf._llama_cpp_available():  # llama.cpp runs it (an f16 KV cache: close, not equal)
        assert on_gguf["target"]["runtime"].startswith("llama.cpp")
        assert on_gguf["perplexity"]["ppl"] == pytest.approx(on_hf["perplexity"]["ppl"], rel=1e-2)
    else:  # transformers' reader: the same float32 weights in PyTorch
        assert "dequantised" in on_gguf["target"]["runtime"]
        assert on_gguf["perplexity"]["ppl"] == pytest.approx(on_hf["perplexity"]["ppl"], rel=1e-4)


@pytest.mark.extended  # make test-all (a minute or more each: transformers parses the vocabulary)
@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_llama_uniform_reads_back_within_the_bound(slim_llama, tmp_path, outtype):
    hf_dir, slim = slim_llama
    path = tmp_path / f"model-{outtype}.gguf"
    result = gguf.export_gguf(hf_dir, path, outtype=outtype)
    check_result(result, path, outtype, "llama")
    assert_reads_back(path, slim, outtype, "llama")


@pytest.mark.extended  # make test-all (a minute or more each: transformers parses the vocabulary)
def test_llama_with_heads_cut_uniformly_reads_back(converter, tmp_path):
    """Half the heads of every layer cut: fewer heads of the same head_dim (hidden != heads x head_dim)."""
    from llmrank.models import load_tokenizer

    hf_dir, slim = pruned_folder(tmp_path, "llama", load_tokenizer("smollm2-135m"), head_sparsity=0.5)
    assert slim.config.num_attention_heads == 2 and slim.config.head_dim == 16
    path = tmp_path / "model-f32.gguf"
    result = gguf.export_gguf(hf_dir, path, outtype="f32")
    check_result(result, path, "f32", "llama")
    assert gguf_field(path, "llama.attention.head_count") == 2 and gguf_field(path, "llama.attention.key_length") == 16
    assert_reads_back(path, slim, "f32", "llama")


@pytest.mark.extended  # make test-all (a minute or more each: transformers parses the vocabulary)
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_qwen2_uniform_reads_back_within_the_bound(slim_qwen2, tmp_path, outtype):
    hf_dir, slim = slim_qwen2
    path = tmp_path / f"model-{outtype}.gguf"
    result = gguf.export_gguf(hf_dir, path, outtype=outtype)
    check_result(result, path, outtype, "qwen2")
    assert_reads_back(path, slim, outtype, "qwen2")


@pytest.mark.extended  # make test-all (a minute or more each: transformers parses the vocabulary)
def test_a_failed_check_leaves_nothing_in_place(slim_llama, tmp_path, monkeypatch):
    hf_dir, _ = slim_llama
    monkeypatch.setitem(gguf.BOUNDS, "f16", 0.0)  # f16 rounding cannot meet a zero bound
    path = tmp_path / "model-f16.gguf"
    with pytest.raises(gguf.GgufValidationError, match="does not match"):
        gguf.export_gguf(hf_dir, path, outtype="f16")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ llmrank prune --gguf


def test_cli_types_are_the_exporters():
    from llmrank.cli import GGUF_TYPES

    assert set(GGUF_TYPES) == set(gguf.OUTTYPES)


@pytest.mark.parametrize("flags, message", [
    (["--gguf", "f16", "--allocation", "error", "--compensation", "lstsq"], "--allocation error chooses a width per layer"),
    (["--gguf", "f16", "--pruner", "global"], "--pruner global"),
    (["--gguf", "f16", "--no-hf"], "drop --no-hf"),
    (["--gguf", "q4_k_m"], r"pip install 'llmrank\[gguf\]'"),
])
def test_prune_refuses_before_the_model_is_read(tmp_path, monkeypatch, capsys, flags, message):
    import re

    from llmrank import workflow
    from llmrank.cli import main

    monkeypatch.setattr(gguf, "_llama_cpp_available", lambda: False)
    monkeypatch.setattr(workflow, "load", lambda *a, **k: pytest.fail("the model was read before the refusal"))
    monkeypatch.setattr(gguf, "converter_dir", lambda **_: pytest.fail("fetched the converter before refusing"))
    code = main(["prune", "smollm2-135m", "--out", str(tmp_path / "out"), "--no-onnx", "--quiet", *flags])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("layerwise", [False, True])
def test_prune_writes_a_checked_gguf(slim_llama, tmp_path, layerwise):
    """llmrank prune on a tiny Llama folder with --gguf f16: gguf/model-f16.gguf, recorded in report.json."""
    from llmrank.cli import main

    model = tmp_path / "model"
    transformers.AutoModelForCausalLM.from_pretrained(slim_llama[0]).save_pretrained(model)  # a plain HF folder
    transformers.AutoTokenizer.from_pretrained(slim_llama[0]).save_pretrained(model)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["the pruned model is written for llama.cpp and read back by transformers ."] * 60))
    out = tmp_path / "out"
    code = main(["prune", str(model), "--sparsity", "0.25", "--samples", "2", "--compensation-samples", "2",
                 "--seq-len", "16", "--calib", str(text), "--no-onnx", "--gguf", "f16", "--out", str(out), "--quiet",
                 *(["--layerwise", "--multiple", "1"] if layerwise else [])])  # a --multiple given wins
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    entry = report["artifacts"]["gguf"]
    path = out / "gguf" / "model-f16.gguf"
    assert entry["path"] == "gguf/model-f16.gguf" and path.is_file() and entry["bytes"] == path.stat().st_size
    assert entry["check"]["passed"] and entry["architecture"] == "llama"
    slim = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    width = slim.model.layers[0].mlp.up_proj.out_features
    assert gguf_field(path, "llama.feed_forward_length") == width
    # 67 x 0.75 = 50 kept; without --multiple, --gguf rounds to llama.cpp's row block of 32 (and says why)
    assert (width, report["config"]["multiple"]) == ((50, 1) if layerwise else (64, 32))
    assert any("not a multiple of 32" in note for note in report.get("notes", [])) == layerwise
    assert_reads_back(path, slim, "f16", "llama", width=width)


@pytest.mark.slow  # the command on the real model (a minute or two: transformers parses the vocabulary)
def test_smollm2_prune_to_gguf_end_to_end(converter, tmp_path):
    """The issue's command at q8_0 (no compiler): SmolLM2-135M at 30 %, its GGUF read back equal to hf/."""
    from llmrank.cli import main

    out = tmp_path / "slim"
    code = main(["prune", "smollm2-135m", "--sparsity", "0.3", "--samples", "4", "--compensation-samples", "4",
                 "--seq-len", "128", "--no-onnx", "--gguf", "q8_0", "--out", str(out), "--quiet"])
    assert code == 0
    entry = json.loads((out / "report.json").read_text())["artifacts"]["gguf"]
    assert entry["check"]["passed"] and entry["check"]["tokenizer_equal"] and entry["architecture"] == "llama"
    slim = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    width = slim.model.layers[0].mlp.up_proj.out_features
    assert width == 1088  # 1536 x 0.7 = 1075, rounded to q8_0's row block of 32, every layer
    assert_reads_back(out / "gguf" / "model-q8_0.gguf", slim, "q8_0", "llama", width=width)


@pytest.mark.parametrize("family, llama_cpp", [("llama", False), ("qwen2", True), ("qwen2", False)])
def test_export_refuses_a_per_layer_checkpoint(tmp_path, capsys, monkeypatch, family, llama_cpp):
    """Per-layer widths need llama.cpp's deci architecture (Llama family only, checked in llama.cpp)."""
    from llmrank.cli import main

    monkeypatch.setattr(gguf, "converter_dir", lambda **_: pytest.fail("fetched the converter before refusing"))
    monkeypatch.setattr(gguf, "_llama_cpp_available", lambda: llama_cpp)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(
        {"model_type": family, "llmrank": {"layer_widths": {"model.layers.0.mlp": 40, "model.layers.1.mlp": 56}}}))
    assert main(["export", str(tmp_path / "hf"), "--gguf", "f16", "--out", str(tmp_path / "m.gguf"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "per-layer FFN widths" in err and "--allocation uniform" in err
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.extended  # make test-all (a minute or more each: transformers parses the vocabulary)
def test_export_writes_a_checked_gguf_into_a_folder(slim_llama, tmp_path):
    from llmrank.cli import main

    hf_dir, slim = slim_llama
    assert main(["export", str(hf_dir), "--gguf", "q8_0", "--out", f"{tmp_path}/", "--quiet"]) == 0
    assert_reads_back(tmp_path / "model-q8_0.gguf", slim, "q8_0", "llama")


def test_a_folder_without_tokenizer_is_refused_before_the_converter_runs(tmp_path, monkeypatch):
    from llmrank.models import MissingTokenizerError

    monkeypatch.setattr(gguf, "_convert", lambda *a: pytest.fail("ran the converter"))
    monkeypatch.setattr(gguf, "converter_dir", lambda **_: pytest.fail("fetched the converter before refusing"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama", "llmrank": {}}))
    with pytest.raises(MissingTokenizerError, match="no tokenizer"):
        gguf.export_gguf(tmp_path / "hf", tmp_path / "m.gguf", outtype="f16")
    with pytest.raises(InputError, match="no config.json"):
        gguf.export_gguf(tmp_path, tmp_path / "m.gguf", outtype="f16")


def test_a_file_transformers_cannot_read_fails_the_check_by_name(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, vocab_size=64)).eval()
    save_hf(model, None, tmp_path / "hf", metadata={})

    def unreadable(_path):
        raise ValueError("GGUF model with architecture gemma3 is not supported yet.")

    monkeypatch.setattr(gguf, "load_gguf_model", unreadable)
    monkeypatch.setattr(gguf, "_llama_cpp_available", lambda: False)  # with llama.cpp, it alone checks the file
    with pytest.raises(gguf.GgufValidationError, match=r"cannot read the written GGUF back.*check=False"):
        gguf.validate_gguf(tmp_path / "m.gguf", tmp_path / "hf", "f16")


# ------------------------------------------------------------------ in llama.cpp itself (llmrank[gguf])


@pytest.fixture(scope="module")
def llama_cpp():
    if not gguf._llama_cpp_available():
        pytest.skip("llama.cpp is not installed: pip install 'llmrank[gguf]' (llama-cpp-python compiles it, "
                    "tens of minutes), then these run")
    import llama_cpp

    return llama_cpp


@pytest.mark.slow
def test_llama_cpp_runs_the_f16_file_like_pytorch(llama_cpp, slim_llama, tmp_path):
    from llmrank.exporters.llamacpp import generate_gguf, llama_logits, load_llama

    hf_dir, slim = slim_llama
    path = tmp_path / "gguf" / "model-f16.gguf"
    result = gguf.export_gguf(hf_dir, path, outtype="f16")
    in_llama = result.check.llama_cpp  # the export's own check ran the file in llama.cpp
    assert in_llama is not None and in_llama["passed"] and in_llama["tokenizer_equal"]
    llm = load_llama(path, n_ctx=64, threads=1)
    ids = torch.randint(0, slim.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want = slim(ids).logits[0]
    got = llama_logits(llm, ids[0].tolist())
    assert got.shape == want.shape
    assert (want - got).abs().max() <= gguf.LLAMA_CPP_MIN_BOUND * want.abs().max()
    new = generate_gguf(path, ids[0, :8].tolist(), 6, llm=llm)
    assert 1 <= len(new) <= 6
    first = want[7].topk(2).values
    if first[0] - first[1] > 1e-2 * want.abs().max():  # a clear winner: llama.cpp's greedy token is PyTorch's
        assert new[0] == int(want[7].argmax())


@pytest.mark.slow
def test_q4_k_m_is_quantized_by_llama_cpp_and_runs_there(llama_cpp, slim_llama, tmp_path):
    from llmrank.exporters.llamacpp import generate_gguf

    hf_dir, slim = slim_llama
    path = tmp_path / "gguf" / "model-q4_k_m.gguf"
    result = gguf.export_gguf(hf_dir, path, outtype="q4_k_m")
    assert path.is_file() and result.architecture == "llama" and result.check is not None and result.check.passed
    assert result.check.llama_cpp is not None and result.check.llama_cpp["tokenizer_equal"]
    ppl = result.check.perplexity  # the quantized file against the f16 file it came from, both in llama.cpp
    assert ppl["passed"] and ppl["ratio"] == pytest.approx(ppl["ppl_q4_k_m"] / ppl["ppl_f16"]) and ppl["tokens"] > 0
    f16 = gguf.export_gguf(hf_dir, tmp_path / "gguf" / "model-f16.gguf", outtype="f16", check=False)
    assert path.stat().st_size < f16.bytes  # quantized, not copied
    assert len(generate_gguf(path, [1, 2, 3, 4], 4)) >= 1
    same = gguf.quantized_perplexity_check(f16.path, f16.path, "f16")  # a file against itself: ratio 1
    assert same["ratio"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_a_quantized_file_past_its_perplexity_bound_is_not_moved_into_place(llama_cpp, slim_llama, tmp_path,
                                                                             monkeypatch):
    hf_dir, _ = slim_llama
    monkeypatch.setattr(gguf, "KQUANT_PPL_BOUND", 0.5)  # no quantized file is twice as good as its f16 source
    path = tmp_path / "gguf" / "model-q4_k_m.gguf"
    with pytest.raises(gguf.GgufValidationError, match="perplexity"):
        gguf.export_gguf(hf_dir, path, outtype="q4_k_m")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # neither the file nor a temporary left behind


@pytest.mark.slow
def test_generate_takes_a_gguf_and_finds_the_tokenizer_beside_it(llama_cpp, slim_llama, tmp_path):
    import shutil

    from llmrank.cli import build_parser, cmd_generate

    hf_dir, _ = slim_llama
    out = tmp_path / "slim"
    shutil.copytree(hf_dir, out / "hf")
    gguf.export_gguf(out / "hf", out / "gguf" / "model-f16.gguf", outtype="f16", check=False)
    done = cmd_generate(build_parser().parse_args(["generate", "--gguf", str(out / "gguf" / "model-f16.gguf"),
                                                   "--prompt", "The city of", "--max-new-tokens", "5", "--quiet"]))
    assert 1 <= len(done["tokens"]) <= 5 and isinstance(done["text"], str)


def test_generate_gguf_without_llama_cpp_names_the_extra(tmp_path, monkeypatch):
    from llmrank.cli import build_parser, cmd_generate
    from llmrank.exporters import llamacpp

    monkeypatch.setattr(llamacpp, "llama_cpp_available", lambda: False)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=r"llmrank\[gguf\]"):
        cmd_generate(build_parser().parse_args(["generate", "--gguf", str(tmp_path / "m.gguf"), "--prompt", "x", "--quiet"]))


@pytest.fixture(scope="module")
def per_layer_llama(converter, tmp_path_factory):
    """A tiny Llama pruned with a global pool (a width per layer) and half its heads, saved as hf/."""
    from llmrank.models import load_tokenizer

    try:
        tokenizer = load_tokenizer("smollm2-135m")
    except RuntimeError as exc:
        pytest.skip(f"SmolLM2's tokenizer is not available: {exc}")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, vocab_size=len(tokenizer))).eval()
    calib = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(1))
    slim = llmrank.prune(model, calib, sparsity=0.3, scorer="l1", pruner="global", head_sparsity=0.5,
                         progress=False).model.eval()
    widths = [layer.mlp.up_proj.out_features for layer in slim.model.layers]
    assert len(set(widths)) > 1  # per-layer: the stock llama GGUF cannot hold it
    root = tmp_path_factory.mktemp("deci")
    save_hf(slim, tokenizer, root / "hf", metadata={})
    return root / "hf", slim, widths


def test_per_layer_widths_are_written_as_deci_by_llama_cpps_converter(per_layer_llama, tmp_path):
    """No llama.cpp needed to write it: the file's per-layer metadata and tensor shapes are the slim model's."""
    from gguf import GGUFReader

    hf_dir, slim, widths = per_layer_llama
    path = tmp_path / "m.gguf"
    gguf._convert(hf_dir, path, "f32", "deci")
    reader = GGUFReader(str(path))

    def values(key):
        field = reader.fields[key]
        return [field.parts[i].tolist()[0] for i in field.data]

    assert gguf._architecture(path) == "deci"
    assert values("deci.feed_forward_length") == widths
    attn = slim.model.layers[0].self_attn
    head_dim = attn.head_dim
    assert values("deci.attention.head_count") == [layer.self_attn.q_proj.out_features // head_dim for layer in slim.model.layers]
    assert values("deci.attention.head_count_kv") == [layer.self_attn.k_proj.out_features // head_dim for layer in slim.model.layers]
    assert values("deci.attention.key_length") == [head_dim]
    shapes = {t.name: t.shape.tolist() for t in reader.tensors}
    for i, width in enumerate(widths):  # GGUF lists dimensions innermost first
        assert shapes[f"blk.{i}.ffn_up.weight"] == [SHAPE["hidden_size"], width]
        assert shapes[f"blk.{i}.ffn_down.weight"] == [width, SHAPE["hidden_size"]]


@pytest.mark.slow
def test_per_layer_deci_file_runs_in_llama_cpp_like_pytorch(llama_cpp, per_layer_llama, tmp_path):
    hf_dir, slim, _ = per_layer_llama
    path = tmp_path / "gguf" / "model-f16.gguf"
    result = gguf.export_gguf(hf_dir, path, outtype="f16")
    assert result.architecture == "deci" and result.check.passed and result.check.llama_cpp["passed"]
    from llmrank.exporters.llamacpp import llama_logits, load_llama

    ids = torch.randint(0, slim.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = slim(ids).logits[0]
    got = llama_logits(load_llama(path, n_ctx=64, threads=1), ids[0].tolist())
    assert (want - got).abs().max() <= gguf.LLAMA_CPP_MIN_BOUND * want.abs().max()


@pytest.mark.slow
def test_heal_writes_a_checked_gguf_of_the_healed_model(slim_llama, tmp_path):
    from llmrank.cli import main

    from test_cli import WORDS

    hf_dir, _ = slim_llama
    rng = random.Random(0)
    text = tmp_path / "calib.txt"  # enough for the held-out tokens beside the training windows
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + " ." for _ in range(900)))
    out = tmp_path / "healed"
    assert main(["heal", str(hf_dir), "--teacher", str(hf_dir.parent / "dense"), "--out", str(out), "--tokens", "64",
                 "--seq-len", "32", "--eval-points", "1", "--calib", str(text), "--no-onnx", "--gguf", "f32", "--quiet"]) == 0
    entry = json.loads((out / "report.json").read_text())["artifacts"]["gguf"]
    assert entry["path"] == "gguf/model-f32.gguf" and entry["check"]["passed"]
    healed = load_hf(out / "hf")  # the file holds the healed weights, not the slim ones it started from
    assert_reads_back(out / entry["path"], healed, "f32", "llama", width=67)


def test_heal_refuses_a_gguf_llama_cpp_cannot_take_before_loading(slim_qwen2, tmp_path, capsys, monkeypatch):
    from llmrank.cli import main

    hf_dir, _ = slim_qwen2
    config = json.loads((hf_dir / "config.json").read_text())
    per_layer = tmp_path / "per-layer"
    per_layer.mkdir()
    config["llmrank"] = {"layer_widths": {"model.layers.0.mlp": 40, "model.layers.1.mlp": 56}}
    (per_layer / "config.json").write_text(json.dumps(config))  # no weights: the refusal must come first
    monkeypatch.setattr(gguf, "converter_dir", lambda **_: pytest.fail("fetched the converter before refusing"))
    assert main(["heal", str(per_layer), "--teacher", str(hf_dir), "--out", str(tmp_path / "o"), "--tokens", "512",
                 "--gguf", "f16", "--quiet"]) == 2
    assert "--allocation uniform" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_row_multiple_and_the_note_for_widths_llama_cpp_runs_slowly():
    assert gguf.row_multiple("q8_0") == gguf.row_multiple("f16") == 32 and gguf.row_multiple("q4_k_m") == 256
    assert gguf.alignment_note({"intermediate_size": 1088}, "q8_0") is None
    assert "1088" in gguf.alignment_note({"intermediate_size": 1088}, "q4_k_m")
    per_layer = {"intermediate_size": 1536, "llmrank": {"layer_widths": {"a": 1024, "b": 1075, "c": 1000}}}
    note = gguf.alignment_note(per_layer, "q4_k_m")
    assert "1000, 1075 are not a multiple of 256" in note and "--multiple 256" in note
