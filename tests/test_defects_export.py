"""Issue 22, the export and heal items: head cuts whose counts transformers' config refuses,
onnxruntime-genai inputs the builder cannot take, and the report of a healed prune."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

import llmrank
from llmrank.exporters.hf import check_reload, save_hf
from llmrank.passes.verify import outputs

V = 128


def _ids(seed: int = 1, shape=(4, 16)) -> torch.Tensor:
    return torch.randint(3, V, shape, generator=torch.Generator().manual_seed(seed))


def _tiny(family: str, heads: int, kv: int, hidden: int) -> torch.nn.Module:
    common = dict(vocab_size=V, max_position_embeddings=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=kv)
    torch.manual_seed(0)
    if family == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**common)).eval()
    if family == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**common)).eval()
    if family == "gemma3":  # explicit head_dim, qk-norm, sliding window
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**common, head_dim=8, sliding_window=4)).eval()
    raise KeyError(family)


# ---------------------------------------------------------------------- item 6: head counts that do not divide hidden_size


@pytest.mark.parametrize("family, heads, kv, hidden, sparsity, kept", [
    ("llama", 4, 4, 32, 0.25, 3),   # MHA 4/4 at 0.25: 3 heads, 32 % 3 != 0
    ("llama", 5, 5, 40, 0.5, 3),    # MHA 5/5 at 0.5: 3 heads, 40 % 3 != 0
    ("qwen2", 4, 4, 32, 0.25, 3),   # Qwen2's config does not check divisibility: stays stock-loadable
    ("gemma3", 4, 1, 32, 0.25, 3),  # gemma-3-270m's layout (MQA, explicit head_dim) at 0.25
])
def test_head_cut_whose_count_does_not_divide_hidden_saves_and_reloads(tmp_path, family, heads, kv, hidden, sparsity, kept):
    model = _tiny(family, heads, kv, hidden)
    result = llmrank.prune(model, _ids(), head_sparsity=sparsity, compensation="none", progress=False)
    assert {tuple(h["heads"]) for h in result.heads.values()} == {(heads, kept)}, result.heads
    assert hidden % kept != 0
    saved = save_hf(result.model, None, tmp_path / "hf")
    T.AutoConfig.from_pretrained(tmp_path / "hf")  # transformers accepts the file ...
    info = json.loads((tmp_path / "hf" / "config.json").read_text())
    expected_kv = kept if kv == heads else kv
    if family == "qwen2":
        assert saved.stock_loadable and (info["num_attention_heads"], info["num_key_value_heads"]) == (kept, expected_kv)
    else:
        assert not saved.stock_loadable and hidden % info["num_attention_heads"] == 0
        assert info["llmrank"]["layer_heads"] == {f"model.layers.{i}.self_attn": [kept, expected_kv] for i in range(2)}
    check_reload(tmp_path / "hf", result.model, stock=saved.stock_loadable)
    reloaded = llmrank.load(tmp_path / "hf")  # ... and llmrank.load rebuilds the cut model from it
    for i in range(2):
        attn = reloaded.model.layers[i].self_attn
        assert attn.q_proj.out_features == kept * attn.head_dim == kept * 8
    x = _ids(seed=7, shape=(2, 12))
    assert torch.allclose(outputs(reloaded, (x,)), outputs(result.model, (x,)), atol=1e-5)
    assert result.model.config.num_attention_heads == kept  # the live model's config is left as it was


def test_a_checkpoint_that_cannot_be_written_says_why_on_one_line(tmp_path, monkeypatch):
    from llmrank.ir.errors import ExportError

    model = _tiny("llama", 4, 2, 32)

    def refuse(*_a, **_k):
        raise ValueError("first line\nthe useful second line")

    monkeypatch.setattr(type(model), "save_pretrained", refuse)
    with pytest.raises(ExportError, match="first line the useful second line"):
        save_hf(model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------- item 7: what onnxruntime-genai's builder takes


def _save_dense(folder, model, tok):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.onnx
def test_gemma3_with_transformers5_rope_builds_and_matches_pytorch(tmp_path):
    """transformers 5 nests Gemma-3's rope per layer type; the builder read it flat (KeyError 'rope_type')."""
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("onnx_ir")
    from test_genai import byte_tokenizer

    from llmrank.exporters.genai import export_genai, genai_logits_fn, generate_genai

    tok = byte_tokenizer()
    cfg = T.Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=64,
                             max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    assert set(cfg.rope_parameters) == {"full_attention", "sliding_attention"}
    torch.manual_seed(0)
    model = T.Gemma3ForCausalLM(cfg).eval()
    src = _save_dense(tmp_path / "hf", model, tok)
    res = export_genai(src, tmp_path / "genai", precision="fp32")
    assert res.check.passed and res.check.greedy_equal
    # independently: 100 positions, past the sliding window of 64, where the local rope theta matters,
    # and 40, fewer than the window (the window-sized KV cache refused a max_length below it)
    fn = genai_logits_fn(res.path)
    for n in (100, 40):
        ids = torch.randint(3, len(tok), (2, n), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            want = model(input_ids=ids, use_cache=False).logits
        assert torch.allclose(fn(ids), want, atol=1e-4, rtol=0), n
    assert generate_genai(res.path, [5, 6, 7], 4) == model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4,
                                                                      do_sample=False)[0, 3:].tolist()
    assert json.loads((src / "config.json").read_text())["rope_parameters"] == cfg.to_dict()["rope_parameters"]  # untouched


def test_genai_refuses_what_its_builder_cannot_take_before_any_work(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("onnx_ir")
    from llmrank.exporters.genai import check_model
    from llmrank.ir.errors import ConfigError

    gpt2 = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConfigError, match="does not build GPT2LMHeadModel.*drop --genai"):
        check_model(gpt2, "cpu")
    narrow = T.LlamaConfig(hidden_size=32, num_attention_heads=4, architectures=["LlamaForCausalLM"])  # head_dim 8
    with pytest.raises(ConfigError, match="head_dim 8 is not a multiple of 16"):
        check_model(narrow, "cpu")
    check_model(T.LlamaConfig(hidden_size=64, num_attention_heads=4, architectures=["LlamaForCausalLM"]), "cpu")
    gemma3 = T.Gemma3TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                architectures=["Gemma3ForCausalLM"])
    check_model(gemma3, "cpu")


def test_prune_genai_on_a_model_the_builder_cannot_take_exits_2_before_loading(tmp_path, capsys):
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("onnx_ir")
    from test_cli import make_tokenizer

    from llmrank.cli import main

    folder = tmp_path / "gpt2"
    T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not weights")  # refused from config.json alone: never read
    out = tmp_path / "out"
    assert main(["prune", str(folder), "--out", str(out), "--genai", "int4", "--seq-len", "32", "--quiet"]) == 2
    assert "does not build GPT2LMHeadModel" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.onnx
def test_a_failed_genai_build_keeps_hf_and_onnx_and_says_so(tmp_path, capsys):
    """A head cut to 3 of 4 heads (64 % 3 != 0) leaves counts the builder's config cannot hold:
    genai/ fails after hf/ and onnx/ were written, and those stay."""
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("onnx_ir")
    import random

    from test_cli import WORDS, save_tiny_llama

    from llmrank.cli import main
    from llmrank.exporters.hf import load_hf

    model_dir = save_tiny_llama(tmp_path / "tiny", hidden_size=64, num_key_value_heads=4)  # head_dim 16, MHA
    text = tmp_path / "calib.txt"
    rng = random.Random(0)
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(100)))
    out = tmp_path / "out"
    code = main(["prune", str(model_dir), "--sparsity", "0.25", "--head-sparsity", "0.25", "--samples", "2", "--seq-len", "16",
                 "--calib", str(text), "--out", str(out), "--genai", "fp32", "--quiet"])
    err = capsys.readouterr().err
    assert code == 5, err
    assert "genai/ was not built" in err and "llmrank export" in err
    report = json.loads((out / "report.json").read_text())
    assert "layer_heads" in report["failed"]["genai"]["error"]
    assert {"hf", "onnx"} <= set(report["artifacts"]) and "genai" not in report["artifacts"]
    assert (out / report["artifacts"]["onnx"]["path"]).is_file() and not (out / "genai").exists()
    assert load_hf(out / "hf").model.layers[0].self_attn.q_proj.out_features == 3 * 16
    assert not list(tmp_path.glob(".out*"))  # no temporary folder left beside it


# ---------------------------------------------------------------------- item 4: the report of a healed prune


def _relative_error(model: torch.nn.Module, dense: torch.nn.Module, x: torch.Tensor) -> float:
    got, ref = outputs(model.eval(), (x,)).double(), outputs(dense.eval(), (x,)).double()
    return float((got - ref).norm() / ref.norm())


def test_prune_heal_reports_the_healed_model_and_labels_the_checks_before_it(tmp_path):
    import random

    from test_cli import WORDS, save_tiny_llama

    from llmrank.cli import main
    from llmrank.data import calibration_tokens
    from llmrank.exporters.hf import load_hf
    from llmrank.models import load_tokenizer

    model_dir = save_tiny_llama(tmp_path / "tiny", initializer_range=0.1)
    text = tmp_path / "calib.txt"
    rng = random.Random(0)
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + " ." for _ in range(600)))
    common = ["--sparsity", "0.5", "--samples", "4", "--seq-len", "32", "--calib", str(text), "--no-onnx", "--quiet"]
    assert main(["prune", str(model_dir), "--out", str(tmp_path / "plain"), *common]) == 0
    assert main(["prune", str(model_dir), "--out", str(tmp_path / "healed"), "--heal-tokens", "256", "--heal-lr", "1e-3",
                 *common]) == 0
    report = json.loads((tmp_path / "healed" / "report.json").read_text())

    # the pipeline's sample: the first two calibration sequences (seed 0), at most 64 tokens
    x = calibration_tokens(load_tokenizer(str(model_dir)), str(text), n=4, seq_len=32, seed=0)[:2, :64]
    dense = T.AutoModelForCausalLM.from_pretrained(model_dir)
    healed = _relative_error(load_hf(tmp_path / "healed" / "hf"), dense, x)
    cut = _relative_error(load_hf(tmp_path / "plain" / "hf"), dense, x)
    assert abs(healed - cut) > 1e-3  # the heal moved the outputs: the two checks must differ

    check = report["output_check"]
    assert check["finite"] is True and check["relative_error"] == pytest.approx(healed, rel=1e-4)
    before = report["before_heal"]
    assert before["output_check"]["relative_error"] == pytest.approx(cut, rel=1e-4)
    assert check["relative_error_before_heal"] == before["output_check"]["relative_error"]
    assert before["verification"]["ok"] is True and report["verification"] is None
    assert any("before_heal" in note for note in report["notes"])
