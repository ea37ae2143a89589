"""Spectral merges of one tensor's task vectors: TSV-M and Iso-C / Iso-CTS.

Both work on the singular vectors of each 2-D delta (r = min(rows, columns)); every other
tensor (norms, biases) is averaged. They compute in the inputs' dtype (the recipe's
``compute_dtype``), the spectra from float64 Gram matrices.

Both fold their task vectors in one at a time, and take :class:`~tvrecipe.ops.deferred.
Deferred` members (``StepSpec.folds``): a task vector read from disk only when its turn
comes is dropped once its part is taken, so a run holds one task's delta of a tensor at a
time, not all of them (8 × 131 MB of an embedding of the large benchmark).

Their bytes do not depend on the number of cores: every product and factorisation runs on
one thread (:func:`~tvrecipe.ops.parallel.serial`; MKL's and LAPACK's bytes depend on
their thread count), over pieces fixed by the tensor's shape, and the math threads take
several pieces at once; sums over pieces are added in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tvrecipe.ops.arithmetic import all_finite, divide_
from tvrecipe.ops.deferred import Deferred, made
from tvrecipe.ops.lowrank import energy_rank
from tvrecipe.ops.parallel import cores, serial

Input = torch.Tensor | Deferred


def _check(inputs: Sequence[Input], op: str) -> list[Input]:
    xs = list(inputs)
    if not xs:
        raise ValueError(f"{op}: needs at least one task vector")
    shape = xs[0].shape
    if any(x.shape != shape for x in xs):
        raise ValueError(f"{op}: task vectors of different shapes {[tuple(x.shape) for x in xs]}")
    return xs


def _finite(xs: list[torch.Tensor], op: str) -> None:
    """Singular vectors of a delta that holds NaN or Inf do not exist: say so, rather than
    let LAPACK report an ill-conditioned matrix (only ``--allow-nonfinite`` lets them in)."""
    if not all(all_finite(x) for x in xs):
        raise ValueError(f"{op}: a task vector holds NaN or Inf (let in by "
                         "--allow-nonfinite?): singular vectors need finite task vectors; "
                         "fix the checkpoint")


# A task vector of at least this many bytes is taken alone, its products cut into blocks
# for the math threads; smaller ones go on the math threads whole, a task each (TSV-M of
# the large benchmark took 193 s with every tensor's tasks one after another, 146 s with its
# small tensors' tasks in parallel).
ALONE_BYTES = 32 << 20


def _each(xs: list[Input], op: str | None, fn) -> list:
    """``fn(i, t, own)`` of each task vector ``t`` (the ``i``-th), results in order: ``own``
    says ``t`` is ``fn``'s to write into (a deferred one, made when its turn comes). Each is checked
    finite first when ``op`` is given.

    Task vectors of ``ALONE_BYTES`` or more are taken one after another, each dropped before
    the next is made; smaller ones on the math threads. Which way depends on the shape
    alone, so deferred and ready task vectors give the same bytes."""
    def one(i: int) -> Any:
        return fn(i, _made(xs[i], op), isinstance(xs[i], Deferred))

    if xs[0].numel() * xs[0].dtype.itemsize < ALONE_BYTES:
        return _parallel(one, list(range(len(xs))), xs[0])
    return [one(i) for i in range(len(xs))]


def _made(x: Input, op: str | None) -> torch.Tensor:
    """One task vector, made (read) now if deferred, checked finite when ``op`` is given."""
    t = made(x)
    if op is not None:
        _finite([t], op)
    return t


def _total(xs: list[Input], op: str | None = None) -> torch.Tensor:
    """Σ_t Δ_t, adding one task vector at a time, in their order (checked finite when ``op``
    is given), into the first one when it is ours."""
    total = None
    for x in xs:
        t = _made(x, op)
        if total is None:
            total = t if isinstance(x, Deferred) else t.clone()
        else:
            total.add_(t)
        del t  # (before the next is made)
    return total


def _mean(xs: list[Input]) -> torch.Tensor:
    return divide_(_total(xs), len(xs))


def _parallel(fn, items: list, like: torch.Tensor) -> list:
    """``fn`` over ``items`` on the math threads (each result deterministic on its own)."""
    from tvrecipe.ops.parallel import parallel_map
    return list(parallel_map(fn, items, numel=like.numel(), device=like.device))


def _spans(long: int, short: int) -> list[slice]:
    """``long`` lines (rows or columns) of ``short`` entries each, cut into pieces of at
    most ``SPECTRUM_BLOCK`` entries (one line at least): fixed by the shape alone."""
    step = max(1, SPECTRUM_BLOCK // max(1, short))
    return [slice(i, i + step) for i in range(0, long, step)]


# At most this many bytes of piece products wait to be added at once (several pieces of a
# Gram matrix are made on the math threads, then added in their order).
GRAM_WINDOW_BYTES = 256 << 20


def _gram(a: torch.Tensor, wide: bool, dtype: torch.dtype) -> torch.Tensor:
    """a·aᵀ (``wide``) or aᵀ·a, in ``dtype``: the products of pieces of ``a`` along its
    longer side (:func:`_spans`), each taken to ``dtype``, made several at a time on the
    math threads and added in order, so that no copy of ``a`` in ``dtype`` is held and the
    bytes do not depend on how many threads made them."""
    long, short = (a.shape[1], a.shape[0]) if wide else a.shape
    spans = _spans(long, short)

    def product(span: slice) -> torch.Tensor:
        b = (a[:, span] if wide else a[span]).to(dtype)
        return b @ b.mT if wide else b.mT @ b

    size = short * short * torch.finfo(dtype).bits // 8
    window = max(1, min(cores(), GRAM_WINDOW_BYTES // max(1, size)))
    gram = None
    for i in range(0, len(spans), window):
        for g in _parallel(product, spans[i:i + window], a):
            if gram is None:
                gram = g
            else:
                gram.add_(g)
    return gram


def _spanned(lam: torch.Tensor, size: int) -> torch.Tensor:
    """Which eigenvalues of a size × size float64 Gram matrix stand above its rounding floor
    (the others belong to directions the matrix does not span)."""
    return lam > lam.max().clamp_min(0.0) * size * torch.finfo(torch.float64).eps * 16


def _inverse_root(gram: torch.Tensor) -> torch.Tensor:
    """(G)^(-1/2) on the range of a symmetric positive semi-definite ``gram``, in float64:
    eigenvalues at the rounding floor (directions ``gram`` does not span) are left out."""
    if gram.shape[0] == 0:  # no directions at all (the deltas are exact zeros)
        return gram.double()
    with serial():
        lam, q = torch.linalg.eigh(gram.double())
    keep = _spanned(lam, gram.shape[0])
    q = q[:, keep]
    return (q * lam[keep].rsqrt()) @ q.mT


def polar_(u: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor of ``u`` (m × c, c ≤ m), written into ``u``: P·Qᵀ for
    u = P·S·Qᵀ, the matrix with orthonormal columns nearest to ``u`` in Frobenius norm.

    Computed as u·(uᵀu)^(-1/2), from an eigendecomposition (float64) of the c × c Gram
    matrix, a third of the time of an SVD of u; directions u does not span are left out (a
    rank-deficient u gives the partial isometry on its range). The products stay in u's
    dtype (the stacks of singular vectors this is used on are near-orthonormal, so their
    Gram matrix is well conditioned) and go into ``u`` by row blocks.
    """
    return _rows_times_(u, _inverse_root(_gram(u, False, u.dtype)).to(u.dtype))


def _rows_times_(a: torch.Tensor, m: torch.Tensor, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``a @ m`` by row blocks of ``a``, each taken to ``m``'s dtype, into ``out`` (``a``
    itself when None: then ``m`` is square)."""
    out = a if out is None else out

    def piece(span: slice) -> None:
        out[span] = a[span].to(m.dtype) @ m

    _parallel(piece, _spans(a.shape[0], max(a.shape[1], m.shape[1])), a)
    return out


def _task_svd(x: torch.Tensor, k: int, out: torch.Tensor | None = None, floor: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m × k), σ (k), V (n × k) of ``x``'s top k singular triplets (fewer when ``x`` has
    a lower rank, or fewer σ² above ``floor``), exact: from :func:`_spectrum`. A randomised
    SVD was tried and dropped: for the slowly decaying spectra of real task vectors its top
    r/T vectors were far off (a relative error of 0.4 to 0.9 in TSV-M's result for
    σ_i = 0.98^i with 2 power passes)."""
    u, s, v = _spectrum(x, top=k, out=out, floor=floor)
    return u, s[:u.shape[1]], v


@serial()
def tsv_merge(inputs: Sequence[Input], *, fraction: float = 1.0) -> torch.Tensor:
    """TSV-M (Gargiulo et al., CVPR 2025): each task's top k = max(1, ⌊fraction·r/T⌋)
    singular triplets, stacked; U and V replaced by their polar factors;
    Δ = U⊥ · diag(σ) · V⊥ᵀ. Tensors that are not 2-D are averaged.

    The tasks' SVDs come from their smaller Gram matrices (the tasks of a large tensor one
    after another, their products in pieces on the math threads; those of smaller ones side
    by side on the math threads: see :func:`_each`); the polar factors from r × r
    eigendecompositions. Every product and factorisation runs on one thread.
    """
    xs = _check(inputs, "tsv_merge")
    if xs[0].dim() != 2 or xs[0].numel() == 0:  # (an empty matrix has no spectrum)
        return _mean(xs)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"tsv_merge: fraction must be in (0, 1], got {fraction!r}")
    t = len(xs)
    r = min(xs[0].shape)
    k = max(1, int(fraction * r / t))
    # Each task's vectors on the longer side go straight into one stack (an embedding's
    # would otherwise be held twice, as parts and as their concatenation).
    wide = xs[0].shape[0] <= xs[0].shape[1]
    stack = torch.empty(max(xs[0].shape), t * k, dtype=xs[0].dtype, device=xs[0].device)
    parts = _each(xs, "tsv_merge",
                  lambda i, x, _own, st=stack: _task_svd(x, k, out=st[:, i * k:(i + 1) * k]))
    ss = [p[1] for p in parts]
    big = [p[2] if wide else p[0] for p in parts]
    small = [p[0] if wide else p[2] for p in parts]
    del parts
    if all(b.shape[1] == k for b in big):
        big = [stack]  # (else a task kept fewer directions: the parts are put together)
    del stack
    us, vs = (small, big) if wide else (big, small)
    s = torch.cat(ss)
    if s.numel() > r:  # T > r: more directions than the space holds (k = 1 each)
        top = torch.argsort(s, descending=True, stable=True)[:r]
        us, vs, s = [torch.cat(us, 1)[:, top]], [torch.cat(vs, 1)[:, top]], s[top]
    return _isometry(us, vs, s)


def _isometry(us: list[torch.Tensor], vs: list[torch.Tensor], sigma: torch.Tensor
              ) -> torch.Tensor:
    """U⊥·diag(σ)·V⊥ᵀ for the polar factors of the stacked ``us`` and ``vs`` (σ one value
    or one per column), emptying both lists.

    The stacks are this function's own (the lists held the only references to what they
    are made of): the polar factors are written into them, and the result into U⊥ when it
    has the result's shape (a tall tensor whose stack has as many columns as the tensor),
    so an embedding's stack, factor and result are one buffer.
    """
    u = torch.cat(us, 1) if len(us) > 1 else us[0]
    v = torch.cat(vs, 1) if len(vs) > 1 else vs[0]
    us.clear()
    vs.clear()
    u, v = _parallel(polar_, [u, v], u)
    u.mul_(sigma)
    if u.shape[0] >= v.shape[0] and u.shape[1] == v.shape[0]:
        return _rows_times_(u, v.mT)
    return _rows_times_(u, v.mT, out=u.new_empty(u.shape[0], v.shape[0]))


# Entries of the float64 blocks a spectrum is built from (32 MB): a whole float64 copy of
# an embedding's delta (262 MB at the large benchmark) is never made.
SPECTRUM_BLOCK = 1 << 20


def _gram_eigh(a: torch.Tensor, floor: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """σ (all r, descending) of ``a`` and the eigenvectors q (float64, by columns) of its
    smaller Gram matrix for the σ above the rounding floor (and σ² above ``floor``), with
    those σ (float64): the right singular vectors of a tall ``a``, the left ones of a wide
    one.

    The Gram matrix is summed over float64 pieces of ``a`` along its longer side, in order
    (:func:`_gram`): no float64 copy of ``a`` is held."""
    wide = a.shape[0] <= a.shape[1]
    gram = _gram(a, wide, torch.float64)
    with serial():  # (LAPACK's bytes would depend on the thread count)
        lam, q = torch.linalg.eigh(gram)
    lam, q = lam.flip(0), q.flip(1)
    sigma = lam.clamp_min(0.0).sqrt()
    keep = _spanned(lam, gram.shape[0]) & (lam > floor)
    return sigma, q[:, keep], sigma[keep]


def _spectrum(a: torch.Tensor, top: int | None = None, out: torch.Tensor | None = None,
              floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, σ (descending), V of ``a`` (m × n) from the eigendecomposition of the smaller Gram
    matrix (float64, :func:`_gram_eigh`): all r = min(m, n) singular values, and the
    singular vectors of the ones above the rounding floor (σ = 0 has no defined vectors),
    only the first ``top`` of them when given. The other side's vectors (a·q/σ) are made
    from float64 blocks of ``a`` into a tensor of ``a``'s dtype: the first columns of ``out``
    when given (max(m, n) rows, at least as many columns as vectors are kept).
    """
    wide = a.shape[0] <= a.shape[1]
    sigma, q, kept = _gram_eigh(a, floor)
    if top is not None:
        q, kept = q[:, :top], kept[:top]
    other = (out[:, :q.shape[1]] if out is not None else
             torch.empty(a.shape[1] if wide else a.shape[0], q.shape[1], dtype=a.dtype,
                         device=a.device))
    long, short = (a.shape[1], a.shape[0]) if wide else a.shape

    def piece(span: slice) -> None:
        b = (a[:, span] if wide else a[span]).double()
        other[span] = (b.mT @ q if wide else b @ q) / kept

    _parallel(piece, _spans(long, short), a)
    u, v = (q.to(a.dtype), other) if wide else (other, q.to(a.dtype))
    return u, sigma.to(a.dtype), v


def _iso_c_(total: torch.Tensor) -> torch.Tensor:
    """Iso-C of Δ_TA = ``total``, written into it: σ̄·U·Vᵀ = Δ_TA·V·diag(σ̄/σ)·Vᵀ for a tall
    Δ_TA (U·diag(σ̄/σ)·Uᵀ·Δ_TA for a wide one), with V (U) from its Gram matrix and σ̄ the mean
    of all r singular values; by row (column) blocks, so neither U nor a result is made
    beside Δ_TA. The products in float64, written back in ``total``'s dtype."""
    wide = total.shape[0] <= total.shape[1]
    sigma, q, kept = _gram_eigh(total)
    mean = sigma.to(total.dtype).mean().double()  # (the mean of r values, zeros included)
    m = (q * (mean / kept)) @ q.mT
    # Each block in float64: diag(σ̄/σ) amplifies the rounding of a float32 product by
    # σ̄/σ_min (a relative error of 2e-2 for a low-rank sum plus noise, κ = 5e5, against
    # 7e-6 with float64 blocks, as U was made before).
    if not wide:
        return _rows_times_(total, m)

    def piece(span: slice) -> None:
        total[:, span] = m @ total[:, span].double()

    _parallel(piece, _spans(total.shape[1], total.shape[0]), total)
    return total


@serial()
def iso(inputs: Sequence[Input], *, variant: str = "c",
        common: float = 0.8) -> torch.Tensor:
    """Iso-C and Iso-CTS (Marczak et al., 2025), on Δ_TA = Σ_t Δ_t = U·Σ·Vᵀ.

    ``c``: Δ = σ̄·U·Vᵀ, σ̄ the mean singular value of Δ_TA (a flat spectrum).
    ``cts``: the top k singular vectors of Δ_TA (k = ⌊common·r⌋, then r − k rounded to the
    nearest multiple of T, as the reference implementation does) plus each task's top
    s = (r − k)/T singular vectors of its residual
    Δ_t − U_k·U_kᵀ·Δ_t; the stacked U's and V's are replaced by their polar factors and every
    singular value by the mean of the stacked ones. Tensors that are not 2-D are averaged.

    Singular vectors come from eigendecompositions of the smaller Gram matrix (in float64);
    when Δ_TA's left singular vectors span the whole column space, each residual is
    U_rest·(U_restᵀ·Δ_t) with U_rest the other r − k of them, and its SVD is that of the
    small U_restᵀ·Δ_t. Only directions with a nonzero singular value are used (σ̄ averages
    all r values, zeros included), so the result has Δ_TA's row and column spaces. A
    residual direction counts as zero below the rounding of the residual's making:
    σ² ≤ 16·size·ε²·‖Δ_t‖²_F, ε that of the compute dtype (a task whose directions all lie
    in U_k has a residual of rounding noise only, which the flat spectrum would otherwise
    raise to σ̄).
    """
    xs = _check(inputs, "iso")
    if xs[0].dim() != 2 or xs[0].numel() == 0:  # (an empty matrix has no spectrum)
        return _mean(xs)
    if variant not in ("c", "cts"):
        raise ValueError(f"iso: variant must be 'c' or 'cts', got {variant!r}")
    if not 0.0 <= common <= 1.0:
        raise ValueError(f"iso: common must be in [0, 1], got {common!r}")
    total = _total(xs, "iso")
    if variant == "c":
        return _iso_c_(total)
    u, s, v = _spectrum(total)
    del total
    r = s.numel()
    t = len(xs)
    # The reference implementation's split: the r - k task directions rounded (Python's
    # round, half to even) to a multiple of T, so k moves up or down to the nearest k that
    # leaves one; never more task directions than there are.
    k = int(common * r)
    per_task = min(round((r - k) / t), r // t)
    k = min(r - per_task * t, u.shape[1])
    # (σ̄: the mean over the r = k + T·per_task values of the reference, directions left
    # out, at zero or at the rounding floor, counted as zeros)
    us, vs, ss = [u[:, :k]], [v[:, :k]], [s[:k]]
    if per_task:
        for ut, st, vt in _residual_svds(xs, u, k, per_task):
            us.append(ut)
            vs.append(vt)
            ss.append(st)
    del u, v
    return _isometry(us, vs, torch.cat(ss).sum() / r)


def _residual_svds(xs: list[Input], u: torch.Tensor, k: int, per_task: int) -> list[tuple]:
    """Iso-CTS's second pass over the tasks (deferred ones are read again, a task at a
    time): the top ``per_task`` singular triplets of each Δ_t − U_k·U_kᵀ·Δ_t, for U_k the
    first ``k`` columns of ``u``."""
    if u.shape[1] == u.shape[0]:  # U spans the whole column space: use its complement
        rest = u[:, k:]

        def residual_svd(_i: int, x: torch.Tensor, _own: bool) -> tuple:
            # Δ_t − U_k·U_kᵀ·Δ_t = U_rest·(U_restᵀ·Δ_t): the SVD of a (m − k) × n matrix
            floor = _residual_floor(x)
            small = _rows_times_(rest.mT, x, out=x.new_empty(rest.shape[1], x.shape[1]))
            w, st, vt = _task_svd(small, per_task, floor=floor)
            return _rows_times_(rest, w, out=w.new_empty(rest.shape[0], w.shape[1])), st, vt
    else:
        uk = u[:, :k]

        def residual_svd(_i: int, x: torch.Tensor, own: bool) -> tuple:
            # Δ_t − U_k·(U_kᵀ·Δ_t), into Δ_t (a copy of it unless it is ours), by rows
            floor = _residual_floor(x)
            x = x if own else x.clone()
            p = _rows_times_(uk.mT, x, out=x.new_empty(k, x.shape[1]))

            def piece(span: slice) -> None:
                x[span].sub_(uk[span] @ p)

            _parallel(piece, _spans(x.shape[0], x.shape[1]), x)
            return _task_svd(x, per_task, floor=floor)

    return _each(xs, None, residual_svd)


def _residual_floor(x: torch.Tensor) -> float:
    """The σ² below which a direction of Δ_t's residual is the rounding of its making
    (products and a subtraction in ``x``'s dtype): 16·size·ε²·‖Δ_t‖²_F."""
    eps = torch.finfo(x.dtype).eps
    return 16 * min(x.shape) * eps * eps * float(torch.linalg.vector_norm(x)) ** 2


# Points of each normalised spectrum kept for the picture (σ_i/σ_1 at evenly spaced i/r).
CURVE_POINTS = 32


def spectra_summary(inputs: Sequence[torch.Tensor], k: int | None = None) -> dict:
    """What `tvrecipe inspect` shows of one 2-D tensor's task vectors: per task, its
    effective rank exp(H(p)) with p_i = σ_i²/Σσ² (Roy & Vetterli), the rank holding 90% of
    its energy, the energy its top k directions keep (k = max(1, ⌊r/T⌋) by default: each
    task's share of the rank, as TSV-M keeps), its normalised spectrum σ_i/σ_1 at
    ``CURVE_POINTS`` points, and, per pair of tasks, the overlap ‖U_iᵀU_j‖²_F / k of their
    top-k left subspaces (1: the same subspace; about k/rows for unrelated ones).
    Exact: singular values from the float64 Gram matrices (:func:`_spectrum`)."""
    xs = _check(inputs, "inspect")
    t = len(xs)
    r = min(xs[0].shape)
    k = max(1, r // t) if k is None else max(1, min(k, r))
    spectra = _parallel(_spectrum, xs, xs[0])
    erank, r90, energy, curves, tops = [], [], [], [], []
    for u, s, _v in spectra:
        power = s.double() ** 2
        total = float(power.sum())
        if total == 0.0:
            erank.append(0.0)
            r90.append(0)
            energy.append(0.0)
            curves.append([0.0] * CURVE_POINTS)
        else:
            p = power / total
            nz = p[p > 0]
            erank.append(float(torch.exp(-(nz * nz.log()).sum())))
            r90.append(energy_rank(s, 0.9))
            energy.append(float(p[:k].sum()))
            at = torch.linspace(0, r - 1, CURVE_POINTS).round().long()
            curves.append((s.double()[at] / s.double()[0]).tolist())
        tops.append(u[:, :k].double())
    with serial():
        overlap = [[float((a.mT @ b).square().sum()) / k if a.shape[1] and b.shape[1]
                     else 0.0 for b in tops] for a in tops]
    return {"k": k, "rank": r, "erank": erank, "r90": r90, "energy_k": energy,
            "curve": curves, "overlap": overlap}
