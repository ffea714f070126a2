"""The passes every route shares: the block route runs the pipeline's own pass objects per block,
the refit's Grams end with Compensate on every route, and an in-place rewrite is still verified."""

from __future__ import annotations

import gc

import pytest
import torch
import transformers as T

import llmrank
import llmrank.passes.pipeline as pipeline
from llmrank.ir.errors import VerificationError
from llmrank.layerwise import prune_layerwise
from llmrank.passes.config import PruneConfig
from llmrank.passes.pipeline import Pipeline, PruneState

D, FF, V, LAYERS = 32, 96, 128, 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                                             max_position_embeddings=64, tie_word_embeddings=False)).eval()
    out = tmp_path_factory.mktemp("llama")
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, V, (6, 16), generator=torch.Generator().manual_seed(1))


def _grams_alive() -> int:
    """Live float64 FF x FF tensors: the refit's Gram matrices of the down projections' inputs."""
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and not o.is_meta and o.dtype == torch.float64
               and tuple(o.shape) == (FF, FF))


def _count_calls(monkeypatch, names: list[str]) -> dict[str, list[int | None]]:
    """Wrap the named pass classes' ``call`` to record the block each call was given (None: a whole model)."""
    seen: dict[str, list[int | None]] = {name: [] for name in names}
    for name in names:
        cls = getattr(pipeline, name)
        real = cls.call

        def call(self, state, _real=real, _name=name):
            seen[_name].append(state.block)
            return _real(self, state)

        monkeypatch.setattr(cls, "call", call)
    return seen


@pytest.mark.parametrize("options", [{"sparsity": 0.25}, {"target_params": 0.85, "head_share": 0.3}],
                         ids=["local", "target-params-heads"])
def test_the_block_route_runs_the_pipelines_passes_on_every_block(folder, ids, monkeypatch, options):
    seen = _count_calls(monkeypatch, ["Score", "Select", "Compensate", "Shrink", "Verify"])
    result = prune_layerwise(folder, ids, compensation="lstsq", **options)
    blocks = list(range(LAYERS))
    assert seen["Score"] == blocks  # one scoring walk
    assert seen["Compensate"] == seen["Shrink"] == seen["Verify"] == blocks
    # a budget over the whole model (target_params) chooses per block under it; a local one too
    assert seen["Select"] == blocks
    assert result.verification is not None and result.verification.ok
    assert all(set(b.seconds) >= {"calibrate", "score", "select+refit", "shrink+verify"} for b in result.blocks)


def test_a_global_choice_hands_the_blocks_their_kept_sets(folder, ids, monkeypatch):
    seen = _count_calls(monkeypatch, ["Select", "Shrink"])
    prune_layerwise(folder, ids, sparsity=0.25, pruner="global")
    assert seen["Select"] == []  # chosen over every block at once, with Select's functions
    assert seen["Shrink"] == list(range(LAYERS))


def test_a_wrong_block_rewrite_is_caught_by_verify(folder, ids, monkeypatch):
    real = pipeline.shrink

    def broken(model, ir, kept, **kwargs):
        slim = real(model, ir, kept, **kwargs)
        layers = slim.get_submodule("model.layers")  # the block route's holder: {"i": block i}
        if "1" in layers:
            with torch.no_grad():
                layers["1"].mlp.down_proj.weight.mul_(1.5)
        return slim

    monkeypatch.setattr(pipeline, "shrink", broken)
    with pytest.raises(VerificationError, match="block 1: the shrunk block differs from the masked dense block"):
        prune_layerwise(folder, ids, sparsity=0.25)


def test_compensate_drops_the_grams_before_the_rewrite_copies_the_model(monkeypatch):
    """In memory as block by block: no Gram is alive when the verification's masked copy is made."""
    model = llmrank_llama()
    calib = torch.randint(0, V, (8, 16), generator=torch.Generator().manual_seed(2))
    alive: list[int] = []
    real_mask = pipeline.mask

    def mask(*args, **kwargs):
        alive.append(_grams_alive())
        return real_mask(*args, **kwargs)

    monkeypatch.setattr(pipeline, "mask", mask)
    state = Pipeline.default().run(model, PruneConfig(sparsity=0.25, compensation="lstsq"), batches=calib.split(4))
    assert state.refits and state.stats.moments == {}
    assert alive and alive == [0] * len(alive), f"Grams alive at the masked copies: {alive}"


def test_in_place_prune_is_verified_against_the_masked_dense_model(monkeypatch):
    model = llmrank_llama()
    calib = torch.randint(0, V, (8, 16), generator=torch.Generator().manual_seed(3))
    result = llmrank.prune(model, calib, sparsity=0.25, compensation="lstsq", inplace=True, progress=False)
    assert result.model is model
    assert result.verification is not None and result.verification.ok and result.verification.max_abs_diff < 1e-4
    assert not any("verification skipped" in note for note in result.notes)

    real = pipeline.shrink

    def broken(model, ir, kept, **kwargs):
        slim = real(model, ir, kept, **kwargs)
        with torch.no_grad():
            slim.model.layers[0].mlp.up_proj.weight.mul_(-1.0)
        return slim

    monkeypatch.setattr(pipeline, "shrink", broken)
    with pytest.raises(VerificationError, match="the shrunk model differs from the masked dense model"):
        llmrank.prune(llmrank_llama(), calib, sparsity=0.25, inplace=True, progress=False)


def test_a_state_names_its_route():
    from llmrank.passes import routes

    assert PruneState().route is routes.IN_MEMORY
    assert PruneState(block=3).route is routes.BLOCKS
    assert PruneState(block=3).rewrites_in_place and not PruneState().rewrites_in_place


def llmrank_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=D, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)).eval()
