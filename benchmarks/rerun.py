"""Incremental reruns: cold run, rerun after changing only the final apply scale, unchanged rerun.

    python benchmarks/rerun.py [--size large|xl | --ckpt FOLDER] [--op ties sum] [--repeat 3]

Uses the synthetic checkpoints of benchmarks/run.py (`--size`, generated when missing: base + 8
fine-tunes) or any folder of them (`--ckpt`). Times three `tvrecipe run`s as child
processes in a fresh folder with a fresh cache and hash memo, `--repeat` times over (the table
gives the median, and the range), checks that the cached rerun's output equals an uncached
run's byte for byte, and prints the ratios issue #3 asks for (target: scale-changed rerun
<= 15% of cold, unchanged rerun <= 5%).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RECIPE = """\
tvrecipe: 1
models:
{models}
steps:
  tv:     {{op: extract, base: base, finetuned: [{fts}]}}
  merged: {merge}
  model:  {{op: apply, base: base, delta: merged, scale: {scale}}}
outputs:
  model: {{from: model, path: ./{out}}}
"""


def write_recipe(folder: Path, ckpt: Path, op: str, scale: float, out: str = "out") -> Path:
    fts = sorted(p.name for p in ckpt.iterdir() if p.is_dir() and p.name != "base")
    models = "\n".join(f"  {m}: {ckpt / m}" for m in ["base", *fts])
    merge = ("{op: sum, inputs: tv, weights: 0.3}" if op == "sum"
             else "{op: ties, inputs: tv, density: 0.2}")
    path = folder / "recipe.yaml"
    path.write_text(RECIPE.format(models=models, fts=", ".join(fts), merge=merge, scale=scale,
                                  out=out))
    return path


def timed(*args: str) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tvrecipe.cli", *args],
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"tvrecipe {' '.join(args)} failed:\n{proc.stderr}")
    return wall, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["large", "xl"], default="large",
                    help="benchmarks/run.py's checkpoint set: large (219.7M parameters, the "
                         "default) or xl (560.8M); made when missing")
    ap.add_argument("--ckpt", type=Path, help="a folder of checkpoints instead of --size")
    ap.add_argument("--op", choices=["sum", "ties"], nargs="+", default=["ties", "sum"],
                    help="the merge between extract and apply (default: both, in turn)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="cold / changed / unchanged rounds, each in a fresh folder (default 3)")
    args = ap.parse_args()
    if args.ckpt is None:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import run
        _cfg, args.ckpt = run.ensure_checkpoints(args.size, 8)
    args.ckpt = args.ckpt.resolve()
    if not (args.ckpt / "base").is_dir():
        sys.exit(f"no checkpoints in {args.ckpt} (a folder with base/ and the fine-tunes)")
    warm(args.ckpt)
    for op in args.op:
        measure(args.ckpt, op, max(1, args.repeat))


def warm(ckpt: Path) -> None:
    """Read every input file once, so every round reads them from the page cache (as
    benchmarks/run.py does): the rounds compare compute, not the disk."""
    buf = bytearray(16 << 20)
    for f in sorted(ckpt.rglob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def one_round(ckpt: Path, op: str, last: bool) -> dict[str, float | str | bool]:
    """Cold run, apply-scale change, unchanged rerun in a fresh folder; on the last round also
    the same change uncached (compared byte for byte) and verify."""
    work = Path(tempfile.mkdtemp(prefix="tvrecipe-rerun-", dir=ROOT / "bench-out"))
    got: dict[str, float | str | bool] = {}
    try:
        recipe = write_recipe(work, ckpt, op, 1.0)
        got["cold"], _ = timed("run", str(recipe), "-q")
        write_recipe(work, ckpt, op, 0.5)
        got["changed"], out = timed("run", str(recipe), "--force")
        hits = [ln for ln in out.splitlines() if ln.startswith("from cache")]
        got["hits"] = hits[0] if hits else "no cache hit"
        got["unchanged"], out2 = timed("run", str(recipe))
        got["said"] = out2.strip().splitlines()[0][:40]
        if last:
            shutil.copytree(work / "out", work / "cached-out")
            got["uncached"], _ = timed("run", str(recipe), "--force", "--no-cache", "-q")
            got["same"] = all(filecmp.cmp(p, work / "out" / p.name, shallow=False)
                              for p in (work / "cached-out").iterdir())
            got["verify"], _ = timed("verify", str(recipe))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return got


def measure(ckpt: Path, op: str, repeat: int) -> None:
    rounds = [one_round(ckpt, op, i == repeat - 1) for i in range(repeat)]
    last = rounds[-1]
    cold = statistics.median(r["cold"] for r in rounds)

    def row(label: str, key: str) -> str:
        times = [r[key] for r in rounds if key in r]
        mid = statistics.median(times)
        spread = (f"{min(times):.2f}-{max(times):.2f}" if len(times) > 1 else "")
        ratios = (f"{min(t / r['cold'] for r in rounds for t in [r[key]]):.3f}-"
                  f"{max(t / r['cold'] for r in rounds for t in [r[key]]):.3f}"
                  if len(times) > 1 else "")
        return f"| {label} | {mid:.2f} | {spread} | {mid / cold:.3f} | {ratios} |"

    print(f"\ncheckpoints: {ckpt} (base + {sum(p.is_dir() for p in ckpt.iterdir()) - 1} "
          f"fine-tunes), merge: {op}, {repeat} round(s) in fresh folders")
    print("| run | median wall s | range s | median / median cold | per-round ratio range |")
    print("|---|---:|---:|---:|---:|")
    print(row("cold (hashes inputs, fills cache)", "cold"))
    print(row(f"apply scale changed ({last['hits']})", "changed"))
    print(row(f"unchanged ({last['said']})", "unchanged"))
    print(row("same change, --no-cache (last round)", "uncached"))
    print(row("verify (last round)", "verify"))
    print(f"cached rerun output byte-identical to uncached: {last['same']}")


if __name__ == "__main__":
    main()
