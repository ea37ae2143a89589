"""Spectral merges of one tensor's task vectors: TSV-M and Iso-C / Iso-CTS.

Both work on the singular vectors of each 2-D delta (r = min(rows, columns)); every other
tensor (norms, biases) is averaged. They compute in the inputs' dtype (the recipe's
``compute_dtype``) with LAPACK's SVD.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check(inputs: Sequence[torch.Tensor], op: str) -> list[torch.Tensor]:
    xs = list(inputs)
    if not xs:
        raise ValueError(f"{op}: needs at least one task vector")
    shape = xs[0].shape
    if any(x.shape != shape for x in xs):
        raise ValueError(f"{op}: task vectors of different shapes {[tuple(x.shape) for x in xs]}")
    return xs


def _mean(xs: list[torch.Tensor]) -> torch.Tensor:
    out = xs[0].clone()
    for x in xs[1:]:
        out.add_(x)
    return out.div_(len(xs))


def polar(u: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor of ``u`` (m × c, c ≤ m): P·Qᵀ for u = P·S·Qᵀ, the
    matrix with orthonormal columns nearest to ``u`` in Frobenius norm."""
    p, _s, qh = torch.linalg.svd(u, full_matrices=False)
    return p @ qh


def tsv_merge(inputs: Sequence[torch.Tensor], *, fraction: float = 1.0) -> torch.Tensor:
    """TSV-M (Gargiulo et al., CVPR 2025): each task's top k = max(1, ⌊fraction·r/T⌋)
    singular triplets, stacked; U and V replaced by their polar factors;
    Δ = U⊥ · diag(σ) · V⊥ᵀ. Tensors that are not 2-D are averaged.
    """
    xs = _check(inputs, "tsv_merge")
    if xs[0].dim() != 2:
        return _mean(xs)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"tsv_merge: fraction must be in (0, 1], got {fraction!r}")
    t = len(xs)
    r = min(xs[0].shape)
    k = max(1, int(fraction * r / t))
    us, ss, vs = [], [], []
    for x in xs:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u, s, v = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    if u.shape[1] > r:  # T > r: more directions than the space holds (k = 1 each)
        top = torch.argsort(s, descending=True)[:r]
        u, s, v = u[:, top], s[top], v[:, top]
    return (polar(u) * s) @ polar(v).T


def iso(inputs: Sequence[torch.Tensor], *, variant: str = "c",
        common: float = 0.8) -> torch.Tensor:
    """Iso-C and Iso-CTS (Marczak et al., 2025), on Δ_TA = Σ_t Δ_t = U·Σ·Vᵀ.

    ``c``: Δ = σ̄·U·Vᵀ, σ̄ the mean singular value of Δ_TA (a flat spectrum).
    ``cts``: the top k singular vectors of Δ_TA (k = ⌊common·r⌋, lowered until r − k divides
    by T) plus each task's top s = (r − k)/T singular vectors of its residual
    Δ_t − U_k·U_kᵀ·Δ_t; the stacked U's and V's are replaced by their polar factors and every
    singular value by the mean of the stacked ones. Tensors that are not 2-D are averaged.
    """
    xs = _check(inputs, "iso")
    if xs[0].dim() != 2:
        return _mean(xs)
    if variant not in ("c", "cts"):
        raise ValueError(f"iso: variant must be 'c' or 'cts', got {variant!r}")
    total = xs[0].clone()
    for x in xs[1:]:
        total.add_(x)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    r = s.numel()
    if variant == "c":
        return (u * s.mean()) @ vh
    t = len(xs)
    if not 0.0 <= common <= 1.0:
        raise ValueError(f"iso: common must be in [0, 1], got {common!r}")
    k = int(common * r)
    per_task = (r - k) // t
    k = r - per_task * t
    uk, vk = u[:, :k], vh[:k].T
    us, vs, ss = [uk], [vk], [s[:k]]
    if per_task:
        for x in xs:
            residual = x - uk @ (uk.T @ x)
            ut, st, vht = torch.linalg.svd(residual, full_matrices=False)
            us.append(ut[:, :per_task])
            vs.append(vht[:per_task].T)
            ss.append(st[:per_task])
    sigma = torch.cat(ss).mean()
    return (polar(torch.cat(us, 1)) * sigma) @ polar(torch.cat(vs, 1)).T
