"""Property tests: random MLP and Llama sizes, random sparsities, several scorers.

Invariants: the shrunk model computes what the hand-masked dense model computes; kept counts
follow the local rule width - round(s * width), floored at min_width (and rounded to a
multiple when asked); kept indices are valid; l1 keeps the rows with the largest L1 norms.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmrank

sparsities = st.floats(min_value=0.0, max_value=0.95, exclude_max=True, allow_nan=False)


def expected_keep(width: int, sparsity: float, min_width: int = 1, multiple: int = 1) -> int:
    keep = width - round(sparsity * width)
    if multiple > 1:
        keep = max(multiple, math.floor(keep / multiple + 0.5) * multiple)
    return max(min(keep, width), min(min_width, width))


def check_kept(kept: torch.Tensor, width: int, n: int) -> None:
    values = kept.tolist()
    assert len(values) == n
    assert values == sorted(set(values))  # sorted, unique
    assert all(0 <= v < width for v in values)


# ---------------------------------------------------------------- MLPs


@st.composite
def mlp_cases(draw):
    n_linear = draw(st.integers(min_value=2, max_value=4))
    widths = draw(st.lists(st.integers(min_value=4, max_value=48), min_size=n_linear + 1, max_size=n_linear + 1))
    return widths, draw(sparsities), draw(st.integers(min_value=1, max_value=6)), draw(st.integers(min_value=0, max_value=2**16))


def masked_mlp(model: torch.nn.Sequential, kept: list[torch.Tensor]) -> torch.nn.Sequential:
    """Group k = rows (and bias) of Linear k, columns of Linear k + 1; zero the dropped ones."""
    out = copy.deepcopy(model)
    linears = [m for m in out if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for k, keep in enumerate(kept):
            drop = [j for j in range(linears[k].out_features) if j not in set(keep.tolist())]
            linears[k].weight[drop, :] = 0
            linears[k].bias[drop] = 0
            linears[k + 1].weight[:, drop] = 0
    return out


@settings(max_examples=15, deadline=None, database=None)
@given(mlp_cases())
def test_mlp_shrink_properties(mlp_factory, case):
    widths, sparsity, min_width, seed = case
    model = mlp_factory(widths, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, widths[0], generator=gen)
    traced = llmrank.trace(model, (x[:4],))
    ir = llmrank.analyze(traced)
    hidden = widths[1:-1]
    assert [g.width for g in ir.groups] == hidden
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    for scorer in ("random", "l1", "wpr"):
        r = llmrank.prune(
            model, x if scorer == "wpr" else None, sparsity=sparsity, scorer=scorer, representation="isolated", gamma=0.5,
            min_width=min_width, seed=seed, example_inputs=(x[:4],), traced=traced, progress=False,
        )
        kept = [r.kept[g.name] for g in ir.groups]
        for k, (g, w) in enumerate(zip(ir.groups, hidden)):
            n = expected_keep(w, sparsity, min_width)
            check_kept(kept[k], w, n)
            assert len(kept[k]) >= min(min_width, w)
            if scorer == "l1":
                l1 = np.abs(linears[k].weight.detach().double().numpy()).sum(axis=1)
                assert kept[k].tolist() == sorted(np.argsort(-l1, kind="stable")[:n].tolist())
        shrunk_lin = [m for m in r.model if isinstance(m, torch.nn.Linear)]
        sizes = [widths[0]] + [len(k) for k in kept] + [widths[-1]]
        for k, lin in enumerate(shrunk_lin):
            assert lin.weight.shape == (sizes[k + 1], sizes[k])
            assert (lin.in_features, lin.out_features) == (sizes[k], sizes[k + 1])
        with torch.no_grad():
            got, want = r.model(x), masked_mlp(model, kept)(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert r.verification.ok
        assert r.params_before == sum(a * b + b for a, b in zip(widths, widths[1:]))
        assert r.params_after == sum(a * b + b for a, b in zip(sizes, sizes[1:]))


# ---------------------------------------------------------------- tiny transformers


@st.composite
def llama_cases(draw):
    hidden = draw(st.sampled_from([16, 32]))
    heads = draw(st.sampled_from([2, 4]))
    kv = draw(st.sampled_from([h for h in (1, 2, heads) if heads % h == 0]))
    inter = draw(st.integers(min_value=8, max_value=48))
    layers = draw(st.integers(min_value=1, max_value=2))
    multiple = draw(st.sampled_from([1, 4, 8]))
    return hidden, heads, kv, inter, layers, draw(sparsities), multiple, draw(st.sampled_from(["wpr", "mpr", "l1", "random"]))


@settings(max_examples=5, deadline=None, database=None)
@given(llama_cases())
def test_llama_shrink_properties(llama_factory, case):
    hidden, heads, kv, inter, layers, sparsity, multiple, scorer = case
    model = llama_factory(seed=inter, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                          intermediate_size=inter, num_hidden_layers=layers, vocab_size=64)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(inter))
    # A static-shape trace (2-3x faster to export) gives the same groups; the dynamic default
    # is exercised by test_pipeline and test_architectures.
    traced = llmrank.trace(model, dynamic=False)
    r = llmrank.prune(model, ids, sparsity=sparsity, scorer=scorer, gamma=0.5, multiple=multiple, traced=traced, progress=False)
    n = expected_keep(inter, sparsity, 1, multiple)
    assert len(r.ir.groups) == layers
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for i, g in enumerate(r.ir.groups):
            check_kept(r.kept[g.name], inter, n)
            drop = [j for j in range(inter) if j not in set(r.kept[g.name].tolist())]
            mlp = masked.model.layers[i].mlp
            mlp.gate_proj.weight[drop, :] = 0
            mlp.up_proj.weight[drop, :] = 0
            mlp.down_proj.weight[:, drop] = 0
            assert r.model.model.layers[i].mlp.up_proj.weight.shape == (n, hidden)
        got = r.model(input_ids=ids, use_cache=False).logits
        want = masked(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert r.verification.ok
    assert r.params_before - r.params_after == layers * (inter - n) * 3 * hidden
    assert r.model.config.intermediate_size == n
    assert model.config.intermediate_size == inter
