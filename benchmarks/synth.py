"""Synthetic Llama-shaped checkpoints for benchmarks: a base model plus n fine-tunes.

Each fine-tune, for every 2-D tensor, is ``base + shared low-rank + own low-rank + tiny noise``;
1-D tensors (norms) get a small random perturbation. Files are written in the Hugging Face
layout (``model.safetensors``, or ``model-0000i-of-N.safetensors`` plus
``model.safetensors.index.json`` when sharded, and ``config.json``), one tensor at a time: the
generator never holds more than one tensor per model in memory. Output is deterministic.

    python benchmarks/synth.py --hidden 1024 --layers 12 --vocab 32000 --n 8 --out bench-out/ckpt/large
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
DONE = "synth.json"  # written last: its presence (with matching params) marks a complete set


def parse_size(text: str | int) -> int:
    """``"256MB"`` / ``"2GB"`` / ``"2GiB"`` / ``1234`` → bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {text!r}")
    unit = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * unit ** " KMGT".index(m.group(2).upper() or " "))


def default_intermediate(hidden: int) -> int:
    """About 2.75 × hidden, rounded to a multiple of 64 (1024 → 2816)."""
    return max(64, round(2.75 * hidden / 64) * 64)


def llama_shapes(hidden: int, layers: int, vocab: int, intermediate: int
                 ) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Llama model (no GQA, untied embeddings), in HF order."""
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (hidden, hidden)),
            (p + "self_attn.v_proj.weight", (hidden, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines the generated files."""

    hidden: int = 1024
    layers: int = 12
    vocab: int = 32000
    intermediate: int = 0  # 0: default_intermediate(hidden)
    dtype: str = "bf16"
    shard_size: int = 5_000_000_000
    n: int = 8
    seed: int = 0
    rank_shared: int = 4
    rank_own: int = 4
    scale_shared: float = 2e-3  # per-entry std of the shared low-rank part
    scale_own: float = 2e-3  # per-entry std of each fine-tune's own low-rank part
    noise: float = 1e-4  # per-entry std of the dense noise
    base_std: float = 0.02

    @property
    def inter(self) -> int:
        return self.intermediate or default_intermediate(self.hidden)

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return llama_shapes(self.hidden, self.layers, self.vocab, self.inter)

    def params(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes())

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["intermediate"] = self.inter
        return d


def model_names(n: int) -> list[str]:
    """Folder names: ``base``, ``ft0`` … ``ft{n-1}``."""
    return ["base"] + [f"ft{i}" for i in range(n)]


def _gen(*key: object) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(zlib.crc32(":".join(map(str, key)).encode()))
    return g


def _low_rank(shape: tuple[int, int], rank: int, std: float, g: torch.Generator) -> torch.Tensor:
    # Entries of U @ V with U, V ~ N(0, 1) have variance rank; scale so that std is `std`.
    u = torch.randn(shape[0], rank, generator=g)
    v = torch.randn(rank, shape[1], generator=g)
    return (u * (std / math.sqrt(rank))) @ v


def make_tensors(cfg: SynthConfig, name: str, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """The tensor ``name`` of the base and of every fine-tune, in float32."""
    s = cfg.seed
    if len(shape) == 1:
        base = 1.0 + 0.05 * torch.randn(shape, generator=_gen(s, "base", name))
        fts = [base + 0.01 * torch.randn(shape, generator=_gen(s, "ft", i, name))
               for i in range(cfg.n)]
        return [base, *fts]
    base = torch.randn(shape, generator=_gen(s, "base", name)).mul_(cfg.base_std)
    shared = base + _low_rank(shape, cfg.rank_shared, cfg.scale_shared, _gen(s, "shared", name))
    out = [base]
    for i in range(cfg.n):
        g = _gen(s, "ft", i, name)
        ft = shared + _low_rank(shape, cfg.rank_own, cfg.scale_own, g)
        if cfg.noise:
            ft.add_(torch.randn(shape, generator=g), alpha=cfg.noise)
        out.append(ft)
    return out


def plan_shards(cfg: SynthConfig) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy shards of at most ``shard_size`` bytes, in tensor order."""
    elt = torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in cfg.shapes():
        nb = math.prod(shape) * elt
        if shards[-1] and size + nb > cfg.shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nb
    return shards


def _header(entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
            metadata: dict[str, str]) -> bytes:
    elt = torch.empty((), dtype=dtype).element_size()
    head: dict[str, object] = {"__metadata__": metadata}
    off = 0
    for name, shape in entries:
        nb = math.prod(shape) * elt
        head[name] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _config_json(cfg: SynthConfig, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.hidden, "intermediate_size": cfg.inter,
        "num_hidden_layers": cfg.layers, "num_attention_heads": max(1, cfg.hidden // 64),
        "num_key_value_heads": max(1, cfg.hidden // 64), "vocab_size": cfg.vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": 1, "eos_token_id": 2,
    }


def is_complete(out: Path, cfg: SynthConfig) -> bool:
    """True when ``out`` holds a finished set generated with ``cfg``."""
    try:
        return json.loads((out / DONE).read_text()) == cfg.to_json()
    except (OSError, ValueError):
        return False


def generate(cfg: SynthConfig, out: Path, verbose: bool = True) -> list[Path]:
    """Write the base and the fine-tunes under ``out``; returns the model folders."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    dtype = DTYPES[cfg.dtype]
    names = model_names(cfg.n)
    dirs = [out / m for m in names]
    shards = plan_shards(cfg)
    k = len(shards)
    files = (["model.safetensors"] if k == 1 else
             [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)])
    for d in dirs:
        d.mkdir()
        (d / "config.json").write_text(json.dumps(_config_json(cfg, dtype), indent=2) + "\n")
        if k > 1:
            elt = torch.empty((), dtype=dtype).element_size()
            index = {"metadata": {"total_size": cfg.params() * elt},
                     "weight_map": {t: files[i] for i, sh in enumerate(shards) for t, _ in sh}}
            (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    t0 = time.perf_counter()
    done = 0
    last = t0
    total = cfg.params()
    for i, entries in enumerate(shards):
        handles = []
        for m, d in zip(names, dirs):
            f = open(d / files[i], "wb")  # noqa: SIM115 (closed in finally)
            f.write(_header(entries, dtype, {"format": "pt", "synth.model": m}))
            handles.append(f)
        try:
            for name, shape in entries:
                for f, t in zip(handles, make_tensors(cfg, name, shape)):
                    t = t.to(dtype).contiguous()
                    # Raw little-endian bytes through numpy (no numpy dtype for bfloat16).
                    f.write(t.view(torch.int16 if t.element_size() == 2 else torch.int32)
                            .numpy().data)
                done += math.prod(shape)
                if verbose and time.perf_counter() - last > 1.0:
                    last = time.perf_counter()
                    print(f"\r  {out.name}: {100 * done / total:5.1f}% "
                          f"({time.perf_counter() - t0:.0f} s)", end="", flush=True)
        finally:
            for f in handles:
                f.close()
    if verbose:
        print(f"\r  {out.name}: 100.0% ({time.perf_counter() - t0:.0f} s)", flush=True)
    (out / DONE).write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    return dirs


def main() -> None:
    """Command line: generate one set of checkpoints."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--intermediate", type=int, default=0,
                   help="MLP width (default: 2.75 × hidden rounded to 64)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--shard-size", default="5GB", help="max bytes per shard, e.g. 256MB")
    p.add_argument("--n", type=int, default=8, help="number of fine-tunes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder to create (replaced if it exists)")
    a = p.parse_args()
    cfg = SynthConfig(hidden=a.hidden, layers=a.layers, vocab=a.vocab,
                      intermediate=a.intermediate, dtype=a.dtype,
                      shard_size=parse_size(a.shard_size), n=a.n, seed=a.seed)
    t0 = time.perf_counter()
    generate(cfg, Path(a.out))
    print(f"{cfg.params() / 1e6:.1f}M params × {cfg.n + 1} models in {a.out} "
          f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
