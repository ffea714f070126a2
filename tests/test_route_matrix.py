"""Every PruneConfig option on every route: honoured exactly as in memory, or refused before any work.

The routes are the in-memory prune (``llmrank.prune``), the block route (``prune_layerwise`` on a
safetensors folder), the exported-program route (``prune_program``) and a sweep cell (the
pipeline's data stage run once, its decision stage per configuration). For each option value
below, ``routes.refusals`` says whether a route can honour it. Where it can, the route must keep
exactly the channels (and heads) the in-memory prune keeps; where it cannot, the call must fail
with a ConfigError before the model is read (a folder that does not exist, a program whose passes
never start). A new PruneConfig field without a row here fails ``test_every_option_has_a_row``.
"""

from __future__ import annotations

import copy
from dataclasses import fields

import pytest
import torch
import transformers as T

import llmrank
from llmrank.api import as_batches
from llmrank.ir.errors import ConfigError
from llmrank.layerwise import prune_layerwise
from llmrank.passes import routes
from llmrank.passes.config import PruneConfig
from llmrank.passes.pipeline import Pipeline, PruneState
from llmrank.passes.program import prune_program
from llmrank.passes.score import SCORERS

V = 64
LSTSQ = {"compensation": "lstsq"}


def _down_input_norm(request):
    """A user scorer that reads its own block only (declared sliceable)."""
    return {g.name: request.norms.a_in[g.consumers[0].linear].double() for g in request.ir.groups}


def _against_the_whole_model(request):
    """A user scorer that reads every block at once (not declared sliceable)."""
    top = max(float(request.norms.a_in[g.consumers[0].linear].max()) for g in request.ir.groups)
    return {g.name: request.norms.a_in[g.consumers[0].linear].double() / top for g in request.ir.groups}


llmrank.register_scorer("matrix-user-sliceable", _down_input_norm, sliceable=True, replace=True)
llmrank.register_scorer("matrix-user-whole", _against_the_whole_model, replace=True)

#: (row name, options). Every PruneConfig field appears in at least one row with a non-default value.
ROWS: list[tuple[str, dict]] = [
    ("sparsity", {"sparsity": 0.5}),
    ("head_sparsity", {"head_sparsity": 0.5}),
    ("target_params", {"target_params": 0.8}),
    ("head_share", {"target_params": 0.8, "head_share": 0.5}),
    ("head_scorer", {"head_sparsity": 0.5, "head_scorer": "fluctuation"}),
    ("head_scorer-second-graph", {"head_sparsity": 0.5, "scorer": "activation", "head_scorer": "wpr"}),
    *[(f"scorer-{s}", {"scorer": s}) for s in SCORERS if s != "wpr"],
    ("scorer-user-sliceable", {"scorer": "matrix-user-sliceable"}),
    ("scorer-user-whole", {"scorer": "matrix-user-whole"}),
    ("representation-chained", {"representation": "chained"}),
    ("representation-isolated", {"representation": "isolated"}),
    ("pruner", {"pruner": "global"}),
    ("theta", {"theta": 0.2}),
    ("gamma", {"gamma": 0.8}),
    ("p", {"scorer": "lp", "p": 3.0}),
    ("z_importance", {"scorer": "mpr", "z_importance": 0.25}),
    ("seed", {"scorer": "random", "seed": 3}),
    ("multiple", {"multiple": 8}),
    ("min_width", {"min_width": 40}),
    ("allocation-error", {"allocation": "error", **LSTSQ}),
    ("allocation-fisher", {"allocation": "fisher", **LSTSQ}),
    ("allocation-loss", {"allocation": "loss", **LSTSQ}),
    ("probe_samples", {"allocation": "loss", "probe_samples": 2, **LSTSQ}),
    ("selection", {"selection": "refit", **LSTSQ}),
    ("mode-mask", {"mode": "mask"}),
    ("mode-mask-paper", {"mode": "mask-paper"}),
    ("compensation-lstsq", LSTSQ),
    ("compensation-lstsq+bias", {"compensation": "lstsq+bias"}),
    *[(f"compensation-{c}", {"compensation": c}) for c in ("mean", "diag") if c in PruneConfig.__dataclass_fields__["compensation"].metadata["choices"]],
    ("refit_inputs-pruned", {"refit_inputs": "pruned", **LSTSQ}),
    ("refit_inputs-pruned-self", {"refit_inputs": "pruned-self", **LSTSQ}),
    ("ridge", {"ridge": 0.1, **LSTSQ}),
    ("verify", {"verify": False}),
    ("verify_atol", {"verify_atol": 1e-4, "verify_rtol": 1e-4}),
    ("batch_size", {"batch_size": 2}),
    ("inplace", {"inplace": True}),
    ("prune_tied", {"prune_tied": True}),
]
CONFIGS = {name: PruneConfig(**options) for name, options in ROWS}


def test_every_option_has_a_row():
    default = PruneConfig()
    covered = {f.name for f in fields(PruneConfig) for c in CONFIGS.values() if getattr(c, f.name) != getattr(default, f.name)}
    assert covered == {f.name for f in fields(PruneConfig)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=V, max_position_embeddings=32)).eval()
    folder = tmp_path_factory.mktemp("matrix")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(llama, ids):
    """The in-memory prune of every row (the route that can do everything)."""
    model, _ = llama
    traced = llmrank.trace(model)
    out = {}
    for name, config in CONFIGS.items():
        assert routes.refusals(config, routes.IN_MEMORY) == []
        target = copy.deepcopy(model) if config.inplace else model
        out[name] = llmrank.prune(target, ids, config=config, progress=False, traced=None if config.inplace else traced)
    return out


def _kept_lists(kept: dict[str, torch.Tensor]) -> list[list[int]]:
    """Kept indices in group order (the program route names groups by its own module paths)."""
    return [v.tolist() for v in kept.values()]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_route(name, llama, ids, reference, tmp_path):
    config = CONFIGS[name]
    _, folder = llama
    if routes.refusals(config, routes.BLOCKS):
        with pytest.raises(ConfigError, match="block by block"):
            prune_layerwise(tmp_path / "never-read", ids, config=config)  # refused before the folder is looked at
        return
    got = prune_layerwise(folder, ids, config=config)
    ref = reference[name]
    assert _kept_lists(got.kept) == _kept_lists(ref.kept)
    assert got.params_after == ref.params_after
    assert got.config["applied"] == ref.config["applied"]
    # the same model: its logits are as far from the dense model's as the in-memory slim model's are
    assert got.output_check.relative_error == pytest.approx(ref.output_check.relative_error, rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def program(llama):
    model, _ = llama
    return llmrank.trace(model).program  # the HF model exported as llmrank traces it (token ids -> logits)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_program_route(name, program, ids, reference):
    config = CONFIGS[name]
    inputs = [(batch,) for batch in ids.split(config.batch_size)]
    refused = routes.refusals(config, routes.PROGRAM)
    if refused:
        with pytest.raises(ConfigError, match="exported program") as info:
            prune_program(program, inputs, config=config)
        assert info.value.pass_name is None  # no pass had started
        return
    got = prune_program(program, inputs, config=config)
    assert _kept_lists(got.kept) == _kept_lists(reference[name].kept)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sweep_cell(name, llama, ids, reference):
    """A sweep cell: the data stage once (with the options every cell shares), the decision stage per config."""
    from llmrank.sweep import _shared_config

    config = CONFIGS[name]
    if config.inplace:
        pytest.skip("a sweep rewrites copies: every cell starts from the same dense model")
    model, _ = llama
    data, decide = Pipeline.stages()
    batches = tuple(as_batches(ids, batch_size=config.batch_size))
    shared = data.run(PruneState(config=_shared_config(config, [config]), model=model, batches=batches))
    state = decide.run(shared.update(config=config, history=()))
    assert _kept_lists(state.kept) == _kept_lists(reference[name].kept)
