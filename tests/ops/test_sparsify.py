"""Tests for the sparsifying kernels: trim/prune, TIES and DARE, against hand-worked math."""

from __future__ import annotations

import hashlib
import math
import threading
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tvrecipe.ops import parallel, sparsify
from tvrecipe.ops.sparsify import dare, derive_seed, prune, ties, trim, trim_mask

T = torch.tensor


@contextmanager
def tiny_blocks():
    """Shrink the kernels' size constants so small inputs take the radix, chunked paths."""
    with mock.patch.multiple(
        sparsify, _DIRECT_MAX=16, _SCAN_CHUNK=64, _CPU_CHUNK=40
    ), mock.patch.object(parallel, "PARALLEL_MIN", 16):  # threads, on small inputs too
        yield


def ref_keep(x: torch.Tensor, density: float) -> torch.Tensor:
    """Reference top-k mask: sort by (-|x|, flat index), keep the first k."""
    xf = x.reshape(-1).double()
    n = xf.numel()
    k = max(1, int(density * n))  # mergekit's count: the float product rounded down
    order = sorted(range(n), key=lambda i: (-abs(xf[i].item()), i))
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:k]] = True
    return keep.view(x.shape)


def election_decided_by_rounding(xs, density, weights) -> bool:
    """True when some entry's weighted total is nonzero but within float32 rounding of 0."""
    trimmed = [torch.where(ref_keep(x, density), x, 0.0).double().reshape(-1) for x in xs]
    c = torch.stack([w * t for w, t in zip(weights, trimmed)])
    total, scale = c.sum(0).abs(), c.abs().sum(0)
    return bool(((total > 0) & (total <= 1e-6 * scale)).any())


def ref_ties(xs, density, weights, majority, normalize) -> torch.Tensor:
    """Entry-by-entry TIES in float64, straight from the definition in the docstring."""
    trimmed = [torch.where(ref_keep(x, density), x, 0.0).double().reshape(-1) for x in xs]
    out = torch.zeros(xs[0].numel(), dtype=torch.float64)
    for e in range(out.numel()):
        c = [w * t[e].item() for w, t in zip(weights, trimmed)]
        total = sum(c)
        sign_total = (total > 0) - (total < 0)
        if majority == "total":
            g = sign_total
        else:
            votes = sum((v > 0) - (v < 0) for v in c)
            g = (votes > 0) - (votes < 0) or sign_total
        agree = [i for i, v in enumerate(c) if v != 0 and ((v > 0) - (v < 0)) == g]
        if not agree or g == 0:
            continue
        num = sum(c[i] for i in agree)
        out[e] = num / sum(abs(weights[i]) for i in agree) if normalize else num
    return out.view(xs[0].shape)


# ---------------------------------------------------------------------------------------
# trim / trim_mask / prune


def test_trim_hand_example_with_tie_at_threshold():
    # |x| = 3, 1, 2, 2, .5, 2; k = int(0.5 * 6) = 3; the 3rd largest magnitude is 2, held
    # by indices 2, 3 and 5. Index 0 (|x| = 3 > 2) is kept, then the two lowest indices
    # among the tied ones (2 and 3); index 5 loses the tie.
    x = T([3.0, -1.0, 2.0, -2.0, 0.5, 2.0])
    assert torch.equal(trim(x, density=0.5), T([3.0, 0.0, 2.0, -2.0, 0.0, 0.0]))
    assert trim_mask(x, density=0.5).tolist() == [True, False, True, True, False, False]


def test_trim_k_is_floor_and_minimum_one():
    x = T([1.0, -5.0, 3.0, 2.0, -4.0])
    # k = int(0.5 * 5) = int(2.5) = 2: keep -5 and -4.
    assert torch.equal(trim(x, density=0.5), T([0.0, -5.0, 0.0, 0.0, -4.0]))
    # k = int(0.7 * 5) = int(3.5) = 3 (rounding would keep 4): keep -5, -4 and 3.
    assert torch.equal(trim(x, density=0.7), T([0.0, -5.0, 3.0, 0.0, -4.0]))
    assert trim_mask(x, density=0.7).tolist() == [False, True, True, False, True]
    # k = int(0.99 * 5) = int(4.95) = 4: the smallest entry still goes.
    assert torch.equal(trim(x, density=0.99), T([0.0, -5.0, 3.0, 2.0, -4.0]))
    # 0.01 * 5 = 0.05 gives 0, but at least one entry is kept.
    assert torch.equal(trim(x, density=0.01), T([0.0, -5.0, 0.0, 0.0, 0.0]))


def test_trim_k_is_int_of_the_float_product():
    # As mergekit computes it: 0.29 * 100 is 28.999999999999996 in floating point, so 28
    # entries are kept (not 29), and 0.57 * 100 = 56.99999999999999 keeps 56.
    x = torch.arange(1.0, 101.0)
    for d, k in ((0.29, 28), (0.57, 56), (0.5, 50), (0.015, 1)):
        out = trim(x, density=d)
        assert torch.equal(out, torch.where(x > 100 - k, x, 0.0)), d
        assert int(trim_mask(x, density=d).sum()) == k
        assert int(prune(x, density=d).count_nonzero()) == k


def test_trim_keeps_shape_and_does_not_mutate():
    x = T([[0.5, -3.0], [2.0, 1.0]])
    before = x.clone()
    out = trim(x, density=0.5)
    assert torch.equal(out, T([[0.0, -3.0], [2.0, 0.0]]))
    assert torch.equal(x, before)
    full = trim(x, density=1.0)
    assert torch.equal(full, x) and full.data_ptr() != x.data_ptr()
    assert trim_mask(x, density=1.0).all()


def test_trim_zero_threshold_keeps_values_and_mask_breaks_zero_ties():
    x = T([0.0, 2.0, 0.0, -1.0, 0.0])
    # k = int(0.8 * 5) = 4 > 2 nonzeros: trim changes nothing; the mask still holds
    # exactly 4 entries, the two nonzeros and the first two zeros (indices 0, 2).
    assert torch.equal(trim(x, density=0.8), x)
    assert trim_mask(x, density=0.8).tolist() == [True, True, True, True, False]


def test_trim_non_contiguous_uses_row_major_flat_index():
    x = T([[1.0, 1.0], [1.0, 1.0]]).t()  # all tied: keep flat (row-major) indices 0, 1
    assert torch.equal(trim_mask(x, density=0.5), T([[True, True], [False, False]]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_trim_other_dtypes(dtype):
    x = T([0.25, -1.5, 1.5, 0.75, -0.125], dtype=dtype)  # exact in every dtype
    out = trim(x, density=0.6)  # k = 3, tie 1.5/-1.5 both above 0.75
    assert out.dtype == dtype
    assert torch.equal(out, T([0.0, -1.5, 1.5, 0.75, 0.0], dtype=dtype))


def test_trim_large_matches_topk_and_radix_path():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1 << 20, generator=g)  # above _DIRECT_MAX: radix path
    for d in (0.003, 0.2, 0.5, 0.97):
        k = int(d * x.numel())
        ref = torch.zeros_like(x)
        idx = x.abs().topk(k).indices
        ref[idx] = x[idx]
        assert torch.equal(trim(x, density=d), ref), d


def test_trim_large_with_massive_ties():
    # Values in {-3..3}: the threshold value is shared by ~2/7 of a million entries.
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-3, 4, (1 << 20,), generator=g).float()
    for d in (0.1, 0.3, 0.9):
        m = trim_mask(x, density=d)
        k = int(d * x.numel())
        assert int(m.sum()) == k
        thr = x.abs()[m].min()
        assert (x.abs()[~m] <= thr).all()
        tied = m[x.abs() == thr]  # in flat order: kept ones must form a prefix
        n_kept = int(tied.sum())
        assert tied[:n_kept].all() and not tied[n_kept:].any()
        assert torch.equal(trim(x, density=d), torch.where(m, x, 0.0))


def test_trim_bf16_derived_ties_match_stable_sort():
    # Differences of bf16 weights take few distinct values: the threshold is tied by
    # thousands of entries, found among the radix bucket's positions.
    g = torch.Generator().manual_seed(11)
    base = torch.randn(1 << 20, generator=g).to(torch.bfloat16)
    ft = (base.float() + 0.01 * torch.randn(1 << 20, generator=g)).to(torch.bfloat16)
    x = ft.float() - base.float()
    order = torch.sort(-x.abs(), stable=True).indices  # (-|x|, flat index) order
    for d in (0.05, 0.2, 0.6):
        k = int(d * x.numel())
        thr, n_gt, n_ge, pos = sparsify._kth_largest_abs(x, k)
        assert n_ge - n_gt > 100  # really tied
        assert torch.equal(pos, torch.nonzero(x.abs() == thr).squeeze(1))
        want = torch.zeros(x.numel(), dtype=torch.bool)
        want[order[:k]] = True
        assert torch.equal(trim_mask(x, density=d), want), d
        assert torch.equal(trim(x, density=d), torch.where(want, x, 0.0)), d


def stable_top(x: torch.Tensor, k: int) -> torch.Tensor:
    """Reference mask of k entries: sort by (-|x|, flat index) with a stable sort."""
    a = x.reshape(-1).double().abs()
    want = torch.zeros(a.numel(), dtype=torch.bool)
    want[torch.sort(-a, stable=True).indices[:k]] = True
    return want.view(x.shape)


def stable_top_nan_first(x: torch.Tensor, k: int) -> torch.Tensor:
    """As :func:`stable_top`, with NaN ranked above +inf (as mergekit's descending argsort)."""
    a = x.reshape(-1).double().abs()
    nan = torch.isnan(a)
    order = torch.sort(-torch.where(nan, torch.inf, a), stable=True).indices
    order = order[torch.sort((~nan[order]).to(torch.int8), stable=True).indices]
    want = torch.zeros(a.numel(), dtype=torch.bool)
    want[order[:k]] = True
    return want.view(x.shape)


@pytest.mark.parametrize("n", [1 << 10, 1 << 16])  # the direct search and the radix search
@pytest.mark.parametrize("density", [0.02, 0.2, 0.9])
def test_nan_ranks_above_inf_in_trim_and_its_mask(n, density):
    # Only reachable with --allow-nonfinite: NaN counts as the largest magnitude, so it is
    # kept (and exactly k entries are), in the mask and in the trimmed values alike.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, generator=g)
    x[3::97] = torch.nan
    x[5::89] = -torch.inf
    x[7::83] = torch.inf
    k = max(1, int(density * n))
    want = stable_top_nan_first(x, k)
    mask = trim_mask(x, density=density)
    assert torch.equal(mask, want) and int(mask.sum()) == k
    kept = trim(x, density=density)
    assert torch.equal(kept != 0, want)  # NaN != 0 holds, and no kept entry is 0 here
    assert torch.equal(torch.isnan(kept), torch.isnan(x) & want)
    assert torch.equal(kept[want & ~torch.isnan(x)], x[want & ~torch.isnan(x)])


@pytest.mark.parametrize("n", [1 << 10, 1 << 16])
def test_more_nans_than_kept_entries_keep_everything(n):
    # The k-th largest magnitude is itself a NaN: no threshold orders the tensor, and trim
    # and its mask both keep every entry (the NaNs stay visible in the result).
    x = torch.randn(n, generator=torch.Generator().manual_seed(6))
    x[3::97] = torch.nan  # n/97 NaNs, more than k = n/100
    assert torch.equal(trim_mask(x, density=0.01), torch.ones(n, dtype=torch.bool))
    assert torch.equal(trim(x, density=0.01).isnan(), x.isnan())
    assert torch.equal(trim(x, density=0.01)[~x.isnan()], x[~x.isnan()])


@pytest.mark.parametrize("path", ["cpu", "gpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_radix_search_every_dtype_matches_stable_sort(dtype, path, monkeypatch):
    # Above _DIRECT_MAX: the two-level radix search on the bit patterns of each width
    # (a 16-bit dtype's first level is already exact), with ties at most thresholds.
    # "gpu": the torch functions a GPU run takes instead of numpy's, here on the CPU.
    if path == "gpu":
        monkeypatch.setattr(sparsify, "_in_bucket_numpy", sparsify._in_bucket_torch)
        monkeypatch.setattr(sparsify, "_among_numpy", sparsify._among_torch)
        monkeypatch.setattr(sparsify, "_kth_in_band", lambda v, k: None)
    g = torch.Generator().manual_seed(21)
    x = (torch.randn(1 << 16, generator=g) * 0.01).to(dtype)
    x[::7] = 0.0
    x[1::11] = -0.0
    n = x.numel()
    for d in (0.001, 0.2, 0.5, 0.8, 0.95):
        k = int(d * n)
        thr, n_gt, n_ge, pos = sparsify._kth_largest_abs(x, k)
        a = x.double().abs()
        want_thr = torch.sort(a, descending=True).values[k - 1].item()
        assert thr == want_thr, (dtype, d)
        assert n_gt == int((a > want_thr).sum()) and n_ge == int((a >= want_thr).sum())
        assert torch.equal(pos, torch.nonzero(a == want_thr).squeeze(1))
        want = stable_top(x, k)
        assert torch.equal(trim_mask(x, density=d), want), (dtype, d)
        assert torch.equal(trim(x, density=d), torch.where(want, x, torch.zeros((), dtype=dtype)))


def _radix_only(x: torch.Tensor, k: int, monkeypatch) -> tuple:
    with monkeypatch.context() as m:
        m.setattr(sparsify, "_kth_in_band", lambda v, k: None)
        return sparsify._kth_largest_abs(x, k)


def _same(a: tuple, b: tuple) -> bool:
    thr_a, thr_b = a[0], b[0]
    same_thr = thr_a == thr_b or (math.isnan(thr_a) and math.isnan(thr_b))
    return same_thr and a[1:3] == b[1:3] and torch.equal(a[3], b[3])


def _structured(n: int, g: torch.Generator) -> torch.Tensor:
    """bf16-derived deltas whose rows differ in scale, as real task vectors' do."""
    rows = torch.randn(n // 1024 + 1, 1, generator=g).exp()
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    noise = (rows * torch.randn(n // 1024 + 1, 1024, generator=g)).reshape(-1)[:n]
    return (base.float() + 0.01 * noise).to(torch.bfloat16).float() - base.float()


@pytest.mark.parametrize("kind", ["normal", "structured", "nonfinite", "ties"])
def test_band_search_answers_as_the_radix_search(kind, monkeypatch):
    # The one-pass band search of float32 CPU tensors: where it answers, the threshold,
    # both counts and the tied positions are those of the two-pass radix search.
    g = torch.Generator().manual_seed(31)
    n = 3 << 18
    x = {"normal": lambda: torch.randn(n, generator=g),
         "structured": lambda: _structured(n, g),
         "ties": lambda: torch.randint(-3, 4, (n,), generator=g).float()}.get(kind, lambda: None)()
    if kind == "nonfinite":
        x = torch.randn(n, generator=g)
        x[3::97], x[5::89], x[7::83] = torch.nan, -torch.inf, torch.inf
    answered = 0
    for d in (1e-5, 0.05, 0.2, 0.5, 0.9, 1 - 1e-5):
        k = max(1, int(d * n))
        band = sparsify._kth_in_band(x, k)
        answered += band is not None
        radix = _radix_only(x, k, monkeypatch)
        assert _same(sparsify._kth_largest_abs(x, k), radix), (kind, d)
        if band is not None:
            assert _same(band, radix), (kind, d)
    assert answered >= 5  # the sample found the band nearly every time


def test_band_search_unlike_its_sample_falls_back_to_the_radix_search(monkeypatch):
    # Every sampled run (16 entries in every 131) holds zeros, the rest large values: the
    # band lies around 0, the k-th largest far above it. The search says so (None) and the
    # radix search answers, the same as ever.
    g = torch.Generator().manual_seed(32)
    n = 1 << 20
    x = torch.randn(n, generator=g) + 10.0
    starts = torch.arange(0, n - sparsify._SAMPLE_RUN + 1, sparsify._SAMPLE_PERIOD)
    for j in range(sparsify._SAMPLE_RUN):
        x[starts + j] = 0.0
    k = n // 2
    assert sparsify._kth_in_band(x, k) is None
    got = sparsify._kth_largest_abs(x, k)
    assert _same(got, _radix_only(x, k, monkeypatch))
    assert got[0] == torch.sort(x.abs(), descending=True).values[k - 1].item()


def test_band_search_leaves_non_contiguous_tensors_to_the_radix_search():
    # An expanded tensor (stride 0) or a strided view: the sample would read the storage
    # as if it were flat, so these take the radix search (a broadcast 1-element tensor
    # made the sample read past its storage).
    x = torch.randn(1).expand(20000)
    assert sparsify._kth_in_band(x, 10000) is None
    assert torch.equal(trim(x, density=0.5), torch.where(stable_top(x, 10000), x, 0.0))
    y = torch.randn(1 << 16, generator=torch.Generator().manual_seed(33))[::2]
    assert sparsify._kth_in_band(y, 5000) is None
    assert torch.equal(trim_mask(y, density=5000 / y.numel()), stable_top(y, 5000))


def test_radix_search_zero_threshold_denormals_and_constant_tensors():
    n = 1 << 15
    # Fewer nonzeros than k: the threshold is 0 and trim_mask breaks the tie among the
    # zeros (and -0.0) by flat index; denormals sit in the same first-level bucket as 0.
    x = torch.zeros(n)
    x[::4] = torch.linspace(1e-3, 1.0, n // 4)
    x[1::16] = 1e-40  # float32 denormal
    x[2::16] = -0.0
    k = int(0.5 * n)
    thr, n_gt, n_ge, _pos = sparsify._kth_largest_abs(x, k)
    assert thr == 0.0 and n_gt == n // 4 + n // 16 and n_ge == n
    assert torch.equal(trim_mask(x, density=0.5), stable_top(x, k))
    assert torch.equal(trim(x, density=0.5), x)  # the dropped entries are all zeros
    k = int(0.26 * n)  # inside the denormals
    assert sparsify._kth_largest_abs(x, k)[0] == torch.tensor(1e-40).item()
    assert torch.equal(trim_mask(x, density=0.26), stable_top(x, k))
    # Every entry the same magnitude: the first k by flat index.
    c = torch.full((n,), 0.5)
    c[1::2] = -0.5
    assert torch.equal(trim_mask(c, density=0.3), stable_top(c, int(0.3 * n)))


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32).filter(lambda v: v != 0)
tied = st.sampled_from([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0])


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.one_of(finite, tied), min_size=1, max_size=300),
    density=st.floats(0.001, 1.0),
)
def test_trim_property_exact_topk_with_index_ties(values, density):
    x = T(values, dtype=torch.float32)
    keep = ref_keep(x, density)
    k = max(1, int(density * x.numel()))
    for ctx in (contextmanager(lambda: (yield))(), tiny_blocks()):
        with ctx:
            out = trim(x, density=density)
            mask = trim_mask(x, density=density)
        assert torch.equal(mask, keep)
        assert int((out != 0).sum()) == k  # inputs have no zeros
        assert torch.equal(out, torch.where(keep, x, 0.0))


def test_prune_is_magnitude_trim():
    x = T([0.1, -0.9, 0.5, 0.3])
    assert torch.equal(prune(x, density=0.5), T([0.0, -0.9, 0.5, 0.0]))
    assert torch.equal(prune(x, density=0.5, by="magnitude"), trim(x, density=0.5))


# ---------------------------------------------------------------------------------------
# TIES

# Hand-worked example, density 0.8 (k = 4 of 5 per input), weights (1, 1, 2):
#   τ1 = [1, 2, -2, 0.1, 3]  -> drops 0.1            -> τ̂1 = [1,  2, -2, 0,  3]
#   τ2 = [1, -1, 1, -0.2, -2] -> drops -0.2          -> τ̂2 = [1, -1,  1, 0, -2]
#   τ3 = [-3, .5, .5, 4, -1] -> 4th largest |.| is .5, held by indices 1 and 2: index 1
#                              wins the tie          -> τ̂3 = [-3, .5, 0, 4, -1]
# Contributions c = w τ̂ per entry and the results:
#   e0: c = (1, 1, -6)   total -4 -> γ=-: A={3}: -6/2 = -3 | sum -6
#                        count 2:1 -> γ=+: A={1,2}: 2/2 = 1 | sum 2
#   e1: c = (2, -1, 1)   γ=+ both: A={1,3}: 3/3 = 1 | sum 3
#   e2: c = (-2, 1, 0)   total -1; count 1:1 tie -> total: γ=-: A={1}: -2/1 | sum -2
#   e3: c = (0, 0, 8)    γ=+: A={3}: 8/2 = 4 | sum 8
#   e4: c = (3, -2, -2)  γ=- both: A={2,3}: -4/3 | sum -4
HAND_INPUTS = [
    [1.0, 2.0, -2.0, 0.1, 3.0],
    [1.0, -1.0, 1.0, -0.2, -2.0],
    [-3.0, 0.5, 0.5, 4.0, -1.0],
]
HAND_EXPECTED = {
    ("total", True): [-3.0, 1.0, -2.0, 4.0, -4.0 / 3.0],
    ("total", False): [-6.0, 3.0, -2.0, 8.0, -4.0],
    ("count", True): [1.0, 1.0, -2.0, 4.0, -4.0 / 3.0],
    ("count", False): [2.0, 3.0, -2.0, 8.0, -4.0],
}


@pytest.mark.parametrize(("majority", "normalize"), list(HAND_EXPECTED))
def test_ties_hand_example(majority, normalize):
    xs = [T(v) for v in HAND_INPUTS]
    before = [x.clone() for x in xs]
    out = ties(xs, density=0.8, weights=[1.0, 1.0, 2.0], majority=majority, normalize=normalize)
    torch.testing.assert_close(out, T(HAND_EXPECTED[(majority, normalize)]), rtol=1e-6, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(xs, before))  # inputs untouched


def test_ties_disagreeing_entry_takes_elected_side_only():
    xs = [T([5.0]), T([3.0]), T([-4.0])]
    # total 4 > 0: only the positive inputs are merged, the -4 is ignored entirely.
    assert ties(xs).item() == 4.0
    assert ties(xs, normalize=False).item() == 8.0


def test_ties_count_tie_falls_back_to_total_then_zero():
    xs = [T([1.0, 1.0]), T([-1.0, -3.0])]
    # e0: one vote each, total 0 -> 0. e1: one vote each, total -2 -> γ=-, result -3.
    out = ties(xs, majority="count")
    assert out.tolist() == [0.0, -3.0]


def test_ties_density_one_same_signs_is_weighted_mean():
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(50, 7, generator=g) + 0.1 for _ in range(4)]
    ws = [0.5, 2.0, 1.0, 0.25]
    expect = sum(w * x for w, x in zip(ws, xs)) / sum(ws)
    torch.testing.assert_close(ties(xs, weights=ws), expect)
    neg = [-x for x in xs]
    torch.testing.assert_close(ties(neg, weights=ws, majority="count"), -expect)
    torch.testing.assert_close(ties(xs), sum(xs) / 4)  # default weights: plain mean


def test_ties_negative_weight_keeps_negation():
    # c = (2, -1) -> γ=+, A={0}: 2. c = (0.5, -3) -> γ=-, A={1}: -3/|-1| = -3, i.e. the
    # negated task survives (dividing by Σ_A w = -1 would flip it back to +3).
    a, b = T([2.0, 0.5]), T([1.0, 3.0])
    assert ties([a, b], weights=[1.0, -1.0]).tolist() == [2.0, -3.0]
    # count: one vote each side at both entries, so the total decides; same result, also
    # with the negatively weighted input first.
    assert ties([b, a], weights=[-1.0, 1.0], majority="count").tolist() == [2.0, -3.0]
    assert ties([a, b], weights=[1.0, -1.0], normalize=False).tolist() == [2.0, -3.0]


def test_ties_zero_weight_input_takes_no_part():
    a, b = T([1.0, -2.0, 3.0]), T([-9.0, 9.0, -9.0])
    assert torch.equal(ties([a, b], weights=[1.0, 0.0], majority="count"), a)
    assert torch.equal(ties([a, b], weights=[0.0, 0.0]), torch.zeros(3))


def test_ties_trims_floor_count():
    # density 0.7 of 5 entries: k = int(3.5) = 3 per input (rounding would keep 4).
    #   τ1 = [4, -1, 2, 0.5, -3] -> τ̂1 = [4, 0, 2, 0, -3]
    #   τ2 = [-1, 2, 0.5, 3, -4] -> τ̂2 = [0, 2, 0, 3, -4]
    # Signs agree wherever both are kept, so the normalized result is the mean over the
    # inputs that kept the entry: [4, 2, 2, 3, -3.5].
    xs = [T([4.0, -1.0, 2.0, 0.5, -3.0]), T([-1.0, 2.0, 0.5, 3.0, -4.0])]
    assert ties(xs, density=0.7).tolist() == [4.0, 2.0, 2.0, 3.0, -3.5]
    assert ties(xs, density=0.7, normalize=False).tolist() == [4.0, 2.0, 2.0, 3.0, -7.0]


def test_ties_single_input_is_trim():
    x = T([0.3, -2.0, 1.0, 0.0, -0.7])
    assert torch.equal(ties([x], density=0.4), trim(x, density=0.4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_ties_preserves_dtype(dtype):
    xs = [T(v, dtype=dtype) for v in HAND_INPUTS]
    out = ties(xs, density=0.8, weights=[1.0, 1.0, 2.0], majority="count")
    assert out.dtype == dtype
    expect = T(HAND_EXPECTED[("count", True)], dtype=dtype)
    torch.testing.assert_close(out, expect, rtol=1e-2, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [256, 300, 2100])
def test_ties_of_many_agreeing_16_bit_inputs_rounds_both_sums_alike(dtype, n):
    """The numerator and the count of agreeing inputs add up one input at a time in the
    inputs' dtype, so they round alike (bf16 counts stop at 256, float16's at 2048) and n
    equal inputs merge to their value: a count made in float32 would not stop there."""
    xs = [torch.ones(5, dtype=dtype)] * n
    assert torch.equal(ties(xs), torch.ones(5, dtype=dtype))
    assert torch.equal(ties(xs, weights=[-1.0] * n), -torch.ones(5, dtype=dtype))


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 4),
    size=st.integers(1, 150),
    density=st.sampled_from([1.0, 0.6, 0.25, 0.05]),
    majority=st.sampled_from(["total", "count"]),
    normalize=st.booleans(),
)
def test_ties_property_matches_reference(data, n, size, density, majority, normalize):
    vals = st.one_of(st.sampled_from([-1.0, 0.0, 0.5, 1.0]), st.floats(-10, 10, width=32))
    xs = [T(data.draw(st.lists(vals, min_size=size, max_size=size))) for _ in range(n)]
    ws = data.draw(st.lists(st.sampled_from([-1.0, 0.5, 1.0, 2.0]), min_size=n, max_size=n))
    # The kernel elects in float32: where the weighted total cancels to within rounding of
    # zero (4·0.5 − 2⁻²⁴ − 1 − 1), its sign is float32's, not the float64 reference's.
    assume(not election_decided_by_rounding(xs, density, ws))
    expect = ref_ties(xs, density, ws, majority, normalize).float()
    for ctx in (contextmanager(lambda: (yield))(), tiny_blocks()):
        with ctx:
            out = ties(xs, density=density, weights=ws, majority=majority, normalize=normalize)
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_ties_large_matches_reference_formula():
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(300, 300, generator=g) for _ in range(3)]  # chunked, sampled paths
    ws = [1.0, 0.5, 2.0]
    kept = [torch.where(trim_mask(x, density=0.3), x, 0.0).double() for x in xs]
    c = torch.stack([w * t for w, t in zip(ws, kept)])
    gam = c.sum(0).sign()
    agree = (c.sign() == gam) & (c != 0)
    wabs = T(ws, dtype=torch.float64).abs().view(-1, 1, 1)
    den = (wabs * agree).sum(0)
    expect = torch.where(den > 0, (c * agree).sum(0) / den.clamp(min=1e-300), 0.0)
    torch.testing.assert_close(ties(xs, density=0.3, weights=ws), expect.float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trim_and_ties_on_cuda_match_cpu():
    # The radix search's CUDA branch (no word-scan compress, CUDA-sized chunks) selects the
    # same entries, and the merge gives the same bytes, as docs/recipe-format.md ("CPU and
    # GPU bytes") says. (Until 2026-11-26 this test asked only for closeness, for fear of a
    # fused multiply-add in the weighted adds; it has not run on a GPU since.)
    g = torch.Generator().manual_seed(13)
    base = torch.randn(1 << 18, generator=g).to(torch.bfloat16)
    xs = [((base.float() + 0.01 * torch.randn(1 << 18, generator=g)).to(torch.bfloat16).float()
           - base.float()).view(512, 512) for _ in range(3)]
    for d in (0.05, 0.2, 0.9):
        for x in xs:
            assert torch.equal(trim_mask(x.cuda(), density=d).cpu(), trim_mask(x, density=d))
            assert torch.equal(trim(x.cuda(), density=d).cpu(), trim(x, density=d))
        for majority in ("total", "count"):
            want = ties(xs, density=d, weights=[1.0, 0.5, -2.0], majority=majority)
            got = ties([x.cuda() for x in xs], density=d, weights=[1.0, 0.5, -2.0],
                       majority=majority)
            assert got.is_cuda
            assert torch.equal(got.cpu(), want), (d, majority)


# ---------------------------------------------------------------------------------------
# DARE and seeds


def test_dare_density_one_is_identity_copy():
    x = torch.randn(64, 3)
    out = dare(x, density=1.0, seed=1)
    assert out.numpy().tobytes() == x.numpy().tobytes() and out.data_ptr() != x.data_ptr()


def test_dare_same_seed_same_bytes_different_seed_differs():
    x = torch.randn(1000)
    a = dare(x, density=0.3, seed=123).numpy().tobytes()
    assert a == dare(x, density=0.3, seed=123).numpy().tobytes()
    assert a != dare(x, density=0.3, seed=124).numpy().tobytes()


def test_dare_values_rescale_and_mask_independent_of_dtype():
    x = torch.randn(500, dtype=torch.float64)
    out = dare(x, density=0.4, seed=9)
    plain = dare(x, density=0.4, rescale=False, seed=9)
    kept = out != 0
    assert torch.equal(out[kept], x[kept] / 0.4)
    assert torch.equal(plain, torch.where(kept, x, 0.0))
    # The mask is drawn in float32 on the CPU whatever the compute dtype.
    assert torch.equal(dare(x.float(), density=0.4, seed=9) != 0, kept)
    gen = torch.Generator().manual_seed(9)
    assert torch.equal(kept, torch.rand(500, generator=gen) < 0.4)


def test_dare_fraction_kept_close_to_density():
    x = torch.ones(100_000)
    frac = (dare(x, density=0.3, seed=2) != 0).double().mean().item()
    assert abs(frac - 0.3) < 0.01  # sd 0.0015: 7 sd, with a fixed seed


def test_dare_is_unbiased_over_seeds():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2000, generator=g, dtype=torch.float64)
    seeds = range(300)
    mean = sum(dare(x, density=0.5, seed=s) for s in seeds) / len(seeds)
    # Per entry the estimate has sd |x| * sqrt((1-p)/p / 300) = 0.058 |x|; allow 6 sd.
    assert ((mean - x).abs() <= 6 * 0.058 * x.abs() + 1e-12).all()
    assert abs((mean - x).sum().item()) < 6 * 0.058 * x.pow(2).sum().sqrt().item()


def test_derive_seed_canonical_and_in_range():
    parts = (42, "ties", "tv.math", "model.layers.0.weight")
    text = '[42,"ties","tv.math","model.layers.0.weight"]'
    digest = hashlib.sha256(text.encode()).digest()
    expected = int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)
    assert derive_seed(*parts) == expected == 8505305506564836598
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert derive_seed("1") != derive_seed(1) != derive_seed(True)
    assert derive_seed({"b": 1, "a": 2}) == derive_seed({"a": 2, "b": 1})
    assert all(0 <= derive_seed(i) < 1 << 63 for i in range(100))
    with pytest.raises(TypeError):
        derive_seed(object())


# ---------------------------------------------------------------------------------------
# Parameter errors


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density(density):
    x = T([1.0, 2.0])
    msg = r"density must be in \(0, 1\], got"
    with pytest.raises(ValueError, match=r"trim: " + msg):
        trim(x, density=density)
    with pytest.raises(ValueError, match=r"prune: " + msg):
        prune(x, density=density)
    with pytest.raises(ValueError, match=r"ties: " + msg):
        ties([x], density=density)
    with pytest.raises(ValueError, match=r"dare: " + msg):
        dare(x, density=density, seed=0)


def test_bad_parameters_messages():
    x = T([1.0, 2.0])
    with pytest.raises(ValueError, match=r"ties: majority must be 'total' or 'count', got 'most'"):
        ties([x], majority="most")
    with pytest.raises(ValueError, match=r"ties: got 2 inputs but 1 weights"):
        ties([x, x], weights=[1.0])
    with pytest.raises(ValueError, match=r"ties: needs at least one input, got none"):
        ties([])
    with pytest.raises(ValueError, match=r"ties: all inputs must share shape, dtype and device"):
        ties([x, T([1.0, 2.0, 3.0])])
    with pytest.raises(ValueError, match=r"ties: weights must be finite numbers, got inf"):
        ties([x], weights=[float("inf")])
    with pytest.raises(ValueError, match=r"prune: by must be 'magnitude'.*got 'random'"):
        prune(x, density=0.5, by="random")
    with pytest.raises(ValueError, match=r"dare: seed must be an int in \[0, 2\*\*64\), got -1"):
        dare(x, density=0.5, seed=-1)
    with pytest.raises(TypeError, match=r"dare: seed must be an int"):
        dare(x, density=0.5, seed=1.5)
    with pytest.raises(TypeError, match=r"trim: expected a floating-point tensor"):
        trim(T([1, 2]), density=0.5)
    with pytest.raises(TypeError, match=r"trim: density must be a number"):
        trim(x, density="0.5")


def test_parallel_map_keeps_order_and_nested_calls_run_inline():
    # Results come back in item order, and a call from inside a worker does not wait on
    # the (possibly full) pool: with 2 workers busy on outer items this would deadlock.
    with mock.patch.object(parallel, "PARALLEL_MIN", 1), \
            mock.patch.object(parallel, "cores", lambda: 2):
        def outer(i):
            inner = parallel.parallel_map(lambda j: i * 10 + j, range(3), numel=1,
                                          device=torch.device("cpu"))
            return list(inner)
        got = list(parallel.parallel_map(outer, range(4), numel=1, device=torch.device("cpu")))
    assert got == [[0, 1, 2], [10, 11, 12], [20, 21, 22], [30, 31, 32]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dare_rescales_with_the_rounding_of_dividing_by_the_number(dtype):
    # x / p as the CPU rounds it for a Python number p (float16/bfloat16: in float32, rounded
    # once), though p goes in as a tensor (CUDA's division by a number is a reciprocal
    # product). A bfloat16 p (0.30078125 for 0.3) would change most kept entries.
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    for p in (0.3, 0.1, 1 / 3, 0.77):
        keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) < p
        expect = torch.where(keep, x / p, torch.zeros((), dtype=dtype)).add_(0.0)
        assert torch.equal(dare(x, density=p, seed=5), expect), p


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dare_on_cuda_gives_the_cpu_bytes(dtype):
    x = torch.randn(1 << 18, generator=torch.Generator().manual_seed(3)).to(dtype)
    for p in (0.3, 1 / 3, 0.9):
        assert torch.equal(dare(x.cuda(), density=p, seed=11).cpu(), dare(x, density=p, seed=11))


def test_math_threads_run_torch_on_one_thread_each_and_leave_the_callers_count():
    # A new thread takes torch's thread count last set anywhere: without their own count of
    # 1, 4 workers would each run kernels on 3 OpenMP threads here (15 each on 16 cores).
    # The caller keeps its count, and so do threads started after the pool.
    old, before = parallel._POOL, torch.get_num_threads()
    parallel._POOL = None
    torch.set_num_threads(3)
    try:
        with mock.patch.object(parallel, "PARALLEL_MIN", 1), \
                mock.patch.object(parallel, "cores", lambda: 4):
            seen = list(parallel.parallel_map(
                lambda _i: torch.get_num_threads(), range(32),
                numel=1, device=torch.device("cpu")))
        assert set(seen) == {1}
        assert torch.get_num_threads() == 3
        later: list[int] = []
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert later == [3]
    finally:
        pool, parallel._POOL = parallel._POOL, old
        pool.shutdown()
        torch.set_num_threads(before)


def test_dare_mask_is_exactly_rand_below_density_and_zeros_are_positive():
    # The float mask sign(relu(p - r)) must agree with r < p on every draw, including draws
    # right at p (float32 neighbours of p are forced into the draw here).
    n = 200_000
    x = -torch.rand(n, generator=torch.Generator().manual_seed(4)) - 0.5  # all negative
    for p in (0.3, 0.1 + 0.2, 1 / 3, 0.9):
        gen = torch.Generator().manual_seed(77)
        r = torch.rand(n, generator=gen)
        keep = r < p
        out = dare(x, density=p, seed=77)
        assert torch.equal(out != 0, keep)
        assert torch.equal(out[keep], x[keep] / p)
        assert not torch.signbit(out[~keep]).any()  # +0.0, not -0.0
    p32 = torch.tensor(0.3, dtype=torch.float32)
    r = torch.stack([torch.nextafter(p32, torch.tensor(0.0)), p32,
                     torch.nextafter(p32, torch.tensor(1.0))])
    assert torch.equal(torch.rsub(r, 0.3).relu_().sign_(), (r < 0.3).float())


@pytest.mark.parametrize("itype", [torch.int16, torch.int32, torch.int64])
def test_selection_among_a_band_is_the_same_in_numpy_and_in_torch(itype):
    # _kth_among takes numpy's selection on the CPU and torch's kthvalue elsewhere (a
    # GPU): both must name the same value, count and tied positions, here on the CPU.
    g = torch.Generator().manual_seed(41)
    top = torch.iinfo(itype).max
    for n, spread in ((1, 3), (7, 2), (5000, 40), (5000, top)):
        vals = torch.randint(0, spread, (n,), generator=g).to(itype)
        pos = torch.sort(torch.randperm(10 * n, generator=g)[:n]).values
        for at in sorted({0, n // 3, n // 2, n - 1}):
            a = sparsify._among_numpy(vals, pos, at)
            b = sparsify._among_torch(vals, pos, at)
            want = torch.sort(vals).values[at]
            assert a[0].dtype == b[0].dtype == itype and a[0].item() == b[0].item() == want
            assert a[1] == b[1] == int((vals > want).sum())
            assert torch.equal(a[2], b[2]) and torch.equal(a[2], pos[vals == want])


def test_sparse_flatnonzero_gives_numpys_positions_at_any_length_and_density():
    # The band search finds its entries word by word (8 flags at a time) where few are
    # set: the same positions, in the same order and dtype, as np.flatnonzero, for lengths
    # that are and are not multiples of 8, a misaligned start, and densities from none to
    # all (a quarter of the words or more goes to numpy's own).
    rng = np.random.default_rng(7)
    buffer = np.zeros(600_000, dtype=np.bool_)
    for n in (0, 1, 7, 8, 9, 63, 64, 65, 1000, 524_288, 524_291):
        for density in (0.0, 0.0005, 0.01, 0.024, 0.1, 0.5, 1.0):
            for start in (0, 3):
                h = buffer[start:start + n]
                h[:] = rng.random(n) < density
                got = sparsify._flatnonzero_sparse(h)
                want = np.flatnonzero(h)
                assert got.dtype == want.dtype and np.array_equal(got, want), (n, density, start)
    h = np.zeros(1003, dtype=np.bool_)
    h[[5, 640, 1001]] = True  # one in a word, and one past the last whole word
    assert sparsify._flatnonzero_sparse(h).tolist() == [5, 640, 1001]
