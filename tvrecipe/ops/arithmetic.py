"""Task-arithmetic kernels: extract, scale, negate, sum, mean, apply (Ilharco et al., 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["apply", "extract", "mean", "negate", "scale", "sum"]


def extract(base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """Task vector of one tensor: ``finetuned - base``.

    Args:
        base: Pre-trained weights, in the compute dtype.
        finetuned: Fine-tuned weights of the same shape and dtype.

    Returns:
        A new tensor ``finetuned - base``.
    """
    return torch.sub(finetuned, base)


def scale(x: torch.Tensor, *, factor: float) -> torch.Tensor:
    """``factor * x``."""
    return torch.mul(x, factor)


def negate(x: torch.Tensor) -> torch.Tensor:
    """``-x`` (forgetting a task)."""
    return torch.neg(x)


def sum(inputs: Sequence[torch.Tensor], *, weights: Sequence[float]) -> torch.Tensor:
    """Weighted sum ``Σ w_i τ_i``, accumulated in place in one buffer.

    Args:
        inputs: Task vectors of one tensor, all of one shape and dtype.
        weights: One weight per input.

    Returns:
        A new tensor with the weighted sum.
    """
    if len(inputs) != len(weights):
        raise ValueError(f"sum got {len(inputs)} inputs but {len(weights)} weights")
    if not inputs:
        raise ValueError("sum needs at least one input")
    out = torch.mul(inputs[0], weights[0])
    for x, w in zip(inputs[1:], weights[1:]):
        out.add_(x, alpha=w)
    return out


def mean(inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Unweighted mean ``(1/n) Σ τ_i``."""
    n = len(inputs)
    return sum(inputs, weights=[1.0] * n).div_(n)


def apply(base: torch.Tensor, delta: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """Edited weights ``θ₀ + scale · τ``."""
    return torch.add(base, delta, alpha=scale)
