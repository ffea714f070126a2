"""The ExportedProgram route: prune_program, its exporters (ONNX, AOTInductor) and the pass manager.

Each program is exported and pruned once per module (fixtures below); torch.export of the
tiny HF models dominates the runtime (a few seconds each on a busy 2-core CPU).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.export import Dim

from llmrank.ir.trace import TensorOutput
from llmrank.passes.analyze import analyze
from llmrank.passes.calibrate import calibrate
from llmrank.ir.errors import InputError, PassError
from llmrank.passes.pipeline import (
    Analyze, Calibrate, FunctionPass, Pipeline, PruneState, Score, Select, Shrink, Trace, Verify,
)
from llmrank.passes.result import PruneResult
from llmrank.passes.program import (
    calibrate_program, mask_program, outputs_diff, program_dynamic_shapes, program_traced,
    prune_program,
)
from llmrank.ir import errors as llmrank_errors
from llmrank.passes.config import PruneConfig
from llmrank.passes.registry import ScoreRequest
from llmrank.passes.score import ScoreConfig, Scores
from llmrank.passes.select import select

SPARSITY = 0.3
VOCAB = 128


@dataclass
class Case:
    ep: torch.export.ExportedProgram
    result: PruneResult
    calib: list[tuple]
    other_shape: tuple  # inputs at a batch/seq size the program was not exported with
    dense_state: dict[str, tuple[int, ...]]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 4)).eval()


def _hf(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _tokens(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _case(kind: str) -> Case:
    if kind == "mlp":
        ep = torch.export.export(_mlp(), (torch.randn(3, 8),), dynamic_shapes=({0: Dim("batch")},))
        gen = torch.Generator().manual_seed(1)
        calib = [(torch.randn(16, 8, generator=gen),), (torch.randn(9, 8, generator=gen),)]
        other = (torch.randn(5, 8, generator=gen),)
    else:
        shapes = ({0: Dim("batch", max=64), 1: Dim("seq", max=64)},)
        with torch.no_grad():
            ep = torch.export.export(TensorOutput(_hf(kind)), (_tokens(2, 16, 0),), dynamic_shapes=shapes, strict=False)
        calib = [(_tokens(4, 16, 1),), (_tokens(2, 16, 2),)]
        other = (_tokens(3, 9, 3),)
    dense_state = {k: tuple(v.shape) for k, v in ep.state_dict.items()}
    result = prune_program(ep, calib, sparsity=SPARSITY)
    return Case(ep, result, calib, other, dense_state)


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    return {}


def _get(cases: dict[str, Case], kind: str) -> Case:
    if kind not in cases:
        cases[kind] = _case(kind)
    return cases[kind]


@pytest.fixture(params=["mlp", "llama", "gpt2"])
def case(request, cases) -> Case:
    return _get(cases, request.param)


@pytest.fixture(scope="module")
def mlp_case(cases) -> Case:
    return _get(cases, "mlp")


def test_slim_program_equals_masked_dense(case):
    r = case.result
    assert r.max_abs_diff <= 1e-5
    dense, masked, slim = case.ep.module(), mask_program(case.ep.module(), r.ir, r.kept), r.program.module()
    for inputs in (case.calib[1], case.other_shape):
        assert outputs_diff(masked, slim, [inputs]) <= 1e-5
    # the cut is real: the slim program is not the dense one
    assert outputs_diff(dense, slim, [case.other_shape]) > 1e-6


def test_slim_program_has_shrunk_parameters(case):
    r = case.result
    slim_state = {k: tuple(v.shape) for k, v in r.program.state_dict.items()}
    assert set(slim_state) == set(case.dense_state)  # same FQNs as the input program
    expected = dict(case.dense_state)
    for g in r.ir.groups:
        dropped = g.width - len(r.kept[g.name])
        assert dropped == round(SPARSITY * g.width)
        for slot in g.slots:
            shape = list(expected[slot.param])
            shape[slot.axis] -= dropped
            expected[slot.param] = tuple(shape)
    assert slim_state == expected
    # the graph's own placeholders carry the shrunk shapes too
    sig = r.program.graph_signature
    for node in r.program.graph.nodes:
        if node.op == "placeholder" and node.name in sig.inputs_to_parameters:
            assert tuple(node.meta["val"].shape) == slim_state[sig.inputs_to_parameters[node.name]]
    # the input program is untouched
    assert {k: tuple(v.shape) for k, v in case.ep.state_dict.items()} == case.dense_state


def test_slim_program_keeps_dynamic_shapes(case):
    r = case.result
    assert len(r.program.range_constraints) == len(case.ep.range_constraints) >= 1
    assert program_dynamic_shapes(r.program) is not None
    out = r.program.module()(*case.other_shape)
    assert out.shape[0] == case.other_shape[0].shape[0]
    # the slim program analyses again, with the kept widths
    ir = analyze(program_traced(r.program))
    assert {g.name: g.width for g in ir.groups} == {k: len(v) for k, v in r.kept.items()}


def test_gpt2_view_constants_are_rewritten(cases):
    case = _get(cases, "gpt2")
    views = [line for line in case.result.rewrites if "view last dim 128 -> " in line]
    assert len(views) == 4  # view(addmm, [b, s, 128]) and view(x, [-1, 128]) per layer


class _FusedGLU(nn.Module):
    """Phi-3-like fused gate/up with a last-dim split, and reshapes that hard-code the width."""

    def __init__(self, mode: str, d: int = 8, i: int = 12):
        super().__init__()
        self.mode, self.i = mode, i
        self.norm, self.gate_up, self.down = nn.LayerNorm(d), nn.Linear(d, 2 * i), nn.Linear(i, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(self.norm(x))
        if self.mode == "sizes":
            gate, up = h.split([self.i, self.i], -1)
        elif self.mode == "int":
            gate, up = h.split(self.i, -1)
        else:
            gate, up = h.chunk(2, -1)
        y = (F.silu(gate) * up).reshape(-1, self.i)
        return x + self.down(y).reshape(x.shape)


def test_fused_split_sizes_are_rewritten():
    torch.manual_seed(0)
    model = nn.Sequential(_FusedGLU("sizes"), _FusedGLU("int"), _FusedGLU("chunk")).eval()
    ep = torch.export.export(model, (torch.randn(2, 5, 8),), dynamic_shapes=({0: Dim("b"), 1: Dim("t")},))
    r = prune_program(ep, [(torch.randn(3, 4, 8),)], sparsity=0.25)
    assert r.max_abs_diff <= 1e-5
    assert {w for _, w in r.widths.values()} == {9}
    assert r.program.state_dict["0.gate_up.weight"].shape == (18, 8)
    assert sum("split sizes [12, 12] -> [9, 9]" in line for line in r.rewrites) == 2  # split_with_sizes and split(int)
    assert sum("chunk keeps 2 equal pieces" in line for line in r.rewrites) == 1
    x = torch.randn(4, 7, 8)
    assert outputs_diff(mask_program(ep.module(), r.ir, r.kept), r.program.module(), [(x,)]) <= 1e-5


def test_program_calibration_equals_module_hooks(cases, norms_of):
    """The interpreter's norms are those of forward hooks on the user's model (calibrate.py's definition)."""
    case = _get(cases, "llama")
    model = _hf("llama")  # the same seed: the weights the program was exported from
    traced = program_traced(case.ep)
    ir = analyze(traced)
    batches = [_tokens(4, 16, 1), _tokens(3, 11, 2)]
    got = calibrate_program(traced.model, ir, [(b,) for b in batches])
    names = [n[len("model."):] for n in ir.linears]
    reference = norms_of(model, names, batches)
    assert got.batches == 2 and got.tokens == 4 * 16 + 3 * 11
    for name in names:
        a_in, a_out = reference[name]
        torch.testing.assert_close(got.a_in["model." + name].double(), torch.from_numpy(a_in), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.a_out["model." + name].double(), torch.from_numpy(a_out), rtol=1e-5, atol=1e-6)


class _Functional(nn.Module):
    """Uses its children's parameters from the root (F.linear, or x @ W.T as Falcon does): the
    graph's module stack names the root only."""

    def __init__(self, matmul: bool):
        super().__init__()
        self.matmul = matmul
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul:
            return F.relu(x @ self.up.weight.T + self.up.bias) @ self.down.weight.T
        return F.linear(F.relu(F.linear(x, self.up.weight, self.up.bias)), self.down.weight)


@pytest.mark.parametrize("matmul", [False, True], ids=["linear", "matmul"])
def test_module_paths_fall_back_to_parameter_names(matmul):
    torch.manual_seed(0)
    ep = torch.export.export(_Functional(matmul).eval(), (torch.randn(3, 8),), dynamic_shapes=({0: Dim("batch")},))
    before = [dict(n.meta.get("nn_module_stack") or {}) for n in ep.graph.nodes]
    traced = program_traced(ep)
    assert traced.program is not ep  # annotated copy; the caller's program keeps its metadata
    assert [dict(n.meta.get("nn_module_stack") or {}) for n in ep.graph.nodes] == before
    assert [g.name for g in analyze(traced).groups] == ["up"]
    r = prune_program(ep, [(torch.randn(6, 8),)], sparsity=0.5)
    assert r.max_abs_diff <= 1e-5 and r.program.state_dict["up.weight"].shape == (8, 8)


def test_decomposed_program_is_refused(mlp_case):
    decomposed = mlp_case.ep.run_decompositions()
    with pytest.raises(InputError, match="run_decompositions"):
        prune_program(decomposed, mlp_case.calib, sparsity=0.3)


@pytest.mark.onnx
def test_onnx_export_of_slim_program(mlp_case, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    path = tmp_path / "slim.onnx"
    torch.onnx.export(mlp_case.result.program, f=str(path), dynamo=True)
    shapes = {init.name: tuple(init.dims) for init in onnx.load(str(path)).graph.initializer}
    slim_state = {k: tuple(v.shape) for k, v in mlp_case.result.program.state_dict.items()}
    assert sorted(shapes.values()) == sorted(slim_state.values())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (6, 1):
        x = torch.randn(batch, 8)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        want = mlp_case.result.program.module()(x).detach().numpy()
        assert abs(got - want).max() <= 1e-5


def test_aoti_refuses_before_compiling(mlp_case, tmp_path):
    from llmrank.exporters.aoti import export_aoti

    existing = tmp_path / "slim.pt2"
    existing.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        export_aoti(mlp_case.result.program, existing)
    assert existing.read_bytes() == b"old"
    with pytest.raises(ValueError, match=".pt2"):
        export_aoti(mlp_case.result.program, tmp_path / "slim.so")
    with pytest.raises(TypeError):
        export_aoti(mlp_case.ep.module(), tmp_path / "x.pt2")


@pytest.mark.slow  # AOTInductor compiles C++: ~40 s warm, ~2 min on a fresh machine (busy 2-core CPU)
def test_aoti_package_of_slim_program(mlp_case, tmp_path):
    from llmrank.exporters.aoti import check_compiler, export_aoti, load_aoti

    try:
        check_compiler()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    path = export_aoti(mlp_case.result.program, tmp_path / "slim.pt2")
    assert path.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    runner = load_aoti(path)
    for batch in (5, 2):
        x = torch.randn(batch, 8)
        torch.testing.assert_close(runner(x), mlp_case.result.program.module()(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# the pass manager


def down_input_norm(request):
    """A custom scorer: each FFN neuron's input norm into down_proj, times its column's L2 norm."""
    model, ir, norms = request.model, request.ir, request.norms
    out = Scores()
    for g in ir.groups:
        down = g.consumers[0].linear
        weight = model.get_parameter(ir.linears[down].weight).detach()
        out.groups[g.name] = norms.a_in[down] * weight.norm(dim=0)
    return out


def test_pipeline_with_custom_scorer_matches_direct_calls(tiny_llama):
    batches = list(tiny_llama.calib.split(4))
    ir = analyze(tiny_llama.traced)
    norms = calibrate(tiny_llama.model, ir, batches, linears=ir.calibration_linears(), progress=False)
    expected = select(ir, down_input_norm(ScoreRequest(tiny_llama.model, ir, norms, ScoreConfig())).groups, 0.3, multiple=8)

    pipeline = Pipeline([Analyze(), Calibrate(), Score(down_input_norm), Select(), Shrink(), Verify()])
    state = pipeline.run(PruneState(model=tiny_llama.model, traced=tiny_llama.traced), PruneConfig(sparsity=0.3, multiple=8),
                         batches=batches, example_inputs=(batches[0][:2],))
    assert state.kept.keys() == expected.keys()
    for name in expected:
        assert torch.equal(state.kept[name], expected[name])
    assert state.verification.ok
    assert [r.name for r in state.history] == ["Analyze", "Calibrate", "Score[down_input_norm]", "Select", "Shrink", "Verify"]
    assert state.slim.get_submodule("model.layers.0.mlp.up_proj").weight.shape[0] == len(expected["model.layers.0.mlp"])


def test_a_custom_scorer_is_used_when_heads_are_cut_too(tiny_llama):
    """With heads on, the default config's wpr would rank heads and neurons on one graph; a
    Score(fn) override still scores the neurons (wpr ranks the heads on a graph of its own)."""
    batches = list(tiny_llama.calib.split(4))
    ir = analyze(tiny_llama.traced)
    norms = calibrate(tiny_llama.model, ir, batches, linears=ir.calibration_linears(), progress=False)
    expected = down_input_norm(ScoreRequest(tiny_llama.model, ir, norms, ScoreConfig())).groups
    config = PruneConfig(sparsity=0.3, head_sparsity=0.5)
    state = Pipeline([Analyze(), Calibrate(), Score(down_input_norm)]).run(
        PruneState(model=tiny_llama.model, traced=tiny_llama.traced), config, batches=batches)
    assert state.scores.groups.keys() == expected.keys()
    for name in expected:
        assert torch.equal(state.scores.groups[name], expected[name])
    assert set(state.scores.heads) == {hg.name for hg in ir.head_groups}


def test_pipeline_builtin_scorer_matches_prune(tiny_llama):
    import llmrank

    batches = list(tiny_llama.calib.split(4))
    config = PruneConfig(scorer="wpr", representation="dataflow", gamma=0.5)
    state = Pipeline([Analyze(), Calibrate(), Score(), Select()]).run(
        PruneState(model=tiny_llama.model, traced=tiny_llama.traced), config, batches=batches)
    ref = llmrank.prune(tiny_llama.model, tiny_llama.calib, config=config, progress=False, traced=tiny_llama.traced, verify=False)
    for name in ref.kept:
        assert torch.equal(state.kept[name], ref.kept[name])


def test_pipeline_on_an_exported_program_matches_prune_program(mlp_case):
    config = PruneConfig(sparsity=SPARSITY, scorer="wpr", representation="dataflow", gamma=0.5)
    state = Pipeline.default().run(mlp_case.ep, config, batches=mlp_case.calib, example_inputs=mlp_case.other_shape)
    assert state.from_program and state.verification.ok
    for name, kept in mlp_case.result.kept.items():
        assert torch.equal(state.kept[name], kept)
    assert {k: v.shape for k, v in state.slim_program.state_dict.items()} == {k: v.shape for k, v in mlp_case.result.program.state_dict.items()}


def test_every_route_produces_the_cli_default_model(tiny_llama):
    """prune_program, the pass manager and llmrank.prune give the same refitted model (issue 10)."""
    import llmrank
    from llmrank.passes.config import CLI_DEFAULTS

    config = PruneConfig(**CLI_DEFAULTS)
    assert config.compensation == "lstsq"
    calib = tiny_llama.calib
    api = llmrank.prune(tiny_llama.model, calib, config=config, progress=False)
    manager = Pipeline.default().run(tiny_llama.model, config, batches=list(calib.split(4)))
    ep = torch.export.export(TensorOutput(copy.deepcopy(tiny_llama.model)), (calib[:2],), strict=False,
                             dynamic_shapes=({0: Dim("batch"), 1: Dim("seq", max=64)},))
    program = prune_program(ep, [(b,) for b in calib.split(4)], config=config)
    probe = calib[:3, :9]
    with torch.no_grad():
        expected = api.model(input_ids=probe, use_cache=False).logits
        by_manager = manager.slim(input_ids=probe, use_cache=False).logits
        by_program = program.program.module()(probe)
    assert api.config["compensation"] == "lstsq" and api.output_check.relative_error_without_refit is not None
    torch.testing.assert_close(by_manager, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(by_program, expected, rtol=0, atol=1e-5)
    for name, kept in api.kept.items():
        assert torch.equal(manager.kept[name], kept)
        assert torch.equal(program.kept[f"model.{name}"], kept)


def test_pipeline_errors_name_the_pass_and_what_ran(tiny_llama):
    with pytest.raises(PassError, match="Analyze"):
        Pipeline([Score()]).run(PruneState(model=tiny_llama.model, traced=tiny_llama.traced, config=PruneConfig(scorer="l1")))
    wrong = Pipeline([Analyze(), Calibrate(), Score(lambda request: {g.name: torch.ones(3) for g in request.ir.groups})])
    with pytest.raises(llmrank_errors.ConfigError, match=r"pass Score\[<lambda>\] failed \(after Analyze, Calibrate\).*width"):
        wrong.run(PruneState(model=tiny_llama.model, traced=tiny_llama.traced), batches=list(tiny_llama.calib.split(4)))
    seen = []
    state = Pipeline([Analyze(), FunctionPass(lambda s: seen.append(len(s.ir.groups)), name="count")]).run(
        PruneState(model=tiny_llama.model, traced=tiny_llama.traced))
    assert seen == [len(tiny_llama.ir.groups)] and (state.history[-1].name, state.history[-1].modified) == ("count", False)
    with pytest.raises(TypeError):
        Score(3)
    with pytest.raises(llmrank_errors.ConfigError, match="unknown scorer 'nope'"):
        Score("nope")
    with pytest.raises(TypeError):
        Pipeline([]).run(copy.deepcopy)


def test_a_functional_pass_that_mutates_is_caught(tiny_llama):
    """The runner checks the in-place claim: a pass declared functional must not touch a model."""
    model = copy.deepcopy(tiny_llama.model)

    def sneaky(state):
        with torch.no_grad():
            state.model.get_submodule("model.layers.0.mlp.down_proj").weight = torch.nn.Parameter(torch.zeros(32, 64))

    with pytest.raises(PassError, match="declared functional"):
        Pipeline([FunctionPass(sneaky, name="sneaky")]).run(PruneState(model=model))
    Pipeline([FunctionPass(sneaky, name="allowed", in_place=True)]).run(PruneState(model=copy.deepcopy(tiny_llama.model)))


def test_unexpected_errors_are_wrapped_with_the_pass_name(tiny_llama):
    def broken(state):
        raise KeyError("boom")

    with pytest.raises(PassError, match=r"pass broken failed \(after Analyze\): KeyError") as info:
        Pipeline([Analyze(), FunctionPass(broken, name="broken")]).run(PruneState(model=tiny_llama.model, traced=tiny_llama.traced))
    assert info.value.pass_name == "broken" and info.value.passes_before == ("Analyze",)
    assert isinstance(info.value.__cause__, KeyError)
