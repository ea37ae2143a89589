"""The run's pool of large CPU buffers (tvrecipe/exec/buffers.py)."""

from __future__ import annotations

import gc
import sys
import threading
from pathlib import Path

import pytest
import torch

from tests.conftest import read_tensors
from tvrecipe import ops
from tvrecipe.exec import buffers
from tvrecipe.exec.buffers import BufferPool
from tvrecipe.store.checkpoint import Checkpoint

KIB = 1 << 10


def test_small_requests_are_plain_tensors_and_never_pooled():
    pool = BufferPool(min_bytes=64 * KIB)
    t = pool.empty((10, 10), torch.float32)
    assert t.shape == (10, 10) and t.dtype == torch.float32
    assert pool._held == 0 and pool._maps == []


def test_a_freed_buffer_is_lent_again_and_a_live_one_never():
    pool = BufferPool(min_bytes=KIB)
    a = pool.empty((64, 64), torch.float32)
    a.fill_(3.0)
    where = a.data_ptr()
    del a
    b = pool.empty((64, 64), torch.float32)  # same size: the same memory, as left
    assert b.data_ptr() == where and pool.reused == 1
    assert torch.equal(b, torch.full((64, 64), 3.0))
    c = pool.empty((64, 64), torch.float32)  # b is alive: fresh memory
    assert c.data_ptr() != where and pool.reused == 1
    view = b[10:]  # a view keeps b's memory in use after b is gone
    del b
    d = pool.empty((64, 64), torch.float32)
    assert d.data_ptr() not in (where, c.data_ptr()) and pool.reused == 1
    del view
    e = pool.empty((4096,), torch.float32)  # any shape and dtype of the same byte size
    assert e.data_ptr() == where and pool.reused == 2
    f = pool.empty((8192,), torch.bfloat16)
    assert f.data_ptr() not in (where, c.data_ptr(), d.data_ptr())


def test_a_tracer_or_other_references_to_the_maps_change_nothing():
    # What counts is whether a tensor lent from a map lives, not who else refers to the map:
    # a profiler that reads f_locals while the pool is made, or a frame holding a map, once
    # made a live tensor's memory look free (lent twice) or a free one look used (leaked).
    def profile(frame, event, _arg):
        if event == "call":
            frame.f_locals  # noqa: B018 (what argument-recording profilers do)

    sys.setprofile(profile)
    try:
        pool = BufferPool(min_bytes=KIB)
        a = pool.empty((1024,), torch.float32).fill_(1.0)
    finally:
        sys.setprofile(None)
    b = pool.empty((1024,), torch.float32).fill_(2.0)
    assert a.data_ptr() != b.data_ptr() and float(a[0]) == 1.0
    held = [m.map for m in pool._maps]  # more references to the maps themselves
    where = a.data_ptr()
    del a
    c = pool.empty((1024,), torch.float32)
    assert c.data_ptr() == where and pool.reused == 1 and held


def test_a_tensor_from_the_pool_is_an_ordinary_tensor():
    pool = BufferPool(min_bytes=KIB)
    t = pool.empty((32, 16), torch.bfloat16)
    assert t.is_contiguous() and t.device.type == "cpu" and not t.requires_grad
    values = (torch.arange(512) % 256).float().view(32, 16)  # exact in bfloat16
    t.copy_(values)
    u = pool.empty((32, 16), torch.float32).copy_(t)
    assert torch.equal(u, values)
    u.add_(1.0).mul_(2.0)  # in-place kernels write into the map
    assert float(u[0, 0]) == 2.0


def test_the_pool_never_holds_more_than_its_most_at_once():
    pool = BufferPool(min_bytes=KIB)
    size_a, size_b = 16 * KIB, 24 * KIB
    live = [pool.empty((size_a // 4,), torch.float32) for _ in range(3)]  # 48 KiB at once
    assert pool._held == pool._mark == 3 * size_a
    del live
    # Another size: the free maps go (oldest first) until the new one fits under the mark.
    one = pool.empty((size_b // 4,), torch.float32)
    assert pool._held <= pool._mark == 3 * size_a
    assert pool._held == size_a + size_b
    two = pool.empty((size_b // 4,), torch.float32)  # in use: 48 KiB, the last A map goes
    assert pool._held == pool._mark == 2 * size_b
    del one, two
    gc.collect()
    three = [pool.empty((size_b // 4,), torch.float32) for _ in range(2)]
    assert pool.reused == 2 and pool._held == 2 * size_b
    del three


def test_release_unmaps_the_free_maps_and_keeps_the_lent_ones():
    pool = BufferPool(min_bytes=KIB)
    kept = pool.empty((1024,), torch.float32).fill_(5.0)
    gone = pool.empty((2048,), torch.float32)
    del gone
    pool.release()  # the end of a pass
    assert [m.size for m in pool._maps] == [4 * KIB] and pool._held == pool._mark == 4 * KIB
    assert float(kept[0]) == 5.0
    again = pool.empty((2048,), torch.float32)  # mapped afresh
    assert pool.reused == 0 and pool._held == 12 * KIB and again.numel() == 2048


def test_threads_never_get_the_same_buffer_at_once():
    pool = BufferPool(min_bytes=KIB)
    seen: list[set[int]] = []
    errors = []

    def work(i: int) -> None:
        try:
            mine = set()
            for _ in range(50):
                t = pool.empty((1024,), torch.float32).fill_(float(i))
                mine.add(t.data_ptr())
                assert bool((t == float(i)).all())  # nobody else wrote into it meanwhile
                del t
            seen.append(mine)
        except AssertionError as exc:  # pragma: no cover - the failure this test looks for
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert pool.reused > 0 and pool._held <= pool._mark <= 4 * 4 * KIB


RECIPE = """
tvrecipe: 1
name: pooled
models:
  base: ./ckpt/base
  math: ./ckpt/math
  code: ./ckpt/code
  toxic: ./ckpt/toxic
steps:
  tv: {op: extract, base: base, finetuned: [math, code, toxic]}
  merged: {op: ties, inputs: tv, density: 0.4}
  model: {op: apply, base: base, delta: merged, scale: 0.5}
outputs:
  model: {from: model, path: ./out-OUT, dtype: bfloat16}
"""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_run_through_the_pool_writes_the_bytes_of_a_run_without(
        make_models, cli, monkeypatch, dtype):
    # Every tensor of these models is a few hundred bytes: with a 64-byte threshold each
    # whole-tensor read and conversion comes from the pool (and same-shaped tensors, such as
    # the embedding and lm_head, reuse its maps).
    ms = make_models(dtype=dtype)
    made: list[BufferPool] = []

    class Recording(BufferPool):
        def __init__(self, min_bytes: int | None = None):
            super().__init__(min_bytes)
            made.append(self)

    monkeypatch.setattr("tvrecipe.exec.runner.BufferPool", Recording)
    monkeypatch.setattr(buffers, "MIN_BYTES", 1 << 40)
    cli.write("plain.yaml", RECIPE.replace("OUT", "plain"))
    cli.ok("run", "plain.yaml", "--no-cache", "--device", "cpu")  # (the pool is the CPU's)
    assert made and all(p._maps == [] and p.reused == 0 for p in made)
    monkeypatch.setattr(buffers, "MIN_BYTES", 64)
    cli.write("pooled.yaml", RECIPE.replace("OUT", "pooled"))
    cli.ok("run", "pooled.yaml", "--no-cache", "--device", "cpu")
    pooled = made[-1]
    assert pooled.reused > 0
    plain, reused = read_tensors(cli.root / "out-plain"), read_tensors(cli.root / "out-pooled")
    assert plain.keys() == reused.keys()
    for name in plain:
        assert torch.equal(plain[name].view(torch.uint8), reused[name].view(torch.uint8)), name
    # Both read 16-bit inputs into their float32 buffers and widen them there: the kernels
    # on the stored values, in float32, give the same bytes.
    for name, base in ms.f32("base").items():
        merged = ops.ties([ms.delta(m)[name] for m in ("math", "code", "toxic")], density=0.4)
        want = ops.apply(base, merged, scale=0.5).to(torch.bfloat16)
        assert torch.equal(reused[name].view(torch.uint8), want.view(torch.uint8)), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_gpu_run_reads_into_pinned_memory_and_writes_the_cpu_bytes(
        make_models, cli, monkeypatch, dtype):
    # A GPU run reads every input (and, on the second run, the cached step) straight into
    # page-locked memory: nothing is pinned by a copy. TIES on the GPU gives the CPU's bytes.
    make_models(dtype=dtype)
    cli.write("r.yaml", RECIPE.replace("OUT", "cpu"))
    cli.ok("run", "r.yaml", "--no-cache", "--device", "cpu")
    read_into: list[tuple[str, bool]] = []
    get = Checkpoint.get

    def recording(self, name, *args, **kwargs):
        t = get(self, name, *args, **kwargs)
        if t.is_floating_point():
            read_into.append((str(self.path), t.is_pinned()))
        return t

    def no_copy(self, *args, **kwargs):
        raise AssertionError("a tensor was pinned by a copy")

    monkeypatch.setattr(Checkpoint, "get", recording)
    monkeypatch.setattr(torch.Tensor, "pin_memory", no_copy)
    cli.write("g.yaml", RECIPE.replace("OUT", "gpu"))
    cpu = read_tensors(cli.root / "out-cpu")
    for run in range(2):  # TIES computed and cached, then read from the cache
        read_into.clear()
        res = cli.ok("run", "g.yaml", "--device", "cuda", "--force")
        assert ("from cache: merged" in res.stdout) == (run == 1), res.stdout
        assert read_into and all(pinned for _path, pinned in read_into), read_into
        from_cache = [p for p, _ in read_into if ".tvrecipe" in Path(p).parts]
        assert bool(from_cache) == (run == 1), read_into
        gpu = read_tensors(cli.root / "out-gpu")
        assert cpu.keys() == gpu.keys()
        for name in cpu:
            assert torch.equal(cpu[name].view(torch.uint8), gpu[name].view(torch.uint8)), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 1000, (1 << 20) + 3, 3 << 20])
def test_widening_in_place_gives_the_float32_values(dtype, n, monkeypatch):
    # A 16-bit tensor read into the upper half of its float32 buffer and converted there,
    # front to back: every entry as .float() gives it (entry i's source lies at byte 2n + 2i).
    from tvrecipe.exec import runner

    g = torch.Generator().manual_seed(n)
    values = torch.randn(n, generator=g).to(dtype)
    if n > 5:
        values[::5] = torch.inf
    wide = torch.empty(n, dtype=torch.float32)
    half = wide.view(torch.uint8)[2 * n:].view(dtype)
    half.copy_(values)
    runner._widen_in_place(half, wide)
    assert torch.equal(wide, values.float())
    if n <= 1000:
        monkeypatch.setattr(runner, "_WIDEN_CHUNK", 3)  # many short chunks, the same result
        half.copy_(values)
        runner._widen_in_place(half, wide)
        assert torch.equal(wide, values.float())
