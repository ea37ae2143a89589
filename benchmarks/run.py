"""End-to-end benchmark: `tvrecipe run` of the standard merges on synthetic Llama checkpoints.

    python benchmarks/run.py [--size small|medium|large] [--n 8] [--only sum ties ...]

Generates the checkpoints once (cached under bench-out/ckpt/), writes one recipe per merge,
times each `tvrecipe run` as a child process (wall clock, peak RSS, bytes read/written) and, in
the same run, a floor: the bare cost of reading every input and summing it in float32 with
torch. See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH = ROOT / "bench-out"
sys.path.insert(0, str(HERE))

import synth

SIZES = {
    "small": {"hidden": 256, "layers": 4, "vocab": 8000},
    "medium": {"hidden": 512, "layers": 8, "vocab": 32000},
    "large": {"hidden": 1024, "layers": 12, "vocab": 32000},
    "xl": {"hidden": 1536, "layers": 16, "vocab": 32000},
}
SHARD = "256MB"  # input shard size: real checkpoints are sharded, so read through the index
OPS = ["sum", "ties", "dare", "cluster_basis", "cluster_basis_reuse", "decompose", "decompose_mix",
       "linear", "slerp", "breadcrumbs", "della", "model_stock",
       "tsv_merge", "iso_c", "iso_cts", "compress_pca", "compress_ae"]
LABELS = {"sum": "task arithmetic (sum + apply)", "ties": "TIES d=0.2 + apply",
          "dare": "DARE d=0.3 + sum + apply", "cluster_basis": "cluster_basis k=auto → vectors",
          "cluster_basis_reuse": "the same, run --reuse-memory 16GB",
          "decompose": "decompose rank 16 → unique vectors",
          "decompose_mix": "decompose rank 16 → sum of unique parts + apply",
          "linear": "linear (weights 1…n, normalized)", "slerp": "slerp base→ft0 t=[0, 0.5, 1]",
          "breadcrumbs": "breadcrumbs d=0.9 γ=0.01 + consensus + apply",
          "della": "DELLA d=0.4 ε=0.1 + consensus + apply",
          "model_stock": "model_stock + apply",
          "tsv_merge": "tsv_merge + apply", "iso_c": "iso c + apply",
          "iso_cts": "iso cts + apply",
          "compress_pca": "compress_basis pca m=4 + sum of atoms + apply",
          "compress_ae": "compress_basis autoencoder m=4 + sum + apply"}
# Options a row's `tvrecipe run` adds (the recipe is the row's name without the suffix).
FLAGS = {"cluster_basis_reuse": ["--reuse-memory", "16GB"]}
# The spectral and basis rows (issue #16: each ≤ 4× sum's time, ≤ 2× its peak RSS).
SPECTRAL = ["decompose", "decompose_mix", "tsv_merge", "iso_c", "iso_cts", "compress_pca", "compress_ae"]
APPLY_SCALE = 0.3  # the first three rows; the mergekit-equivalent rows below apply with scale 1
# The rows compared with mergekit: op -> the mergekit method it is compared with.
MERGEKIT = {"sum": "task_arithmetic", "ties": "ties", "dare": "dare_linear", "linear": "linear",
            "slerp": "slerp", "breadcrumbs": "breadcrumbs", "della": "della",
            "model_stock": "model_stock"}
NEW_OPS = ["linear", "slerp", "breadcrumbs", "della", "model_stock"]


def linear_weights(n: int) -> list[float]:
    """The `linear` row's weights, one per fine-tune (1, 2, ..., n; normalized by both tools)."""
    return [float(i + 1) for i in range(n)]


# ---- checkpoints -----------------------------------------------------------------------------
def synth_config(size: str, n: int) -> synth.SynthConfig:
    """The synthetic set used for ``size`` with ``n`` fine-tunes."""
    return synth.SynthConfig(**SIZES[size], n=n, shard_size=synth.parse_size(SHARD))


def ensure_checkpoints(size: str, n: int) -> tuple[synth.SynthConfig, Path]:
    """Generate the set if it is missing or was made with other parameters; returns its folder."""
    cfg = synth_config(size, n)
    out = BENCH / "ckpt" / f"{size}-n{n}"
    if not synth.is_complete(out, cfg):
        need = cfg.params() * 2 * (n + 1)
        free = shutil.disk_usage(BENCH.parent).free
        if free < 2 * need:
            sys.exit(f"not enough disk for {size}: need ~{need / 1e9:.1f} GB, {free / 1e9:.1f} free")
        print(f"generating {size} checkpoints ({cfg.params() / 1e6:.1f}M params × {n + 1}) "
              f"in {out} ...", flush=True)
        t0 = time.perf_counter()
        synth.generate(cfg, out)
        print(f"  generated in {time.perf_counter() - t0:.1f} s", flush=True)
    return cfg, out


def weight_files(model: Path) -> list[Path]:
    """The .safetensors files of one model folder, in order."""
    return sorted(model.glob("*.safetensors"))


def folder_mb(model: Path) -> float:
    return sum(f.stat().st_size for f in weight_files(model)) / 1e6


# ---- recipes ---------------------------------------------------------------------------------
def add_row_args(p: argparse.ArgumentParser) -> None:
    """The options of a script that runs some of these recipes over the synthetic set:
    ``--size``, ``--n`` and ``--only`` (default: sum, ties, dare, cluster_basis)."""
    p.add_argument("--size", default="large")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--only", nargs="*", choices=OPS,
                   default=["sum", "ties", "dare", "cluster_basis"])


def write_recipe(folder: Path, op: str, ckpt: Path, n: int) -> Path:
    """The recipe for ``op`` written to ``folder/OP.yaml``, its output going to
    ``folder/out-OP``."""
    recipe = folder / f"{op}.yaml"
    recipe.write_text(recipe_text(op, ckpt, n, folder / f"out-{op}"))
    return recipe


def recipe_text(op: str, ckpt: Path, n: int, out: Path) -> str:
    """The recipe for one benchmarked merge (absolute paths); a row that differs only by
    its run's options (``FLAGS``) has the recipe of the row it is named after."""
    op = op.removesuffix("_reuse")
    fts = [f"ft{i}" for i in range(n)]
    if op == "slerp":
        fts = fts[:1]  # base and ft0 only
    lines = ["tvrecipe: 1", f"name: bench-{op}", "settings: {device: cpu}", "models:"]
    if op != "linear":  # linear averages the fine-tunes alone
        lines.append(f"  base: {ckpt / 'base'}")
    lines += [f"  {m}: {ckpt / m}" for m in fts]
    lines.append("steps:")
    if op not in ("linear", "slerp"):
        lines.append(f"  tv: {{op: extract, base: base, finetuned: [{', '.join(fts)}]}}")
    model_out = f"  model: {{from: model, path: {out}, dtype: bfloat16, shard_size: 2GB}}"
    apply = f"  model: {{op: apply, base: base, delta: merged, scale: {APPLY_SCALE}}}"
    apply1 = "  model: {op: apply, base: base, delta: merged, scale: 1.0}"
    if op == "sum":
        lines += ["  merged: {op: sum, inputs: tv}", apply, "outputs:", model_out]
    elif op == "ties":
        lines += ["  merged: {op: ties, inputs: tv, density: 0.2}", apply, "outputs:", model_out]
    elif op == "dare":
        lines += ["  dropped: {op: dare, input: tv, density: 0.3}",
                  "  merged: {op: sum, inputs: dropped}", apply, "outputs:", model_out]
    elif op == "cluster_basis":
        lines += ["  basis: {op: cluster_basis, inputs: tv, k: auto}", "outputs:",
                  f"  basis: {{from: basis, path: {out}, dtype: bfloat16}}"]
    elif op == "decompose_mix":  # the unique-mix recipe: one model out, as sum writes
        lines += ["  parts: {op: decompose, inputs: tv, rank: 16}",
                  "  merged: {op: sum, inputs: parts.unique}", apply, "outputs:", model_out]
    elif op == "decompose":
        lines += ["  parts: {op: decompose, inputs: tv, rank: 16}", "outputs:",
                  f"  unique: {{from: parts.unique, path: {out}, dtype: bfloat16}}"]
    elif op in ("tsv_merge", "iso_c", "iso_cts"):
        step = {"tsv_merge": "{op: tsv_merge, inputs: tv}", "iso_c": "{op: iso, inputs: tv}",
                "iso_cts": "{op: iso, inputs: tv, variant: cts}"}[op]
        lines += [f"  merged: {step}", apply1, "outputs:", model_out]
    elif op in ("compress_pca", "compress_ae"):
        method = "pca" if op == "compress_pca" else "autoencoder"
        atoms = ", ".join(f"basis.atom{i}" for i in range(4))
        lines += [f"  basis: {{op: compress_basis, inputs: tv, method: {method}, m: 4}}",
                  f"  merged: {{op: sum, inputs: [{atoms}]}}", apply, "outputs:", model_out]
    elif op == "linear":
        w = ", ".join(f"{x:g}" for x in linear_weights(n))
        lines += [f"  model: {{op: linear, inputs: [{', '.join(fts)}], weights: [{w}]}}",
                  "outputs:", model_out]
    elif op == "slerp":
        lines += ["  model: {op: slerp, a: base, b: ft0, t: [0, 0.5, 1]}", "outputs:", model_out]
    elif op == "breadcrumbs":
        lines += ["  crumbs: {op: breadcrumbs, input: tv, density: 0.9, gamma: 0.01}",
                  ("  merged: {op: consensus, inputs: crumbs, weights: 1.0, majority: none, "
                   "normalize: false}"), apply1, "outputs:", model_out]
    elif op == "della":
        lines += ["  pruned: {op: della, input: tv, density: 0.4, epsilon: 0.1}",
                  ("  merged: {op: consensus, inputs: pruned, weights: 1.0, majority: total, "
                   "normalize: true}"), apply1, "outputs:", model_out]
    elif op == "model_stock":
        lines += ["  merged: {op: model_stock, inputs: tv}", apply1, "outputs:", model_out]
    else:
        raise ValueError(op)
    return "\n".join(lines) + "\n"


# ---- measuring a child process ---------------------------------------------------------------
@dataclass
class Measured:
    """One child process: wall clock, peak memory, output."""

    cmd: list[str]
    rc: int = 0
    wall: float = 0.0
    peak_rss_mb: float = 0.0  # ru_maxrss of the child (anonymous + file-backed pages)
    peak_anon_mb: float = 0.0  # max RssAnon seen by polling /proc (heap, tensors)
    peak_file_mb: float = 0.0  # max RssFile seen by polling (mmapped files, libraries)
    stdout: str = ""
    stderr: str = ""
    extra: dict = field(default_factory=dict)


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[k] = int(v.split()[0])  # kB
    except (OSError, ValueError):
        pass
    return out


# A tiny launcher between this (large) process and the measured one: Linux carries the peak RSS
# of the memory image a process had before exec() into its ru_maxrss, and subprocess spawns
# with vfork from this process, so measuring directly would report at least this process's own
# peak. The launcher is a bare interpreter (~10 MB); it reports the child's pid, then its rusage.
LAUNCHER = """
import os, sys
out = sys.argv[1]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
with open(out, "w") as f:
    f.write(f"{pid}\\n")
_, status, ru = os.wait4(pid, 0)
with open(out, "a") as f:
    f.write(f"{ru.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure(cmd: list[str], cwd: Path | None = None, poll: float = 0.05,
            env: dict[str, str] | None = None) -> Measured:
    """Run ``cmd`` (in ``env``, else this process's environment); wall time, its own
    ``ru_maxrss`` and anon/file RSS by polling /proc."""
    m = Measured(cmd)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r", suffix=".ru") as ru_file:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, ru_file.name, *cmd],
                             cwd=cwd, stdout=out, stderr=err, env=env)
        peaks = {"RssAnon": 0, "RssFile": 0}
        stop = threading.Event()

        def watch() -> None:
            pid = None
            while not stop.is_set():
                if pid is None:
                    try:
                        pid = int(Path(ru_file.name).read_text().split()[0])
                    except (OSError, ValueError, IndexError):
                        pass
                if pid is not None:
                    st = _proc_status(pid)
                    for k, v in peaks.items():
                        peaks[k] = max(v, st.get(k, 0))
                stop.wait(poll)

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        m.rc = p.wait()
        m.wall = time.perf_counter() - t0
        stop.set()
        th.join()
        lines = Path(ru_file.name).read_text().split()
        m.peak_rss_mb = int(lines[1]) / 1024 if len(lines) > 1 else float("nan")  # Linux: kB
        m.peak_anon_mb = peaks["RssAnon"] / 1024
        m.peak_file_mb = peaks["RssFile"] / 1024
        out.seek(0)
        err.seek(0)
        m.stdout, m.stderr = out.read(), err.read()
    return m


DONE_RE = re.compile(r"done in ([\d.]+) s on (\S+): read ([\d.]+) MB, wrote ([\d.]+) MB")


def dir_mb(path: Path) -> float:
    """Bytes under ``path`` (0 when missing), in MB."""
    if not path.exists():
        return 0.0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def env_with_package(tree: Path) -> dict[str, str]:
    """This process's environment with ``tree`` (a folder holding another commit's
    ``tvrecipe`` package) first on ``PYTHONPATH``, ahead of what is there already (the
    device machine's wheels, a stub hiding mergekit)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tree.resolve()), *filter(None, [os.environ.get("PYTHONPATH")])])}


def run_tvrecipe(recipe: Path, report: Path | None = None, cache: str = "off",
                 device: str | None = None, env: dict[str, str] | None = None) -> Measured:
    """Time one `tvrecipe run RECIPE --force` (not -q: its last line carries the byte counts).

    ``cache``: ``off`` passes ``--no-cache`` (the merge alone); ``cold`` gives the run a fresh,
    empty ``--cache-dir`` (a first run with the default cache on), measured then deleted.
    The input-hash memo beside the recipe is left alone, so inputs are hashed once per set.
    ``device`` is passed as ``--device`` (the recipes say ``cpu``); ``env``: the child's
    environment (another tvrecipe on its ``PYTHONPATH``, say).
    """
    exe = shutil.which("tvrecipe") or "tvrecipe"
    cmd = [exe, "run", str(recipe), "--force", *FLAGS.get(recipe.stem, [])]
    if device is not None:
        cmd += ["--device", device]
    cache_dir = recipe.with_name(f"cache-{recipe.stem}")
    if cache == "off":
        cmd.append("--no-cache")
    else:
        shutil.rmtree(cache_dir, ignore_errors=True)
        cmd += ["--cache-dir", str(cache_dir)]
    if report is not None:
        cmd += ["--report", str(report)]
    m = measure(cmd, env=env)
    hit = DONE_RE.search(m.stdout)
    if hit:
        m.extra.update(engine_s=float(hit.group(1)), read_mb=float(hit.group(3)),
                       written_mb=float(hit.group(4)))
    if cache != "off":
        m.extra["cache_mb"] = dir_mb(cache_dir)
        shutil.rmtree(cache_dir, ignore_errors=True)
    return m


# ---- the floor ---------------------------------------------------------------------------------
def floor_worker(mode: str, models: list[Path], out: Path | None) -> None:
    """In a child: ``read`` every input file, or the bare ``torch`` pass (``+write``)."""
    t0 = time.perf_counter()
    files = [f for d in models for f in weight_files(d)]
    nbytes = 0
    if mode == "read":
        buf = bytearray(16 << 20)
        view = memoryview(buf)
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while True:
                    k = fh.readinto(view)
                    if not k:
                        break
                    nbytes += k
        print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": nbytes}))
        return
    import torch
    handles = tensor_handles(models)
    sink = open(out, "wb") if out is not None else None  # noqa: SIM115 (closed below)
    t_write = 0.0
    try:
        for name in handles[0]:
            acc = None
            for names in handles:
                t = names[name].get_tensor(name)
                nbytes += t.numel() * t.element_size()
                if acc is None:
                    acc = t.to(torch.float32, copy=True)
                else:
                    acc.add_(t.float())
            if sink is not None:
                tw = time.perf_counter()
                r = acc.to(torch.bfloat16)
                sink.write(r.view(torch.int16).numpy().data)
                t_write += time.perf_counter() - tw
    finally:
        if sink is not None:
            sink.close()
            out.unlink()
    print(json.dumps({"seconds": time.perf_counter() - t0, "write_s": t_write, "bytes": nbytes}))


def tensor_handles(models: list[Path]) -> list[dict[str, object]]:
    """Per model: tensor name -> the open safe_open handle of the file that holds it."""
    from safetensors import safe_open
    handles = []
    for d in models:
        names: dict[str, object] = {}
        for f in weight_files(d):
            h = safe_open(str(f), framework="pt", device="cpu")
            names.update(dict.fromkeys(h.keys(), h))
        handles.append(names)
    return handles


def measure_floor(mode: str, models: list[Path], tmp: Path) -> Measured:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--floor-worker", mode]
    if mode == "torch+write":
        cmd += ["--floor-out", str(tmp / "floor.bin")]
    m = measure(cmd + [str(d) for d in models])
    if m.rc == 0:
        m.extra.update(json.loads(m.stdout.strip().splitlines()[-1]))
    return m


def spectral_floor(models: list[Path], n_tasks: int) -> dict[str, float]:
    """The dense linear algebra an exact spectral merge cannot skip, timed on this CPU.

    An exact SVD of a 2-D delta (r = its smaller side) costs at least its float64 Gram
    matrix (r × r) and that matrix's eigenvalues (the Householder tridiagonalisation, about
    4/3·r³ flops): tvrecipe's ``tsv_merge`` and ``iso`` form exactly these, then also the
    eigenvectors and products. One Gram + ``eigvalsh`` of random data is timed per distinct
    shape of the model's 2-D tensors, with every core busy (one task per thread, one math
    thread each, as tvrecipe runs tasks on its math threads), and scaled by how many tensors
    have that shape. Returns seconds for T tasks per tensor (TSV-M, Iso-CTS's per-task
    spectra) and for one per tensor (Iso-C: the spectrum of Σ_t Δ_t); reading not included.
    ``one_core``: the per-tensor floor with every spectrum on one core, one after another, as
    Iso-C takes them (each eigendecomposition on one thread, so that its bytes do not depend
    on the core count, and one tensor at a time).
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from safetensors import safe_open

    def one(a):
        g = a.mT @ a if a.shape[0] >= a.shape[1] else a @ a.mT
        torch.linalg.eigvalsh(g)

    shapes: dict[tuple[int, int], int] = {}
    for f in weight_files(models[0]):
        with safe_open(str(f), framework="pt", device="cpu") as h:
            for name in h.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                shape = tuple(h.get_slice(name).get_shape())
                if len(shape) == 2:
                    shapes[shape] = shapes.get(shape, 0) + 1
    cores = os.cpu_count() or 1
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    per_tensor = 0.0
    try:
        for (rows, cols), count in shapes.items():
            gen = torch.Generator().manual_seed(0)
            mats = [torch.randn(rows, cols, generator=gen, dtype=torch.float64)
                    for _ in range(cores)]
            with ThreadPoolExecutor(cores) as pool:
                list(pool.map(one, mats))  # warm-up
                t0 = time.perf_counter()
                list(pool.map(one, mats))
                per_tensor += (time.perf_counter() - t0) / cores * count
    finally:
        torch.set_num_threads(previous)
    return {"per_task": per_tensor * n_tasks, "per_tensor": per_tensor,
            "one_core": per_tensor * cores}


def best_of(k: int, fn) -> Measured:
    """The fastest of ``k`` measurements (the floor is cheap: repeat it against noise)."""
    runs = [fn() for _ in range(k)]
    ok = [m for m in runs if m.rc == 0]
    return min(ok, key=lambda m: m.wall) if ok else runs[0]


def import_baseline() -> Measured:
    """RSS and wall of the interpreter with tvrecipe's CLI and torch imported, doing nothing."""
    return measure([sys.executable, "-c", "import os, tvrecipe.cli, torch; os._exit(0)"])


# ---- mergekit (optional) ---------------------------------------------------------------------
def mergekit_available() -> bool:
    try:
        import mergekit  # noqa: F401
    except ImportError:
        return False
    return shutil.which("mergekit-yaml") is not None


def mergekit_config(op: str, ckpt: Path, n: int) -> str:
    """The mergekit-yaml config matching ``op``'s recipe (see ``MERGEKIT``)."""
    method = MERGEKIT[op]
    base = f"base_model: {ckpt / 'base'}"
    if op == "linear":
        lines = [f"merge_method: {method}", "dtype: bfloat16", "parameters: {normalize: true}",
                 "models:"]
        lines += [f"  - model: {ckpt / f'ft{i}'}\n    parameters: {{weight: {w:g}}}"
                  for i, w in enumerate(linear_weights(n))]
        return "\n".join(lines) + "\n"
    if op == "slerp":
        lines = [f"merge_method: {method}", base, "dtype: bfloat16",
                 "parameters: {t: [0, 0.5, 1]}", "models:",
                 f"  - model: {ckpt / 'base'}", f"  - model: {ckpt / 'ft0'}"]
        return "\n".join(lines) + "\n"
    if op == "model_stock":
        lines = [f"merge_method: {method}", base, "dtype: bfloat16", "models:"]
        lines += [f"  - model: {ckpt / f'ft{i}'}" for i in range(n)]
        return "\n".join(lines) + "\n"
    params = {"sum": "weight: 1.0", "ties": "weight: 1.0, density: 0.2",
              "dare": "weight: 1.0, density: 0.3",
              "breadcrumbs": "weight: 1.0, density: 0.9, gamma: 0.01",
              "della": "weight: 1.0, density: 0.4, epsilon: 0.1"}[op]
    normalize = "true" if op in ("ties", "della") else "false"
    lines = [f"merge_method: {method}", base, "dtype: bfloat16",
             f"parameters: {{normalize: {normalize}}}", "models:"]
    lines += [f"  - model: {ckpt / f'ft{i}'}\n    parameters: {{{params}}}" for i in range(n)]
    return "\n".join(lines) + "\n"


# ---- report ----------------------------------------------------------------------------------
def fmt(x: float | None, nd: int = 1) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("--n", type=int, default=8, help="number of fine-tunes")
    p.add_argument("--only", nargs="+", choices=OPS, help="run only these merges")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of every merge (interleaved); the fastest of each is kept")
    p.add_argument("--keep", action="store_true", help="keep the merge outputs")
    p.add_argument("--cache", choices=["off", "cold", "both"], default="both",
                   help="off: --no-cache; cold: a fresh empty cache per run; both (default)")
    p.add_argument("--floor-worker", choices=["read", "torch", "torch+write"], help=argparse.SUPPRESS)
    p.add_argument("--floor-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("models", nargs="*", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.floor_worker:
        floor_worker(a.floor_worker, a.models, a.floor_out)
        # Like the tvrecipe console script: no interpreter teardown (~0.5 s once torch is
        # imported), so both walls count the same work.
        sys.stdout.flush()
        os._exit(0)

    import torch  # only for the header line
    cfg, ckpt = ensure_checkpoints(a.size, a.n)
    models = [ckpt / m for m in synth.model_names(a.n)]
    model_mb = folder_mb(models[0])
    work = BENCH / "runs" / f"{a.size}-n{a.n}"
    work.mkdir(parents=True, exist_ok=True)
    print(f"\n## tvrecipe benchmark: {a.size} ({cfg.params() / 1e6:.1f}M params, "
          f"{cfg.hidden}×{cfg.layers} layers, vocab {cfg.vocab}), base + {a.n} fine-tunes")
    print(f"cpu: {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), cuda: {torch.cuda.is_available()}; "
          f"one checkpoint {model_mb:.0f} MB ({cfg.dtype}), inputs "
          f"{model_mb * len(models):.0f} MB\n", flush=True)

    # Warm the page cache, then the floor (every figure below is measured with a warm cache).
    measure_floor("read", models, work)
    floor_read, floor, floor_w = (best_of(3, lambda k=k: measure_floor(k, models, work))
                                  for k in ("read", "torch", "torch+write"))
    base_imp = import_baseline()
    for m in (floor_read, floor, floor_w):
        if m.rc:
            sys.exit(f"floor pass failed:\n{m.stderr}")
    print(f"floor: read inputs {floor_read.extra['seconds']:.2f} s "
          f"({floor_read.extra['bytes'] / 1e6 / floor_read.extra['seconds']:.0f} MB/s); "
          f"torch pass {floor.extra['seconds']:.2f} s in-process, {floor.wall:.2f} s wall; "
          f"with bf16 write {floor_w.extra['seconds']:.2f} s in-process "
          f"(write {floor_w.extra['write_s']:.2f} s), {floor_w.wall:.2f} s wall", flush=True)
    print(f"startup: `python -c 'import tvrecipe.cli, torch'` {base_imp.wall:.2f} s, "
          f"RSS {base_imp.peak_rss_mb:.0f} MB", flush=True)

    # Hash the inputs once (the memo beside the recipes), untimed, so no op pays for it.
    warm = work / "warmup.yaml"
    warm.write_text(recipe_text("sum", ckpt, a.n, BENCH / "out" / f"{a.size}-n{a.n}" / "warmup"))
    w = run_tvrecipe(warm, cache="off")
    shutil.rmtree(BENCH / "out" / f"{a.size}-n{a.n}" / "warmup", ignore_errors=True)
    if w.rc:
        sys.exit(f"warm-up run failed (exit {w.rc}):\n{w.stderr[-2000:]}")

    modes = ["off", "cold"] if a.cache == "both" else [a.cache]
    tables = {}
    reports: dict[str, dict] = {}
    for mode in modes:
        print(f"\n-- cache {mode} --", flush=True)
        results: dict[str, Measured] = {}
        ops = list(a.only or OPS)
        outs = {op: BENCH / "out" / f"{a.size}-n{a.n}" / op for op in ops}
        recipes = {op: work / f"{op}.yaml" for op in ops}
        for op in ops:
            recipes[op].write_text(recipe_text(op, ckpt, a.n, outs[op]))
        # Rounds, each running every op once: this machine's speed drifts over minutes (up
        # to 15% on the 2-core box), so an op's runs are spread over the whole measurement
        # rather than made back to back, and its ratio to sum is also taken within each
        # round (see print_ratios).
        runs: dict[str, list[Measured]] = {op: [] for op in ops}
        for _ in range(a.repeat):
            for op in ops:
                if op in results:  # (failed in an earlier round)
                    continue
                m = run_tvrecipe(recipes[op], work / f"{op}.report.json", cache=mode)
                if m.rc:
                    print(f"{op}: FAILED (exit {m.rc})\n{m.stderr.strip()[-2000:]}", flush=True)
                    results[op] = m
                else:
                    runs[op].append(m)
                if not a.keep and outs[op].exists():
                    shutil.rmtree(outs[op])
        for op in ops:
            if op in results:
                continue
            best = min(runs[op], key=lambda m: m.wall)
            best.peak_rss_mb = max(m.peak_rss_mb for m in runs[op])
            best.extra["walls"] = [m.wall for m in runs[op]]
            best.extra["engines"] = [m.extra.get("engine_s") for m in runs[op]]
            results[op] = best
            try:
                reports[op] = json.loads((work / f"{op}.report.json").read_text())
            except (OSError, ValueError):
                pass
            extra = (f", cache written {best.extra['cache_mb']:.0f} MB"
                     if "cache_mb" in best.extra else "")
            rounds = (f" (fastest of {len(runs[op])}: "
                      + ", ".join(f"{w:.2f}" for w in best.extra["walls"]) + ")"
                      if len(runs[op]) > 1 else "")
            print(f"{op}: {best.wall:.2f} s{rounds}, peak RSS {best.peak_rss_mb:.0f} MB{extra}",
                  flush=True)
        tables[mode] = results

    # The floor again, after the merges: other processes share the machine, so keep the
    # fastest of all floor passes (printed, so a noisy first measurement shows).
    again = best_of(2, lambda: measure_floor("torch", models, work))
    if again.rc == 0:
        print(f"\nfloor torch pass again: {again.wall:.2f} s wall (first: {floor.wall:.2f} s)")
        if again.wall < floor.wall:
            floor = again

    mk: dict[str, Measured] = {}
    if mergekit_available():
        for op in MERGEKIT:
            if a.only and op not in a.only:
                continue
            cfg_path = work / f"mergekit-{op}.yml"
            cfg_path.write_text(mergekit_config(op, ckpt, a.n))
            out = BENCH / "out" / f"{a.size}-n{a.n}" / f"mergekit-{op}"
            # The synthetic checkpoints ship no tokenizer: do not make mergekit look for one.
            m = measure([shutil.which("mergekit-yaml"), str(cfg_path), str(out),
                         "--no-copy-tokenizer"])
            mk[f"mergekit {op}"] = m
            print(f"mergekit {op}: {'FAILED ' + m.stderr[-500:] if m.rc else f'{m.wall:.2f} s'}")
            if not a.keep and out.exists():
                shutil.rmtree(out)
    else:
        print("mergekit: not installed")

    spectral = None
    if any(op in ("tsv_merge", "iso_c", "iso_cts") for op in (a.only or OPS)):
        spectral = spectral_floor(models[1:], a.n)
        print(f"spectral floor (float64 Gram + eigenvalues of every 2-D delta, all cores): "
              f"{spectral['per_task']:.2f} s for {a.n} tasks per tensor, "
              f"{spectral['per_tensor']:.2f} s for one per tensor", flush=True)

    for mode, results in tables.items():
        if mode == modes[0]:
            results.update(mk)
        print_table(mode, results, floor_read, floor, floor_w, base_imp, model_mb)
        print_ratios(mode, results, floor, reports, spectral)
    if len(tables) == 2:
        off, cold = tables["off"], tables["cold"]
        print("\n- cost of the default cache on a first run (cold / --no-cache wall): "
              + ", ".join(f"{op} {cold[op].wall / off[op].wall:.2f}× "
                          f"({cold[op].extra.get('cache_mb', 0):.0f} MB cached)"
                          for op in off if op in cold and not off[op].rc and not cold[op].rc))


def print_table(mode: str, results: dict[str, Measured], floor_read: Measured, floor: Measured,
                floor_w: Measured, base_imp: Measured, model_mb: float) -> None:
    """The markdown table of one cache mode."""
    ref = results.get("sum")
    sum_wall = ref.wall if ref is not None and ref.rc == 0 else None
    cold = mode != "off"
    print(f"\n### cache {mode}" + (" (fresh --cache-dir per run)" if cold else " (--no-cache)"))
    print("\n| op | wall s | engine s | ratio to floor | ratio to sum | peak RSS MB | "
          "peak anon MB | model size MB | read / written MB |" + (" cache MB |" if cold else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if cold else ""))
    tail = " – |" if cold else ""
    print(f"| floor: read input files (warm cache) | {floor_read.wall:.2f} | "
          f"{floor_read.extra['seconds']:.2f} | – | – | {floor_read.peak_rss_mb:.0f} | "
          f"{floor_read.peak_anon_mb:.0f} | {model_mb:.0f} | "
          f"{floor_read.extra['bytes'] / 1e6:.0f} / 0 |{tail}")
    print(f"| floor: torch load→f32→accumulate | {floor.wall:.2f} | "
          f"{floor.extra['seconds']:.2f} | 1.00 | "
          f"{fmt(floor.wall / sum_wall if sum_wall else None, 2)} | "
          f"{floor.peak_rss_mb:.0f} | {floor.peak_anon_mb:.0f} | {model_mb:.0f} | "
          f"{floor.extra['bytes'] / 1e6:.0f} / 0 |{tail}")
    print(f"| floor + write bf16 result | {floor_w.wall:.2f} | {floor_w.extra['seconds']:.2f} | "
          f"{floor_w.wall / floor.wall:.2f} | "
          f"{fmt(floor_w.wall / sum_wall if sum_wall else None, 2)} | "
          f"{floor_w.peak_rss_mb:.0f} | {floor_w.peak_anon_mb:.0f} | {model_mb:.0f} | "
          f"{floor_w.extra['bytes'] / 1e6:.0f} / {model_mb:.0f} |{tail}")
    for op, m in results.items():
        label = LABELS.get(op, op)
        if m.rc:
            print(f"| {label} | FAILED (exit {m.rc}) | | | | | | | |" + (" |" if cold else ""))
            continue
        rw = (f"{m.extra['read_mb']:.0f} / {m.extra['written_mb']:.0f}"
              if "read_mb" in m.extra else "–")
        cache = f" {fmt(m.extra.get('cache_mb'), 0)} |" if cold else ""
        print(f"| {label} | {m.wall:.2f} | {fmt(m.extra.get('engine_s'), 2)} | "
              f"{m.wall / floor.wall:.2f} | {fmt(m.wall / sum_wall if sum_wall else None, 2)} | "
              f"{m.peak_rss_mb:.0f} | {m.peak_anon_mb:.0f} | {model_mb:.0f} | {rw} |{cache}")
    print(f"| (startup: import tvrecipe.cli, torch) | {base_imp.wall:.2f} | – | – | – | "
          f"{base_imp.peak_rss_mb:.0f} | {base_imp.peak_anon_mb:.0f} | – | – |{tail}")


def print_ratios(mode: str, results: dict[str, Measured], floor: Measured,
                 reports: dict[str, dict], spectral: dict[str, float] | None = None) -> None:
    """The ratios the issues ask for, from one cache mode's results."""
    ref = results.get("sum")
    sum_wall = ref.wall if ref is not None and ref.rc == 0 else None

    def ratio(op: str) -> str:
        m = results.get(op)
        if m is None or m.rc or not sum_wall:
            return "n/a"
        def by_round(mine: list[float], sums: list[float]) -> str:
            ratios = [x / s for x, s in zip(mine, sums)]
            return ("by round " + ", ".join(f"{r:.2f}" for r in ratios)
                    + f", median {statistics.median(ratios):.2f}×")

        text = f"{m.wall / sum_wall:.2f}×"
        mine, sums = m.extra.get("walls", []), ref.extra.get("walls", [])
        if op != "sum" and min(len(mine), len(sums)) >= 2:
            # The same round's sum ran next to it: the ratios a drifting machine moves least.
            text += f" (fastest against fastest; {by_round(mine, sums)})"
        # Without the fixed cost (interpreter, imports, recipe and lock: about the same in
        # every row), which a wall ratio shares between both sides.
        mine, sums = m.extra.get("engines", []), ref.extra.get("engines", [])
        if mine and sums and None not in mine + sums:
            text += f"; engine s {min(mine) / min(sums):.2f}× ({by_round(mine, sums)})"
        return text

    print(f"\nratios (cache {mode}):")
    print("- task arithmetic / floor: "
          + (f"{sum_wall / floor.wall:.2f}×" if sum_wall else "n/a (run without sum)"))
    print(f"- TIES / sum: {ratio('ties')}")
    print(f"- DARE / sum: {ratio('dare')}")
    print(f"- similarity pass (cluster_basis) / sum: {ratio('cluster_basis')}")
    if "cluster_basis_reuse" in results:
        print(f"- cluster_basis, run --reuse-memory 16GB / sum: {ratio('cluster_basis_reuse')}")
    cb = reports.get("cluster_basis", {}).get("basis")
    if isinstance(cb, dict) and isinstance(cb.get("basis"), dict):
        print(f"  (cluster_basis chose k={len(cb['basis'])}: {json.dumps(cb['basis'])})")
    sum_m = results.get("sum")
    for op in SPECTRAL:
        m = results.get(op)
        if m is None or m.rc:
            continue
        rss = (f", peak RSS {m.peak_rss_mb / sum_m.peak_rss_mb:.2f}× sum's"
               if sum_m is not None and not sum_m.rc else "")
        print(f"- {LABELS[op]}: {m.wall:.2f} s wall ({ratio(op)} sum{rss})")
        if spectral is not None and op in ("tsv_merge", "iso_c", "iso_cts") and sum_wall:
            need = spectral["per_tensor" if op == "iso_c" else "per_task"]
            print(f"  its spectral floor: {need:.2f} s ({need / sum_wall:.2f}× sum, before "
                  f"reading anything); the run is {m.wall / need:.2f}× that floor")
            if op == "iso_c":
                one = spectral["one_core"]
                print(f"  on one core, as its spectra are taken: {one:.2f} s ({one / sum_wall:.2f}×"
                      f" sum); the run is {m.wall / one:.2f}× that")
    for op, peer in (("sum", "mergekit sum"), ("ties", "mergekit ties"), ("dare", "mergekit dare")):
        mine, theirs = results.get(op), results.get(peer)
        if mine is None or theirs is None or mine.rc or theirs.rc:
            continue
        print(f"- {op} / {peer}: wall {mine.wall / theirs.wall:.3f}×, peak RSS "
              f"{mine.peak_rss_mb / theirs.peak_rss_mb:.2f}×, peak anon "
              f"{mine.peak_anon_mb / theirs.peak_anon_mb:.2f}×")
    # The new ops against mergekit's method of the same name (target: each ≤ 0.5×).
    for op in NEW_OPS:
        mine, theirs = results.get(op), results.get(f"mergekit {op}")
        if mine is None or theirs is None:
            continue
        if mine.rc or theirs.rc:
            print(f"- {op} / mergekit {MERGEKIT[op]}: n/a ("
                  f"{'tvrecipe' if mine.rc else 'mergekit'} failed)")
            continue
        print(f"- {op} / mergekit {MERGEKIT[op]}: wall {mine.wall / theirs.wall:.3f}×, peak RSS "
              f"{mine.peak_rss_mb / theirs.peak_rss_mb:.2f}×, peak anon "
              f"{mine.peak_anon_mb / theirs.peak_anon_mb:.2f}× (target ≤ 0.5×)")


if __name__ == "__main__":
    main()
