"""Attention heads: analysis from the graph, the GQA-constrained selection, shrink == mask,
reload, export, scorers and compensation, on tiny random configs of four families."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers as T

import llmrank
from llmrank.ir.errors import ConfigError, InputError
from llmrank.passes import headcut
from llmrank.passes.shrink import mask, shrink
from llmrank.passes.verify import outputs

H, I, L, V = 32, 64, 2, 128
COMMON = dict(vocab_size=V, max_position_embeddings=64, hidden_size=H, intermediate_size=I, num_hidden_layers=L)


def _config(family: str):
    if family == "llama":
        return T.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **COMMON)
    if family == "qwen2":
        return T.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **COMMON)
    if family == "gemma3":  # qk-norm, explicit head_dim, sliding window, MQA
        return T.Gemma3TextConfig(num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=4, **COMMON)
    if family == "phi3":  # fused qkv_proj
        return T.Phi3Config(num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, **COMMON)
    if family == "smollm":  # SmolLM2's 3 query heads per KV head
        return T.LlamaConfig(num_attention_heads=6, num_key_value_heads=2, head_dim=8, **{**COMMON, "hidden_size": 48})
    raise KeyError(family)


FAMILIES = ["llama", "qwen2", "gemma3", "phi3"]


def build(family: str, impl: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(_config(family), attn_implementation=impl).eval()
    with torch.no_grad():  # random biases, so that dropping their entries matters
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    return model


def ids(seed: int = 1, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(3, V, shape, generator=torch.Generator().manual_seed(seed))


def analysed(model):
    return llmrank.analyze(llmrank.trace(model))


# ---------------------------------------------------------------------- analysis


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_analysis_reads_head_groups_from_the_graph(family, impl):
    model = build(family, impl)
    ir = analysed(model)
    cfg = model.config
    assert len(ir.head_groups) == cfg.num_hidden_layers, ir.blocked
    for i, hg in enumerate(ir.head_groups):
        attn = model.model.layers[i].self_attn
        assert hg.module == f"model.layers.{i}.self_attn"
        assert (hg.heads, hg.kv_heads, hg.head_dim) == (cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim)
        assert hg.o.linear == f"model.layers.{i}.self_attn.o_proj"
        if family == "phi3":
            q_rows = cfg.num_attention_heads * attn.head_dim
            assert {hg.q.linear, hg.k.linear, hg.v.linear} == {f"model.layers.{i}.self_attn.qkv_proj"}
            assert (hg.q.offset, hg.k.offset, hg.v.offset) == (0, q_rows, q_rows + cfg.num_key_value_heads * attn.head_dim)
        else:
            assert (hg.q.linear, hg.k.linear, hg.v.linear) == tuple(f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv")
        biases = {s.param for s in (*hg.q_slots, *hg.kv_slots) if s.param.endswith(".bias")}
        assert biases == {n for n, _ in attn.named_parameters(prefix=hg.module) if n.endswith(".bias") and "proj" in n}


def test_analysis_blocks_what_it_cannot_map_with_a_reason():
    torch.manual_seed(0)
    bloom = T.AutoModelForCausalLM.from_config(T.BloomConfig(hidden_size=H, n_layer=L, n_head=4, vocab_size=V), attn_implementation="eager")
    ir = analysed(bloom.eval())
    assert ir.head_groups == []
    reasons = [v for k, v in ir.blocked.items() if k.startswith("heads:")]
    assert len(reasons) == L and all("softmax" in r for r in reasons), ir.blocked
    torch.manual_seed(0)
    gpt2 = T.AutoModelForCausalLM.from_config(T.GPT2Config(n_embd=H, n_layer=L, n_head=4, vocab_size=V, n_positions=64), attn_implementation="eager")
    ir = analysed(gpt2.eval())
    assert ir.head_groups == [] and any(k.startswith("heads:transformer.h.0") for k in ir.blocked), ir.blocked


# ---------------------------------------------------------------------- selection


def test_selection_keeps_equal_counts_per_kv_group_and_the_best_heads():
    model = build("smollm")
    hg = analysed(model).head_groups[0]
    assert (hg.heads, hg.kv_heads, hg.n_rep) == (6, 2, 3)
    assert headcut.feasible_counts(hg) == [1, 2, 3, 4, 6]
    ir = llmrank.ir.graph.ModelIR("x", {}, [], {}, {}, [hg])
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.8, 0.7])
    kept = headcut.select_heads(ir, {hg.name: scores}, 1 / 3)[hg.name]
    # 4 = 2 groups x 2 heads: the best two inside each group (0, 2 | 4, 5), not the global top 4
    assert kept.tolist() == [0, 2, 4, 5]
    kept = headcut.select_heads(ir, {hg.name: scores}, 0.5)[hg.name]  # 3 heads: 1 group x 3 (1.5) vs 3 x 1 impossible
    assert kept.tolist() == [3, 4, 5]
    kept = headcut.select_heads(ir, {hg.name: torch.tensor([0.1, 0.1, 0.1, 0.9, 0.9, 0.9])}, 0.8)[hg.name]
    assert kept.tolist() == [3]


def test_selection_errors():
    model = build("llama")
    ir = analysed(model)
    scores = {hg.name: torch.ones(hg.heads) for hg in ir.head_groups}
    for bad in (-0.1, 1.0, float("nan"), True):
        with pytest.raises(ConfigError, match="head_sparsity"):
            headcut.select_heads(ir, scores, bad)
    with pytest.raises(ConfigError, match="same number of query heads"):
        headcut.select_heads(ir, scores, 0.1)  # 4 heads: 0.4 rounds to no head
    hg = ir.head_groups[0]
    with pytest.raises(InputError, match="same number"):
        shrink(model, ir, {hg.name: torch.tensor([0, 1, 2])})  # 2 + 1 per KV group


# ---------------------------------------------------------------------- rewrite


def _kept(ir, choice):
    return {hg.name: torch.tensor(heads) for hg, heads in zip(ir.head_groups, choice)}


CUTS = {
    "llama": [[0, 2], [1, 3]],  # one query head per KV group; another per layer
    "qwen2": [[2, 3], [0, 1, 2, 3]],  # a whole KV group; layer 1 uncut
    "gemma3": [[1, 3], [0]],  # MQA: inside the only group
    "phi3": [[0, 1], [1, 3]],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_shrunk_equals_masked_for_heads(family):
    model = build(family)
    ir = analysed(model)
    kept = _kept(ir, CUTS[family])
    slim = shrink(model, ir, kept)
    x = ids()
    ref = outputs(mask(model, ir, kept), (x,))
    got = outputs(slim, (x,))
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    assert not torch.allclose(ref, outputs(model, (x,)), atol=1e-3)  # the cut changed the function
    for hg, heads in zip(ir.head_groups, CUTS[family]):
        attn = slim.get_submodule(hg.module)
        kv = len(headcut.kept_kv(hg, torch.tensor(heads)))
        assert attn.num_key_value_groups == len(heads) // kv
        assert slim.get_submodule(hg.o.linear).in_features == len(heads) * hg.head_dim
    # the cache path (generation) runs the same function as the full forward
    with torch.no_grad():
        full = slim(input_ids=x).logits[:, -1]
        past = slim(input_ids=x[:, :-1], use_cache=True).past_key_values
        step = slim(input_ids=x[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]
    assert torch.allclose(full, step, atol=1e-5)


def test_heads_and_ffn_together_shrink_equals_mask():
    model = build("qwen2")
    ir = analysed(model)
    kept = {g.name: torch.arange(0, g.width, 2) for g in ir.groups}
    kept.update(_kept(ir, [[0, 2], [2, 3]]))
    x = ids()
    assert torch.allclose(outputs(shrink(model, ir, kept), (x,)), outputs(mask(model, ir, kept), (x,)), atol=1e-5)


def test_uniform_cut_reloads_with_stock_from_pretrained(tmp_path):
    from llmrank.exporters.hf import check_reload, save_hf

    model = build("gemma3")
    ir = analysed(model)
    slim = shrink(model, ir, _kept(ir, [[0, 1], [2, 3]]))
    assert (slim.config.num_attention_heads, slim.config.num_key_value_heads, slim.config.head_dim) == (2, 1, 8)
    assert model.config.num_attention_heads == 4  # the input model is untouched
    result = save_hf(slim, None, tmp_path / "out")
    assert result.stock_loadable
    check_reload(tmp_path / "out", slim, stock=True)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_per_layer_counts_reload_with_llmrank_load(family, tmp_path):
    from llmrank.exporters.hf import check_reload, save_hf

    model = build(family)
    ir = analysed(model)
    slim = shrink(model, ir, _kept(ir, [[0, 2], [0, 1, 2, 3]]))
    assert slim.config.num_attention_heads == 4  # layers disagree: the config keeps the original counts
    result = save_hf(slim, None, tmp_path / "out")
    assert not result.stock_loadable
    check_reload(tmp_path / "out", slim, stock=False)
    reloaded = llmrank.load(tmp_path / "out")
    assert reloaded.model.layers[0].self_attn.num_key_value_groups == 1
