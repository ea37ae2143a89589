"""Tensors made only when an op asks for them, one at a time.

An op that folds its inputs in one by one (``StepSpec.folds``: TSV-M's per-task spectra,
Iso's running sum) may be handed :class:`Deferred` members in place of tensors: each is read
from its checkpoint, and turned into a task vector, when the op calls it, and is gone once
the op drops it. Eight task vectors of an embedding then never sit in memory together.
Calling one again reads it again (Iso-CTS's second pass over the tasks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["Deferred", "made"]


class Deferred:
    """A tensor of known shape, dtype and device that ``make()`` produces on each call.

    The result of a call belongs to the caller alone: kernels may write into it.
    """

    __slots__ = ("_make", "device", "dtype", "shape")

    def __init__(self, make: Callable[[], torch.Tensor], shape: tuple[int, ...],
                 dtype: torch.dtype, device: torch.device):
        self._make = make
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device = device

    def __call__(self) -> torch.Tensor:
        return self._make()

    def then(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Deferred:
        """``fn`` of this tensor, when asked for (``fn`` may write into its argument)."""
        return Deferred(lambda: fn(self._make()), self.shape, self.dtype, self.device)

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def __repr__(self) -> str:
        return f"Deferred({tuple(self.shape)}, {self.dtype}, {self.device})"


def made(x: torch.Tensor | Deferred) -> torch.Tensor:
    """The tensor itself, or a deferred one made now."""
    return x() if isinstance(x, Deferred) else x
