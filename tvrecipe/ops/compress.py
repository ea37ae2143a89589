"""Compressed task-vector bases (Zeng et al., task vector bases, later versions).

n task vectors v_1 … v_T (the columns of a D × T matrix V that is never formed) become M < T
atoms s_m = Σ_t C[t, m] v_t, and each task is rebuilt as v̂_t = Σ_t' R[t', t] v_t', that is
v̂_t = μ + Σ_m W[m, t] s_m for PCA (μ the task mean) and Σ_m W[m, t] s_m for the autoencoder.
Everything here works on the T × T Gram matrix G = VᵀV, accumulated tensor by tensor in one
streaming pass; the atoms are then combined per tensor (or row block) from the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tvrecipe.ops.parallel import serial

__all__ = ["CompressedBasis", "autoencoder_basis", "combine", "pca_basis"]


@dataclass
class CompressedBasis:
    """A basis of M atoms for T tasks, as combinations of the tasks.

    Attributes:
        atoms: T × M float64: atom m is Σ_t atoms[t, m] · v_t.
        decoder: M × T float64: W, the weights of the atoms in each task's rebuild.
        mean: Whether the rebuild adds the task mean μ (PCA).
        rebuild: T × T float64: v̂_t = Σ_t' rebuild[t', t] · v_t' (atoms·decoder, + 1/T for
            the mean).
        errors: Per task, ‖v_t − v̂_t‖² / ‖v_t‖² (0 for a zero task vector).
        loss: Σ_t ‖v_t − v̂_t‖² / T².
        bound: The Eckart–Young bound on ``loss`` for M atoms: Σ_{i>M} λ_i / T², with λ the
            eigenvalues of G (of the centred Gram for PCA, which reaches it).
        info: Method facts for the report (the autoencoder's final loss, its steps).
    """

    atoms: torch.Tensor
    decoder: torch.Tensor
    mean: bool
    rebuild: torch.Tensor
    errors: list[float]
    loss: float
    bound: float
    info: dict[str, Any]


def _check(gram: torch.Tensor, m: int) -> int:
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"the Gram matrix must be square and non-empty, got {tuple(gram.shape)}")
    t = gram.shape[0]
    if not 1 <= m < t:
        raise ValueError(f"m = {m} atoms for {t} task vectors: a compressed basis needs "
                         f"1 <= m < {t}")
    if not bool(torch.isfinite(gram).all()):
        raise ValueError("the Gram matrix of the task vectors holds NaN or Inf (so does a task "
                         "vector, let in by --allow-nonfinite?): a compressed basis needs "
                         "finite task vectors; fix the checkpoint")
    return t


def _errors(gram: torch.Tensor, rebuild: torch.Tensor) -> tuple[list[float], float]:
    """Per-task relative squared rebuild errors and the total loss, exactly from G."""
    t = gram.shape[0]
    resid = torch.eye(t, dtype=torch.float64) - rebuild
    sq = torch.einsum("it,ij,jt->t", resid, gram, resid).clamp_min(0.0)
    norms = gram.diagonal()
    errors = [float(e / n) if float(n) > 0.0 else 0.0 for e, n in zip(sq, norms)]
    return errors, float(sq.sum()) / t**2


def _tail(eigenvalues: torch.Tensor, m: int) -> float:
    """Σ of all but the m largest eigenvalues (clipped at 0)."""
    lam = torch.sort(eigenvalues.clamp_min(0.0), descending=True).values
    return float(lam[m:].sum())


@serial()
def pca_basis(gram: torch.Tensor, m: int) -> CompressedBasis:
    """PCA of the task vectors through their Gram matrix.

    With H = I − 11ᵀ/T, the centred vectors are V·H and their Gram is H·G·H = E Λ Eᵀ (eigh,
    eigenvalues descending). Atom m is the principal direction scaled by its singular value,
    s_m = V·H·e_m (so ‖s_m‖² = λ_m), and the coefficients are W = E[:, :M]ᵀ; the rebuild
    adds the mean back: v̂_t = μ + Σ_m W[m, t] s_m. With M = T − 1 every task is rebuilt
    exactly (the centred vectors span at most T − 1 dimensions). Each eigenvector's sign is
    fixed (largest-magnitude entry positive), so the atoms do not flip between runs.
    """
    t = _check(gram, m)
    g = gram.double().cpu()  # (the runner's Gram matrices are on the CPU; a caller's may not be)
    h = torch.eye(t, dtype=torch.float64) - 1.0 / t
    lam, vec = torch.linalg.eigh(h @ g @ h)
    order = torch.argsort(lam, descending=True, stable=True)
    lam, vec = lam[order], vec[:, order]
    top = vec[:, :m]
    signs = torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True))).squeeze(0)
    top = top * torch.where(signs == 0, 1.0, signs)
    atoms = h @ top
    decoder = top.T.contiguous()
    rebuild = atoms @ decoder + 1.0 / t
    errors, loss = _errors(g, rebuild)
    return CompressedBasis(atoms=atoms, decoder=decoder, mean=True, rebuild=rebuild,
                           errors=errors, loss=loss, bound=_tail(lam, m) / t**2,
                           info={"explained": _explained(lam, m)})


def _explained(lam: torch.Tensor, m: int) -> float:
    lam = lam.clamp_min(0.0)
    total = float(lam.sum())
    return float(lam[:m].sum()) / total if total > 0.0 else 1.0


@serial()
def autoencoder_basis(gram: torch.Tensor, m: int, *, seed: int, steps: int = 6000,
                      lr: float = 1e-2, temperature: float = 5.0) -> CompressedBasis:
    """Atoms that are convex combinations of the tasks, learned on the Gram matrix.

    Encoder B = softmax(A / temperature) over the tasks, column by column (A ∈ ℝ^{T×M} drawn
    from N(0, 1) with ``seed``), so atom m is s_m = Σ_t B[t, m] v_t with B[:, m] ≥ 0 summing
    to 1; linear decoder W ∈ ℝ^{M×T}, starting at 0. Adam (``lr``) minimises
    tr((BW − I)ᵀ G (BW − I)) / T² = Σ_t ‖v_t − v̂_t‖² / T² for ``steps`` steps, in float64 on
    the CPU, so the same G and seed give the same bits. G is scaled by its mean diagonal for
    the optimisation (Adam's steps do not depend on the scale; its epsilon would); the loss
    reported is on G itself.
    """
    t = _check(gram, m)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    g = gram.double().cpu()
    scale = float(g.diagonal().mean())
    g_n = g / scale if scale > 0.0 else g
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(t, m, generator=gen, dtype=torch.float64).requires_grad_(True)
    decoder = torch.zeros(m, t, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(t, dtype=torch.float64)
    opt = torch.optim.Adam([logits, decoder], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=False)
            resid = torch.softmax(logits / temperature, dim=0) @ decoder - eye
            loss = torch.einsum("it,ij,jt->", resid, g_n, resid) / t**2
            loss.backward()
            opt.step()
    with torch.no_grad():
        atoms = torch.softmax(logits / temperature, dim=0).detach().clone()
        w = decoder.detach().clone()
    rebuild = atoms @ w
    errors, total = _errors(g, rebuild)
    lam = torch.linalg.eigvalsh(g)
    return CompressedBasis(atoms=atoms, decoder=w, mean=False, rebuild=rebuild, errors=errors,
                           loss=total, bound=_tail(lam, m) / t**2,
                           info={"steps": steps, "lr": lr, "temperature": temperature})


def combine(xs: list[torch.Tensor], weights: list[float],
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i weights[i] · xs[i], in the given order (entrywise, so the same bits whatever the
    block of rows): the atoms from the inputs, and each rebuild from the atoms."""
    acc = torch.mul(xs[0], weights[0], out=out) if out is not None else xs[0] * weights[0]
    for x, w in zip(xs[1:], weights[1:]):
        acc.add_(x, alpha=w)
    return acc
