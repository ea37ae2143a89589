"""Spectral merges of one tensor's task vectors: TSV-M and Iso-C / Iso-CTS.

Both work on the singular vectors of each 2-D delta (r = min(rows, columns)); every other
tensor (norms, biases) is averaged. They compute in the inputs' dtype (the recipe's
``compute_dtype``) with LAPACK's SVD.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tvrecipe.ops.arithmetic import all_finite, divide_
from tvrecipe.ops.lowrank import energy_rank
from tvrecipe.ops.parallel import all_cores


def _check(inputs: Sequence[torch.Tensor], op: str) -> list[torch.Tensor]:
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


def _mean(xs: list[torch.Tensor]) -> torch.Tensor:
    out = xs[0].clone()
    for x in xs[1:]:
        out.add_(x)
    return divide_(out, len(xs))


def _parallel(fn, items: list, like: torch.Tensor) -> list:
    """``fn`` over ``items`` on the math threads (each result deterministic on its own)."""
    from tvrecipe.ops.parallel import parallel_map
    return list(parallel_map(fn, items, numel=like.numel(), device=like.device))


def _spanned(lam: torch.Tensor, size: int) -> torch.Tensor:
    """Which eigenvalues of a size × size float64 Gram matrix stand above its rounding floor
    (the others belong to directions the matrix does not span)."""
    return lam > lam.max().clamp_min(0.0) * size * torch.finfo(torch.float64).eps * 16


def _inverse_root(gram: torch.Tensor) -> torch.Tensor:
    """(G)^(-1/2) on the range of a symmetric positive semi-definite ``gram``, in float64:
    eigenvalues at the rounding floor (directions ``gram`` does not span) are left out."""
    if gram.shape[0] == 0:  # no directions at all (the deltas are exact zeros)
        return gram.double()
    lam, q = torch.linalg.eigh(gram.double())
    keep = _spanned(lam, gram.shape[0])
    q = q[:, keep]
    return (q * lam[keep].rsqrt()) @ q.mT


def polar(u: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor of ``u`` (m × c, c ≤ m): P·Qᵀ for u = P·S·Qᵀ, the
    matrix with orthonormal columns nearest to ``u`` in Frobenius norm.

    Computed as u·(uᵀu)^(-1/2), from an eigendecomposition (float64) of the c × c Gram
    matrix, a third of the time of an SVD of u; directions u does not span are left out (a
    rank-deficient u gives the partial isometry on its range). The products stay in u's
    dtype: the stacks of singular vectors this is used on are near-orthonormal, so their
    Gram matrix is well conditioned.
    """
    return u @ _inverse_root(u.mT @ u).to(u.dtype)


def _task_svd(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m × k), σ (k), V (n × k) of ``x``'s top k singular triplets (fewer when ``x`` has
    a lower rank), exact: from :func:`_spectrum`. A randomised SVD was tried and dropped: for
    the slowly decaying spectra of real task vectors its top r/T vectors were far off (a
    relative error of 0.4 to 0.9 in TSV-M's result for σ_i = 0.98^i with 2 power passes)."""
    u, s, v = _spectrum(x, top=k)
    return u, s[:u.shape[1]], v


def tsv_merge(inputs: Sequence[torch.Tensor], *, fraction: float = 1.0) -> torch.Tensor:
    """TSV-M (Gargiulo et al., CVPR 2025): each task's top k = max(1, ⌊fraction·r/T⌋)
    singular triplets, stacked; U and V replaced by their polar factors;
    Δ = U⊥ · diag(σ) · V⊥ᵀ. Tensors that are not 2-D are averaged.

    The tasks' SVDs (from their smaller Gram matrices) run on the math threads; the polar
    factors come from r × r eigendecompositions.
    """
    xs = _check(inputs, "tsv_merge")
    if xs[0].dim() != 2 or xs[0].numel() == 0:  # (an empty matrix has no spectrum)
        return _mean(xs)
    _finite(xs, "tsv_merge")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"tsv_merge: fraction must be in (0, 1], got {fraction!r}")
    t = len(xs)
    r = min(xs[0].shape)
    k = max(1, int(fraction * r / t))
    parts = _parallel(lambda x: _task_svd(x, k), xs, xs[0])
    u = torch.cat([p[0] for p in parts], 1)
    s = torch.cat([p[1] for p in parts])
    v = torch.cat([p[2] for p in parts], 1)
    if u.shape[1] > r:  # T > r: more directions than the space holds (k = 1 each)
        top = torch.argsort(s, descending=True, stable=True)[:r]
        u, s, v = u[:, top], s[top], v[:, top]
    u_p, v_p = _parallel(polar, [u, v], xs[0])
    with all_cores():
        return (u_p * s) @ v_p.mT


def _spectrum(a: torch.Tensor, top: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, σ (descending), V of ``a`` (m × n) from the eigendecomposition of the smaller Gram
    matrix (float64): all r = min(m, n) singular values, and the singular vectors of the
    ones above the rounding floor (σ = 0 has no defined vectors), only the first ``top`` of
    them when given."""
    wide = a.shape[0] <= a.shape[1]
    a64 = a.double()
    gram = a64 @ a64.mT if wide else a64.mT @ a64
    lam, q = torch.linalg.eigh(gram)
    lam, q = lam.flip(0), q.flip(1)
    sigma = lam.clamp_min(0.0).sqrt()
    keep = _spanned(lam, gram.shape[0])
    q, kept = q[:, keep], sigma[keep]
    if top is not None:
        q, kept = q[:, :top], kept[:top]
    other = (a64.mT @ q if wide else a64 @ q) / kept
    u, v = (q, other) if wide else (other, q)
    return u.to(a.dtype), sigma.to(a.dtype), v.to(a.dtype)


def iso(inputs: Sequence[torch.Tensor], *, variant: str = "c",
        common: float = 0.8) -> torch.Tensor:
    """Iso-C and Iso-CTS (Marczak et al., 2025), on Δ_TA = Σ_t Δ_t = U·Σ·Vᵀ.

    ``c``: Δ = σ̄·U·Vᵀ, σ̄ the mean singular value of Δ_TA (a flat spectrum).
    ``cts``: the top k singular vectors of Δ_TA (k = ⌊common·r⌋, lowered until r − k divides
    by T) plus each task's top s = (r − k)/T singular vectors of its residual
    Δ_t − U_k·U_kᵀ·Δ_t; the stacked U's and V's are replaced by their polar factors and every
    singular value by the mean of the stacked ones. Tensors that are not 2-D are averaged.

    Singular vectors come from eigendecompositions of the smaller Gram matrix (in float64);
    when Δ_TA's left singular vectors span the whole column space, each residual is
    U_rest·(U_restᵀ·Δ_t) with U_rest the other r − k of them, and its SVD is that of the
    small U_restᵀ·Δ_t. Only directions with a nonzero singular value are used (σ̄ averages
    all r values, zeros included), so the result has Δ_TA's row and column spaces.
    """
    xs = _check(inputs, "iso")
    if xs[0].dim() != 2 or xs[0].numel() == 0:  # (an empty matrix has no spectrum)
        return _mean(xs)
    _finite(xs, "iso")
    if variant not in ("c", "cts"):
        raise ValueError(f"iso: variant must be 'c' or 'cts', got {variant!r}")
    total = xs[0].clone()
    for x in xs[1:]:
        total.add_(x)
    with all_cores():
        u, s, v = _spectrum(total)
    r = s.numel()
    if variant == "c":
        with all_cores():
            return (u * s.mean()) @ v.mT
    t = len(xs)
    if not 0.0 <= common <= 1.0:
        raise ValueError(f"iso: common must be in [0, 1], got {common!r}")
    k = int(common * r)
    per_task = (r - k) // t
    k = min(r - per_task * t, u.shape[1])
    uk, vk = u[:, :k], v[:, :k]
    us, vs, ss = [uk], [vk], [s[:k]]
    if per_task:
        if u.shape[1] == u.shape[0]:  # U spans the whole column space: use its complement
            rest = u[:, k:]

            def residual_svd(x: torch.Tensor) -> tuple:
                # Δ_t − U_k·U_kᵀ·Δ_t = U_rest·(U_restᵀ·Δ_t): the SVD of a (m − k) × n matrix
                w, st, vt = _task_svd(rest.mT @ x, per_task)
                return rest @ w, st, vt
        else:
            def residual_svd(x: torch.Tensor) -> tuple:
                return _task_svd(x - uk @ (uk.mT @ x), per_task)

        for ut, st, vt in _parallel(residual_svd, xs, xs[0]):
            us.append(ut)
            vs.append(vt)
            ss.append(st)
    sigma = torch.cat(ss).mean()
    u_p, v_p = _parallel(polar, [torch.cat(us, 1), torch.cat(vs, 1)], xs[0])
    with all_cores():
        return (u_p * sigma) @ v_p.mT


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
    overlap = [[float((a.mT @ b).square().sum()) / k if a.shape[1] and b.shape[1] else 0.0
                for b in tops] for a in tops]
    return {"k": k, "rank": r, "erank": erank, "r90": r90, "energy_k": energy,
            "curve": curves, "overlap": overlap}
