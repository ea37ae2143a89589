"""One op, one place: ops defined in this module alone run end to end through validate, plan,
run, cache, lock, report and the reference docs, without any edit to the engine."""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Literal

import pytest
import torch
import yaml
from pydantic import Field

import tvrecipe
from tests.conftest import FLOATING, read_tensors
from tvrecipe.spec.kinds import TASK_VECTORS, VECTOR
from tvrecipe.spec.models import ROWWISE, Ref, StepSpec
from tvrecipe.spec.registry import op_class, ops, register, unregister


def clip(x: torch.Tensor, *, limit: float) -> torch.Tensor:
    """The toy kernel: every entry clamped to [-limit, limit]."""
    CALLS.append(tuple(x.shape))
    return x.clamp(-limit, limit)


CALLS: list[tuple[int, ...]] = []


class ClipStep(StepSpec):
    """Clamp every entry of task vector(s) to [-limit, limit] (a toy op of the tests)."""

    op: Literal["clip"] = Field(description="The operation: `clip`.")
    input: Ref = Field(description="A vector or vectors.")
    limit: float = Field(gt=0, description="Largest magnitude kept.")

    accepts: ClassVar = {"input": TASK_VECTORS}
    cached: ClassVar = True
    execution: ClassVar = ROWWISE
    version: ClassVar = 1
    kernel: ClassVar = "tests.test_op_registry:clip"
    example: ClassVar = "small: {op: clip, input: tv, limit: 0.01}"

    def evaluate(self, ctx: Any) -> Any:
        return ctx.map(ctx.one("input"), lambda t, _m: ctx.kernel(t, limit=self.limit))


class UnitStep(StepSpec):
    """Divide a task vector by its norm over the whole model (a toy whole-model op)."""

    op: Literal["unit"] = Field(description="The operation: `unit`.")
    input: Ref = Field(description="A vector.")

    accepts: ClassVar = {"input": frozenset({VECTOR})}
    returns: ClassVar = VECTOR
    whole_model: ClassVar = True

    def whole_model_pass(self, ctx: Any) -> float:
        norm = float(ctx.gram(ctx.entries("input"))[0, 0]) ** 0.5
        ctx.report["norm"] = norm
        return norm

    def evaluate(self, ctx: Any) -> Any:
        x = ctx.one("input")
        return None if x is None else x / ctx.result

    def render_report(self, name: str, report: dict) -> str | None:
        return f"{name} (unit): norm {report['norm']:.6g}"


@pytest.fixture
def toy_ops():
    register(ClipStep)
    register(UnitStep)
    CALLS.clear()
    try:
        yield
    finally:
        unregister("clip")
        unregister("unit")


RECIPE = """\
tvrecipe: 1
{models}steps:
  tv: {{op: extract, base: base, finetuned: [math, code]}}
  small: {{op: clip, input: tv, limit: {limit}}}
  merged: {{op: sum, inputs: small, weights: [0.5]}}
  model: {{op: apply, base: base, delta: merged, scale: {scale}}}
outputs:
  model: {{from: model, path: ./out/model, dtype: float32}}
"""


def expected(ms, limit: float, scale: float) -> dict[str, torch.Tensor]:
    base = ms.f32("base")
    return {k: base[k] + scale * sum(0.5 * ms.delta(t)[k].clamp(-limit, limit)
                                     for t in ("math", "code")) for k in FLOATING}


def test_a_toy_op_runs_end_to_end_with_cache_and_lock(toy_ops, make_models, cli, tmp_path):
    ms = make_models(("math", "code"), scale=0.01)
    cli.write("r.yaml", RECIPE.format(models=ms.models_yaml(), limit=0.004, scale=1.0))
    assert cli.ok("validate", "r.yaml").stdout == "r.yaml: ok (4 steps, 1 output)\n"
    plan = cli.ok("plan", "r.yaml").stdout
    assert "small          clip          tv -> vectors[math, code]" in plan
    assert "(plus cache entries of small, merged)" in plan

    cli.ok("run", "r.yaml")
    got = read_tensors(tmp_path / "out" / "model")
    want = expected(ms, 0.004, 1.0)
    clipped = 0
    for k in FLOATING:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
        clipped += int((ms.delta("math")[k].abs() > 0.004).sum())
    assert clipped > 0  # the limit bites: the test would see a clip that does nothing
    assert CALLS  # the kernel of this module ran

    lock = yaml.safe_load((tmp_path / "r.yaml.lock").read_text())
    key = lock["steps"]["small"]
    assert key.startswith("clip-")

    # A rerun with another apply scale reads clip's result from the cache: its kernel
    # does not run again.
    CALLS.clear()
    cli.write("r.yaml", RECIPE.format(models=ms.models_yaml(), limit=0.004, scale=0.5))
    res = cli.ok("run", "r.yaml", "--force")
    assert "from cache: merged" in res.stdout
    assert CALLS == []
    got = read_tensors(tmp_path / "out" / "model")
    for k, v in expected(ms, 0.004, 0.5).items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7)

    # Changing the op's own parameter changes its key and recomputes it.
    cli.write("r.yaml", RECIPE.format(models=ms.models_yaml(), limit=0.002, scale=0.5))
    cli.ok("run", "r.yaml", "--force")
    assert CALLS
    new = yaml.safe_load((tmp_path / "r.yaml.lock").read_text())["steps"]["small"]
    assert new != key
    # So does bumping the op's version: the key covers it.
    ClipStep.version = 2
    try:
        cli.ok("run", "r.yaml", "--force")
        bumped = yaml.safe_load((tmp_path / "r.yaml.lock").read_text())["steps"]["small"]
        cli.ok("verify", "r.yaml")
    finally:
        ClipStep.version = 1
    assert bumped.startswith("clip-") and bumped != new
    # The lock now holds version 2's key: under version 1, verify names the op's step.
    res = cli.fails(6, "verify", "r.yaml")
    assert f"step 'small' changed (key {new}, locked {bumped})" in res.stderr
    assert "the recipe and inputs are as locked" not in res.stderr  # same tools: no guess
    # A lock that another tvrecipe wrote: the message says why the same recipe and inputs
    # give another key, and what to do.
    lock_file = tmp_path / "r.yaml.lock"
    data = yaml.safe_load(lock_file.read_text())
    data["tool"]["tvrecipe"] = "0.0.1"
    lock_file.write_text(yaml.safe_dump(data))
    res = cli.fails(6, "run", "r.yaml", "--force", "--locked")
    said = " ".join(res.stderr.split())
    assert f"step 'small' changed (key {new}, locked {bumped})" in said
    # (only what differs is named: the same torch is not)
    assert (f"the recipe and inputs are as locked; the lock was written by tvrecipe 0.0.1 and "
            f"this is tvrecipe {tvrecipe.__version__}, whose ops may compute these steps "
            "differently") in said
    assert ("(each op's version: `tvrecipe ops OP`); `tvrecipe run` without --locked writes a "
            "new lock, or install the locked versions to reproduce it") in said
    # Only the Python version differs, or the lock records no tools: no guess about ops.
    for tool in ({**data["tool"], "tvrecipe": tvrecipe.__version__, "python": "3.0.0"}, None):
        data["tool"] = tool
        lock_file.write_text(yaml.safe_dump(data))
        res = cli.fails(6, "verify", "r.yaml")
        assert f"step 'small' changed (key {new}, locked {bumped})" in res.stderr
        assert "the recipe and inputs are as locked" not in res.stderr


def test_a_toy_whole_model_op_runs_its_pass_first(toy_ops, make_models, cli, tmp_path):
    ms = make_models(("math",))
    cli.write("r.yaml", "tvrecipe: 1\n" + ms.models_yaml() + """\
steps:
  tv: {op: extract, base: base, finetuned: math}
  u: {op: unit, input: tv}
outputs:
  u: {from: u, path: ./out/u}
""")
    assert "(whole-model pass)" in cli.ok("plan", "r.yaml").stdout
    res = cli.ok("run", "r.yaml", "--report", "rep.json")
    norm = sum(float((ms.delta("math")[k].double() ** 2).sum()) for k in FLOATING) ** 0.5
    assert f"u (unit): norm {norm:.6g}" in res.stdout
    assert json.loads((tmp_path / "rep.json").read_text())["u"]["norm"] == pytest.approx(norm)
    got = read_tensors(tmp_path / "out" / "u")
    for k in FLOATING:
        torch.testing.assert_close(got[k], ms.delta("math")[k] / norm, rtol=1e-5, atol=1e-8)


def test_a_toy_op_gets_the_engines_checks_and_messages(toy_ops, make_models, cli):
    ms = make_models(("math",))
    cli.write("r.yaml", "tvrecipe: 1\n" + ms.models_yaml() + """\
steps:
  a: {op: clip, input: base, limit: 0.1}
  b: {op: clip, input: base, limt: 0.1}
  c: {op: clp, input: base}
outputs:
  a: {from: a, path: ./out/a}
""")
    res = cli.fails(2, "validate", "r.yaml")
    assert res.err_lines[1:] == [
        ("r.yaml:6:17: steps.a.input: step 'a' (clip) wants vector or vectors in 'input', but "
         "'base' is a checkpoint (extract a task vector first: {op: extract, base: ..., "
         "finetuned: ...})"),
        "r.yaml:7:3: steps.b.limit: missing required field 'limit' (Largest magnitude kept.)",
        "r.yaml:7:30: steps.b.limt: unknown field 'limt' (did you mean 'limit'?)",
        "r.yaml:8:7: steps.c.op: unknown op 'clp' (did you mean 'clip'?)",
    ]


def test_a_toy_op_is_in_the_schema_and_the_reference(toy_ops, cli):
    schema = json.loads(cli.ok("schema").stdout)
    (union,) = schema["properties"]["steps"]["patternProperties"].values()
    assert union["discriminator"]["mapping"]["clip"] == "#/$defs/ClipStep"
    assert schema["$defs"]["ClipStep"]["properties"]["limit"]["description"] == \
        "Largest magnitude kept."
    listing = cli.ok("ops").stdout
    assert re.search(r"^clip +input: vector or vectors → same kind as its input$", listing,
                     re.MULTILINE)
    names = [line.split()[0] for line in listing.splitlines()[::2]]
    assert names == sorted(names) and "rebuild" in names  # by name, a plugin's among them
    entry = cli.ok("ops", "clip").stdout
    assert entry.splitlines()[:7] == [
        "## `clip`", "",
        "Clamp every entry of task vector(s) to [-limit, limit] (a toy op of the tests).", "",
        "- takes → gives: input: vector or vectors → same kind as its input",
        "- engine: streams by rows, cached, version 1",
        "- kernel: `tests.test_op_registry.clip`"]
    assert "| `limit` | required | Largest magnitude kept. |" in entry


def test_registering_twice_or_half_an_op_is_refused(toy_ops):
    class Other(StepSpec):
        """Another op called clip."""

        op: Literal["clip"]
        input: Ref
        accepts: ClassVar = {"input": TASK_VECTORS}

    with pytest.raises(ValueError, match="op 'clip' is registered already"):
        register(Other)

    class NoField(StepSpec):
        """An op that accepts a reference it has no field for."""

        op: Literal["nofield"]
        accepts: ClassVar = {"input": TASK_VECTORS}

    with pytest.raises(ValueError, match=r"op 'nofield' accepts references in \['input'\]"):
        register(NoField)
    assert op_class("nofield") is None


def test_unregistered_toy_ops_are_gone(cli):
    assert "clip" not in ops() and "unit" not in ops()
    assert "clip" not in cli.ok("schema").stdout


def test_the_engine_names_no_op():
    # The engine is generic over the definitions: no op's name appears in its code (strings
    # in docstrings and comments aside, which the AST does not keep as constants in code).
    import ast
    from pathlib import Path

    import tvrecipe
    root = Path(tvrecipe.__file__).parent
    names = set(ops())
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("steps/", "ops/", "importers/")):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr)
                      and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and id(node) not in docstrings and node.value in names):
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
            if isinstance(node, ast.Compare):
                for c in node.comparators:
                    if isinstance(c, (ast.Tuple, ast.Set, ast.List)):
                        found += [f"{rel}:{node.lineno}: {e.value!r}" for e in c.elts
                                  if isinstance(e, ast.Constant) and e.value in names]
    assert found == []


def test_committed_ops_reference_is_up_to_date(cli):
    from pathlib import Path
    committed = (Path(__file__).resolve().parents[1] / "docs" / "ops.md").read_text()
    assert committed == cli.ok("ops", "--markdown").stdout, (
        "docs/ops.md is stale: run `tvrecipe ops --markdown > docs/ops.md`")


def test_a_kernel_is_resolved_safely_from_several_threads_at_once(tmp_path, monkeypatch):
    # Members are evaluated on parallel threads, and the first of them may find the kernel's
    # module half-imported by another: each must wait for the import, not fail on it.
    import sys
    import threading

    (tmp_path / "slow_kernels.py").write_text(
        "import time\ntime.sleep(0.3)\n\ndef double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "slow_kernels", raising=False)

    class SlowStep(StepSpec):
        """A toy op whose kernel module is slow to import."""

        op: Literal["slow"]
        input: Ref
        accepts: ClassVar = {"input": TASK_VECTORS}
        kernel: ClassVar = "slow_kernels:double"

    from tvrecipe.spec.registry import kernel
    got, errors = [], []

    def resolve():
        try:
            got.append(kernel(SlowStep)(21))
        except Exception as exc:  # noqa: BLE001 - the failure under test
            errors.append(repr(exc))

    threads = [threading.Thread(target=resolve) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and got == [42] * 8


def test_the_reference_lists_the_values_a_choice_field_allows():
    from tvrecipe.spec.reference import entry
    lines = {line.split(" | ")[0]: line for name in ("ties", "prune", "cluster_basis")
             for line in entry(ops()[name]).splitlines() if line.startswith("| `")}
    assert lines["| `majority`"].endswith("One of `total`, `count`. |")
    assert lines["| `by`"].endswith("Only `magnitude`. |")
    assert "One of" not in lines["| `k`"]  # (an int or 'auto': its description says so)
