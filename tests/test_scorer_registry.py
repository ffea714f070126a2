"""The scorer table: built-in and user scorers share one contract, and every route reads it.

A user scorer is registered by name (or named as ``module:function``), declares what it reads
and whether it can score one block at a time; the in-memory and block routes then keep the
channels that an independent top-k of its scores keeps, and a route that lacks what it declares
refuses it before any model is read.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import transformers as T

import llmrank
from llmrank.ir.errors import CalibrationError, ConfigError
from llmrank.layerwise import prune_layerwise
from llmrank.passes import registry, routes
from llmrank.passes.config import PruneConfig
from llmrank.passes.headcut import select_heads
from llmrank.passes.score import HEAD_SCORERS, SCORERS, ScoreConfig, Scores
from llmrank.passes.select import select

V = 64

PLUGIN = textwrap.dedent('''
    import torch
    import llmrank

    @llmrank.scorer("plugin-down-norm", sliceable=True)
    def down_norm(request):
        """Each FFN neuron's input norm into down_proj times its column's L2 norm: reads its own block only."""
        out = {}
        for g in request.ir.groups:
            down = g.consumers[0].linear
            weight = request.model.get_parameter(request.ir.linears[down].weight).detach().float()
            out[g.name] = request.norms.a_in[down].double() * weight.norm(dim=0).double()
        return out

    def whole_model_rank(request):
        """Ranks each group's channels against the largest norm of the whole model: reads every block."""
        top = max(float(request.norms.a_in[g.consumers[0].linear].max()) for g in request.ir.groups)
        return {g.name: request.norms.a_in[g.consumers[0].linear].double() / top for g in request.ir.groups}

    def _o_columns(request, hg):
        weight = request.model.get_parameter(request.ir.linears[hg.o.linear].weight).detach().double()
        return weight[:, hg.o.offset:hg.o.offset + hg.heads * hg.head_dim]

    @llmrank.scorer("plugin-o-norm", unit="heads", needs=(), sliceable=True)
    def o_norm(request):
        """Each query head's squared o_proj column norm: reads its own layer's weights only."""
        return {hg.name: _o_columns(request, hg).pow(2).sum(0).view(hg.heads, hg.head_dim).sum(1)
                for hg in request.ir.head_groups}

    def o_norm_against_the_model(request):
        """The same, over the largest o_proj norm of the whole model: reads every layer."""
        top = max(float(_o_columns(request, hg).norm()) for hg in request.ir.head_groups)
        return {hg.name: _o_columns(request, hg).pow(2).sum(0).view(hg.heads, hg.head_dim).sum(1) / top
                for hg in request.ir.head_groups}
''')


@pytest.fixture(autouse=True)
def own_table(monkeypatch):
    """Each test registers into a copy of the table, so names never leak between tests."""
    monkeypatch.setattr(registry, "_TABLE", dict(registry._TABLE))


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    (tmp_path / "llmrank_test_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "llmrank_test_plugin", raising=False)
    return "llmrank_test_plugin"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=16, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=V, max_position_embeddings=32)).eval()
    folder = tmp_path_factory.mktemp("registry")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(2))


def _expected_kept(model, ids, fn, sparsity):
    """The top-k of the scorer's own answer on independently computed norms."""
    traced = llmrank.trace(model)
    ir = llmrank.analyze(traced)
    norms = llmrank.calibrate(model, ir, list(ids.split(4)), linears=ir.calibration_linears(), progress=False)
    return select(ir, fn(registry.ScoreRequest(model, ir, norms, ScoreConfig())), sparsity)


def test_builtins_are_in_the_table_with_their_declarations():
    assert registry.builtin_names() == SCORERS
    assert {n for n in SCORERS if registry.get_scorer(n).weight_only} == {"l1", "lp", "random"}
    assert {n for n in SCORERS if "gradients" in registry.get_scorer(n).needs} == {"taylor", "taylor-element"}
    assert {n for n in SCORERS if not registry.get_scorer(n).sliceable} == {"hits", "taylor", "taylor-element"}
    # the route check reads the same declarations: the block route refuses exactly the non-sliceable ones
    refused = {n for n in SCORERS if routes.refusals(PruneConfig(scorer=n), routes.BLOCKS)}
    assert refused == {"hits", "taylor", "taylor-element"}


def test_a_module_path_scorer_runs_in_memory_and_block_by_block_alike(plugin, llama, ids):
    model, folder = llama
    name = f"{plugin}:down_norm"
    spec = registry.get_scorer(name)
    assert spec.sliceable and spec.needs == {"activations"}  # the decorator's declaration carries over
    mod = __import__(plugin)
    expected = _expected_kept(model, ids, mod.down_norm, 0.25)
    in_memory = llmrank.prune(model, ids, scorer=name, sparsity=0.25, progress=False)
    blocks = prune_layerwise(folder, ids, config=PruneConfig(scorer=name, sparsity=0.25))
    for g, kept in expected.items():
        assert torch.equal(in_memory.kept[g], kept)
        assert torch.equal(blocks.kept[g], kept)
    assert blocks.params_after == in_memory.params_after
    assert in_memory.config["scorer"] == name
    # a registered name is the same scorer
    by_name = llmrank.prune(model, ids, scorer="plugin-down-norm", sparsity=0.25, progress=False)
    assert all(torch.equal(by_name.kept[g], k) for g, k in expected.items())


def test_a_scorer_not_declared_sliceable_is_refused_block_by_block_before_reading(plugin, llama, ids, tmp_path):
    model, _ = llama
    name = f"{plugin}:whole_model_rank"
    assert not registry.get_scorer(name).sliceable  # a bare function gets the safe default
    with pytest.raises(ConfigError, match=r"whole_model_rank.*sliceable=True.*block by block"):
        prune_layerwise(tmp_path / "never-read", ids, config=PruneConfig(scorer=name))
    got = llmrank.prune(model, ids, scorer=name, sparsity=0.25, progress=False)  # in memory it has the whole model
    expected = _expected_kept(model, ids, __import__(plugin).whole_model_rank, 0.25)
    assert all(torch.equal(got.kept[g], k) for g, k in expected.items())


def test_cli_takes_a_module_path_and_refuses_before_loading(plugin, llama, tmp_path, capsys, monkeypatch):
    from llmrank.cli import main
    from llmrank.passes.blocks import driver

    _, folder = llama

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the refusal")

    monkeypatch.setattr(driver, "skeleton", no_model)
    code = main(["prune", str(folder), "--layerwise", "--scorer", f"{plugin}:whole_model_rank",
                 "--out", str(tmp_path / "never"), "--quiet"])
    assert code != 0 and "sliceable" in capsys.readouterr().err
    code = main(["prune", str(tmp_path / "no-such-model"), "--scorer", "no_such_module_xyz:fn", "--out", str(tmp_path / "never"),
                 "--quiet"])
    assert code != 0 and "cannot import 'no_such_module_xyz'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_registration_errors_say_what_to_do(plugin):
    with pytest.raises(ConfigError, match="already registered.*built-in"):
        llmrank.register_scorer("wpr", lambda r: {})
    llmrank.register_scorer("mine", lambda r: {})
    with pytest.raises(ConfigError, match="replace=True"):
        llmrank.register_scorer("mine", lambda r: {})
    with pytest.raises(ConfigError, match="may need activations, gradients"):
        llmrank.register_scorer("odd", lambda r: {}, needs=("hessians",))
    with pytest.raises(ConfigError, match="no attribute 'nope'"):
        PruneConfig(scorer=f"{plugin}:nope")
    with pytest.raises(ConfigError, match="unknown scorer 'mine2'.*mine"):
        PruneConfig(scorer="mine2")


def test_a_wrong_answer_is_named_and_a_missing_need_is_caught(llama, ids):
    model, _ = llama
    llmrank.register_scorer("short", lambda r: {g.name: torch.ones(3) for g in r.ir.groups})
    with pytest.raises(ConfigError, match=r"scorer 'short' gave \(3,\) scores"):
        llmrank.prune(model, ids, scorer="short", progress=False)
    llmrank.register_scorer("weights-only", lambda r: Scores(groups={g.name: torch.ones(g.width) for g in r.ir.groups}),
                            needs=(), sliceable=True)
    assert llmrank.prune(model, None, scorer="weights-only", sparsity=0.25, progress=False).params_after < \
        sum(p.numel() for p in model.parameters())
    with pytest.raises(CalibrationError, match="needs calibration"):
        llmrank.prune(model, None, scorer="wanda", progress=False)


def test_a_sweep_varies_only_the_parameters_a_scorer_declares_it_reads():
    from llmrank.sweep import expand_cells

    llmrank.register_scorer("reads-all", lambda r: {})
    llmrank.register_scorer("reads-gamma", lambda r: {}, reads=("gamma",))
    cells = expand_cells(["reads-all", "reads-gamma", "l1"], [0.2], gammas=[0.0, 0.5], thetas=[0.3, 0.5],
                         representations=["dataflow"])
    count = {name: sum(c.scorer == name for c in cells) for name in ("reads-all", "reads-gamma", "l1")}
    assert count == {"reads-all": 4, "reads-gamma": 2, "l1": 1}
    with pytest.raises(ConfigError, match="reads some of"):
        llmrank.register_scorer("reads-odd", lambda r: {}, reads=("temperature",))


# ---------------------------------------------------------------------- head scorers: the same table, unit="heads"


def test_builtin_head_scorers_are_in_the_table_with_their_declarations():
    heads = registry.builtin_names("heads")
    assert set(heads) == set(HEAD_SCORERS) == {"wpr", "mpr", "activation", "l1", "l2", "wanda", "fluctuation", "random"}
    assert {n for n in heads if registry.get_scorer(n, unit="heads").weight_only} == {"l1", "l2", "random"}
    assert {n for n in heads if "variances" in registry.get_scorer(n, unit="heads").needs} == {"fluctuation"}
    # beside another neuron scorer, wpr / mpr rank heads on a second graph of the whole model: refused block by block
    refused = {n for n in heads if routes.refusals(PruneConfig(scorer="activation", head_sparsity=0.5, head_scorer=n),
                                                   routes.BLOCKS)}
    assert refused == {"wpr", "mpr"}
    # with the same neuron scorer they share its graph, which scores block by block
    assert not routes.refusals(PruneConfig(scorer="mpr", head_sparsity=0.5, head_scorer="mpr"), routes.BLOCKS)
    assert not PruneConfig(scorer="l1", head_sparsity=0.5, head_scorer="l2").needs_calibration
    assert PruneConfig(scorer="l1", head_sparsity=0.5, head_scorer="fluctuation").needs_variances


def test_a_module_path_head_scorer_runs_in_memory_and_block_by_block_alike(plugin, llama, ids):
    model, folder = llama
    name = f"{plugin}:o_norm"
    spec = registry.get_scorer(name, unit="heads")
    assert spec.unit == "heads" and spec.sliceable and spec.weight_only  # the decorator's declaration carries over
    ir = llmrank.analyze(llmrank.trace(model))
    answer = __import__(plugin).o_norm(registry.ScoreRequest(model, ir, None, ScoreConfig()))
    expected = select_heads(ir, answer, 0.5)
    config = dict(scorer="l1", head_sparsity=0.5, head_scorer=name, sparsity=0.25)
    in_memory = llmrank.prune(model, ids, progress=False, **config)
    blocks = prune_layerwise(folder, ids, config=PruneConfig(**config))
    assert len(expected) == 3
    for hg, kept in expected.items():
        assert kept.numel() == 2  # one head of each KV group of 2 goes
        assert torch.equal(in_memory.kept[hg], kept)
        assert torch.equal(blocks.kept[hg], kept)
        want = answer[hg] / answer[hg].sum()  # the Score pass normalises every answer per layer
        assert torch.allclose(in_memory.scores.heads[hg], want, rtol=1e-12, atol=0)
        assert torch.equal(blocks.scores.heads[hg], in_memory.scores.heads[hg])
    assert blocks.params_after == in_memory.params_after
    assert in_memory.heads  # report.json's head section is filled


def test_a_head_scorer_not_declared_sliceable_is_refused_block_by_block_before_reading(plugin, llama, ids, tmp_path):
    model, _ = llama
    name = f"{plugin}:o_norm_against_the_model"
    assert not registry.get_scorer(name, unit="heads").sliceable
    with pytest.raises(ConfigError, match=r"o_norm_against_the_model.*sliceable=True.*block by block"):
        prune_layerwise(tmp_path / "never-read", ids, config=PruneConfig(head_sparsity=0.5, head_scorer=name))
    got = llmrank.prune(model, ids, head_sparsity=0.5, head_scorer=name, progress=False)
    ir = got.ir
    answer = __import__(plugin).o_norm_against_the_model(registry.ScoreRequest(model, ir, None, ScoreConfig()))
    assert all(torch.equal(got.kept[hg], k) for hg, k in select_heads(ir, answer, 0.5).items())


def test_head_scorer_mistakes_are_named(plugin, llama, ids):
    model, _ = llama
    llmrank.register_scorer("one-score", lambda r: {hg.name: torch.ones(1) for hg in r.ir.head_groups}, needs=(), unit="heads")
    with pytest.raises(ConfigError, match=r"head scorer 'one-score' gave \(1,\) scores for head group .* of 4 heads"):
        llmrank.prune(model, ids, head_sparsity=0.5, head_scorer="one-score", progress=False)
    with pytest.raises(ConfigError, match="a heads scorer may need activations, variances"):
        llmrank.register_scorer("grad-heads", lambda r: {}, needs=("gradients",), unit="heads")
    with pytest.raises(ConfigError, match="registered as a scorer, not a head scorer"):
        PruneConfig(head_sparsity=0.5, head_scorer=f"{plugin}:down_norm")
    with pytest.raises(ConfigError, match=r"unknown head_scorer 'nope'.*unit='heads'"):
        PruneConfig(head_scorer="nope")
    # a neuron scorer with no head scorer of its name cannot pick one for itself
    with pytest.raises(ConfigError, match="plugin-down-norm' ranks FFN neurons only"):
        __import__(plugin)
        PruneConfig(scorer="plugin-down-norm", head_sparsity=0.5)
