"""How long each run holds Python's GIL: the floor that no number of cores goes below.

    python benchmarks/gil.py [--size large] [--only sum ties dare] [--rounds 2]
                             [--against DIR]

tvrecipe's math threads run torch and numpy kernels with the GIL released, but every Python
line between two kernels (slicing a chunk, calling the next op) holds it, and only one
thread at a time can. On a machine with many cores the threads then queue for the GIL: the
seconds a run holds it bound its time from below, whatever the core count. This runs
run.py's recipes (on the CPU, over its synthetic checkpoints, made if missing) under
``py-spy record --gil`` (a sampling profiler, ``pip install py-spy``; without it
this says so and exits 0), which samples only the thread that holds the GIL, and prints
those seconds outside imports, by part of the engine, and against task arithmetic's (the
``sum`` recipe).

On a machine of few cores the figure runs high: a thread the OS takes off its core while it
holds the GIL still holds it. Compare rows of one run, or one commit against another
(``--against DIR``, a package tree made with ``mkdir ab-old && git archive COMMIT tvrecipe |
tar -x -C ab-old``: each round runs both, alternated). "This tree" is the tvrecipe that
``python -m tvrecipe.cli`` imports outside the checkout (an editable install of it, say).
Wall times are under the profiler, which stops the run at each sample.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # benchmarks/run.py: checkpoints and recipes

RATE = 200  # samples per second

# Parts of a run: a sample counts for the first part whose frames its stack holds. (Frames
# named with their class, as py-spy 0.4.3 and later name them on Python 3.11 and later.)
PARTS = (
    ("threshold searches", ("_kth_largest_abs", "_kth_direct")),
    ("TIES merge", ("_ties_merge",)),
    ("DARE draws and masks", ("DareStep.evaluate",)),
    ("reading", ("Runner._read_node", "Runner._read_later")),
    ("other steps", ("StepEvaluator.__call__",)),
    ("writing and finishing", ("Output.", "write_release", "write_run_lock",
                               "commit_outputs")),
)


def held(raw: Path) -> tuple[float, float, Counter]:
    """(seconds holding the GIL outside imports, seconds importing, seconds by part) from
    py-spy's raw output (one line per stack: frames, then a count)."""
    run = imports = 0
    parts: Counter = Counter()
    qualified = False
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        qualified = qualified or "Runner." in stack
        if "importlib._bootstrap" in stack:
            imports += n
            continue
        run += n
        part = next((name for name, frames in PARTS
                     if any(f in stack for f in frames)), "the rest")
        parts[part] += n
    if not qualified:
        print("warning: py-spy named no frame with its class (it does from 0.4.3, on Python "
              "3.11 and later): every sample falls in 'the rest'", file=sys.stderr)
    return run / RATE, imports / RATE, Counter({k: v / RATE for k, v in parts.items()})


def one(recipe: Path, pythonpath: str | None, tmp: Path) -> tuple[float, float, float, Counter]:
    """(wall s, GIL s outside imports, GIL s importing, GIL s by part) of one run."""
    raw = tmp / "gil.txt"
    env = bench.env_with_package(Path(pythonpath)) if pythonpath else None
    cmd = ["py-spy", "record", "--gil", "-r", str(RATE), "-f", "raw", "-o", str(raw), "--",
           sys.executable, "-m", "tvrecipe.cli", "run", str(recipe), "--no-cache", "--force",
           "-q"]
    t0 = time.perf_counter()
    # (From another folder: `python -m` puts the working folder first on sys.path, where a
    # checkout's own tvrecipe would shadow --against's.)
    done = subprocess.run(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode:
        sys.exit(f"{recipe.name}: py-spy or the run failed:\n{done.stderr}")
    wall = time.perf_counter() - t0
    run, imports, parts = held(raw)
    return wall, run, imports, parts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_row_args(p)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--against", help="a tvrecipe package tree to run beside this one")
    a = p.parse_args()
    if shutil.which("py-spy") is None:
        print("py-spy is not installed (pip install py-spy): nothing measured")
        return 0
    _cfg, ckpt = bench.ensure_checkpoints(a.size, a.n)
    trees = [("this tree", None)] + ([(a.against, str(Path(a.against).resolve()))]
                                     if a.against else [])
    got: dict[tuple[str, str], list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        recipes = [bench.write_recipe(Path(tmp), name, ckpt, a.n) for name in a.only]
        for _ in range(a.rounds):
            for recipe in recipes:
                for label, path in trees:
                    r = one(recipe, path, Path(tmp))
                    got.setdefault((recipe.stem, label), []).append(r)
                    print(f"{recipe.stem} ({label}): {r[0]:.2f} s wall, GIL held "
                          f"{r[1]:.2f} s outside imports", flush=True)

    def median(key: tuple[str, str], i: int) -> float:
        return statistics.median(r[i] for r in got[key])

    names = [name for name, _ in PARTS] + ["the rest"]
    print(f"\nMedians of {a.rounds} rounds; GIL seconds (py-spy --gil at {RATE} Hz):\n")
    print("| recipe | tree | wall s | GIL s | GIL / sum's | "
          + " | ".join(names) + " |")
    print("|---|---|---|---|---|" + "---|" * len(names))
    for recipe in recipes:
        for label, _ in trees:
            key = (recipe.stem, label)
            base = ("sum", label)
            ratio = (f"{median(key, 1) / median(base, 1):.2f}×" if base in got else "")
            cells = [f"{statistics.median(r[3][n] for r in got[key]):.2f}" for n in names]
            print(f"| {recipe.stem} | {label} | {median(key, 0):.2f} | {median(key, 1):.2f} | "
                  f"{ratio} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
