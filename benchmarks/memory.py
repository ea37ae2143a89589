"""Peak memory of `tvrecipe run` (task arithmetic of n fine-tunes) against model size.

    python benchmarks/memory.py [--sizes medium large] [--n 8]

For each size: generate the synthetic checkpoints (cached, see run.py), run the task-arithmetic
recipe as a child process and report its peak RSS next to the size of one checkpoint, with the
RSS of a bare `python -c "import tvrecipe.cli, torch"` so the engine's own share is visible.
A streaming engine should stay near the baseline plus a few tensors, whatever the model size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench
import synth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", choices=list(bench.SIZES), default=["medium", "large"])
    p.add_argument("--n", type=int, default=8, help="number of fine-tunes")
    a = p.parse_args()

    base = bench.import_baseline()
    rows = []
    for size in a.sizes:
        cfg, ckpt = bench.ensure_checkpoints(size, a.n)
        models = [ckpt / m for m in synth.model_names(a.n)]
        work = bench.BENCH / "runs" / f"{size}-n{a.n}"
        work.mkdir(parents=True, exist_ok=True)
        out = bench.BENCH / "out" / f"{size}-n{a.n}" / "memory-sum"
        recipe = work / "memory-sum.yaml"
        recipe.write_text(bench.recipe_text("sum", ckpt, a.n, out))
        bench.measure_floor("read", models, work)  # warm the page cache
        got = {}
        # "off" first: it also hashes the inputs into the memo, so "cold" pays no hashing.
        for mode in ("off", "cold"):
            m = bench.run_tvrecipe(recipe, cache=mode)
            if out.exists():
                shutil.rmtree(out)
            if m.rc:
                sys.exit(f"{size}: tvrecipe failed (exit {m.rc}):\n{m.stderr[-2000:]}")
            got[mode] = m
            print(f"{size}, cache {mode}: {m.wall:.1f} s, peak RSS {m.peak_rss_mb:.0f} MB",
                  flush=True)
        rows.append((size, cfg, bench.folder_mb(models[0]), got["cold"], got["off"]))

    print(f"\n## Peak memory of `tvrecipe run`: task arithmetic of base + {a.n} fine-tunes "
          f"({os.cpu_count()} CPU cores); default cache on (fresh --cache-dir), "
          f"and --no-cache\n")
    print("| size | model params | one checkpoint MB | peak RSS MB | RSS / checkpoint | "
          "peak anon MB | peak file-backed MB | RSS − baseline MB | wall s | "
          "peak RSS, --no-cache MB | peak anon, --no-cache MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size, cfg, mb, m, off in rows:
        print(f"| {size} ({cfg.hidden}×{cfg.layers}, vocab {cfg.vocab}) | "
              f"{cfg.params() / 1e6:.1f}M | {mb:.0f} | {m.peak_rss_mb:.0f} | "
              f"{m.peak_rss_mb / mb:.2f} | {m.peak_anon_mb:.0f} | {m.peak_file_mb:.0f} | "
              f"{m.peak_rss_mb - base.peak_rss_mb:.0f} | {m.wall:.1f} | "
              f"{off.peak_rss_mb:.0f} | {off.peak_anon_mb:.0f} |")
    print(f"| baseline: `python -c \"import tvrecipe.cli, torch\"` | – | – | "
          f"{base.peak_rss_mb:.0f} | – | {base.peak_anon_mb:.0f} | {base.peak_file_mb:.0f} | 0 | "
          f"{base.wall:.1f} | – | – |")
    if len(rows) == 2:
        (_, _, mb0, m0, _), (_, _, mb1, m1, _) = rows
        grow = (m1.peak_rss_mb - m0.peak_rss_mb) / (mb1 - mb0)
        print(f"\npeak RSS grows {m1.peak_rss_mb - m0.peak_rss_mb:.0f} MB for "
              f"{mb1 - mb0:.0f} MB more per checkpoint ({grow:.2f} MB per checkpoint MB); "
              f"anonymous memory grows {m1.peak_anon_mb - m0.peak_anon_mb:.0f} MB")


if __name__ == "__main__":
    main()
