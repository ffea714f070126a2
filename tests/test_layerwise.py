"""Block-by-block pruning equals the in-memory prune (an independent path: one traced graph of
the whole model, one calibration walk of the whole model).

Tiny random checkpoints of four families are saved in small shards; ``prune_layerwise`` on the
folder must give the kept sets of ``llmrank.prune`` on the model, and the slim checkpoint it
writes must reload (``llmrank.load``) into a model with the in-memory slim model's logits.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

import llmrank
from llmrank.ir.errors import ConfigError, InputError
from llmrank.passes.config import PruneConfig
from llmrank.passes.blocks.checkpoint import Checkpoint
from llmrank.passes.blocks.hidden import HiddenStates
from llmrank.layerwise import prune_layerwise

V = 128
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=V,
              max_position_embeddings=64)


def _build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **COMMON))
    elif family == "mistral":
        model = T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=2, sliding_window=8, **COMMON))
    elif family == "gpt2":  # Conv1D projections, learned positions, dropout in every block
        model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=V, n_positions=64))
    elif family == "qwen2":
        model = T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **COMMON))
    else:  # Gemma-3 text: sliding and full attention layers, tied head, scaled embeddings, soft-capping norms
        model = T.Gemma3ForCausalLM(T.Gemma3TextConfig(num_key_value_heads=1, head_dim=8, sliding_window=8,
                                                       layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                                       **COMMON))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (model, folder), saved in shards small enough to give several files."""
    out = {}
    for family in ("llama", "mistral", "qwen2", "gemma3", "gpt2"):
        model = _build(family)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder, safe_serialization=True, max_shard_size="30KB")
        out[family] = (model, folder)
    return out


@pytest.fixture(scope="module")
def ids():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (6, 16), generator=gen)  # batches of 4 and 2 with batch_size=4


CONFIGS = {
    "wpr-dataflow": {},
    "wpr-dataflow-lstsq": dict(compensation="lstsq"),
    "wpr-dataflow-global": dict(pruner="global"),
    "mpr-dataflow-global-lstsq": dict(scorer="mpr", pruner="global", compensation="lstsq"),
    "wpr-chained": dict(representation="chained"),
    "activation-chained": dict(scorer="activation", representation="chained"),
    "l1-isolated": dict(scorer="l1", representation="isolated"),
    "random-dataflow-bias": dict(scorer="random", compensation="lstsq+bias"),
    # options that couple blocks or read more than the FFN (the block route runs them as the in-memory Select does)
    "target-params": dict(target_params=0.8, compensation="lstsq"),
    "target-params-heads": dict(target_params=0.8, head_share=0.5, compensation="lstsq"),
    "heads": dict(head_sparsity=0.5, compensation="lstsq"),
    "heads-fluctuation": dict(head_sparsity=0.5, head_scorer="fluctuation"),
    "heads-random": dict(head_sparsity=0.5, head_scorer="random"),  # salted by the layer's index in the whole model
    "selection-refit": dict(selection="refit", compensation="lstsq"),
    "allocation-error": dict(allocation="error", compensation="lstsq"),
    "allocation-error-target": dict(allocation="error", target_params=0.85, compensation="lstsq+bias"),
}


def _same_kept(ref, got) -> None:
    assert list(ref.kept) == list(got.kept)
    for name in ref.kept:
        assert torch.equal(ref.kept[name], got.kept[name]), name
        if name in ref.scores.groups:
            assert torch.equal(ref.scores.groups[name].to(torch.float64), got.scores.groups[name].to(torch.float64)), name
    assert list(ref.scores.heads) == list(got.scores.heads)
    for name, s in ref.scores.heads.items():
        assert torch.equal(s.to(torch.float64), got.scores.heads[name].to(torch.float64)), name


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


def _close(ref: torch.Tensor, got: torch.Tensor) -> None:
    bound = 1e-5 + 1e-5 * float(ref.abs().max())
    assert float((ref - got).abs().max()) <= bound


#: Every configuration on Llama; on the other families the ones whose carry differs
#: (dataflow, chained, global two-walk, refit), to keep the file near a minute on 2 cores.
#: Llama rows that tests/test_route_matrix.py also runs on the block route (make test-all keeps them here too).
IN_MATRIX = ("target-params", "target-params-heads", "heads", "heads-fluctuation", "selection-refit", "allocation-error")
CASES = ([("llama", name) if name not in IN_MATRIX else pytest.param("llama", name, marks=pytest.mark.extended)
          for name in CONFIGS]
         + [(family, name) for family in ("qwen2", "gemma3")
            for name in ("wpr-dataflow", "wpr-dataflow-lstsq", "mpr-dataflow-global-lstsq", "wpr-chained")]
         + [("mistral", "wpr-dataflow-lstsq")]
         + [(family, name) for family in ("qwen2", "gemma3") for name in ("target-params-heads", "allocation-error")]
         + [("gpt2", "wpr-dataflow-lstsq"), ("gpt2", "mpr-dataflow-global-lstsq")])


@pytest.mark.parametrize("family,name", CASES)
def test_same_kept_sets_as_in_memory(checkpoints, ids, family, name):
    model, folder = checkpoints[family]
    config = PruneConfig(**CONFIGS[name])
    ref = llmrank.prune(model, ids, config=config, progress=False)
    got = prune_layerwise(folder, ids, config=config)
    _same_kept(ref, got)
    assert got.widths == ref.widths
    assert got.params_after == ref.params_after and got.params_before == ref.params_before
    assert got.output_check.relative_error == pytest.approx(ref.output_check.relative_error, rel=1e-6, abs=1e-9)
    assert got.verification.ok and len(got.blocks) == 3
    for key in ("calibration_batches", "calibration_tokens", "compensation_tokens", "effective_sparsity"):
        assert got.config[key] == ref.config[key], key


@pytest.mark.parametrize("family,name", [("llama", "wpr-dataflow-lstsq"), ("qwen2", "wpr-dataflow-global"),
                                         ("gemma3", "wpr-dataflow-lstsq"), ("llama", "random-dataflow-bias"),
                                         ("llama", "target-params-heads"), ("qwen2", "heads"), ("gemma3", "target-params-heads")])
def test_written_checkpoint_reloads_to_the_in_memory_slim_model(checkpoints, ids, tmp_path, family, name):
    model, folder = checkpoints[family]
    config = PruneConfig(**CONFIGS[name])
    ref = llmrank.prune(model, ids, config=config, progress=False)
    out = tmp_path / "slim"
    got = prune_layerwise(folder, ids, config=config, out_dir=out, max_shard_size=20_000)
    _same_kept(ref, got)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert all((out / f).is_file() for f in set(index["weight_map"].values()))
    reloaded = llmrank.load(out)
    probe = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    _close(_logits(ref.model, probe), _logits(reloaded, probe))
    info = json.loads((out / "config.json").read_text())["llmrank"]
    assert ("layer_heads" in info) == bool(ref.heads)  # per-layer head counts are recorded for llmrank.load
    if info.get("loader") != "llmrank.load" and "bias" not in name:  # stock loading works too
        stock = T.AutoModelForCausalLM.from_pretrained(out).eval()
        _close(_logits(ref.model, probe), _logits(stock, probe))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint(tmp_path, ids, dtype):
    """A bf16/fp16 checkpoint stays in its dtype end to end; statistics accumulate in fp32/fp64,
    so the kept sets equal those of the in-memory prune of the same half-precision model."""
    folder = tmp_path / "half"
    _build("llama").to(dtype).save_pretrained(folder, safe_serialization=True, max_shard_size="30KB")
    assert Checkpoint(folder).dtype() == dtype
    # loaded as a user loads it (rotary tables stay fp32; a cast model would have half ones)
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    config = PruneConfig(compensation="lstsq")  # the verification bound widens to bf16 rounding by itself
    ref = llmrank.prune(model, ids, config=config, progress=False)
    got = prune_layerwise(folder, ids, config=config, out_dir=tmp_path / "slim", max_shard_size=20_000)
    _same_kept(ref, got)
    assert got.dtype == str(dtype).replace("torch.", "")
    from safetensors import safe_open

    for shard in (tmp_path / "slim").glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
    reloaded = llmrank.load(tmp_path / "slim")
    assert next(reloaded.parameters()).dtype == dtype
    probe = ids[:2]
    assert torch.equal(_logits(ref.model, probe), _logits(reloaded, probe))


@pytest.mark.parametrize("refit_inputs", ["dense", "pruned"])
def test_hidden_states_spill_to_disk_past_the_budget(checkpoints, ids, refit_inputs):
    """Both streams (the dense one and the sequential refit's pruned one) spill, with the same result."""
    model, folder = checkpoints["llama"]
    config = PruneConfig(compensation="lstsq", refit_inputs=refit_inputs)
    ref = llmrank.prune(model, ids, config=config, progress=False)
    got = prune_layerwise(folder, ids, config=config, hidden_budget_bytes=1)
    assert got.spilled
    _same_kept(ref, got)
    assert got.output_check.relative_error == pytest.approx(ref.output_check.relative_error, rel=1e-4, abs=1e-6)


def test_two_streams_share_one_spill_budget():
    """The pruned stream's store spills once the dense stream has spent the shared budget."""
    from llmrank.passes.blocks.hidden import SpillBudget

    pool = SpillBudget(100)
    dense, pruned = HiddenStates(shared=pool), HiddenStates(shared=pool)
    a, b = torch.randn(3, 5), torch.randn(2, 5)  # 60 and 40 bytes
    dense.put(0, a)
    pruned.put(0, b)  # 100 in all: still in memory
    assert pruned.spill is None and pool.used == 100
    pruned.put(1, torch.randn(1))  # one float past the budget: on disk
    assert pruned.spill is not None and dense.spill is None
    assert torch.equal(pruned.get(0), b) and pool.peak == 100
    dense.close()
    pruned.close()
    assert pool.used == 0


def test_hidden_store_round_trip():
    store = HiddenStates(budget_bytes=100)
    a, b = torch.randn(2, 3), torch.randn(5, 7)
    store.put(0, a)
    store.put(1, b)  # over the budget: on disk
    assert store.spill is not None and torch.equal(store.get(0), a) and torch.equal(store.get(1), b)
    spill = store.spill
    store.close()
    assert not spill.exists()


def test_refusals(checkpoints, ids, tmp_path):
    _, folder = checkpoints["llama"]
    with pytest.raises(ConfigError, match="hits"):
        prune_layerwise(folder, ids, config=PruneConfig(scorer="hits"))
    with pytest.raises(ConfigError, match="mode"):
        prune_layerwise(folder, ids, config=PruneConfig(mode="mask"))
    with pytest.raises(InputError, match="config.json"):
        prune_layerwise(tmp_path, ids)
    with pytest.raises(ValueError, match="input folder"):
        prune_layerwise(folder, ids, out_dir=folder / "slim")


# ---------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def cli_workspace(tmp_path_factory):
    import random

    from test_cli import WORDS, make_tokenizer

    root = tmp_path_factory.mktemp("lw-cli")
    model_dir = root / "tiny-llama"
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        vocab_size=64, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    T.LlamaForCausalLM(cfg).eval().save_pretrained(model_dir, max_shard_size="40KB")
    make_tokenizer().save_pretrained(model_dir)
    rng = random.Random(0)
    text = root / "calib.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + " ." for _ in range(40)))
    return root, model_dir, text


def _cli(root, model_dir, text, name, *flags):
    from llmrank.cli import main

    out = root / name
    code = main(["prune", str(model_dir), "--sparsity", "0.25", "--samples", "4", "--compensation-samples", "6", "--seq-len", "32",
                 "--calib", str(text), "--out", str(out), "--quiet", *flags])
    assert code == 0
    return out, json.loads((out / "report.json").read_text())


def test_cli_layerwise_equals_in_memory(cli_workspace):
    from safetensors.torch import load_file

    root, model_dir, text = cli_workspace
    mem, mem_report = _cli(root, model_dir, text, "mem", "--no-onnx", "--pruner", "global")
    lw, lw_report = _cli(root, model_dir, text, "lw", "--no-onnx", "--pruner", "global", "--layerwise")
    assert mem_report["route"] == "in memory" and lw_report["route"].startswith("layerwise")
    assert lw_report["widths"] == mem_report["widths"] and lw_report["params_after"] == mem_report["params_after"]
    a, b = load_file(str(mem / "scores.safetensors")), load_file(str(lw / "scores.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    probe = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    _close(_logits(llmrank.load(mem / "hf"), probe), _logits(llmrank.load(lw / "hf"), probe))
    assert lw_report["blocks"] and lw_report["peak_rss_bytes"] > 0


def test_cli_chooses_layerwise_past_max_memory_and_skips_onnx(cli_workspace):
    root, model_dir, text = cli_workspace
    out, report = _cli(root, model_dir, text, "auto", "--max-memory", "10KB")
    assert report["route"].startswith("layerwise: the in-memory prune needs")
    assert "onnx" not in report["artifacts"] and any("ONNX skipped" in n for n in report["notes"])
    assert any(f"llmrank export {out / 'hf'} --out" in n for n in report["notes"])  # the suggested command runs as given
    assert (out / "hf" / "config.json").is_file()


@pytest.mark.onnx
def test_cli_layerwise_exports_onnx_when_it_fits(cli_workspace):
    root, model_dir, text = cli_workspace
    out, report = _cli(root, model_dir, text, "lw-onnx", "--layerwise", "--no-kv-cache")
    assert (out / report["artifacts"]["onnx"]["path"]).is_file()
    assert report["artifacts"]["hf"]["reload_max_abs_diff"] <= 1e-4


def test_cli_refuses_bad_execution_options(cli_workspace, capsys):
    from llmrank.cli import main

    root, model_dir, text = cli_workspace
    for flags, words in ((["--max-memory", "lots"], "--max-memory"), (["--device", "tpu9"], "--device"),
                         (["--layerwise", "--scorer", "hits"], "hits")):
        code = main(["prune", str(model_dir), "--out", str(root / "never"), "--quiet", *flags])
        assert code != 0
        assert words in capsys.readouterr().err
    assert not (root / "never").exists()


def test_weight_only_scorer_without_calibration(checkpoints):
    """l1 needs no data: both routes verify on the same example tokens and keep the same neurons."""
    model, folder = checkpoints["qwen2"]
    config = PruneConfig(scorer="l1", pruner="global")
    ref = llmrank.prune(model, None, config=config, progress=False)
    got = prune_layerwise(folder, None, config=config)
    _same_kept(ref, got)
    assert got.output_check.relative_error == pytest.approx(ref.output_check.relative_error, rel=1e-6)


def test_accelerate_loaded_models_in_memory_or_block_by_block(checkpoints, ids, tmp_path):
    """accelerate's device_map: a model it keeps in memory prunes in memory as usual; one whose
    weights it offloads to disk (max_memory) is refused with a pointer to the block-by-block
    route, which prunes the same folder to the same kept sets."""
    model, folder = checkpoints["llama"]
    ref = llmrank.prune(model, ids, progress=False)
    in_memory = T.AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"}).eval()
    _same_kept(ref, llmrank.prune(in_memory, ids, progress=False))
    offloaded = T.AutoModelForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": 10_000},
                                                       offload_folder=str(tmp_path / "offload")).eval()
    assert any(p.is_meta for p in offloaded.parameters())  # accelerate really offloaded them
    with pytest.raises(InputError, match="offloaded by accelerate.*--layerwise"):
        llmrank.prune(offloaded, ids, progress=False)
    _same_kept(ref, prune_layerwise(folder, ids, config=PruneConfig()))
