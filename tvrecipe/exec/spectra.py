"""`tvrecipe inspect` of a spectral step: its inputs' singular spectra and subspace overlaps,
summarised per group of like tensors (the same name up to layer numbers)."""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import torch

from tvrecipe.store.writer import RowBlocks

_LAYER = re.compile(r"(?<=\.)\d+(?=\.)")


def group_of(tensor: str) -> str:
    """The group a tensor belongs to: its name with layer numbers as ``*``."""
    return _LAYER.sub("*", tensor)


def spectra(ctx: Any, excluded: tuple[str, ...] = (), k: int | None = None) -> dict:
    """One streaming pass over a step's ``inputs``: :func:`tvrecipe.ops.spectral.
    spectra_summary` of every 2-D floating tensor (not matching ``excluded``), averaged per
    group.

    Args:
        ctx: The step's PassContext.
        excluded: Glob patterns of tensors left out (decompose's ``exclude``).
        k: Directions per task for the energy and overlap figures (default ⌊r/T⌋).
    """
    from tvrecipe.ops.spectral import spectra_summary
    entries = ctx.entries("inputs")
    names = [e.name for e in entries]
    blocks = RowBlocks()  # the stream may come in row blocks; the SVDs need whole tensors
    groups: dict[str, dict] = {}

    def add(tensor: str, xs: list) -> None:
        if (xs[0] is None or xs[0].dim() != 2 or 0 in ctx.shape(tensor)
                or any(fnmatch.fnmatchcase(tensor, p) for p in excluded)):
            return  # (an empty matrix, [0, n], has no spectrum)
        rows = ctx.shape(tensor)[0]
        whole = [blocks.add((tensor, i), x, rows) for i, x in enumerate(xs)]
        if whole[0] is None:
            return
        summary = spectra_summary(whole, k)
        g = groups.setdefault(group_of(tensor), {"tensors": 0, "shape": list(whole[0].shape),
                                                 "k": summary["k"], "sums": {}})
        g["tensors"] += 1
        for key in ("erank", "r90", "energy_k", "curve", "overlap"):
            value = torch.tensor(summary[key], dtype=torch.float64)
            g["sums"][key] = g["sums"].get(key, 0) + value

    ctx.accumulate(entries, add, label="spectra")
    out = {}
    for name, g in groups.items():
        n = g.pop("tensors")
        sums = g.pop("sums")
        out[name] = {**g, "count": n, **{key: (v / n).tolist() for key, v in sums.items()}}
    return {"kind": "spectra", "tasks": names, "groups": out}
