"""One hash of the TIES kernel's bytes over a grid of awkward cases, to show that a faster
kernel gives the same bytes as the one before it.

    python benchmarks/ties_bytes.py [--against DIR]

The grid: lengths 1 to 2^20 (around the merge's and the search's chunk edges), 1, 2, 5 and
8 members made from bfloat16 values (so magnitudes tie at the threshold), with and without
NaN, ±inf and ±0 entries, default, unit, growing, mixed-sign and tiny weights, densities
0.2, 0.9 and 1, both majorities, normalize on and off: 3840 cases. ``--against DIR`` (a
package tree made with ``mkdir DIR && git archive COMMIT tvrecipe | tar -x -C DIR``) hashes
that tree's kernel too and says whether they agree (exit 1 if not). Each tree runs in its own
process, from a temporary folder, with its tree first on ``PYTHONPATH`` ("this tree" is the
checkout this script is in).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # benchmarks/run.py: ROOT, env_with_package

GRID = r"""
import hashlib, torch
import tvrecipe.ops.sparsify as S
g = torch.Generator().manual_seed(0)
h = hashlib.sha256()
cases = 0
for n in [1, 7, 1000, 262143, 262144, 262145, 600001, 1 << 20]:
    for m in [1, 2, 5, 8]:
        for special in [False, True]:
            xs = [torch.randn(n, generator=g).to(torch.bfloat16).float() * (1 + i)
                  for i in range(m)]
            if special and n > 20:
                xs[0][3] = float("nan"); xs[-1][5] = float("inf"); xs[0][7] = -0.0
                xs[-1][11] = 0.0; xs[0][13] = -float("inf")
            for weights in [None, [1.0] * m, [0.5 + 0.25 * i for i in range(m)],
                            [(-1) ** i * (0.3 + i) for i in range(m)], [1e-30] * m]:
                for d in [0.2, 1.0, 0.9]:
                    for maj in ["total", "count"]:
                        for norm in [True, False]:
                            r = S.ties(xs, density=d, weights=weights, majority=maj,
                                       normalize=norm)
                            h.update(r.numpy().tobytes()); cases += 1
print(cases, h.hexdigest(), S.__file__)
"""


def digest(tree: str | Path, cwd: str) -> str:
    done = subprocess.run([sys.executable, "-c", GRID], env=bench.env_with_package(Path(tree)),
                          cwd=cwd, text=True, capture_output=True, check=False)
    if done.returncode:
        sys.exit(f"the grid failed ({tree}):\n{done.stderr}")
    return done.stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", help="a tvrecipe package tree to compare with")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mine = digest(bench.ROOT, tmp)  # (this checkout: "this tree")
        print(f"this tree: {mine}")
        if not a.against:
            return 0
        theirs = digest(a.against, tmp)
        print(f"{a.against}: {theirs}")
    same = mine.split()[:2] == theirs.split()[:2]
    print("same bytes" if same else "DIFFERENT bytes")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
