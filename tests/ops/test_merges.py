"""Tests for the mergekit-style kernels against hand-worked math and against mergekit itself."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

from tvrecipe.ops import merges
from tvrecipe.ops.merges import (
    breadcrumbs,
    consensus_merge,
    della,
    della_probabilities,
    l1_rescale,
    linear,
    model_stock,
    model_stock_t,
    slerp,
)
from tvrecipe.ops.sparsify import dare, derive_seed, ties, trim

T = torch.tensor


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------
# linear


def test_linear_hand_example():
    a, b = T([1.0, 2.0]), T([3.0, 4.0])
    # (1·[1, 2] + 3·[3, 4]) = [10, 14]; normalized by 1 + 3 = 4.
    assert linear([a, b], weights=[1.0, 3.0]).tolist() == [2.5, 3.5]
    assert linear([a, b], weights=[1.0, 3.0], normalize=False).tolist() == [10.0, 14.0]
    # Equal weights normalized: the plain mean, whatever their scale.
    assert linear([a, b], weights=[5.0, 5.0]).tolist() == [2.0, 3.0]
    # A negative weight is allowed: 2a - b over 2 - 1.
    assert linear([a, b], weights=[2.0, -1.0]).tolist() == [-1.0, 0.0]


def test_linear_zero_weight_sum():
    a, b = T([1.0, 2.0]), T([3.0, 4.0])
    # mergekit divides by 0 here (inf/NaN); tvrecipe refuses instead.
    with pytest.raises(ValueError, match=r"linear: the weights \[1.0, -1.0\] sum to 0"):
        linear([a, b], weights=[1.0, -1.0])
    assert linear([a, b], weights=[1.0, -1.0], normalize=False).tolist() == [-2.0, -2.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_dtype_and_no_mutation(dtype):
    xs = [randn(4, 3, seed=i, dtype=dtype) for i in range(3)]
    before = [x.clone() for x in xs]
    out = linear(xs, weights=[0.2, 0.3, 0.5])
    assert out.dtype == dtype and out.shape == (4, 3)
    expect = (0.2 * xs[0].double() + 0.3 * xs[1].double() + 0.5 * xs[2].double())
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.double(), expect, rtol=tol, atol=tol)
    assert all(torch.equal(x, y) for x, y in zip(xs, before))


def test_linear_errors():
    a = T([1.0])
    with pytest.raises(ValueError, match="linear: got 2 inputs but 1 weights"):
        linear([a, a], weights=[1.0])
    with pytest.raises(ValueError, match="linear: needs at least one input"):
        linear([], weights=[])
    with pytest.raises(ValueError, match="linear: weights are required"):
        linear([a], weights=None)
    with pytest.raises(ValueError, match="linear: all inputs must share shape"):
        linear([a, T([1.0, 2.0])], weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="weights must be finite"):
        linear([a], weights=[float("nan")])
    with pytest.raises(TypeError, match="floating-point"):
        linear([T([1])], weights=[1.0])


# ---------------------------------------------------------------------------------------
# slerp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slerp_endpoints_are_exact(dtype):
    a, b = randn(5, 4, seed=1, dtype=dtype), randn(5, 4, seed=2, dtype=dtype)
    # sin(Ω)/sin(Ω) = 1 and sin(0) = 0 exactly: t = 0 gives a (the base), t = 1 gives b.
    assert torch.equal(slerp(a, b, t=0.0), a)
    assert torch.equal(slerp(a, b, t=1.0), b)
    assert slerp(a, b, t=0.5).dtype == dtype


def test_slerp_orthogonal_unit_vectors_stay_on_the_circle():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    for t in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        out = slerp(a, b, t=t)
        # Ω = π/2: the result is (cos tπ/2, sin tπ/2), norm 1 (a lerp would dip to 0.707).
        torch.testing.assert_close(out, T([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)]))
        assert abs(out.norm().item() - 1.0) < 1e-6


def test_slerp_angle_is_a_fraction_t_of_omega():
    a = randn(50, seed=3, dtype=torch.float64)
    b = randn(50, seed=4, dtype=torch.float64)
    ua, ub = a / a.norm(), b / b.norm()
    omega = torch.acos(ua @ ub)
    out = slerp(ua, ub, t=0.3)
    # For unit inputs: unit output, at angle tΩ from a and (1 - t)Ω from b.
    assert abs(out.norm().item() - 1.0) < 1e-12
    torch.testing.assert_close(torch.acos(out @ ua), 0.3 * omega)
    torch.testing.assert_close(torch.acos(out @ ub), 0.7 * omega)
    # Unnormalised inputs: the same coefficients applied to the raw tensors.
    s = torch.sin(omega)
    expect = torch.sin(0.7 * omega) / s * (3 * a) + torch.sin(0.3 * omega) / s * (0.5 * b)
    torch.testing.assert_close(slerp(3 * a, 0.5 * b, t=0.3), expect)


@pytest.mark.parametrize("factor", [2.0, -3.0, 1.0])
def test_slerp_colinear_falls_back_to_lerp(factor):
    a = randn(3, 7, seed=5)
    b = factor * a  # cos = ±1: colinear or antipodal
    for t in (0.25, 0.6):
        tt = T(t)  # the coefficients are float32 numbers, as in mergekit
        assert torch.equal(slerp(a, b, t=t), (1 - tt) * a + tt * b)


def test_slerp_near_colinear_threshold():
    a = T([1.0, 0.0], dtype=torch.float64)
    # cos = 0.9996 > 0.9995: lerp. cos = 0.999 < 0.9995: slerp proper.
    near = T([0.9996, math.sqrt(1 - 0.9996**2)], dtype=torch.float64)
    assert torch.equal(slerp(a, near, t=0.5), 0.5 * a + 0.5 * near)
    far = T([0.999, math.sqrt(1 - 0.999**2)], dtype=torch.float64)
    om = math.acos(0.999)
    expect = math.sin(0.5 * om) / math.sin(om) * (a + far)
    torch.testing.assert_close(slerp(a, far, t=0.5), expect)
    # The threshold is a parameter: raising it makes `near` a slerp too.
    om = math.acos(0.9996)
    torch.testing.assert_close(slerp(a, near, t=0.5, dot_threshold=0.99999),
                               math.sin(0.5 * om) / math.sin(om) * (a + near))


def test_slerp_small_tensors():
    # One entry (or 0-dim): the normalised values are ±1, so cos = ±1 and it is a lerp.
    for a, b in ((T([2.0]), T([-5.0])), (T(2.0), T(3.0))):
        assert torch.equal(slerp(a, b, t=0.3), 0.7 * a + 0.3 * b)
        assert slerp(a, b, t=0.3).shape == a.shape
    # An all-zero tensor keeps norm 1 (not divided): cos = 0, Ω = π/2, as mergekit.
    z, b = torch.zeros(3), T([1.0, -2.0, 2.0])
    torch.testing.assert_close(slerp(z, b, t=0.3), math.sin(0.3 * math.pi / 2) * b)
    assert slerp(torch.empty(0, 3), torch.empty(0, 3), t=0.5).shape == (0, 3)


def test_slerp_chunks_agree_with_one_pass(monkeypatch):
    a, b = randn(1000, seed=6, dtype=torch.float64), randn(1000, seed=7, dtype=torch.float64)
    whole = slerp(a, b, t=0.4)
    monkeypatch.setattr(merges, "_SLERP_CHUNK", 64)
    torch.testing.assert_close(slerp(a, b, t=0.4), whole, rtol=1e-13, atol=1e-13)


def test_slerp_no_mutation_and_errors():
    a, b = randn(4, seed=8), randn(4, seed=9)
    ca, cb = a.clone(), b.clone()
    slerp(a, b, t=0.5)
    assert torch.equal(a, ca) and torch.equal(b, cb)
    with pytest.raises(ValueError, match="slerp: all inputs must share shape"):
        slerp(a, randn(5), t=0.5)
    with pytest.raises(ValueError, match="slerp: t must be a finite number"):
        slerp(a, b, t=float("nan"))
    with pytest.raises(TypeError, match="slerp: t must be a finite number"):
        slerp(a, b, t="0.5")
    with pytest.raises(TypeError, match="floating-point"):
        slerp(T([1, 2]), T([3, 4]), t=0.5)


# ---------------------------------------------------------------------------------------
# l1_rescale


def test_l1_rescale_hand_example():
    x = T([1.0, -2.0, 3.0, -4.0])  # L1 norm 10
    sparse = T([0.0, -2.0, 0.0, -4.0])  # L1 norm 6
    torch.testing.assert_close(l1_rescale(x, sparse), sparse * (10.0 / 6.0))
    # A norm below 1e-7 (here: nothing kept): returned as it is.
    assert torch.equal(l1_rescale(x, torch.zeros(4)), torch.zeros(4))
    assert torch.equal(l1_rescale(torch.full((4,), 1e-9), sparse), sparse)


# ---------------------------------------------------------------------------------------
# breadcrumbs

BC_X = T([0.1, -0.9, 0.5, 0.3, -0.7, 0.2, 0.8, -0.4, 0.6, 1.0])


def test_breadcrumbs_hand_example():
    # n = 10, density 0.3 -> k = 3 kept, gamma 0.2 -> 2 outliers dropped. By |x|:
    # 1.0 (i9), 0.9 (i1) | 0.8 (i6), 0.7 (i4), 0.6 (i8) | 0.5, 0.4, 0.3, 0.2, 0.1.
    out = breadcrumbs(BC_X, density=0.3, gamma=0.2)
    assert torch.equal(out, T([0.0, 0.0, 0.0, 0.0, -0.7, 0.0, 0.8, 0.0, 0.6, 0.0]))
    # Default gamma 0.01: int(0.1) = 0 outliers on 10 entries, so it is the top 3.
    assert torch.equal(breadcrumbs(BC_X, density=0.3),
                       T([0.0, -0.9, 0.0, 0.0, 0.0, 0.0, 0.8, 0.0, 0.0, 1.0]))


def test_breadcrumbs_counts_are_floors_and_outlier_cut_shrinks():
    # 0.29 * 10 = 2.9 -> k = 2; 0.15 * 10 = 1.5 -> 1 outlier: keep 0.9 and 0.8.
    out = breadcrumbs(BC_X, density=0.29, gamma=0.15)
    assert torch.equal(out, T([0.0, -0.9, 0.0, 0.0, 0.0, 0.0, 0.8, 0.0, 0.0, 0.0]))
    # k = 9 and 2 outliers do not fit in 10: the cut shrinks to 1 (only 1.0 goes).
    out = breadcrumbs(BC_X, density=0.9, gamma=0.2)
    assert torch.equal(out, torch.where(BC_X.abs() < 1.0, BC_X, 0.0))
    # int(0.05 * 10) = 0: nothing is kept (no minimum of one, as mergekit).
    assert torch.equal(breadcrumbs(BC_X, density=0.05, gamma=0.0), torch.zeros(10))


def test_breadcrumbs_density_one_ignores_gamma():
    out = breadcrumbs(BC_X, density=1.0, gamma=0.3)
    assert torch.equal(out, BC_X) and out.data_ptr() != BC_X.data_ptr()


def test_breadcrumbs_ranks_the_whole_tensor_and_breaks_ties_by_index():
    x = T([[4.0, 1.0, 3.0], [6.0, 5.0, 2.0]])  # one ranking over all 6 entries
    # k = 3, 1 outlier: drop 6, keep 5, 4, 3.
    assert breadcrumbs(x, density=0.5, gamma=0.2).tolist() == [[4.0, 0, 3.0], [0, 5.0, 0]]
    ones = torch.ones(4)  # all tied: in index order, drop 1 then keep 2
    assert breadcrumbs(ones, density=0.5, gamma=0.25).tolist() == [0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("density", [0.05, 0.3, 0.7])
def test_breadcrumbs_gamma_zero_is_trim(density):
    x = torch.randint(-3, 4, (500,), generator=torch.Generator().manual_seed(1)).float()
    # Same count (floor) and same tie rule as the TIES trim.
    assert torch.equal(breadcrumbs(x, density=density, gamma=0.0), trim(x, density=density))


def test_breadcrumbs_large_window_matches_sort():
    # Above the kernels' direct-selection size, with ties: the kept set is a window of the
    # (-|x|, index) order.
    x = torch.randint(-50, 51, (1 << 15,), generator=torch.Generator().manual_seed(2)).float()
    n = x.numel()
    order = torch.sort(-x.abs(), stable=True).indices
    k, top = int(0.3 * n), int(0.05 * n)
    want = torch.zeros(n, dtype=torch.bool)
    want[order[top:top + k]] = True
    assert torch.equal(breadcrumbs(x, density=0.3, gamma=0.05), torch.where(want, x, 0.0))


def test_breadcrumbs_rescale_keeps_l1_norm():
    x = randn(20, 30, seed=3)
    out = breadcrumbs(x, density=0.4, gamma=0.1, rescale=True)
    plain = breadcrumbs(x, density=0.4, gamma=0.1)
    torch.testing.assert_close(out.abs().sum(), x.abs().sum())
    torch.testing.assert_close(out, plain * (x.abs().sum() / plain.abs().sum()))


def test_breadcrumbs_dtype_no_mutation_and_errors():
    x = BC_X.double()
    before = x.clone()
    assert breadcrumbs(x, density=0.3, gamma=0.2).dtype == torch.float64
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match=r"breadcrumbs: gamma must be in \[0, 1\]"):
        breadcrumbs(x, density=0.3, gamma=-0.1)
    with pytest.raises(ValueError, match=r"breadcrumbs: density must be in \(0, 1\]"):
        breadcrumbs(x, density=0.0)
    with pytest.raises(TypeError, match="breadcrumbs: rescale must be true or false"):
        breadcrumbs(x, density=0.3, rescale="l1")


# ---------------------------------------------------------------------------------------
# DELLA


def test_della_probabilities_hand_example():
    x = T([0.1, -0.5, 0.3])
    # ranks 0, 2, 1 of m = 3; p = 0.3 + r/2 · 0.4.
    p = della_probabilities(x, density=0.5, epsilon=0.2)
    torch.testing.assert_close(p, T([0.3, 0.7, 0.5]))
    # Matrices rank each row (dim 1); a conv-like 3-D tensor ranks along dim 1 too.
    m = T([[3.0, 1.0, 2.0], [-1.0, -3.0, -2.0]])
    torch.testing.assert_close(della_probabilities(m, density=0.5, epsilon=0.2),
                               T([[0.7, 0.3, 0.5], [0.3, 0.7, 0.5]]))
    c = T([[[1.0, 9.0], [2.0, 8.0], [3.0, 7.0]]])  # shape (1, 3, 2): fibres along dim 1
    torch.testing.assert_close(della_probabilities(c, density=0.5, epsilon=0.2),
                               T([[[0.3, 0.7], [0.5, 0.5], [0.7, 0.3]]]))
    # Ties are ranked by index; a one-entry row gets p = density.
    torch.testing.assert_close(della_probabilities(torch.ones(3), density=0.5, epsilon=0.2),
                               T([0.3, 0.5, 0.7]))
    torch.testing.assert_close(della_probabilities(T([[2.0], [3.0]]), density=0.4, epsilon=0.1),
                               T([[0.4], [0.4]]))
    assert della_probabilities(T(2.0), density=0.4, epsilon=0.1).item() == pytest.approx(0.4)


def test_della_same_seed_same_bytes():
    x = randn(64, 48, seed=4)
    s = derive_seed(7, "merged", "math", "model.layers.0.mlp.up_proj.weight")
    a = della(x, density=0.4, epsilon=0.1, seed=s).numpy().tobytes()
    assert a == della(x, density=0.4, epsilon=0.1, seed=s).numpy().tobytes()
    assert a != della(x, density=0.4, epsilon=0.1, seed=s + 1).numpy().tobytes()


def test_della_epsilon_zero_is_dare():
    x = randn(300, seed=5)
    for d in (0.2, 0.5, 0.9):
        out = della(x, density=d, epsilon=0.0, seed=11, rescale="inverse")
        assert out.numpy().tobytes() == dare(x, density=d, seed=11).numpy().tobytes()
        plain = della(x, density=d, epsilon=0.0, seed=11, rescale=False)
        assert torch.equal(plain, dare(x, density=d, seed=11, rescale=False))


def test_della_keep_rate_and_magnitude_preference():
    x = randn(400, 250, seed=6)
    out = della(x, density=0.3, epsilon=0.2, seed=3, rescale=False)
    kept = out != 0
    # Mean probability 0.3 in every row: 100k entries give a standard error of 0.0015.
    assert abs(kept.double().mean().item() - 0.3) < 0.006
    p = della_probabilities(x, density=0.3, epsilon=0.2)
    big, small = p > 0.45, p < 0.15  # the top and bottom eighth of each row, by magnitude
    assert abs(kept[big].double().mean().item() - p[big].double().mean().item()) < 0.01
    assert abs(kept[small].double().mean().item() - p[small].double().mean().item()) < 0.01
    # rescale=False keeps the entries as they are.
    assert torch.equal(out[kept], x[kept])


def test_della_inverse_rescale_is_unbiased():
    x = randn(40, seed=7, dtype=torch.float64)
    p = della_probabilities(x, density=0.4, epsilon=0.3)
    n = 4000
    total = torch.zeros_like(x)
    for s in range(n):
        total += della(x, density=0.4, epsilon=0.3, seed=s, rescale="inverse")
    mean = total / n
    # Per entry, the sample mean has standard deviation |x| sqrt((1 - p)/p) / sqrt(n).
    sd = x.abs() * torch.sqrt((1 - p) / p) / math.sqrt(n)
    assert ((mean - x).abs() <= 5 * sd + 1e-12).all()


def test_della_l1_rescale_is_mergekits_default():
    x = randn(30, 20, seed=8)
    out = della(x, density=0.5, epsilon=0.15, seed=1)  # rescale=True: the L1 norm of x
    torch.testing.assert_close(out.abs().sum(), x.abs().sum())
    plain = della(x, density=0.5, epsilon=0.15, seed=1, rescale=False)
    assert torch.equal(della(x, density=0.5, epsilon=0.15, seed=1, rescale="l1"), out)
    torch.testing.assert_close(out, plain * (x.abs().sum() / plain.abs().sum()))


def test_della_density_one_dtype_and_errors():
    x = randn(5, seed=9, dtype=torch.float64)
    before = x.clone()
    out = della(x, density=1.0, epsilon=0.3, seed=0)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    assert della(x, density=0.5, epsilon=0.1, seed=0).dtype == torch.float64
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match=r"della: density ± epsilon must lie strictly inside"):
        della(x, density=0.9, epsilon=0.1, seed=0)  # 0.9 + 0.1 = 1.0, refused as mergekit
    with pytest.raises(ValueError, match=r"della: density ± epsilon must lie strictly inside"):
        della(x, density=0.1, epsilon=0.15, seed=0)
    with pytest.raises(ValueError, match="della: epsilon must be >= 0"):
        della(x, density=0.5, epsilon=-0.1, seed=0)
    with pytest.raises(ValueError, match="della: rescale must be true, false, 'l1' or 'inverse'"):
        della(x, density=0.5, epsilon=0.1, seed=0, rescale="l2")
    with pytest.raises(ValueError, match=r"della: seed must be an int in \[0, 2\*\*64\)"):
        della(x, density=0.5, epsilon=0.1, seed=-1)
    with pytest.raises(TypeError, match="della: seed must be an int"):
        della(x, density=0.5, epsilon=0.1, seed=1.0)


# ---------------------------------------------------------------------------------------
# Model Stock


def test_model_stock_identical_deltas_give_t_one():
    d = randn(6, 5, seed=10)
    for k in (2, 3, 5):
        assert model_stock_t([d] * k).item() == pytest.approx(1.0)
        torch.testing.assert_close(model_stock([d] * k), d)


def test_model_stock_orthogonal_deltas_give_t_zero():
    a, b, c = T([1.0, 0.0, 0.0]), T([0.0, 2.0, 0.0]), T([0.0, 0.0, -3.0])
    assert model_stock_t([a, b, c]).item() == 0.0
    assert torch.equal(model_stock([a, b, c]), torch.zeros(3))


def test_model_stock_hand_examples():
    # k = 2, cos = 1/√2: t = 2c / (1 + c) = 2(√2 - 1).
    a, b = T([1.0, 0.0], dtype=torch.float64), T([1.0, 1.0], dtype=torch.float64)
    t = 2 * (math.sqrt(2) - 1)
    assert model_stock_t([a, b]).item() == pytest.approx(t, rel=1e-12)
    torch.testing.assert_close(model_stock([a, b]), t * T([1.0, 0.5], dtype=torch.float64))
    # k = 3: pairwise cosines 1/√2, 1/√2 and 0 average to c = √2/3; t = 3c / (1 + 2c).
    c3 = T([0.0, 1.0], dtype=torch.float64)
    c = math.sqrt(2) / 3
    assert model_stock_t([a, b, c3]).item() == pytest.approx(3 * c / (1 + 2 * c), rel=1e-12)


def test_model_stock_filter_wise_rows():
    # Row 0: identical deltas (t = 1); row 1: orthogonal (t = 0); row 2: cos 1/√2.
    a = T([[1.0, 2.0], [1.0, 0.0], [1.0, 0.0]])
    b = T([[1.0, 2.0], [0.0, 1.0], [1.0, 1.0]])
    t = model_stock_t([a, b], filter_wise=True)
    assert t.shape == (3, 1)
    torch.testing.assert_close(t, T([[1.0], [0.0], [2 * (math.sqrt(2) - 1)]]))
    torch.testing.assert_close(model_stock([a, b], filter_wise=True), t * (a + b) / 2)
    # Whole tensor: one t from the flattened deltas.
    flat = model_stock_t([a.flatten(), b.flatten()])
    torch.testing.assert_close(model_stock_t([a, b]), flat)
    # 1-D tensors stay whole with filter_wise.
    v, w = T([1.0, 0.0]), T([1.0, 1.0])
    torch.testing.assert_close(model_stock_t([v, w], filter_wise=True), model_stock_t([v, w]))


def test_model_stock_opposed_deltas_keep_the_base():
    # cos = -1 with k = 2: 1 + (k - 1) cos = 0, so t = 0 (mergekit's guard), not inf.
    a = randn(4, seed=11)
    assert model_stock_t([a, -a]).item() == 0.0
    assert torch.equal(model_stock([a, -a]), torch.zeros(4))


def test_model_stock_tiny_norms_are_floored():
    # ‖Δ_1‖‖Δ_2‖ = 1e-8 is floored to 1e-6 (as mergekit): cos = 1e-8 / 1e-6 = 0.01, t =
    # 0.02 / 1.01, although the deltas are identical.
    d = T([1e-4, 0.0], dtype=torch.float64)
    assert model_stock_t([d, d]).item() == pytest.approx(0.02 / 1.01, rel=1e-9)


def test_model_stock_errors():
    with pytest.raises(ValueError, match="model_stock: needs at least 2 fine-tuned deltas"):
        model_stock([T([1.0])])
    with pytest.raises(TypeError, match="filter_wise must be true or false"):
        model_stock([T([1.0]), T([2.0])], filter_wise=1)


# ---------------------------------------------------------------------------------------
# consensus_merge


def test_consensus_merge_zero_total_elects_plus():
    a, b = T([1.0, 2.0, 0.0]), T([-1.0, -1.0, 0.0])
    # e0: total 0 -> γ = +1, only a agrees: 1 / 1. e1: total 1 -> +: 2. e2: nothing agrees.
    assert consensus_merge([a, b], weights=[1.0, 1.0]).tolist() == [1.0, 2.0, 0.0]
    # tvrecipe's ties gives 0 where the total is exactly 0.
    assert ties([a, b]).tolist() == [0.0, 2.0, 0.0]


def test_consensus_merge_count_tie_elects_plus():
    a, b, c = T([1.0, 1.0]), T([-4.0, -4.0]), T([0.0, -1.0])
    # e0: one vote each (c is 0 and does not vote) -> γ = +1: 1. e1: 1 vs 2 -> γ = -1: -5/2.
    out = consensus_merge([a, b, c], weights=[1.0, 1.0, 1.0], majority="count")
    assert out.tolist() == [1.0, -2.5]
    # tvrecipe's count majority breaks a tied vote by the total (-3 here).
    assert ties([a, b, c], majority="count").tolist() == [-4.0, -2.5]


def test_consensus_merge_signed_weight_divisor():
    a, b = T([2.0, 0.5]), T([1.0, 3.0])
    # c = (2, -1): γ = +, A = {0}: 2 / 1. c = (0.5, -3): γ = -, A = {1}: -3 / -1 = 3 (mergekit
    # divides by the signed weight; tvrecipe's ties by |w|, giving -3).
    assert consensus_merge([a, b], weights=[1.0, -1.0]).tolist() == [2.0, 3.0]
    assert ties([a, b], weights=[1.0, -1.0]).tolist() == [2.0, -3.0]
    assert consensus_merge([a, b], weights=[1.0, -1.0], normalize=False).tolist() == [2.0, -3.0]


def test_consensus_merge_without_election():
    a, b = T([1.0, -2.0]), T([3.0, 4.0])
    out = consensus_merge([a, b], weights=[1.0, 3.0], majority=None)
    assert out.tolist() == [2.5, 2.5]  # (a + 3b) / 4
    # |Σ w| < 1e-8: no division at all.
    out = consensus_merge([a, b], weights=[1.0, -1.0], majority=None)
    assert out.tolist() == [-2.0, -6.0]


def test_consensus_merge_agrees_with_ties_for_positive_weights():
    xs = [randn(30, 20, seed=20 + i) for i in range(3)]
    ws = [0.5, 1.0, 2.0]
    trimmed = [trim(x, density=0.4) for x in xs]
    for normalize in (True, False):
        got = consensus_merge(trimmed, weights=ws, normalize=normalize)
        want = ties(xs, density=0.4, weights=ws, normalize=normalize)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_consensus_merge_errors():
    a = T([1.0])
    with pytest.raises(ValueError, match="consensus_merge: majority must be 'total', 'count'"):
        consensus_merge([a], weights=[1.0], majority="sum")
    with pytest.raises(ValueError, match="consensus_merge: weights are required"):
        consensus_merge([a], weights=None)
    with pytest.raises(ValueError, match="consensus_merge: got 1 inputs but 2 weights"):
        consensus_merge([a], weights=[1.0, 2.0])


# ---------------------------------------------------------------------------------------
# Against mergekit itself (0.1.5's kernels and merge_tensors API), when it is installed


@pytest.fixture
def mk():
    """mergekit's sparsify module and merge_tensors, or skip."""
    pytest.importorskip("mergekit")
    api = pytest.importorskip("mergekit.merge_methods.api")
    from mergekit import sparsify as mk_sparsify

    return mk_sparsify, api.merge_tensors


def keyed_bernoulli(seeds):
    """A stand-in for torch.bernoulli that draws ``u < p`` from tvrecipe's seeded generator."""
    it = iter(seeds)

    def draw(p):
        gen = torch.Generator().manual_seed(next(it))
        u = torch.rand(p.shape, generator=gen, dtype=torch.float32)
        return (u.to(p.dtype) < p).to(p.dtype)

    return mock.patch("torch.bernoulli", draw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mergekit_linear(mk, dtype):
    _, merge_tensors = mk
    xs = [randn(9, 7, seed=30 + i, dtype=dtype) for i in range(3)]
    for ws in ([0.2, 0.3, 0.5], [1.0, -2.0, 0.5]):
        for normalize in (True, False):
            ref = merge_tensors(xs, "linear", parameters={"weight": ws, "normalize": normalize})
            out = linear(xs, weights=ws, normalize=normalize)
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(9, 7), (300,), (1,), (), (3, 4, 5)])
def test_mergekit_slerp(mk, dtype, shape):
    _, merge_tensors = mk
    a, b = randn(*shape, seed=40, dtype=dtype), randn(*shape, seed=41, dtype=dtype)
    near = a + 1e-3 * randn(*shape, seed=42, dtype=dtype)  # above the colinear threshold
    for other in (b, near, -a):
        for t in (0.0, 0.3, 0.75, 1.0, 1.3):
            ref = merge_tensors([a, other], "slerp", parameters={"t": t}, base_index=0)
            out = slerp(a, other, t=t)
            assert out.dtype == ref.dtype
            scale = ref.abs().max().clamp(min=1e-30)
            assert ((out - ref).abs().max() / scale).item() <= 1e-6, (other is b, t)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_mergekit_model_stock(mk, filter_wise, k):
    _, merge_tensors = mk
    base = randn(12, 8, seed=50)
    common = randn(1, 8, seed=51)
    fts = [base + 0.1 * randn(12, 8, seed=52 + i) + 0.05 * common for i in range(k)]
    for bias in (False, True):
        b0 = base[0] if bias else base
        fs = [f[0] for f in fts] if bias else fts
        ref = merge_tensors([b0, *fs], "model_stock", parameters={"filter_wise": filter_wise},
                            base_index=0)
        out = b0 + model_stock([f - b0 for f in fs], filter_wise=filter_wise)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(50,), (7, 9), (3, 4, 5), (1000,)])
def test_mergekit_breadcrumbs_sparsifier(mk, shape):
    mk_sparsify, _ = mk
    x = randn(*shape, seed=60)  # distinct magnitudes: no tie at a cut
    for d in (0.05, 0.3, 0.9, 1.0):
        for gamma in (0.0, 0.01, 0.1, 0.8):
            for rescale in (False, True):
                norm = mk_sparsify.RescaleNorm.l1 if rescale else None
                ref = mk_sparsify.magnitude_outliers(x, d, rescale_norm=norm, gamma=gamma)
                out = breadcrumbs(x, density=d, gamma=gamma, rescale=rescale)
                assert torch.equal(out, ref), (d, gamma, rescale)


@pytest.mark.parametrize("shape", [(50,), (7, 9), (3, 4, 5), (64, 64)])
def test_mergekit_della_sparsifier(mk, shape):
    mk_sparsify, _ = mk
    x = randn(*shape, seed=61)
    for d, eps in ((0.3, 0.1), (0.5, 0.0), (0.5, 0.45), (0.8, 0.15)):
        for rescale in (False, True):
            norm = mk_sparsify.RescaleNorm.l1 if rescale else None
            with keyed_bernoulli([7]):
                ref = mk_sparsify.della_magprune(x, d, eps, rescale_norm=norm)
            out = della(x, density=d, epsilon=eps, seed=7, rescale=rescale)
            assert torch.equal(out, ref), (d, eps, rescale)


def test_mergekit_magnitude_count_is_trims(mk):
    mk_sparsify, _ = mk
    x = randn(997, seed=62)  # distinct magnitudes: same kept set
    for d in (0.001, 0.013, 0.29, 0.5, 0.57, 0.999):
        assert torch.equal(mk_sparsify.magnitude(x, d), trim(x, density=d)), d


GTA_METHODS = {
    # name: (sparsify one delta (x, density, seed) -> tensor, majority)
    "task_arithmetic": (None, None),
    "ties": (lambda x, d, s, rs: trim(x, density=d), "total"),
    "dare_ties": ("dare", "total"),
    "dare_linear": ("dare", None),
    "breadcrumbs": (lambda x, d, s, rs: breadcrumbs(x, density=d, gamma=0.1, rescale=rs), None),
    "breadcrumbs_ties": (
        lambda x, d, s, rs: breadcrumbs(x, density=d, gamma=0.1, rescale=rs), "total"),
    "della": (lambda x, d, s, rs: della(x, density=d, epsilon=0.2, seed=s, rescale=rs), "total"),
    "della_linear": (
        lambda x, d, s, rs: della(x, density=d, epsilon=0.2, seed=s, rescale=rs), None),
}


@pytest.mark.parametrize("method", list(GTA_METHODS))
@pytest.mark.parametrize("weights", [[0.7, 1.3, 0.4], [0.7, 1.3, -0.4]])
@pytest.mark.parametrize("normalize", [True, False])
def test_mergekit_generalized_task_arithmetic_as_steps(mk, method, weights, normalize):
    """Each mergekit method = sparsify each delta, consensus_merge, then scale by lambda."""
    _, merge_tensors = mk
    base = randn(16, 12, seed=70)
    fts = [base + randn(16, 12, seed=71 + i) for i in range(3)]
    deltas = [f - base for f in fts]
    dens = [0.3, 0.5, 0.7]
    seeds = [derive_seed(1, method, i) for i in range(3)]
    sparsify_fn, majority = GTA_METHODS[method]
    rescale = method.startswith(("dare", "della"))  # mergekit's default per method
    params = {"weight": weights, "normalize": normalize, "lambda": 1.5}
    if sparsify_fn is not None:
        params["density"] = dens
    if method.startswith("breadcrumbs"):
        params["gamma"] = 0.1
    if method.startswith("della"):
        params["epsilon"] = 0.2
    with keyed_bernoulli(seeds):
        ref = merge_tensors([base, *fts], method, parameters=params, base_index=0)
    if sparsify_fn is None:
        sparse = deltas
    elif sparsify_fn == "dare":
        sparse = [l1_rescale(x, dare(x, density=d, seed=s, rescale=False))
                  for x, d, s in zip(deltas, dens, seeds)]
    else:
        sparse = [sparsify_fn(x, d, s, rescale) for x, d, s in zip(deltas, dens, seeds)]
    merged = consensus_merge(sparse, weights=weights, majority=majority, normalize=normalize)
    out = base + merged * 1.5  # tvrecipe's apply: θ₀ + (λ·τ), two roundings, as mergekit
    assert torch.equal(out, ref)


@pytest.mark.parametrize("majority", ["total", "count", None])
@pytest.mark.parametrize("normalize", [True, False])
def test_consensus_in_small_blocks_gives_the_same_bytes(monkeypatch, majority, normalize):
    # consensus_merge goes through the flattened inputs in blocks (bounded scratch): it is
    # entry by entry, so any block size gives the bytes of one whole block.
    from tvrecipe.ops import merges
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(33, 7, generator=g) for _ in range(4)]
    xs[1][3] = 0.0  # zeros never agree
    ws = [1.0, 0.5, -0.7, 2.0]
    whole = merges.consensus_merge(xs, weights=ws, majority=majority, normalize=normalize)
    monkeypatch.setattr(merges, "_CONSENSUS_BLOCK", 10)
    blocked = merges.consensus_merge(xs, weights=ws, majority=majority, normalize=normalize)
    assert torch.equal(whole, blocked)
    assert blocked.shape == (33, 7)


@pytest.mark.parametrize("shape", [(40, 9), (6, 5, 4), (50,)])
def test_della_ranks_rows_in_blocks_with_the_same_bytes(monkeypatch, shape):
    # Rows are ranked independently, a few at a time for large tensors: any block of rows
    # gives the probabilities, and so the bytes, of one whole block.
    from tvrecipe.ops import merges
    x = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    x.view(-1)[3] = x.view(-1)[5]  # a tie, broken by index
    whole = merges.della(x, density=0.5, epsilon=0.2, seed=9)
    p_whole = merges.della_probabilities(x, density=0.5, epsilon=0.2)
    monkeypatch.setattr(merges, "_DELLA_BLOCK", 7)
    assert torch.equal(merges.della_probabilities(x, density=0.5, epsilon=0.2), p_whole)
    assert torch.equal(merges.della(x, density=0.5, epsilon=0.2, seed=9), whole)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_from_a_gram_matrix_matches_the_whole_tensor_kernel(t):
    from tvrecipe.ops import gram_update, slerp_coefficients, slerp_combine
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(30, 7, generator=g), torch.randn(30, 7, generator=g)
    for x, y in ((a, b), (a, 2.5 * a), (a, -a), (torch.zeros(30, 7), b)):
        gram = torch.zeros(2, 2, dtype=torch.float64)
        for rows in range(0, 30, 4):  # accumulated over row blocks
            gram_update(gram, [x[rows:rows + 4], y[rows:rows + 4]])
        ca, cb = slerp_coefficients(gram, t=t)
        torch.testing.assert_close(slerp_combine(x, y, ca=ca, cb=cb), slerp(x, y, t=t),
                                   rtol=1e-6, atol=1e-7)


def test_della_by_blocks_of_rows_gives_the_whole_tensors_bytes(monkeypatch):
    # The probabilities, draws and mask go a block of rows at a time (a row's probabilities
    # are its own; the generator continues from block to block): the same bytes as with the
    # whole tensor in one block, for every rescale, 1-D, 2-D and 4-D tensors, rows of one.
    from tvrecipe.ops import merges
    g = torch.Generator().manual_seed(0)
    cases = [((37, 29), torch.float32), ((64, 48), torch.bfloat16), ((100,), torch.float32),
             ((5, 7, 3, 3), torch.float16), ((7, 1), torch.float32), ((16, 16), torch.float64)]
    xs = [torch.randn(shape, generator=g).to(dt) for shape, dt in cases]

    def every(block: int) -> list[torch.Tensor]:
        monkeypatch.setattr(merges, "_DELLA_BLOCK", block)
        return [merges.della(x, density=0.4, epsilon=eps, seed=123, rescale=rescale)
                for x in xs for rescale in (True, "inverse", False) for eps in (0.1, 0.0)]

    whole = every(1 << 30)
    for block in (1, 50):
        for a, b in zip(every(block), whole, strict=True):
            assert a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8),
                                                      b.view(-1).view(torch.uint8))
