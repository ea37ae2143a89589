"""How many torch calls each run makes, by thread, on a machine of n cores, emulated here.

    python benchmarks/calls.py [--size large] [--only ties dare] [--cores 2 16]
                               [--against DIR]

Every torch call a math thread makes is made holding the GIL that all the threads share,
and on a machine of many cores the threads queue for it (benchmarks/README.md, "The GIL").
Unlike the seconds held (``gil.py``, a sampling profiler, noisy on a small machine), the
number of calls is exact and the same on every machine of a given core count, so a machine
of 16 cores can be studied on a laptop: the child process is told it has n cores
(``os.sched_getaffinity``, as in ``cores.py``), so tvrecipe starts n math threads and cuts
its work as it would there, and a profile hook counts the calls of torch functions and
tensor methods (and of numpy array methods) on each thread. Times under emulation mean
nothing: n threads share this machine's cores.

Runs run.py's recipes (``--no-cache``) over its synthetic checkpoints, made if missing.
``--against DIR`` (a package tree made with ``mkdir DIR && git archive COMMIT tvrecipe | tar
-x -C DIR``) counts that tree's calls too. Profiling slows a run about twofold.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # benchmarks/run.py: checkpoints and recipes

CHILD = """\
import collections, json, os, sys, threading
n, recipe, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.sched_getaffinity = lambda pid: set(range(n))
import numpy, torch
counts = collections.Counter()

def hook(frame, event, arg):
    if event != "c_call":
        return
    owner = getattr(arg, "__self__", None)
    if (isinstance(owner, torch.Tensor)  # a tensor method, or torch.mul and the like
            or getattr(arg, "__qualname__", "").startswith("_VariableFunctionsClass.")):
        kind = "torch"
    elif isinstance(owner, numpy.ndarray):
        kind = "numpy"
    else:
        return
    name = threading.current_thread().name
    group = "math" if name.startswith("tvrecipe-math") else "other"
    counts[group + " " + kind] += 1

sys.setprofile(hook)
threading.setprofile(hook)
sys.argv = ["tvrecipe", "run", recipe, "--no-cache", "--force", "-q"]
from tvrecipe.cli import main
try:
    main()
finally:
    sys.setprofile(None)
    threading.setprofile(None)
    with open(out, "w") as f:
        json.dump(dict(counts), f)
"""

COLUMNS = ("math torch", "other torch", "math numpy", "other numpy")


def count(recipe: Path, cores: int, tree: Path, tmp: Path) -> dict[str, int]:
    out = tmp / "calls.json"
    done = subprocess.run([sys.executable, "-c", CHILD, str(cores), str(recipe), str(out)],
                          env=bench.env_with_package(tree), cwd=tmp, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    if done.returncode:
        sys.exit(f"{recipe.name} on {cores} cores failed:\n{done.stderr}")
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_row_args(p)
    p.add_argument("--cores", nargs="*", type=int, default=[2, 16])
    p.add_argument("--against", help="a tvrecipe package tree to count beside this one")
    a = p.parse_args()
    _cfg, ckpt = bench.ensure_checkpoints(a.size, a.n)
    trees = [("this tree", bench.ROOT)] + ([(a.against, Path(a.against))] if a.against else [])
    print("| recipe | tree | cores | " + " | ".join(COLUMNS) + " |")
    print("|---|---|---|" + "---|" * len(COLUMNS))
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.only:
            recipe = bench.write_recipe(Path(tmp), name, ckpt, a.n)
            for cores in a.cores:
                for label, tree in trees:
                    got = count(recipe, cores, tree, Path(tmp))
                    cells = " | ".join(f"{got.get(c, 0):,}" for c in COLUMNS)
                    print(f"| {name} | {label} | {cores} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
