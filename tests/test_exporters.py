"""Exporters on tiny random models of five families, dense widths cut to ~75 %.

One KV-cache ONNX export per family (module-scoped, shared by the tests below it)
keeps the file within a few minutes on 2 CPU cores: that graph covers prefill
(empty past) at several shapes, decode steps and greedy generation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.onnx
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    Phi3Config,
    Qwen2Config,
)

from llmrank.exporters import onnx as onnx_exporter  # noqa: E402
from llmrank.exporters.atomic import atomic_path, refuse_input_overlap  # noqa: E402
from llmrank.exporters.hf import load_hf, mlp_widths, save_hf  # noqa: E402
from llmrank.exporters.onnx import (  # noqa: E402
    OnnxValidationError,
    export_onnx,
    generate_onnx,
    read_onnx_metadata,
    validate_onnx,
)

VOCAB = 256
EOS = VOCAB - 1  # inside the vocabulary, rarely produced by a random model
COMMON = dict(vocab_size=VOCAB, initializer_range=0.1, eos_token_id=EOS, bos_token_id=1, pad_token_id=0)
DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

# family -> (config factory, kept FFN width per layer); llama keeps different widths per layer.
FAMILIES = {
    "llama": (lambda **kw: LlamaConfig(**{**DECODER, **COMMON, **kw}), [96, 80]),
    "qwen2": (lambda **kw: Qwen2Config(**{**DECODER, **COMMON, **kw}), [96, 96]),
    # Sliding window 4 < generated length: decode must keep applying the window. Untied here
    # because a tied random Gemma just repeats its last input token (a useless generation
    # check); tied Gemma is covered by test_hf_roundtrip_tied_gemma3.
    "gemma3": (
        lambda **kw: Gemma3TextConfig(
            **{**DECODER, **COMMON, "tie_word_embeddings": False, **kw},
            head_dim=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
        [96, 96],
    ),
    "phi3": (lambda **kw: Phi3Config(**{**DECODER, **COMMON, **kw}), [96, 96]),
    "gpt2": (
        lambda **kw: GPT2Config(**{"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, **COMMON, **kw}),
        [192, 192],
    ),
}


# ---------------------------------------------------------------- shrinking (test-only)


def _keep(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def _param(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t.detach().clone())


def _shrink_linear_rows(lin: torch.nn.Linear, idx: torch.Tensor) -> None:
    lin.weight = _param(lin.weight[idx])
    if lin.bias is not None:
        lin.bias = _param(lin.bias[idx])
    lin.out_features = len(idx)


def _shrink_linear_cols(lin: torch.nn.Linear, idx: torch.Tensor) -> None:
    lin.weight = _param(lin.weight[:, idx])
    lin.in_features = len(idx)


def shrink_mlps(model: torch.nn.Module, widths: list[int]) -> None:
    """Slice each layer's FFN to `widths[i]` neurons (a random subset)."""
    mlps = [m for n, m in model.named_modules() if n.endswith(".mlp")]
    assert len(mlps) == len(widths)
    for layer, (mlp, k) in enumerate(zip(mlps, widths)):
        if hasattr(mlp, "gate_up_proj"):  # Phi3: gate rows then up rows in one Linear
            full = mlp.down_proj.in_features
            idx = _keep(full, k, layer)
            _shrink_linear_rows(mlp.gate_up_proj, torch.cat([idx, idx + full]))
            _shrink_linear_cols(mlp.down_proj, idx)
        elif hasattr(mlp, "gate_proj"):
            idx = _keep(mlp.down_proj.in_features, k, layer)
            _shrink_linear_rows(mlp.gate_proj, idx)
            _shrink_linear_rows(mlp.up_proj, idx)
            _shrink_linear_cols(mlp.down_proj, idx)
        else:  # GPT-2 Conv1D: weight is (in, out)
            idx = _keep(mlp.c_fc.nf, k, layer)
            mlp.c_fc.weight = _param(mlp.c_fc.weight[:, idx])
            mlp.c_fc.bias = _param(mlp.c_fc.bias[idx])
            mlp.c_fc.nf = k
            mlp.c_proj.weight = _param(mlp.c_proj.weight[idx])
            mlp.c_proj.nx = k


def build(name: str, widths: list[int] | None = None, **config: object) -> torch.nn.Module:
    make_config, default_widths = FAMILIES[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(**config)).eval()
    shrink_mlps(model, widths or default_widths)
    return model


# ---------------------------------------------------------------- shared exports


class _Exports:
    """One KV export per family, made on first use and shared by every test."""

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict[str, SimpleNamespace] = {}

    def get(self, name: str) -> SimpleNamespace:
        if name not in self.cache:
            model = build(name)
            path = self.root / name / "decoder.onnx"
            result = export_onnx(
                model, path, with_past=True, metadata={"scorer": "test", "sparsity": 0.25, "source_model": name}
            )
            self.cache[name] = SimpleNamespace(name=name, model=model, path=path, result=result)
        return self.cache[name]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> _Exports:
    return _Exports(tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, exports) -> SimpleNamespace:
    return exports.get(request.param)


# ---------------------------------------------------------------- KV export per family


def test_shrunk_widths_are_physical(family):
    assert list(mlp_widths(family.model).values()) == FAMILIES[family.name][1]


def test_kv_export_matches_torch(family):
    diffs = family.result.max_abs_diff
    for case in ("prefill_2x16", "prefill_1x37", "prefill_1x1", "decode_2x16+1", "decode_1x1+1"):
        assert diffs[case] <= 1e-4, (case, diffs)
    assert family.result.onnx_bytes > 0 and family.result.export_seconds > 0


def test_kv_graph_io(family):
    session = ort.InferenceSession(str(family.path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    assert {"input_ids", "attention_mask", "position_ids"} <= set(inputs)
    assert inputs["past_key_values.0.key"][0] == inputs["input_ids"][0]  # shared symbolic batch
    assert isinstance(inputs["past_key_values.1.value"][2], str)  # dynamic past length
    assert outputs[0] == "logits" and "present.1.value" in outputs
    # Shrunk widths are physical in the graph's weights (per layer for llama).
    shapes = {tuple(i.dims) for i in onnx.load(str(family.path)).graph.initializer}
    for width in set(FAMILIES[family.name][1]):
        assert any(width in s for s in shapes), (width, shapes)


def test_revalidate_and_decode_chain(family):
    """validate_onnx alone, at other shapes: (3, 7) prefill and a decode on top."""
    diffs = validate_onnx(family.model, family.path, [(3, 7), (1, 1)], atol=1e-4)
    assert set(diffs) >= {"prefill_3x7", "decode_3x7+1", "decode_1x1+1"}


def test_left_padded_batch(family):
    """attention_mask is honoured: a left-padded row matches PyTorch at its real tokens."""
    model, session = family.model, ort.InferenceSession(str(family.path), providers=["CPUExecutionProvider"])
    ids = torch.randint(2, VOCAB - 1, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    feed.update(onnx_exporter.empty_past(session, 2))
    got = session.run(None, feed)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool().numpy()
    np.testing.assert_allclose(got[0][real], ref.numpy()[real], atol=1e-4)
    # next token on top of the padded cache
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    step = {
        "input_ids": np.array([[7], [9]], dtype=np.int64),
        "attention_mask": step_mask.numpy(),
        "position_ids": (pos[:, -1:] + 1).numpy(),
        **onnx_exporter.feed_from_presents(session, got),
    }
    dec = session.run(None, step)
    with torch.no_grad():
        full = model(
            input_ids=torch.cat([ids, torch.tensor([[7], [9]])], dim=1),
            attention_mask=step_mask,
            position_ids=torch.cat([pos, pos[:, -1:] + 1], dim=1),
        ).logits[:, -1:]
    np.testing.assert_allclose(dec[0], full.numpy(), atol=1e-4)


def test_greedy_generation_matches_torch(family):
    prompt = [5, 17, 42, 3]
    with torch.no_grad():
        ids = torch.tensor([prompt])
        ref = family.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False
        )[0, len(prompt) :]
    got = generate_onnx(family.path, prompt, max_new_tokens=20)
    assert got == ref.tolist()
    assert len(got) == 20 or got[-1] == EOS


def test_metadata_in_onnx_file(family):
    meta = read_onnx_metadata(family.path)
    assert meta["scorer"] == "test" and meta["sparsity"] == "0.25" and meta["source_model"] == family.name
    assert meta["llmrank.version"] and meta["llmrank.form"] == "decoder_with_past"
    assert json.loads(meta["layer_widths"]) == mlp_widths(family.model)
    assert json.loads(meta["eos_token_id"]) == EOS


def test_hf_roundtrip(family, tmp_path):
    model = family.model
    out = tmp_path / "hf"
    saved = save_hf(model, None, out, metadata={"scorer": "test"})
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
        reloaded = load_hf(out)
        assert torch.equal(reloaded(ids).logits, ref)
        if saved.uniform:
            stock = AutoModelForCausalLM.from_pretrained(out).eval()
            assert torch.equal(stock(ids).logits, ref)
        else:
            config = json.loads((out / "config.json").read_text())
            assert config["llmrank"]["layer_widths"] == mlp_widths(model)
            with pytest.raises(Exception):  # stock loading refuses the mismatched shapes loudly
                AutoModelForCausalLM.from_pretrained(out)
    for m in (model, reloaded):
        tied = m.get_output_embeddings().weight is m.get_input_embeddings().weight
        assert tied == bool(model.config.tie_word_embeddings)


def test_hf_roundtrip_tied_gemma3(tmp_path):
    """Tied embeddings survive per-layer widths through save_hf/load_hf."""
    model = build("gemma3", [96, 64], tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    save_hf(model, None, tmp_path / "hf", metadata={})
    reloaded = load_hf(tmp_path / "hf")
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


# ---------------------------------------------------------------- logits-only form


@pytest.mark.parametrize(
    "name, options",
    [("gpt2", {"optimize": True, "external_data": True})],
    ids=["gpt2-optimized-external"],
)
def test_logits_only_export(name, options, tmp_path):
    model = build(name)
    path = tmp_path / "prefill.onnx"
    result = export_onnx(model, path, with_past=False, metadata={"scorer": "test"}, **options)
    assert result.max_abs_diff["prefill_1x1"] <= 1e-4 and len(result.max_abs_diff) == 3
    assert read_onnx_metadata(path)["llmrank.form"] == "logits"
    if options.get("external_data"):
        assert result.data_path == tmp_path / "prefill.onnx.data" and result.data_bytes > 0
    else:
        assert result.data_path is None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["prefill.onnx"] + (["prefill.onnx.data"] if options.get("external_data") else [])
    )
    # Shrunk widths are physical in the graph's weights.
    shapes = {tuple(i.dims) for i in onnx.load(str(path)).graph.initializer}
    for width in set(FAMILIES[name][1]):
        assert any(width in s for s in shapes), (width, shapes)
    # Logits-only graphs also generate (recomputing the sequence each step).
    prompt = [5, 17, 42]
    with torch.no_grad():
        ids = torch.tensor([prompt])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    ref = ref[0, len(prompt) :]
    assert generate_onnx(path, prompt, 5) == ref.tolist()


# ---------------------------------------------------------------- atomicity and overwrite


class _CopyProgram:
    """Stands in for torch.onnx's program: 'exports' an existing ONNX file (no tracing cost)."""

    def __init__(self, source: Path):
        self.source = source

    def save(self, destination: str, external_data: bool = False) -> None:
        shutil.copyfile(self.source, destination)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_failed_validation_leaves_nothing(exports, tmp_path, monkeypatch):
    """A graph that does not match the model is refused and nothing appears at the final name."""
    llama = exports.get("llama")
    monkeypatch.setattr(onnx_exporter, "_export_program", lambda *a, **k: _CopyProgram(llama.path))
    other = build("llama")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05)
    final = tmp_path / "out" / "model.onnx"
    with pytest.raises(OnnxValidationError) as err:
        export_onnx(other, final, with_past=True, metadata={})
    assert max(err.value.diffs.values()) > 1e-4
    assert _leftovers(final.parent) == []


def test_relative_tolerance_scales_with_the_outputs(exports):
    """atol + rtol * max|PyTorch output|: the relative term alone can admit a difference."""
    llama = exports.get("llama")
    other = build("llama")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1e-3)
    diffs = validate_onnx(other, llama.path, [(1, 5)], atol=None)
    assert max(diffs.values()) > 0
    with pytest.raises(OnnxValidationError, match="rtol"):
        validate_onnx(other, llama.path, [(1, 5)], atol=0.0, rtol=1e-9)
    assert validate_onnx(other, llama.path, [(1, 5)], atol=0.0, rtol=10.0) == diffs


def test_export_crash_midway_leaves_nothing(tmp_path, monkeypatch):
    class _Crashing:
        def save(self, destination: str, external_data: bool = False) -> None:
            Path(destination).write_bytes(b"partial")
            Path(destination + ".data").write_bytes(b"partial")
            raise RuntimeError("disk full")

    monkeypatch.setattr(onnx_exporter, "_export_program", lambda *a, **k: _Crashing())
    final = tmp_path / "model.onnx"
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(build("gpt2"), final, with_past=True, metadata={})
    assert _leftovers(tmp_path) == []


def test_refuse_overwrite_then_force(exports, tmp_path, monkeypatch):
    llama = exports.get("llama")
    final = tmp_path / "model.onnx"
    final.write_bytes(b"old")
    stale = tmp_path / "model.onnx.data"
    stale.write_bytes(b"stale")
    with pytest.raises(FileExistsError, match="force"):
        export_onnx(llama.model, final, with_past=True, metadata={})
    assert final.read_bytes() == b"old"
    monkeypatch.setattr(onnx_exporter, "_export_program", lambda *a, **k: _CopyProgram(llama.path))
    result = export_onnx(llama.model, final, with_past=True, metadata={"run": "second"}, force=True)
    assert read_onnx_metadata(final)["run"] == "second"
    assert result.data_path is None and not stale.exists()  # no stale weights beside the new graph
    assert _leftovers(tmp_path) == ["model.onnx"]


def test_atomic_path_file_and_dir(tmp_path):
    target = tmp_path / "a.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and not target.exists()
        tmp.write_text("one")
    assert target.read_text() == "one"
    with pytest.raises(FileExistsError, match="force=True"):
        with atomic_path(target):
            pass
    with pytest.raises(ValueError):
        with atomic_path(target, force=2) as tmp:  # a .txt is no llmrank output: force=True would refuse it
            tmp.write_text("two")
            raise ValueError("boom")
    assert target.read_text() == "one" and _leftovers(tmp_path) == ["a.txt"]

    folder = tmp_path / "d"
    for text in ("first", "second"):
        with atomic_path(folder, force=2) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(text)
    assert (folder / "f").read_text() == "second" and _leftovers(tmp_path) == ["a.txt", "d"]


def test_refuse_input_overlap(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for bad in (model_dir, model_dir / "pruned", tmp_path):
        with pytest.raises(ValueError):
            refuse_input_overlap(bad, model_dir)
    refuse_input_overlap(tmp_path / "elsewhere", model_dir)
    refuse_input_overlap(tmp_path / "elsewhere", "org/hub-id")  # not a local folder
    refuse_input_overlap(tmp_path / "elsewhere", None)


def test_save_hf_refuses_overwrite_and_input_folder(tmp_path):
    model = build("gpt2")
    out = tmp_path / "hf"
    save_hf(model, None, out, metadata={})
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="force"):
        save_hf(model, None, out, metadata={})
    assert (out / "model.safetensors").read_bytes() == before
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # name_or_path is now `out`
    with pytest.raises(ValueError):
        save_hf(reloaded, None, out / "inside", metadata={})
    save_hf(model, None, out, metadata={"second": 1}, force=True)
    assert json.loads((out / "config.json").read_text())["llmrank"]["metadata"] == {"second": "1"}
    assert _leftovers(tmp_path) == ["hf"]
