"""Channel groups read from the traced graph, and shrinking, on many architectures.

For every architecture the expected group members (parameter, axis, block offset) are written
out by hand from the model's source; the masked reference is built by the test itself from
that spec (not by llmrank.mask), so a wrong group would make shrunk != masked.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

import llmrank

H, I, L, V = 32, 64, 2, 128
SPARSITY = 0.3
KEEP = I - round(SPARSITY * I)  # 45


class GatedMLPBlock(nn.Module):
    """Pre-norm gated FFN with a residual connection (a non-HF Llama-style block)."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.gate = nn.Linear(d, h, bias=False)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        y = self.norm(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class GatedNet(nn.Module):
    def __init__(self, d: int = 16, h: int = 40, n: int = 2):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList(GatedMLPBlock(d, h) for _ in range(n))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _gated(prefix: str, gate: str, up: str, down: str, bias: bool = False) -> Callable[[int], set]:
    def spec(i: int) -> set:
        p = prefix.format(i=i)
        slots = {(f"{p}.{gate}.weight", 0, 0), (f"{p}.{up}.weight", 0, 0), (f"{p}.{down}.weight", 1, 0)}
        if bias:
            slots.add((f"{p}.{up}.bias", 0, 0))
        return slots
    return spec


def _plain(prefix: str, fc1: str, fc2: str, conv1d: bool = False) -> Callable[[int], set]:
    def spec(i: int) -> set:
        p = prefix.format(i=i)
        if conv1d:  # GPT-2 Conv1D stores (in, out): output channels on axis 1, input on axis 0
            return {(f"{p}.{fc1}.weight", 1, 0), (f"{p}.{fc1}.bias", 0, 0), (f"{p}.{fc2}.weight", 0, 0)}
        return {(f"{p}.{fc1}.weight", 0, 0), (f"{p}.{fc1}.bias", 0, 0), (f"{p}.{fc2}.weight", 1, 0)}
    return spec


@dataclass
class Arch:
    build: Callable[[], nn.Module]
    n_groups: int
    width: Callable[[int], int]
    slots: Callable[[int], set]
    primary: Callable[[int], tuple[str, int]]
    producers: Callable[[int], list[str]]
    consumer: Callable[[int], str]
    config_field: str | None = None
    example: Callable[[], tuple] | None = None  # non-HF models
    calib: Callable[[], torch.Tensor] | None = None


def _hf(cls, cfg_cls, **kw):
    def build():
        torch.manual_seed(0)
        return cls(cfg_cls(**kw)).eval()
    return build


def _tok():
    return torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(3))


LLAMA_LIKE = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)
MLP = "model.layers.{i}.mlp"


def _llama_like(cls, cfg_cls, **extra):
    return Arch(
        build=_hf(cls, cfg_cls, **LLAMA_LIKE, **extra), n_groups=L, width=lambda i: I,
        slots=_gated(MLP, "gate_proj", "up_proj", "down_proj"),
        primary=lambda i: (f"model.layers.{i}.mlp.up_proj", 0),
        producers=lambda i: [f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"],
        consumer=lambda i: f"model.layers.{i}.mlp.down_proj", config_field="intermediate_size",
    )


def _mlp_build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 8)).eval()


def _gated_build():
    torch.manual_seed(0)
    return GatedNet().eval()


ARCHS = {
    "llama": _llama_like(T.LlamaForCausalLM, T.LlamaConfig),
    "mistral": _llama_like(T.MistralForCausalLM, T.MistralConfig),
    "qwen2": _llama_like(T.Qwen2ForCausalLM, T.Qwen2Config),
    "gemma": _llama_like(T.GemmaForCausalLM, T.GemmaConfig, head_dim=8),
    "phi3": Arch(
        build=_hf(T.Phi3ForCausalLM, T.Phi3Config, **LLAMA_LIKE, pad_token_id=0), n_groups=L, width=lambda i: I,
        # fused gate_up_proj: gate rows [0, I), up rows [I, 2I)
        slots=lambda i: {(f"model.layers.{i}.mlp.gate_up_proj.weight", 0, 0), (f"model.layers.{i}.mlp.gate_up_proj.weight", 0, I),
                         (f"model.layers.{i}.mlp.down_proj.weight", 1, 0)},
        primary=lambda i: (f"model.layers.{i}.mlp.gate_up_proj", I),
        producers=lambda i: [f"model.layers.{i}.mlp.gate_up_proj"],
        consumer=lambda i: f"model.layers.{i}.mlp.down_proj", config_field="intermediate_size",
    ),
    "gpt2": Arch(
        build=_hf(T.GPT2LMHeadModel, T.GPT2Config, n_embd=H, n_layer=L, n_head=4, vocab_size=V, n_positions=64), n_groups=L,
        width=lambda i: 4 * H, slots=_plain("transformer.h.{i}.mlp", "c_fc", "c_proj", conv1d=True),
        primary=lambda i: (f"transformer.h.{i}.mlp.c_fc", 0), producers=lambda i: [f"transformer.h.{i}.mlp.c_fc"],
        consumer=lambda i: f"transformer.h.{i}.mlp.c_proj", config_field="n_inner",
    ),
    "opt": Arch(
        build=_hf(T.OPTForCausalLM, T.OPTConfig, hidden_size=H, ffn_dim=I, num_hidden_layers=L, num_attention_heads=4,
                  word_embed_proj_dim=H, vocab_size=V, max_position_embeddings=64, pad_token_id=1),
        n_groups=L, width=lambda i: I, slots=_plain("model.decoder.layers.{i}", "fc1", "fc2"),
        primary=lambda i: (f"model.decoder.layers.{i}.fc1", 0), producers=lambda i: [f"model.decoder.layers.{i}.fc1"],
        consumer=lambda i: f"model.decoder.layers.{i}.fc2", config_field="ffn_dim",
    ),
    "bert": Arch(
        build=_hf(T.BertModel, T.BertConfig, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
                  vocab_size=V, max_position_embeddings=64),
        n_groups=L, width=lambda i: I,
        slots=lambda i: {(f"encoder.layer.{i}.intermediate.dense.weight", 0, 0), (f"encoder.layer.{i}.intermediate.dense.bias", 0, 0),
                         (f"encoder.layer.{i}.output.dense.weight", 1, 0)},
        primary=lambda i: (f"encoder.layer.{i}.intermediate.dense", 0), producers=lambda i: [f"encoder.layer.{i}.intermediate.dense"],
        consumer=lambda i: f"encoder.layer.{i}.output.dense", config_field="intermediate_size",
    ),
    "mlp": Arch(
        build=_mlp_build, n_groups=2, width=lambda i: (24, 20)[i],
        slots=lambda i: {(f"{2 * i}.weight", 0, 0), (f"{2 * i}.bias", 0, 0), (f"{2 * i + 2}.weight", 1, 0)},
        primary=lambda i: (str(2 * i), 0), producers=lambda i: [str(2 * i)], consumer=lambda i: str(2 * i + 2),
        example=lambda: (torch.randn(4, 16, generator=torch.Generator().manual_seed(5)),),
        calib=lambda: torch.randn(8, 16, generator=torch.Generator().manual_seed(6)),
    ),
    "gated_block": Arch(
        build=_gated_build, n_groups=2, width=lambda i: 40,
        slots=_gated("blocks.{i}", "gate", "up", "down", bias=True),
        primary=lambda i: (f"blocks.{i}.up", 0), producers=lambda i: [f"blocks.{i}.gate", f"blocks.{i}.up"],
        consumer=lambda i: f"blocks.{i}.down",
        example=lambda: (torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(5)),),
        calib=lambda: torch.randn(8, 5, 8, generator=torch.Generator().manual_seed(6)),
    ),
}


@dataclass
class Case:
    name: str
    arch: Arch
    model: nn.Module
    traced: object
    ir: object
    result: object
    inputs: torch.Tensor


@pytest.fixture(scope="module", params=list(ARCHS))
def case(request) -> Case:
    arch = ARCHS[request.param]
    model = arch.build()
    example = arch.example() if arch.example else None
    traced = llmrank.trace(model, example)
    ir = llmrank.analyze(traced)
    calib = arch.calib() if arch.calib else _tok()
    result = llmrank.prune(model, calib, sparsity=SPARSITY, scorer="wpr", representation="isolated", gamma=0.5,
                           example_inputs=example, traced=traced, progress=False)
    inputs = example[0] if example else _tok()
    return Case(request.param, arch, model, traced, ir, result, inputs)


def run_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if hasattr(model, "config"):
            out = model(input_ids=x)
            return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        return model(x)


def slot_set(group) -> set:
    return {(s.param, s.axis, s.offset) for s in group.slots}


def test_groups_found_from_the_graph(case):
    arch, ir = case.arch, case.ir
    assert len(ir.groups) == arch.n_groups
    for i, g in enumerate(ir.groups):
        assert g.width == arch.width(i)
        assert slot_set(g) == arch.slots(i)
        assert (g.primary.linear, g.primary.offset) == arch.primary(i)
        assert sorted({p.linear for p in g.producers}) == sorted(arch.producers(i))
        assert [c.linear for c in g.consumers] == [arch.consumer(i)]


def test_residual_stream_and_attention_are_not_grouped(case):
    grouped = {s.param for g in case.ir.groups for s in g.slots}
    for name in grouped:
        assert not any(word in name for word in ("attn", "attention", "embed", "wte", "wpe", "lm_head", "norm", "ln_", "pooler", "head", "inp.")), name
    # a consumer's bias lives on its output channels, not on the group's: it stays whole
    for i, g in enumerate(case.ir.groups):
        assert f"{case.arch.consumer(i)}.bias" not in {s.param for s in g.slots}
    members = {p.linear for g in case.ir.groups for p in (*g.producers, *g.consumers)}
    attention = [name for name in case.ir.linears if "attn" in name or "attention" in name]
    if case.arch.config_field is not None:
        assert len(attention) >= 2 * L  # every layer's attention projections were traced ...
    for name in attention:
        assert name not in members and name in case.ir.blocked  # ... and none is prunable
    if case.name == "gated_block":
        assert "inp" in case.ir.blocked and "head" in case.ir.blocked


def my_masked(case: Case) -> nn.Module:
    """Zero, by the hand-written spec, every slot entry of a dropped channel."""
    masked = copy.deepcopy(case.model)
    with torch.no_grad():
        for i, g in enumerate(case.ir.groups):
            drop = sorted(set(range(case.arch.width(i))) - set(case.result.kept[g.name].tolist()))
            assert len(drop) == round(SPARSITY * case.arch.width(i))
            for param, axis, offset in case.arch.slots(i):
                idx = torch.tensor(drop, dtype=torch.long) + offset
                masked.get_parameter(param).index_fill_(axis, idx, 0.0)
    return masked


def test_shrunk_equals_masked(case):
    r = case.result
    assert r.verification is not None and r.verification.ok
    shrunk_out = run_model(r.model, case.inputs)
    masked_out = run_model(my_masked(case), case.inputs)
    assert shrunk_out.shape == masked_out.shape
    assert float((shrunk_out - masked_out).abs().max()) <= 1e-5
    dense_out = run_model(case.model, case.inputs)
    assert float((dense_out - shrunk_out).abs().max()) > 1e-4  # pruning changed the function


def test_shapes_and_module_sizes_updated(case):
    r, ir = case.result, case.ir
    original = dict(case.model.named_parameters())
    for i, g in enumerate(ir.groups):
        keep = len(r.kept[g.name])
        assert keep == case.arch.width(i) - round(SPARSITY * case.arch.width(i))
        dropped = case.arch.width(i) - keep
        for param, axis, _ in case.arch.slots(i):
            n_slots = sum(1 for p, a, _ in case.arch.slots(i) if (p, a) == (param, axis))
            assert r.model.get_parameter(param).shape[axis] == original[param].shape[axis] - n_slots * dropped, param
        for prod in case.arch.producers(i):
            mod = r.model.get_submodule(prod)
            n_out = mod.nf if hasattr(mod, "nf") else mod.out_features
            assert n_out == mod.weight.shape[1 if hasattr(mod, "nf") else 0]
            assert n_out == keep * (2 if case.name == "phi3" else 1)  # Phi-3: the fused gate and up halves
        cons = r.model.get_submodule(case.arch.consumer(i))
        n_in = cons.nx if hasattr(cons, "nx") else cons.in_features
        assert n_in == keep
    # a Linear that is the consumer of one group and the producer of the next (the MLP's middle layer)
    if case.name == "mlp":
        mid = r.model.get_submodule("2")
        assert mid.weight.shape == (len(r.kept["2"]), len(r.kept["0"]))
        assert (mid.in_features, mid.out_features) == (len(r.kept["0"]), len(r.kept["2"]))


def test_config_updated_for_uniform_widths(case):
    field = case.arch.config_field
    if field is None:  # a plain module: nothing to update, and nothing was invented
        assert not hasattr(case.result.model, "config")
        return
    r = case.result
    width = case.arch.width(0)
    assert r.uniform_width == width - round(SPARSITY * width)
    assert getattr(r.model.config, field) == r.uniform_width
    assert getattr(case.model.config, field) in (case.arch.width(0), None)  # the caller's config is untouched
    # the new config describes the shrunk tensors: a fresh model built from it loads them strictly
    fresh = type(r.model)(copy.deepcopy(r.model.config))
    fresh.load_state_dict(r.model.state_dict(), strict=True)
    fresh.eval()
    assert torch.equal(run_model(fresh, case.inputs), run_model(r.model, case.inputs))


def test_trace_output_is_the_models_tensor(case):
    got = case.traced.program.module()(case.inputs)
    expected = run_model(case.model, case.inputs)
    if case.name == "bert":
        with torch.no_grad():
            assert torch.allclose(got, case.model(input_ids=case.inputs).last_hidden_state, atol=1e-5)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)
