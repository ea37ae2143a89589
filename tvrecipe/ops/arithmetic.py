"""Task-arithmetic kernels: extract, scale, negate, sum, mean, apply (Ilharco et al., 2023)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

__all__ = ["apply", "divide", "divide_", "extract", "mean", "negate", "scale", "sum"]


# Entries of the pieces in which a base kept in a lower precision is widened (see extract).
WIDEN_PIECE = 1 << 18


def extract(base: torch.Tensor, finetuned: torch.Tensor, *,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Task vector of one tensor: ``finetuned - base``.

    Args:
        base: Pre-trained weights, in the compute dtype, or as stored in a lower precision
            (a 16-bit float tensor): then it is widened piece by piece (the same values,
            without a widened copy of the whole tensor).
        finetuned: Fine-tuned weights of the same shape, in the compute dtype.
        out: Where to write it (may be ``finetuned``); a new tensor when None.

    Returns:
        ``finetuned - base``.
    """
    if not _narrower(base, finetuned):
        return torch.sub(finetuned, base, out=out)
    if out is None:
        out = torch.empty_like(finetuned, memory_format=torch.contiguous_format)
    return _by_pieces(lambda a, b, o: torch.sub(a, b, out=o), finetuned, base, out)


def _narrower(narrow: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``narrow`` is a floating tensor of a lower precision than ``x``'s (a base kept
    as stored, see :func:`extract`)."""
    return (narrow.dtype != x.dtype and narrow.is_floating_point() and x.is_floating_point()
            and narrow.dtype.itemsize < x.dtype.itemsize)


def _by_pieces(fn, x: torch.Tensor, narrow: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``fn(x_piece, narrow_piece widened to x's dtype, out_piece)`` over flat pieces of
    ``WIDEN_PIECE`` entries (the tensors share a shape; ``out`` may be ``x``); in one piece
    when one of them is not laid out contiguously."""
    if not (x.is_contiguous() and narrow.is_contiguous() and out.is_contiguous()):
        fn(x, narrow.to(x.dtype), out)
        return out
    xf, nf, of = x.view(-1), narrow.view(-1), out.view(-1)
    for s in range(0, xf.numel(), WIDEN_PIECE):
        e = min(s + WIDEN_PIECE, xf.numel())
        fn(xf[s:e], nf[s:e].to(x.dtype), of[s:e])
    return out


def scale(x: torch.Tensor, *, factor: float) -> torch.Tensor:
    """``factor * x``."""
    return torch.mul(x, factor)


def negate(x: torch.Tensor) -> torch.Tensor:
    """``-x`` (forgetting a task)."""
    return torch.neg(x)


def sum(inputs: Sequence[torch.Tensor], *, weights: Sequence[float],
        out: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum ``Σ w_i τ_i``, accumulated in place in one buffer.

    Args:
        inputs: Task vectors of one tensor, all of one shape and dtype.
        weights: One weight per input.
        out: The buffer to accumulate in: a new tensor when None, else a tensor of the
            inputs' shape and dtype that is no input but the first (the result replaces it).

    Returns:
        The weighted sum (``out`` when given).
    """
    if len(inputs) != len(weights):
        raise ValueError(f"sum got {len(inputs)} inputs but {len(weights)} weights")
    if not inputs:
        raise ValueError("sum needs at least one input")
    out = torch.mul(inputs[0], weights[0], out=out)
    for x, w in zip(inputs[1:], weights[1:]):
        out.add_(x, alpha=w)
    return out


def mean(inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Unweighted mean ``(1/n) Σ τ_i``."""
    n = len(inputs)
    return divide_(sum(inputs, weights=[1.0] * n), n)


def _divisor(x: torch.Tensor, d: float) -> tuple[torch.Tensor, bool]:
    # A 0-dim tensor on x's device: CUDA divides by a number, or by a 0-dim CPU tensor, as a
    # product with its reciprocal (an ulp off at times), by a device tensor truly. Float16 and
    # bfloat16 divide in float32, as the CPU does for a number, and round once.
    half = x.dtype in (torch.float16, torch.bfloat16)
    dtype = torch.float32 if half else x.dtype
    # (-0.0 == 0.0 as a cache key: a zero divisor is made each time, with its sign.)
    made = _scalar(d, dtype, x.device) if d else torch.tensor(d, dtype=dtype, device=x.device)
    return made, half


@functools.lru_cache(maxsize=256)
def _scalar(d: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim tensor holding ``d``, made once per value (only ever read: a divisor). DARE
    divides every row block of every member: ``torch.tensor`` each time was a tenth of the
    time its threads held the GIL on the large benchmark. (Made outside inference mode, so
    that a later call with autograd on can still use it.)"""
    with torch.inference_mode(False):
        return torch.tensor(d, dtype=dtype, device=device)


def divide(x: torch.Tensor, d: float) -> torch.Tensor:
    """``x / d`` for a number d, with the CPU's rounding on every device (a new tensor)."""
    t, half = _divisor(x, d)
    return (x.float() / t).to(x.dtype) if half else x / t


def divide_(x: torch.Tensor, d: float) -> torch.Tensor:
    """``x /= d`` in place for a number d, with the CPU's rounding on every device."""
    t, half = _divisor(x, d)
    return x.copy_(x.float().div_(t)) if half else x.div_(t)


def apply(base: torch.Tensor, delta: torch.Tensor, *, scale: float = 1.0,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """Edited weights ``θ₀ + scale · τ`` (into ``out``, which may be ``base`` or ``delta``).

    Two roundings, ``θ₀ + (scale · τ)``, not a fused multiply-add (which ``torch.add(...,
    alpha=)`` is on CPU and GPU): each is one IEEE operation in the tensors' dtype, so every
    device, and the numpy executor of reruns (:mod:`tvrecipe.exec.light`), gives the same bits.
    A base as stored in a lower precision (see :func:`extract`) is widened piece by piece.
    """
    if _narrower(base, delta):
        out = torch.mul(delta, scale, out=None if out is base else out)
        return _by_pieces(lambda a, b, o: torch.add(a, b, out=o), out, base, out)
    if out is delta:
        return delta.mul_(scale).add_(base)
    if out is base:
        return base.add_(torch.mul(delta, scale))
    return torch.mul(delta, scale, out=out).add_(base)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite: one reduction, and the exact mask only when
    the sum is not finite (finite entries sum to a finite float32 number unless they are
    huge, so a healthy tensor pays for the sum alone)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
