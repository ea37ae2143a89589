"""Local executor against `--cluster local:N` on the same machine, same recipes, same bytes.

    python benchmarks/cluster.py                          # sum and cluster_basis, local:2
    python benchmarks/cluster.py --only decompose --workers 2 --repeat 2
    python benchmarks/cluster.py --set bench-out/ckpt/medium-n8

The checkpoints come from `benchmarks/run.py` (or `benchmarks/synth.py`); this script only
reads them. Each run is `tvrecipe run RECIPE --force --no-cache` in a child process; the
table shows its wall time (the cluster's includes starting and stopping the LocalCluster),
the run's own time (`done in … s`: from the cache lookup to the commit), the ratio of the
cluster run to the local one, and whether the outputs have the same bytes. `--report` gives
the time and bytes of each worker, printed below the table. Outputs go to
`bench-out/out/cluster/` and are deleted after each run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import run as bench  # benchmarks/run.py: the rows' recipes

OPS = ("sum", "ties", "cluster_basis", "decompose")


def recipe_text(op: str, ckpt: Path, out: Path) -> str:
    """The recipe of ``benchmarks/run.py``'s row for ``op``, over every fine-tune in ``ckpt``."""
    n = sum(1 for p in ckpt.iterdir() if p.is_dir() and p.name.startswith("ft"))
    return bench.recipe_text(op, ckpt, n, out)


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def run(recipe: Path, out: Path, report: Path, cluster: str | None) -> dict:
    cmd = [sys.executable, "-m", "tvrecipe.cli", "run", str(recipe), "--force", "--no-cache",
           "--report", str(report)]
    if cluster:
        cmd += ["--cluster", cluster]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    m = re.search(r"done in ([\d.]+) s", proc.stdout)
    got = {"wall": wall, "run": float(m.group(1)) if m else float("nan"),
           "digest": digest(out),
           "workers": json.loads(report.read_text()).get("cluster:workers", {})}
    shutil.rmtree(out, ignore_errors=True)
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", type=Path, default=ROOT / "bench-out" / "ckpt" / "large-n8",
                   help="a checkpoint set made by benchmarks/run.py or synth.py")
    p.add_argument("--only", nargs="+", choices=OPS, default=["sum", "cluster_basis"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest is kept")
    args = p.parse_args()
    ckpt = args.set.resolve()
    if not (ckpt / "base").is_dir():
        raise SystemExit(f"{ckpt}: no checkpoint set; make one with "
                         "`python benchmarks/run.py --size large --only sum`")
    work = ROOT / "bench-out" / "runs" / f"cluster-{ckpt.name}"
    work.mkdir(parents=True, exist_ok=True)
    out_root = ROOT / "bench-out" / "out" / "cluster"
    cluster = f"local:{args.workers}"
    rows = []
    for op in args.only:
        out = out_root / op
        recipe = work / f"{op}.yaml"
        recipe.write_text(recipe_text(op, ckpt, out))
        best: dict[str, dict] = {}
        for _ in range(args.repeat):
            for mode, where in (("local", None), (cluster, cluster)):
                got = run(recipe, out, work / f"{op}.{mode.replace(':', '')}.json", where)
                if mode not in best or got["wall"] < best[mode]["wall"]:
                    best[mode] = got
        loc, clu = best["local"], best[cluster]
        rows.append((op, loc, clu))
        print(f"{op}: local {loc['wall']:.1f} s (run {loc['run']:.1f} s), {cluster} "
              f"{clu['wall']:.1f} s (run {clu['run']:.1f} s), "
              f"same bytes: {loc['digest'] == clu['digest']}", flush=True)
    print(f"\n| merge | local wall (run) | {cluster} wall (run) | ratio wall (run) | "
          "same bytes |")
    print("|---|---|---|---|---|")
    for op, loc, clu in rows:
        print(f"| {op} | {loc['wall']:.1f} s ({loc['run']:.1f} s) | {clu['wall']:.1f} s "
              f"({clu['run']:.1f} s) | {clu['wall'] / loc['wall']:.2f}x "
              f"({clu['run'] / loc['run']:.2f}x) | {'yes' if loc['digest'] == clu['digest'] else 'NO'} |")
    print("\nper worker (tasks, seconds in tasks, MB read, MB staged):")
    for op, _loc, clu in rows:
        for w, s in sorted(clu["workers"].items()):
            print(f"  {op} {w}: {s['tasks']} tasks, {s['seconds']:.1f} s, "
                  f"{s['bytes_read'] / 1e6:.0f} MB read, {s['bytes_staged'] / 1e6:.0f} MB staged")


if __name__ == "__main__":
    main()
