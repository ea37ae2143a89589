"""GPU against CPU: benchmarks/run.py's rows run with `--device cuda` and `--device cpu` on one
machine, next to the floor of reading every input onto the GPU.

    python benchmarks/gpu.py --size large                   # the default rows, GPU and CPU
    python benchmarks/gpu.py --size large --only sum ties --no-cpu
    python benchmarks/gpu.py --size small --device cpu      # smoke run on a machine without one

The checkpoints and recipes are benchmarks/run.py's (made once under bench-out/ckpt/). Each
row is `tvrecipe run RECIPE --device D --force --no-cache` in a child process: wall clock
(interpreter start and CUDA initialisation included), the run's own time (`done in … s`), and
peak RSS. The floor, in a child process too: a reading thread reads each input tensor with
tvrecipe's own reader straight into pinned memory (as a run does) while the main thread copies
the one before to the device (non-blocking) and adds it in float32 there; then one
synchronisation. That is reading and H2D copying overlapped, the least any GPU run of these
recipes does. A second line gives the same loop reading through safetensors' memory map and
pinning a copy (how GPU runs read before 2026-11-27). The table it prints is the GPU section
of benchmarks/README.md. Without CUDA (and without `--device cpu`) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import run as bench  # benchmarks/run.py: checkpoints, recipes, measuring a child

# Rows whose compute a GPU may change (run.py's names).
ROWS = ["sum", "ties", "dare", "cluster_basis", "cluster_basis_reuse", "decompose", "decompose_mix", "breadcrumbs",
        "model_stock", "compress_pca", "compress_ae", "iso_c", "tsv_merge", "iso_cts"]


def floor_worker(device: str, models: list[Path], reader: str = "tvrecipe") -> None:
    """In a child: read every tensor of every model, copy it to ``device`` and accumulate.
    ``reader``: ``tvrecipe`` (its reader, into pinned memory on a GPU, as a run reads) or
    ``mapped`` (safetensors' memory map, then a pinned copy: how GPU runs read until
    2026-11-27, and 0.8 against 1.5 s for tvrecipe's on the H200 machine then)."""
    import torch

    from tvrecipe.exec.buffers import BufferPool, pinned
    from tvrecipe.store.checkpoint import open_checkpoint

    t0 = time.perf_counter()
    dev = torch.device(device)
    cks = [open_checkpoint(m) for m in models]
    # Where a tvrecipe run reads to: pinned memory for a GPU, the run's pool on the CPU.
    into = pinned if dev.type == "cuda" else BufferPool().empty
    handles = bench.tensor_handles(models) if reader == "mapped" else None

    def get(i: int, name: str) -> torch.Tensor:
        if handles is None:
            return cks[i].get(name, empty=into)
        t = handles[i][name].get_tensor(name)
        return t.pin_memory() if dev.type == "cuda" else t
    todo: queue.Queue = queue.Queue(maxsize=2)
    nbytes = [0]

    def reader() -> None:
        for name in cks[0].tensors:
            ts = []
            for i in range(len(cks)):
                t = get(i, name)
                nbytes[0] += t.numel() * t.element_size()
                ts.append(t)
            todo.put(ts)
        todo.put(None)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    while (ts := todo.get()) is not None:
        acc = None
        for t in ts:
            x = t.to(dev, non_blocking=True)
            acc = x.to(torch.float32) if acc is None else acc.add_(x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": nbytes[0], "device": name}))


def measure_floor(device: str, models: list[Path], reader: str = "tvrecipe") -> bench.Measured:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--floor-worker", device,
           "--floor-reader", reader]
    m = bench.measure(cmd + [str(d) for d in models])
    if m.rc == 0:
        m.extra.update(json.loads(m.stdout.strip().splitlines()[-1]))
    return m


def run_row(op: str, device: str, work: Path, ckpt: Path, n: int,
            env: dict[str, str] | None = None) -> bench.Measured:
    """One row's `tvrecipe run` on ``device`` (in ``env``), its output removed after."""
    recipe = bench.write_recipe(work, op, ckpt, n)
    m = bench.run_tvrecipe(recipe, device=device, env=env)
    shutil.rmtree(work / f"out-{op}", ignore_errors=True)
    return m


def against(a: argparse.Namespace, todo: list[str], work: Path, ckpt: Path,
            t_start: float) -> None:
    """--against: each row on the device with this tree's tvrecipe and DIR's, alternated."""
    other = str(a.against.resolve())
    env = bench.env_with_package(a.against)
    where = subprocess.run([sys.executable, "-c", "import tvrecipe; print(tvrecipe.__file__)"],
                           env=env, capture_output=True, text=True, cwd="/", check=False)
    print(f"\nA/B on {a.device}: this tree against {where.stdout.strip() or where.stderr}")
    for op in todo:
        got: dict[str, list[str]] = {"this tree": [], other: []}
        for _ in range(a.rounds):
            for side, times in got.items():
                if a.deadline and time.perf_counter() - t_start > a.deadline:
                    break
                m = run_row(op, a.device, work, ckpt, a.n, env if side == other else None)
                times.append(f"exit {m.rc}" if m.rc else f"{m.extra.get('engine_s')}")
        print(f"{op}: run s, this tree {', '.join(got['this tree']) or '–'}; "
              f"{other}: {', '.join(got[other]) or '–'}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(bench.SIZES), default="large")
    p.add_argument("--n", type=int, default=8, help="number of fine-tunes")
    p.add_argument("--only", nargs="+", choices=bench.OPS, help="these rows (default: "
                   + " ".join(ROWS) + ")")
    p.add_argument("--device", default="cuda", help="the accelerator (default cuda)")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU runs of the rows")
    p.add_argument("--device-only", nargs="+", choices=bench.OPS, metavar="OP",
                   help="run only these of the rows on the device (the CPU runs them all)")
    p.add_argument("--deadline", type=float, default=0,
                   help="start no row after this many seconds (0: no limit)")
    p.add_argument("--against", type=Path, metavar="DIR",
                   help="also time each row on the device with the tvrecipe package in DIR "
                        "(e.g. `git archive COMMIT tvrecipe | tar -x -C DIR`), alternated with "
                        "this tree's, --rounds times each")
    p.add_argument("--rounds", type=int, default=2, help="rounds of each side with --against")
    p.add_argument("--floor-worker", help=argparse.SUPPRESS)
    p.add_argument("--floor-reader", default="tvrecipe", help=argparse.SUPPRESS)
    p.add_argument("models", nargs="*", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    t_start = time.perf_counter()  # --deadline counts from here (checkpoints and floor included)
    if a.floor_worker:
        floor_worker(a.floor_worker, a.models, a.floor_reader)
        return

    import torch
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure (--device cpu runs the script's "
              "rows on the CPU, as a smoke test)")
        return
    _cfg, ckpt = bench.ensure_checkpoints(a.size, a.n)
    models = [ckpt / "base", *(ckpt / f"ft{i}" for i in range(a.n))]
    work = bench.BENCH / "gpu"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    floor = bench.best_of(2, lambda: measure_floor(a.device, models))
    if floor.rc:
        sys.exit(f"floor failed:\n{floor.stderr}")
    cpu_floor = None if a.no_cpu else bench.best_of(2, lambda: measure_floor("cpu", models))
    print(f"device: {floor.extra['device']}; torch {torch.__version__}; "
          f"{len(os.sched_getaffinity(0))} CPU cores")
    gb = floor.extra["bytes"] / 1e9
    floor_line = (f"floor, read + copy to {a.device} + accumulate (overlapped): {floor.wall:.2f} s "
                  f"wall, {floor.extra['seconds']:.2f} s in the loop, {gb:.2f} GB"
                  + (f"; same on the CPU: {cpu_floor.wall:.2f} s wall, "
                     f"{cpu_floor.extra['seconds']:.2f} s in the loop" if cpu_floor else ""))
    print(floor_line, flush=True)  # now, and again under the table
    mapped = bench.best_of(2, lambda: measure_floor(a.device, models, "mapped"))
    if not mapped.rc:
        floor_line += (f"\n  the same read through safetensors' memory map, then pinned: "
                       f"{mapped.wall:.2f} s wall, {mapped.extra['seconds']:.2f} s in the loop")
        print(floor_line.splitlines()[-1], flush=True)
    # Every row on the device first, then on the CPU (the spectral rows last: slowest there),
    # each printed as it ends; no row starts once --deadline seconds have passed since the
    # start, so the table is printed inside a caller's time limit.
    todo = a.only or ROWS
    on = {(op, dev): None for op in todo for dev in (a.device, "cpu")}
    for dev in [a.device] + ([] if a.no_cpu else ["cpu"]):
        for op in todo:
            if dev == a.device and a.device_only and op not in a.device_only:
                continue
            if a.deadline and time.perf_counter() - t_start > a.deadline:
                print(f"{op} on {dev}: not run (--deadline {a.deadline:.0f} s passed)")
                continue
            m = on[op, dev] = run_row(op, dev, work, ckpt, a.n)
            if m.rc:
                print(f"{op} on {dev}: exit {m.rc}\n{m.stderr.strip()[-2000:]}", file=sys.stderr)
            else:
                print(f"{op} on {dev}: {m.wall:.2f} s wall, run {m.extra.get('engine_s')} s, "
                      f"peak RSS {m.peak_rss_mb:.0f} MB", flush=True)
    rows = [(op, on[op, a.device], on[op, "cpu"]) for op in todo]
    if a.against:
        against(a, todo, work, ckpt, t_start)

    print("\n" + floor_line)
    print(f"\n| row | {a.device} wall s | {a.device} run s | CPU wall s | CPU run s "
          f"| {a.device} / CPU | {a.device} / floor |")
    print("|---|---|---|---|---|---|---|")
    for op, on_dev, on_cpu in rows:
        def cell(m: bench.Measured | None, key: str = "") -> str:
            if m is None:
                return "–"
            if m.rc:
                return f"exit {m.rc}"
            return bench.fmt(m.extra.get("engine_s") if key else m.wall, 2)
        ok_dev = on_dev is not None and not on_dev.rc
        ratio = (f"{on_dev.wall / on_cpu.wall:.2f}×"
                 if ok_dev and on_cpu is not None and not on_cpu.rc else "–")
        to_floor = f"{on_dev.wall / floor.wall:.2f}×" if ok_dev else "–"
        print(f"| {bench.LABELS[op]} | {cell(on_dev)} | {cell(on_dev, 'run')} | "
              f"{cell(on_cpu)} | {cell(on_cpu, 'run')} | {ratio} | {to_floor} |")


if __name__ == "__main__":
    main()
