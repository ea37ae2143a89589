"""DARE streams by rows with the bytes of whole tensors: its keyed random stream gives each row
block the draws of those rows in ``torch.rand(whole shape)``, whatever the block size."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import snapshot
from tvrecipe.exec import runner
from tvrecipe.exec.evaluate import StepEvaluator
from tvrecipe.ops import dare, derive_seed

RECIPE = """\
tvrecipe: 1
settings: {seed: 7}
MODELS
steps:
  tv: {op: extract, base: base, finetuned: [math, code, toxic]}
  dropped: {op: dare, input: tv, density: 0.3}
  merged: {op: sum, inputs: dropped}
  model: {op: apply, base: base, delta: merged}
outputs:
  model: {from: model, path: ./out/model, dtype: float32}
  dropped: {from: dropped, path: ./out/dropped}
"""


def run_with_chunk(cli, tmp_path, chunk: int | None, monkeypatch, name: str) -> dict:
    blocks = []
    real = StepEvaluator.__call__

    def spy(self, step, values, tensor, rows=None):
        if step.name == "dropped":
            blocks.append(rows)
        return real(self, step, values, tensor, rows)

    with monkeypatch.context() as m:
        if chunk is not None:
            m.setattr(runner, "CHUNK_ELEMENTS", chunk)
        m.setattr(StepEvaluator, "__call__", spy)
        cli.ok("run", name, "-q", "--no-cache", "--force")
    return {"files": snapshot(tmp_path / "out"), "blocks": blocks}


def test_row_blocks_of_any_size_give_the_whole_tensor_bytes(make_models, cli, tmp_path,
                                                           monkeypatch):
    ms = make_models(("math", "code", "toxic"))
    cli.write("r.yaml", RECIPE.replace("MODELS\n", ms.models_yaml()))
    whole = run_with_chunk(cli, tmp_path, None, monkeypatch, "r.yaml")
    assert all(rows is None for rows in whole["blocks"])  # tiny tensors come whole
    for chunk in (1, 20, 37):
        blocked = run_with_chunk(cli, tmp_path, chunk, monkeypatch, "r.yaml")
        assert any(rows is not None and rows.start > 0 for rows in blocked["blocks"]), chunk
        assert blocked["files"] == whole["files"], chunk

    # And the bytes are the kernel's on the whole tensor, with the keyed seed.
    dropped = load_file(str(tmp_path / "out" / "dropped" / "code.safetensors"))
    for name, t in dropped.items():
        delta = ms.delta("code")[name]
        want = dare(delta, density=0.3, seed=derive_seed(7, "dropped", "code", name))
        assert torch.equal(t, want), name


def test_l1_rescale_needs_whole_tensors(make_models, cli, tmp_path, monkeypatch):
    ms = make_models(("math", "code", "toxic"))
    cli.write("r.yaml", RECIPE.replace("MODELS\n", ms.models_yaml())
              .replace("density: 0.3}", "density: 0.3, rescale: l1}"))
    run = run_with_chunk(cli, tmp_path, 20, monkeypatch, "r.yaml")
    assert run["blocks"] and all(rows is None for rows in run["blocks"])


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [2, 0, 3, 1], [3, 3, 1]])
def test_uniform_draws_match_the_whole_tensor_in_any_block_order(order):
    shape, rows = (8, 5), 2
    whole = torch.rand(shape, generator=torch.Generator().manual_seed(11), dtype=torch.float32)
    ev = StepEvaluator(0, {}, {})
    asked = []

    def seed() -> int:
        asked.append(11)
        return 11

    starts, at = 0, None
    for b in order:
        got = ev.uniform(("s", "m", "t"), seed, torch.Size((rows, 5)), b * rows * 5)
        assert torch.equal(got, whole[b * rows:(b + 1) * rows]), (order, b)
        starts += at != b * rows * 5
        at = (b + 1) * rows * 5
    # The seed is derived only where the stream (re)starts, not for a block that continues it.
    assert len(asked) == starts == {0: 1, 2: 4, 3: 3}[order[0]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_run_draws_on_cpu_threads_and_writes_the_cpu_bytes(make_models, cli, tmp_path,
                                                                  monkeypatch):
    # On a GPU run the members' draws still run on the CPU math threads (the draws are CPU
    # work), the mask is formed on the GPU, and the bytes are the CPU run's.
    from tvrecipe.ops import parallel

    ms = make_models(("math", "code", "toxic"))
    cli.write("r.yaml", RECIPE.replace("MODELS\n", ms.models_yaml()))
    monkeypatch.setattr(parallel, "PARALLEL_MIN", 1)
    cli.ok("run", "r.yaml", "-q", "--no-cache", "--force", "--device", "cpu")
    on_cpu = snapshot(tmp_path / "out")
    cli.ok("run", "r.yaml", "-q", "--no-cache", "--force", "--device", "cuda")
    assert snapshot(tmp_path / "out") == on_cpu
