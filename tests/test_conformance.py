"""Conformance: every transformers family with a dense FFN that torch.export can trace here.

For each tiny random config: trace, find one FFN group per layer from the graph, prune,
check shrunk == masked, and check that the slim model exports to ONNX (torch.onnx dynamo) and
runs in onnxruntime with the same outputs. Families with no dense FFN (mixture-of-experts
experts stored as 3-D tensors) must fail with a clear error. test_architectures.py holds the
exact slot-by-slot expectations for the core families; this file is the wide matrix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

import llmrank
from llmrank.ir.trace import TensorOutput

H, I, L, V = 32, 64, 2, 128
COMMON = dict(vocab_size=V, max_position_embeddings=64)


def _cfg(name: str):
    c = {
        "llama": lambda: T.LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, **COMMON),
        "mistral": lambda: T.MistralConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, **COMMON),
        "qwen2": lambda: T.Qwen2Config(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, **COMMON),
        "qwen3": lambda: T.Qwen3Config(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, head_dim=8, **COMMON),
        "gemma": lambda: T.GemmaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=1, head_dim=8, **COMMON),
        "gemma2": lambda: T.Gemma2Config(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, head_dim=8, **COMMON),
        "gemma3": lambda: T.Gemma3TextConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=1, head_dim=8, **COMMON),
        "phi": lambda: T.PhiConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, **COMMON),
        "phi3": lambda: T.Phi3Config(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, **COMMON),
        "gpt2": lambda: T.GPT2Config(n_embd=H, n_layer=L, n_head=4, vocab_size=V, n_positions=64),
        "gptj": lambda: T.GPTJConfig(n_embd=H, n_layer=L, n_head=4, rotary_dim=4, vocab_size=V, n_positions=64),
        "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, **COMMON),
        "opt": lambda: T.OPTConfig(hidden_size=H, ffn_dim=I, num_hidden_layers=L, num_attention_heads=4, word_embed_proj_dim=H, vocab_size=V, max_position_embeddings=64),
        "falcon": lambda: T.FalconConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, vocab_size=V),
        "bloom": lambda: T.BloomConfig(hidden_size=H, n_layer=L, n_head=4, vocab_size=V),
        "stablelm": lambda: T.StableLmConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, **COMMON),
        "granite": lambda: T.GraniteConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, **COMMON),
        "olmo": lambda: T.OlmoConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, **COMMON),
        "bert": lambda: T.BertConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, vocab_size=V),
        "roberta": lambda: T.RobertaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, vocab_size=V, pad_token_id=1),
    }
    return c[name]()


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi", "phi3", "gpt2", "gptj", "gpt_neox",
            "opt", "falcon", "bloom", "stablelm", "granite", "olmo", "bert", "roberta"]
ENCODERS = {"bert", "roberta"}


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = _cfg(name)
    cls = T.AutoModel if name in ENCODERS else T.AutoModelForCausalLM
    return cls.from_config(cfg, attn_implementation="eager").eval()


def _run(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return TensorOutput(model)(ids)


@pytest.mark.onnx
@pytest.mark.parametrize("name", FAMILIES)
def test_family_prunes_shrinks_and_exports(name, tmp_path):
    model = _build(name)
    calib = torch.randint(3, V, (4, 16), generator=torch.Generator().manual_seed(0))
    result = llmrank.prune(model, calib, sparsity=0.25, scorer="wpr", representation="isolated", progress=False)

    assert len(result.ir.groups) == L, [g.name for g in result.ir.groups]
    for g in result.ir.groups:  # attention projections never join an FFN group
        assert not any(k in p.linear for p in g.producers for k in ("q_proj", "k_proj", "v_proj", "query", "key", "value"))
    assert result.verification.ok, result.verification
    assert result.params_after < result.params_before

    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = _run(result.model, ids).numpy()
    path = tmp_path / f"{name}.onnx"
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=60)
    program = torch.onnx.export(TensorOutput(result.model).eval(), (ids,), dynamo=True, dynamic_shapes=({0: batch, 1: seq},), verbose=False)
    program.save(str(path))
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4
    other = torch.randint(3, V, (3, 5), generator=torch.Generator().manual_seed(2))
    got = session.run(None, {session.get_inputs()[0].name: other.numpy()})[0]
    assert np.abs(got - _run(result.model, other).numpy()).max() < 1e-4


def test_moe_experts_are_refused_with_a_clear_message():
    torch.manual_seed(0)
    cfg = T.MixtralConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                          num_local_experts=4, num_experts_per_tok=2, **COMMON)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(llmrank.InputError, match="mixture-of-experts"):
        llmrank.prune(model, torch.randint(0, V, (2, 8)), sparsity=0.25, progress=False)
