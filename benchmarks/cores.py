"""Do a run's bytes depend on the number of cores? Runs each recipe that `run.py` wrote as
machines of 1, 2, 3, 8 and 16 cores and prints the SHA-256 of each output's weights.

    python benchmarks/run.py --size small --cache off     # writes bench-out/runs/small-n8/
    python benchmarks/cores.py [--size small] [--only tsv_merge iso_c ...]

A machine of n cores is emulated in the child process: ``os.sched_getaffinity`` says n
cores, so tvrecipe gives torch n - 1 threads for its math, starts n math threads and cuts its
work as it would there (more threads than this machine has cores only cost time). Every row
must show one hash; a row with several is an op whose bytes depend on the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = HERE.parent / "bench-out" / "runs"
CORES = (1, 2, 3, 8, 16)

CHILD = """\
import os, sys
n = int(sys.argv[1])
os.sched_getaffinity = lambda pid: set(range(n))
sys.argv = ["tvrecipe", "run", sys.argv[2], "--no-cache", "--force", "-q"]
from tvrecipe.cli import main
main()
"""


def outputs_digest(recipe: Path) -> str:
    """SHA-256 over every output's .safetensors files, in path order."""
    h = hashlib.sha256()
    for path in re.findall(r"path: ([^,}\s]+)", recipe.read_text().split("outputs:", 1)[1]):
        for f in sorted(Path(path).rglob("*.safetensors")):
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--only", nargs="*", help="recipe names (default: every one but warmup)")
    a = p.parse_args()
    folder = RUNS / f"{a.size}-n{a.n}"
    recipes = sorted(folder.glob("*.yaml"))
    if not recipes:
        print(f"no recipes in {folder}: run `python benchmarks/run.py --size {a.size} "
              f"--n {a.n} --cache off` first", file=sys.stderr)
        return 2
    names = a.only or [r.stem for r in recipes if r.stem != "warmup"]
    print(f"| recipe | {' | '.join(f'{n} cores' for n in CORES)} | same bytes | s |")
    print(f"|---|{'---|' * len(CORES)}---|---|")
    bad = 0
    for name in names:
        recipe = folder / f"{name}.yaml"
        t0 = time.perf_counter()
        digests = []
        for n in CORES:
            done = subprocess.run([sys.executable, "-c", CHILD, str(n), str(recipe)],
                                  check=False, capture_output=True, text=True)
            digests.append(outputs_digest(recipe) if done.returncode == 0
                           else f"exit {done.returncode}")
        same = len(set(digests)) == 1 and not digests[0].startswith("exit")
        bad += not same
        print(f"| {name} | {' | '.join(digests)} | {'yes' if same else 'NO'} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
