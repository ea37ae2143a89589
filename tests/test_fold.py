"""Folding ops (`tsv_merge`, `iso`) take their task vectors one at a time: the kernels on
deferred members (ops/deferred.py) give the bytes they give on ready tensors, never hold two
made task vectors at once where a task is taken alone, and the runner reads the fine-tuned
models of an `extract` that only folding ops read when the op asks for them."""

from __future__ import annotations

import math
import weakref

import numpy as np
import pytest
import torch

from tests.conftest import FLOATING, MATRICES, read_tensors
from tests.test_spectral import _decaying, polar, tsv_reference
from tvrecipe.exec import runner as runner_mod
from tvrecipe.ops import spectral
from tvrecipe.ops.deferred import Deferred, made

KERNELS = {
    "tsv_merge": lambda xs: spectral.tsv_merge(xs),
    "tsv_merge half": lambda xs: spectral.tsv_merge(xs, fraction=0.5),
    "iso c": lambda xs: spectral.iso(xs, variant="c"),
    "iso cts": lambda xs: spectral.iso(xs, variant="cts"),
}


class Tracked:
    """Deferred task vectors that record how often each is made and how many made ones
    are still alive (not yet freed) whenever another is made."""

    def __init__(self, xs: list[torch.Tensor]):
        self.xs = xs
        self.calls = [0] * len(xs)
        self.alive_at_make: list[int] = []
        self._made: list[weakref.ref] = []

    def deferred(self) -> list[Deferred]:
        return [Deferred(lambda i=i: self._make(i), x.shape, x.dtype, x.device)
                for i, x in enumerate(self.xs)]

    def _make(self, i: int) -> torch.Tensor:
        self.alive_at_make.append(sum(r() is not None for r in self._made))
        self.calls[i] += 1
        t = self.xs[i].clone()
        self._made.append(weakref.ref(t))
        return t


def _tasks(shape: tuple[int, int], n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("alone", [False, True])
@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (24, 24)])
@pytest.mark.parametrize("name", list(KERNELS))
def test_deferred_members_give_the_bytes_of_ready_ones(monkeypatch, name, shape, alone):
    if alone:  # every task vector counts as large: taken one after another
        monkeypatch.setattr(spectral, "ALONE_BYTES", 1)
    monkeypatch.setattr(spectral, "SPECTRUM_BLOCK", 64)  # several blocks per matrix
    xs = _tasks(shape)
    fn = KERNELS[name]
    want = fn(xs)
    tracked = Tracked(xs)
    got = fn(tracked.deferred())
    assert torch.equal(got, want)
    # the ready inputs are left as they were (the kernels write only into what they made)
    assert all(torch.equal(x, y) for x, y in zip(xs, _tasks(shape)))
    passes = 2 if name == "iso cts" else 1
    assert tracked.calls == [passes] * len(xs)


@pytest.mark.parametrize("name", list(KERNELS))
def test_a_task_taken_alone_is_dropped_before_the_next_is_made(monkeypatch, name):
    monkeypatch.setattr(spectral, "ALONE_BYTES", 1)
    tracked = Tracked(_tasks((40, 16), n=5))
    KERNELS[name](tracked.deferred())
    n = len(tracked.xs)
    if name.startswith("iso"):
        # Σ_t Δ_t is summed into the first one made, which stays while the rest come
        assert tracked.alive_at_make[:n] == [0] + [1] * (n - 1)
        assert tracked.alive_at_make[n:] == [0] * (len(tracked.alive_at_make) - n)
    else:
        assert tracked.alive_at_make == [0] * n


@pytest.mark.parametrize("shape", [(240, 200), (200, 240)])
def test_spectra_summed_over_blocks_match_the_exact_formulas(monkeypatch, shape):
    """The Gram matrices summed over float64 blocks (here 64 entries, so a line or two per
    block), the other side's vectors made block by block, Iso-C applied by blocks and the
    polar factors written by row blocks: TSV-M and Iso-C as the float64 references."""
    monkeypatch.setattr(spectral, "SPECTRUM_BLOCK", 64)
    xs = [_decaying(*shape, seed) for seed in range(8)]  # (k = r/8: σ_k well above the
    # rounding floor of a Gram matrix, as in test_spectral)
    want = tsv_reference([x.numpy() for x in xs], 1.0)
    got = spectral.tsv_merge(xs).numpy()
    # (seen: 6e-10 of the largest entry here, 1.2e-9 with the CUDA build's BLAS on 16 cores)
    assert np.abs(got - want).max() <= 1e-8 * np.abs(want).max()
    total = sum(xs)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    want_c = ((u * s.mean()) @ vh).numpy()
    got_c = spectral.iso(xs, variant="c").numpy()
    assert np.abs(got_c - want_c).max() <= 1e-7 * np.abs(want_c).max()
    # the polar factor (of a well-conditioned stack, as the merges have), into its argument
    a = torch.randn(max(shape), 60, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    want_p = polar(a.numpy())
    assert spectral.polar_(a).data_ptr() == a.data_ptr()
    assert np.abs(a.numpy() - want_p).max() <= 1e-12


def test_a_task_that_keeps_fewer_directions_still_stacks_right(monkeypatch):
    # An exact-zero task keeps no direction: its columns of the stack stay unused, and the
    # others' parts are put together (TSV-M of the two nonzero tasks, each keeping k).
    monkeypatch.setattr(spectral, "ALONE_BYTES", 1)
    xs = _tasks((30, 12), n=3, seed=4)
    xs[1] = torch.zeros(30, 12)
    k = 12 // 3
    parts = [np.linalg.svd(x.double().numpy(), full_matrices=False) for x in (xs[0], xs[2])]
    u = np.concatenate([p[0][:, :k] for p in parts], 1)
    s = np.concatenate([p[1][:k] for p in parts])
    v = np.concatenate([p[2][:k].T for p in parts], 1)
    want = polar(u) @ np.diag(s) @ polar(v).T
    got = spectral.tsv_merge(Tracked(xs).deferred()).double().numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_deferred_describes_its_tensor():
    d = Deferred(lambda: torch.ones(3, 4), (3, 4), torch.float32, torch.device("cpu"))
    assert (d.dim(), d.numel(), tuple(d.shape)) == (2, 12, (3, 4))
    assert torch.equal(made(d), torch.ones(3, 4))
    twice = d.then(lambda t: t.mul_(2))
    assert torch.equal(twice(), torch.full((3, 4), 2.0))
    assert repr(d) == "Deferred((3, 4), torch.float32, cpu)"
    t = torch.zeros(2)
    assert made(t) is t


# ---- the runner ------------------------------------------------------------------------------

def _recipe(ms, step: str, extra_out: str = "") -> str:
    return ("tvrecipe: 1\n" + ms.models_yaml() + "steps:\n"
            "  tv: {op: extract, base: base, finetuned: [a, b, c]}\n"
            f"  merged: {step}\n"
            "  model: {op: apply, base: base, delta: merged}\n"
            "outputs:\n  m: {from: model, path: ./out/m}\n" + extra_out)


class Reads:
    """Which (model, tensor) the runner read when a folding op asked (Runner._read_later)."""

    def __init__(self, monkeypatch):
        self.later: list[tuple[str, str]] = []
        real = runner_mod.Runner._read_later

        def spy(runner, name, tensor, span):
            self.later.append((name, tensor))
            return real(runner, name, tensor, span)

        monkeypatch.setattr(runner_mod.Runner, "_read_later", spy)


@pytest.mark.parametrize("step", ["{op: tsv_merge, inputs: tv}",
                                  "{op: iso, inputs: tv, variant: c}",
                                  "{op: iso, inputs: tv, variant: cts, common: 0.25}"])
def test_fine_tunes_are_read_when_the_op_asks_and_give_the_same_bytes(
        make_models, cli, tmp_path, monkeypatch, step):
    ms = make_models(("a", "b", "c"))
    cli.write("r.yaml", _recipe(ms, step))
    reads = Reads(monkeypatch)
    cli.ok("run", "r.yaml", "-q", "--no-cache")
    deferred = read_tensors(tmp_path / "out" / "m")
    # every floating tensor of every fine-tune, when the op asked; Iso-CTS reads each
    # matrix's fine-tunes a second time for its residuals; the base never
    passes = {t: 2 if "cts" in step and t in MATRICES else 1 for t in FLOATING}
    want = sorted((m, t) for t in FLOATING for m in "abc" for _ in range(passes[t]))
    assert sorted(reads.later) == want
    # the same run with every model read up front: the same bytes
    monkeypatch.setattr(runner_mod.Runner, "_deferred", lambda *a: set())
    reads.later.clear()
    cli.ok("run", "r.yaml", "-q", "--no-cache", "--force")
    assert reads.later == []
    ready = read_tensors(tmp_path / "out" / "m")
    assert deferred.keys() == ready.keys()
    assert all(torch.equal(deferred[k], ready[k]) for k in ready)


@pytest.mark.parametrize("case", ["extract is an output", "a non-folding reader",
                                  "the fine-tune is read twice"])
def test_nothing_is_deferred_where_something_else_reads_the_task_vectors(
        make_models, cli, tmp_path, monkeypatch, case):
    ms = make_models(("a", "b", "c"))
    recipe = _recipe(ms, "{op: tsv_merge, inputs: tv}")
    if case == "extract is an output":
        recipe += "  tv: {from: tv, path: ./out/tv}\n"
    elif case == "a non-folding reader":
        recipe = recipe.replace("outputs:", "  s: {op: sum, inputs: tv}\noutputs:")
        recipe += "  s: {from: s, path: ./out/s}\n"
    else:  # model a also feeds apply's base of a second model
        recipe = recipe.replace("outputs:", "  m2: {op: apply, base: a, delta: merged}\n"
                                "outputs:")
        recipe += "  m2: {from: m2, path: ./out/m2}\n"
    cli.write("r.yaml", recipe)
    reads = Reads(monkeypatch)
    cli.ok("run", "r.yaml", "-q", "--no-cache")
    if case == "the fine-tune is read twice":  # only a is read up front
        assert {m for m, _t in reads.later} == {"b", "c"}
    else:
        assert reads.later == []


@pytest.mark.parametrize("model, dtype, step", [
    ("b", torch.float32, "{op: tsv_merge, inputs: tv}"),  # a deferred fine-tune
    ("base", torch.bfloat16, "{op: iso, inputs: tv, variant: c}"),  # a base kept as stored
])
def test_a_nan_read_in_a_fold_stream_names_the_model_and_tensor(make_models, cli, tmp_path,
                                                               model, dtype, step):
    from safetensors.torch import load_file, save_file

    ms = make_models(("a", "b", "c"), dtype=dtype)
    for f in ms.path(model).glob("*.safetensors"):
        tensors = load_file(str(f))
        if "lm_head.weight" in tensors:
            tensors["lm_head.weight"][3, 2] = float("nan")
            save_file(tensors, str(f))
    cli.write("r.yaml", _recipe(ms, step))
    res = cli.fails(3, "run", "r.yaml")
    # the message of a model read up front and widened (tests/test_cli_errors.py)
    assert res.err_lines[1] == (f"model {model!r}: tensor 'lm_head.weight' contains NaN or "
                                "Inf; fix the checkpoint, or pass --allow-nonfinite to merge "
                                "it anyway")
    assert not (tmp_path / "out").exists()


def test_trim_gives_memory_back_where_malloc_is_glibcs():
    import platform

    from tvrecipe.exec.allocator import trim

    assert trim() is (platform.libc_ver()[0] == "glibc")


def test_iso_c_in_float32_keeps_the_accuracy_of_its_float32_sum():
    # Three rank-8 task vectors plus the faint dense noise of a full fine-tune: Δ_TA is full
    # rank with κ ≈ 5e5, and Iso-C lifts its weakest directions to σ̄. Products in float32
    # with diag(σ̄/σ) folded in were off by 2.4e-2 of the result's scale (review of b40e283);
    # float64 blocks give 7e-6, as U made in float64 did before.
    g = torch.Generator().manual_seed(1)
    for m, n in [(1024, 512), (512, 1024)]:
        xs = [(torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)) * 0.01
              + 1e-6 * torch.randn(m, n, generator=g) for _ in range(3)]
        total = xs[0].clone()
        for x in xs[1:]:
            total.add_(x)
        u, s, vh = torch.linalg.svd(total.double(), full_matrices=False)
        assert s[0] / s[-1] > 1e5
        want = (u * s.mean()) @ vh
        got = spectral.iso(xs, variant="c").double()
        assert float((got - want).abs().max()) <= 5e-5 * float(want.abs().max())


@pytest.mark.parametrize("step", ["{op: tsv_merge, inputs: tv}",
                                  "{op: iso, inputs: tv, variant: cts, common: 0.25}"])
def test_deferred_task_vectors_on_the_math_threads(make_models, cli, tmp_path, monkeypatch,
                                                   step):
    # Every tensor large enough for the math threads: each worker reads the task vectors it
    # takes; the bytes are those of a run that reads every model up front.
    import threading

    from tvrecipe.ops import parallel

    monkeypatch.setattr(parallel, "PARALLEL_MIN", 1)
    monkeypatch.setattr(parallel, "cores", lambda: 4)
    ms = make_models(("a", "b", "c", "d"))
    cli.write("r.yaml", _recipe(ms, step).replace("[a, b, c]", "[a, b, c, d]"))
    threads = set()
    real = runner_mod.Runner._read_later

    def spy(runner, *args):
        threads.add(threading.current_thread().name)
        return real(runner, *args)

    monkeypatch.setattr(runner_mod.Runner, "_read_later", spy)
    # (on the CPU: what this tests is the CPU's way; `auto` would take a GPU)
    cli.ok("run", "r.yaml", "-q", "--device", "cpu", "--no-cache")
    got = read_tensors(tmp_path / "out" / "m")
    assert any(t.startswith("tvrecipe-math") for t in threads), threads
    monkeypatch.setattr(runner_mod.Runner, "_deferred", lambda *a: set())
    cli.ok("run", "r.yaml", "-q", "--device", "cpu", "--no-cache", "--force")
    want = read_tensors(tmp_path / "out" / "m")
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


@pytest.mark.parametrize("inputs", ["[a1, tv]", "[tv, a1]"])
@pytest.mark.parametrize("op", ["tsv_merge", "iso"])
def test_a_lora_adapter_beside_deferred_task_vectors(cli, tmp_path, monkeypatch, op, inputs):
    # An adapter that does not cover a tensor is an exact zero there (None): beside deferred
    # task vectors it must still come as zeros (it made the merged tensor all zeros, or an
    # internal error, before: review of b40e283). Same bytes as with every model read first.
    lora = pytest.importorskip("tests.test_lora")  # (skips without peft and transformers)
    from safetensors.torch import load_file, save_file

    lora.make_adapter(tmp_path, "a1", lora.llama, seed=1, **lora.CASES["plain"])
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    for j in (1, 2):
        gen = torch.Generator().manual_seed(10 + j)
        (tmp_path / f"ft{j}").mkdir()
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()},
                  str(tmp_path / f"ft{j}" / "model.safetensors"))
    cli.write("r.yaml", "tvrecipe: 1\nmodels:\n  base: ./base\n  ft1: ./ft1\n  ft2: ./ft2\n"
              "  a1: {path: ./a1, kind: lora}\nsteps:\n"
              "  tv: {op: extract, base: base, finetuned: [ft1, ft2]}\n"
              f"  merged: {{op: {op}, inputs: {inputs}}}\n"
              "outputs:\n  m: {from: merged, path: ./out/m}\n")
    reads = Reads(monkeypatch)
    cli.ok("run", "r.yaml", "-q", "--no-cache")
    assert reads.later  # (the task vectors were deferred)
    deferred = read_tensors(tmp_path / "out" / "m")
    monkeypatch.setattr(runner_mod.Runner, "_deferred", lambda *a: set())
    cli.ok("run", "r.yaml", "-q", "--no-cache", "--force")
    ready = read_tensors(tmp_path / "out" / "m")
    assert [k for k in ready if not torch.equal(deferred[k], ready[k])] == []
    uncovered = "model.layers.0.self_attn.k_proj.weight"  # (the adapter covers q, v, down)
    assert float(ready[uncovered].abs().max()) > 0


@pytest.mark.parametrize("n_cores", [1, 2, 3])
@pytest.mark.parametrize("step", ["{op: tsv_merge, inputs: tv}",
                                  "{op: iso, inputs: tv, variant: c}",
                                  "{op: iso, inputs: tv, variant: cts, common: 0.25}"])
def test_a_fold_stream_takes_small_tensors_side_by_side_with_the_same_bytes(
        make_models, cli, tmp_path, monkeypatch, step, n_cores):
    """Runner._lanes: for Iso-C (one eigendecomposition per tensor, on one thread) the next
    small tensors, up to two per core, are evaluated each on a thread of its own beside this
    one; TSV-M and Iso-CTS spread their tasks over the cores and take one at a time. The
    outputs are those of one tensor at a time."""
    import threading

    monkeypatch.setattr(runner_mod, "cores", lambda: n_cores)
    ms = make_models(("a", "b", "c"))
    cli.write("r.yaml", _recipe(ms, step))
    threads: list[str] = []
    real = runner_mod.StepEvaluator.__call__

    evaluators: set[int] = set()

    def spy(self, step, *args, **kwargs):
        if step.spec.folds:
            threads.append(threading.current_thread().name)
            if threads[-1].startswith("tvrecipe-side"):
                evaluators.add(id(self))
                assert torch.get_num_threads() == 1
        return real(self, step, *args, **kwargs)

    def beside() -> list[str]:
        return [t for t in threads if t.startswith("tvrecipe-side")]

    monkeypatch.setattr(runner_mod.StepEvaluator, "__call__", spy)
    # (on the CPU: what this tests is the CPU's way; `auto` would take a GPU)
    cli.ok("run", "r.yaml", "-q", "--device", "cpu", "--no-cache")
    side = read_tensors(tmp_path / "out" / "m")
    assert len(threads) == len(side) == 8  # (one call of the fold step per tensor)
    assert any(not t.startswith("tvrecipe-side") for t in threads), threads
    # Iso-C: the 8 tensors in batches of two per core, all but the first of each beside it,
    # each with an evaluator of its own (one per lane)
    lanes = 2 * n_cores
    if "variant: c}" in step:
        assert len(beside()) == 8 - math.ceil(8 / lanes), threads
        assert len(evaluators) == min(lanes, 8) - 1
    else:
        assert beside() == [], threads
    # one tensor at a time (each over PAIR_BYTES), or two (all over BATCH_BYTES): the same
    # bytes
    for name, pairs in (("PAIR_BYTES", 0), ("BATCH_BYTES", 4)):
        with monkeypatch.context() as m:
            m.setattr(runner_mod, name, 0)
            threads.clear()
            cli.ok("run", "r.yaml", "-q", "--device", "cpu", "--no-cache", "--force")
            assert len(threads) == 8
            assert len(beside()) == (pairs if "variant: c}" in step else 0), threads
            alone = read_tensors(tmp_path / "out" / "m")
            assert side.keys() == alone.keys()
            assert all(torch.equal(side[k], alone[k]) for k in alone)


def test_no_tensors_side_by_side_beside_an_op_that_keeps_state_between_tensors(
        make_models, cli, tmp_path, monkeypatch):
    """A step that writes a report or keeps state per tensor (decompose, DARE's streams, ...)
    keeps its stream one tensor at a time."""
    import threading

    monkeypatch.setattr(runner_mod, "cores", lambda: 4)
    ms = make_models(("a", "b", "c"))
    recipe = _recipe(ms, "{op: iso, inputs: tv, variant: c}").replace(
        "outputs:", "  tv2: {op: extract, base: base, finetuned: [a, b]}\n"
        "  parts: {op: decompose, inputs: tv2, rank: 2}\n"
        "  u: {op: sum, inputs: parts.unique}\noutputs:")
    cli.write("r.yaml", recipe + "  u: {from: u, path: ./out/u}\n")
    threads: list[str] = []
    real = runner_mod.StepEvaluator.__call__

    def spy(self, step, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(runner_mod.StepEvaluator, "__call__", spy)
    cli.ok("run", "r.yaml", "-q", "--device", "cpu", "--no-cache")
    assert threads and not any(t.startswith("tvrecipe-side") for t in threads)


# ---- a base read as stored (16-bit) in a fold stream -------------------------------------------

class Bases:
    """The dtypes of the bases ``extract`` and ``apply`` got."""

    def __init__(self, monkeypatch):
        from tvrecipe import ops
        self.dtypes: set[tuple[str, torch.dtype]] = set()
        for name in ("extract", "apply"):
            real = getattr(ops, name)

            def spy(base, *args, real=real, name=name, **kwargs):
                self.dtypes.add((name, base.dtype))
                return real(base, *args, **kwargs)

            monkeypatch.setattr(ops, name, spy)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("step", ["{op: tsv_merge, inputs: tv}",
                                  "{op: iso, inputs: tv, variant: c}",
                                  "{op: iso, inputs: tv, variant: cts, common: 0.25}"])
def test_a_16_bit_base_is_kept_as_stored_with_the_same_bytes(
        make_models, cli, tmp_path, monkeypatch, step, dtype):
    # Where only extract and apply read the base (StepSpec.stored), a CPU fold stream keeps
    # it as stored and they widen it piece by piece (several pieces per tensor here): the
    # bytes of a run that widens it whole, and a NaN in it is still found and named.
    from tvrecipe.ops import arithmetic
    monkeypatch.setattr(arithmetic, "WIDEN_PIECE", 7)
    ms = make_models(("a", "b", "c"), dtype=dtype)
    cli.write("r.yaml", _recipe(ms, step))
    bases = Bases(monkeypatch)
    # (on the CPU: what this tests is the CPU's way; `auto` would take a GPU)
    cli.ok("run", "r.yaml", "-q", "--device", "cpu", "--no-cache")
    assert bases.dtypes == {("extract", dtype), ("apply", dtype)}
    stored = read_tensors(tmp_path / "out" / "m")
    monkeypatch.setattr(runner_mod.Runner, "_stored", lambda *a: set())
    bases.dtypes.clear()
    cli.ok("run", "r.yaml", "-q", "--device", "cpu", "--no-cache", "--force")
    assert bases.dtypes == {("extract", torch.float32), ("apply", torch.float32)}
    widened = read_tensors(tmp_path / "out" / "m")
    assert stored.keys() == widened.keys()
    assert all(torch.equal(stored[k].view(torch.int16), widened[k].view(torch.int16))
               for k in widened)


def test_a_base_another_step_reads_is_widened(make_models, cli, tmp_path, monkeypatch):
    ms = make_models(("a", "b", "c"), dtype=torch.bfloat16)
    recipe = _recipe(ms, "{op: tsv_merge, inputs: tv}")
    recipe = recipe.replace("outputs:", "  mix: {op: linear, inputs: [base, a]}\noutputs:")
    cli.write("r.yaml", recipe + "  mix: {from: mix, path: ./out/mix}\n")
    bases = Bases(monkeypatch)
    cli.ok("run", "r.yaml", "-q", "--no-cache")
    assert bases.dtypes == {("extract", torch.float32), ("apply", torch.float32)}


@pytest.mark.parametrize("out", ["delta", "new", "other"])
def test_extract_and_apply_widen_a_16_bit_base_by_pieces(monkeypatch, out):
    from tvrecipe.ops import arithmetic
    monkeypatch.setattr(arithmetic, "WIDEN_PIECE", 5)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 7, generator=g).to(torch.bfloat16)
    ft = base.float() + 0.01 * torch.randn(6, 7, generator=g)
    want = torch.sub(ft, base.float())
    target = {"delta": ft.clone(), "new": None, "other": torch.empty(6, 7)}[out]
    got = arithmetic.extract(base, ft.clone() if out != "delta" else target, out=target)
    assert torch.equal(got, want) and got.dtype == torch.float32
    delta = want.clone()
    want_applied = torch.add(torch.mul(want, 0.3), base.float())
    target = {"delta": delta, "new": None, "other": torch.empty(6, 7)}[out]
    got = arithmetic.apply(base, delta, scale=0.3, out=target)
    assert torch.equal(got, want_applied) and got.dtype == torch.float32
    if out == "delta":
        assert got is delta


@pytest.mark.parametrize("case", ["slerp", "extract"])
def test_no_base_is_kept_as_stored_beside_a_lora_adapter(cli, tmp_path, monkeypatch, case):
    # apply of an adapter's uncovered tensor (None) hands on its base as it is: a stored
    # (bf16) base would reach later steps (a slerp refused the mix of dtypes; an extract came
    # out with other bytes). Beside an adapter no base is kept as stored.
    from safetensors.torch import load_file, save_file

    from tests.test_lora import CASES as ADAPTERS
    from tests.test_lora import llama, make_adapter
    make_adapter(tmp_path, "a1", llama, seed=1, **ADAPTERS["plain"])
    f = tmp_path / "base" / "model.safetensors"
    base = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
            for k, v in load_file(str(f)).items()}
    save_file(base, str(f), metadata={"format": "pt"})
    for j in (1, 2):
        g = torch.Generator().manual_seed(10 + j)
        (tmp_path / f"ft{j}").mkdir()
        save_file({k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
                   for k, v in base.items()}, str(tmp_path / f"ft{j}" / "model.safetensors"))
    last = ("  x: {op: slerp, a: ml, b: m1, t: 0.3}\n" if case == "slerp"
            else "  x: {op: extract, base: m1, finetuned: ml}\n")
    cli.write("r.yaml", "tvrecipe: 1\nmodels:\n  base: ./base\n  ft1: ./ft1\n  ft2: ./ft2\n"
              "  a1: {path: ./a1, kind: lora}\nsteps:\n"
              "  tv: {op: extract, base: base, finetuned: [ft1, ft2]}\n"
              "  mA: {op: tsv_merge, inputs: tv}\n"
              "  m1: {op: apply, base: base, delta: mA}\n"
              "  ml: {op: apply, base: base, delta: a1}\n" + last +
              "outputs:\n  x: {from: x, path: ./out/x, dtype: float32}\n")
    seen: list[set] = []
    real = runner_mod.Runner._stored
    monkeypatch.setattr(runner_mod.Runner, "_stored",
                        lambda *a: seen.append(real(*a)) or seen[-1])
    cli.ok("run", "r.yaml", "-q", "--no-cache")
    assert seen and all(s == set() for s in seen)


def test_extract_and_apply_with_a_stored_base_take_strided_tensors():
    from tvrecipe.ops import arithmetic
    g = torch.Generator().manual_seed(4)
    base = torch.randn(5, 6, generator=g).to(torch.bfloat16).mT  # not contiguous
    ft = (base.float() + 0.01).mT.contiguous().mT
    want = torch.sub(ft, base.float())
    assert torch.equal(arithmetic.extract(base, ft), want)
    assert torch.equal(arithmetic.extract(base, ft.clone(), out=None), want)
    delta = want.clone()
    assert torch.equal(arithmetic.apply(base, delta, scale=0.5, out=delta),
                       torch.add(torch.mul(want, 0.5), base.float()))
