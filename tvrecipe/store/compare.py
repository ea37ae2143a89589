"""What differs between two versions of an output file: a recomputed one and one with the
locked bytes. ``verify --recompute`` says it beside "content differs", so that other weights
(a kernel rounding otherwise) and the same weights in another wrapping (metadata, a card, a
lock) are told apart without a second tool."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

_TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".md", ".txt", ".lock", ".jinja", ""}
_TEXT_LIMIT = 4 << 20  # larger text files (a tokenizer.json) are not diffed line by line


def describe_difference(got: Path, locked: Path) -> str | None:
    """One phrase: how ``got`` differs from ``locked`` (a file with the locked bytes); None
    when that cannot be said (unreadable, or of a kind not looked into)."""
    try:
        if got.suffix == ".safetensors":
            return _safetensors_difference(got, locked)
        if got.suffix in _TEXT_SUFFIXES and max(got.stat().st_size,
                                               locked.stat().st_size) <= _TEXT_LIMIT:
            return _text_difference(got.read_text(encoding="utf-8"),
                                    locked.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, SafetensorError, ValueError, RuntimeError):
        return None
    return None


def _text_difference(got: str, locked: str) -> str | None:
    a, b = got.splitlines(), locked.splitlines()
    for tag, i1, _i2, j1, _j2 in difflib.SequenceMatcher(None, a, b, autojunk=False) \
            .get_opcodes():
        if tag == "equal":
            continue
        new = a[i1] if i1 < len(a) else "(end of file)"
        old = b[j1] if j1 < len(b) else "(end of file)"
        return (f"first at line {i1 + 1}: recomputed {_short(new)}, locked {_short(old)}")
    return "only in line endings or a final newline"


def _short(line: str, width: int = 80) -> str:
    text = line.strip()
    return json.dumps(text if len(text) <= width else text[:width] + "…", ensure_ascii=False)


def _safetensors_difference(got: Path, locked: Path) -> str:
    with safe_open(str(got), framework="pt") as a, safe_open(str(locked), framework="pt") as b:
        names_a, names_b = set(a.keys()), set(b.keys())
        if names_a != names_b:
            only_a, only_b = sorted(names_a - names_b), sorted(names_b - names_a)
            parts = ([f"tensors only in the recomputed file: {_names(only_a)}"] if only_a
                     else []) + ([f"only in the locked one: {_names(only_b)}"] if only_b else [])
            return "; ".join(parts)
        differ: list[tuple[float, str, str]] = []
        for name in sorted(names_a):
            x, y = a.get_tensor(name), b.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape:
                differ.append((float("inf"), name, f"{_form(x)} against locked {_form(y)}"))
                continue
            if torch.equal(_bits(x), _bits(y)):
                continue
            # (float32 keeps a float32 gap exact, at half float64's memory on an embedding)
            wide = torch.float64 if x.dtype == torch.float64 else torch.float32
            xf, yf = x.to(wide).reshape(-1), y.to(wide).reshape(-1)
            unequal = (_bits(x).view(x.numel(), -1) != _bits(y).view(y.numel(), -1)).any(dim=1)
            gap = (xf - yf)[unequal].abs()
            gap = torch.where(gap.isnan(), float("inf"), gap)  # (NaN against a number)
            finite = yf.abs()[yf.isfinite()]
            scale = float(finite.max()) if finite.numel() else 0.0
            count, worst = int(unequal.sum()), float(gap.max())
            differ.append((worst / scale if scale else worst, name,
                           (f"max |Δ| {worst:.3g} (its largest |w| {scale:.3g}) in "
                            f"{count} of {x.numel()} entries")))
        meta_a, meta_b = a.metadata() or {}, b.metadata() or {}
    if not differ:
        keys = sorted(k for k in set(meta_a) | set(meta_b) if meta_a.get(k) != meta_b.get(k))
        return ("every tensor is equal; the metadata differs"
                + (f" ({', '.join(keys)})" if keys else " (or the header's layout)"))
    differ.sort(key=lambda d: (-d[0], d[1]))
    _, name, how = differ[0]
    return f"{len(differ)} of {len(names_a)} tensors differ; the most, {name!r}: {how}"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _form(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def _names(names: list[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")
