"""ONNX at scale: fp16 files run in onnxruntime, and weights past protobuf's 2 GB limit.

The fp16 checks recompute the relative logit error and the top-1 agreement here, against the
fp32 PyTorch model, instead of trusting the exporter's own numbers. The large-model test builds
a random Llama whose fp32 weights exceed 2 GB (one layer, 131,072-token vocabulary, untied head),
stores it as a sharded bf16 checkpoint, exports it with ``llmrank export`` and runs the file in
onnxruntime from its final place (the external data file is found next to model.onnx).
"""

from __future__ import annotations

import gc
import json

import numpy as np
import onnx
import pytest
import torch
import transformers

from conftest import make_llama, state_bytes
from llmrank.cli import main
from llmrank.exporters import onnx as onnx_exporter
from llmrank.exporters.hf import load_hf
from llmrank.exporters.onnx import FP16_MAX_RELATIVE_ERROR, FP16_MIN_TOP1_AGREEMENT, export_onnx
from llmrank.ir.errors import ExportError

pytestmark = pytest.mark.onnx


def _gemma3() -> torch.nn.Module:
    cfg = transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=64,
                                        sliding_window=8)
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(cfg).eval()


FAMILIES = {"llama": lambda: make_llama(vocab_size=256, hidden_size=64, intermediate_size=128), "gemma3": _gemma3}


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _prefill_and_step(session, ids: torch.Tensor, step: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's prefill logits on ``ids`` and the next logits for ``step`` fed with its own presents."""
    batch, seq = ids.shape
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "position_ids": np.tile(np.arange(seq), (batch, 1))}
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    for inp in past:
        assert inp.type == "tensor(float16)"
        feed[inp.name] = np.zeros((batch, inp.shape[1], 0, inp.shape[3]), dtype=np.float16)
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, feed)))
    feed = {"input_ids": step.numpy(), "attention_mask": np.ones((batch, seq + 1), dtype=np.int64),
            "position_ids": np.full((batch, 1), seq, dtype=np.int64)}
    feed.update({inp.name: outputs[inp.name.replace("past_key_values.", "present.")] for inp in past})
    return outputs["logits"], session.run(["logits"], feed)[0]


def _relative(got: np.ndarray, ref: torch.Tensor) -> float:
    got64 = torch.from_numpy(got.astype(np.float64))
    return float((got64 - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp16_onnx_runs_in_onnxruntime_close_to_fp32(family, tmp_path):
    model = FAMILIES[family]()
    before = state_bytes(model)
    res = export_onnx(model, tmp_path / "model.onnx", with_past=True, dtype=torch.float16)
    assert state_bytes(model) == before and next(model.parameters()).dtype == torch.float32  # the caller's model is untouched
    proto = onnx.load(str(res.path))
    floats = [t for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT)]
    weights = [t for t in floats if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert res.dtype == "float16" and onnx_exporter.read_onnx_metadata(res.path)["dtype"] == "float16"
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", with_past=True)
    weight_bytes = [sum(len(t.raw_data) for t in onnx.load(str(p)).graph.initializer if len(t.dims) == 2) for p in (res.path, fp32.path)]
    assert weight_bytes[0] * 2 == weight_bytes[1]

    gen = torch.Generator().manual_seed(7)
    ids, step = torch.randint(0, 256, (2, 24), generator=gen), torch.randint(0, 256, (2, 1), generator=gen)
    prefill, decode = _prefill_and_step(_session(res.path), ids, step)
    with torch.no_grad():  # the fp32 model, without a cache: an independent route to the same logits
        ref = model(input_ids=torch.cat([ids, step], 1), use_cache=False).logits
    for got, want in ((prefill, ref[:, :-1]), (decode, ref[:, -1:])):
        assert got.dtype == np.float16
        assert _relative(got, want) <= FP16_MAX_RELATIVE_ERROR
        agree = float((torch.from_numpy(got.astype(np.float32)).argmax(-1) == want.argmax(-1)).double().mean())
        assert agree >= FP16_MIN_TOP1_AGREEMENT
    assert 0 < res.relative_error <= FP16_MAX_RELATIVE_ERROR and res.top1_agreement >= FP16_MIN_TOP1_AGREEMENT


def test_fp16_outside_its_bound_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_exporter, "FP16_MAX_RELATIVE_ERROR", 0.0)
    with pytest.raises(ExportError, match="too far from the fp32 model"):
        export_onnx(FAMILIES["llama"](), tmp_path / "model.onnx", with_past=False, dtype=torch.float16)
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_bf16_checkpoint_in_fp32_and_fp16(tmp_path, capsys):
    model = FAMILIES["llama"]().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    reference = load_hf(tmp_path / "bf16", dtype=torch.float32)  # the bf16 weights, computed in fp32
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = reference(input_ids=ids, use_cache=False).logits
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 16), dtype=np.int64)}
    for dtype in ("fp32", "fp16"):
        out = tmp_path / dtype
        assert main(["export", str(tmp_path / "bf16"), "--out", f"{out}/", "--dtype", dtype, "--no-kv-cache", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["dtype"] == {"fp32": "float32", "fp16": "float16"}[dtype]
        (logits,) = _session(out / "model.onnx").run(["logits"], feed)
        if dtype == "fp32":
            assert logits.dtype == np.float32 and np.abs(logits - ref.numpy()).max() <= 1e-4
        else:
            assert logits.dtype == np.float16 and _relative(logits, ref) <= FP16_MAX_RELATIVE_ERROR
            assert 0 < report["relative_error"] <= FP16_MAX_RELATIVE_ERROR and report["top1_agreement"] >= FP16_MIN_TOP1_AGREEMENT
    assert main(["export", str(tmp_path / "bf16"), "--out", str(tmp_path / "q.onnx"), "--dtype", "fp16", "--quantize", "int8"]) == 2
    assert "drop --dtype" in capsys.readouterr().err


@pytest.mark.slow
def test_export_above_2gb_writes_external_data_and_runs(tmp_path, capsys):
    """A sharded bf16 checkpoint whose fp32 weights take 2.29 GB (over protobuf's 2 GB): `llmrank
    export` writes model.onnx plus model.onnx.data atomically, and onnxruntime runs the result from
    where it lands. About 70 s and 7.1 GiB peak RSS (measured) on 2 cores."""
    cfg = transformers.LlamaConfig(vocab_size=131072, hidden_size=2048, intermediate_size=4096, num_hidden_layers=1,
                                   num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval().to(torch.bfloat16)
    assert 4 * sum(p.numel() for p in model.parameters()) > 2**31
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="400MB")
    del model
    gc.collect()
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()

    out = tmp_path / "onnx"
    assert main(["export", str(tmp_path / "ckpt"), "--out", f"{out}/", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    gc.collect()
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]  # nothing staged is left
    data = out / "model.onnx.data"
    assert data.stat().st_size > 2**31 and (out / "model.onnx").stat().st_size < 2**20
    assert report["external_data"] == str(data) and report["bytes"] == data.stat().st_size + (out / "model.onnx").stat().st_size
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert sum(np.prod(t.dims) for t in external) * 4 > 2**31
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"model.onnx.data"}

    session = _session(out / "model.onnx")
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 12), dtype=np.int64),
            "position_ids": np.arange(12)[None]}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            feed[inp.name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), dtype=np.float32)
    (logits,) = session.run(["logits"], feed)
    del session
    reference = load_hf(tmp_path / "ckpt", dtype=torch.float32)
    with torch.no_grad():
        ref = reference(input_ids=ids, use_cache=False).logits.numpy()
    assert np.abs(logits - ref).max() <= 1e-3 + 1e-4 * np.abs(ref).max()


def test_a_bf16_model_exports_as_fp32_checked_against_its_fp32_copy(tmp_path):
    model = FAMILIES["llama"]().to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = export_onnx(model, tmp_path / "model.onnx", with_past=False, dtype=torch.float32)
    assert all(torch.equal(v, before[k]) and v.dtype == torch.bfloat16 for k, v in model.state_dict().items())
    assert res.dtype == "float32" and res.relative_error is None and max(res.max_abs_diff.values()) <= 1e-4
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    (logits,) = _session(res.path).run(["logits"], {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 9), dtype=np.int64)})
    with torch.no_grad():
        ref = model.float()(input_ids=ids, use_cache=False).logits  # bf16 values are exact in fp32
    assert logits.dtype == np.float32 and np.abs(logits - ref.numpy()).max() <= 1e-4
