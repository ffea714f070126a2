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
