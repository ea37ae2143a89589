"""Running a recipe on a Dask cluster (``tvrecipe run RECIPE --cluster ADDRESS``).

Where a recipe runs is no part of what it computes: a cluster run writes the same bytes, lock
and cache entries as a local one. The client (this process) does what a local run does
around the tensor work (cache lookup, whole-model results, outputs, cache entries, commit);
the tensor work itself goes to the workers:

* The plan's tensors are cut, in plan order, into contiguous groups of bounded input bytes
  (a tensor's row blocks never span two groups). One Dask task runs the local streaming
  machinery (:class:`~tvrecipe.exec.runner.Runner`) on one group: it reads the inputs itself
  (paths every worker sees, or URLs), with the whole-model results, reports and kept states
  the client has so far.
* A whole-model pass (the Gram matrix of ``cluster_basis``, ``compress_basis``, ``assign``;
  the per-tensor Grams of ``model_stock`` and ``slerp``) is a reduction of per-tensor
  partials: each task returns the Gram partial of every tensor (or row block) it streamed,
  and the client adds them in plan order, the same float64 additions a local pass makes.
* The merge pass: each task writes every value the run keeps (each output's tensors, already
  in their stored dtype's bytes; each new cache entry's) into one staging file of the run's
  staging folder (written under a temp name, then renamed: a retried task replaces it
  whole). The client reads the groups back in plan order and writes them with the same
  writers a local run uses, so shards, headers, hashes and the lock are the same, and commits
  exactly as a local run does. Nothing a worker writes is ever an output or a cache entry.

Workers compute on the client's device, each task with its share of its machine's cores
(:func:`_share`; the bytes do not depend on the count). Errors a worker finds (a NaN in an
input, a step's own check) come back to the client as the same error with the same message;
a corrupt cache entry restarts the run without it, as locally. A task whose worker dies is
run again by Dask elsewhere; a run that fails commits nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import copyreg
import dataclasses
import importlib
import logging
import math
import os
import pickle
import shutil
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvrecipe import errors, ops
from tvrecipe.errors import ExecutionError, TvrecipeError
from tvrecipe.exec import lockfile
from tvrecipe.exec.cluster_address import parse_address, require_dask
from tvrecipe.exec.evaluate import select
from tvrecipe.exec.results import (
    RunOptions,
    RunResult,
    check_tensor_range,
    progress_bar,
    written_members,
)
from tvrecipe.exec.runner import PassContext, Runner, describe_device, whole_model_errors
from tvrecipe.exec.slots import to_slots
from tvrecipe.ops import parallel
from tvrecipe.plan.graph import CHECKPOINT, VECTOR, Compiled, CompiledStep
from tvrecipe.plan.tensors import TensorPlan, build_tensor_plan, rows_per_block, rowwise
from tvrecipe.store.cache import CacheCorrupt, TensorCache
from tvrecipe.store.checkpoint import dtype_size, st_dtype, torch_dtype
from tvrecipe.store.writer import _stored_bytes, tensor_digest, tensor_hasher

__all__ = ["GROUP_BYTES", "ClusterRunner", "connect", "parse_address", "require_dask"]

# Input bytes (every input's copy of a tensor, as stored) one task reads at most, unless one
# tensor alone is more. Smaller groups balance better; each task opens the inputs' headers.
GROUP_BYTES = 256 << 20
# Tasks per worker a pass aims at (when the model is small enough for groups to be smaller
# than GROUP_BYTES), so that a slow or lost worker holds up little.
TASKS_PER_WORKER = 4
# Retries of a task that raised (a transient file-system error); a task whose worker died is
# rescheduled by Dask itself (distributed.scheduler.allowed-failures).
RETRIES = 2
CONNECT_TIMEOUT = "20s"
# How long a run waits for a `tcp://` scheduler's first worker, in seconds, unless
# $TVRECIPE_WAIT_WORKERS says (workers of a batch queue may join minutes later).
WAIT_WORKERS = 20.0
# Called on the client with (pass label, group index, result) as each task's result arrives
# (tests use it to kill a worker mid-run).
TASK_DONE_HOOKS: list[Any] = []

_NUMPY_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


# ---- addresses and clients -------------------------------------------------------------------
# Address -> client. A caller may put its own client here (tests do): connect() then uses it,
# and close_clients() leaves it alone.
_CLIENTS: dict[str, Any] = {}
_OWNED: set[str] = set()
_CLIENTS_LOCK = threading.Lock()


def connect(address: str) -> Any:
    """A Dask client for ``address``, made once per process (``local:N`` starts a
    LocalCluster of N single-threaded worker processes, closed when the process exits).

    Raises:
        MissingPackage: Dask distributed is not installed.
        ExecutionError: the scheduler cannot be reached.
    """
    kind, value = parse_address(address)
    distributed = require_dask()
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(address)
        if client is not None and client.status == "running":
            return client
        if kind == "local":
            # (dashboard_address=None still serves the dashboard, on 8787, with a warning
            # whenever that port is taken: any free port instead)
            cluster = distributed.LocalCluster(
                n_workers=value, threads_per_worker=1, processes=True, dashboard_address=":0",
                silence_logs=logging.ERROR)
            client = distributed.Client(cluster)
            # The workers import the executor (torch) now, with the cluster's start, rather
            # than in the run's first tasks.
            # (a worker lost meanwhile is restarted by its nanny and imports it in its first
            # task: nothing to stop the run for)
            with contextlib.suppress(Exception):
                client.run(importlib.import_module, __name__)
        else:
            client = _remote_client(distributed, value)
        _CLIENTS[address] = client
        _OWNED.add(address)
    return client


def _remote_client(distributed: Any, address: str) -> Any:
    """A client of the scheduler at ``address`` (``tcp://host:port``) that has a worker.

    Raises:
        ExecutionError: nothing listens there, what listens is not a Dask scheduler (no
            answer in time, or bytes Dask cannot read), or the scheduler has no worker.
    """
    seconds = float(CONNECT_TIMEOUT.rstrip("s"))
    wait = _wait_workers()  # (a mistake in it is said before anything connects)
    not_dask = (f"is {address} a Dask scheduler's address (`dask scheduler` prints it; port "
                "8786 by default, not the dashboard's 8787)?")
    host, _sep, port = address.removeprefix("tcp://").rpartition(":")

    def unreachable(exc: BaseException) -> ExecutionError:
        return ExecutionError(f"cannot reach the Dask scheduler at {address} ({exc}); start one "
                              f"with `dask scheduler` and workers with `dask worker {address}`, "
                              "or run on this machine with --cluster local:N")

    try:  # (a refused port or an unknown host is said at once, not after Dask's timeout)
        answer = _first_bytes((host.strip("[]"), int(port)), seconds)
    except OSError as exc:
        raise unreachable(exc) from None
    # Dask's own timeout covers the connection, not the handshake that follows it, so a
    # server that never answers (the dashboard's HTTP port, say) would hold the run forever:
    # a Dask server speaks first, its handshake a message of a few hundred bytes (framed by
    # its length in 8 bytes, little-endian). (The scheduler logs this look as a connection
    # "closed before handshake completed", at INFO.)
    if not answer:
        raise ExecutionError(f"no Dask scheduler answered at {address} within {seconds:.0f} s: "
                             f"{not_dask}")
    if len(answer) < 8 or int.from_bytes(answer[:8], "little") > 1 << 26:
        raise ExecutionError(f"what answers at {address} is not a Dask scheduler: {not_dask}")
    try:
        client = distributed.Client(address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise unreachable(exc) from None
    except Exception as exc:  # noqa: BLE001 (a server that answered like Dask, then not)
        raise ExecutionError(f"cannot talk to a Dask scheduler at {address} "
                             f"({type(exc).__name__}: {exc}): {not_dask}") from None
    try:
        client.wait_for_workers(1, timeout=wait or None)
    except (OSError, TimeoutError):
        with contextlib.suppress(Exception):
            client.close()
        raise ExecutionError(f"the Dask scheduler at {address} has no workers (waited "
                             f"{wait:g} s): start some with `dask worker {address}`, or wait "
                             "longer for them with TVRECIPE_WAIT_WORKERS=SECONDS") from None
    return client


def _wait_workers() -> float:
    """Seconds to wait for a scheduler's first worker: $TVRECIPE_WAIT_WORKERS, else
    ``WAIT_WORKERS``; 0 waits as long as it takes.

    Raises:
        ExecutionError: the variable is not a number of seconds.
    """
    text = os.environ.get("TVRECIPE_WAIT_WORKERS", "").strip()
    if not text:
        return WAIT_WORKERS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ExecutionError(f"TVRECIPE_WAIT_WORKERS={text!r} is not a number of seconds: set "
                             "it to how long a run waits for the scheduler's first worker "
                             f"(0: as long as it takes), or unset it for {WAIT_WORKERS:g} s")
    return seconds


def _first_bytes(where: tuple[str, int], seconds: float) -> bytes:
    """What a server at ``where`` sends first, unasked, within ``seconds`` (b"" if nothing).

    Raises:
        OSError: nothing listens there, or the host is unknown.
    """
    import socket
    with socket.create_connection(where, timeout=seconds) as conn:
        got = b""
        with contextlib.suppress(OSError):  # (a timeout: nothing said)
            while len(got) < 8:
                more = conn.recv(8 - len(got))
                if not more:
                    break
                got += more
        return got


@atexit.register
def close_clients() -> None:
    """Close the clients :func:`connect` made (and the local clusters it started)."""
    with _CLIENTS_LOCK:
        for address in sorted(_OWNED):
            client = _CLIENTS.pop(address, None)
            with contextlib.suppress(Exception):
                cluster = client.cluster
                client.close()
                if cluster is not None:
                    cluster.close()
        _OWNED.clear()


# ---- what travels to the workers -------------------------------------------------------------
def _rebuild_recipe(state: dict) -> Any:
    """Unpickle a validated recipe: its model class is made at run time from the registered
    ops (``recipe_model``), so pickle cannot find it by name."""
    from tvrecipe.spec.registry import recipe_model
    cls = recipe_model()
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    return obj


def _reduce_recipe(obj: Any) -> tuple:
    return _rebuild_recipe, (obj.__getstate__(),)


@dataclass
class Job:
    """What every task of one pass needs: the compiled recipe and what the client has so far.

    Attributes:
        run: The run's id (a worker keeps the run's opened inputs under it).
        cached: Cached step -> its key (the worker opens the entry itself).
        staging: The run's staging folder (merge pass).
    """

    run: str
    compiled: Compiled
    device: str
    allow_nonfinite: bool
    # Each worker machine's Dask threads (the sum of its workers' ``nthreads``, by host): a
    # task computes with that machine's cores over them (:func:`_share`).
    host_threads: dict[str, int]
    chunk: int
    cache_root: str | None
    cached: dict[str, str]
    reduced: dict[str, Any]
    reports: dict[str, dict]
    staging: str


@dataclass
class Staged:
    """One value written to a staging file: ``target`` is ``("o", output, member)`` or
    ``("c", step, slot)``; ``bits``: the stored dtype's bits (else a tensor of ``dtype``)."""

    target: tuple[str, str, str]
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    bits: bool = True


@dataclass
class GroupResult:
    """What a task gives back (small: the tensors it wrote are in its staging file)."""

    worker: str
    seconds: float
    bytes_read: int
    reports: dict = field(default_factory=dict)  # what it added to the run's reports
    kept: dict = field(default_factory=dict)     # factored step -> tensor -> new kept state
    payload: Any = None
    error: tuple[str, str] | None = None          # (error class name, message)
    corrupt: tuple[str, str] | None = None        # (cache key, reason)
    staged_bytes: int = 0
    index: int = -1
    machine: dict = field(default_factory=dict)  # where it computed (lockfile.machine)
    cores: int = 0  # the cores it computed with (its share of its machine's)
    torch_threads: int = 0  # torch's threads for its math


# Error families by name: a worker's error is raised again on the client as the same one.
_ERRORS = {name: cls for name, cls in vars(errors).items()
           if isinstance(cls, type) and issubclass(cls, TvrecipeError)}


# ---- the worker side -------------------------------------------------------------------------
_JOBS: OrderedDict[str, Job] = OrderedDict()
_PLANS: OrderedDict[str, TensorPlan] = OrderedDict()
_WORKER_LOCK = threading.Lock()


_TUNED: list[bool] = []
# glibc's mallopt parameters, and the limits its dynamic mmap threshold reaches on 64 bits.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_MAX, _TRIM_MAX = 32 << 20, 64 << 20


def _tune_malloc() -> None:
    """Give a Dask worker the allocator a local run has.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which turns off glibc's
    dynamic mmap threshold: every tensor-sized buffer is then a fresh mmap, faulted in page by
    page and unmapped when freed. Task arithmetic on the large benchmark set took 6.8-7.4 s on
    local:2 that way and 2.8-3.0 s with the thresholds glibc would have reached by itself
    (local run: 2.4-2.6 s; 2-core box). Only on glibc, and only once per process."""
    if _TUNED:
        return
    _TUNED.append(True)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_MAX)
    except (OSError, AttributeError):  # not glibc
        pass


def _job(key: str, blob: bytes) -> Job:
    _tune_malloc()
    with _WORKER_LOCK:
        job = _JOBS.get(key)
        if job is None:
            job = _JOBS[key] = pickle.loads(blob)
            while len(_JOBS) > 4:
                _JOBS.popitem(last=False)
        return job


def _plan(job: Job) -> TensorPlan:
    """The run's opened inputs on this worker (headers once per run and worker). Pins
    (``sha256``) were checked by the client: the files are not hashed again here."""
    with _WORKER_LOCK:
        plan = _PLANS.get(job.run)
        if plan is None:
            c = job.compiled
            unpinned = {n: (m.model_copy(update={"sha256": None}) if m.sha256 else m)
                        for n, m in c.models.items()}
            plan = _PLANS[job.run] = build_tensor_plan(dataclasses.replace(c, models=unpinned))
            while len(_PLANS) > 2:
                _PLANS.popitem(last=False)[1].close()
        return plan


def forget_run(run: str) -> None:
    """Close a finished run's inputs on this worker (run on every worker at the end)."""
    with _WORKER_LOCK:
        plan = _PLANS.pop(run, None)
        for key in [k for k, j in _JOBS.items() if j.run == run]:
            del _JOBS[key]
    if plan is not None:
        plan.close()


def _worker_name() -> str:
    try:
        from distributed import get_worker
        return get_worker().address
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


def _host(address: str) -> str:
    """The machine of a worker address (``tcp://10.0.0.5:40123`` → ``10.0.0.5``)."""
    from distributed.comm import get_address_host
    try:
        return get_address_host(address)
    except Exception:  # noqa: BLE001 (not a worker address: a task outside Dask, a scheme
        # whose backend is not installed warns by raising)
        return address


def host_threads(workers: dict[str, dict]) -> dict[str, int]:
    """Dask threads per machine, from the scheduler's ``workers`` (address -> info)."""
    out: dict[str, int] = {}
    for address, info in workers.items():
        host = _host(address)
        out[host] = out.get(host, 0) + max(1, int(info.get("nthreads", 1) or 1))
    return out


def _share(threads: dict[str, int], address: str, machine: int, own: int = 1) -> int:
    """The cores one task computes with: its machine's (``machine``) over the Dask threads
    there (each may run a task at once; ``own``, the worker's own, for a machine the job's
    snapshot of the cluster does not list: a worker that joined since), at least 1. Workers
    that counted every core each (local:16 on 16 cores: 16 processes of 16 math threads and
    15 torch threads) would oversubscribe the machine; the bytes do not depend on the count
    (benchmarks/cores.py)."""
    return max(1, machine // max(1, threads.get(_host(address), own)))


def _worker_cores() -> tuple[int, int]:
    """This worker's machine's cores (its CPU quota counted, as Dask counts it: a container's
    affinity shows the node's cores) and the worker's own Dask threads (1 outside Dask)."""
    machine = parallel.machine_cores()
    try:
        from dask.system import CPU_COUNT
        machine = max(1, min(machine, int(CPU_COUNT)))
    except ImportError:  # pragma: no cover (workers have dask)
        pass
    try:
        from distributed import get_worker
        return machine, max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return machine, 1


def _delta(before: dict, after: dict) -> dict:
    """What ``after`` added to or changed in ``before`` (nested dicts)."""
    out = {}
    for k, v in after.items():
        if k not in before:
            out[k] = v
        elif isinstance(v, dict) and isinstance(before[k], dict):
            d = _delta(before[k], v)
            if d:
                out[k] = d
        elif v != before[k]:
            out[k] = v
    return out


def _merge(into: dict, delta: dict) -> None:
    for k, v in delta.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


class _WorkerRunner(Runner):
    """The local executor, on one group of tensors, inside a task."""

    def __init__(self, job: Job, tensors: list[str], kept: dict):
        super().__init__(job.compiled, RunOptions(device=job.device,
                                                  allow_nonfinite=job.allow_nonfinite))
        self.only = set(tensors)
        self.chunk = job.chunk
        self.reduced = job.reduced
        self.reports = copy.deepcopy(job.reports)
        self.kept = {step: dict(states) for step, states in kept.items()}
        self.plan = _plan(job)
        if job.cached:
            if not Path(job.cache_root).is_dir():
                raise ExecutionError(
                    f"the cache folder {job.cache_root} is not there on worker "
                    f"{_worker_name()}: workers read cached steps from it, so every worker must "
                    "see it at the same path (pass --cache-dir with a folder the client and "
                    "all workers share, or --no-cache)")
            cache = TensorCache(Path(job.cache_root))
            for name, key in job.cached.items():
                hit = cache.lookup(key, job.allow_nonfinite)
                if hit is None:  # removed, or found corrupt, since the client looked it up
                    self.close()
                    raise CacheCorrupt(key, "it changed while the run read it")
                self.cached[name] = hit

    def close(self) -> None:
        for _m, slots, _c in self.cached.values():
            for ck in slots.values():
                ck.close()
        self.cached = {}


def run_group(key: str, blob: bytes, kind: str, index: int, tensors: list[str], kept: dict,
              extra: Any) -> GroupResult:
    """One task: stream ``tensors`` through a pass (``gram``, ``grams`` or ``merge``)."""
    start = time.perf_counter()
    job = _job(key, blob)
    result = GroupResult(_worker_name(), 0.0, 0, index=index)
    machine, own = _worker_cores()
    result.cores = _share(job.host_threads, result.worker, machine, own)
    previous = torch.get_num_threads()
    # As a local run on that many cores: torch's math on one thread less (the reading and
    # writing threads need one), the math threads one per core. (Not OMP_NUM_THREADS: Dask's
    # nanny sets it to 1 for its workers, and in the process that starts a local cluster.)
    result.torch_threads = max(1, result.cores - 1)
    torch.set_num_threads(result.torch_threads)
    try:
        with parallel.share_cores(result.cores):
            _run_group(job, result, kind, index, tensors, kept, extra)
    finally:
        torch.set_num_threads(previous)
    result.seconds = time.perf_counter() - start
    return result


def _run_group(job: Job, result: GroupResult, kind: str, index: int, tensors: list[str],
               kept: dict, extra: Any) -> None:
    runner = None
    try:
        runner = _WorkerRunner(job, tensors, kept)
        result.machine = lockfile.machine(describe_device(runner.device))
        if kind == "merge":
            result.payload, result.staged_bytes = _stage(runner, job, index, extra)
        else:
            step_name, entries = extra
            ctx = PassContext(runner, runner.compiled.steps[step_name])
            if kind == "gram":
                partials: list[torch.Tensor] = []

                def add(_tensor: str, xs: list) -> None:
                    p = torch.zeros(len(entries), len(entries), dtype=torch.float64)
                    ops.gram_update(p, xs)
                    partials.append(p)

                ctx.accumulate(entries, add)
                result.payload = partials
            else:
                result.payload = ctx.grams(entries, "")
        result.reports = _delta(job.reports, runner.reports)
        result.kept = {step: {t: s for t, s in states.items() if t not in kept.get(step, {})}
                       for step, states in runner.kept.items()}
    except CacheCorrupt as exc:
        result.corrupt = (exc.key, exc.reason)
    except TvrecipeError as exc:
        result.error = (type(exc).__name__, str(exc))
    finally:
        if runner is not None:
            result.bytes_read = runner.bytes_read
            runner.close()


def _stage(runner: _WorkerRunner, job: Job, index: int, spec: dict) -> tuple[list, int]:
    """Stream the merge pass over the group and write every kept value to its staging file.

    Returns ``(file name, [(tensor, [Staged, ...]), ...], XXH3 of the file)`` (one item per
    tensor or row block, in stream order) and the file's size."""
    steps = [runner.compiled.steps[n] for n in spec["steps"]]
    compute = st_dtype(runner.compute)
    if not Path(job.staging).is_dir():
        from tvrecipe.errors import OutputError
        raise OutputError(f"the run's staging folder {job.staging} is not there on worker "
                          f"{_worker_name()}: every worker must see it at the same path (set "
                          "TVRECIPE_STAGING to a folder the client and all workers share)")
    path = Path(job.staging) / f"{spec['pass']:03d}-{index:05d}.bin"
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    items: list = []
    offset = 0
    hasher = tensor_hasher()
    try:
        with open(tmp, "xb", buffering=1 << 20) as f:  # the folder exists: the client made it
            def put(target: tuple, t: torch.Tensor, dtype: str, bits: bool) -> Staged:
                nonlocal offset
                raw = _stored_bytes(t, dtype)
                f.write(raw)
                hasher.update(raw)
                rec = Staged(target, dtype, tuple(t.shape), offset, len(raw), bits)
                offset += len(raw)
                return rec

            for tensor, info, values in runner._stream(steps, spec["want"], "merge"):
                recs = []
                for name, node, selector, kind, dtypes, raw in spec["outputs"]:
                    for m, t in written_members(kind, info, select(values[node], selector)):
                        dtype = st_dtype(t.dtype) if raw else dtypes[tensor]
                        if (not raw and not job.allow_nonfinite and t.is_floating_point()
                                and t.numel()):
                            # Cast here, so checked here: the client writes the bits as
                            # they come (Output.write checks tensors only).
                            check_tensor_range(name, tensor, dtype, t)
                        recs.append(put(("o", name, m), t, dtype, not raw))
                if info.is_floating:
                    for name in spec["entries"]:
                        for slot, t in to_slots(values[name]).items():
                            recs.append(put(("c", name, slot), t, compute, True))
                items.append((tensor, recs))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename not in (None, str(tmp), str(path)):
            raise
        from tvrecipe.errors import OutputError
        raise OutputError(f"cannot write the staging file {path} on worker {_worker_name()}: "
                          f"{exc.strerror or exc}; free space there, or set TVRECIPE_STAGING "
                          "to a folder with room that the client and every worker share"
                          ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return (path.name, items, tensor_digest(hasher)), offset


# ---- the client side -------------------------------------------------------------------------
class ClusterPassContext(PassContext):
    """A whole-model pass whose Grams are reduced from the workers' per-tensor partials."""

    def gram(self, entries: list) -> torch.Tensor:
        runner: ClusterRunner = self._runner
        gram = torch.zeros(len(entries), len(entries), dtype=torch.float64)
        for result in runner._tasks("gram", runner._upstream(self.step.name),
                                    (self.step.name, entries),
                                    f"similarity ({self.step.name})"):
            for partial in result.payload:  # plan order: the local pass's additions
                gram += partial
        return gram

    def grams(self, entries: list, label: str) -> dict[str, torch.Tensor]:
        runner: ClusterRunner = self._runner
        grams: dict[str, torch.Tensor] = {}
        for result in runner._tasks("grams", runner._upstream(self.step.name),
                                    (self.step.name, entries), f"{label} ({self.step.name})"):
            grams.update(result.payload)
        return grams


class ClusterRunner(Runner):
    """A :class:`Runner` whose streams run as Dask tasks (see the module's docstring).

    Args:
        options: ``options.cluster`` is the address (see :func:`parse_address`).
        client: A Dask client to use instead of connecting to ``options.cluster``.
    """

    def __init__(self, compiled: Compiled, options: RunOptions, client: Any = None):
        super().__init__(compiled, options)
        self.client = client
        self.run_id = uuid.uuid4().hex[:12]
        self.staging: Path | None = None
        self.workers: dict[str, dict] = {}
        self._passes = 0
        self._machines: list[dict[str, str]] = []  # where each task computed

    # ---- running -----------------------------------------------------------------------------
    def run(self) -> RunResult:
        if self.client is None:
            self.client = connect(self.options.cluster)
        copyreg.pickle(type(self.compiled.loaded.recipe), _reduce_recipe)
        self.staging = self._make_staging()
        try:
            result = super().run()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
            with contextlib.suppress(Exception):
                self.client.run(forget_run, self.run_id, on_error="ignore")
        result.workers = self.workers
        return result

    def _where(self) -> dict[str, str]:
        """The workers' machines and this one's (whole-model results are computed here):
        each field's distinct values, for the lock (``lockfile.machines``)."""
        return lockfile.machines([super()._where(), *self._machines])

    def _make_staging(self) -> Path:
        """The run's staging folder, ``.run.tmp-<host>-<pid>-<id>`` in ``$TVRECIPE_STAGING``,
        else in ``.tvrecipe/cluster/`` beside the recipe (for ``verify --recompute``, which
        writes into a temporary folder: in that folder): the client and every worker must
        see it at that path. Leftovers of killed runs are removed: those of this host whose
        process is gone, and any older than a day."""
        chosen = os.environ.get("TVRECIPE_STAGING")
        targets = sorted((self.options.targets or {}).values())
        if chosen:
            parent = Path(chosen)
        elif targets:
            parent = Path(targets[0]).parent / ".tvrecipe-cluster"
        else:
            parent = self.compiled.loaded.root / ".tvrecipe" / "cluster"
        from tvrecipe.store.output import staging_prefix, sweep_dead_staging
        try:
            parent.mkdir(parents=True, exist_ok=True)
            # A killed client's folder: at once where it ran on this host (its process is
            # gone), else once a day old (another host's, or before 0.2.1: run-<id>).
            sweep_dead_staging(parent, "run")
            for old in [*parent.glob("run-*"), *parent.glob(".run.tmp-*")]:
                with contextlib.suppress(OSError):
                    if time.time() - old.stat().st_mtime > 86400:
                        shutil.rmtree(old, ignore_errors=True)
            folder = parent / f"{staging_prefix('run')}{self.run_id}"
            folder.mkdir()
        except OSError as exc:
            from tvrecipe.errors import OutputError
            where = f"{parent} (TVRECIPE_STAGING)" if chosen else str(parent)
            why = exc.strerror or str(exc)
            with contextlib.suppress(OSError):  # (mkdir's "File exists" says it badly)
                if parent.exists() and not parent.is_dir():
                    why = "it is a file, not a folder"
            raise OutputError(f"cannot make the run's staging folder in {where}: "
                              f"{why}; set TVRECIPE_STAGING to a folder that "
                              "the client and every worker share and can write") from None
        return folder.resolve()

    def _whole_model_pass(self, step: CompiledStep) -> None:
        with whole_model_errors(step):
            self.reduced[step.name] = step.spec.whole_model_pass(ClusterPassContext(self, step))

    def _job(self, workers: dict[str, dict]) -> Job:
        """What every task of a pass needs; ``workers``: the scheduler's, address -> info."""
        keys = self.options.keys or {}
        cache = self.options.cache
        return Job(run=self.run_id, compiled=self.compiled, device=str(self.device),
                   allow_nonfinite=self.options.allow_nonfinite,
                   host_threads=host_threads(workers),
                   chunk=self.chunk,
                   cache_root=str(cache.root.resolve()) if cache is not None else None,
                   cached={n: keys[n] for n in self.cached}, reduced=self.reduced,
                   reports=self.reports, staging=str(self.staging))

    def _groups(self, steps: list[CompiledStep], workers: int
                ) -> list[tuple[list[str], int]]:
        """The plan's tensors in contiguous groups of bounded input bytes, each with the
        number of stream items (tensors or row blocks) it has."""
        plan = self.plan
        parts = sum(len(h.parts) for h in plan.models.values()) + sum(
            len(slots) for _m, slots, _c in self.cached.values())
        by_rows = rowwise(steps)
        sizes = {t: math.prod(info.shape) * dtype_size(info.dtype) * max(parts, 1)
                 for t, info in plan.tensors.items()}
        target = min(GROUP_BYTES, max(1, sum(sizes.values())
                                      // (TASKS_PER_WORKER * max(1, workers))))
        groups: list[tuple[list[str], int]] = []
        current: list[str] = []
        size = items = 0
        for t, info in plan.tensors.items():
            if current and size + sizes[t] > target:
                groups.append((current, items))
                current, size, items = [], 0, 0
            current.append(t)
            size += sizes[t]
            step = rows_per_block(info.shape, self.chunk) if by_rows else None
            items += 1 if step is None else math.ceil(info.shape[0] / step)
        if current:
            groups.append((current, items))
        return groups

    def _tasks(self, kind: str, steps: list[CompiledStep], extra: Any, label: str):
        """Run one pass as tasks, one per group; yield their results in plan order, with
        their reports, kept states and errors taken in (an error is raised in plan order:
        the one a local run would meet first)."""
        from distributed import as_completed
        from distributed.scheduler import KilledWorker
        try:
            from distributed.client import FutureCancelledError
        except ImportError:  # distributed before 2024.4
            from concurrent.futures import CancelledError as FutureCancelledError
        self._passes += 1
        if kind == "merge":
            extra = {**extra, "pass": self._passes}
        key = f"{self.run_id}-{self._passes}"
        # (one look at the cluster a pass: the tasks' sizes and the cores each computes with)
        workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
        blob = pickle.dumps(self._job(workers), protocol=pickle.HIGHEST_PROTOCOL)
        groups = self._groups(steps, len(workers))
        futures = []
        for i, (tensors, _n) in enumerate(groups):
            wanted = set(tensors)
            kept = {s: {t: v for t, v in states.items() if t in wanted}
                    for s, states in self.kept.items()}
            futures.append(self.client.submit(
                run_group, key, blob, kind, i, tensors, kept, extra,
                key=f"tvrecipe-{kind}-{key}-{i:05d}", retries=RETRIES, pure=False))
        order = {f.key: i for i, f in enumerate(futures)}
        bar = progress_bar(sum(n for _t, n in groups), label, self.options.progress)
        done: dict[int, GroupResult] = {}
        following = 0
        try:
            for future in as_completed(futures):
                i = order[future.key]
                try:
                    result = future.result()
                except KilledWorker as exc:
                    raise ExecutionError(
                        f"the Dask cluster lost the workers running a task of this run, again "
                        f"and again ({exc}); nothing was committed: check the workers' memory "
                        "and logs, and run again") from None
                except FutureCancelledError as exc:
                    if self.client.status != "running":  # (it lost its scheduler)
                        raise ExecutionError(
                            f"lost the connection to the Dask scheduler of "
                            f"{self.options.cluster} (client {self.client.status}); nothing "
                            "was committed: check the scheduler, and run again") from None
                    raise ExecutionError(f"a task of this run was cancelled on the Dask cluster "
                                         f"({exc}); nothing was committed") from None
                bar.update(groups[i][1])
                for hook in TASK_DONE_HOOKS:
                    hook(label, i, result)
                done[i] = result
                while following in done:
                    result = done.pop(following)
                    futures[following] = None  # its result is ours now: the cluster may drop it
                    self._take(result)
                    yield result
                    following += 1
        finally:
            pending = [f for f in futures if f is not None and not f.done()]
            if pending:
                with contextlib.suppress(Exception):
                    self.client.cancel(pending)
            bar.close()

    def _take(self, result: GroupResult) -> None:
        """Take in a task's result: its error first, then its bytes, reports and states."""
        stats = self.workers.setdefault(result.worker, {"tasks": 0, "seconds": 0.0,
                                                        "bytes_read": 0, "bytes_staged": 0})
        stats["tasks"] += 1
        stats["seconds"] = round(stats["seconds"] + result.seconds, 6)
        stats["bytes_read"] += result.bytes_read
        stats["bytes_staged"] += result.staged_bytes
        stats["cores"], stats["torch_threads"] = result.cores, result.torch_threads
        if result.machine:
            stats.update(result.machine)
            self._machines.append(result.machine)
        self.bytes_read += result.bytes_read
        if result.corrupt is not None:
            raise CacheCorrupt(*result.corrupt)
        if result.error is not None:
            name, message = result.error
            if name == "InputError" and "no such file or folder" in message:
                # (this machine read that input's headers when it planned the run)
                message += (f"\n(on worker {result.worker}: every worker must see the inputs "
                            "at the paths this machine does)")
            raise _ERRORS.get(name, ExecutionError)(message)
        _merge(self.reports, result.reports)
        for step, states in result.kept.items():
            self.kept.setdefault(step, {}).update(states)

    # ---- the merge pass ----------------------------------------------------------------------
    def _merge_pass(self, steps: list[CompiledStep], want: list[str], outputs: dict,
                    pending: dict) -> int:
        from tvrecipe.store.lora import AdapterWriter
        spec = {
            "steps": [s.name for s in steps], "want": want, "entries": list(pending),
            # (name, node, selector, kind, stored dtype per tensor, staged as compute tensors)
            "outputs": [(name, o.res.node, tuple(o.res.selector), o.kind, o.dtypes,
                         any(isinstance(w, AdapterWriter) for w in o.writers.values()))
                        for name, o in outputs.items()],
        }
        written = 0
        for result in self._tasks("merge", steps, spec, "merge"):
            written += self._replay(result, outputs, pending)
        return written

    def _replay(self, result: GroupResult, outputs: dict, pending: dict) -> int:
        """Write one group's staged values through the run's writers, in stream order."""
        name, items, digest = result.payload
        path = self.staging / name
        size = path.stat().st_size
        data = (np.memmap(path, dtype=np.uint8, mode="r") if size
                else np.empty(0, dtype=np.uint8))
        try:
            hasher = tensor_hasher()
            hasher.update(memoryview(data))
            if tensor_digest(hasher) != digest or size != result.staged_bytes:
                raise ExecutionError(f"staged file {path} changed after a worker wrote it; "
                                     "is the staging folder shared, and private to this run?")
            written = 0
            for tensor, recs in items:
                info = self.plan.tensors[tensor]
                got: dict[tuple[str, str], dict[str, Any]] = {}
                for r in recs:
                    got.setdefault(r.target[:2], {})[r.target[2]] = _array(data, r)
                for name, o in outputs.items():
                    members = got.get(("o", name), {})
                    value = members.get("") if o.kind in (CHECKPOINT, VECTOR) else members
                    written += o.write(tensor, info, value)
                for name, entry in pending.items():
                    for slot, t in got.get(("c", name), {}).items():
                        entry.write(slot, tensor, t)
            return written
        finally:
            del data
            path.unlink(missing_ok=True)


def _array(data: np.ndarray, rec: Staged) -> Any:
    """A staged value: the stored dtype's bits as a numpy array (what the writers take from
    the numpy executor), or a torch tensor of ``rec.dtype``."""
    raw = data[rec.offset:rec.offset + rec.nbytes]
    if rec.bits:
        return raw.view(_NUMPY_BITS[dtype_size(rec.dtype)]).reshape(rec.shape)
    return torch.frombuffer(bytearray(raw), dtype=torch_dtype(rec.dtype)).reshape(rec.shape)
