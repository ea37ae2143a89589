"""What a GPU run does differently, checked on the CPU (issue #17: a GPU run should find no
untested branch). CUDA divides by a Python number as a product with its reciprocal; random
sketches must come from CPU generators; TF32 and out-of-memory errors are the run's business.
The tests that need a GPU are marked ``gpu`` in their own files."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tvrecipe import ops
from tvrecipe.exec import runner
from tvrecipe.ops import spectral
from tvrecipe.ops.merges import consensus_merge, della, linear, model_stock_merge

ROOT = Path(__file__).resolve().parents[1]

_DIVISIONS = {torch.div, torch.true_divide, torch.Tensor.div, torch.Tensor.div_,
              torch.Tensor.__truediv__, torch.Tensor.__itruediv__, torch.Tensor.true_divide}


class CudaScalarDivision(TorchFunctionMode):
    """Divides by a Python number as CUDA's kernel does: times the reciprocal, rounded in the
    op's float type (BinaryDivTrueKernel.cu, the branch for a CPU scalar divisor)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _DIVISIONS and len(args) == 2 and isinstance(args[1], (int, float))
                and not isinstance(args[1], bool) and kwargs.get("rounding_mode") is None
                and args[0].is_floating_point()):
            x, d = args
            wide = torch.float64 if x.dtype == torch.float64 else torch.float32
            inv = (torch.tensor(1.0, dtype=wide) / torch.tensor(float(d), dtype=wide)).item()
            if func in (torch.Tensor.div_, torch.Tensor.__itruediv__):
                return x.mul_(inv)
            return x * inv
        return func(*args, **kwargs)


def _kernels() -> dict:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, 4096, generator=g) for _ in range(3)]
    one_d = [torch.randn(4096, generator=g) for _ in range(7)]
    return {
        "dare": lambda: ops.dare(xs[0], density=0.3, seed=1),
        "dare bf16": lambda: ops.dare(xs[0].bfloat16(), density=0.3, seed=1),
        "apply": lambda: ops.apply(xs[0], xs[1], scale=0.3),
        "ties": lambda: ops.ties(xs, density=0.2, weights=[1.0, 0.5, 0.7]),
        "della inverse": lambda: della(xs[0], density=0.4, epsilon=0.1, seed=1,
                                       rescale="inverse"),
        "mean": lambda: ops.mean(xs),
        "linear": lambda: linear(xs, weights=[1.0, 1.0, 1.0]),
        "model_stock_merge": lambda: model_stock_merge(xs, t=0.7),
        "consensus none": lambda: consensus_merge(xs, weights=[0.3, 0.3, 0.3],
                                                  majority=None, normalize=True),
        "tsv_merge/iso 1-D mean": lambda: spectral._mean(one_d),
    }


@pytest.mark.parametrize("name", list(_kernels()))
def test_ops_that_promise_device_bytes_never_divide_by_a_python_number(name):
    # Under CUDA's rule for a number divisor the bytes must not move: such ops divide by a
    # 0-dim tensor on the data's device (ops.divide), which CUDA divides by truly. Before
    # that, della, mean, linear and model_stock moved 20-54% of their entries by an ulp.
    fn = _kernels()[name]
    want = fn()
    with CudaScalarDivision():
        got = fn()
    assert torch.equal(want.view(torch.int16 if want.element_size() == 2 else torch.int32)
                       if want.dtype != torch.float64 else want.view(torch.int64),
                       got.view(torch.int16 if got.element_size() == 2 else torch.int32)
                       if got.dtype != torch.float64 else got.view(torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_divide_rounds_as_the_cpu_divides_by_the_number(dtype):
    x = torch.randn(1 << 14, generator=torch.Generator().manual_seed(4)).to(dtype)
    for d in (3, 7, 0.3, 1 / 3, 1e-3):
        assert torch.equal(ops.divide(x, d), x / d), d
        y = x.clone()
        assert ops.divide_(y, d) is y and torch.equal(y, x / d), d


def test_divide_by_a_signed_zero_and_after_inference_mode():
    # The divisors are made once per value (a cache): -0.0 and 0.0 are one key there, so a
    # zero is made each time with its sign; and one made under inference mode must not
    # break a later call that autograd records.
    x = torch.tensor([1.0, -2.0])
    for _ in range(2):
        assert ops.divide(x, 0.0).tolist() == [math.inf, -math.inf]
        assert ops.divide(x, -0.0).tolist() == [-math.inf, math.inf]
    with torch.inference_mode():
        ops.divide(x, 0.7)
    y = torch.ones(3, requires_grad=True)
    ops.divide(y, 0.7).sum().backward()
    assert torch.equal(y.grad, torch.ones(3) / torch.tensor(0.7))


def test_random_sketches_and_draws_come_from_cpu_generators():
    # A CUDA generator draws another stream than the CPU's (Philox against mt19937): a GPU run
    # would sketch, mask or drop other entries. Every generator in the package is a CPU one.
    found = []
    for path in sorted((ROOT / "tvrecipe").rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if "Generator(" in code and "``" not in code:
                found.append((path.relative_to(ROOT).as_posix(), i, code.strip()))
    assert found, "no generator found: the scan is broken"
    wrong = [f for f in found if not re.search(r'Generator\((device="cpu")?\)', f[2])]
    assert not wrong, wrong


@pytest.fixture
def summed(make_models, cli) -> None:
    """r.yaml: the sum of two task vectors, written as a vector."""
    ms = make_models(("math", "code"))
    cli.write("r.yaml", "tvrecipe: 1\n" + ms.models_yaml()
              + "steps:\n  tv: {op: extract, base: base, finetuned: [math, code]}\n"
                "  merged: {op: sum, inputs: tv}\n"
                "outputs:\n  merged: {from: merged, path: ./out/merged}\n")


@pytest.mark.parametrize("command", [("run", "r.yaml", "--no-cache"), ("inspect", "r.yaml", "tv")])
def test_running_out_of_gpu_memory_while_reading_is_a_located_runtime_error(summed, cli,
                                                                            monkeypatch, command):
    # (inspect's was an internal error: it ran outside run_recipe's handling)
    def no_memory(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runner.Runner, "_load", no_memory)
    res = cli.fails(5, *command)
    assert res.err_lines == ["tvrecipe: runtime error:",
                             ("the device ran out of memory while reading the inputs, in a "
                              "whole-model pass or in an inspection; use --device cpu")]
    assert not (cli.root / "out").exists()


@pytest.mark.parametrize("command, kernel", [(("run", "r.yaml", "--no-cache", "-q"), "sum"),
                                             (("inspect", "r.yaml", "tv"), "gram_update")])
def test_a_command_computes_float32_products_in_ieee_whatever_the_caller_set(
        summed, cli, monkeypatch, command, kernel):
    # TF32 ("high") would put float32 matrix products about 1e-3 off on a GPU; a run (and an
    # inspection) sets "highest" for its own time and gives the caller's setting back.
    seen = []
    real = getattr(ops, kernel)

    def spy(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, kernel, spy)
    torch.set_float32_matmul_precision("high")
    try:
        cli.ok(*command)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")
    assert seen and set(seen) == {"highest"}
