"""The scoring formulas of ALGORITHM.md against hand-computed values and explicit-loop references.

The chain is a 3x2 "up" weight followed by a 2x3 "down" weight (nn.Linear orientation,
out x in). Expected values are either worked out by hand (exact fractions) or computed by
plain Python loops that follow ALGORITHM.md line by line; neither calls llmrank.
"""

from __future__ import annotations

import math

import pytest
import torch

from llmrank import scorers as S

W1 = [[1.0, 0.0], [2.0, 1.0], [1.0, 3.0]]  # 3 x 2, one zero edge (so S_d != const)
W2 = [[1.0, -1.0, 0.0], [0.0, 2.0, 2.0]]  # 2 x 3, signed, two zero edges
A_IN = [1.0, 3.0]
A_OUT1 = [1.0, 1.0, 2.0]
A_OUT2 = [3.0, 1.0]


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def chain(w1=W1, w2=W2, a1=A_OUT1, a2=A_OUT2):
    return [S.ChainLayer(t(w1), t(a1)), S.ChainLayer(t(w2), t(a2))]


# ---------------------------------------------------------------- explicit-loop references


def ref_wpr(weights, a_in, a_outs, theta, gamma):
    s = sum(a_in)
    p = [x / s for x in a_in]
    out = []
    for w, a_out in zip(weights, a_outs):
        rows, cols = len(w), len(w[0])
        colsum = [sum(abs(w[i][j]) for i in range(rows)) for j in range(cols)]
        degree = [sum(1 for i in range(rows) if w[i][j] != 0) for j in range(cols)]
        total_out = sum(a_out)
        new = []
        for i in range(rows):
            acc = 0.0
            for j in range(cols):
                s_w = abs(w[i][j]) / colsum[j] if colsum[j] != 0 else 0.0
                s_d = (1.0 if w[i][j] != 0 else 0.0) / degree[j] if degree[j] != 0 else 0.0
                acc += (theta * s_w + (1 - theta) * s_d) * p[j]
            new.append(gamma * acc + (1 - gamma) * a_out[i] / total_out)
        total = sum(new)
        p = [x / total for x in new]
        out.append(p)
    return out


def lowest_k(p, k):
    """Indices of the k smallest entries; ties go to the lower index."""
    return sorted(range(len(p)), key=lambda i: (p[i], i))[:k]


def ref_mpr(weights, a_in, a_outs, z=None):
    s = sum(a_in)
    p = [x / s for x in a_in]
    out = []
    for w, a_out in zip(weights, a_outs):
        if z:
            p = list(p)
            for i in lowest_k(p, round(z * len(p))):
                p[i] = 0.0
        new = [sum(abs(w[i][j]) * p[j] for j in range(len(w[0]))) * a_out[i] for i in range(len(w))]
        total = sum(new)
        p = [x / total for x in new]
        out.append(p)
    return out


def assert_vec(got: torch.Tensor, expected, tol=1e-12):
    assert got.shape == (len(expected),)
    assert torch.isfinite(got).all()
    for g, e in zip(got.tolist(), expected):
        assert g == pytest.approx(e, abs=tol), (got.tolist(), expected)


# ---------------------------------------------------------------- wpr


def test_wpr_pure_weight_graph_by_hand():
    # theta=1, gamma=1: only the column-normalised |W| propagates.
    # S_w(W1) = [[1/4, 0], [2/4, 1/4], [1/4, 3/4]], p0 = [1/4, 3/4]
    # p1 = [1/16, 5/16, 10/16]; S_w(W2) = [[1, 1/3, 0], [0, 2/3, 1]] -> p2 = [1/6, 5/6]
    p1, p2 = S.wpr_chain(chain(), t(A_IN), theta=1.0, gamma=1.0)
    assert_vec(p1, [1 / 16, 5 / 16, 10 / 16])
    assert_vec(p2, [1 / 6, 5 / 6])


def test_wpr_pure_degree_graph_by_hand():
    # theta=0, gamma=1: out-degree normalised adjacency. W1 column degrees 3 and 2:
    # S_d = [[1/3, 0], [1/3, 1/2], [1/3, 1/2]] -> p1 = [1/12, 11/24, 11/24]
    p1, _ = S.wpr_chain(chain(), t(A_IN), theta=0.0, gamma=1.0)
    assert_vec(p1, [2 / 24, 11 / 24, 11 / 24])


@pytest.mark.parametrize("theta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9, 1.0])
def test_wpr_matches_loop_reference(theta, gamma):
    got = S.wpr_chain(chain(), t(A_IN), theta=theta, gamma=gamma)
    expected = ref_wpr([W1, W2], A_IN, [A_OUT1, A_OUT2], theta, gamma)
    assert len(got) == 2
    for g, e in zip(got, expected):
        assert_vec(g, e)
        assert float(g.sum()) == pytest.approx(1.0, abs=1e-12)


def test_wpr_parameters_change_the_scores():
    # The test example is not degenerate: theta and gamma both matter.
    a = S.wpr_chain(chain(), t(A_IN), theta=0.0, gamma=0.9)[0]
    b = S.wpr_chain(chain(), t(A_IN), theta=1.0, gamma=0.9)[0]
    c = S.wpr_chain(chain(), t(A_IN), theta=1.0, gamma=0.2)[0]
    assert not torch.allclose(a, b)
    assert not torch.allclose(b, c)


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0])
def test_wpr_gamma_zero_is_activation_ranking(theta):
    p1, p2 = S.wpr_chain(chain(), t(A_IN), theta=theta, gamma=0.0)
    assert_vec(p1, [1 / 4, 1 / 4, 2 / 4])  # a_out1 / sum
    assert_vec(p2, [3 / 4, 1 / 4])
    assert torch.equal(p1, S.activation(t(A_OUT1)))
    assert torch.equal(p2, S.activation(t(A_OUT2)))


def test_wpr_zero_column_gives_no_nan():
    # Column 0 of the up weight is all zero: its mass (p0[0] = 1/4) is lost, not NaN.
    w1 = [[0.0, 1.0], [0.0, 1.0], [0.0, 2.0]]
    p1, p2 = S.wpr_chain(chain(w1=w1), t(A_IN), theta=0.5, gamma=1.0)
    # M[:, 1] = 0.5 * [1/4, 1/4, 2/4] + 0.5 * [1/3, 1/3, 1/3]; times 3/4, then renormalised
    col = [0.5 * a + 0.5 / 3 for a in (0.25, 0.25, 0.5)]
    assert_vec(p1, [c / sum(col) for c in col])
    expected = ref_wpr([w1, W2], A_IN, [A_OUT1, A_OUT2], 0.5, 1.0)
    assert_vec(p2, expected[1])


def test_transition_matrix_by_hand():
    m = S.transition(t(W1), 0.5)
    expected = [[0.5 * 1 / 4 + 0.5 / 3, 0.0], [0.5 * 2 / 4 + 0.5 / 3, 0.5 * 1 / 4 + 0.5 / 2], [0.5 * 1 / 4 + 0.5 / 3, 0.5 * 3 / 4 + 0.5 / 2]]
    for i in range(3):
        assert_vec(m[i], expected[i])
    zero_col = S.transition(t([[0.0, 1.0], [0.0, 3.0]]), 0.5)
    assert torch.isfinite(zero_col).all()
    assert zero_col[:, 0].tolist() == [0.0, 0.0]


def test_wpr_rejects_parameters_outside_unit_interval():
    with pytest.raises(ValueError, match="theta"):
        S.wpr_chain(chain(), t(A_IN), theta=1.5, gamma=0.5)
    with pytest.raises(ValueError, match="gamma"):
        S.wpr_chain(chain(), t(A_IN), theta=0.5, gamma=-0.1)


# ---------------------------------------------------------------- mpr


def test_mpr_by_hand():
    # |W1| @ p0 = [1/4, 5/4, 10/4]; * a_out1 [1, 1, 2] = [1/4, 5/4, 20/4] -> [1/26, 5/26, 20/26]
    # |W2| @ p1 = [6/26, 50/26]; * a_out2 [3, 1] = [18/26, 50/26] -> [18/68, 50/68]
    p1, p2 = S.mpr_chain(chain(), t(A_IN))
    assert_vec(p1, [1 / 26, 5 / 26, 20 / 26])
    assert_vec(p2, [18 / 68, 50 / 68])
    expected = ref_mpr([W1, W2], A_IN, [A_OUT1, A_OUT2])
    assert_vec(p1, expected[0])
    assert_vec(p2, expected[1])


def test_mpr_z_importance_by_hand():
    # Even widths everywhere (2 -> 4 -> 2), z = 0.5: round and floor agree on the count.
    w1 = [[1.0, 0.0], [2.0, 1.0], [1.0, 3.0], [0.0, 1.0]]
    w2 = [[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 1.0, 2.0]]
    a1, a2 = [1.0, 1.0, 2.0, 1.0], [1.0, 2.0]
    p1, p2 = S.mpr_chain(chain(w1, w2, a1, a2), t(A_IN), z_importance=0.5)
    # p0 = [1/4, 3/4] -> zero the lowest 1 -> [0, 3/4]; |W1| @ = [0, 3/4, 9/4, 3/4]
    # * a1 = [0, 3/4, 18/4, 3/4] -> /24*4 = [0, 3/24, 18/24, 3/24]
    assert_vec(p1, [0.0, 3 / 24, 18 / 24, 3 / 24])
    # zero the lowest 2 of p1: index 0 (0) and index 1 (3/24 ties index 3, lower index wins)
    # -> [0, 0, 18/24, 3/24]; |W2| @ = [21/24, 24/24]; * a2 = [21, 48]/24 -> [21/69, 48/69]
    assert_vec(p2, [21 / 69, 48 / 69])
    expected = ref_mpr([w1, w2], A_IN, [a1, a2], z=0.5)
    assert_vec(p1, expected[0])
    assert_vec(p2, expected[1])
    plain = S.mpr_chain(chain(w1, w2, a1, a2), t(A_IN))
    assert not torch.allclose(plain[1], p2)


# ---------------------------------------------------------------- per-layer baselines


def test_l1_and_l2_row_norms_by_hand():
    w = [[3.0, -4.0], [0.0, 1.0], [-1.0, 1.0]]
    # l1: [7, 1, 2] / 10; l2: [5, 1, sqrt(2)] / (6 + sqrt(2))
    assert_vec(S.lp_norm(t(w), 1.0), [0.7, 0.1, 0.2])
    r2 = math.sqrt(2)
    assert_vec(S.lp_norm(t(w), 2.0), [5 / (6 + r2), 1 / (6 + r2), r2 / (6 + r2)])


def test_activation_is_normalised_norm():
    assert_vec(S.activation(t([2.0, 6.0, 0.0, 2.0])), [0.2, 0.6, 0.0, 0.2])


def test_wanda_by_hand():
    # |W2| @ [1, 2, 3] = [1 + 2, 4 + 6] = [3, 10] -> [3/13, 10/13]
    assert_vec(S.wanda(t(W2), t([1.0, 2.0, 3.0])), [3 / 13, 10 / 13])


def test_random_is_seeded_reproducible_and_seed_dependent():
    a = S.random_scores(50, seed=7)
    b = S.random_scores(50, seed=7)
    c = S.random_scores(50, seed=8)
    d = S.random_scores(50, seed=7, salt=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)
    assert float(a.sum()) == pytest.approx(1.0, abs=1e-12)
    assert (a >= 0).all()
    # the ranking differs too, not just the values
    assert not torch.equal(torch.argsort(a), torch.argsort(c))


# ---------------------------------------------------------------- degenerate inputs


def test_normalize_conventions():
    assert_vec(S.normalize(t([0.0, 0.0, 0.0, 0.0])), [0.25] * 4)
    assert_vec(S.normalize(t([float("nan"), 1.0, 3.0])), [0.0, 0.25, 0.75])
    assert_vec(S.normalize(t([1.0, float("inf")])), [1.0, 0.0])


@pytest.mark.parametrize("scorer", ["wpr", "mpr"])
def test_all_zero_activations_give_uniform_scores(scorer):
    zeros_in, zeros1, zeros2 = torch.zeros(2), torch.zeros(3), torch.zeros(2)
    layers = [S.ChainLayer(t(W1), zeros1), S.ChainLayer(t(W2), zeros2)]
    if scorer == "wpr":
        for gamma in (0.0, 0.5, 1.0):
            for p in S.wpr_chain(layers, zeros_in, theta=0.5, gamma=gamma):
                assert torch.isfinite(p).all()
                assert float(p.sum()) == pytest.approx(1.0)
        p1, p2 = S.wpr_chain(layers, zeros_in, theta=0.5, gamma=0.0)
        assert_vec(p1, [1 / 3] * 3)
        assert_vec(p2, [1 / 2] * 2)
    else:
        p1, p2 = S.mpr_chain(layers, zeros_in)
        assert_vec(p1, [1 / 3] * 3)
        assert_vec(p2, [1 / 2] * 2)
    assert_vec(S.activation(zeros1), [1 / 3] * 3)
    assert_vec(S.wanda(t(W1), zeros_in), [1 / 3] * 3)


def test_zero_weights_give_uniform_scores():
    zero = [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    for p in S.wpr_chain([S.ChainLayer(t(zero), torch.zeros(3))], t(A_IN), theta=0.5, gamma=0.9):
        assert_vec(p, [1 / 3] * 3)
    assert_vec(S.lp_norm(t(zero), 1.0), [1 / 3] * 3)
    assert_vec(S.mpr_chain([S.ChainLayer(t(zero), t(A_OUT1))], t(A_IN))[0], [1 / 3] * 3)
