"""The prune job on every route: options honoured as asked or refused before any weight is read.

Each test here failed before routes were checked once against their capabilities: the block
route ignored ``--target-params``, an automatically chosen block route dropped a heal without a
word, ``--device`` was ignored in memory, report.json showed sparsities that were never applied,
and the block route computed a mixed-dtype checkpoint in the dtype of its first tensor.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import llmrank
from llmrank.ir.errors import ConfigError, InputError
from llmrank.layerwise import prune_layerwise
from llmrank.passes.config import PruneConfig
from llmrank.workflow import PruneJob, run_prune
from test_layerwise import cli_workspace

V = 64


#: A tiny Llama folder (sharded safetensors + tokenizer) and a calibration text: the block-route CLI tests' own.
workspace = cli_workspace


@pytest.fixture(scope="module")
def qwen2_workspace(cli_workspace, tmp_path_factory):
    """The same with a tiny Qwen2 (q/k/v biases), its tokenizer and text copied from the Llama's."""
    import shutil

    root, llama_dir, text = cli_workspace
    model_dir = tmp_path_factory.mktemp("lw-qwen2") / "tiny-qwen2"
    cfg = T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        vocab_size=V, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    T.Qwen2ForCausalLM(cfg).eval().save_pretrained(model_dir, max_shard_size="40KB")
    for f in llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, model_dir / f.name)
    return model_dir.parent, model_dir, text


def _job(root, folder, text, name, **fields) -> PruneJob:
    config = fields.pop("config", PruneConfig(compensation="lstsq"))
    return PruneJob(model=str(folder), out=root / name, config=config, calib=str(text), samples=4, compensation_samples=6,
                    seq_len=32, progress=False, **fields)


@pytest.mark.onnx
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_block_route_honours_a_parameter_target_with_heads(family, request):
    """`prune DIR --layerwise --target-params 0.8 --head-share 0.5` removes 20 % of the parameters
    (heads and neurons), says so in report.json, and its checkpoint reloads to the ONNX file's logits."""
    root, folder, text = request.getfixturevalue("workspace" if family == "llama" else "qwen2_workspace")
    config = PruneConfig(compensation="lstsq", target_params=0.8, head_share=0.5)
    report = run_prune(_job(root, folder, text, "lw-target", config=config, layerwise=True, kv_cache=False))
    assert report["route"].startswith("layerwise")
    removed = 1 - report["params_after"] / report["params_before"]
    assert removed == pytest.approx(0.2, abs=0.02)
    applied = report["config"]["applied"]
    assert applied["from_target_params"] and applied["head_sparsity"] > 0 and report["requested_sparsity"] is None
    assert report["heads"] and any(h["heads"][1] < h["heads"][0] for h in report["heads"].values())
    slim = llmrank.load(root / "lw-target" / "hf")
    assert sum(p.numel() for p in slim.parameters()) == report["params_after"]
    import onnxruntime as ort

    ids = torch.randint(4, V, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = slim(input_ids=ids, use_cache=False).logits.numpy()
    session = ort.InferenceSession(str(root / "lw-target" / report["artifacts"]["onnx"]["path"]))
    feeds = {i.name: (ids.numpy() if i.name == "input_ids" else torch.ones_like(ids).numpy()) for i in session.get_inputs()}
    got = session.run(None, feeds)[0]
    assert abs(got - want).max() <= 1e-3 + 1e-4 * abs(want).max()


def test_in_memory_and_block_routes_apply_the_same_target(workspace):
    root, folder, text = workspace
    config = PruneConfig(compensation="lstsq", target_params=0.8)
    mem = run_prune(_job(root, folder, text, "mem-target", config=config, onnx=False))
    lw = run_prune(_job(root, folder, text, "lw-target-2", config=config, onnx=False, layerwise=True))
    assert mem["config"]["applied"] == lw["config"]["applied"]
    assert mem["params_after"] == lw["params_after"] and mem["widths"] == lw["widths"]
    assert mem["output_check"]["tokens"] == lw["output_check"]["tokens"] > 0


def test_a_heal_on_an_automatically_chosen_block_route_is_refused_before_loading(workspace, monkeypatch):
    root, folder, text = workspace
    import llmrank.workflow as W

    monkeypatch.setattr(W, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    job = _job(root, folder, text, "never", heal_tokens=64, max_memory=10_000)
    with pytest.raises(ConfigError, match=r"block by block \(.*max-memory.*\).*heal"):
        run_prune(job)
    assert not (root / "never").exists()


def test_heads_on_an_automatically_chosen_block_route_are_pruned(workspace):
    """--head-sparsity past --max-memory: the block route cuts heads too (it used to say 'drop --layerwise')."""
    root, folder, text = workspace
    config = PruneConfig(compensation="lstsq", head_sparsity=0.5)
    report = run_prune(_job(root, folder, text, "auto-heads", config=config, max_memory=10_000, onnx=False))
    assert report["route"].startswith("layerwise")
    assert all(h["heads"][1] == 2 for h in report["heads"].values())


def test_device_is_not_ignored_in_memory(workspace):
    root, folder, text = workspace
    with pytest.raises(ConfigError, match="--device meta runs the block-by-block route only"):
        run_prune(_job(root, folder, text, "never", device="meta", onnx=False))


def test_a_sparsity_beside_a_parameter_target_is_refused():
    with pytest.raises(ConfigError, match="sparsity 0.5 would be ignored"):
        PruneConfig(target_params=0.8, sparsity=0.5)
    with pytest.raises(ConfigError, match="head_sparsity 0.25 would be ignored"):
        PruneConfig(target_params=0.8, head_sparsity=0.25)
    with pytest.raises(ConfigError, match="head_share splits the cut of target_params"):
        PruneConfig(head_share=1.0)


def test_an_unreachable_head_share_says_so():
    """A target too small for a whole head: the cut is FFN only, and the notes say why."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)).eval()
    ids = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(1))
    result = llmrank.prune(model, ids, target_params=0.99, head_share=1.0, progress=False)
    assert result.config["applied"]["head_sparsity"] == 0
    assert any("head_share 1 was not reachable" in n for n in result.notes)


def test_a_mixed_dtype_checkpoint_is_computed_in_its_main_dtype(tmp_path):
    """fp32 blocks with an fp16 embedding: computed in fp32 (as the in-memory prune of the fp32
    model), every tensor written back in its own dtype, and the mix noted."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=V, max_position_embeddings=64,
                                             tie_word_embeddings=False)).eval()
    folder = tmp_path / "mixed"
    model.save_pretrained(folder, safe_serialization=True)
    state = load_file(str(folder / "model.safetensors"))
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].half()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with torch.no_grad():  # the in-memory reference sees the same (fp16-rounded) embedding
        model.model.embed_tokens.weight.copy_(state["model.embed_tokens.weight"].float())
    ids = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(1))
    config = PruneConfig(compensation="lstsq")
    ref = llmrank.prune(model, ids, config=config, progress=False)
    got = prune_layerwise(folder, ids, config=config, out_dir=tmp_path / "slim")
    assert got.dtype == "float32" and any("mixes float16 and float32" in n for n in got.notes)
    assert {k: torch.equal(v, got.kept[k]) for k, v in ref.kept.items()} == dict.fromkeys(ref.kept, True)
    with safe_open(str(next((tmp_path / "slim").glob("*.safetensors"))), framework="pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes["model.embed_tokens.weight"] == torch.float16
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == torch.float32


def test_block_route_names_nan_weights_and_fp16_overflow(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)).eval()
    ids = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(1))
    nan = tmp_path / "nan"
    model.save_pretrained(nan, safe_serialization=True)
    state = load_file(str(nan / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, str(nan / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"NaN/Inf weights in \['model.layers.1.mlp.up_proj.weight'\]"):
        prune_layerwise(nan, ids)
    hot = tmp_path / "hot"
    model.half().save_pretrained(hot, safe_serialization=True)
    state = load_file(str(hot / "model.safetensors"))
    state["model.layers.0.post_attention_layernorm.weight"] *= 1e4  # finite fp16 weights whose products overflow
    save_file(state, str(hot / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match="block 0 produces NaN/Inf hidden states.*float16 overflows"):
        prune_layerwise(hot, ids)
