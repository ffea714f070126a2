"""Attention heads: analysis from the graph, the GQA-constrained selection, shrink == mask,
reload, export, scorers and compensation, on tiny random configs of four families."""

from __future__ import annotations


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


# ---------------------------------------------------------------------- scoring


def _o_inputs(model, ir, batches):
    """Every o_proj's input on ``batches``, one [tokens, channels] float64 array per batch."""
    seen = {hg.o.linear: [] for hg in ir.head_groups}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].detach().double().reshape(-1, a[0].shape[-1]).numpy()))
             for n in seen]
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _normalize(v):
    v = np.asarray(v, dtype=np.float64)
    return v / v.sum()


@pytest.fixture(scope="module")
def scored_qwen():
    model = build("qwen2")
    calib = ids(3, (6, 16))
    return model, calib


@pytest.mark.parametrize("head_scorer", ["activation", "l1", "l2", "wanda", "fluctuation"])
def test_head_baselines_match_a_hand_computation(scored_qwen, head_scorer):
    model, calib = scored_qwen
    result = llmrank.prune(model, calib, sparsity=0.0, head_sparsity=0.5, head_scorer=head_scorer, batch_size=3, progress=False)
    ir = result.ir
    inputs = _o_inputs(model, ir, [calib[:3], calib[3:]])
    sd = {k: v.double().numpy() for k, v in model.state_dict().items()}
    for hg in ir.head_groups:
        D, n_rep = hg.head_dim, hg.n_rep
        wq, wk, wv = (sd[f"{hg.module}.{p}_proj.weight"] for p in "qkv")
        wo = sd[f"{hg.module}.o_proj.weight"]
        xs = inputs[hg.o.linear]
        per_batch_norm = np.mean([np.sqrt((x ** 2).sum(0)) for x in xs], axis=0)
        allx = np.concatenate(xs)
        want = []
        for h in range(hg.heads):
            blk, kv = slice(h * D, (h + 1) * D), slice((h // n_rep) * D, (h // n_rep + 1) * D)
            if head_scorer == "activation":
                want.append(np.sqrt((per_batch_norm[blk] ** 2).sum()))
            elif head_scorer in ("l1", "l2"):
                p = 1 if head_scorer == "l1" else 2
                total = (np.abs(wq[blk]) ** p).sum() + (np.abs(wo[:, blk]) ** p).sum()
                total += ((np.abs(wk[kv]) ** p).sum() + (np.abs(wv[kv]) ** p).sum()) / n_rep
                want.append(total ** (1 / p))
            elif head_scorer == "wanda":
                want.append((np.abs(wo[:, blk]).sum(0) * per_batch_norm[blk]).sum())
            else:
                want.append((allx[:, blk].var(0) * (wo[:, blk] ** 2).sum(0)).sum())
        np.testing.assert_allclose(result.scores.heads[hg.name].numpy(), _normalize(want), rtol=1e-5, atol=1e-9)


def _transition(w, theta):
    a = np.abs(w)
    nz = (a != 0).astype(np.float64)
    return theta * a / a.sum(0, keepdims=True) + (1 - theta) * nz / nz.sum(0, keepdims=True)


def test_wpr_head_score_is_the_flow_through_its_o_proj_columns(scored_qwen):
    model, calib = scored_qwen
    result = llmrank.prune(model, calib, sparsity=0.2, head_sparsity=0.5, scorer="wpr", batch_size=3, progress=False)
    hg = result.ir.head_groups[0]  # layer 0: nothing writes the residual stream before it but the embedding
    from conftest import hook_norms

    ref = hook_norms(model, [hg.q.linear, hg.o.linear], [calib[:3], calib[3:]])
    sd = {k: v.double().numpy() for k, v in model.state_dict().items()}
    theta = gamma = 0.5
    r = _normalize(ref[hg.q.linear][0])
    D, n_rep = hg.head_dim, hg.n_rep
    idx = np.array([(h // n_rep) * D + d for h in range(hg.heads) for d in range(D)])
    flows = [_transition(sd[f"{hg.module}.q_proj.weight"], theta) @ r]
    flows += [(_transition(sd[f"{hg.module}.{p}_proj.weight"], theta) @ r)[idx] for p in "kv"]
    mid = _normalize(gamma * np.mean(flows, axis=0) + (1 - gamma) * _normalize(ref[hg.o.linear][0]))
    want = _normalize(mid.reshape(hg.heads, D).sum(1))
    np.testing.assert_allclose(result.scores.heads[hg.name].numpy(), want, rtol=1e-6)
    # one graph: the FFN after the heads reads their exit score, so its neuron scores differ from an FFN-only run
    ffn_only = llmrank.prune(model, calib, sparsity=0.2, scorer="wpr", batch_size=3, progress=False)
    g = result.ir.groups[0].name
    assert not torch.allclose(result.scores.groups[g], ffn_only.scores.groups[g])


def test_o_proj_refit_reduces_the_output_error_on_calibration_data():
    from llmrank.passes.compensate import collect_input_stats, plan_refit

    model = build("llama")
    ir = analysed(model)
    calib = ids(4, (8, 16))
    kept = _kept(ir, [[0, 2], [1, 3]])
    stats = collect_input_stats(model, ir, [calib[:4], calib[4:]], heads=True, progress=False)
    refits = plan_refit(model, ir, kept, stats, method="lstsq", ridge=1e-6)
    assert set(refits) == {hg.o.linear for hg in ir.head_groups}
    x = np.concatenate(_o_inputs(model, ir, [calib])[ir.head_groups[0].o.linear])
    hg = ir.head_groups[0]
    w = model.get_parameter(ir.linears[hg.o.linear].weight).detach().double().numpy()
    cols = headcut.kept_channels(hg, kept[hg.name]).numpy()
    dense = x @ w.T
    cut = x[:, cols] @ w[:, cols].T
    refit = x[:, cols] @ refits[hg.o.linear].weight.numpy().T
    assert np.linalg.norm(refit - dense) < 0.9 * np.linalg.norm(cut - dense)
    # and the shrunk model with the refit equals the masked one with the same refit
    x_ids = ids()
    got = outputs(shrink(model, ir, kept, refits=refits), (x_ids,))
    assert torch.allclose(got, outputs(mask(model, ir, kept, refits=refits), (x_ids,)), atol=1e-5)


# ---------------------------------------------------------------------- options and the pipeline


def test_config_checks_head_options():
    from llmrank.passes.config import PruneConfig

    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="head_sparsity"):
            PruneConfig(head_sparsity=bad)
    with pytest.raises(ConfigError, match="head_scorer"):
        PruneConfig(head_sparsity=0.5, head_scorer="nope")
    with pytest.raises(ConfigError, match="mask-paper"):
        PruneConfig(head_sparsity=0.5, mode="mask-paper")
    assert not PruneConfig(scorer="l1", head_sparsity=0.5, head_scorer="l1").needs_calibration
    assert PruneConfig(scorer="l1", head_sparsity=0.5, head_scorer="fluctuation").needs_calibration
    assert PruneConfig(scorer="lp", head_sparsity=0.5).head_scoring == "l2"
    with pytest.raises(ConfigError, match="FFN neurons only"):
        PruneConfig(scorer="taylor", head_sparsity=0.5)
    assert PruneConfig(scorer="taylor", head_sparsity=0.5, head_scorer="activation").head_scoring == "activation"
    with pytest.raises(ConfigError, match="o_proj"):
        PruneConfig(head_sparsity=0.5, compensation="lstsq", refit_inputs="pruned")


def test_pipeline_refuses_heads_where_it_cannot_cut_them():
    from llmrank.ir.errors import UnsupportedModelError

    torch.manual_seed(0)
    gpt2 = T.AutoModelForCausalLM.from_config(T.GPT2Config(n_embd=H, n_layer=L, n_head=4, vocab_size=V, n_positions=64), attn_implementation="eager")
    with pytest.raises(UnsupportedModelError, match="no attention heads"):
        llmrank.prune(gpt2.eval(), ids(), sparsity=0.2, head_sparsity=0.5, scorer="l1", progress=False)
    model = build("llama")
    with pytest.raises(ConfigError, match="same number of query heads"):
        llmrank.prune(model, ids(), sparsity=0.2, head_sparsity=0.1, scorer="l1", progress=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_with_heads_and_compensation_verifies(family):
    model = build(family)
    calib = ids(5, (8, 16))
    result = llmrank.prune(model, calib, sparsity=0.25, head_sparsity=0.5, compensation="lstsq", progress=False)
    assert result.verification.ok, result.verification
    assert result.output_check.relative_error < result.output_check.relative_error_without_refit
    for hg in result.ir.head_groups:
        info = result.heads[hg.name]
        assert info["heads"] == [hg.heads, 2] and len(info["kept"]) == 2
        assert result.model.get_submodule(hg.o.linear).in_features == 2 * hg.head_dim
    assert result.to_dict()["heads"] == result.heads
    before = sum(p.numel() for p in model.parameters())
    removed = sum(hg.head_cost(result.ir.linears) * 2 for hg in result.ir.head_groups)
    kv_removed = sum(hg.kv_cost(result.ir.linears) * (hg.kv_heads - info["kv_heads"][1])
                     for hg, info in ((hg, result.heads[hg.name]) for hg in result.ir.head_groups))
    ffn_removed = sum(result.ir.channel_cost(g) * (g.width - len(result.kept[g.name])) for g in result.ir.groups)
    assert result.params_after == before - removed - kv_removed - ffn_removed


@pytest.mark.onnx
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_onnx_with_kv_cache_matches_pytorch_after_a_head_cut(family, tmp_path):
    pytest.importorskip("onnxruntime")
    from llmrank.exporters.onnx import export_onnx, generate_onnx

    model = build(family)
    ir = analysed(model)
    slim = shrink(model, ir, _kept(ir, [[0, 2], [0, 1, 2, 3]]))  # per-layer counts
    result = export_onnx(slim, tmp_path / "m.onnx", with_past=True, metadata={"eos_token_id": "none"})
    assert result.max_abs_diff and max(result.max_abs_diff.values()) < 1e-4  # prefill and decode on the cache
    prompt = [5, 9, 17, 3]
    got = generate_onnx(tmp_path / "m.onnx", prompt, max_new_tokens=6, eos_token_id=None)
    with torch.no_grad():
        want = slim.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
    assert got == want.tolist()


@pytest.mark.slow
def test_target_params_splits_one_budget_between_heads_and_neurons():
    from llmrank.passes import budget

    model = build("smollm")
    calib = ids(3, (8, 16))
    total = sum(p.numel() for p in model.parameters())
    results = {share: llmrank.prune(model, calib, target_params=0.8, head_share=share, progress=False) for share in (0.0, 0.6, 1.0)}
    for share, r in results.items():
        assert r.verification.ok
        ir = r.ir
        by_heads = budget.removed_by_heads(ir, {k: v for k, v in r.kept.items() if k in {hg.name for hg in ir.head_groups}})
        by_neurons = sum(ir.channel_cost(g) * (g.width - len(r.kept[g.name])) for g in ir.groups)
        assert r.params_before - r.params_after == by_heads + by_neurons  # the plan's accounting is the model's
        assert abs(r.params_after / total - 0.8) < 0.02, (share, r.params_after / total)
        budget_ = (1 - 0.8) * total
        if share == 0.0:
            assert by_heads == 0 and not r.heads
        else:  # the head cut closest to the share, in the steps the GQA constraint allows
            assert by_heads > 0 and abs(by_heads - share * budget_) <= max(hg.head_cost(ir.linears) + hg.kv_cost(ir.linears) for hg in ir.head_groups) * len(ir.head_groups)
    from llmrank.passes.config import PruneConfig

    with pytest.raises(ConfigError, match="target_params"):
        PruneConfig(target_params=1.0)
    with pytest.raises(ConfigError, match="target_params"):
        PruneConfig(target_params=0.8, pruner="global")
    with pytest.raises(ConfigError, match="raise target_params"):
        llmrank.prune(model, calib, target_params=0.05, head_share=0.0, progress=False)


WIDER = ["mistral", "qwen3", "gemma", "gemma2", "phi", "stablelm", "granite", "olmo", "opt", "bert"]


@pytest.mark.slow
@pytest.mark.parametrize("family", WIDER)
def test_more_families_cut_heads_and_shrunk_equals_masked(family):
    """The conformance configs beyond the four core families: found from the graph, cut, verified."""
    from test_conformance import ENCODERS, _cfg

    torch.manual_seed(0)
    cls = T.AutoModel if family in ENCODERS else T.AutoModelForCausalLM
    model = cls.from_config(_cfg(family), attn_implementation="eager").eval()
    ir = analysed(model)
    assert len(ir.head_groups) == 2, ir.blocked
    kept = {hg.name: torch.arange(hg.heads)[:: 2] if hg.kv_heads in (1, hg.heads) else torch.arange(hg.n_rep) for hg in ir.head_groups}
    slim = shrink(model, ir, kept)
    x = ids()
    ref = outputs(mask(model, ir, kept), (x,))
    assert torch.allclose(outputs(slim, (x,)), ref, atol=1e-5)
    assert not torch.allclose(ref, outputs(model, (x,)), atol=1e-4)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "falcon", "bloom"])
def test_families_whose_heads_stay_whole_say_why(family):
    from test_conformance import _cfg

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(_cfg(family), attn_implementation="eager").eval()
    ir = analysed(model)
    reasons = {k: v for k, v in ir.blocked.items() if k.startswith("heads:")}
    assert not ir.head_groups and len(reasons) == 2 and all(reasons.values()), ir.blocked


def test_the_program_route_refuses_heads_before_tracing():
    from llmrank.passes.config import PruneConfig
    from llmrank.passes.program import prune_program

    model = build("llama")
    ep = llmrank.trace(model).program
    with pytest.raises(ConfigError, match="head_sparsity needs attention heads .* exported program route"):
        prune_program(ep, [(ids(),)], config=PruneConfig(head_sparsity=0.5, scorer="l1"))


def test_float64_recheck_tells_rounding_from_a_wrong_cut():
    from llmrank.passes.config import PruneConfig
    from llmrank.passes.pipeline import _in_float64

    model = build("smollm")
    ir = analysed(model)
    kept = _kept(ir, [[0, 1, 2], [1, 4]])
    x = (ids(),)
    config = PruneConfig(verify_atol=0.0, verify_rtol=0.0)
    same = _in_float64(mask(model, ir, kept), shrink(model, ir, kept), x, config)
    assert same.ok and same.max_abs_diff < 1e-12
    wrong = _in_float64(mask(model, ir, kept), shrink(model, ir, _kept(ir, [[3, 4, 5], [1, 4]])), x, config)
    assert not wrong.ok and wrong.max_abs_diff > 1e-3
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # the input model stays fp32
