"""Shared / unique decomposition of task vectors (Damirchi et al., arXiv 2512.22511)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch

from tvrecipe.ops.parallel import serial

__all__ = [
    "METHODS",
    "VECTORS_1D",
    "Decomposition",
    "decompose",
    "decompose_factors",
    "decomposition_info",
    "decomposition_parts",
    "dense_shared_subspace",
    "shared_coefficients",
    "shared_subspace",
    "task_subspace",
]

METHODS = ("sandwich", "chain", "mean_projector")
VECTORS_1D = ("unique", "mean")
DEFAULT_RANK: Mapping[str, float] = {"energy": 0.9}

# Randomized SVD settings (Halko, Martinsson & Tropp, 2011): 10 extra columns and two passes
# of subspace iteration (the sketch's spectrum decays as σ⁵). One pass saved 2 of 5 products,
# but on slowly decaying spectra (σ_i = 0.98^i, 1024 × 2816, rank 16) its top-16 subspace
# overlapped the exact one by 0.81 against 0.95 with two: too far off for a rule that
# compares subspaces by cos² ≥ 0.85. tests/ops/test_decompose.py checks against LAPACK.
_OVERSAMPLE = 10
_POWER_ITERS = 2
# First sketch width in energy mode; doubled until the target is met well inside the sketch.
_FIRST_SKETCH = 32
# The randomized path only pays off while the sketch is a small fraction of the matrix.
_SKETCH_FRACTION = 4
# Fixed seed: the sketch is part of the result, so it must not depend on the caller's RNG.
_SEED = 0x7A5C


@dataclass
class Decomposition:
    """Shared and unique parts of the deltas of one tensor.

    Attributes:
        shared: One tensor per delta, same shape as the delta: its part in the shared subspace
            (or the task mean, in the ``mean`` modes).
        unique: One tensor per delta: ``delta - shared``.
        info: JSON-friendly facts: ``ranks`` (r_i per task; empty outside subspace mode),
            ``shared_dim`` (s; 0 outside subspace mode), ``shared_energy`` (per task
            ``||shared_i||^2 / ||delta_i||^2``, 0 for a zero delta) and ``mode`` (one of
            ``subspace``, ``1d-unique``, ``1d-mean``, ``excluded-unique``, ``excluded-mean``).
    """

    shared: list[torch.Tensor]
    unique: list[torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def _too_few(k: int) -> ValueError:
    return ValueError(
        f"decompose needs at least 2 task vectors to find a shared subspace, got {k}"
    )


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown decompose method {method!r}; expected one of {list(METHODS)}")


def _check_threshold(threshold: float) -> None:
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"decompose threshold must be in (0, 1], got {threshold}")


def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    if w.ndim < 2:
        raise ValueError(f"task_subspace needs a tensor with at least 2 dims, got shape "
                         f"{tuple(w.shape)}")
    m = w.reshape(w.shape[0], -1)
    # SVD kernels have no half-precision versions; float64 inputs keep their precision.
    if m.dtype not in (torch.float32, torch.float64):
        m = m.float()
    return m


def _parse_rank(rank: int | Mapping[str, float] | None) -> tuple[int | None, float | None]:
    """(int rank, None) or (None, energy fraction)."""
    if rank is None:
        rank = DEFAULT_RANK
    if isinstance(rank, bool):
        raise TypeError("rank must be an int or {'energy': e}, got a bool")
    if isinstance(rank, int):
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        return rank, None
    if isinstance(rank, Mapping):
        if set(rank) != {"energy"}:
            raise ValueError(f"rank mapping must be {{'energy': e}}, got keys {sorted(rank)}")
        e = float(rank["energy"])
        if not 0.0 < e <= 1.0:
            raise ValueError(f"rank energy must be in (0, 1], got {e}")
        return None, e
    raise TypeError(f"rank must be an int or {{'energy': e}}, got {type(rank).__name__}")


def _randomized_svd(a: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading q left singular vectors and values of ``a`` from a seeded random sketch.

    Range finder with ``_POWER_ITERS`` passes of subspace iteration (Halko, Martinsson &
    Tropp, 2011, Alg. 4.4), ending on the right-hand side: with Q spanning ``aᵀ·(a·aᵀ)^p·a·Ω``
    the left singular vectors of the thin ``a·Q`` are those of ``a`` restricted to that
    space, so the last step is an SVD of a ``d × q`` matrix rather than a product with ``a``
    again (5 products with ``a`` for p = 2 instead of 6).

    A private generator (not ``torch.svd_lowrank``, which draws from the global RNG) keeps the
    result byte-identical across calls and leaves the caller's RNG state alone.
    """
    # Drawn on the CPU and moved: a CUDA generator gives another sketch (then other ranks).
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_SEED)
    omega = torch.randn(a.shape[1], q, generator=gen, dtype=a.dtype).to(a.device)
    # Re-orthonormalise between passes: without it the columns collapse onto the top
    # singular vector in float32 and the trailing ones lose all accuracy.
    left = torch.linalg.qr(_times(a, omega)).Q
    for i in range(_POWER_ITERS):
        right = torch.linalg.qr(_times_t(a, left)).Q
        if i + 1 < _POWER_ITERS:
            left = torch.linalg.qr(_times(a, right)).Q
    return _full_svd(_times(a, right))


def _times(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for a thin ``b`` (few columns), formed as ``(bᵀ aᵀ)ᵀ``: with the thin
    factor on the left the CPU BLAS streams ``a`` ~30% faster (1.7 against 2.5 ms for a
    1024 × 2816 matrix and 26 columns, one thread; 27 against 37 ms for 32000 × 1024)."""
    return (b.mT @ a.mT).mT


def _times_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``aᵀ @ b`` for a thin ``b``, formed as ``(bᵀ a)ᵀ`` (see :func:`_times`)."""
    return (b.mT @ a).mT


def _full_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    return u, s


def _energy_rank(s: torch.Tensor, total: float, energy: float) -> int | None:
    """Smallest r with sum(s[:r]^2) >= energy * total, or None if ``s`` never gets there."""
    cum = torch.cumsum(s.double().square(), 0)
    # Slack of a few float32 ulps: with energy 1.0 an exactly low-rank matrix must stop at its
    # rank instead of chasing rounding noise in the trailing singular values.
    target = energy * total * (1.0 - 32 * torch.finfo(s.dtype).eps)
    hit = torch.nonzero(cum >= target)
    return int(hit[0]) + 1 if hit.numel() else None


def _numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """Count of singular values above the usual ``max(m, n) * eps * s_max`` noise floor."""
    if s.numel() == 0:
        return 0
    tol = float(s[0]) * max(shape) * torch.finfo(s.dtype).eps
    return int((s > tol).sum())


@serial()
def task_subspace(W: torch.Tensor, *, rank: int | Mapping[str, float] | None) -> torch.Tensor:
    """Top left singular vectors of one task's delta.

    Uses a seeded randomized SVD (oversampled, with power iterations) when the rank is small
    next to ``min(d_out, d_in)``, else a full ``torch.linalg.svd``; deterministic either way.

    Args:
        W: The delta, 2-D ``(d_out, d_in)``; tensors with more dims (conv kernels) are read as
            ``(shape[0], prod(shape[1:]))``.
        rank: An int r (clamped to ``min(d_out, d_in)``), or ``{"energy": e}`` with
            ``0 < e <= 1``: the smallest r whose top singular values keep a fraction e of
            ``||W||_F^2``. ``None`` means ``{"energy": 0.9}``. Directions with numerically zero
            singular values are never returned, so a zero W has rank 0.

    Returns:
        ``U`` of shape ``(d_out, r)`` with orthonormal columns, on W's device.

    Raises:
        ValueError: W has fewer than 2 dims, or the rank is out of range.
        TypeError: The rank is neither an int nor an ``{"energy": e}`` mapping.
    """
    fixed, energy = _parse_rank(rank)
    a = _as_matrix(W)
    d_out, d_in = a.shape
    small = min(d_out, d_in)
    if small == 0 or fixed == 0:
        return a.new_zeros(d_out, 0)

    if fixed is not None:
        # No ||W||² here: a zero W has no singular value above the noise floor, so it still
        # gets rank 0 (for a 32000 × 1024 delta the float64 norm cost as much as the sketch).
        want = min(fixed, small)
        q = want + _OVERSAMPLE
        u, s = _randomized_svd(a, q) if q * _SKETCH_FRACTION <= small else _full_svd(a)
        r = want
    else:
        # The energy target needs ||W||², in float64: it decides where the rank stops.
        total = float(torch.linalg.vector_norm(a, dtype=torch.float64)) ** 2
        if total == 0.0:
            return a.new_zeros(d_out, 0)
        r = None
        q = _FIRST_SKETCH
        while q * _SKETCH_FRACTION <= small:
            u, s = _randomized_svd(a, q)
            r = _energy_rank(s, total, energy)
            # Accept only a rank well inside the sketch: the last columns of a sketch are its
            # least accurate, and Ritz values under-estimate, so the target may be met late.
            if r is not None and r + _OVERSAMPLE <= q:
                break
            r = None
            q *= 2
        if r is None:
            u, s = _full_svd(a)
            r = _energy_rank(s, total, energy)
            # Rounding can leave the float32 spectrum a hair short of ||W||^2 itself.
            r = small if r is None else r
    r = min(r, _numerical_rank(s, (d_out, d_in)))
    return u[:, :r].contiguous()


def _check_bases(Us: Sequence[torch.Tensor], method: str, threshold: float) -> None:
    _check_method(method)
    _check_threshold(threshold)
    if len(Us) < 2:
        raise _too_few(len(Us))
    d = Us[0].shape[0]
    for i, u in enumerate(Us):
        if u.ndim != 2 or u.shape[0] != d:
            raise ValueError(f"subspace {i} has shape {tuple(u.shape)}; expected ({d}, r)")


def _sandwich_core(Us: Sequence[torch.Tensor]) -> torch.Tensor:
    """M = (U_1^T U_2)(U_2^T U_3)...(U_{k-1}^T U_k), an r_1 x r_k matrix, in float64."""
    pairs = pairwise(Us)
    a, b = next(pairs)
    m = (a.mT @ b).double()
    for a, b in pairs:
        m = m @ (a.mT @ b).double()
    return m


def _real_basis(vectors: torch.Tensor, eigvals: torch.Tensor) -> torch.Tensor:
    """Real columns spanning the same space as the given complex eigenvectors.

    A real eigenvalue's eigenvector is a complex multiple of a real one: keep whichever of its
    real and imaginary parts is larger. A conjugate pair spans {Re v, Im v}; LAPACK returns
    both members, so take the one with positive imaginary part and skip its partner.
    """
    cols = []
    for j in range(eigvals.numel()):
        v, im = vectors[:, j], float(eigvals[j].imag)
        if im == 0.0:
            re_part, im_part = v.real, v.imag
            bigger = re_part if re_part.norm() >= im_part.norm() else im_part
            cols.append(bigger)
        elif im > 0.0:
            cols.extend([v.real, v.imag])
    return torch.stack(cols, 1)


def _orthonormalise(cols: torch.Tensor) -> torch.Tensor:
    """QR of unit-normed columns, dropping columns that are (numerically) dependent."""
    with serial():
        cols = cols / cols.norm(dim=0, keepdim=True).clamp_min(torch.finfo(cols.dtype).tiny)
        q, r = torch.linalg.qr(cols)
    # Unpivoted QR has no rank reveal of its own; a tiny diagonal entry of R marks a column
    # already in the span of the earlier ones, and its Q column is an arbitrary direction.
    keep = r.diagonal().abs() > 1e-6
    return q[:, keep]


@serial()
def shared_subspace(
    Us: Sequence[torch.Tensor], *, method: str = "sandwich", threshold: float = 0.85
) -> torch.Tensor:
    """Orthonormal basis Z of the directions that (nearly) every task subspace contains.

    All three methods work on small matrices (sizes r_i or sum r_i) and never form a
    ``d x d`` projector.

    * ``sandwich``: SVD ``G = (U_1^T U_2)...(U_{k-1}^T U_k) = Y S X^T``; Z = U_1 Y[:, s^2 >=
      threshold]. For k = 2 the s_j are the cosines of the principal angles.
    * ``chain``: eigenvectors of ``P_1 P_2 ... P_k`` (P_i = U_i U_i^T) whose eigenvalue has real
      part > threshold, orthonormalised by QR. The product equals ``U_1 M U_k^T`` with M as in
      ``sandwich``, so its nonzero eigenpairs come from the r_k x r_k matrix ``U_k^T U_1 M``:
      ``(U_k^T U_1 M) v = lambda v`` gives the eigenvector ``U_1 M v``. For k >= 4 the result
      can depend on the order of the tasks (products of 3+ projectors do not commute and can
      have complex eigenvalues). ``sandwich`` is order-dependent too for partly shared
      directions when k >= 3 (exactly shared ones always get s = 1); only ``mean_projector``
      is fully order-free.
    * ``mean_projector``: eigenvectors of ``(1/k) sum P_i`` with eigenvalue >= threshold, read
      off the SVD of ``[U_1 ... U_k] / sqrt(k)`` (eigenvalues are squared singular values);
      an eigenvalue m/k means "in m of the k subspaces".

    Args:
        Us: Task subspaces, each ``(d, r_i)`` with orthonormal columns (r_i may be 0).
        method: ``"sandwich"``, ``"chain"`` or ``"mean_projector"``.
        threshold: Cut-off in (0, 1], see above.

    Returns:
        Z of shape ``(d, s)`` with orthonormal columns; s may be 0.

    Raises:
        ValueError: Fewer than 2 subspaces, an unknown method, a threshold out of range, or
            subspaces with different row counts.
    """
    _check_bases(Us, method, threshold)
    d, dtype = Us[0].shape[0], Us[0].dtype
    empty = Us[0].new_zeros(d, 0)

    if method == "mean_projector":
        stacked = torch.cat(list(Us), 1)
        if stacked.shape[1] == 0:
            return empty
        stacked = stacked / len(Us) ** 0.5
        u, s = _full_svd(stacked)
        return u[:, s.double().square() >= threshold].contiguous()

    if any(u.shape[1] == 0 for u in Us):
        return empty
    m = _sandwich_core(Us)
    if method == "sandwich":
        y, s = _full_svd(m)
        keep = s.square() >= threshold
        return (Us[0] @ y[:, keep].to(dtype)).contiguous()

    small = (Us[-1].mT @ Us[0]).double() @ m
    lam, v = torch.linalg.eig(small)
    keep = lam.real > threshold
    if not bool(keep.any()):
        return empty
    # Map to the big space before taking real parts: U_1 M is real, so Re/Im commute with it.
    big = (Us[0].double() @ m).to(v.dtype) @ v[:, keep]
    return _orthonormalise(_real_basis(big, lam[keep])).to(dtype).contiguous()


def _sq_norm(x: torch.Tensor) -> float:
    # float32 accumulation (torch reduces in blocks, so the error stays near 1e-6 relative):
    # a float64 copy of every delta cost more than the SVDs of a large model.
    return float(torch.linalg.vector_norm(x)) ** 2 if x.numel() else 0.0


def _check_deltas(deltas: Sequence[torch.Tensor]) -> None:
    k = len(deltas)
    if k < 2:
        raise _too_few(k)
    shape = deltas[0].shape
    for i, w in enumerate(deltas):
        if w.shape != shape:
            raise ValueError(f"delta {i} has shape {tuple(w.shape)}; delta 0 has {tuple(shape)}")
        if w.device != deltas[0].device:
            raise ValueError(f"delta {i} is on {w.device}; delta 0 is on {deltas[0].device}")


def _check_options(method: str, threshold: float, rank: Any, vectors_1d: str) -> None:
    _check_method(method)
    _check_threshold(threshold)
    if vectors_1d not in VECTORS_1D:
        raise ValueError(f"vectors_1d must be one of {list(VECTORS_1D)}, got {vectors_1d!r}")
    _parse_rank(rank)


def subspace_mode(shape: Sequence[int], excluded: bool) -> bool:
    """Whether a tensor of this shape is split by subspace (2+ dims, none of them empty, not
    excluded); an empty matrix goes the way of 1-D tensors (every part of it is empty)."""
    return not excluded and len(shape) >= 2 and 0 not in shape


@serial()
def decompose_factors(
    deltas: Sequence[torch.Tensor],
    *,
    method: str = "sandwich",
    threshold: float = 0.85,
    rank: int | Mapping[str, float] | None = None,
    excluded: bool = False,
    parallel: Any = map,
) -> dict[str, torch.Tensor]:
    """What a decomposition of one tensor has to remember: its shared basis, not its parts.

    For a tensor split by subspace (see :func:`subspace_mode`): ``{"basis": Z, "ranks": r}``
    with Z the orthonormal ``(d_out, s)`` shared basis (:func:`shared_subspace` of each
    delta's :func:`task_subspace`) and r the per-task ranks (int64). Every part follows from
    Z and the deltas (:func:`decomposition_parts`), so this is all a cache has to keep: a few
    columns per tensor instead of two full tensors per task. Other tensors need nothing
    (``{}``): their split is fixed by ``vectors_1d``.

    Args:
        deltas: The deltas of one tensor (targets, then references).
        method, threshold, rank: As in :func:`decompose`.
        excluded: Treat the tensor like a 1-D one.
        parallel: ``map``-like function to run the per-task SVDs with (the executor passes
            its thread pool; each SVD is deterministic on its own).
    """
    _check_deltas(deltas)
    if not subspace_mode(deltas[0].shape, excluded):
        return {}
    shape = deltas[0].shape
    mats = [w.reshape(shape[0], -1) for w in deltas]
    Us = list(parallel(lambda a: task_subspace(a, rank=rank), mats))
    z = shared_subspace(Us, method=method, threshold=threshold)
    ranks = torch.tensor([int(u.shape[1]) for u in Us], dtype=torch.int64)
    return {"basis": z.contiguous(), "ranks": ranks}


@serial()
def shared_coefficients(deltas: Sequence[torch.Tensor], factors: Mapping[str, torch.Tensor],
                        parallel: Any = map) -> list[torch.Tensor] | None:
    """Zᵀ·W_i for each delta (s × columns), or None outside subspace mode: the one product
    both the parts and the report's shared energies need (``parallel``: as in
    :func:`decompose_factors`, one delta each)."""
    if "basis" not in factors:
        return None
    z = factors["basis"].to(deltas[0].device)
    rows = deltas[0].shape[0]
    return list(parallel(lambda w: z.mT @ w.reshape(rows, -1).to(z.dtype), list(deltas)))


@serial()
def decomposition_parts(
    deltas: Sequence[torch.Tensor],
    factors: Mapping[str, torch.Tensor],
    *,
    vectors_1d: str = "unique",
    shared: Sequence[bool] | None = None,
    unique: Sequence[bool] | None = None,
    reuse: Sequence[bool] | None = None,
    coefficients: Sequence[torch.Tensor] | None = None,
    parallel: Any = map,
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Shared and unique parts of each delta from the factors :func:`decompose_factors` kept.

    By subspace: ``shared_i = Z (Zᵀ W_i)``, ``unique_i = W_i − shared_i`` (one product with
    Zᵀ and one fused multiply-add per part). Otherwise ``vectors_1d``: ``unique`` gives
    shared None (an exact zero) and unique W_i itself (not a copy); ``mean`` gives the task
    mean (one tensor, shared by every task) and ``W_i − mean``.

    Args:
        shared, unique: Per delta, whether that part is wanted (default: all); a part not
            wanted comes back as None without being computed.
        reuse: Per delta, whether its unique part may be written into it (nothing reads the
            delta afterwards): same bytes, without a fresh tensor-sized allocation.
        coefficients: :func:`shared_coefficients` of the deltas, if already computed.
        parallel: As in :func:`decompose_factors` (one delta's parts each).
    """
    k = len(deltas)
    want_sh = list(shared) if shared is not None else [True] * k
    want_un = list(unique) if unique is not None else [True] * k
    sh: list[torch.Tensor | None] = [None] * k
    un: list[torch.Tensor | None] = [None] * k
    if "basis" not in factors:
        if vectors_1d == "unique":
            return sh, [w if want_un[i] else None for i, w in enumerate(deltas)]
        if not any(want_sh) and not any(want_un):
            return sh, un
        mean = torch.stack(list(deltas)).mean(0)
        return ([mean if want_sh[i] else None for i in range(k)],
                [w - mean if want_un[i] else None for i, w in enumerate(deltas)])
    shape = deltas[0].shape
    z = factors["basis"].to(deltas[0].device)

    def parts(i: int) -> None:
        w = deltas[i]
        # Project in Z's precision (float32 at least); half-precision deltas come back as such.
        a = w.reshape(shape[0], -1).to(z.dtype)
        coeff = z.mT @ a if coefficients is None else coefficients[i]
        if want_un[i]:
            if reuse is not None and reuse[i] and a.data_ptr() == w.data_ptr():
                un[i] = a.addmm_(z, coeff, alpha=-1).reshape(shape)
            else:
                un[i] = torch.addmm(a, z, coeff, alpha=-1).to(w.dtype).reshape(shape)
        if want_sh[i]:
            sh[i] = (z @ coeff).to(w.dtype).reshape(shape)

    list(parallel(parts, [i for i in range(k) if want_sh[i] or want_un[i]]))
    return sh, un


@serial()
def decomposition_info(
    deltas: Sequence[torch.Tensor],
    factors: Mapping[str, torch.Tensor],
    *,
    vectors_1d: str = "unique",
    excluded: bool = False,
    coefficients: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The run-report facts of one tensor's decomposition (see :class:`Decomposition`).

    Shared energies by subspace come from ``||Zᵀ W_i||²`` (Z is orthonormal), never from the
    parts themselves.
    """
    totals = [_sq_norm(w) for w in deltas]
    if "basis" not in factors:
        prefix = "excluded" if excluded else "1d"
        if vectors_1d == "unique":
            energy = [0.0] * len(deltas)
        else:
            mean_sq = _sq_norm(torch.stack(list(deltas)).mean(0))
            energy = [mean_sq / t if t > 0.0 else 0.0 for t in totals]
        return {"ranks": [], "shared_dim": 0, "shared_energy": energy,
                "mode": f"{prefix}-{vectors_1d}"}
    z = factors["basis"]
    coefficients = coefficients or shared_coefficients(deltas, factors)
    energy = []
    for c, total in zip(coefficients, totals):
        kept = _sq_norm(c) if z.shape[1] else 0.0
        energy.append(min(kept / total, 1.0) if total > 0.0 else 0.0)
    return {"ranks": [int(r) for r in factors["ranks"]], "shared_dim": int(z.shape[1]),
            "shared_energy": energy, "mode": "subspace"}


@serial()
def decompose(
    deltas: Sequence[torch.Tensor],
    *,
    method: str = "sandwich",
    threshold: float = 0.85,
    rank: int | Mapping[str, float] | None = None,
    vectors_1d: str = "unique",
    excluded: bool = False,
) -> Decomposition:
    """Split each task's delta of one tensor into a shared and a unique part.

    For tensors with 2+ dims (conv kernels read as ``(out, in*kh*kw)``): U_i =
    ``task_subspace(W_i, rank=rank)``, Z = ``shared_subspace(Us, method=..., threshold=...)``,
    ``shared_i = Z (Z^T W_i)`` and ``unique_i = W_i - shared_i``. The shared subspace comes from
    all deltas given, and every delta gets its split. Tensors with fewer than 2 dims and
    excluded tensors follow ``vectors_1d``: ``"unique"`` (shared 0, unique = delta) or
    ``"mean"`` (shared = task mean, unique = delta - mean; here shared and unique are not
    orthogonal per task, only their sums over tasks are, so ``shared_energy`` may exceed 1).

    This is :func:`decompose_factors`, :func:`decomposition_parts` and
    :func:`decomposition_info` in one call, with every part a tensor of its own.

    Args:
        deltas: Deltas W_1..W_k of one tensor, same shape and device.
        method: Shared-subspace rule, see ``shared_subspace``.
        threshold: Its cut-off in (0, 1].
        rank: Per-task rank, see ``task_subspace``; ``None`` means ``{"energy": 0.9}``.
        vectors_1d: ``"unique"`` or ``"mean"``, for 1-D and excluded tensors.
        excluded: Treat this tensor like a 1-D one (embeddings, by default).

    Returns:
        A ``Decomposition`` with one shared and one unique tensor per delta.

    Raises:
        ValueError: Fewer than 2 deltas, mismatched shapes, or a bad option.
    """
    _check_options(method, threshold, rank, vectors_1d)
    factors = decompose_factors(deltas, method=method, threshold=threshold, rank=rank,
                                excluded=excluded)
    coefficients = shared_coefficients(deltas, factors)
    shared, unique = decomposition_parts(deltas, factors, vectors_1d=vectors_1d,
                                         coefficients=coefficients)
    shared = [torch.zeros_like(w) if s is None else s for s, w in zip(shared, deltas)]
    unique = [w.clone() if u is w else u for u, w in zip(unique, deltas)]
    if "basis" not in factors and vectors_1d == "mean":
        shared = [s.clone() for s in shared]
    info = decomposition_info(deltas, factors, vectors_1d=vectors_1d, excluded=excluded,
                              coefficients=coefficients)
    return Decomposition(shared=shared, unique=unique, info=info)


def dense_shared_subspace(
    Us: Sequence[torch.Tensor], method: str = "sandwich", threshold: float = 0.85
) -> torch.Tensor:
    """Reference for tests: ``shared_subspace`` computed from explicit ``d x d`` projectors.

    Works in float64. ``sandwich`` keeps left singular vectors of ``P_1 ... P_k`` with squared
    singular value >= threshold (the product's singular values are those of the small G);
    ``chain`` takes eigenvectors of the product; ``mean_projector`` an ``eigh`` of the mean.
    Memory is O(d^2): never call it on real weights.

    Args:
        Us: Task subspaces, each ``(d, r_i)`` with orthonormal columns.
        method: As in ``shared_subspace``.
        threshold: As in ``shared_subspace``.

    Returns:
        Z of shape ``(d, s)`` with orthonormal columns, float64.
    """
    _check_bases(Us, method, threshold)
    projs = [u.double() @ u.double().mT for u in Us]
    if method == "mean_projector":
        lam, vec = torch.linalg.eigh(torch.stack(projs).mean(0))
        return vec[:, lam >= threshold]
    prod = projs[0]
    for p in projs[1:]:
        prod = prod @ p
    if method == "sandwich":
        u, s, _ = torch.linalg.svd(prod)
        return u[:, s.square() >= threshold]
    lam, vec = torch.linalg.eig(prod)
    keep = lam.real > threshold
    if not bool(keep.any()):
        return prod.new_zeros(prod.shape[0], 0)
    return _orthonormalise(_real_basis(vec[:, keep], lam[keep]))
