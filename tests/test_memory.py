"""The in-memory prune's memory estimate against measured peaks, and what it reads."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
import transformers as T

from llmrank.cli import build_parser, prune_config
from llmrank.memory import ModelShape, estimate_in_memory_peak, params_from_config, read_shape

MEASURED = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "memory.json"
TOLERANCE = 0.15
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
              max_position_embeddings=64)


def _rows() -> list[dict]:
    return [r for r in json.loads(MEASURED.read_text())["rows"] if r.get("exit_code") == 0]


def _job_flags(row: dict):
    """The run's prune settings, parsed from its recorded command by the CLI's own parser."""
    argv = shlex.split(row["command"])[1:]  # drop "llmrank"
    return build_parser().parse_args(argv)


def test_measurements_cover_the_models_and_both_onnx_modes():
    rows = _rows()
    assert len({r["model"] for r in rows}) >= 3
    assert any(not r["onnx"] for r in rows) and any(r["onnx"] for r in rows)


@pytest.mark.parametrize("row", _rows(), ids=lambda r: f"{r['model']}-{'onnx' if r['onnx'] else 'no-onnx'}")
def test_estimate_is_within_15_percent_of_every_measured_peak(row):
    args = _job_flags(row)
    config = prune_config(args)  # the flags as the CLI resolves them (a preset fills what was not given)
    shape = ModelShape(params=row["params"], vocab=row["vocab"], hidden=row["hidden"], intermediate=row["intermediate"],
                       layers=row["layers"])
    est = estimate_in_memory_peak(shape, onnx=row["onnx"], seq_len=args.seq_len, batch_size=config.batch_size,
                                  sparsity=config.sparsity, compensation=config.compensation)
    assert abs(est - row["peak_rss_bytes"]) <= TOLERANCE * row["peak_rss_bytes"], (est, row["peak_rss_bytes"])


def _model(family: str) -> torch.nn.Module:
    if family == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **COMMON))
    if family == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=2, **COMMON))
    if family == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **COMMON))
    if family == "qwen3":
        return T.Qwen3ForCausalLM(T.Qwen3Config(num_key_value_heads=2, head_dim=8, **COMMON))
    return T.Gemma3ForCausalLM(T.Gemma3TextConfig(num_key_value_heads=1, head_dim=32, **COMMON))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_params_from_config_counts_what_the_model_holds(family):
    model = _model(family)
    held = sum(p.numel() for p in model.parameters())  # shared (tied) tensors once
    assert params_from_config(model.config.to_dict()) == held


def test_read_shape_reads_config_json_and_no_weights(tmp_path):
    model = _model("qwen2")
    model.config.to_json_file(tmp_path / "config.json")
    # a weights file nobody can read: the estimate must not need it
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    shape = read_shape(tmp_path)
    assert shape == ModelShape(params=sum(p.numel() for p in model.parameters()), vocab=100, hidden=64, intermediate=96, layers=2)
    (tmp_path / "model.safetensors").unlink()
    assert read_shape(tmp_path) == shape


def test_read_shape_is_none_for_a_config_it_cannot_count(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    assert read_shape(tmp_path) is None


def _job(folder: Path, tmp_path: Path, **kw):
    from llmrank.workflow import PruneJob

    return PruneJob(model=str(folder), out=tmp_path / "out", **kw)


@pytest.fixture
def llama_folder(tmp_path) -> Path:
    folder = tmp_path / "llama"
    _model("llama").save_pretrained(folder, safe_serialization=True)
    return folder


def test_choose_route_goes_block_by_block_when_the_estimate_exceeds_the_budget(llama_folder, tmp_path):
    """The old rule (2 x fp32 weights, ~0.6 MB here) kept this in memory under 100 MB; the
    estimate counts the process, the refit statistics and the logits, and does not."""
    from llmrank.memory import job_peak
    from llmrank.workflow import choose_route

    budget = 100 * 10**6
    layerwise, why, folder = choose_route(_job(llama_folder, tmp_path, max_memory=budget))
    assert layerwise and folder == llama_folder
    assert "estimated from config.json" in why and "of --max-memory" in why
    need = job_peak(llama_folder, onnx=True, seq_len=512, batch_size=4, sparsity=0.3, compensation="lstsq")
    assert need > budget and f"{need / 1e9:.3g} GB" in why


def test_choose_route_stays_in_memory_when_the_estimate_fits(llama_folder, tmp_path):
    from llmrank.workflow import choose_route

    layerwise, why, _ = choose_route(_job(llama_folder, tmp_path, max_memory=10 * 10**9))
    assert not layerwise and why.startswith("in memory") and "estimated from config.json" in why


def test_choose_route_falls_back_to_a_multiple_of_the_weights_for_an_uncountable_config(llama_folder, tmp_path):
    from llmrank.memory import FALLBACK_PEAK_RATIO
    from llmrank.passes.blocks.checkpoint import fp32_size
    from llmrank.workflow import choose_route

    config = json.loads((llama_folder / "config.json").read_text())
    del config["intermediate_size"]
    (llama_folder / "config.json").write_text(json.dumps(config))
    fp32 = fp32_size(llama_folder)
    layerwise, why, _ = choose_route(_job(llama_folder, tmp_path, max_memory=int(FALLBACK_PEAK_RATIO * fp32) - 1))
    assert layerwise and f"{FALLBACK_PEAK_RATIO:g} x the fp32 weights" in why
    layerwise, _, _ = choose_route(_job(llama_folder, tmp_path, max_memory=int(FALLBACK_PEAK_RATIO * fp32) + 1))
    assert not layerwise


@pytest.mark.parametrize("row", [r for r in _rows() if r["onnx"]], ids=lambda r: r["model"])
def test_onnx_export_need_covers_the_measured_export_step(row):
    """The export step of the in-memory job held the dense model too: what the export alone needs
    (from the slim model's parameters) plus the dense weights is at least the measured peak of
    the steps from the export on, within the same 15 %."""
    from llmrank.memory import onnx_export_need, slim_params

    args = _job_flags(row)
    shape = ModelShape(row["params"], row["vocab"], row["hidden"], row["intermediate"], row["layers"])
    export_start = next((t for t, line, _ in row.get("steps", []) if "onnx" in line.lower() or "torchvision" in line), None)
    if export_start is None:
        pytest.skip("this run recorded no step lines")
    measured = max(rss for t, _, rss in row["steps"] if t >= export_start)  # per step, from every 0.2 s sample
    got = onnx_export_need(slim_params(shape, args.sparsity), layers=row["layers"]) + 4 * row["params"]
    assert got >= (1 - TOLERANCE) * measured and got <= (1 + TOLERANCE) * measured, (got, measured)


def test_onnx_export_need_counts_a_bf16_checkpoint_and_its_fp32_copy():
    from llmrank.memory import onnx_export_need

    assert onnx_export_need(10**8, stored_bytes_per_param=2) - onnx_export_need(10**8) == 2 * 10**8


def test_external_data_threshold_is_the_exporters():
    from llmrank.exporters.onnx import EXTERNAL_DATA_BYTES
    from llmrank.memory import EXTERNAL_DATA_BYTES as assumed

    assert assumed == EXTERNAL_DATA_BYTES
