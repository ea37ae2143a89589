"""NaN and Inf in inputs: checked once per run (exec/runner.py), and with
``--allow-nonfinite`` a clear error where a step or an output cannot take them."""

from __future__ import annotations

from collections import Counter

import torch

from tvrecipe.exec.runner import Runner

from .conftest import read_tensors, save_model
from .test_cli_errors import nothing_written


def _spy_checks(monkeypatch) -> Counter:
    """Count, per (tensor, shape of the block read), how often _load checked a model's read."""
    checks: Counter = Counter()
    real = Runner._load

    def load(self, t, where, tensor, check=True, **kw):
        if check and where.startswith("model "):
            checks[(where, tensor, tuple(t.shape))] += 1
        return real(self, t, where, tensor, check, **kw)

    monkeypatch.setattr(Runner, "_load", load)
    return checks


RECIPE = """
tvrecipe: 1
{models}steps:
  tv: {{op: extract, base: base, finetuned: [a, b, c]}}
  basis: {{op: cluster_basis, inputs: tv, k: auto}}
outputs:
  basis: {{from: basis, path: ./out/basis}}
"""


def test_two_passes_check_each_read_once(cli, make_models, monkeypatch):
    # cluster_basis reads every input twice (the similarity pass, then the merge pass).
    ms = make_models(("a", "b", "c"))
    cli.write("r.yaml", RECIPE.format(models=ms.models_yaml()))
    checks = _spy_checks(monkeypatch)
    cli.ok("run", "r.yaml", "--no-cache")
    floating = [k for k, v in ms.weights["base"].items() if v.is_floating_point()]
    assert {tensor for _where, tensor, _shape in checks} == set(floating)
    assert len({where for where, _t, _s in checks}) == 4  # base, a, b, c
    assert set(checks.values()) == {1}


def _with_nan(ms) -> None:
    bad = read_tensors(ms.path("b"))
    bad["lm_head.weight"][0, 1] = float("nan")
    save_model(ms.path("b"), bad)


def test_nan_is_still_refused_in_the_first_pass(cli, make_models):
    ms = make_models(("a", "b", "c"))
    _with_nan(ms)
    cli.write("r.yaml", RECIPE.format(models=ms.models_yaml()))
    res = cli.fails(3, "run", "r.yaml", "--no-cache")
    assert res.err_lines[1] == ("model 'b': tensor 'lm_head.weight' contains NaN or Inf; fix "
                                "the checkpoint, or pass --allow-nonfinite to merge it anyway")
    assert not (cli.root / "out").exists()
    # Let in, the NaN makes the similarities undefined: a runtime error that says so (it was
    # an internal error, "this is a bug in tvrecipe", before).
    res = cli.fails(5, "run", "r.yaml", "--no-cache", "--allow-nonfinite")
    assert res.err_lines[1] == (
        "step 'basis' (cluster_basis), whole-model pass: the Gram matrix of the task vectors "
        "holds NaN or Inf (so does a task vector, let in by --allow-nonfinite?): cosine "
        "similarities need finite task vectors; fix the checkpoint")
    nothing_written(cli.root, "out/basis")


def test_spectral_merges_name_the_nan_rather_than_lapack(cli, make_models):
    ms = make_models(("a", "b", "c"))
    _with_nan(ms)
    cli.write("r.yaml", RECIPE.format(models=ms.models_yaml()).replace(
        "{op: cluster_basis, inputs: tv, k: auto}", "{op: tsv_merge, inputs: tv}"))
    res = cli.fails(5, "run", "r.yaml", "--no-cache", "--allow-nonfinite")
    assert res.err_lines[1] == (
        "step 'basis' (tsv_merge), tensor 'lm_head.weight': tsv_merge: a task vector holds "
        "NaN or Inf (let in by --allow-nonfinite?): singular vectors need finite task "
        "vectors; fix the checkpoint")
    nothing_written(cli.root, "out/basis")


def test_a_peft_adapter_of_a_nan_delta_is_a_clear_error(cli, make_models):
    # A truncated SVD of a delta with a NaN does not exist: say which tensor, and how else to
    # write the vector (it was an internal error from torch.linalg.svd).
    ms = make_models(("a", "b", "c"))
    _with_nan(ms)
    cli.write("r.yaml", f"""
        tvrecipe: 1
        {ms.models_yaml().replace(chr(10), chr(10) + "        ")}
        steps:
          tv: {{op: extract, base: base, finetuned: [b]}}
        outputs:
          adapter: {{from: tv.b, path: ./out/adapter, format: peft, rank: 2}}
        """)
    res = cli.fails(5, "run", "r.yaml", "--no-cache", "--allow-nonfinite")
    assert res.err_lines[1] == (
        "output 'adapter' (peft adapter): tensor 'lm_head.weight' holds NaN or Inf (let in by "
        "--allow-nonfinite?), and a low-rank adapter of it does not exist: fix the checkpoint, "
        "or write this vector with format: safetensors")
    nothing_written(cli.root, "out/adapter")


def _big(ms) -> None:
    """Model c: base + 1e5 in lm_head (finite in float32, beyond float16's 65504)."""
    big = read_tensors(ms.path("c"))
    big["lm_head.weight"] = big["lm_head.weight"] + 1e5
    save_model(ms.path("c"), big)


OVERFLOW = """
tvrecipe: 1
{models}steps:
  tv: {{op: extract, base: base, finetuned: [a, c]}}
  s: {{op: sum, inputs: tv, weights: {weights}}}
outputs:
  v: {{from: s, path: ./out/v, dtype: {dtype}}}
"""


def test_an_output_that_overflows_its_dtype_is_refused(cli, make_models):
    # Finite inputs, a float16 output: 1e5 became Inf with exit 0 before.
    ms = make_models(("a", "b", "c"))
    _big(ms)
    cli.write("r.yaml", OVERFLOW.format(models=ms.models_yaml(), weights=1, dtype="float16"))
    res = cli.fails(5, "run", "r.yaml", "--no-cache")
    line = res.err_lines[1]
    assert line == ("output 'v': tensor 'lm_head.weight' has values up to 1e+05, which float16 "
                    "cannot hold (from 65520 on they round to Inf): write it as float32 or "
                    "bfloat16, or pass --allow-nonfinite to write Inf")
    nothing_written(cli.root, "out/v")
    # Written as bfloat16 it fits; with --allow-nonfinite the float16 Inf is written.
    cli.write("ok.yaml", OVERFLOW.format(models=ms.models_yaml(), weights=1, dtype="bfloat16"))
    cli.ok("run", "ok.yaml", "--no-cache")
    cli.ok("run", "r.yaml", "--no-cache", "--allow-nonfinite", "--force")
    got = read_tensors(cli.root / "out" / "v")
    assert bool(torch.isinf(got["lm_head.weight"]).all())
    assert all(bool(torch.isfinite(v).all()) for k, v in got.items() if k != "lm_head.weight")


def test_a_weight_that_overflows_float32_is_refused(cli, make_models):
    ms = make_models(("a", "b", "c"))
    _big(ms)
    cli.write("r.yaml", OVERFLOW.format(models=ms.models_yaml(), weights="{a: 1, c: 1e38}",
                                        dtype="float32"))
    res = cli.fails(5, "run", "r.yaml", "--no-cache")
    assert res.err_lines[1] == (
        "output 'v': tensor 'lm_head.weight' holds Inf or NaN though every input was finite: "
        "check the weights and scales of the steps before it, or pass --allow-nonfinite to "
        "write it anyway")
    nothing_written(cli.root, "out/v")


def test_a_failed_run_removes_the_folders_it_made(cli, make_models):
    # Outputs under out/sub/ and out/: the run fails in its merge pass; out/ did not exist,
    # and after the failure it does not either (an empty out/sub/ was left before).
    ms = make_models(("a", "b", "c"))
    _big(ms)
    cli.write("r.yaml", OVERFLOW.format(models=ms.models_yaml(), weights=1, dtype="float16")
              .replace("./out/v", "./out/sub/v") + "  w: {from: tv, path: ./out/w}\n")
    cli.fails(5, "run", "r.yaml", "--no-cache")
    assert not (cli.root / "out").exists()
    (cli.root / "out").mkdir()
    (cli.root / "out" / "keep.txt").write_text("mine")
    cli.fails(5, "run", "r.yaml", "--no-cache")
    assert sorted(p.name for p in (cli.root / "out").iterdir()) == ["keep.txt"]


def test_reports_are_strict_json(cli, make_models):
    # model_stock's angle of a NaN tensor is NaN: the --report file says null (Python's bare
    # NaN, written before, is refused by strict JSON parsers), as inspect --json does.
    import json

    from tvrecipe.report import json_text

    assert json_text({"a": [1.5, float("nan"), {"b": float("-inf")}], "c": "NaN"}) == (
        '{\n  "a": [\n    1.5,\n    null,\n    {\n      "b": null\n    }\n  ],\n  "c": "NaN"\n}')
    ms = make_models(("a", "b", "c"))
    _with_nan(ms)
    cli.write("r.yaml", RECIPE.format(models=ms.models_yaml()).replace(
        "{op: cluster_basis, inputs: tv, k: auto}", "{op: model_stock, inputs: tv}"))
    cli.ok("run", "r.yaml", "--no-cache", "--allow-nonfinite", "--report", "report.json")

    def refuse(constant):
        raise AssertionError(f"bare {constant} in the report")

    report = json.loads((cli.root / "report.json").read_text(), parse_constant=refuse)
    assert "null" in json.dumps(report["basis"])  # the NaN tensor's entry
