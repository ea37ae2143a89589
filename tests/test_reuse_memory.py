"""``run --reuse-memory``: a similarity pass keeps the task vectors it computed for the merge
pass, which takes them instead of reading the fine-tunes and subtracting again. The bytes are
those of a run without it, whatever the budget; only the reads change."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import gen, read_tensors
from tvrecipe.exec import runner as runner_mod
from tvrecipe.exec.results import RunOptions
from tvrecipe.exec.runner import Runner
from tvrecipe.plan.graph import compile_recipe
from tvrecipe.spec.load import load_recipe

SHAPES = {"a.weight": (40, 130), "b.weight": (3, 2049), "c.bias": (7,)}  # 5200, 6147, 7
NAMES = ["t0", "t1", "t2", "t3"]


@pytest.fixture
def models(tmp_path):
    g = gen(11)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    for name in ["base", *NAMES]:
        ws = base if name == "base" else {
            k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(ws, str(tmp_path / f"{name}.safetensors"))
    return tmp_path


def recipe(folder, steps: str, out: str = "basis", name: str = "r", extra: str = "") -> object:
    text = ("tvrecipe: 1\nsettings: {device: cpu}\nmodels:\n"
            + "".join(f"  {m}: {m}.safetensors\n" for m in ["base", *NAMES])
            + "steps:\n  tv: {op: extract, base: base, finetuned: [t0, t1, t2, t3]}\n"
            + steps + f"outputs:\n  out: {{from: {out}, path: out-{name}{extra}}}\n")
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def run(path, budget: int, monkeypatch, chunk: int | None = None) -> tuple[Runner, dict]:
    if chunk is not None:  # row blocks of about ``chunk`` entries in row-wise streams
        monkeypatch.setattr(runner_mod, "CHUNK_ELEMENTS", chunk)
    runner = Runner(compile_recipe(load_recipe(path)),
                    RunOptions(force=True, reuse_memory=budget))
    result = runner.run()
    out = {}
    for file in sorted(result.outputs["out"].glob("*.safetensors")):
        out.update({f"{file.name}:{k}": v for k, v in read_tensors(file).items()})
    return runner, {"read": result.bytes_read, "tensors": out}


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)) for k in a)


FLOATS = sum(torch.Size(s).numel() for s in SHAPES.values()) * 4  # one model's bytes


@pytest.mark.parametrize("chunk", [None, 2600])
def test_a_whole_budget_reads_the_fine_tunes_once_with_the_same_bytes(models, monkeypatch,
                                                                      chunk):
    path = recipe(models, "  basis: {op: cluster_basis, inputs: tv, k: 2}\n")
    _r, plain = run(path, 0, monkeypatch, chunk)
    runner, kept = run(path, 1 << 30, monkeypatch, chunk)
    assert same_tensors(plain["tensors"], kept["tensors"])
    # Without: base and four fine-tunes read by each pass; with: the merge pass reads none.
    assert plain["read"] == 2 * 5 * FLOATS
    assert kept["read"] == 5 * FLOATS
    assert runner.carry == {} and runner.carry_bytes == 0  # nothing held after the run


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_run_keeps_its_blocks_on_the_device_with_the_same_bytes(models, monkeypatch):
    path = recipe(models, "  basis: {op: cluster_basis, inputs: tv, k: 2}\n")
    path.write_text(path.read_text().replace("device: cpu", "device: cuda"))
    _r, plain = run(path, 0, monkeypatch, 2600)
    _r, kept = run(path, 1 << 30, monkeypatch, 2600)
    assert same_tensors(plain["tensors"], kept["tensors"])
    assert kept["read"] == plain["read"] // 2


def test_a_partial_budget_keeps_what_fits_and_reads_the_rest(models, monkeypatch):
    path = recipe(models, "  basis: {op: cluster_basis, inputs: tv, k: 2}\n")
    _r, plain = run(path, 0, monkeypatch, 2600)
    kept = []
    real_keep = Runner._keep

    def keep(self, *args):
        real_keep(self, *args)
        kept[:] = sorted(self.carry, key=str)

    monkeypatch.setattr(Runner, "_keep", keep)
    # a.weight goes in blocks of 20 rows x 130 (4 members x 2600 float32: 41.6 KB a stack),
    # b.weight in rows of 2049 (32.8 KB a stack), c.bias whole (112 bytes): a budget of 50 KB
    # holds a.weight's first block, then only c.bias.
    _r, part = run(path, 50_000, monkeypatch, 2600)
    assert same_tensors(plain["tensors"], part["tensors"])
    assert kept == [("tv", "a.weight", (0, 20)), ("tv", "c.bias", None)]
    # Those blocks are not read again from the fine-tunes (nor the base: extract alone read it).
    assert part["read"] == plain["read"] - 5 * (20 * 130 + 7) * 4


@pytest.mark.parametrize("merge", [
    "  basis: {op: cluster_basis, inputs: tv, k: 1}\n  merged: {op: sum, inputs: basis}\n",
    "  merged: {op: model_stock, inputs: tv}\n",  # (its pass: one Gram matrix per tensor)
])
def test_steps_after_the_pass_still_read_what_they_need(models, monkeypatch, merge):
    # apply reads the base in the merge pass: only extract's reads are saved.
    path = recipe(models, merge + "  model: {op: apply, base: base, delta: merged, scale: 0.5}\n",
                  out="model", extra=", model_card: false")
    _r, plain = run(path, 0, monkeypatch)
    _r, kept = run(path, 1 << 30, monkeypatch)
    assert same_tensors(plain["tensors"], kept["tensors"])
    assert kept["read"] == plain["read"] - 5 * FLOATS + FLOATS  # (the base, read by apply)


@pytest.mark.parametrize("steps", [
    # dare draws per tensor (not ``independent``): its blocks are not kept.
    ("  dropped: {op: dare, input: tv, density: 0.5}\n"
     "  basis: {op: cluster_basis, inputs: dropped, k: auto}\n"),
    # merge: ties takes whole tensors in the merge pass, the similarity pass row blocks.
    "  basis: {op: cluster_basis, inputs: tv, k: 2, merge: ties}\n",
])
def test_nothing_is_kept_where_the_merge_pass_could_not_take_it(models, monkeypatch, steps):
    path = recipe(models, steps)
    _r, plain = run(path, 0, monkeypatch, 2600)
    _r, kept = run(path, 1 << 30, monkeypatch, 2600)
    assert same_tensors(plain["tensors"], kept["tensors"])
    assert kept["read"] == plain["read"]


def test_a_block_with_a_missing_member_is_not_kept(models):
    runner = Runner(compile_recipe(load_recipe(recipe(models, "", out="tv"))),
                    RunOptions(reuse_memory=1 << 30))
    x = torch.ones(3)
    runner._keep(frozenset({"tv"}), {"tv": {"a": x, "b": None}}, "w", None)
    assert runner.carry == {}
    runner._keep(frozenset({"tv"}), {"tv": {"a": x, "b": x[1:]}}, "w", slice(0, 3))
    # Two views of one storage count once.
    assert list(runner.carry) == [("tv", "w", (0, 3))] and runner.carry_bytes == 12
    assert runner._take_kept(frozenset({"tv"}), "w", slice(0, 3))["tv"]["a"] is x
    assert runner.carry == {} and runner.carry_bytes == 0


def test_the_cli_option_and_its_environment_variable(models, cli, monkeypatch):
    path = recipe(models, "  basis: {op: cluster_basis, inputs: tv, k: 2}\n")
    res = cli.fails(2, "run", path, "--reuse-memory", "lots")
    assert ("Invalid value for '--reuse-memory': invalid size 'lots': write a number of bytes "
            "with an optional unit, such as 4096, 500MB, 2GB or 1.5GiB") in res.stderr
    seen = []
    real = Runner.__init__

    def init(self, compiled, options=None):
        seen.append(options.reuse_memory)
        real(self, compiled, options)

    monkeypatch.setattr(Runner, "__init__", init)
    cli.ok("run", path, "--no-cache", "--reuse-memory", "1.5GiB", "-q")
    cli.ok("run", path, "--no-cache", "--force", "-q")
    monkeypatch.setenv("TVRECIPE_REUSE_MEMORY", "2GB")
    cli.ok("run", path, "--no-cache", "--force", "-q")
    assert seen == [3 << 29, 0, 2_000_000_000]
    monkeypatch.setenv("TVRECIPE_REUSE_MEMORY", "lots")  # the message says where it came from
    res = cli.fails(2, "run", path, "--no-cache", "--force", "-q")
    assert ("Invalid value for '--reuse-memory': invalid size 'lots': write a number of bytes "
            "with an optional unit, such as 4096, 500MB, 2GB or 1.5GiB (from the environment "
            "variable TVRECIPE_REUSE_MEMORY)") in res.stderr
