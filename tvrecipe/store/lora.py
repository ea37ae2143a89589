"""A peft LoRA adapter read as a task vector over its base checkpoint's tensors.

For each target module the delta is ΔW = s · B·A with s = lora_alpha / r (lora_alpha / √r
with ``use_rslora``), r and lora_alpha per module from ``rank_pattern`` / ``alpha_pattern``;
transposed for ``fan_in_fan_out`` layers (GPT-2's Conv1D) and for embeddings, whose factors
peft stores the other way round. A ``modules_to_save`` tensor is a full copy of the module:
its delta is that copy minus the base. Every other floating tensor of the base has delta 0.

Deltas are formed one tensor (or row block) at a time, when read, in float32.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from tvrecipe.errors import InputError
from tvrecipe.store.checkpoint import Checkpoint, TensorInfo, open_checkpoint

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# What this reader refuses, by adapter_config.json key: (value that is fine, what it is).
_UNSUPPORTED = {"use_dora": (False, "DoRA"), "bias": ("none", "bias training"),
                "lora_bias": (False, "LoRA bias terms"), "use_qalora": (False, "QA-LoRA"),
                "target_parameters": (None, "LoRA on parameters"),
                "trainable_token_indices": (None, "trainable tokens"),
                "layer_replication": (None, "layer replication")}


def adapter_files(path: Path) -> list[Path]:
    """The files of an adapter folder (weights, config), which its content hash covers.

    Raises:
        InputError: either is missing.
    """
    files = [Path(path) / WEIGHTS_FILE, Path(path) / CONFIG_FILE]
    for f in reversed(files):  # the config first: without it, it is no adapter at all
        if not f.is_file():
            raise InputError(f"{path}: no {f.name}; a `kind: lora` model is a peft adapter "
                             f"folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
    return files


@dataclass(frozen=True)
class _Factor:
    """One target module: where its factors are, its scale, and its orientation."""

    a: str               # adapter tensor names
    b: str
    scale: float
    transposed: bool     # ΔW = s·(B·A)ᵀ (fan_in_fan_out and embeddings)


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's rule: a pattern applies to a module whose name ends with it (after a dot)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


class LoraAdapter:
    """An opened adapter folder with the Checkpoint interface the runner reads through:
    ``tensors`` (the base's floating tensors, as float32), ``get``, ``files``, ``close``.

    Args:
        path: The adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        base: The base checkpoint (headers), whose names and shapes the deltas take.

    Raises:
        InputError: a missing or unreadable file, a variant this reader does not support, a
            module the base does not have, or factors whose product has another shape.
    """

    def __init__(self, path: Path, base: Checkpoint):
        self.path = Path(path)
        self.base = base
        config_file = adapter_files(self.path)[1]
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{config_file}: unreadable ({exc})") from None
        if config.get("peft_type", "LORA") != "LORA":
            raise InputError(f"{config_file}: peft_type {config.get('peft_type')!r}; only LoRA "
                             "adapters can be read")
        for key, (fine, what) in _UNSUPPORTED.items():
            value = config.get(key, fine)
            if value != fine and value not in (None, False, [], {}):
                raise InputError(f"{config_file}: {what} ({key}: {value!r}) is not supported; "
                                 "merge such an adapter with peft's merge_and_unload and use "
                                 "the merged checkpoint")
        self.adapter = open_checkpoint(self.path / WEIGHTS_FILE)
        self.files = [*self.adapter.files, config_file]
        self.factors: dict[str, _Factor] = {}
        self.saved: dict[str, str] = {}  # base tensor -> adapter tensor (modules_to_save)
        self._map(config)
        self.tensors: dict[str, TensorInfo] = {
            t: TensorInfo(t, "F32", info.shape, info.file, info.offset, info.nbytes, info.start)
            for t, info in base.tensors.items() if info.is_floating}

    def _map(self, config: dict) -> None:
        fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        rslora = bool(config.get("use_rslora"))
        names = list(self.adapter.tensors)
        modules: dict[str, dict[str, str]] = {}
        for name in names:
            key = name.removeprefix(_PREFIX)
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                             r"(?:\.[^.]+)?(?:\.weight)?", key)
            if m:
                modules.setdefault(m[1], {})[m[2]] = name
            elif ".base_layer." in key:
                continue  # the base's own weights, saved beside embedding adapters
            elif "lora_magnitude_vector" in key:
                raise InputError(f"{self.path}: tensor {name!r} is a DoRA magnitude; DoRA is not "
                                 "supported")
            else:  # modules_to_save: a full copy of the module's tensor
                tensor = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)
                if tensor not in self.base.tensors:
                    raise InputError(f"{self.path}: saved module tensor {name!r} matches no "
                                     f"tensor of the base (looked for {tensor!r}); is this "
                                     "adapter for another base model?")
                self.saved[tensor] = name
        for module, parts in sorted(modules.items()):
            embedding = "lora_embedding_A" in parts
            a = parts.get("lora_embedding_A" if embedding else "lora_A")
            b = parts.get("lora_embedding_B" if embedding else "lora_B")
            if a is None or b is None:
                raise InputError(f"{self.path}: module {module!r} has only one of its two LoRA "
                                 "factors; the adapter file is incomplete")
            tensor = f"{module}.weight"
            info = self.base.tensors.get(tensor)
            if info is None:
                raise InputError(f"{self.path}: adapter module {module!r} has no tensor "
                                 f"{tensor!r} in the base; is this adapter for another base "
                                 "model?")
            a_shape, b_shape = self.adapter.tensors[a].shape, self.adapter.tensors[b].shape
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise InputError(f"{self.path}: module {module!r} has factors of shapes "
                                 f"{list(a_shape)} and {list(b_shape)}; only linear and "
                                 "embedding layers are supported (not convolutions)")
            r = a_shape[0]
            transposed = embedding or fan_in_fan_out
            product = (a_shape[1], b_shape[0]) if transposed else (b_shape[0], a_shape[1])
            if b_shape[1] != r or tuple(info.shape) != product:
                raise InputError(f"{self.path}: module {module!r}: factors {list(b_shape)} x "
                                 f"{list(a_shape)} give {list(product)}, but the base's "
                                 f"{tensor!r} is {list(info.shape)}; is this adapter for "
                                 "another base model?")
            alpha = _pattern_value(config.get("alpha_pattern"), module,
                                   config.get("lora_alpha", 8))
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            self.factors[tensor] = _Factor(a, b, float(scale), transposed)
        both = set(self.factors) & set(self.saved)
        if both:
            raise InputError(f"{self.path}: {min(both)!r} is both a LoRA target and a saved "
                             "module")

    @property
    def covered(self) -> list[str]:
        """Base tensors whose delta is not zero by construction."""
        return sorted({*self.factors, *self.saved})

    def get(self, name: str, rows: tuple[int, int] | None = None):
        """ΔW for one base tensor (or rows ``start:stop`` of it), float32, on the CPU."""
        import torch

        info = self.tensors[name]
        shape = info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])
        factor = self.factors.get(name)
        if factor is not None:
            a = self.adapter.get(factor.a).float()
            b = self.adapter.get(factor.b).float()
            if factor.transposed:  # ΔW = s·(B·A)ᵀ = s·Aᵀ·Bᵀ: rows of ΔW are columns of A
                a_rows = a if rows is None else a[:, rows[0]:rows[1]]
                return (a_rows.t() @ b.t()).mul_(factor.scale).reshape(shape)
            b_rows = b if rows is None else b[rows[0]:rows[1]]
            return (b_rows @ a).mul_(factor.scale).reshape(shape)
        saved = self.saved.get(name)
        if saved is not None:
            return (self.adapter.get(saved, rows).float()
                    - self.base.get(name, rows).float())
        return torch.zeros(shape, dtype=torch.float32)

    def close(self) -> None:
        self.adapter.close()
        self.base.close()
