"""Incremental reruns: cold run, rerun after changing only the final apply scale, unchanged rerun.

    python benchmarks/rerun.py [--ckpt bench-out/ckpt/large-n8] [--op ties sum]

Uses checkpoints made by benchmarks/run.py (or synth.py). Times three `tvrecipe run`s as child
processes in a fresh folder with a fresh cache and hash memo, checks that the cached rerun's
output equals an uncached run's byte for byte, and prints the ratios issue #3 asks for
(target: scale-changed rerun <= 15% of cold, unchanged rerun <= 5%).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
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
    ap.add_argument("--ckpt", type=Path, default=ROOT / "bench-out" / "ckpt" / "large-n8")
    ap.add_argument("--op", choices=["sum", "ties"], nargs="+", default=["ties", "sum"],
                    help="the merge between extract and apply (default: both, in turn)")
    args = ap.parse_args()
    args.ckpt = args.ckpt.resolve()
    if not (args.ckpt / "base").is_dir():
        sys.exit(f"no checkpoints in {args.ckpt}: run `python benchmarks/run.py --size large` "
                 "first (it generates them)")
    for op in args.op:
        measure(args.ckpt, op)


def measure(ckpt: Path, op: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="tvrecipe-rerun-", dir=ROOT / "bench-out"))
    try:
        recipe = write_recipe(work, ckpt, op, 1.0)
        cold, _ = timed("run", str(recipe), "-q")
        write_recipe(work, ckpt, op, 0.5)
        changed, out = timed("run", str(recipe), "--force")
        hits = [ln for ln in out.splitlines() if ln.startswith("from cache")]
        unchanged, out2 = timed("run", str(recipe))
        shutil.copytree(work / "out", work / "cached-out")
        uncached, _ = timed("run", str(recipe), "--force", "--no-cache", "-q")
        same = all(filecmp.cmp(p, work / "out" / p.name, shallow=False)
                   for p in (work / "cached-out").iterdir())
        verify, _ = timed("verify", str(recipe))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ncheckpoints: {ckpt} (base + {sum(p.is_dir() for p in ckpt.iterdir()) - 1} "
          f"fine-tunes), merge: {op}")
    print("| run | wall s | ratio to cold |")
    print("|---|---:|---:|")
    print(f"| cold (hashes inputs, fills cache) | {cold:.2f} | 1.00 |")
    print(f"| apply scale changed ({hits[0] if hits else 'no cache hit'}) | {changed:.2f} | "
          f"{changed / cold:.3f} |")
    print(f"| unchanged ({out2.strip().splitlines()[0][:40]}) | {unchanged:.2f} | "
          f"{unchanged / cold:.3f} |")
    print(f"| same change, --no-cache | {uncached:.2f} | {uncached / cold:.3f} |")
    print(f"| verify | {verify:.2f} | {verify / cold:.3f} |")
    print(f"cached rerun output byte-identical to uncached: {same}")


if __name__ == "__main__":
    main()
