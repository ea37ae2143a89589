"""Sparsifying kernels: magnitude trim/prune, TIES merging and DARE random drop."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from tvrecipe.ops import parallel
from tvrecipe.ops.arithmetic import divide
from tvrecipe.ops.arithmetic import sum as weighted_sum

__all__ = ["dare", "derive_seed", "prune", "ties", "trim", "trim_mask"]

_MAJORITIES = ("total", "count")

# Elementwise work on CPU is done in chunks of this many entries so that the temporaries
# (|x|, masks, per-input trimmed chunks, accumulators) stay in the last-level cache instead
# of each costing a full trip to DRAM; on CUDA launch overhead dominates instead, so chunks
# are only there to bound the memory of the per-input buffers.
_CPU_CHUNK = 1 << 18
_CUDA_CHUNK = 1 << 24
_SCAN_CHUNK = 1 << 19  # the threshold search's chunks (entries)

# Threshold search: tensors up to this size go straight to an exact kthvalue; larger ones
# take the two-level radix search of _kth_largest_abs.
_DIRECT_MAX = 1 << 14
# A float's bit pattern read as a signed integer of its width orders the non-negative
# floats as their values: |x| is the pattern with its sign bit cleared, and the k-th
# largest magnitude is the k-th largest of those integers (NaN patterns sort above inf,
# as torch sorts NaN).
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.float32: torch.int32, torch.float64: torch.int64}
_KEY_BITS = 15  # the first level counts the top 15 magnitude bits: 32768 bins
# The band search of float32 CPU tensors (_kth_in_band): a sample of runs of _SAMPLE_RUN
# entries (a cache line) every _SAMPLE_PERIOD entries (a prime, so that the runs drift across
# the columns of any matrix rather than sample the same ones in every row), and a band that
# holds the sample's k-th largest with a margin of _SAMPLE_SDS binomial standard deviations
# (plus _SAMPLE_SLACK entries).
_SAMPLE_RUN = 16
_SAMPLE_PERIOD = 131
_SAMPLE_SDS = 8.0
_SAMPLE_SLACK = 32

_MASK63 = (1 << 63) - 1


# --------------------------------------------------------------------------------------
# Parameter checks


def _check_density(density: object, op: str) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{op}: density must be a number in (0, 1], got {density!r}")
    d = float(density)
    if not (0.0 < d <= 1.0):  # also rejects NaN
        raise ValueError(f"{op}: density must be in (0, 1], got {density!r}")
    return d


def _check_float_tensor(x: object, op: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def _num_kept(density: float, numel: int) -> int:
    """k = max(1, floor(density * numel)): mergekit's (and peft's) trim count.

    ``int`` of the float product, exactly as mergekit computes it (so 0.29 * 100 =
    28.999999999999996 keeps 28), so that a tvrecipe trim keeps the same number of entries
    as a mergekit ``ties`` merge of the same density.
    """
    return min(numel, max(1, int(density * numel)))


def _chunk_size(device: torch.device) -> int:
    return _CUDA_CHUNK if device.type == "cuda" else _CPU_CHUNK


# --------------------------------------------------------------------------------------
# Exact top-k selection by magnitude


@dataclass(frozen=True)
class _Selection:
    """Exact description of the top-k set of one flat tensor.

    thr: the k-th largest magnitude; n_gt / n_ge: how many entries have |x| > thr / >= thr
    (n_gt < k <= n_ge). ``cut``: the flat index from which entries with |x| == thr lose
    the tie-break (the k - n_gt tied entries before it are kept); None when there is no tie
    to break.
    """

    thr: float
    n_gt: int
    n_ge: int
    cut: int | None


class _Trim(NamedTuple):
    """How to trim with hardshrink (which keeps |x| > λ): λ = ``head`` (just below thr, so
    |x| >= thr is kept) before flat index ``cut``, λ = ``tail`` (thr itself) from it on."""

    head: float
    cut: int | None
    tail: float


_NP_FLOATS = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def _below(t: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` below the positive ``t`` (so |v| > result <=> |v| >= t),
    ``t`` being a value of ``dtype``: the bit pattern one less (numpy's, not torch's: one
    call a search, and every call holds the GIL)."""
    if dtype == torch.bfloat16:  # the upper half of a float32's bits
        bits = np.array(t, dtype=np.float32).view(np.uint32) >> 16
        return ((bits - 1) << 16).astype(np.uint32).view(np.float32).item()
    as_float = _NP_FLOATS[dtype]
    bits = np.array(t, dtype=as_float).view(f"u{dtype.itemsize}")
    return (bits - 1).astype(bits.dtype).view(as_float).item()


def _kth_direct(v: torch.Tensor, k: int) -> tuple[float, int, int, torch.Tensor]:
    a = v.abs()
    thr_t = torch.kthvalue(a, a.numel() - k + 1).values
    n_gt = a.numel() - int(torch.count_nonzero(a <= thr_t))  # a NaN counts as greater
    ties = torch.nonzero(a == thr_t).squeeze(1)
    return thr_t.item(), n_gt, n_gt + ties.numel(), ties


def _kth_largest_abs(v: torch.Tensor, k: int) -> tuple[float, int, int, torch.Tensor]:
    """(t, #|v| > t, #|v| >= t, P) for t the k-th largest |v| of the flat tensor v, exactly,
    and P the increasing flat positions of the entries with |v| == t.

    A two-level radix search on the magnitudes' bit patterns (see _BITS), in chunks that
    stay in cache: one pass counts the top 15 bits of every magnitude (a bincount), which
    names the bucket holding the k-th largest and how many entries lie above it; a second
    pass extracts the bucket's entries (bits and positions; about 1% of a task vector) and
    an exact kthvalue among them finishes. Float32 tensors on the CPU first try
    :func:`_kth_in_band`, one pass instead of two, with the same answer. The positions of
    the tied entries come for free (data derived from bf16 weights ties at the threshold in
    most tensors).
    """
    n = v.numel()
    if n <= _DIRECT_MAX or v.dtype not in _BITS:
        return _kth_direct(v, k)
    if v.dtype == torch.float32 and v.device.type == "cpu":
        found = _kth_in_band(v, k)
        if found is not None:
            return found
    itype = _BITS[v.dtype]
    width = v.element_size() * 8
    magnitude = (1 << (width - 1)) - 1  # every bit but the sign
    shift = width - 1 - _KEY_BITS
    ints = v.view(itype)
    c = min(_SCAN_CHUNK if v.device.type == "cpu" else _CUDA_CHUNK, n)
    mags = torch.empty(c, dtype=itype, device=v.device)
    keys = torch.empty(c, dtype=itype, device=v.device)
    hit = torch.empty(c, dtype=torch.bool, device=v.device)

    def chunks() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for s in range(0, n, c):
            L = min(c, n - s)
            m, key = mags[:L], keys[:L]
            torch.bitwise_and(ints[s : s + L], magnitude, out=m)
            torch.bitwise_right_shift(m, shift, out=key)
            yield s, m, key

    bins = 1 << _KEY_BITS
    hist = torch.zeros(bins, dtype=torch.int64, device=v.device)
    for _s, _m, key in chunks():
        hist += torch.bincount(key, minlength=bins)
    # from_top[j]: entries in the j + 1 highest buckets; the k-th largest is in the first
    # bucket where that reaches k.
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, k))
    bucket = bins - 1 - j
    n_above = int(from_top[j - 1]) if j else 0
    # (numpy's comparison and nonzero are ~4x torch's on the CPU)
    in_bucket = _in_bucket_numpy if v.device.type == "cpu" else _in_bucket_torch
    parts, positions = [], []
    for s, m, key in chunks():
        vals, pos = in_bucket(m, key, bucket, hit[: m.numel()])
        parts.append(vals)
        positions.append(pos.add_(s))
    return _kth_among(torch.cat(parts), torch.cat(positions), n_above, k, v.dtype)


def _in_bucket_numpy(m: torch.Tensor, key: torch.Tensor, bucket: int, hit: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of chunk ``m`` whose ``key`` is ``bucket``, and their offsets in it
    (``hit``: a bool buffer of the chunk's size), with numpy: CPU tensors only."""
    h = hit.numpy()
    np.equal(key.numpy(), bucket, out=h)
    where = _flatnonzero_sparse(h)
    return torch.from_numpy(m.numpy()[where]), torch.from_numpy(where)


def _in_bucket_torch(m: torch.Tensor, key: torch.Tensor, bucket: int, hit: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_in_bucket_numpy` on any device (a GPU's)."""
    torch.eq(key, bucket, out=hit)
    where = torch.nonzero(hit).squeeze(1)
    return m[where], where


def _kth_among(vals: torch.Tensor, pos: torch.Tensor, above: int, k: int,
               dtype: torch.dtype) -> tuple[float, int, int, torch.Tensor]:
    """:func:`_kth_largest_abs`'s answer from the magnitude bits ``vals`` (at flat positions
    ``pos``, increasing) of a range of magnitudes with ``above`` entries above it, which
    holds the k-th largest: an exact selection among them."""
    rank = k - above  # from the top, inside the range: 1 <= rank <= vals.numel()
    among = _among_numpy if vals.device.type == "cpu" else _among_torch
    bits, n_gt, ties = among(vals, pos, vals.numel() - rank)
    n_gt += above
    return bits.view(dtype).item(), n_gt, n_gt + ties.numel(), ties


def _among_numpy(vals: torch.Tensor, pos: torch.Tensor, at: int
                 ) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The ``at``-th smallest of ``vals`` (one-element tensor of its bits), how many are
    larger, and the positions of those equal to it: numpy's selection and comparisons, a
    third of torch's time on the CPU (they were a fifth of a TIES search there)."""
    v = vals.numpy()
    t = np.partition(v, at)[at]
    ties = torch.from_numpy(pos.numpy()[v == t])
    return torch.from_numpy(np.array([t], dtype=v.dtype)), int(np.count_nonzero(v > t)), ties


def _among_torch(vals: torch.Tensor, pos: torch.Tensor, at: int
                 ) -> tuple[torch.Tensor, int, torch.Tensor]:
    """:func:`_among_numpy` on any device (a GPU's)."""
    t = torch.kthvalue(vals, at + 1).values.reshape(1)
    return t, int(torch.count_nonzero(vals > t)), pos[vals == t]


def _kth_in_band(v: torch.Tensor, k: int) -> tuple[float, int, int, torch.Tensor] | None:
    """:func:`_kth_largest_abs` of a float32 CPU tensor in one pass over it, or None.

    A sample (16 entries in every 131, a cache line at a time) names a band of 15-bit magnitude buckets
    that should hold the k-th largest: from the bucket of the sample's (k - margin)-th
    largest to that of its (k + margin)-th, the margin 8 binomial standard deviations.
    One pass then counts the entries above the band and extracts the band's (bits and
    positions, about 1% of a task vector at density 0.2). When the k-th largest lies in
    the band (more than k - 1 entries at or above its bottom, fewer than k above its top)
    the answer is exact, as the radix search's; when it does not (a sample unlike the rest
    of the tensor) this returns None and the radix search runs. The sample only decides
    the cost, never the answer. Comparisons and extraction run in numpy, several times
    faster than torch's on the CPU.
    """
    if not v.is_contiguous():  # (the sample reads the storage as laid out flat)
        return None
    n = v.numel()
    runs = (n - _SAMPLE_RUN) // _SAMPLE_PERIOD + 1
    ints = v.view(torch.int32)
    magnitude = (1 << 31) - 1
    shift = 31 - _KEY_BITS
    bins = 1 << _KEY_BITS
    sample = torch.bitwise_and(ints.as_strided((runs, _SAMPLE_RUN), (_SAMPLE_PERIOD, 1)),
                               magnitude)
    ns = sample.numel()
    hist = torch.bincount(sample.view(-1).bitwise_right_shift_(shift), minlength=bins)
    from_top = hist.flip(0).cumsum(0)  # entries of the sample in the j + 1 highest buckets
    p = k / n
    margin = _SAMPLE_SDS * math.sqrt(ns * p * (1.0 - p)) + _SAMPLE_SLACK
    top_rank = max(1, int(ns * p - margin))
    bottom_rank = min(ns, int(ns * p + margin) + 1)
    top = bins - 1 - int(torch.searchsorted(from_top, top_rank))
    bottom = bins - 1 - int(torch.searchsorted(from_top, bottom_rank))
    lo = bottom << shift  # band: lo <= magnitude bits < hi
    hi = (top + 1) << shift if top < bins - 1 else magnitude + 1
    c = min(_SCAN_CHUNK, n)
    mags = np.empty(c, dtype=np.int32)
    rel = np.empty(c, dtype=np.int32)
    hit = np.empty(c, dtype=np.bool_)
    bits = ints.numpy()
    above = 0
    parts, positions = [], []
    for s in range(0, n, c):
        L = min(c, n - s)
        m, r, h = (mags, rel, hit) if L == c else (mags[:L], rel[:L], hit[:L])
        np.bitwise_and(bits[s : s + L], magnitude, out=m)
        np.subtract(m, lo, out=r)  # no overflow: both lie in [0, 2**31)
        np.greater_equal(r, hi - lo, out=h)
        above += int(np.count_nonzero(h))
        np.less(r.view(np.uint32), hi - lo, out=h)  # below the band wraps to >= 2**31
        where = _flatnonzero_sparse(h)
        parts.append(m[where])
        positions.append(where + s)
    vals = torch.from_numpy(np.concatenate(parts))
    if not above < k <= above + vals.numel():
        return None
    return _kth_among(vals, torch.from_numpy(np.concatenate(positions)), above, k,
                      torch.float32)


def _flatnonzero_sparse(h: np.ndarray) -> np.ndarray:
    """``np.flatnonzero(h)`` of a contiguous bool array, faster when few entries are set
    (the band search's band, or the radix search's bucket, holds 1-2.4% of a chunk's
    entries): the words of 8 entries
    that hold any, then the entries within those words. 0.10 against 0.22 ms for 512K
    entries 1% set (numpy's nonzero of a bool array scans entry by entry, of a compared
    one word by word). Where a quarter of the words or more hold one, numpy's own."""
    # (Methods, not numpy's Python wrappers: each call is held under the GIL.)
    full = h.size // 8 * 8
    words = h[:full].view(np.uint64)
    held = (words != 0).nonzero()[0]  # (words.nonzero() itself is 4x slower)
    if 4 * held.size >= words.size:
        return h.nonzero()[0]
    at = words[held].view(np.bool_).nonzero()[0]
    where = held[at >> 3]
    where <<= 3
    where |= at & 7
    if full < h.size:
        where = np.concatenate([where, full + h[full:].nonzero()[0]])
    return where


def _select(xf: torch.Tensor, k: int, *, zero_ties: bool) -> _Selection:
    """Exact top-k of the flat tensor ``xf`` by magnitude, ties broken by flat index.

    With ``zero_ties=False`` a tie among zeros (thr == 0) is not broken: keeping or
    dropping a zero does not change any value.
    """
    n = xf.numel()
    if k >= n:
        return _Selection(thr=0.0, n_gt=0, n_ge=n, cut=None)
    thr, n_gt, n_ge, ties = _kth_largest_abs(xf, k)
    cut = None
    if n_ge > k > n_gt and (thr > 0.0 or zero_ties):  # (n_gt >= k: a NaN threshold)
        # Several entries equal the threshold (usual for data derived from bf16): keep
        # the first (k - n_gt) of them in flat order, drop those from the next one on.
        cut = int(ties[k - n_gt - 1]) + 1
    return _Selection(thr=thr, n_gt=n_gt, n_ge=n_ge, cut=cut)


def _selected(xf: torch.Tensor, sel: _Selection) -> torch.Tensor:
    """The bool mask of the entries ``sel`` keeps (|x| >= thr, but |x| > thr from the cut).

    Written as "not below" so that a NaN (allowed with ``--allow-nonfinite``) is kept, as
    the search ranks it (above +inf) and as :func:`_apply_selection` keeps it.
    """
    a = xf.abs()
    mask = a < sel.thr
    if sel.cut is not None:
        torch.le(a[sel.cut :], sel.thr, out=mask[sel.cut :])
    return mask.logical_not_()


def _trim_plan(sel: _Selection, dtype: torch.dtype) -> _Trim | None:
    """The hardshrink plan equivalent to ``sel``; None keeps everything (thr == 0)."""
    if sel.thr <= 0.0:
        return None
    return _Trim(_below(sel.thr, dtype), sel.cut, sel.thr)


def _apply_selection(xc: torch.Tensor, plan: _Trim | None, start: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Trimmed copy of the flat chunk ``xc`` that starts at flat index ``start``
    (into ``out`` when given)."""
    if plan is None:
        return xc.clone() if out is None else out.copy_(xc)
    if out is None:
        out = torch.empty_like(xc)
    n = xc.numel()
    head = n if plan.cut is None else min(max(plan.cut - start, 0), n)
    # hardshrink is a single float->float pass; where()/mul with a bool mask is several
    # times slower on CPU. (Most chunks lie wholly on one side of the cut: one call.)
    if head == n or head == 0:
        return torch.hardshrink(xc, plan.head if head else plan.tail, out=out)
    torch.hardshrink(xc[:head], plan.head, out=out[:head])
    torch.hardshrink(xc[head:], plan.tail, out=out[head:])
    return out


def trim(x: torch.Tensor, *, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries of largest magnitude, zero the rest.

    Exactly k = max(1, int(density * numel)) entries are kept (the float product rounded
    down, as mergekit and peft count). Tie rule: with t the k-th largest |x|, every entry with
    |x| > t is kept, and among the entries with |x| == t those with the lowest flat
    (row-major) index are kept until exactly k are kept. When t == 0 all entries are
    returned unchanged (the dropped ones would be zeros anyway). Inputs are finite unless
    the run passed ``--allow-nonfinite``; then a NaN ranks above +inf (as in mergekit's
    descending sort), and if the k-th largest is itself a NaN every entry is kept.

    Args:
        x: A floating-point tensor (not modified).
        density: Fraction of entries to keep, in (0, 1].

    Returns:
        A new tensor of x's shape, dtype and device.

    Raises:
        ValueError: If density is outside (0, 1].
        TypeError: If x is not a floating-point tensor or density not a number.
    """
    x = _check_float_tensor(x, "trim")
    d = _check_density(density, "trim")
    xf = x.reshape(-1)
    n = xf.numel()
    if n == 0 or d == 1.0:
        return x.clone()
    sel = _select(xf, _num_kept(d, n), zero_ties=False)
    return _apply_selection(xf, _trim_plan(sel, x.dtype), 0).view(x.shape)


def trim_mask(x: torch.Tensor, *, density: float) -> torch.Tensor:
    """Boolean mask of the entries that :func:`trim` keeps, with exactly k True.

    Same selection and tie rule as :func:`trim`, except that a tie at a zero threshold is
    broken too (by lowest flat index), so the mask always has exactly
    k = max(1, int(density * numel)) True entries.

    Args:
        x: A floating-point tensor (not modified).
        density: Fraction of entries to keep, in (0, 1].

    Returns:
        A bool tensor of x's shape on x's device.

    Raises:
        ValueError: If density is outside (0, 1].
        TypeError: If x is not a floating-point tensor or density not a number.
    """
    x = _check_float_tensor(x, "trim_mask")
    d = _check_density(density, "trim_mask")
    xf = x.reshape(-1)
    n = xf.numel()
    if n == 0 or d == 1.0:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    return _selected(xf, _select(xf, _num_kept(d, n), zero_ties=True)).view(x.shape)


def prune(x: torch.Tensor, *, density: float, by: str = "magnitude") -> torch.Tensor:
    """Magnitude pruning: :func:`trim` under the recipe name ``prune``.

    Args:
        x: A floating-point tensor (not modified).
        density: Fraction of entries to keep, in (0, 1].
        by: Selection criterion; only ``"magnitude"`` is supported.

    Returns:
        A new tensor with all but the top-k entries by magnitude set to zero.

    Raises:
        ValueError: On an unknown ``by`` or a density outside (0, 1].
    """
    if by != "magnitude":
        raise ValueError(f"prune: by must be 'magnitude' (the only criterion), got {by!r}")
    _check_float_tensor(x, "prune")
    _check_density(density, "prune")
    return trim(x, density=density)


# --------------------------------------------------------------------------------------
# TIES


def _check_inputs(inputs: Sequence[torch.Tensor], op: str) -> list[torch.Tensor]:
    xs = list(inputs)
    if not xs:
        raise ValueError(f"{op}: needs at least one input, got none")
    first = _check_float_tensor(xs[0], op)
    for i, x in enumerate(xs):
        _check_float_tensor(x, op)
        if x.shape != first.shape or x.dtype != first.dtype or x.device != first.device:
            raise ValueError(
                f"{op}: all inputs must share shape, dtype and device; input 0 is "
                f"{tuple(first.shape)} {first.dtype} {first.device}, input {i} is "
                f"{tuple(x.shape)} {x.dtype} {x.device}"
            )
    return xs


def _check_weights(weights: Sequence[float] | None, n: int, op: str) -> list[float]:
    if weights is None:
        return [1.0] * n
    ws = list(weights)
    if len(ws) != n:
        raise ValueError(f"{op}: got {n} inputs but {len(ws)} weights; give one weight per input")
    out = []
    for w in ws:
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TypeError(f"{op}: weights must be finite numbers, got {w!r}")
        if not math.isfinite(w):
            raise ValueError(f"{op}: weights must be finite numbers, got {w!r}")
        out.append(float(w))
    return out


def ties(
    inputs: Sequence[torch.Tensor],
    *,
    density: float = 1.0,
    weights: Sequence[float] | None = None,
    majority: str = "total",
    normalize: bool = True,
) -> torch.Tensor:
    """TIES merge (Yadav et al., 2023): trim, elect a sign per entry, disjoint merge.

    Each input is trimmed with :func:`trim` (same tie rule). With c_i = w_i * trim(τ_i)
    the contribution of input i at an entry:

    * elect: ``total`` takes γ = sign(Σ_i c_i); ``count`` takes the sign held by more of
      the nonzero c_i, a tie of counts is broken by the ``total`` rule, and if that sum is
      also 0 then γ = 0 and the entry is 0;
    * merge over A = {i : c_i ≠ 0 and sign(c_i) = γ}: Σ_A c_i / Σ_A |w_i| with
      ``normalize`` (the weighted disjoint mean), Σ_A c_i without; 0 where A is empty.

    For non-negative weights this is exactly the formula in methods.md (sign(c_i) is the
    sign of the trimmed entry and Σ_A |w_i| = Σ_A w_i). With a negative weight the sign
    compared is that of the weighted contribution and the normalizer uses |w_i|: Σ_A w_i
    could be 0 (division by zero) or negative (which would flip a negated task back), while
    Σ_A |w_i| > 0 whenever A is non-empty. Inputs with weight 0 take no part (no vote).
    Default weights are all 1.

    Args:
        inputs: Task vectors of one tensor, same shape, dtype and device (not modified).
        density: Fraction of entries each input keeps, in (0, 1].
        weights: One weight per input, or None for all 1.
        majority: ``"total"`` or ``"count"``.
        normalize: Divide by the total |weight| of the agreeing inputs.

    Returns:
        A new tensor with the merged vector, in the inputs' dtype and device.

    Raises:
        ValueError: On empty inputs, inputs of different shape/dtype/device, a weights
            length that differs from the inputs, a non-finite weight, a density outside
            (0, 1] or an unknown majority.
        TypeError: On a non-tensor or non-floating-point input, or a non-numeric weight.
    """
    xs = _check_inputs(inputs, "ties")
    d = _check_density(density, "ties")
    ws = _check_weights(weights, len(xs), "ties")
    if majority not in _MAJORITIES:
        raise ValueError(f"ties: majority must be 'total' or 'count', got {majority!r}")
    shape, dtype, device = xs[0].shape, xs[0].dtype, xs[0].device

    # Inputs with weight 0 contribute c_i = 0 everywhere: skip their trim altogether.
    members = [(x.reshape(-1), w) for x, w in zip(xs, ws) if w != 0.0]
    n = xs[0].numel()
    if not members or n == 0:
        return torch.zeros(shape, dtype=dtype, device=device)

    # Exact thresholds first (one search per input, on the math threads), then a single
    # chunked merge pass in which every input's chunk is trimmed on the fly.
    k = _num_kept(d, n)

    def plan(xf: torch.Tensor) -> _Trim | None:
        return None if k >= n else _trim_plan(_select(xf, k, zero_ties=False), dtype)

    # Each input's threshold, then each range of the (entrywise) merge, on its own thread.
    plans = list(parallel.parallel_map(plan, [xf for xf, _ in members], numel=n, device=device))
    out = torch.empty(n, dtype=dtype, device=device)
    # Ranges of whole chunks, so that every chunk covers the same entries however many
    # ranges there are: on 16-bit floats torch's vector loop and the loop's tail (which
    # moves with a chunk's edges) can give other bits (a NaN's; in float16, some sums).
    c = _chunk_size(device)
    chunks = -(-n // c)
    parts = min(parallel.splits(n, device), chunks)
    bounds = [min(n, chunks * i // parts * c) for i in range(parts + 1)]
    list(parallel.parallel_map(
        lambda i: _ties_merge(members, plans, majority == "count", normalize, out, bounds[i],
                              bounds[i + 1]), range(parts), numel=n, device=device))
    return out.view(shape)


def _ties_merge(
    members: list[tuple[torch.Tensor, float]],
    plans: list[_Trim | None],
    count_votes: bool,
    normalize: bool,
    out: torch.Tensor,
    lo: int,
    hi: int,
) -> None:
    """Elect and disjoint-merge flat inputs over entries [lo, hi) into ``out``, trimming
    each chunk by its plan. No weight may be 0 (:func:`ties` drops such members): the
    clamp of the denominator to the smallest |w| relies on it, as does the choice of γ or
    -γ per member."""
    xf0 = members[0][0]
    dtype, device = xf0.dtype, xf0.device
    c = max(1, min(_chunk_size(device), hi - lo))

    def buf() -> torch.Tensor:
        return torch.empty(c, dtype=dtype, device=device)

    # Per-chunk working set: the trimmed chunks of every input, rows of one stack (read by
    # both sweeps), and a few accumulators; never an n_inputs x numel stack.
    trimmed_ones = [j for j, plan in enumerate(plans) if plan is not None]
    row_of = {j: r for r, j in enumerate(trimmed_ones)}  # (member -> its row)
    stack = torch.empty((len(trimmed_ones), c), dtype=dtype, device=device)
    full_rows = stack.unbind(0)
    any_negative = any(w < 0 for _, w in members)
    # The second sweep's way (see there).
    at_once = len(trimmed_ones) == len(members) and not any_negative
    # total, gamma, num, tmp, votes, den, -gamma (the last three only when used)
    work = [buf(), buf(), buf(), buf(), buf() if count_votes else None,
            buf() if normalize else None, buf() if any_negative else None]
    # A nonempty agreeing set has den >= the smallest |w| (a sum of positive terms never
    # rounds below one of them), so clamping to it only changes den == 0, where num == 0.
    abs_w = [abs(w) for _, w in members]
    min_abs_w = min(abs_w)
    # The default weights; the counts then add exactly, to 256 in any float dtype.
    unit = all(a == 1.0 for a in abs_w) and len(members) <= 256
    # Every view a chunk needs, made up front: on the CPU each Python call costs microseconds
    # held under the GIL (more once a chunk's data has pushed the interpreter out of cache),
    # and the math threads share that one lock (see ops/parallel.py).
    ins = [xf[lo:hi].split(c) for xf, _ in members]
    outs = out[lo:hi].split(c)

    for i, oc in enumerate(outs):
        s = lo + i * c
        L = oc.numel()
        tot, gam, nu, tm, vo, den, neg_gamma = (
            work if L == c else [None if b is None else b[:L] for b in work])
        trimmed = stack if L == c else stack[:, :L]
        rs = full_rows if L == c else trimmed.unbind(0)
        # Sweep 1: trim each input's chunk into its row and gather what the election needs.
        chunks = []
        for j, ((_, w), plan) in enumerate(zip(members, plans)):
            tj = ins[j][i]  # (an input with nothing to trim is read in place)
            if plan is not None:
                tj = _apply_selection(tj, plan, s, out=rs[row_of[j]])
            chunks.append(tj)
            if j == 0:
                torch.mul(tj, w, out=tot)
            else:
                tot.add_(tj, alpha=w)
            if vo is not None:
                # sign(c_i) = sign(w_i) * sign(τ̂_i)
                if j == 0:
                    torch.sign(tj, out=vo)
                    if w < 0:
                        vo.neg_()
                else:
                    torch.sign(tj, out=tm)
                    vo.add_(tm, alpha=1.0 if w > 0 else -1.0)
        if vo is None:
            torch.sign(tot, out=gam)
        else:
            # Vote counts are integers, so |2*votes| >= 2 beats |sign(total)| <= 1 except
            # when the vote is tied, where sign(total) decides (and 0 stays 0).
            torch.sign(tot, out=tm)
            vo.mul_(2.0).add_(tm)
            torch.sign(vo, out=gam)
        # Sweep 2: γ·sign(w_i)·τ̂_i is > 0 exactly on A; kept where positive, it is |τ̂_i| on
        # A and 0 elsewhere. Sum |c_i| and |w_i| over A: every term is non-negative, so there
        # is no cancellation between the two sides.
        if at_once:
            # Every input trimmed into the stack (not read again), no negative weight: one
            # call for all of them (16 fewer calls a chunk for 8 inputs).
            torch.mul(trimmed, gam, out=trimmed)
            trimmed.relu_()
            weighted_sum(rs, weights=abs_w, out=nu)
            if den is not None:
                trimmed.sign_()  # 1 on A, else 0 (sign(NaN) is 0)
                if unit:  # (a sum of at most 256 0s and 1s is exact in any order)
                    torch.sum(trimmed, dim=0, out=den)
                else:
                    weighted_sum(rs, weights=abs_w, out=den)
        else:
            # One input at a time, through a buffer of one chunk: an input read in place
            # must not be written, and -γ·τ̂_i, not -(γ·τ̂_i), which could differ in a NaN's
            # sign bit. (A density of 1 is this way: a stack that only copied the inputs ran
            # its sweeps a third slower.)
            if neg_gamma is not None:
                torch.neg(gam, out=neg_gamma)
            for j, (tj, (_, w)) in enumerate(zip(chunks, members)):
                torch.mul(tj, gam if w > 0 else neg_gamma, out=tm)
                tm.relu_()
                if j == 0:
                    torch.mul(tm, abs(w), out=nu)
                else:
                    nu.add_(tm, alpha=abs(w))
                if den is not None:
                    tm.sign_()
                    if j == 0:
                        torch.mul(tm, abs(w), out=den)
                    else:
                        den.add_(tm, alpha=abs(w))
        torch.mul(nu, gam, out=oc)
        if den is not None:
            oc.div_(den.clamp_(min=min_abs_w))


# --------------------------------------------------------------------------------------
# DARE


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (e.g. recipe seed, step, member, tensor name).

    The parts are written as canonical JSON (tuples as lists, mapping keys sorted) and
    hashed with SHA-256; the seed is the first 8 bytes of the digest, big-endian, with the
    top bit cleared. It depends only on the values, never on the process (no ``hash()``),
    the order of execution or the device.

    Args:
        *parts: str, int, float, bool or None values, or lists/tuples/dicts of them.

    Returns:
        An int in [0, 2**63).

    Raises:
        TypeError: If a part is not JSON-serialisable.
    """
    text = json.dumps(list(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & _MASK63


def dare(x: torch.Tensor, *, density: float, rescale: bool = True, seed: int | None = None,
         draw: torch.Tensor | None = None) -> torch.Tensor:
    """DARE (Yu et al., 2024): drop each entry with probability 1 - density.

    The keep mask is ``torch.rand(x.shape) < density`` drawn in float32 on the CPU from
    ``torch.Generator().manual_seed(seed)``, then moved to x's device, so the same seed
    gives the same bytes on every device and in every process. Kept entries are divided
    by density when ``rescale`` (so E[dare(x)] = x); dropped entries and kept zeros are
    +0.0. density 1 returns an exact copy.

    Args:
        x: A floating-point tensor (not modified).
        density: Keep probability p, in (0, 1].
        rescale: Divide kept entries by p.
        seed: Generator seed in [0, 2**64), e.g. from :func:`derive_seed`.
        draw: Instead of ``seed``: the float32 uniform draws themselves, of x's shape (a
            row block's share of the whole tensor's draws, see ``TensorContext.uniform``);
            overwritten (the mask is computed in place).

    Returns:
        A new tensor of x's shape, dtype and device.

    Raises:
        ValueError: If density is outside (0, 1] or seed is outside [0, 2**64).
        TypeError: If x is not a floating-point tensor or seed is not an int.
    """
    x = _check_float_tensor(x, "dare")
    p = _check_density(density, "dare")
    if draw is None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"dare: seed must be an int in [0, 2**64), got {seed!r}")
        if not (0 <= seed < 1 << 64):
            raise ValueError(f"dare: seed must be an int in [0, 2**64), got {seed!r}")
    elif draw.shape != x.shape or draw.dtype != torch.float32:
        raise ValueError(f"dare: draw must be float32 of x's shape {tuple(x.shape)}, got "
                         f"{draw.dtype} {tuple(draw.shape)}")
    if p == 1.0:
        return x.clone()
    if draw is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        draw = torch.rand(x.shape, generator=gen, dtype=torch.float32)
    # The mask as exact 0.0/1.0 floats, without a bool tensor (a masked fill with a random
    # bool mask costs ~6x more on CPU): in float32, p - r > 0 exactly when r < p (the
    # difference of two distinct floats is never 0), so sign(relu(p - r)) is [r < p].
    # In place: -r + p is the same float as p - r.
    # On x's device (exact float32 operations: the same mask on every device).
    keep = draw.to(x.device).neg_().add_(p).relu_().sign_().to(x.dtype)
    out = divide(x, p) if rescale else x.clone()
    # x * 0 is -0.0 for negative x: adding +0.0 makes every zero +0.0.
    return out.mul_(keep).add_(0.0)
