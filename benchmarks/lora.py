"""LoRA adapters in and out, on the synthetic checkpoints of benchmarks/run.py.

    python benchmarks/lora.py [--size large] [--rank 16] [--out-rank 32] [--repeat 2]

In: writes 8 synthetic rank-``--rank`` peft adapters of the base (every attention and MLP
projection, random factors, bf16 like the checkpoints), then times `tvrecipe run` of

- ``adapters``: sum of the 8 adapters + apply (the deltas s·B·A are formed while streaming;
  embeddings, head and norms are not covered: their deltas are zeros);
- ``checkpoints``: the same recipe over the 8 full fine-tunes' task vectors (extract);

and prints adapters / checkpoints (issue #15 target: <= 1.5x).

Out: times `tvrecipe run` writing one task vector (ft0 - base) as a rank-``--out-rank`` peft
adapter (seeded randomised SVD per 2-D tensor), against a full SVD (torch.linalg.svd, float32
and float64) of the same 2-D deltas in a fresh process, reads included (the whole `tvrecipe
run`, startup included, against the SVD loop alone: target >= 5x faster), and reads the
adapter's relative error from the run report.

Every run is a child process (`tvrecipe run ... --force --no-cache`); the fastest of
``--repeat`` is kept. Data goes to bench-out/lora-<size>/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapters(ckpt: Path, folder: Path, n: int, rank: int) -> list[str]:
    import torch
    from safetensors.torch import save_file

    from tvrecipe.store.checkpoint import open_checkpoint

    names = [f"ad{i}" for i in range(n)]
    if all((folder / a / "adapter_model.safetensors").is_file() for a in names):
        return names
    base = open_checkpoint(ckpt / "base")
    modules = [t[: -len(".weight")] for t in base.tensors
               if t.endswith(".weight") and t.split(".")[-2] in TARGETS]
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for module in modules:
            out_f, in_f = base.tensors[f"{module}.weight"].shape
            a = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
            b = torch.randn(out_f, rank, generator=gen) * 2e-3
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(torch.bfloat16)
        (folder / name).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / name / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                  "target_modules": list(TARGETS), "bias": "none", "fan_in_fan_out": False}
        (folder / name / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return names


def timed_run(recipe: Path, repeat: int, *extra: str) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "tvrecipe.cli", "run", str(recipe),
                               "--force", "--no-cache", "-q", *extra],
                              check=False, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{recipe.name} failed:\n{proc.stderr}")
        best = min(best, time.perf_counter() - start)
    return best


def full_svd_seconds(ckpt: Path, dtype: str) -> float:
    """A full SVD (in ``dtype``) of every 2-D delta ft0 - base, reads included, in a fresh
    process as a `tvrecipe run` is."""
    code = f"""
import time, torch
from tvrecipe.store.checkpoint import open_checkpoint
start = time.perf_counter()
b = open_checkpoint({str(ckpt / 'base')!r}); f = open_checkpoint({str(ckpt / 'ft0')!r})
for t, info in b.tensors.items():
    if len(info.shape) == 2:
        d = (f.get(t).float() - b.get(t).float()).to(torch.{dtype})
        torch.linalg.svd(d, full_matrices=False)
print(time.perf_counter() - start)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return float(proc.stdout.strip())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="large")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out-rank", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--skip-full-svd", action="store_true")
    args = p.parse_args()
    from run import SIZES, ensure_checkpoints  # benchmarks/run.py

    _config, ckpt = ensure_checkpoints(args.size, args.n)
    folder = ROOT / "bench-out" / f"lora-{args.size}"
    folder.mkdir(parents=True, exist_ok=True)
    adapters = make_adapters(ckpt, folder, args.n, args.rank)
    fts = [f"ft{i}" for i in range(args.n)]
    models = "\n".join([f"  base: {ckpt / 'base'}"]
                       + [f"  {a}: {{path: {folder / a}, kind: lora}}" for a in adapters]
                       + [f"  {f}: {ckpt / f}" for f in fts])
    (folder / "adapters.yaml").write_text(
        f"tvrecipe: 1\nsettings: {{device: cpu}}\nmodels:\n{models}\nsteps:\n"
        f"  merged: {{op: sum, inputs: [{', '.join(adapters)}]}}\n"
        "  model: {op: apply, base: base, delta: merged, scale: 0.3}\n"
        f"outputs:\n  model: {{from: model, path: {folder / 'out-adapters'}, dtype: bfloat16, "
        "model_card: false}\n")
    (folder / "checkpoints.yaml").write_text(
        f"tvrecipe: 1\nsettings: {{device: cpu}}\nmodels:\n{models}\nsteps:\n"
        f"  tv: {{op: extract, base: base, finetuned: [{', '.join(fts)}]}}\n"
        "  merged: {op: sum, inputs: tv}\n"
        "  model: {op: apply, base: base, delta: merged, scale: 0.3}\n"
        f"outputs:\n  model: {{from: model, path: {folder / 'out-checkpoints'}, "
        "dtype: bfloat16, model_card: false}\n")
    (folder / "write.yaml").write_text(
        f"tvrecipe: 1\nsettings: {{device: cpu}}\nmodels:\n{models}\nsteps:\n"
        "  tv: {op: extract, base: base, finetuned: ft0}\n"
        f"outputs:\n  adapter: {{from: tv, path: {folder / 'out-adapter'}, format: peft, "
        f"rank: {args.out_rank}}}\n")
    print(f"## LoRA in/out: {args.size} ({SIZES[args.size]}), {args.n} rank-{args.rank} "
          "adapters\n")
    t_ad = timed_run(folder / "adapters.yaml", args.repeat)
    t_ck = timed_run(folder / "checkpoints.yaml", args.repeat)
    print(f"sum of {args.n} adapters + apply: {t_ad:.2f} s")
    print(f"sum of {args.n} full fine-tunes' task vectors + apply: {t_ck:.2f} s")
    print(f"adapters / checkpoints: {t_ad / t_ck:.2f}x (target <= 1.5x)\n")
    report = folder / "write.report.json"
    t_out = timed_run(folder / "write.yaml", args.repeat, "--report", str(report))
    err = json.loads(report.read_text())["output:adapter"]["relative_error"]
    print(f"write one task vector as a rank-{args.out_rank} adapter: {t_out:.2f} s "
          f"(relative error {err:.4f})")
    if not args.skip_full_svd:
        for dtype in ("float32", "float64"):
            t_svd = full_svd_seconds(ckpt, dtype)
            print(f"full SVD ({dtype}) of the same 2-D deltas: {t_svd:.2f} s; "
                  f"/ adapter run: {t_svd / t_out:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
