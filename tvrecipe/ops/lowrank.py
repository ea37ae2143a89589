"""Low-rank factors of a 2-D delta: the truncated SVD that a LoRA adapter stores."""

from __future__ import annotations

import torch

from tvrecipe.ops.parallel import serial

# Above this many singular values wanted, relative to the smaller side, a full SVD is as
# cheap as the randomised one and exact.
_FULL_FRACTION = 0.25
_OVERSAMPLE = 10
_POWER_ITERATIONS = 3


def _orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of a tall ``y``: Cholesky QR, twice (CholQR2: as
    accurate as Householder QR for the well-conditioned sketches here, and 15x faster on
    32000 x 42, where LAPACK's QR took 0.5 s); Householder QR when the Gram matrix is
    singular (a delta of lower rank than the sketch)."""
    for _ in range(2):
        r, info = torch.linalg.cholesky_ex(y.T @ y, upper=True)
        if int(info):
            return torch.linalg.qr(y).Q
        y = torch.linalg.solve_triangular(r, y, upper=True, left=False)
    return y


def _range_finder(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """An orthonormal basis (columns) of about the top-``k`` left singular subspace of ``x``:
    a seeded Gaussian sketch, refined by power iterations with re-orthonormalisation (Halko,
    Martinsson and Tropp, 2011)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sketch = torch.randn(x.shape[1], k, generator=gen, dtype=x.dtype).to(x.device)
    q = _orthonormalize(x @ sketch)
    for _ in range(_POWER_ITERATIONS):
        q = _orthonormalize(x.T @ q)
        q = _orthonormalize(x @ q)
    return q


def _full_svd(shape: tuple[int, int], rank: int | None, energy: float | None) -> bool:
    """Whether the truncated SVD of a matrix of ``shape`` is taken from a full (LAPACK) SVD:
    for ``energy`` (it needs the whole spectrum) and for a rank within ``_OVERSAMPLE`` of a
    quarter of the smaller side, where the randomised one saves nothing."""
    small = min(shape)
    return energy is not None or min(int(rank), small) + _OVERSAMPLE >= _FULL_FRACTION * small


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values (of ``s``, descending) whose squares hold a share
    ``energy`` of Σσ²; 0 when every σ is 0."""
    power = s.to("cpu", torch.float64) ** 2  # (a few numbers: the same answer on any device)
    total = float(power.sum())
    if total == 0.0:
        return 0
    share = torch.cumsum(power, 0) / total
    r = int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype))) + 1
    return min(r, s.numel())


@serial()
def truncated_svd(x: torch.Tensor, rank: int | None = None, energy: float | None = None,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of the best rank-r approximation of ``x`` (float32 or float64, 2-D).

    Give ``rank`` (r = min(rank, min(m, n))) or ``energy`` (the smallest r whose singular
    values hold that share of Σσ², which needs the whole spectrum: a full SVD). A small rank
    of a large matrix uses a seeded randomised SVD (same bytes on every run), anything else
    the full one.
    """
    m, n = x.shape
    small = min(m, n)
    if energy is not None:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        r = energy_rank(s, energy)
        return u[:, :r], s[:r], vh[:r]
    r = min(int(rank), small)
    if _full_svd((m, n), rank, None):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    q = _range_finder(x, r + _OVERSAMPLE, seed)
    u_small, s, vh = torch.linalg.svd(q.T @ x, full_matrices=False)
    return (q @ u_small)[:, :r], s[:r], vh[:r]


@serial()
def lora_factors(x: torch.Tensor, rank: int | None = None, energy: float | None = None,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """B (m × r) and A (r × n) with B·A the truncated SVD of ``x`` (B = U·√Σ, A = √Σ·Vᴴ), the
    relative Frobenius error ‖x − B·A‖ / ‖x‖ (0 for a zero ``x``) and ‖x‖."""
    # float32 for the randomised SVD of large matrices (half the time of float64; its
    # error is far below the truncation's), float64 where a full SVD is taken.
    work = x.double() if _full_svd(tuple(x.shape), rank, energy) else x.float()
    u, s, vh = truncated_svd(work, rank, energy, seed)
    root = s.sqrt()
    b = u * root
    a = root[:, None] * vh
    norm2 = _squares(work)
    if norm2 == 0.0:
        return b.to(torch.float32), a.to(torch.float32), 0.0, 0.0
    # B·A = U_r·U_rᵀ·x is an orthogonal projection of x, so ‖x − B·A‖² = ‖x‖² − Σ_{i≤r} σ_i²
    # (no m × n product). Where that difference is too small for the float32 σ's, the error
    # is computed outright.
    share = max(norm2 - float((s.double() ** 2).sum()), 0.0) / norm2
    if share < 1e-4:
        share = _squares(work, b, a) / norm2
    return b.to(torch.float32), a.to(torch.float32), share ** 0.5, norm2 ** 0.5


# Rows of x summed at a time in float64 by _squares: about 32 MB of float64 (an embedding's
# whole float64 copy, and its residual's, were 2-4 GB at a 128k vocabulary).
_SQUARES_ENTRIES = 1 << 22


def _squares(x: torch.Tensor, b: torch.Tensor | None = None,
             a: torch.Tensor | None = None) -> float:
    """‖x‖²_F, or ‖x − b·a‖²_F with ``b`` and ``a``, in float64, by row blocks (in order, so
    the same bytes on any machine): no float64 copy of x is made."""
    rows = max(1, _SQUARES_ENTRIES // max(1, x.shape[1]))
    total = 0.0
    for i in range(0, x.shape[0], rows):
        block = x[i:i + rows].double()
        if b is not None:  # (a new tensor: a float64 x's rows are not changed)
            block = block - b[i:i + rows].double() @ a.double()
        total += float(torch.linalg.vector_norm(block) ** 2)
    return total
