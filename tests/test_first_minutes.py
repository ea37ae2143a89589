"""The first fifteen minutes of a new user (issue #18): command-line values checked where they
are given, `-v` where users put it, usage errors with tvrecipe's header, the lock read by
`plan` and `run`, bundled recipes, `inspect` on dotted references, the cache commands."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.conftest import read_tensors

REPO = Path(__file__).resolve().parents[1]
STEPS = ("steps:\n"
         "  tv: {op: extract, base: base, finetuned: [math, code, toxic]}\n"
         "  merged: {op: sum, inputs: tv, weights: 0.5}\n"
         "  parts: {op: decompose, inputs: tv}\n"
         "  model: {op: apply, base: base, delta: merged}\n"
         "outputs:\n"
         "  model: {from: model, path: ./out/merged}\n"
         "  vectors: {from: tv, path: ./out/vectors}\n")


@pytest.fixture
def recipe(make_models, cli):
    ms = make_models(("math", "code", "toxic"))
    cli.write("r.yaml", "tvrecipe: 1\n" + ms.models_yaml() + STEPS)
    return ms


USAGE_TAIL = {"run": "Usage: tvrecipe run [OPTIONS] RECIPE",
              "inspect": "Usage: tvrecipe inspect [OPTIONS] RECIPE STEP",
              "verify": "Usage: tvrecipe verify [OPTIONS] RECIPE|FOLDER"}


@pytest.mark.parametrize("command", ["run", "inspect", "verify"])
@pytest.mark.parametrize("device", ["gpu", "meta", "cuda:x"])
def test_a_bad_device_on_the_command_line_is_a_usage_error(recipe, cli, command, device):
    args = ["r.yaml", "tv"] if command == "inspect" else ["r.yaml"]
    res = cli.fails(2, command, *args, "--device", device)
    assert res.err_lines == [
        "tvrecipe: usage error:",
        f"Invalid value for '--device': {device!r}: use auto, cpu, cuda or cuda:N",
        USAGE_TAIL[command],
        f"see `tvrecipe {command} --help`"]


def test_a_gpu_the_machine_lacks_is_a_runtime_error_that_names_the_ones_there(
        recipe, cli, monkeypatch):
    # A machine without a GPU, then one with a single GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = cli.fails(5, "run", "r.yaml", "--device", "cuda:3")
    assert res.err_lines == ["tvrecipe: runtime error:",
                             ("device 'cuda:3' asked for, but torch sees no CUDA device; use "
                             "--device cpu or device: auto")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    res = cli.fails(5, "run", "r.yaml", "--device", "cuda:3")
    assert res.err_lines == ["tvrecipe: runtime error:",
                             ("device 'cuda:3' asked for, but torch sees 1 CUDA device(s) "
                             "(cuda:0 to cuda:0); use one of those")]
    assert not (cli.root / "out").exists()


def test_usage_errors_have_the_header_and_exit_2(cli):
    res = cli.fails(2, "run")
    assert res.err_lines == ["tvrecipe: usage error:", "Missing argument 'RECIPE'.",
                             "Usage: tvrecipe run [OPTIONS] RECIPE", "see `tvrecipe run --help`"]
    res = cli.fails(2, "cache", "gc", "--older-than", "2w")
    assert res.err_lines[:2] == ["tvrecipe: usage error:", ("Invalid value for '--older-than': use "
                                 "a number and a unit: 30d, 12h, 90m, 45s")]
    res = cli.fails(2, "runn", "r.yaml")
    assert res.err_lines[:2] == ["tvrecipe: usage error:",
                                 "No such command 'runn'. Did you mean 'run'?"]


def test_verbose_works_after_the_subcommand_too(recipe, cli):
    quiet = cli("run", "missing.yaml")
    assert quiet.exit_code == 2 and quiet.exception is None  # a message, no traceback
    for args in (("-v", "run", "missing.yaml"), ("run", "missing.yaml", "-v")):
        res = cli(*args)  # the traceback, then the same message and exit code
        assert res.exit_code == 2, args
        assert res.stderr.startswith("Traceback (most recent call last):\n"), args
        assert res.stderr.endswith(quiet.stderr), args
        assert "tvrecipe.errors.RecipeError: " in res.stderr, args
    cli.ok("run", "r.yaml", "-v", "-q")


def test_a_bug_exits_70_with_or_without_verbose(recipe, cli, monkeypatch):
    import tvrecipe.cli

    def broken(*_args, **_kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(tvrecipe.cli, "_compile", broken)
    quiet = cli("validate", "r.yaml")  # (cli.fails refuses an internal error)
    assert quiet.exit_code == 70 and quiet.err_lines == ["tvrecipe: internal error: RuntimeError: boom", (
        "this is a bug in tvrecipe; rerun with -v for the traceback and report it")]
    loud = cli("validate", "r.yaml", "-v")
    assert loud.exit_code == 70 and loud.stderr.startswith("Traceback (most recent call last):\n")
    assert loud.err_lines[-2:] == ["tvrecipe: internal error: RuntimeError: boom",
                                   "this is a bug in tvrecipe; report it with the traceback above"]


def test_a_deleted_output_file_is_named_by_run_and_locked(recipe, cli, tmp_path):
    cli.ok("run", "r.yaml", "-q")
    (tmp_path / "out" / "vectors" / "code.safetensors").unlink()
    res = cli.fails(4, "run", "r.yaml")
    assert res.err_lines == ["tvrecipe: output error:",
                             "output ./out/vectors was changed since this recipe wrote it:",
                             "./out/vectors/code.safetensors: missing",
                             "pass --force to write it again"]
    res = cli.fails(6, "run", "r.yaml", "--locked")
    assert res.err_lines == ["tvrecipe: verify error:",
                             ("--locked, but the outputs differ from the lock (--force writes "
                             "them again):"),
                             "./out/vectors/code.safetensors: missing"]
    cli.ok("run", "r.yaml", "--locked", "--force", "-q")
    cli.ok("verify", "r.yaml")


def test_plan_reads_the_lock(recipe, cli, tmp_path):
    before = cli.ok("plan", "r.yaml").stdout
    assert "a run computes 3 of 3 steps" in before  # parts feeds no output
    cli.ok("run", "r.yaml", "-q")
    res = cli.ok("plan", "r.yaml")
    head, plan = res.stdout.split("\n\n", 1)
    assert head == ("r.yaml: up to date: inputs, recipe and outputs match the lock, so "
                    "`tvrecipe run` does nothing (--force writes them again, as below)")
    # ... and the plan --force would run: the cached steps from the cache.
    assert "estimated peak working memory" in plan and "a run computes 2 of 3 steps" in plan
    path = tmp_path / "r.yaml"
    path.write_text(path.read_text().replace("weights: 0.5", "weights: 0.25"))
    assert "up to date" not in cli.ok("plan", "r.yaml").stdout


def test_plot_without_matplotlib_says_how_to_install_it(recipe, cli, monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    res = cli.fails(7, "inspect", "r.yaml", "tv", "--plot", "tv.png")
    assert res.err_lines == ["tvrecipe: missing package:",
                             ("--plot needs matplotlib, which is not installed: pip install "
                             "'tvrecipe[plot]'")]
    assert res.stdout == "" and not (tmp_path / "tv.png").exists()


def test_plot_draws_a_png(recipe, cli, tmp_path):
    pytest.importorskip("matplotlib")  # in the dev extra: CI runs this
    res = cli.ok("inspect", "r.yaml", "tv", "--plot", "tv.png")
    assert res.stdout.endswith("wrote tv.png\n")
    assert (tmp_path / "tv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bundled_recipes_list_and_print(cli, tmp_path):
    names = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    listed = cli.ok("new", "--list").stdout.splitlines()
    assert [line.split()[0] for line in listed] == names
    # Each recipe's first sentence, whole, though its comment runs over lines.
    assert listed[names.index("ties")].split(None, 1)[1] == (
        "TIES merging (Yadav et al., NeurIPS 2023): trim to the top 20% per tensor, elect "
        "signs, average the agreeing entries; scale the merged vector with apply.")
    assert listed[names.index("assign_new_task")].split(None, 1)[1] == (
        "Task-vector bases: a new task is served by its most similar basis vector (cosine "
        "over the whole model).")
    text = cli.ok("new", "ties").stdout
    source = (REPO / "recipes" / "ties.yaml").read_text()
    assert text == "".join(line for line in source.splitlines(keepends=True)
                           if "$schema" not in line)
    (tmp_path / "my.yaml").write_text(text)
    cli.ok("validate", "my.yaml")
    res = cli.fails(2, "new", "tie")
    assert res.err_lines == ["tvrecipe: recipe error:", ("no bundled recipe 'tie'; did you mean "
                             "'ties'?")]


def test_the_not_a_mapping_hint_points_at_bundled_recipes(cli):
    cli.write("bad.yaml", "- a\n- b\n")
    res = cli.fails(2, "validate", "bad.yaml")
    assert res.err_lines[1] == ("bad.yaml:1:1: a recipe must be a YAML mapping, got a list "
                                "(start from a bundled recipe: `tvrecipe new --list`, then "
                                "`tvrecipe new NAME > my.yaml`)")


def test_inspect_takes_dotted_references(recipe, cli, tmp_path):
    res = cli.fails(2, "inspect", "r.yaml", "tv.math")
    assert res.err_lines[1] == ("'tv.math' is a vector: inspect shows a vectors set (cosine "
                                "similarities), a cluster_basis or compress_basis step, a "
                                "decompose step (ranks and shared dimensions) or a tsv_merge or "
                                "iso step (spectra of its inputs)")
    res = cli.fails(2, "inspect", "r.yaml", "tv.mat")
    assert res.err_lines[1] == "'tv.mat': has no member 'mat' (did you mean 'math'?)"
    # parts.unique is a set: its cosine matrix is that of the unique parts a run writes.
    cli.write("u.yaml", (tmp_path / "r.yaml").read_text().replace(
        "  vectors: {from: tv, path: ./out/vectors}\n",
        "  unique: {from: parts.unique, path: ./out/unique}\n"))
    cli.ok("run", "u.yaml", "-q")
    got = __import__("json").loads(cli.ok("inspect", "u.yaml", "parts.unique", "--json").stdout)
    assert got["members"] == ["math", "code", "toxic"]
    flat = {m: torch.cat([t.double().flatten() for t in read_tensors(
        tmp_path / "out" / "unique" / f"{m}.safetensors").values()]) for m in got["members"]}
    for i, a in enumerate(got["members"]):
        for j, b in enumerate(got["members"]):
            want = torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0).item()
            assert got["cosine"][i][j] == pytest.approx(want, abs=1e-6)


def test_cache_commands_take_the_recipe_as_an_argument(recipe, cli, tmp_path):
    cache = tmp_path / ".tvrecipe" / "cache"
    assert cli.ok("cache", "ls", "r.yaml").stdout == f"cache is empty: {cache}\n"
    cli.ok("run", "r.yaml", "-q")
    listed = cli.ok("cache", "ls", "r.yaml").stdout.splitlines()
    # (by step name, then its key)
    assert [(line.split()[0], line.split()[1].split("-")[0]) for line in listed] == [
        ("merged", "sum")]
    assert cli.ok("cache", "du", "r.yaml").stdout.startswith(f"{cache}: ")


def test_a_cycle_hides_no_other_problem_behind_unknown_references(recipe, cli):
    cli.write("cyc.yaml", """\
        tvrecipe: 1
        models: {base: ./ckpt/base, math: ./ckpt/math}
        steps:
          a: {op: scale, input: b, factor: 2}
          b: {op: scale, input: a, factor: 2}
          c: {op: sum, inputs: [a, nope]}
        outputs:
          o: {from: c, path: ./out/x}
        """)
    res = cli.fails(2, "validate", "cyc.yaml")
    assert res.err_lines == [
        "tvrecipe: recipe error:",
        ("cyc.yaml:4:3: steps.a: cycle: a -> b -> a (a step cannot depend on itself, directly "
        "or through others)"),
        ("cyc.yaml:6:28: steps.c.inputs[1]: unknown reference 'nope' (known names: a, b, base, "
        "math)")]


def test_an_unknown_reference_is_matched_against_every_name(recipe, cli):
    """Steps are typed in dependency order; a typo's candidates are still every model and
    step of the recipe (but the step itself)."""
    cli.write("typo.yaml", """\
        tvrecipe: 1
        models: {base: ./ckpt/base, math: ./ckpt/math}
        steps:
          model: {op: apply, base: base, delta: merged_}
          tv: {op: extract, base: base, finetuned: [math]}
          merged: {op: sum, inputs: [tv]}
          other: {op: scale, input: zzz, factor: 2}
        outputs:
          o: {from: model, path: ./out/x}
        """)
    res = cli.fails(2, "validate", "typo.yaml")
    assert res.err_lines[1:] == [
        "typo.yaml:4:34: steps.model.delta: unknown reference 'merged_' (did you mean 'merged'?)",
        ("typo.yaml:7:22: steps.other.input: unknown reference 'zzz' (known names: base, math, "
         "merged, model, tv)")]


def test_counts_in_messages_are_in_words(recipe, cli):
    cli.write("w.yaml", """\
        tvrecipe: 1
        models: {base: ./ckpt/base, math: ./ckpt/math}
        steps:
          tv: {op: extract, base: base, finetuned: [math]}
          merged: {op: sum, inputs: [tv], weights: [1, 2, 3]}
          cb: {op: cluster_basis, inputs: tv, k: 3}
        outputs:
          o: {from: merged, path: ./out/x}
          b: {from: cb, path: ./out/b}
        """)
    res = cli.fails(2, "validate", "w.yaml")
    assert any("3 weights for 1 input (give" in line for line in res.err_lines)
    assert any("k = 3 but only 1 task vector is given (use k between 1 and 1, or k: auto)"
               in line for line in res.err_lines)


def test_a_rerun_from_a_cached_step_keeps_the_reports_of_the_steps_before_it(make_models, cli,
                                                                            tmp_path):
    ms = make_models(("math", "code", "toxic"))
    cli.write("cb.yaml", "tvrecipe: 1\n" + ms.models_yaml() + """\
steps:
  tv: {op: extract, base: base, finetuned: [math, code, toxic]}
  basis: {op: cluster_basis, inputs: tv, k: 2}
  merged: {op: sum, inputs: basis}
  model: {op: apply, base: base, delta: merged, scale: 0.5}
outputs:
  model: {from: model, path: ./out/model}
""")
    import json
    cli.ok("run", "cb.yaml", "-q", "--report", "first.json")
    first = json.loads((tmp_path / "first.json").read_text())
    assert "basis" in first
    path = tmp_path / "cb.yaml"
    path.write_text(path.read_text().replace("scale: 0.5", "scale: 0.7"))
    res = cli.ok("run", "cb.yaml", "--report", "second.json")
    assert "from cache: merged" in res.stdout  # basis itself was not looked up
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["basis"] == first["basis"]


def test_a_bare_command_prints_its_help(cli):
    for args in ((), ("cache",)):
        res = cli(*args)
        assert res.exit_code == 0 and res.stderr == "", args
        assert res.stdout.startswith(f"Usage: tvrecipe {' '.join(args)}".rstrip() + " [OPTIONS]")
        assert res.stdout.count("Usage:") == 1
