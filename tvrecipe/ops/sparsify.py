"""Sparsifying kernels: magnitude trim/prune, TIES merging and DARE random drop."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tvrecipe.ops import parallel

__all__ = ["dare", "derive_seed", "prune", "ties", "trim", "trim_mask"]

_MAJORITIES = ("total", "count")

# Elementwise work on CPU is done in chunks of this many entries so that the temporaries
# (|x|, masks, per-input trimmed chunks, accumulators) stay in the last-level cache instead
# of each costing a full trip to DRAM; on CUDA launch overhead dominates instead, so chunks
# are only there to bound the memory of the per-input buffers.
_CPU_CHUNK = 1 << 18
_CUDA_CHUNK = 1 << 24
_SCAN_CHUNK = 1 << 19  # the threshold scan keeps fewer temporaries per entry

# Threshold search: tensors up to this size go straight to an exact kthvalue; larger ones
# estimate the threshold from a random sample, then select exactly inside a narrow band.
_DIRECT_MAX = 1 << 14
# Sample size: n / 128 entries, within [1024, 65536]. Larger samples narrow the band but
# cost two kthvalues on the sample; n / 128 was the fastest on 0.25M-3M entry tensors of
# bf16-derived task vectors (15-20% faster than n / 256, one thread), and equal at 33M.
_SAMPLE_SIZE = 1 << 16
_SAMPLE_MIN = 1 << 10
_SAMPLE_DIV = 128
# Fixed seed of the sample: the result never depends on it (the selection is exact), only
# the speed does, and a fixed seed keeps even the speed reproducible.
_SAMPLE_SEED = 0x7E5EED
# Half-width of the band in sample ranks, in standard deviations of the sample quantile:
# at 4 sigma a fallback to the full kthvalue (exact, ~10x slower) is a 1-in-10^4 event.
_BAND_SIGMAS = 4.0

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
    (n_gt < k <= n_ge). ``drop`` (sorted flat indices) lists the entries with |x| == thr
    that lose the tie-break; None when there is no tie to break.
    """

    thr: float
    n_gt: int
    n_ge: int
    drop: torch.Tensor | None


def _below(t: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` below the positive ``t`` (so |v| > result <=> |v| >= t)."""
    tt = torch.tensor(t, dtype=dtype)
    return torch.nextafter(tt, torch.zeros((), dtype=dtype)).item()


def _kth_direct(a: torch.Tensor, k: int) -> tuple[float, int, int, None]:
    n = a.numel()
    thr_t = torch.kthvalue(a, n - k + 1).values
    n_gt = int(torch.count_nonzero(a > thr_t))
    n_ge = int(torch.count_nonzero(a >= thr_t))
    return thr_t.item(), n_gt, n_ge, None


def _compress(values: torch.Tensor, mask: torch.Tensor, start: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``values[mask]`` for a sparse mask, faster on CPU than boolean indexing.

    With ``start``, also the flat positions of the selected entries (``start`` + their
    index in the chunk), in increasing order; else None.
    """
    n = mask.numel()
    if mask.device.type != "cpu" or n % 8 != 0:
        where = torch.nonzero(mask).squeeze(1)
        return values[where], (None if start is None else where + start)
    # Scan the mask 8 bytes at a time (as int64 words): only the words that hold a set
    # byte are expanded, which for a ~1% band is a small fraction of the chunk.
    words = torch.nonzero(mask.view(torch.int64)).squeeze(1)
    vals = torch.index_select(values.view(-1, 8), 0, words).view(-1)
    hits = torch.index_select(mask.view(-1, 8), 0, words).view(-1)
    sel = torch.nonzero(hits).squeeze(1)
    if start is None:
        return vals[sel], None
    return vals[sel], words[sel // 8] * 8 + sel % 8 + start


def _kth_largest_abs(v: torch.Tensor, k: int, *, ties: bool = False
                     ) -> tuple[float, int, int, torch.Tensor | None]:
    """(t, #|v| > t, #|v| >= t, P) for t the k-th largest |v| of the flat tensor v, exactly.

    kthvalue is exact but slow on CPU (a single-threaded quickselect, ~25 ns an entry), so
    large inputs first narrow the search: a random sample places a band [lo, hi] of
    magnitudes around the target rank, one streaming pass counts the entries above the
    band and extracts the band (~1% of the entries), and the search recurses on the band.
    If the band misses the target (a 4-sigma event) the exact kthvalue is used.

    With ``ties``, P is the increasing flat positions of the entries with |v| == t when
    t > 0 and the band found it (they all lie in the band, whose positions the scan keeps
    at little cost); else None, and the caller finds them with a full pass. Data derived
    from bf16 weights ties at the threshold in most tensors, so this path matters.
    """
    n = v.numel()
    if n <= _DIRECT_MAX:
        return _kth_direct(v.abs(), k)
    m = min(_SAMPLE_SIZE, max(n // _SAMPLE_DIV, _SAMPLE_MIN))
    gen = torch.Generator().manual_seed(_SAMPLE_SEED)
    idx = torch.randint(n, (m,), generator=gen).to(v.device)
    sample = torch.index_select(v, 0, idx).abs_()
    # Fraction of entries below the threshold, and its position among the sample ranks.
    q = (n - k) / n
    centre = q * m
    half = _BAND_SIGMAS * math.sqrt(m * q * (1.0 - q)) + 8.0
    r_lo = math.floor(centre - half)
    r_hi = math.ceil(centre + half)
    lo = torch.kthvalue(sample, r_lo + 1).values.item() if r_lo >= 0 else 0.0
    hi = torch.kthvalue(sample, r_hi + 1).values.item() if r_hi < m else math.inf

    # One streaming pass: count entries strictly above the band and collect the band's
    # values. With lo == 0 the zeros are left out of the band (there may be very many),
    # so they are accounted for as "everything not counted". Float comparisons into a
    # bool tensor are not vectorised on CPU (~5x slower than a float op), so the masks are
    # built from hardshrink (|v| > λ keeps v) and a float->bool copy (nonzero -> True).
    lam_lo = _below(lo, v.dtype) if lo > 0.0 else 0.0  # |v| > lam_lo  <=>  |v| >= lo
    c = min(_SCAN_CHUNK if v.device.type == "cpu" else _CUDA_CHUNK, n)
    hi_part = torch.empty(c, dtype=v.dtype, device=v.device)
    band_part = torch.empty(c, dtype=v.dtype, device=v.device)
    above = torch.empty(c, dtype=torch.bool, device=v.device)
    band = torch.empty(c, dtype=torch.bool, device=v.device)
    n_above_t = torch.zeros((), dtype=torch.int64, device=v.device)
    parts, positions = [], []
    for s in range(0, n, c):
        L = min(c, n - s)
        vc, hp, bp, ab, bd = v[s : s + L], hi_part[:L], band_part[:L], above[:L], band[:L]
        torch.ops.aten.hardshrink.out(vc, hi, out=hp)  # v where |v| > hi
        torch.ops.aten.hardshrink.out(vc, lam_lo, out=bp)  # v where |v| >= lo
        bp.sub_(hp)  # v where lo <= |v| <= hi (exactly: v - v = 0 and v - 0 = v)
        ab.copy_(hp)
        n_above_t += torch.count_nonzero(ab)
        bd.copy_(bp)
        vals, pos = _compress(bp, bd, s if ties else None)
        parts.append(vals)
        positions.append(pos)
    n_above = int(n_above_t)
    band_vals = torch.cat(parts).abs_()
    nb = band_vals.numel()
    rank = k - n_above  # rank from the top inside the band
    if rank <= 0 or (rank > nb and lo > 0.0) or nb > n // 2:
        # Missed the target, or massive ties made the band useless: exact full search.
        return _kth_direct(v.abs(), k)
    if rank > nb:
        # Fewer than k nonzero entries: the k-th largest magnitude is 0.
        return 0.0, n_above + nb, n, None
    if lo == hi:
        # The whole band is one tied value (heavily quantised data): it is the threshold.
        thr, b_gt, b_ge = lo, 0, nb
    else:
        thr, b_gt, b_ge, _ = _kth_largest_abs(band_vals, rank)
    tie_pos = None
    if ties and thr > 0.0:
        tie_pos = torch.cat(positions)[band_vals == thr]
    return thr, n_above + b_gt, n_above + b_ge, tie_pos


def _select(xf: torch.Tensor, k: int, *, zero_ties: bool) -> _Selection:
    """Exact top-k of the flat tensor ``xf`` by magnitude, ties broken by flat index.

    With ``zero_ties=False`` a tie among zeros (thr == 0) is not broken: keeping or
    dropping a zero does not change any value, and skipping it saves a pass.
    """
    n = xf.numel()
    if k >= n:
        return _Selection(thr=0.0, n_gt=0, n_ge=n, drop=None)
    thr, n_gt, n_ge, tie_pos = _kth_largest_abs(xf, k, ties=True)
    drop = None
    if n_ge > k and (thr > 0.0 or zero_ties):
        # Several entries equal the threshold (usual for data derived from bf16): keep
        # the first (k - n_gt) of them in flat order.
        if tie_pos is None:
            tie_pos = torch.nonzero(xf.abs() == thr).squeeze(1)
        drop = tie_pos[k - n_gt :]
    return _Selection(thr=thr, n_gt=n_gt, n_ge=n_ge, drop=drop)


def _shrink_lambda(sel: _Selection, dtype: torch.dtype) -> float | None:
    """λ for hardshrink (keeps |x| > λ) equivalent to |x| >= thr; None keeps everything."""
    if sel.thr <= 0.0:
        return None
    return _below(sel.thr, dtype)


def _apply_selection(
    xc: torch.Tensor, lam: float | None, drop: torch.Tensor | None, start: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Trimmed copy of the flat chunk ``xc`` that starts at flat index ``start``
    (into ``out`` when given)."""
    if lam is None:
        return xc.clone() if out is None else out.copy_(xc)
    # hardshrink is a single float->float pass; where()/mul with a bool mask is several
    # times slower on CPU.
    if out is None:
        out = F.hardshrink(xc, lam)
    else:
        torch.ops.aten.hardshrink.out(xc, lam, out=out)
    if drop is not None:
        end = start + xc.numel()
        i0 = int(torch.searchsorted(drop, start))
        i1 = int(torch.searchsorted(drop, end))
        if i1 > i0:
            out[drop[i0:i1] - start] = 0
    return out


def trim(x: torch.Tensor, *, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries of largest magnitude, zero the rest.

    Exactly k = max(1, int(density * numel)) entries are kept (the float product rounded
    down, as mergekit and peft count). Tie rule: with t the k-th largest |x|, every entry with
    |x| > t is kept, and among the entries with |x| == t those with the lowest flat
    (row-major) index are kept until exactly k are kept. When t == 0 all entries are
    returned unchanged (the dropped ones would be zeros anyway). Inputs must be finite.

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
    lam = _shrink_lambda(sel, x.dtype)
    return _apply_selection(xf, lam, sel.drop, 0).view(x.shape)


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
    sel = _select(xf, _num_kept(d, n), zero_ties=True)
    mask = xf.abs() >= sel.thr
    if sel.drop is not None:
        mask[sel.drop] = False
    return mask.view(x.shape)


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

    # Exact thresholds first (one streaming pass per input), then a single chunked merge
    # pass in which every input's chunk is trimmed on the fly.
    k = _num_kept(d, n)
    def plan(xf: torch.Tensor) -> tuple[float | None, torch.Tensor | None]:
        if k >= n:
            return None, None
        sel = _select(xf, k, zero_ties=False)
        return _shrink_lambda(sel, dtype), sel.drop

    # Each input's threshold, then each range of the (entrywise) merge, on its own thread.
    plans = list(parallel.parallel_map(plan, [xf for xf, _ in members], numel=n, device=device))
    out = torch.empty(n, dtype=dtype, device=device)
    parts = parallel.splits(n, device)
    bounds = [n * i // parts for i in range(parts + 1)]
    list(parallel.parallel_map(
        lambda i: _ties_merge(members, plans, majority == "count", normalize, out, bounds[i],
                              bounds[i + 1]), range(parts), numel=n, device=device))
    return out.view(shape)


def _ties_merge(
    members: list[tuple[torch.Tensor, float]],
    plans: list[tuple[float | None, torch.Tensor | None]],
    count_votes: bool,
    normalize: bool,
    out: torch.Tensor,
    lo: int,
    hi: int,
) -> None:
    """Elect and disjoint-merge flat inputs over entries [lo, hi) into ``out``, trimming
    each chunk by its (λ, drop) plan."""
    xf0 = members[0][0]
    dtype, device = xf0.dtype, xf0.device
    c = max(1, min(_chunk_size(device), hi - lo))

    def buf() -> torch.Tensor:
        return torch.empty(c, dtype=dtype, device=device)

    # Per-chunk working set: the trimmed chunks of every input (read by both sweeps) and a
    # few accumulators; never an n_inputs x numel stack.
    n_trim = sum(lam is not None for lam, _ in plans)
    trimmed = torch.empty((n_trim, c), dtype=dtype, device=device)
    total, gamma, num, tmp = buf(), buf(), buf(), buf()
    votes = buf() if count_votes else None
    den = buf() if normalize else None
    any_negative = any(w < 0 for _, w in members)
    neg_gamma = buf() if any_negative else None
    # A nonempty agreeing set has den >= the smallest |w| (a sum of positive terms never
    # rounds below one of them), so clamping to it only changes den == 0, where num == 0.
    min_abs_w = min(abs(w) for _, w in members)

    for s in range(lo, hi, c):
        e = min(s + c, hi)
        L = e - s
        tot, gam, nu, tm = total[:L], gamma[:L], num[:L], tmp[:L]
        vo = votes[:L] if votes is not None else None
        # Sweep 1: trim each input's chunk and gather what the election needs.
        chunks = []
        row = 0
        for j, ((xf, w), (lam, drop)) in enumerate(zip(members, plans)):
            xc = xf[s:e]
            if lam is None:
                tj = xc  # nothing to trim: read the input in place
            else:
                tj = trimmed[row, :L]
                row += 1
                _apply_selection(xc, lam, drop, s, out=tj)
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
        if neg_gamma is not None:
            torch.neg(gam, out=neg_gamma[:L])
        # Sweep 2: sum |c_i| and |w_i| over the inputs agreeing with γ. Every term is
        # non-negative, so there is no cancellation between the two sides.
        for j, (tj, (_, w)) in enumerate(zip(chunks, members)):
            torch.mul(tj, gam if w > 0 else neg_gamma[:L], out=tm)
            tm.relu_()  # γ·sign(w)·τ̂ > 0 exactly on A
            if j == 0:
                torch.mul(tm, abs(w), out=nu)
            else:
                nu.add_(tm, alpha=abs(w))
            if den is not None:
                tm.sign_()
                if j == 0:
                    torch.mul(tm, abs(w), out=den[:L])
                else:
                    den[:L].add_(tm, alpha=abs(w))
        oc = out[s:e]
        torch.mul(nu, gam, out=oc)
        if den is not None:
            oc.div_(den[:L].clamp_(min=min_abs_w))


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
    keep = draw.neg_().add_(p).relu_().sign_()
    keep = keep.to(x.device, x.dtype, non_blocking=False)
    out = x / p if rescale else x.clone()
    # x * 0 is -0.0 for negative x: adding +0.0 makes every zero +0.0.
    return out.mul_(keep).add_(0.0)
