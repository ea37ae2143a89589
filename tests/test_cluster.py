"""`tvrecipe run --cluster`: the tensor work on Dask workers, the same bytes as a local run.

One LocalCluster (2 worker processes, 1 thread each) serves the whole module. Every op family
runs locally and on the cluster, from the command line, and outputs, lock and cache entries
are compared byte for byte (then once more from the cluster run's own cache). Errors found on
a worker come back as the local run's; a worker killed mid-run costs nothing but time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import Cli, base_weights, finetune, save_model, snapshot

pytest.importorskip("distributed", reason="the cluster extra: pip install 'tvrecipe[cluster]'")

from tvrecipe.exec import cluster as cluster_mod

TASKS = ("math", "code", "toxic", "chat")


@pytest.fixture(scope="module")
def address():
    """The scheduler address of a LocalCluster that `--cluster ADDRESS` reaches."""
    from distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR)
    client = Client(cluster)
    addr = cluster.scheduler_address
    cluster_mod._CLIENTS[addr] = client  # connect() uses it; the CLI leaves it open
    try:
        yield addr
    finally:
        cluster_mod._CLIENTS.pop(addr, None)
        client.close()
        cluster.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A base, four fine-tunes and a LoRA adapter of the base, shared by every test."""
    root = tmp_path_factory.mktemp("cluster-models")
    base = base_weights(0)
    save_model(root / "base", base)
    g = torch.Generator().manual_seed(7)
    shared = {k: 0.004 * torch.randn(v.shape, generator=g)
              for k, v in base.items() if v.is_floating_point()}
    for i, name in enumerate(TASKS):
        ft = finetune(base, i + 1)
        if i < 2:  # math and code move together: cluster_basis finds two clusters
            ft = {k: v + shared[k] if k in shared else v for k, v in ft.items()}
        save_model(root / name, ft)
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4,
        "target_modules": ["q_proj", "down_proj"]}))
    save_file({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
            0.1 * torch.randn(2, 8, generator=g),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
            0.1 * torch.randn(8, 2, generator=g),
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight":
            0.1 * torch.randn(2, 12, generator=g),
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight":
            0.1 * torch.randn(8, 2, generator=g),
    }, str(adapter / "adapter_model.safetensors"))
    return root


TV = "  tv: {op: extract, base: base, finetuned: [math, code, toxic, chat]}\n"
APPLY = "  model: {op: apply, base: base, delta: merged, scale: 0.7}\n"
MODEL_OUT = "  model: {from: model, path: ./out/model, dtype: bfloat16}\n"

# family -> (steps, outputs): every op, every output kind, the cached and factored steps.
FAMILIES = {
    "arithmetic": (
        (TV + "  detox: {op: negate, input: tv.toxic}\n"
         "  half: {op: scale, input: tv.math, factor: 0.5}\n"
         "  avg: {op: mean, inputs: tv}\n"
         "  merged: {op: sum, inputs: [half, tv.code, detox, avg], weights: [1, 0.5, 0.3, 0.2]}\n"
         + APPLY),
        ("  model: {from: model, path: ./out/model, dtype: bfloat16, shard_size: 1KB}\n"
         "  vectors: {from: tv, path: ./out/tv, dtype: float16}\n"
         "  avg: {from: avg, path: ./out/avg}\n")),
    "sparsify": (
        (TV + "  trimmed: {op: prune, input: tv, density: 0.4}\n"
         "  dropped: {op: dare, input: tv, density: 0.5}\n"
         "  tied: {op: ties, inputs: trimmed, density: 0.6}\n"
         "  merged: {op: sum, inputs: [tied, dropped.math, dropped.code]}\n" + APPLY),
        MODEL_OUT + "  dropped: {from: dropped, path: ./out/dropped}\n"),
    "mergekit": (
        (TV + "  crumbs: {op: breadcrumbs, input: tv, density: 0.9, gamma: 0.05}\n"
         "  del: {op: della, input: tv, density: 0.5, epsilon: 0.1}\n"
         "  c1: {op: consensus, inputs: crumbs}\n"
         "  c2: {op: consensus, inputs: [del.math, del.code, del.toxic, del.chat],"
         " weights: [1, 0.5, 0.5, 1]}\n"
         "  merged: {op: sum, inputs: [c1, c2]}\n" + APPLY),
        MODEL_OUT),
    "linear-slerp": (
        ("  soup: {op: linear, inputs: [math, code, chat], weights: [0.5, 0.3, 0.2]}\n"
         "  smooth: {op: slerp, a: base, b: soup, t: [0, 0.5, 1]}\n"
         "  moved: {op: extract, base: base, finetuned: [soup, smooth]}\n"
         "  merged: {op: sum, inputs: moved}\n"),
        ("  soup: {from: soup, path: ./out/soup}\n"
         "  smooth: {from: smooth, path: ./out/smooth, dtype: float16}\n"
         "  merged: {from: merged, path: ./out/merged}\n")),
    "model_stock": (
        TV + "  merged: {op: model_stock, inputs: tv}\n" + APPLY, MODEL_OUT),
    "cluster_basis": (
        (TV + "  basis: {op: cluster_basis, inputs: [tv.math, tv.code, tv.toxic], k: auto}\n"
         "  near: {op: assign, input: tv.chat, basis: basis}\n"
         "  merged: {op: sum, inputs: [basis, near]}\n" + APPLY),
        MODEL_OUT + "  library: {from: basis, path: ./out/basis}\n"),
    "compress_basis": (
        (TV + "  basis: {op: compress_basis, inputs: tv, method: pca, m: 2}\n"
         "  back: {op: rebuild, basis: basis}\n"
         "  merged: {op: sum, inputs: back}\n" + APPLY),
        MODEL_OUT + "  atoms: {from: basis, path: ./out/atoms}\n"),
    "decompose": (
        (TV + "  parts: {op: decompose, inputs: tv, threshold: 0.8}\n"
         "  merged: {op: mean, inputs: parts.shared}\n" + APPLY),
        MODEL_OUT + "  unique: {from: parts.unique, path: ./out/unique}\n"),
    "decompose-basis": (  # a factored step upstream of a whole-model pass
        (TV + "  parts: {op: decompose, inputs: tv}\n"
         "  basis: {op: cluster_basis, inputs: parts.unique, k: 2}\n"
         "  merged: {op: sum, inputs: basis}\n" + APPLY),
        MODEL_OUT),
    "spectral": (
        (TV + "  t: {op: tsv_merge, inputs: tv}\n"
         "  i: {op: iso, inputs: tv, variant: cts}\n"
         "  merged: {op: sum, inputs: [t, i], weights: [0.5, 0.5]}\n" + APPLY),
        MODEL_OUT),
    "peft": (
        TV + "  merged: {op: sum, inputs: tv}\n",
        "  adapter: {from: merged, path: ./out/adapter, format: peft, rank: 2}\n"),
    "lora": (
        "  merged: {op: sum, inputs: [ad, ad], weights: [0.5, 0.25]}\n" + APPLY,
        MODEL_OUT),
    "row-blocks": (  # random masks that continue from one row block to the next
        (TV + "  dropped: {op: dare, input: tv, density: 0.3}\n"
         "  merged: {op: sum, inputs: dropped}\n" + APPLY),
        MODEL_OUT + "  dropped: {from: dropped, path: ./out/dropped}\n"),
}


def write_recipe(root: Path, models: Path, steps: str, outputs: str) -> Path:
    names = ["base", *TASKS]
    text = ("tvrecipe: 1\nmodels:\n"
            + "".join(f"  {n}: {models / n}\n" for n in names)
            + f"  ad: {{path: {models / 'adapter'}, kind: lora}}\n"
            + "steps:\n" + steps + "outputs:\n" + outputs)
    path = root / "r.yaml"
    path.write_text(text)
    return path


def everything(root: Path, cache: Path) -> dict[str, bytes]:
    """Outputs, lock file and cache entries, by path."""
    got = {f"out/{k}": v for k, v in snapshot(root / "out").items()}
    got["r.yaml.lock"] = (root / "r.yaml.lock").read_bytes()
    got.update({f"cache/{k}": v for k, v in snapshot(cache).items()})
    return got


@pytest.fixture
def cli(tmp_path, monkeypatch) -> Cli:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TVRECIPE_CACHE", raising=False)
    monkeypatch.delenv("TVRECIPE_STAGING", raising=False)
    return Cli(tmp_path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_bytes_as_the_local_executor(family, models, address, cli, tmp_path, monkeypatch):
    if family == "row-blocks":  # 8-row blocks: every tensor comes in several
        from tvrecipe.exec import runner
        monkeypatch.setattr(runner, "CHUNK_ELEMENTS", 64)
    recipe = write_recipe(tmp_path, models, *FAMILIES[family])
    cli.ok("run", recipe, "-q", "--cache-dir", tmp_path / "local")
    local = everything(tmp_path, tmp_path / "local")
    shutil.rmtree(tmp_path / "out")
    cli.ok("run", recipe, "-q", "--force", "--cache-dir", tmp_path / "remote",
           "--cluster", address)
    remote = everything(tmp_path, tmp_path / "remote")
    assert any(k.startswith("cache/") for k in local), "nothing was cached"
    assert sorted(remote) == sorted(local)
    assert [k for k in local if local[k] != remote[k]] == []
    # Again on the cluster, from its own cache (cached tensors and kept states read by the
    # workers): the same bytes, and no staging left behind.
    res = cli.ok("run", recipe, "--force", "--cache-dir", tmp_path / "remote",
                 "--cluster", address)
    assert "from cache:" in res.stdout
    again = everything(tmp_path, tmp_path / "remote")
    assert [k for k in local if local[k] != again.get(k)] == []
    assert list((tmp_path / ".tvrecipe" / "cluster").iterdir()) == []


def test_report_gives_time_and_bytes_per_worker(models, address, cli, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, models, *FAMILIES["cluster_basis"])
    # What each pass saw of the cluster (Dask threads by host), and each worker's own count
    # of its machine's cores: a report must give the share those make.
    seen: list[dict[str, int]] = []
    real = cluster_mod.host_threads
    monkeypatch.setattr(cluster_mod, "host_threads", lambda w: seen.append(real(w)) or seen[-1])
    client = cluster_mod._CLIENTS[address]
    client.wait_for_workers(2, timeout=60)
    res = cli.ok("run", recipe, "--no-cache", "--cluster", address, "--report", "rep.json")
    machines = client.run(cluster_mod._worker_cores)  # address -> (cores, own threads)
    workers = json.loads((tmp_path / "rep.json").read_text())["cluster:workers"]
    assert workers and all(
        set(w) == {"tasks", "seconds", "bytes_read", "bytes_staged", "device", "cpu", "cores",
                   "torch_threads"}
        for w in workers.values())
    # Two single-threaded workers on this machine: each computes with half its cores, torch
    # on one thread less (at least 1). (Should a worker have been replaced between passes,
    # the pass's own view decides: said in the message.)
    from dask.system import CPU_COUNT

    from tvrecipe.ops.parallel import machine_cores
    why = f"passes saw {seen}, workers count {machines}, report {workers}"
    assert seen, why  # (one view a pass)
    for address_, w in workers.items():
        machine, own = machines.get(address_, (min(machine_cores(), CPU_COUNT), 1))
        shares = {cluster_mod._share(threads, address_, machine, own) for threads in seen}
        assert w["cores"] in shares and w["torch_threads"] == max(1, w["cores"] - 1), why
    if all(sum(threads.values()) == 2 for threads in seen):  # (the usual case: no change)
        share = max(1, min(machine_cores(), CPU_COUNT) // 2)
        assert all(w["cores"] == share for w in workers.values()), why
    from tvrecipe.exec import lockfile
    assert all(w["device"] == "cpu" and w["cpu"] == lockfile.machine()["cpu"]
               for w in workers.values())
    assert sum(w["tasks"] for w in workers.values()) > 2
    total = sum(w["bytes_read"] for w in workers.values())
    assert f"read {total / 1e6:.1f} MB" in res.stdout
    assert "(cluster " in res.stdout
    cli.ok("run", recipe, "--no-cache", "--force", "--report", "local.json")
    local = json.loads((tmp_path / "local.json").read_text())
    assert "cluster:workers" not in local
    assert local["basis"] == json.loads((tmp_path / "rep.json").read_text())["basis"]


def test_progress_counts_every_tensor_once(models, address, tmp_path, monkeypatch):
    from tvrecipe.exec import lockfile
    from tvrecipe.exec.runner import RunOptions, run_recipe
    from tvrecipe.plan.graph import load_and_compile
    counted: dict[str, list[int]] = {}

    class Bar:
        def __init__(self, total, label):
            self.label = label
            counted[label] = [total, 0]

        def update(self, n):
            counted[self.label][1] += n

        def close(self):
            pass

    monkeypatch.setattr(cluster_mod, "progress_bar",
                        lambda total, label, enabled: Bar(total, label))
    recipe = write_recipe(tmp_path, models, *FAMILIES["cluster_basis"])
    compiled = load_and_compile(recipe)
    state = lockfile.run_state(compiled)
    run_recipe(compiled, RunOptions(progress=True, cluster=address, state=state))
    assert set(counted) == {"similarity (basis)", "similarity (near)", "merge"}
    assert all(total == done == 8 for total, done in counted.values())  # 8 tensors each


def test_a_bad_input_gives_the_local_error_and_commits_nothing(models, address, cli, tmp_path):
    bad = tmp_path / "nan"
    weights = base_weights(0)
    weights["model.layers.0.mlp.down_proj.weight"][3, 4] = float("nan")
    save_model(bad, weights)
    recipe = write_recipe(tmp_path, models, *FAMILIES["decompose"])
    recipe.write_text(recipe.read_text().replace(str(models / "chat"), str(bad)))
    local = cli.fails(3, "run", recipe, "--cache-dir", "c")
    remote = cli.fails(3, "run", recipe, "--cache-dir", "c", "--cluster", address)
    assert remote.stderr == local.stderr
    assert "'model.layers.0.mlp.down_proj.weight' contains NaN or Inf" in remote.stderr
    assert list((tmp_path / "out").glob("*")) == []  # the folder a local run leaves too
    assert list((tmp_path / "c").rglob("*.json")) == []
    assert list((tmp_path / ".tvrecipe" / "cluster").iterdir()) == []
    # A problem the client finds from headers alone: the same message too.
    save_model(bad, {k: v[:1] if k == "lm_head.weight" else v for k, v in weights.items()})
    local = cli.fails(3, "run", recipe)
    remote = cli.fails(3, "run", recipe, "--cluster", address)
    assert remote.stderr == local.stderr and "do not line up" in remote.stderr


@pytest.mark.parametrize(("factor", "dtype", "says"), [
    ("1.0e+8", "float16", "which float16 cannot hold"),
    ("1.0e+39", "float32", "holds Inf or NaN though every input was finite")])
def test_an_output_its_dtype_cannot_hold_is_refused_as_locally(models, address, cli, tmp_path,
                                                               factor, dtype, says):
    # Workers cast outputs to their stored dtype: they check the range too (the cluster wrote
    # Inf with exit 0 where a local run stopped with exit 5).
    cli.write("big.yaml", f"tvrecipe: 1\nmodels: {{base: {models / 'base'}, ft: {models / 'math'}}}\n"
                          "steps:\n  tv: {op: extract, base: base, finetuned: ft}\n"
                          f"  m: {{op: scale, input: tv, factor: {factor}}}\n"
                          f"outputs:\n  o: {{from: m, path: ./out/o, dtype: {dtype}}}\n")
    local = cli.fails(5, "run", "big.yaml", "--no-cache")
    remote = cli.fails(5, "run", "big.yaml", "--no-cache", "--cluster", address)
    assert remote.stderr == local.stderr and says in remote.stderr
    assert not (tmp_path / "out" / "o").exists()


def test_a_corrupt_cache_entry_is_recomputed(models, address, cli, tmp_path):
    recipe = write_recipe(tmp_path, models, *FAMILIES["sparsify"])
    cli.ok("run", recipe, "-q", "--cluster", address)
    first = snapshot(tmp_path / "out")
    entry = next((tmp_path / ".tvrecipe" / "cache").rglob("sum-*.safetensors"))
    data = bytearray(entry.read_bytes())
    data[-3] ^= 0xFF
    entry.write_bytes(bytes(data))
    res = cli.ok("run", recipe, "--force", "--cluster", address)
    assert "is corrupt" in res.stderr and "recomputing it" in res.stderr
    assert snapshot(tmp_path / "out") == first


def test_address_and_recipe_mistakes(models, cli, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, models, *FAMILIES["model_stock"])
    for bad in ("scheduler:8786", "local:0", "tcp://host", "local:two"):
        res = cli.fails(2, "run", recipe, "--cluster", bad)
        assert "use tcp://HOST:PORT (a running Dask scheduler) or local:N" in res.stderr
    text = recipe.read_text()
    (tmp_path / "s.yaml").write_text(text.replace(
        "steps:", "settings: {seed: 1, cluster: 'tcp://sched:8786'}\nsteps:"))
    res = cli.fails(2, "run", "s.yaml")
    assert "s.yaml:9:21: settings.cluster: unknown field 'cluster'" in res.stderr
    assert "where a recipe runs is not part of the recipe" in res.stderr
    res = cli.fails(2, "verify", recipe, "--cluster", "local:2")  # (hashes need no cluster)
    assert "--cluster runs --recompute on a cluster; without --recompute, verify only hashes " \
           "files here: add --recompute, or leave --cluster out" in res.stderr
    monkeypatch.setitem(sys.modules, "distributed", None)  # not installed
    res = cli.fails(7, "run", recipe, "--cluster", "local:2")
    assert "pip install 'tvrecipe[cluster]'" in res.stderr


def test_the_lock_of_a_cluster_run_names_the_workers_cpu(models, address, cli, tmp_path):
    # The workers compute the tensors, so the lock records their CPU (with the client's,
    # which computes the whole-model results): a recompute elsewhere says which CPUs they were.
    import yaml

    from tvrecipe.exec import lockfile
    client = cluster_mod._CLIENTS[address]

    def pretend(cpu: str | None) -> None:  # on each worker: its CPU is ``cpu`` (None: its own)
        from tvrecipe.exec import lockfile as worker_lockfile
        worker_lockfile.__dict__.setdefault("_real_cpu", worker_lockfile._cpu)
        worker_lockfile._cpu = (lambda: cpu) if cpu else worker_lockfile._real_cpu

    here = lockfile.machine()["cpu"]
    other = "x86_64 GenuineIntel avx512f" if "GenuineIntel" not in here else "aarch64 asimd"
    client.run(pretend, other)
    try:
        recipe = write_recipe(tmp_path, models, *FAMILIES["model_stock"])
        cli.ok("run", recipe, "-q", "--no-cache", "--cluster", address)
    finally:
        client.run(pretend, None)
    lock = yaml.safe_load((tmp_path / "r.yaml.lock").read_text())
    assert lock["machine"] == {"device": "cpu", "cpu": "; ".join(sorted([here, other]))}
    cli.ok("run", recipe, "-q", "--no-cache", "--force", "--cluster", address)
    lock = yaml.safe_load((tmp_path / "r.yaml.lock").read_text())
    assert lock["machine"] == {"device": "cpu", "cpu": here}  # (the workers' own CPU again)


def test_verify_recompute_on_the_cluster(models, address, cli, tmp_path):
    recipe = write_recipe(tmp_path, models, *FAMILIES["model_stock"])
    cli.ok("run", recipe, "-q")
    res = cli.ok("verify", recipe, "--recompute", "--cluster", address)
    assert "gave the same bytes" in res.stdout
    before = snapshot(tmp_path / "out" / "model")
    res = cli.ok("verify", "out/model", "--recompute", "--cluster", address)
    assert "rebuilding them from tvrecipe.yaml gave the same bytes" in res.stdout
    assert snapshot(tmp_path / "out" / "model") == before  # nothing staged in the folder
    assert not (tmp_path / "out" / "model" / ".tvrecipe").exists()


def test_a_worker_killed_mid_run(models, address, cli, tmp_path, monkeypatch):
    """Killed while the merge pass runs: Dask runs its tasks again elsewhere and the run
    finishes with the same bytes, or the run fails and commits nothing."""
    from distributed import Client
    monkeypatch.setattr(cluster_mod, "GROUP_BYTES", 1)  # a task per tensor
    recipe = write_recipe(tmp_path, models, *FAMILIES["decompose"])
    cli.ok("run", recipe, "-q", "--no-cache")
    local = snapshot(tmp_path / "out")
    client: Client = cluster_mod._CLIENTS[address]
    killed: list[tuple[int, int]] = []  # (pid, tasks it had)

    def kill(label: str, index: int, result) -> None:
        if label == "merge" and not killed:
            pids = client.run(os.getpid)
            busy = client.processing()  # worker -> keys of the tasks it runs or will run
            # The busiest worker: its tasks (usually 1-2 of the 7 left) must run again.
            victim = max(sorted(pids), key=lambda a: len(busy.get(a, ())))
            killed.append((pids[victim], len(busy.get(victim, ()))))
            os.kill(pids[victim], signal.SIGKILL)

    monkeypatch.setattr(cluster_mod, "TASK_DONE_HOOKS", [kill])
    res = cli("run", recipe, "--force", "--cache-dir", "c", "--cluster", address)
    assert killed
    if res.exit_code == 0:
        assert snapshot(tmp_path / "out") == local
        assert list((tmp_path / "c").rglob("*.json"))
    else:
        assert res.exit_code == 5 and "nothing was committed" in res.stderr, res.stderr
        assert snapshot(tmp_path / "out") == local  # the earlier run's, untouched
        assert list((tmp_path / "c").rglob("*.json")) == []
    assert list((tmp_path / ".tvrecipe" / "cluster").iterdir()) == []


def test_a_task_computes_with_its_share_of_its_machines_cores():
    # The Dask threads of every worker on a machine share its cores: a local:16 on 16 cores
    # gives each task 1, not 16 math threads and 15 torch threads in each of 16 processes.
    workers = {"tcp://10.0.0.5:40001": {"nthreads": 1}, "tcp://10.0.0.5:40002": {"nthreads": 1},
               "tcp://10.0.0.5:40003": {"nthreads": 2}, "tcp://10.0.0.6:40001": {"nthreads": 4},
               "tcp://[::1]:40001": {"nthreads": 1}, "tcp://[::1]:40002": {}}
    threads = cluster_mod.host_threads(workers)
    assert threads == {"10.0.0.5": 4, "10.0.0.6": 4, "::1": 2}
    assert cluster_mod._share(threads, "tcp://10.0.0.5:40002", 16) == 4
    assert cluster_mod._share(threads, "tcp://10.0.0.6:40001", 6) == 1
    assert cluster_mod._share(threads, "tcp://[::1]:40002", 16) == 8
    # A machine the job's snapshot does not list (a worker that joined since): its own threads.
    assert cluster_mod._share(threads, "tcp://10.0.0.9:40001", 16) == 16
    assert cluster_mod._share(threads, "tcp://10.0.0.9:40001", 16, own=4) == 4
    assert cluster_mod._share(threads, "pid 1234", 3) == 3


def width(parallel) -> int:
    parallel._pool()
    return parallel._POOL_WIDTH


def test_cores_says_a_share_inside_share_cores():
    from tvrecipe.ops import parallel
    whole = parallel.machine_cores()
    assert parallel.cores() == whole
    with parallel.share_cores(3):
        assert parallel.cores() == 3
        with parallel.share_cores(0):
            assert parallel.cores() == 1
        assert parallel.cores() == 3
        # The math threads follow the share: one per core it gives.
        assert width(parallel) == 3
    assert parallel.cores() == whole
    with parallel.share_cores(1):
        assert width(parallel) == 1
    assert width(parallel) == whole
    assert list(parallel.parallel_map(lambda i: i * i, list(range(9)), numel=1 << 20,
                                      device=torch.device("cpu"))) == [i * i for i in range(9)]


def test_a_local_cluster_takes_any_free_port_for_its_dashboard(models, cli, tmp_path):
    """`--cluster local:N` with port 8787 (Dask's dashboard default) taken, as by another
    cluster: no warning about the port (its dashboard takes any free one)."""
    import socket
    import warnings
    recipe = write_recipe(tmp_path, models, *FAMILIES["cluster_basis"])
    taken = socket.socket()
    try:
        taken.bind(("", 8787))
        taken.listen()
    except OSError:
        pass  # (taken already, by someone else: the same case)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = cli.ok("run", recipe, "--no-cache", "-q", "--cluster", "local:1")
    finally:
        taken.close()
    said = [str(w.message) for w in caught] + [res.stderr]
    assert not [s for s in said if "8787" in s], said


@pytest.mark.parametrize("target", ["recipe", "folder"])
def test_verify_recompute_closes_the_local_cluster_it_started(target, models, cli, tmp_path):
    """As `run` does: the console script ends with os._exit (no atexit), so a local:N
    cluster left open would leak its worker processes' semaphores."""
    from tvrecipe.exec import cluster
    recipe = write_recipe(tmp_path, models, *FAMILIES["model_stock"])
    cli.ok("run", recipe, "-q")
    res = cli.ok("verify", recipe if target == "recipe" else "out/model", "--recompute",
                 "--cluster", "local:1")
    assert "same bytes" in res.stdout
    assert not cluster._OWNED and "local:1" not in cluster._CLIENTS


def _listener(reply: bytes | None):
    """A TCP port on localhost whose server answers each connection with ``reply`` (None:
    never answers, as an HTTP server waits for a request), until closed."""
    import socket
    import threading
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            if reply is not None:
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()

    class Listener:
        address = f"tcp://127.0.0.1:{server.getsockname()[1]}"

        def close(self):  # (the connections too: a client still waiting on one then ends)
            server.close()
            for conn in held:
                conn.close()

    return Listener()


def test_an_address_that_is_not_a_working_scheduler_is_said(models, cli, tmp_path,
                                                             monkeypatch):
    """Nothing listening, a server that never answers (the dashboard's HTTP port), one that
    answers what Dask cannot read, a scheduler without workers: each a runtime error that
    says what to check, in seconds, never a hang nor an internal error."""
    import socket

    from distributed import LocalCluster
    monkeypatch.setattr(cluster_mod, "CONNECT_TIMEOUT", "1s")
    recipe = write_recipe(tmp_path, models, *FAMILIES["model_stock"])
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    res = cli.fails(5, "run", recipe, "--cluster", f"tcp://127.0.0.1:{port}")
    assert res.err_lines[1].startswith(f"cannot reach the Dask scheduler at tcp://127.0.0.1:"
                                       f"{port} (")
    not_dask = ("a Dask scheduler's address (`dask scheduler` prints it; port 8786 by "
                "default, not the dashboard's 8787)?")
    for reply, said in ((None, "no Dask scheduler answered at {} within 1 s"),
                        (b"\xff" * 64, "what answers at {} is not a Dask scheduler")):
        server = _listener(reply)
        try:
            res = cli.fails(5, "run", recipe, "--cluster", server.address)
        finally:
            server.close()
        assert res.err_lines[1] == (f"{said.format(server.address)}: is {server.address} "
                                    f"{not_dask}")
    with LocalCluster(n_workers=0, processes=True, dashboard_address=":0") as empty:
        address = empty.scheduler_address
        monkeypatch.setenv("TVRECIPE_WAIT_WORKERS", "abc")
        res = cli.fails(5, "run", recipe, "--cluster", address)
        assert res.err_lines[1] == ("TVRECIPE_WAIT_WORKERS='abc' is not a number of seconds: "
                                    "set it to how long a run waits for the scheduler's first "
                                    "worker (0: as long as it takes), or unset it for 20 s")
        monkeypatch.setenv("TVRECIPE_WAIT_WORKERS", "1.5")
        started = time.monotonic()
        res = cli.fails(5, "run", recipe, "--cluster", address)
        assert 1.5 <= time.monotonic() - started
    assert res.err_lines[1] == (f"the Dask scheduler at {address} has no workers (waited 1.5 s): "
                                f"start some with `dask worker {address}`, or wait longer for "
                                "them with TVRECIPE_WAIT_WORKERS=SECONDS")
    assert not (tmp_path / "out").exists()


def test_a_worker_that_joins_late_is_waited_for(models, cli, tmp_path, monkeypatch):
    """Workers of a batch queue join minutes after the scheduler starts:
    TVRECIPE_WAIT_WORKERS sets how long a run waits for the first, beyond the default."""
    import subprocess
    import threading

    from distributed import LocalCluster
    monkeypatch.setattr(cluster_mod, "WAIT_WORKERS", 0.5)
    monkeypatch.setenv("TVRECIPE_WAIT_WORKERS", "120")
    recipe = write_recipe(tmp_path, models, *FAMILIES["model_stock"])
    cli.ok("run", recipe, "-q", "--no-cache")
    local = snapshot(tmp_path / "out")
    workers: list[subprocess.Popen] = []
    with LocalCluster(n_workers=0, processes=True, dashboard_address=":0") as empty:
        address = empty.scheduler_address
        # (a process of its own, started from a timer: nothing here touches Dask's loop)
        late = threading.Timer(2.0, lambda: workers.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
             "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        late.start()
        try:
            started = time.monotonic()
            cli.ok("run", recipe, "-q", "--no-cache", "--force", "--cluster", address)
            assert time.monotonic() - started > 2.0
        finally:
            late.join()
            for worker in workers:
                worker.kill()
                worker.wait()
    assert snapshot(tmp_path / "out") == local


def test_what_a_worker_does_not_see_is_said_as_such(models, address, cli, tmp_path,
                                                    monkeypatch):
    """A cache folder, an input or a staging folder that a worker does not see at the
    client's path: said as that, naming the worker or the setting, not as a corrupt cache
    entry, a missing input or a bad output path."""
    from types import SimpleNamespace

    from tvrecipe.errors import InputError
    recipe = write_recipe(tmp_path, models, *FAMILIES["sparsify"])
    cli.ok("run", recipe, "-q")
    # The cache: workers are sent a folder they do not have (as if mounted elsewhere).
    real = cluster_mod.ClusterRunner._job
    monkeypatch.setattr(cluster_mod.ClusterRunner, "_job", lambda self, w: dataclasses.replace(
        real(self, w), cache_root=str(tmp_path / "elsewhere")))
    res = cli.fails(5, "run", recipe, "--force", "--cluster", address)
    assert res.err_lines[1].startswith(f"the cache folder {tmp_path / 'elsewhere'} is not there "
                                       "on worker tcp://")
    assert res.err_lines[1].endswith(
        ": workers read cached steps from it, so every worker must see it at the same path "
        "(pass --cache-dir with a folder the client and all workers share, or --no-cache)")
    assert "corrupt" not in res.stderr
    monkeypatch.setattr(cluster_mod.ClusterRunner, "_job", real)

    # An input a worker cannot open, where this machine can.
    runner = SimpleNamespace(workers={}, _machines=[], bytes_read=0, reports={}, kept={})
    lost = cluster_mod.GroupResult("tcp://10.0.0.7:4000", 0.0, 0, error=(
        "InputError", ("model 'base' (./base): no such file or folder; check the path to the "
                      "checkpoint")))
    with pytest.raises(InputError) as caught:
        cluster_mod.ClusterRunner._take(runner, lost)
    assert str(caught.value).endswith("\n(on worker tcp://10.0.0.7:4000: every worker must see "
                                      "the inputs at the paths this machine does)")

    # TVRECIPE_STAGING naming a file, not a folder.
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("TVRECIPE_STAGING", str(tmp_path / "afile"))
    res = cli.fails(4, "run", recipe, "--force", "--no-cache", "--cluster", address)
    assert res.err_lines[1] == (
        f"cannot make the run's staging folder in {tmp_path / 'afile'} (TVRECIPE_STAGING): "
        "it is a file, not a folder; set TVRECIPE_STAGING to a folder that the client and "
        "every worker share and can write")


def test_a_killed_clients_staging_folder_goes_with_the_next_run(models, address, cli, tmp_path):
    import subprocess

    from tvrecipe.store.output import staging_prefix
    recipe = write_recipe(tmp_path, models, *FAMILIES["model_stock"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # (a process id no process has now)
    parent = tmp_path / ".tvrecipe" / "cluster"
    left = parent / f"{staging_prefix('run', pid=gone.pid)}0123456789ab"
    left.mkdir(parents=True)
    (left / "001-00000.bin").write_bytes(b"\0" * 1024)
    other = parent / ".run.tmp-otherhost-1-0123456789ab"  # another machine's: a day's grace
    other.mkdir()
    cli.ok("run", recipe, "-q", "--no-cache", "--cluster", address)
    assert sorted(p.name for p in parent.iterdir()) == [other.name]
