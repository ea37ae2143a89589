"""The numpy executor of apply-only reruns: same bytes as the torch executor, used only when
it can be, and the same errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import snapshot
from tvrecipe import ops
from tvrecipe.exec import light
from tvrecipe.plan.tensors import rows_per_block


def _special_f32() -> torch.Tensor:
    """float32 values where rounding to 16 bits is delicate, plus random bit patterns."""
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64)
    rand = bits.to(torch.int32).view(torch.float32)
    rand = rand[~rand.isnan()]
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"),
                             3.3895314e38, -3.3895314e38,  # bf16 max: ties round to inf
                             65504.0, 65519.996, 65520.0, -65520.0,  # f16 max and overflow
                             1e-45, -1e-45, 1.1754942e-38, 6e-8, 5.9604645e-8, 2.9802322e-8])
    # Exact ties for bfloat16 (lower 16 bits 0x8000) with even and odd upper halves, and
    # their neighbours.
    upper = torch.arange(0x3F00, 0x3F10, dtype=torch.int32) << 16
    ties = torch.cat([upper | 0x8000, upper | 0x7FFF, upper | 0x8001]).view(torch.float32)
    return torch.cat([specials, ties, rand])


def test_bfloat16_rounding_is_torchs():
    x = _special_f32()
    want = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = light.to_bfloat16_bits(x.numpy().copy())
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, want)


def test_float16_rounding_and_widening_are_torchs():
    x = _special_f32()
    want = x.to(torch.float16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(light._narrow(x.numpy().copy(), "F16"), want)
    for dt, st in [(torch.bfloat16, "BF16"), (torch.float16, "F16")]:
        stored = x.to(dt)
        stored = stored[~stored.isnan()]
        bits = stored.view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(light._widen(bits, st), stored.float().numpy())


def test_finite_check_sees_nan_and_both_infinities():
    inf, nan = float("inf"), float("nan")
    assert light._finite(np.array([], np.float32))
    assert light._finite(np.array([-3e38, 0.0, 3e38], np.float32))
    for bad in ([1.0, inf], [-inf, 1.0], [1.0, nan, 2.0], [nan]):
        assert not light._finite(np.array(bad, np.float32)), bad


@pytest.mark.parametrize("scale", [1.0, 0.3, -2.5, 1e-3])
def test_numpy_apply_gives_the_bits_of_ops_apply_in_every_out_mode(scale):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4096, generator=g) * torch.logspace(-30, 30, 4096)
    delta = torch.randn(4096, generator=g) * torch.logspace(30, -30, 4096)
    want = ops.apply(base, delta, scale=scale)
    # The fused multiply-add (torch.add(..., alpha=)) differs from two roundings somewhere here,
    # so this test would notice the kernel going back to it.
    if scale != 1.0:
        assert not torch.equal(torch.add(base, delta, alpha=scale), want)
    for out in ("delta", "base"):
        b, d = base.clone(), delta.clone()
        got = ops.apply(b, d, scale=scale, out=b if out == "base" else d)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    res = np.multiply(delta.numpy(), np.float32(scale))
    res += base.numpy()
    np.testing.assert_array_equal(res.view(np.uint32), want.view(torch.int32).numpy().view(np.uint32))


RECIPE = """\
tvrecipe: 1
models:
  base: ./ckpt/base
  other: ./ckpt/other
  a: ./ckpt/math
  b: ./ckpt/code
steps:
  tv: {{op: extract, base: base, finetuned: [a, b]}}
  merged: {{op: sum, inputs: tv, weights: 0.7}}
  model: {{op: apply, base: {base}, delta: merged, scale: {scale}}}
outputs:
  model: {{from: model, path: ./out{dtype}}}
"""


def _recipe(cli, scale, base="base", dtype=None, shard=None):
    extra = (f", dtype: {dtype}" if dtype else "") + (f", shard_size: {shard}" if shard else "")
    return cli.write("r.yaml", RECIPE.format(scale=scale, base=base, dtype=extra))


class Spy(list):
    """The runs the numpy executor carried out (did not return None for); ``started`` counts
    every run it began, whatever the outcome."""

    started = 0


@pytest.fixture
def spy(monkeypatch):
    done = Spy()
    real = light._LightRun.run

    def run(self):
        done.started += 1
        result = real(self)
        if result is not None:
            done.append(result)
        return result

    monkeypatch.setattr(light._LightRun, "run", run)
    return done


@pytest.mark.parametrize("stored, out_dtype, shard", [
    (torch.bfloat16, None, None), (torch.float16, None, None), (torch.float32, None, "1KB"),
    (torch.bfloat16, "float16", "600B"), (torch.float32, "bfloat16", None),
    (torch.float16, "float32", None)])
@pytest.mark.filterwarnings("error")  # a numpy overflow warning would fail the run
def test_rerun_in_numpy_writes_the_bytes_of_the_torch_executor(
        cli, make_models, spy, monkeypatch, stored, out_dtype, shard):
    ms = make_models(("math", "code"), dtype=stored, scale=2.0)
    ms.weights["other"] = ms.weights["base"]
    import shutil
    shutil.copytree(ms.path("base"), ms.path("other"))
    # Row blocks of 7 elements: tensors are read, computed and written in many pieces.
    monkeypatch.setattr(light, "rows_per_block", lambda shape: rows_per_block(shape, 7))
    recipe = _recipe(cli, 1.0, dtype=out_dtype, shard=shard)
    cli.ok("run", recipe, "-q")
    assert spy == []  # cold: nothing cached yet, torch computes and fills the cache
    if shard:
        assert (cli.root / "out" / "model.safetensors.index.json").is_file()
    for scale in (0.35, -1.7):
        recipe = _recipe(cli, scale, dtype=out_dtype, shard=shard)
        res = cli.ok("run", recipe, "--force")
        assert "from cache: merged" in res.stdout and "on cpu" in res.stdout
        assert res.stderr == ""
        assert len(spy) == 1
        spy.clear()
        light_out = snapshot(cli.root / "out")
        cli.ok("run", recipe, "--force", "--no-cache", "-q")
        assert spy == []
        assert snapshot(cli.root / "out") == light_out  # weights, index, config, every byte
        cli.ok("verify", recipe)
    # 3e38: the scaled delta overflows float32 in places. Both executors refuse it alike
    # (they wrote ±inf before), and the last output stays as it was.
    recipe = _recipe(cli, 3e38, dtype=out_dtype, shard=shard)
    started = spy.started
    cached = cli.fails(5, "run", recipe, "--force")
    assert spy.started == started + 1 and spy == []  # the numpy executor began, and refused
    fresh = cli.fails(5, "run", recipe, "--force", "--no-cache")
    assert cached.err_lines == fresh.err_lines
    assert fresh.err_lines[1].endswith("holds Inf or NaN though every input was finite: check "
                                       "the weights and scales of the steps before it, or pass "
                                       "--allow-nonfinite to write it anyway")
    assert snapshot(cli.root / "out") == light_out


@pytest.mark.filterwarnings("error")
def test_not_used_where_it_does_not_apply(cli, make_models, spy):
    make_models(("math", "code"), dtype=torch.bfloat16)
    import shutil
    shutil.copytree(cli.root / "ckpt" / "base", cli.root / "ckpt" / "other")
    cli.ok("run", _recipe(cli, 1.0), "-q")
    recipe = _recipe(cli, 0.5)
    cli.ok("run", recipe, "--force", "--no-cache", "-q")
    cli.ok("run", recipe, "--force", "--allow-nonfinite", "-q")  # entry was made without it
    assert spy == []
    cli.ok("run", _recipe(cli, 0.0), "--force", "-q")  # 0 × an infinite delta would be NaN
    cli.fails(5, "run", _recipe(cli, 1e39), "--force", "-q")  # no float32 scale: inf
    assert spy == []
    cli.ok("run", _recipe(cli, 0.25), "--force", "-q")
    assert len(spy) == 1
    # The whole-run conditions, without running anything.
    from tvrecipe.exec.results import RunOptions
    from tvrecipe.plan.graph import load_and_compile
    compiled = load_and_compile(str(recipe))
    keys = {"merged": "sum-x", "tv": "extract-x", "model": "apply-x"}
    from tvrecipe.store.cache import TensorCache
    cache = TensorCache(cli.root / "c")
    assert light._applies(compiled, RunOptions(cache=cache, keys=keys)) is not None
    assert light._applies(compiled, RunOptions(cache=None, keys=keys)) is None
    assert light._applies(compiled, RunOptions(cache=cache, keys=keys, device="cuda")) is None
    assert light._applies(compiled, RunOptions(cache=cache, keys=keys,
                                               allow_nonfinite=True)) is None
    assert light._applies(compiled, RunOptions(cache=cache, keys=keys,
                                               targets={"model": cli.root / "x"})) is None
    # A key that is missing from the cache: None, and the torch executor runs.
    assert light.run_light(compiled, RunOptions(cache=cache, keys=keys)) is None


def test_a_recipe_that_outputs_the_delta_or_computes_more_runs_in_torch(cli, make_models, spy):
    make_models(("math", "code"))
    text = RECIPE.format(scale=1.0, base="base", dtype="").replace("  other: ./ckpt/other\n", "")
    cli.write("r.yaml", text + "  tv_out: {from: merged, path: ./delta}\n")
    cli.ok("run", "r.yaml", "-q")
    cli.write("r.yaml", text.replace("scale: 1.0", "scale: 0.5")
              + "  tv_out: {from: merged, path: ./delta}\n")
    cli.ok("run", "r.yaml", "--force", "-q")
    assert spy == []  # a vector output: not this executor's
    cli.write("r.yaml", text.replace("weights: 0.7", "weights: 0.6"))
    cli.ok("run", "r.yaml", "--force", "-q")
    assert spy == []  # the sum changed: it must be computed


def test_nan_in_the_base_is_the_same_error(cli, make_models, spy):
    ms = make_models(("math", "code"))
    bad = {k: v.clone() for k, v in ms.weights["base"].items()}
    bad["lm_head.weight"][3, 1] = float("nan")
    from tests.conftest import save_model
    save_model(ms.path("other"), bad)
    cli.ok("run", _recipe(cli, 1.0), "-q")  # fills the cache with `merged` (from base)
    recipe = _recipe(cli, 0.5, base="other")  # same `merged`, a base with a NaN
    before, kept = spy.started, snapshot(cli.root / "out")
    light_res = cli.fails(3, "run", recipe, "--force")
    assert spy.started == before + 1 and spy == []  # the numpy executor met the NaN, raised
    assert snapshot(cli.root / "out") == kept  # the previous output, untouched
    torch_res = cli.fails(3, "run", recipe, "--force", "--no-cache")
    assert spy.started == before + 1
    assert light_res.stderr == torch_res.stderr
    assert "model 'other': tensor 'lm_head.weight' contains NaN or Inf" in light_res.stderr


def test_a_corrupt_entry_falls_back_to_torch_which_recomputes_it(cli, make_models, spy):
    make_models(("math", "code"), dtype=torch.bfloat16)
    import shutil
    shutil.copytree(cli.root / "ckpt" / "base", cli.root / "ckpt" / "other")
    cli.ok("run", _recipe(cli, 1.0), "-q")
    (entry,) = (cli.root / ".tvrecipe" / "cache").glob("*/*.safetensors")
    data = bytearray(entry.read_bytes())
    data[-5] ^= 0x01
    entry.write_bytes(bytes(data))
    recipe = _recipe(cli, 0.5)
    res = cli.ok("run", recipe, "--force")
    assert spy == []
    assert "does not match its checksum); recomputing it" in res.stderr
    assert "from cache" not in res.stdout
    got = snapshot(cli.root / "out")
    cli.ok("run", recipe, "--force", "--no-cache", "-q")
    assert snapshot(cli.root / "out") == got
    cli.ok("run", _recipe(cli, 0.25), "--force", "-q")
    assert len(spy) == 1  # the entry was written again, sound


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_gives_the_same_bits_on_the_gpu():
    # Why a rerun on a GPU machine (device: auto) may apply in numpy on the CPU: the two
    # roundings of ops.apply are IEEE operations on every device.
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1 << 16, generator=g) * torch.logspace(-30, 30, 1 << 16)
    delta = torch.randn(1 << 16, generator=g) * torch.logspace(30, -30, 1 << 16)
    for scale in (0.3, -2.5):
        cpu = ops.apply(base, delta, scale=scale)
        gpu = ops.apply(base.cuda(), delta.cuda(), scale=scale).cpu()
        assert torch.equal(cpu.view(torch.int32), gpu.view(torch.int32))
        assert torch.equal(cpu.to(torch.bfloat16).view(torch.int16),
                           gpu.cuda().to(torch.bfloat16).cpu().view(torch.int16))


def test_a_rerun_that_only_applies_never_imports_torch(cli, make_models):
    import subprocess
    import sys

    make_models(("math", "code"), dtype=torch.bfloat16)
    import shutil
    shutil.copytree(cli.root / "ckpt" / "base", cli.root / "ckpt" / "other")
    cli.ok("run", _recipe(cli, 1.0), "-q")
    _recipe(cli, 0.5)
    code = ("import sys; from tvrecipe.cli import main; "
            "main(sys.argv[1:], standalone_mode=False); print('torch' in sys.modules)")

    def torch_imported(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-c", code, "run", "r.yaml", "--force", "-q",
                               *args], cwd=cli.root, capture_output=True, text=True, check=True)
        return proc.stdout.strip()

    assert torch_imported() == "False"
    assert torch_imported("--no-cache") == "True"  # the torch executor, for comparison


@pytest.mark.parametrize("other_dtype, int_dtype, runs_in_numpy", [
    (torch.float16, torch.int64, True),    # another float dtype it reads: fine
    (torch.float64, torch.int64, False),   # a float dtype it does not read
    (torch.float32, torch.int32, False),   # an integer tensor torch would cast: not copied
])
def test_a_base_stored_unlike_the_reference_model(cli, make_models, spy, other_dtype, int_dtype,
                                                  runs_in_numpy):
    # The output takes the first model's dtypes; the apply's base here is another model.
    from tests.conftest import INT_BUFFER, save_model
    ms = make_models(("math", "code"))
    other = {k: v.clone() for k, v in ms.weights["base"].items()}
    other[INT_BUFFER] = other[INT_BUFFER].to(int_dtype)
    save_model(ms.path("other"), other, other_dtype)
    cli.ok("run", _recipe(cli, 1.0), "-q")
    recipe = _recipe(cli, 0.5, base="other")
    cli.ok("run", recipe, "--force", "-q")
    assert len(spy) == int(runs_in_numpy)
    got = snapshot(cli.root / "out")
    cli.ok("run", recipe, "--force", "--no-cache", "-q")
    assert snapshot(cli.root / "out") == got


TWO = """\
tvrecipe: 1
models: {base: ./ckpt/base, a: ./ckpt/math, b: ./ckpt/code, x: ./ckpt/x, y: ./ckpt/y}
steps:
  tv: {op: extract, base: base, finetuned: [a, b]}
  d1: {op: sum, inputs: tv, weights: 0.5}
  d2: {op: ties, inputs: tv, density: 0.5}
  my: {op: apply, base: BASE_Y, delta: d1, scale: SCALE}
  mx: {op: apply, base: BASE_X, delta: d2, scale: SCALE}
outputs: {oy: {from: my, path: ./out/oy}, ox: {from: mx, path: ./out/ox}}
"""


def test_two_applies_read_and_report_in_the_torch_executors_order(cli, make_models, spy,
                                                                     monkeypatch):
    from tests.conftest import save_model
    ms = make_models(("math", "code"))
    for name in ("x", "y"):
        save_model(ms.path(name), ms.weights["base"])
    recipe = cli.write("r.yaml", TWO.replace("BASE_Y", "y").replace("BASE_X", "x")
                       .replace("SCALE", "1.0"))
    cli.ok("run", recipe, "-q")
    recipe = cli.write("r.yaml", TWO.replace("BASE_Y", "y").replace("BASE_X", "x")
                       .replace("SCALE", "0.5"))

    def lines(res):
        return [ln for ln in res.stdout.splitlines() if not ln.startswith("done in")]

    numpy_run = cli.ok("run", recipe, "--force")
    assert len(spy) == 1
    got = snapshot(cli.root / "out")
    real = light.run_light
    monkeypatch.setattr(light, "run_light", lambda *a: None)  # the torch executor, cached
    torch_run = cli.ok("run", recipe, "--force")
    assert len(spy) == 1
    assert "from cache: d2, d1" in torch_run.stdout  # the last output's delta first
    assert lines(numpy_run) == lines(torch_run)
    assert snapshot(cli.root / "out") == got
    # Both bases hold a NaN in one tensor: both executors name the model met first (x, the
    # first in the recipe's models), whichever output uses it.
    bad = {k: v.clone() for k, v in ms.weights["base"].items()}
    bad["lm_head.weight"][0, 0] = float("nan")
    save_model(ms.path("x"), bad)
    save_model(ms.path("y"), bad)
    monkeypatch.setattr(light, "run_light", real)
    started = spy.started
    numpy_err = cli.fails(3, "run", recipe, "--force")
    assert spy.started == started + 1  # the cached deltas still serve: numpy met the NaN
    torch_err = cli.fails(3, "run", recipe, "--force", "--no-cache")
    assert numpy_err.stderr == torch_err.stderr
    assert "model 'x': tensor 'lm_head.weight' contains NaN or Inf" in numpy_err.stderr
