"""A run's bytes do not depend on how many cores the machine has.

MKL's products (for thin or small operands), LAPACK's factorisations and torch's sums of a
whole tensor add their threads' partial results in an order set by the thread count, so
the same recipe gave other bytes on a 16-core machine than on a 2-core one (TSV-M, Iso,
decompose, DELLA's L1 rescale: a lock written on one did not verify on the other). These
kernels now run on one thread (``ops.parallel.serial``), over pieces fixed by the shapes.
The tests emulate machines of 1 to 16 cores on this one: the runner's torch threads and
every ``cores()`` follow the emulated count.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import save_model
from tvrecipe.exec import runner as runner_mod
from tvrecipe.ops import lowrank, merges, parallel, spectral
from tvrecipe.ops.decompose import decompose

CORES = (1, 3, 16)


def emulate(monkeypatch, n: int) -> None:
    """Make this process look like an ``n``-core machine to tvrecipe."""
    monkeypatch.setattr(parallel, "cores", lambda: n)
    monkeypatch.setattr(runner_mod, "cores", lambda: n)
    monkeypatch.setattr(spectral, "cores", lambda: n)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def digest(t) -> str:
    if isinstance(t, (tuple, list)):
        return "/".join(digest(x) for x in t)
    if isinstance(t, dict):
        return "/".join(f"{k}={digest(v)}" for k, v in sorted(t.items()))
    if not isinstance(t, torch.Tensor):
        return repr(t)
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def test_serial_runs_torch_on_one_thread_and_restores_the_count():
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with parallel.serial():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(previous)


def _tasks(shape, n=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * scale for _ in range(n)]


KERNELS = {
    "tsv_merge": lambda xs: spectral.tsv_merge(xs),
    "iso c": lambda xs: spectral.iso(xs, variant="c"),
    "iso cts": lambda xs: spectral.iso(xs, variant="cts"),
    "decompose": lambda xs: decompose(xs, rank=16).unique,
    "della l1": lambda xs: merges.della(xs[0], density=0.5, seed=1),
    "slerp": lambda xs: merges.slerp(xs[0], xs[1], t=0.3),
    "model_stock": lambda xs: merges.model_stock(xs),
    "lora factors": lambda xs: lowrank.lora_factors(xs[0], rank=8),
}


@pytest.mark.parametrize("alone", [False, True])
@pytest.mark.parametrize("shape", [(704, 256), (256, 704)])
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernels_give_the_same_bytes_on_any_number_of_cores(monkeypatch, name, shape, alone):
    if alone:  # the path of an embedding-sized tensor: its tasks one at a time, its
        # products in pieces of 16 rows or columns, several at once on the math threads
        monkeypatch.setattr(spectral, "ALONE_BYTES", 1)
        monkeypatch.setattr(spectral, "SPECTRUM_BLOCK", 4096)
        monkeypatch.setattr(parallel, "PARALLEL_MIN", 1)
    xs = _tasks(shape)
    previous = torch.get_num_threads()
    seen = {}
    try:
        for n in CORES:
            emulate(monkeypatch, n)
            torch.set_num_threads(max(1, n - 1))  # what the runner gives its math thread
            seen[n] = digest(KERNELS[name](xs))
    finally:
        torch.set_num_threads(previous)
    assert len(set(seen.values())) == 1, seen


RECIPE = """\
tvrecipe: 1
models:
  base: ./ckpt/base
  a: ./ckpt/a
  b: ./ckpt/b
  c: ./ckpt/c
  d: ./ckpt/d
  la: {path: ./ckpt/la, kind: lora}
  lb: {path: ./ckpt/lb, kind: lora}
steps:
  tv: {op: extract, base: base, finetuned: [a, b, c, d]}
  tsv: {op: tsv_merge, inputs: tv}
  isoc: {op: iso, inputs: tv, variant: c}
  isocts: {op: iso, inputs: tv, variant: cts}
  parts: {op: decompose, inputs: tv, rank: 8}
  unique: {op: sum, inputs: parts.unique}
  pruned: {op: della, input: tv.a, density: 0.5, epsilon: 0.2}
  stock: {op: model_stock, inputs: tv}
  arc: {op: slerp, a: a, b: b, t: 0.3}
  adapters: {op: sum, inputs: [la, lb]}
  lora_tsv: {op: tsv_merge, inputs: [la, lb]}
outputs:
  tsv: {from: tsv, path: ./out/tsv, dtype: float32}
  isoc: {from: isoc, path: ./out/isoc, dtype: float32}
  isocts: {from: isocts, path: ./out/isocts, dtype: float32}
  unique: {from: unique, path: ./out/unique, dtype: float32}
  pruned: {from: pruned, path: ./out/pruned, dtype: float32}
  stock: {from: stock, path: ./out/stock, dtype: float32}
  arc: {from: arc, path: ./out/arc, dtype: float32}
  adapters: {from: adapters, path: ./out/adapters, dtype: float32}
  lora_tsv: {from: lora_tsv, path: ./out/lora_tsv, dtype: float32}
"""

# Shapes whose products MKL splits differently on other thread counts: thin factors
# (704 × 26, a LoRA pair of rank 8) among the usual ones.
SHAPES = {"embed.weight": (8000, 256), "up.weight": (704, 256), "down.weight": (256, 704),
          "odd.weight": (704, 26), "odd2.weight": (26, 704), "small.weight": (100, 768),
          "norm.weight": (256,)}


def _adapter(folder, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in SHAPES.items():
        if len(shape) == 2:
            module = key.removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(
                8, shape[1], generator=g)
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(
                shape[0], 8, generator=g) * 0.01
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
         "target_modules": ["embed", "up", "down", "odd", "odd2", "small"]}))


def test_a_recipe_gives_the_same_bytes_on_any_number_of_cores(cli, tmp_path, monkeypatch):
    """The lock a 16-core machine writes verifies, recomputed, on a 1- or 3-core one."""
    monkeypatch.setattr(spectral, "ALONE_BYTES", 4 << 20)  # the embedding goes alone
    g = torch.Generator().manual_seed(0)
    base = {key: torch.randn(shape, generator=g) for key, shape in SHAPES.items()}
    save_model(tmp_path / "ckpt" / "base", base)
    for i, name in enumerate("abcd"):
        gi = torch.Generator().manual_seed(i + 1)
        save_model(tmp_path / "ckpt" / name,
                   {k: v + 0.01 * torch.randn(v.shape, generator=gi) for k, v in base.items()})
    _adapter(tmp_path / "ckpt" / "la", 10)
    _adapter(tmp_path / "ckpt" / "lb", 11)
    cli.write("r.yaml", RECIPE)
    emulate(monkeypatch, 16)
    cli.ok("run", "r.yaml", "--no-cache")
    for n in (1, 3):
        emulate(monkeypatch, n)
        res = cli.ok("verify", "--recompute", "r.yaml")
        assert "gave the same bytes" in res.stdout, (n, res.stdout)


@pytest.mark.parametrize("n, groups", [(8, 3), (64, 4), (300, 5)])
def test_clustering_gives_the_same_answer_on_any_number_of_blas_threads(n, groups):
    # cluster_basis' clustering runs in numpy, scipy and scikit-learn, whose BLAS and OpenMP
    # thread pools the core emulation above does not reach: its k and labels (all that a
    # result depends on) must not change with their size either. Weak planted groups, as
    # real task vectors have (cosines about 0.04 inside, 0.013 across, noise 0.01).
    import numpy as np
    from threadpoolctl import threadpool_limits

    from tvrecipe.ops import basis
    rng = np.random.default_rng(n)
    label = np.arange(n) % groups
    s = 0.013 + 0.03 * (label[:, None] == label[None, :]) + 0.01 * rng.standard_normal((n, n))
    s = (s + s.T) / 2
    np.fill_diagonal(s, 1.0)
    answers = set()
    for threads in (1, 2, 3, 8):
        with threadpool_limits(limits=threads):
            c = basis.cluster(s, k="auto", k_max=min(n - 1, 10))
        answers.add((c.k, tuple(c.labels)))
    assert len(answers) == 1
    (k, labels), = answers
    assert k == groups and len(set(zip(labels, label, strict=True))) == groups  # found them


def test_whole_tensor_streams_extract_members_on_the_math_threads(cli, tmp_path, monkeypatch):
    """TIES works on whole tensors: its members' subtractions run on the math threads (one
    each), with the deltas exactly as on one thread; task arithmetic, row by row, keeps them
    on the stream's own thread."""
    import threading

    from tvrecipe import ops
    from tvrecipe.ops import sparsify

    emulate(monkeypatch, 2)
    g = torch.Generator().manual_seed(3)
    shape = (512, parallel.PARALLEL_MIN // 512)  # large enough for the math threads
    base = {"w": torch.randn(shape, generator=g), "n": torch.randn(8, generator=g)}
    save_model(tmp_path / "ckpt" / "base", base)
    fts = {}
    for name in "abc":
        fts[name] = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_model(tmp_path / "ckpt" / name, fts[name])
    models = "models: {base: ckpt/base, a: ckpt/a, b: ckpt/b, c: ckpt/c}\n"
    cli.write("ties.yaml", "tvrecipe: 1\n" + models + (
        "steps:\n  tv: {op: extract, base: base, finetuned: [a, b, c]}\n"
        "  m: {op: ties, inputs: tv, density: 0.3}\n"
        "outputs:\n  m: {from: m, path: out/ties, dtype: float32}\n"))
    cli.write("sum.yaml", "tvrecipe: 1\n" + models + (
        "steps:\n  tv: {op: extract, base: base, finetuned: [a, b, c]}\n"
        "  m: {op: sum, inputs: tv}\n"
        "outputs:\n  m: {from: m, path: out/sum, dtype: float32}\n"))
    seen: list[tuple[str, int]] = []
    real = ops.extract

    def spy(base, finetuned, **kw):
        seen.append((threading.current_thread().name, finetuned.numel()))
        return real(base, finetuned, **kw)

    monkeypatch.setattr(ops, "extract", spy)
    cli.ok("run", "ties.yaml", "--no-cache", "--device", "cpu")  # (CPU threads' work)
    large = [t for t, n in seen if n >= parallel.PARALLEL_MIN]
    assert len(large) == 3 and all(t.startswith("tvrecipe-math") for t in large), seen
    assert all(not t.startswith("tvrecipe-math") for t, n in seen if n < parallel.PARALLEL_MIN)
    from safetensors.torch import load_file

    got = load_file(tmp_path / "out" / "ties" / "model.safetensors")
    for key, b in base.items():
        deltas = [fts[m][key] - b for m in "abc"]
        assert torch.equal(got[key], sparsify.ties(deltas, density=0.3)), key

    seen.clear()
    cli.ok("run", "sum.yaml", "--no-cache", "--device", "cpu")
    assert seen and all(not t.startswith("tvrecipe-math") for t, _n in seen), seen


def test_row_wise_streams_read_on_the_math_threads_on_many_cores(cli, tmp_path, monkeypatch):
    """Task arithmetic goes by row blocks, read on one thread while it computes; from
    PARALLEL_READS_CORES cores on, each block's inputs are read on the math threads (one input
    each), with the same bytes."""
    import threading

    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(4)
    shape = (1024, 2048)  # two row blocks of CHUNK_ELEMENTS, each worth the math threads
    base = {"w": torch.randn(shape, generator=g).bfloat16()}
    save_model(tmp_path / "ckpt" / "base", base)
    for name in "abc":
        save_model(tmp_path / "ckpt" / name,
                   {"w": (base["w"].float() + torch.randn(shape, generator=g)).bfloat16()})
    cli.write("sum.yaml", "tvrecipe: 1\nmodels: {base: ckpt/base, a: ckpt/a, b: ckpt/b, "
              "c: ckpt/c}\nsteps:\n  tv: {op: extract, base: base, finetuned: [a, b, c]}\n"
              "  m: {op: sum, inputs: tv}\n"
              "outputs:\n  m: {from: m, path: out/sum, dtype: float32}\n")
    seen: list[str] = []
    real = runner_mod.Runner._read_node

    def spy(self, name, tensor, span, *a, **kw):
        seen.append(threading.current_thread().name)
        return real(self, name, tensor, span, *a, **kw)

    monkeypatch.setattr(runner_mod.Runner, "_read_node", spy)
    got = {}
    for n in (2, runner_mod.PARALLEL_READS_CORES - 1, runner_mod.PARALLEL_READS_CORES, 16):
        emulate(monkeypatch, n)
        seen.clear()
        cli.ok("run", "sum.yaml", "--no-cache", "--device", "cpu", "--force")
        assert len(seen) == 2 * 4, seen  # (2 blocks of 4 models)
        wide = n >= runner_mod.PARALLEL_READS_CORES
        assert all(t.startswith("tvrecipe-math" if wide else "tvrecipe-read") for t in seen), (
            n, seen)
        got[n] = load_file(tmp_path / "out" / "sum" / "model.safetensors")["w"]
    want = sum(load_file(tmp_path / "ckpt" / m / "model.safetensors")["w"].float()
               - base["w"].float() for m in "abc")
    assert all(torch.equal(t, want) for t in got.values())


def test_entrywise_work_is_cut_in_ranges_of_at_least_parallel_min(monkeypatch):
    """A TIES merge cuts a tensor in one range per core, but none shorter than PARALLEL_MIN
    entries (each range's calls hold the GIL: 16 short ranges queued for it), and gives the
    same bytes however it is cut."""
    from tvrecipe.ops import sparsify

    cpu = torch.device("cpu")
    m = parallel.PARALLEL_MIN
    emulate(monkeypatch, 16)
    assert [parallel.splits(n, cpu) for n in (m - 1, m, 4 * m, 4 * m + m - 1, 16 * m, 64 * m)
            ] == [1, 1, 4, 4, 16, 16]
    emulate(monkeypatch, 2)
    assert [parallel.splits(n, cpu) for n in (m - 1, m, 2 * m, 64 * m)] == [1, 1, 2, 2]
    assert parallel.splits(64 * m, torch.device("meta")) == 1  # (CPU work only)

    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(3 * m + 17, generator=g) for _ in range(3)]
    seen = {}
    for n in CORES:
        emulate(monkeypatch, n)
        seen[n] = digest(sparsify.ties(xs, density=0.3, weights=[1.0, -0.5, 2.0]))
    assert len(set(seen.values())) == 1, seen

    # NaNs in bfloat16 (ops.ties called on 16-bit tensors; runs compute in float32 or 64):
    # torch writes a NaN's bits one way in a kernel's vector loop and another in its tail,
    # so the ranges are cut at whole chunks, and every chunk covers the same entries on any
    # number of cores.
    xs = [torch.randn(3 * m + 5, generator=g).bfloat16() for _ in range(5)]
    for x in xs[::2]:
        x[::3] = float("nan")  # (so that some lie in every kernel's tail)
    seen = {}
    for n in (1, 2, 3, 16):
        emulate(monkeypatch, n)
        seen[n] = digest(sparsify.ties(xs, density=0.1, weights=[1, 1, 1, 0.1, 1],
                                       majority="count", normalize=False))
    assert len(set(seen.values())) == 1, seen


@pytest.mark.parametrize(("v2", "v1", "want"), [
    ("200000 100000", None, 2), ("150000 100000", None, 2), ("max 100000", None, None),
    (None, ("-1", "100000"), None), (None, ("50000", "100000"), 1), (None, None, None),
    ("garbage", None, None)])
def test_a_cgroup_cpu_quota_bounds_the_cores(tmp_path, monkeypatch, v2, v1, want):
    # A container limited to QUOTA/PERIOD CPUs (rounded up) gets that many cores, not its
    # host's: v2's cpu.max, else v1's two files; no quota (max, -1) or no file: None.
    from tvrecipe.ops import parallel

    def put(name: str, text: str | None) -> str:
        path = tmp_path / name
        if text is not None:
            path.write_text(text + "\n")
        return str(path)

    monkeypatch.setattr(parallel, "CGROUP_V2", put("cpu.max", v2))
    monkeypatch.setattr(parallel, "CGROUP_V1", (put("quota", v1 and v1[0]),
                                                put("period", v1 and v1[1])))
    assert parallel.cgroup_cores() == want
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda _pid: set(range(64)))
    assert parallel.machine_cores() == (64 if want is None else want)
