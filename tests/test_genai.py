"""onnxruntime-genai folders built by its own builder, checked against PyTorch computed here.

A tiny random Llama (hidden 64, FFN 128, 2 layers) with a byte-level tokenizer built in code
(no model hub). References are independent of the exporter's own check: transformers'
`generate` (with its KV cache) for greedy tokens, a plain PyTorch forward for logits, and
`llmrank.evaluate.perplexity` on a PyTorch LogitsFn.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnx_ir")

import onnx  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import llmrank  # noqa: E402
from llmrank.evaluate import perplexity, torch_logits_fn  # noqa: E402
from llmrank.exporters import genai  # noqa: E402
from llmrank.exporters.genai import (  # noqa: E402
    GenaiValidationError,
    export_genai,
    genai_logits_fn,
    generate_genai,
)
from llmrank.exporters.hf import load_hf, mlp_widths, save_hf  # noqa: E402

PROMPTS = ["The city of", "Once upon a time, a small robot", "x = 3\ny ="]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE with no merges: one token per byte, 3 specials (vocab 259)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.1, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tok) -> Path:
    folder = tmp_path_factory.mktemp("dense") / "hf"
    model = tiny_llama(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dense_fp32(tmp_path_factory, dense_dir) -> genai.GenaiExportResult:
    return export_genai(dense_dir, tmp_path_factory.mktemp("g32") / "genai", precision="fp32")


@pytest.fixture(scope="module")
def slim(tok):
    """llmrank.prune with the global pruner: the two layers keep different widths (95 and 84,
    not multiples of the int4 block of 32)."""
    model = tiny_llama(len(tok), seed=0)
    calib = torch.randint(3, len(tok), (8, 32), generator=torch.Generator().manual_seed(0))
    result = llmrank.prune(model, calib, sparsity=0.3, pruner="global", min_width=16, progress=False)
    widths = mlp_widths(result.model)
    assert len(set(widths.values())) > 1, widths
    return result.model, widths


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


def test_fp32_greedy_tokens_equal_pytorch(dense_dir, dense_fp32, tok):
    assert dense_fp32.check is not None and dense_fp32.check.passed and dense_fp32.check.greedy_equal
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"} <= set(dense_fp32.files)
    assert not dense_fp32.per_layer and set(dense_fp32.layer_widths.values()) == {128}
    ref = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        assert generate_genai(dense_fp32.path, ids, 12) == _hf_greedy(ref, ids, 12)
    # a text prompt goes through the folder's own tokenizer (og.Tokenizer)
    assert generate_genai(dense_fp32.path, PROMPTS[0], 5) == _hf_greedy(ref, tok(PROMPTS[0])["input_ids"], 5)


def test_genai_logits_fn_matches_pytorch_and_perplexity(dense_dir, dense_fp32):
    ref = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    fn = genai_logits_fn(dense_fp32.path, threads=1)
    ids = torch.randint(3, 259, (3, 40), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(fn(ids), _logits(ref, ids), atol=1e-4, rtol=0)

    stream = torch.randint(3, 259, (1, 700), generator=torch.Generator().manual_seed(2))
    want = perplexity(torch_logits_fn(ref), stream, seq_len=128, batch_size=2, progress=False)
    got = perplexity(fn, stream, seq_len=128, batch_size=2, progress=False)
    by_path = perplexity(str(dense_fp32.path), stream, seq_len=128, batch_size=2, progress=False)
    assert got.n_tokens == want.n_tokens == by_path.n_tokens
    assert got.ppl == pytest.approx(want.ppl, rel=1e-5)
    assert by_path.ppl == pytest.approx(want.ppl, rel=1e-5)


def test_int4_builds_within_stated_bound(tmp_path, dense_dir, dense_fp32):
    res = export_genai(dense_dir, tmp_path / "g4", precision="int4")
    check = res.check
    assert check is not None and check.passed and check.top1_agreement >= genai.MIN_TOP1["int4"]
    assert 0 < check.mean_kl < 0.2  # measured 0.025 nats; a build of another random model: 0.68
    graph = onnx.load(str(res.path / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 2 * 5 + 1  # qkv, o, gate, up, down per layer; lm_head
    assert res.bytes < dense_fp32.bytes
    # the same bound, measured here on other inputs against a plain PyTorch forward
    ref = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    ids = torch.randint(3, 259, (2, 64), generator=torch.Generator().manual_seed(3))
    want, got = _logits(ref, ids), genai_logits_fn(res.path)(ids)
    top1 = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    assert top1 >= genai.MIN_TOP1["int4"], top1  # a broken build agrees on ~1/259 of positions
    fp32 = genai_logits_fn(dense_fp32.path)(ids)
    assert float((fp32.argmax(-1) == want.argmax(-1)).float().mean()) == 1.0


def test_per_layer_widths_build_and_match(tmp_path, slim, tok):
    model, widths = slim
    save_hf(model, tok, tmp_path / "slim")
    res = export_genai(tmp_path / "slim", tmp_path / "g", precision="fp32")
    assert res.per_layer and res.layer_widths == widths and res.check.passed
    graph = onnx.load(str(res.path / "model.onnx"), load_external_data=False).graph
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    for layer, width in enumerate(widths.values()):
        assert shapes[f"model.layers.{layer}.mlp.down_proj.MatMul.weight"] == [width, 64]
        assert shapes[f"model.layers.{layer}.mlp.gate_proj.MatMul.weight"] == [64, width]
    annotated = {v.name: v.type.tensor_type.shape.dim[-1].dim_value for v in graph.value_info if v.name.endswith("mlp/Mul/output_0")}
    assert list(annotated.values()) == list(widths.values())

    ref = load_hf(tmp_path / "slim")
    ids = torch.randint(3, 259, (2, 30), generator=torch.Generator().manual_seed(4))
    assert torch.allclose(genai_logits_fn(res.path)(ids), _logits(ref, ids), atol=1e-4, rtol=0)
    for text in PROMPTS:
        prompt = tok(text)["input_ids"]
        assert generate_genai(res.path, prompt, 10) == _hf_greedy(model, prompt, 10)


def test_per_layer_module_int4(tmp_path, slim, tok):
    model, widths = slim
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        res = export_genai(model, tmp_path / "g4", precision="int4", tokenizer=tok)
        assert model.training  # the check ran it in eval mode and restored the flag
    finally:
        model.eval()
    assert res.per_layer and res.layer_widths == widths and res.check.passed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # caller's model untouched


@pytest.mark.parametrize("family", ["qwen2", "mistral", "qwen3", "gemma"])
def test_per_layer_widths_other_families(tmp_path, tok, family):
    """Every architecture of the per-layer table, hand-shrunk to widths 96 and 72."""
    import transformers

    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              initializer_range=0.1)
    config, cls = {
        "qwen2": (transformers.Qwen2Config(**kw, tie_word_embeddings=False), transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig(**kw, tie_word_embeddings=False), transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config(**kw, head_dim=16, tie_word_embeddings=False), transformers.Qwen3ForCausalLM),
        "gemma": (transformers.GemmaConfig(**kw, head_dim=16), transformers.GemmaForCausalLM),
    }[family]
    torch.manual_seed(0)
    model = cls(config).eval()
    for layer, width in zip(model.model.layers, (96, 72)):
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            setattr(mlp, name, torch.nn.Linear(64, width, bias=False))
            getattr(mlp, name).weight.data = old.weight.data[:width].clone()
        old = mlp.down_proj
        mlp.down_proj = torch.nn.Linear(width, 64, bias=False)
        mlp.down_proj.weight.data = old.weight.data[:, :width].clone()
    save_hf(model, tok, tmp_path / "slim")
    res = export_genai(tmp_path / "slim", tmp_path / "g", precision="fp32")
    assert res.per_layer and list(res.layer_widths.values()) == [96, 72] and res.check.greedy_equal
    ids = torch.randint(3, 259, (2, 30), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(genai_logits_fn(res.path)(ids), _logits(model, ids), atol=1e-4, rtol=0)


def test_unsupported_per_layer_family_is_refused_before_building(tmp_path, tok):
    import transformers

    config = transformers.OlmoConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=512)
    model = transformers.OlmoForCausalLM(config).eval()
    mlp = model.model.layers[0].mlp
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = (torch.nn.Linear(64, 96, bias=False), torch.nn.Linear(64, 96, bias=False),
                                                 torch.nn.Linear(96, 64, bias=False))
    save_hf(model, tok, tmp_path / "slim")
    with pytest.raises(NotImplementedError, match="pruner='local'"):
        export_genai(tmp_path / "slim", tmp_path / "g", precision="fp32")
    assert not (tmp_path / "g").exists()


def test_failed_check_leaves_nothing(tmp_path, dense_dir, monkeypatch):
    monkeypatch.setitem(genai.MIN_TOP1, "int4", 1.01)
    out = tmp_path / "g"
    with pytest.raises(GenaiValidationError, match="top-1 agreement") as err:
        export_genai(dense_dir, out, precision="int4")
    assert err.value.check.top1_agreement <= 1.0 and not err.value.check.passed
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary sibling


def test_refusals_before_any_work(tmp_path, dense_dir, dense_fp32, tok):
    with pytest.raises(ValueError, match="precision"):
        export_genai(dense_dir, tmp_path / "a", precision="int8")
    with pytest.raises(ValueError, match="CUDA only"):
        export_genai(dense_dir, tmp_path / "a", precision="fp16", device="cpu")
    with pytest.raises(FileExistsError, match="force"):
        export_genai(dense_dir, dense_fp32.path, precision="fp32")
    with pytest.raises(ValueError, match="input folder"):
        export_genai(dense_dir, dense_dir / "genai", precision="fp32")
    with pytest.raises(ValueError, match="tokenizer="):
        export_genai(tiny_llama(len(tok)), tmp_path / "b", precision="fp32")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(FileNotFoundError, match="genai_config.json"):
        genai_logits_fn(dense_dir)


def test_missing_extra_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    with pytest.raises(ImportError, match=r"llmrank\[genai\]"):
        genai._og()


def test_quiet_build_restores_logging(tmp_path, dense_dir):
    logger = logging.getLogger("onnxruntime.quantization")
    level = logger.level
    export_genai(dense_dir, tmp_path / "g", precision="int4", check=False)
    assert logger.level == level
    cfg = json.loads((tmp_path / "g" / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["num_hidden_layers"] == 2 and cfg["model"]["vocab_size"] == 259
    assert np.isfinite(genai_logits_fn(tmp_path / "g")(torch.tensor([[5, 6, 7]])).numpy()).all()


def test_cli_prune_generate_and_eval_on_a_genai_folder(tmp_path, dense_dir, capsys):
    """`llmrank prune --genai fp32`, then `generate --genai` and `eval` on the deployed folder (issue 13)."""
    from llmrank.cli import main

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(200)))
    out = tmp_path / "out"
    code = main(["prune", str(dense_dir), "--sparsity", "0.25", "--samples", "4", "--seq-len", "32", "--calib", str(text),
                 "--out", str(out), "--no-onnx", "--genai", "fp32", "--quiet", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    built = report["artifacts"]["genai"]
    assert built["path"] == "genai" and built["check"]["passed"] and built["check"]["greedy_equal"]
    assert genai.is_genai_folder(out / "genai")

    assert main(["generate", "--genai", str(out / "genai"), "--prompt", "the quick", "--max-new-tokens", "6", "--json", "--quiet"]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    slim = load_hf(out / "hf")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "genai")
    prompt = tok("the quick")["input_ids"]
    assert tokens == _hf_greedy(slim, prompt, 6)[: len(tokens)]

    assert main(["eval", str(out / "genai"), "--ppl-source", str(text), "--ppl-tokens", "256", "--seq-len", "32",
                 "--tasks", "none", "--json", "--quiet"]) == 0
    genai_ppl = json.loads(capsys.readouterr().out)["perplexity"]["ppl"]
    assert main(["eval", str(out / "hf"), "--ppl-source", str(text), "--ppl-tokens", "256", "--seq-len", "32",
                 "--tasks", "none", "--json", "--quiet"]) == 0
    torch_ppl = json.loads(capsys.readouterr().out)["perplexity"]["ppl"]
    assert genai_ppl == pytest.approx(torch_ppl, rel=1e-3)


def test_genai_options_are_checked_before_loading(tmp_path, capsys):
    from llmrank.cli import main

    code = main(["prune", "no-such-model", "--out", str(tmp_path / "o"), "--genai", "fp16", "--genai-device", "cpu"])
    assert code == 2 and "CUDA only" in capsys.readouterr().err


def test_building_leaves_the_root_logger_as_it_was(tmp_path, dense_dir):
    """onnxruntime's int4 quantizer configures the root logger on import; a build must not keep that."""
    import logging

    saved, level = list(logging.root.handlers), logging.root.level
    logging.root.handlers[:] = []  # as in a plain process (pytest installs its own capture handler)
    for name in [m for m in sys.modules if m.startswith("onnxruntime.quantization")]:
        del sys.modules[name]  # so the quantizer's import-time basicConfig runs again
    try:
        export_genai(dense_dir, tmp_path / "int4", precision="int4", check=False)
        assert logging.root.handlers == [] and logging.root.level == level
    finally:
        logging.root.handlers[:] = saved
