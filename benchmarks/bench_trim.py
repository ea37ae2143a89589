"""Micro-benchmark: exact top-k trim strategies, and a TIES merge against a plain weighted sum."""

from __future__ import annotations

import argparse
import time

import torch

from tvrecipe.ops import arithmetic
from tvrecipe.ops.sparsify import ties, trim


def _best_ms(fn, repeat: int) -> float:
    fn()  # warm-up: first touches of fresh pages and allocator growth are not the kernel
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def trim_kthvalue(x: torch.Tensor, density: float) -> torch.Tensor:
    """Baseline: full kthvalue on |x| (ties at the threshold not resolved)."""
    a = x.abs().reshape(-1)
    k = max(1, int(density * a.numel()))
    thr = torch.kthvalue(a, a.numel() - k + 1).values
    return torch.where(x.abs() >= thr, x, 0.0)


def trim_topk(x: torch.Tensor, density: float) -> torch.Tensor:
    """Baseline: topk indices on |x|, scattered back."""
    xf = x.reshape(-1)
    k = max(1, int(density * xf.numel()))
    idx = torch.topk(xf.abs(), k, sorted=False).indices
    out = torch.zeros_like(xf)
    out[idx] = xf[idx]
    return out.view(x.shape)


def bench_shape(shape: tuple[int, int], n: int, d: float, repeat: int, baselines: bool) -> None:
    """Time sum, trim and TIES on n random task vectors of one shape and print a line."""
    xs = [torch.randn(shape) for _ in range(n)]
    ws = [1.0 / n] * n
    t_sum = _best_ms(lambda: arithmetic.sum(xs, weights=ws), repeat)
    t_trim = _best_ms(lambda: [trim(x, density=d) for x in xs], repeat)
    t_ties = _best_ms(lambda: ties(xs, density=d, weights=ws), repeat)
    t_cnt = _best_ms(lambda: ties(xs, density=d, weights=ws, majority="count"), repeat)
    t_d1 = _best_ms(lambda: ties(xs, density=1.0, weights=ws), repeat)
    print(
        f"{shape}: sum {t_sum:.1f} ms | trim x{n} {t_trim:.1f} ms | "
        f"ties total {t_ties:.1f} ms ({t_ties / t_sum:.1f}x sum) | "
        f"ties count {t_cnt:.1f} ms ({t_cnt / t_sum:.1f}x) | "
        f"ties density 1 {t_d1:.1f} ms ({t_d1 / t_sum:.1f}x)"
    )
    if baselines:
        t_kth = _best_ms(lambda: [trim_kthvalue(x, d) for x in xs], 1)
        t_topk = _best_ms(lambda: [trim_topk(x, d) for x in xs], 1)
        print(f"{shape}: trim x{n} via kthvalue {t_kth:.1f} ms, via topk {t_topk:.1f} ms")


def main() -> None:
    """Print timings (best of --repeat) for each shape."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=8, help="number of task vectors")
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--baselines", action="store_true", help="also time kthvalue/topk trims")
    args = p.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, n={args.n}, "
        f"density={args.density}"
    )
    for shape in [(4096, 4096), (1024, 2816)]:
        bench_shape(shape, args.n, args.density, args.repeat, args.baselines)


if __name__ == "__main__":
    main()
