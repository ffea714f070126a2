"""Integration on the real SmolLM2-135M (fetched once from PyPI and cached)."""

from __future__ import annotations

import pytest
import torch

import llmrank
from llmrank.evaluate import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from llmrank.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_traced(smollm2):
    """SmolLM2 is traced once for every test here (torch.export of 30 layers takes a while)."""
    return llmrank.trace(smollm2[0])


@pytest.fixture(scope="module")
def wiki_tokens(smollm2):
    from llmrank.data import calibration_tokens, eval_tokens

    _, tok = smollm2
    return calibration_tokens(tok, "wiki", n=8, seq_len=256, seed=0), eval_tokens(tok)[:, : 4 * 256 + 1]


def test_default_prune_at_30_percent(smollm2, smollm2_traced, wiki_tokens):
    model, _ = smollm2
    calib, held_out = wiki_tokens
    before = {k: v.clone() for k, v in list(model.state_dict().items())[:5]}
    result = llmrank.prune(model, calib, sparsity=0.3, progress=False, traced=smollm2_traced)

    assert result.verification is not None and result.verification.ok, result.verification
    assert len(result.ir.groups) == 30
    kept = 1536 - round(0.3 * 1536)
    assert all(after == kept for _, after in result.widths.values())
    # each removed neuron takes a row of gate_proj and up_proj and a column of down_proj (576 each)
    assert result.params_before - result.params_after == 30 * (1536 - kept) * 3 * 576
    assert result.model.config.intermediate_size == kept
    for k, v in before.items():  # the caller's model is untouched
        assert torch.equal(model.state_dict()[k], v)

    dense = perplexity(model, held_out, seq_len=256, stride=256).ppl
    slim = perplexity(result.model, held_out, seq_len=256, stride=256).ppl
    assert torch.isfinite(torch.tensor(slim))
    assert slim < 3 * dense, (dense, slim)


def test_slim_onnx_with_kv_cache_matches_pytorch(smollm2, smollm2_traced, wiki_tokens, tmp_path):
    from llmrank.exporters.onnx import export_onnx, generate_onnx
    from llmrank.workflow import ONNX_ATOL

    model, tok = smollm2
    calib, _ = wiki_tokens
    slim = llmrank.prune(model, calib[:4], sparsity=0.3, progress=False, traced=smollm2_traced).model
    # export_onnx validates prefill at (2,16), (1,37), (1,1) and a decode step on ORT's own
    # presents, and raises above the tolerance
    res = export_onnx(slim, tmp_path / "slim.onnx", with_past=True, atol=ONNX_ATOL)
    assert max(res.max_abs_diff.values()) <= ONNX_ATOL
    prompt = tok("The history of the city")["input_ids"]
    ours = generate_onnx(res.path, prompt, 8, eos_token_id=None)
    with torch.no_grad():
        ref = slim.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, len(prompt):].tolist()


def test_layerwise_equals_in_memory(smollm2, smollm2_traced, wiki_tokens, tmp_path):
    """Block by block from the cached checkpoint folder, in fp32 as load_model loads it: the same
    kept sets as the in-memory prune, and the written checkpoint reloads to its logits."""
    from llmrank.models import resolve_model_dir
    from llmrank.layerwise import prune_layerwise

    model, _ = smollm2
    calib = wiki_tokens[0][:4, :128]
    config = llmrank.PruneConfig(compensation="lstsq")
    ref = llmrank.prune(model, calib, config=config, progress=False, traced=smollm2_traced)
    got = prune_layerwise(resolve_model_dir("smollm2-135m"), calib, config=config, dtype=torch.float32,
                          out_dir=tmp_path / "slim")
    assert list(got.kept) == list(ref.kept) and len(got.kept) == 30
    assert all(torch.equal(got.kept[k], ref.kept[k]) for k in ref.kept)
    reloaded = llmrank.load(tmp_path / "slim", dtype=torch.float32)
    probe = calib[:2, :64]
    with torch.no_grad():
        a = ref.model(input_ids=probe, use_cache=False).logits
        b = reloaded(input_ids=probe, use_cache=False).logits
    assert float((a - b).abs().max()) <= 1e-5 + 1e-5 * float(a.abs().max())
