"""Shared fixtures: tiny real checkpoints under ``tmp_path`` and an in-process CLI runner."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from tvrecipe.cli import main

# A Llama-like layout in miniature: 2-D weights of several shapes, a 1-D norm and bias, and an
# integer buffer that must never be merged.
SHAPES: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (16, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (12, 8),
    "model.layers.0.mlp.up_proj.bias": (12,),
    "model.layers.0.mlp.down_proj.weight": (8, 12),
    "model.layers.0.input_layernorm.weight": (8,),
    "lm_head.weight": (16, 8),
}
INT_BUFFER = "model.position_ids"
INT_SHAPE = (1, 16)
FLOATING = tuple(SHAPES)
MATRICES = tuple(n for n, s in SHAPES.items() if len(s) == 2)
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8}


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def base_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 base weights (norms near 1) plus the int64 buffer."""
    g = gen(seed)
    w = {}
    for name, shape in SHAPES.items():
        if name.endswith("layernorm.weight"):
            w[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            w[name] = 0.02 * torch.randn(shape, generator=g)
    w[INT_BUFFER] = torch.arange(INT_SHAPE[1], dtype=torch.int64).reshape(INT_SHAPE)
    return w


def finetune(base: dict[str, torch.Tensor], seed: int, scale: float = 0.005
             ) -> dict[str, torch.Tensor]:
    """``base`` plus a small random delta on every floating tensor.

    The integer buffer gets different values on purpose: outputs must copy the base's.
    """
    g = gen(seed)
    out = {}
    for name, t in base.items():
        if t.is_floating_point():
            out[name] = t + scale * torch.randn(t.shape, generator=g)
        else:
            out[name] = torch.full_like(t, 7 + seed)
    return out


def save_model(folder: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
               config: bool = True) -> dict[str, torch.Tensor]:
    """Write one HF-layout folder (``model.safetensors``, ``config.json``, tokenizer config).

    Floating tensors are cast to ``dtype`` first. Returns the tensors exactly as stored.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stored = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
              for k, v in tensors.items()}
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config:
        (folder / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
        (folder / "tokenizer_config.json").write_text('{"model_max_length": 16}\n')
    return {k: v.clone() for k, v in stored.items()}


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an output folder (via the index when sharded)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1, f"expected one weight file in {folder}, found {files}"
    return files


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder (sharded or not) or of one ``.safetensors`` file."""
    files = [path] if path.is_file() else weight_files(path)
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 - safe_open handles are not mappings
                assert k not in out, f"{k} twice in {path}"
                out[k] = h.get_tensor(k)
    return out


def read_metadata(file: Path) -> dict[str, str]:
    """The ``__metadata__`` of one safetensors file."""
    with safe_open(str(file), framework="pt") as h:
        return dict(h.metadata() or {})


def snapshot(folder: Path) -> dict[str, bytes]:
    """Relative path → bytes of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def listing(folder: Path) -> list[str]:
    """Relative paths of everything under ``folder`` (files and folders)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@dataclass
class ModelSet:
    """Checkpoints written under ``root``: ``weights[name]`` is what was stored, as stored."""

    root: Path
    folder: str
    weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        """The folder of model ``name``."""
        return self.root / self.folder / name

    def rel(self, name: str) -> str:
        """The path of model ``name`` as a recipe in ``root`` writes it."""
        return f"./{self.folder}/{name}"

    def f32(self, name: str) -> dict[str, torch.Tensor]:
        """Model ``name``'s floating tensors in float32."""
        return {k: v.float() for k, v in self.weights[name].items() if v.is_floating_point()}

    def delta(self, name: str, base: str = "base") -> dict[str, torch.Tensor]:
        """τ = θ_name − θ_base in float32, tensor by tensor."""
        b = self.f32(base)
        return {k: v - b[k] for k, v in self.f32(name).items()}

    def models_yaml(self, names: Iterable[str] | None = None) -> str:
        """A ``models:`` section naming every model (or ``names``)."""
        names = list(self.weights) if names is None else list(names)
        return "models:\n" + "".join(f"  {n}: {self.rel(n)}\n" for n in names)


@pytest.fixture
def make_models(tmp_path):
    """Factory writing a base and fine-tunes under ``tmp_path/<folder>/``.

    ``make_models(names, dtype=torch.float32, folder="ckpt", seed=0, scale=0.005,
    deltas=None)``; ``deltas`` maps a name to float32 deltas (per tensor) to add to the base
    instead of random ones.
    """

    def make(names: Sequence[str] = ("math", "code", "toxic"), *,
             dtype: torch.dtype = torch.float32, folder: str = "ckpt", seed: int = 0,
             scale: float = 0.005,
             deltas: dict[str, dict[str, torch.Tensor]] | None = None) -> ModelSet:
        ms = ModelSet(tmp_path, folder)
        base = base_weights(seed)
        ms.weights["base"] = save_model(ms.path("base"), base, dtype)
        for i, name in enumerate(names):
            if deltas is not None and name in deltas:
                ft = {k: (v + deltas[name][k] if v.is_floating_point() else v)
                      for k, v in base.items()}
            else:
                ft = finetune(base, seed * 1000 + i + 1, scale)
            ms.weights[name] = save_model(ms.path(name), ft, dtype)
        return ms

    return make


@dataclass
class CliResult:
    """What one in-process CLI call gave."""

    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None

    @property
    def err_lines(self) -> list[str]:
        """stderr split in lines, stripped of surrounding blanks."""
        return [line.strip() for line in self.stderr.splitlines() if line.strip()]


class Cli:
    """Runs ``tvrecipe`` in-process with the current folder set to ``root``."""

    def __init__(self, root: Path):
        self.root = root

    def write(self, name: str, text: str) -> Path:
        """Write a recipe (dedented) to ``root/name``; returns its path."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    def __call__(self, *args: str | Path) -> CliResult:
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
        exc = result.exception if not isinstance(result.exception, SystemExit) else None
        return CliResult(result.exit_code, result.stdout, result.stderr, exc)

    def ok(self, *args: str | Path) -> CliResult:
        """Run and assert exit code 0, showing stderr otherwise."""
        res = self(*args)
        assert res.exit_code == 0, (f"tvrecipe {' '.join(map(str, args))} exited "
                                    f"{res.exit_code}\n{res.stderr}\n{res.exception!r}")
        assert res.exception is None
        return res

    def fails(self, code: int, *args: str | Path) -> CliResult:
        """Run and assert exit code ``code`` with no traceback in the output."""
        res = self(*args)
        assert res.exit_code == code, (f"expected exit {code}, got {res.exit_code}\n"
                                       f"{res.stdout}\n{res.stderr}\n{res.exception!r}")
        assert "Traceback" not in res.stdout + res.stderr
        assert "internal error" not in res.stderr
        return res


@pytest.fixture
def cli(tmp_path, monkeypatch) -> Cli:
    """The CLI, run from ``tmp_path`` (so messages name recipes relative to it)."""
    monkeypatch.chdir(tmp_path)
    # Caches live beside each recipe, inside tmp_path: never a user's shared cache.
    monkeypatch.delenv("TVRECIPE_CACHE", raising=False)
    return Cli(tmp_path)
