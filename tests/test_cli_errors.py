"""Bad input from the CLI: every problem reported at once, located, with fixed exit codes, no
traceback, and nothing written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FLOATING, INT_BUFFER, base_weights, finetune, listing, read_tensors
from tests.conftest import save_model as save

REPO = Path(__file__).resolve().parents[1]
INVALID = REPO / "recipes" / "invalid"

MANY_MISTAKES = [
    "tvrecipe: recipe error:",
    "many_mistakes.yaml:4:29: models.math.kidn: unknown field 'kidn' (did you mean 'kind'?)",
    "many_mistakes.yaml:8:12: steps.merged.op: unknown op 'sump' (did you mean 'sum'?)",
    ("many_mistakes.yaml:9:3: steps.model.delta: missing required field 'delta' "
    "(The task vector to add.)"),
]
BAD_REFERENCES = [
    "tvrecipe: recipe error:",
    ("bad_references.yaml:8:39: steps.merged.inputs[1]: 'tv' has no member 'cdoe' "
    "(did you mean 'code'?)"),
    ("bad_references.yaml:9:35: steps.model.delta: step 'model' (apply) wants vector in 'delta', "
    "but 'tv' is a vectors (combine the set first, e.g. {op: sum, inputs: tv}, or pick a member)"),
    ("bad_references.yaml:10:3: steps.loop_a: cycle: loop_a -> loop_b -> loop_a "
    "(a step cannot depend on itself, directly or through others)"),
    ("bad_references.yaml:12:22: steps.oops.inputs: unknown reference 'bsae' "
    "(did you mean 'base'?)"),
]
# Which way round a two-step cycle is printed is covered by test_cycle_message_is_deterministic.
CYCLE_OTHER_WAY = BAD_REFERENCES[3].replace("loop_a -> loop_b -> loop_a",
                                            "loop_b -> loop_a -> loop_b")

SIMPLE = """\
tvrecipe: 1
models:
  base: ./ckpt/base
  ft: {ft}
steps:
  tv: {{op: extract, base: base, finetuned: ft}}
  model: {{op: apply, base: base, delta: tv}}
outputs:
  model: {{from: model, path: {out}}}
"""


def simple(ft: str = "./ckpt/ft", out: str = "./out/model") -> str:
    return SIMPLE.format(ft=ft, out=out)


def checkpoints(root: Path) -> dict[str, torch.Tensor]:
    """A base and one fine-tune under ``root/ckpt``; returns the base weights."""
    base = base_weights(0)
    save(root / "ckpt" / "base", base)
    save(root / "ckpt" / "ft", finetune(base, 1))
    return base


def nothing_written(tmp_path: Path, out: str = "out/model", recipe: str = "r.yaml") -> None:
    """No output, no staging folder, no lock: a failed run leaves no trace of an output."""
    target = tmp_path / out
    assert not target.exists()
    if target.parent.exists():
        assert not [p.name for p in target.parent.iterdir() if p.name.startswith(".")], \
            "a staging folder was left behind"
    assert not (tmp_path / f"{recipe}.lock").exists()


# ---- recipe errors: exit 2, all problems, located --------------------------------------------


@pytest.mark.parametrize("command", ["validate", "run", "plan"])
def test_many_mistakes_reports_every_problem(cli, tmp_path, command):
    shutil.copy(INVALID / "many_mistakes.yaml", tmp_path)
    before = listing(tmp_path)
    res = cli.fails(2, command, "many_mistakes.yaml")
    assert res.err_lines == MANY_MISTAKES
    assert res.stdout == ""
    assert listing(tmp_path) == before


@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_references_reports_every_problem(cli, tmp_path, command):
    shutil.copy(INVALID / "bad_references.yaml", tmp_path)
    before = listing(tmp_path)
    res = cli.fails(2, command, "bad_references.yaml")
    lines = res.err_lines
    if lines[3] == CYCLE_OTHER_WAY:
        lines[3] = BAD_REFERENCES[3]
    assert lines == BAD_REFERENCES
    assert listing(tmp_path) == before


def test_cycle_message_is_deterministic(tmp_path):
    shutil.copy(INVALID / "bad_references.yaml", tmp_path)
    seen = set()
    for seed in ("0", "1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-m", "tvrecipe.cli", "validate",
                               "bad_references.yaml"], check=False, cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        seen.add(next(line.strip() for line in proc.stderr.splitlines() if "cycle" in line))
    assert seen == {BAD_REFERENCES[3]}


def test_yaml_syntax_error_has_line_and_column(cli, tmp_path):
    shutil.copy(INVALID / "syntax_error.yaml", tmp_path)
    res = cli.fails(2, "run", "syntax_error.yaml")
    assert res.err_lines[0] == "tvrecipe: recipe error:"
    assert res.err_lines[1].startswith("syntax_error.yaml:5:6: YAML syntax error: ")
    assert "check indentation" in res.err_lines[1]
    assert listing(tmp_path) == ["syntax_error.yaml"]


def test_other_invalid_recipes(cli, tmp_path):
    for name in ("bad_version.yaml", "not_a_mapping.yaml"):
        shutil.copy(INVALID / name, tmp_path)
    res = cli.fails(2, "validate", "bad_version.yaml")
    assert res.err_lines[1:] == [
        ("bad_version.yaml:1:1: tvrecipe: unsupported format version 2 "
        "(this tvrecipe reads 'tvrecipe: 1')"),
        ("bad_version.yaml:4:1: extras: unknown top-level key 'extras' "
        "(allowed: tvrecipe, name, description, settings, models, steps, outputs)"),
    ]
    res = cli.fails(2, "validate", "not_a_mapping.yaml")
    assert res.err_lines[1:] == [
        ("not_a_mapping.yaml:1:1: a recipe must be a YAML mapping, got a list "
        "(start from a bundled recipe: `tvrecipe new --list`, then `tvrecipe new NAME > my.yaml`)")]


def test_missing_recipe_file(cli):
    res = cli.fails(2, "validate", "nowhere.yaml")
    assert "recipe file not found: nowhere.yaml" in res.stderr


def test_validate_several_files_reports_all(cli, tmp_path):
    shutil.copy(INVALID / "many_mistakes.yaml", tmp_path)
    shutil.copy(INVALID / "bad_references.yaml", tmp_path)
    # validate reads no tensor data: the checkpoints need not exist.
    cli.write("good.yaml", simple())
    res = cli.fails(2, "validate", "many_mistakes.yaml", "good.yaml", "bad_references.yaml")
    assert res.stdout.strip() == "good.yaml: ok (2 steps, 1 output)"
    lines = [line for line in res.err_lines if line != "tvrecipe: recipe error:"
             and not line.startswith("note: good.yaml:")]  # (its models are not there)
    lines = [BAD_REFERENCES[3] if line == CYCLE_OTHER_WAY else line for line in lines]
    assert lines == MANY_MISTAKES[1:] + BAD_REFERENCES[1:]
    assert res.err_lines.count("tvrecipe: recipe error:") == 2


def test_validate_ok_lists_unused_steps(cli):
    cli.write("r.yaml", simple() .replace(
        "steps:\n", "steps:\n  spare: {op: negate, input: tv}\n"))
    res = cli.ok("validate", "r.yaml")
    assert res.stdout.strip() == "r.yaml: ok (2 steps, 1 output; unused steps: spare)"


@pytest.mark.parametrize("size", ["lots", "0"])
def test_bad_shard_size_is_a_recipe_error(cli, tmp_path, size):
    checkpoints(tmp_path)
    cli.write("r.yaml", simple().replace("path: ./out/model}",
                                         f"path: ./out/model, shard_size: {size}}}"))
    res = cli.fails(2, "validate", "r.yaml")
    assert "outputs.model.shard_size" in res.stderr
    cli.fails(2, "run", "r.yaml")
    nothing_written(tmp_path)


# ---- input errors: exit 3 -------------------------------------------------------------------


def test_missing_model_path_is_named_by_plan(cli, tmp_path):
    checkpoints(tmp_path)
    cli.write("r.yaml", simple(ft="./ckpt/nope"))
    res = cli.fails(3, "plan", "r.yaml")
    assert "model 'ft' (./ckpt/nope)" in res.stderr
    assert "no such file or folder" in res.stderr


def test_missing_model_path_is_named_by_run(cli, tmp_path):
    checkpoints(tmp_path)
    cli.write("r.yaml", simple(ft="./ckpt/nope"))
    res = cli.fails(3, "run", "r.yaml")
    assert "no such file or folder" in res.stderr
    assert "model 'ft'" in res.stderr


def test_missing_model_path_run_exit_code(cli, tmp_path):
    checkpoints(tmp_path)
    cli.write("r.yaml", simple(ft="./ckpt/nope"))
    res = cli.fails(3, "run", "r.yaml")
    assert "ckpt/nope: no such file or folder" in res.stderr
    nothing_written(tmp_path)


def test_tensor_missing_in_one_model(cli, tmp_path):
    base = checkpoints(tmp_path)
    ft = finetune(base, 2)
    del ft["model.layers.0.mlp.up_proj.bias"]
    save(tmp_path / "ckpt" / "short", ft)
    cli.write("r.yaml", simple(ft="./ckpt/short"))
    res = cli.fails(3, "run", "r.yaml")
    assert ("tensor 'model.layers.0.mlp.up_proj.bias' is missing from model 'ft' "
            "(present in 'base')") in res.err_lines
    nothing_written(tmp_path)


def test_shape_mismatch(cli, tmp_path):
    base = checkpoints(tmp_path)
    ft = finetune(base, 2)
    ft["model.layers.0.mlp.up_proj.weight"] = torch.zeros(12, 9)
    ft["lm_head.weight"] = torch.zeros(16, 4)
    save(tmp_path / "ckpt" / "wide", ft)
    cli.write("r.yaml", simple(ft="./ckpt/wide"))
    res = cli.fails(3, "run", "r.yaml")
    # Every mismatch at once, each naming the tensor, the model and both shapes.
    assert ("tensor 'model.layers.0.mlp.up_proj.weight' has shape [12, 9] in model 'ft' "
            "but [12, 8] in 'base'") in res.err_lines
    assert "tensor 'lm_head.weight' has shape [16, 4] in model 'ft' but [16, 8] in 'base'" \
        in res.err_lines
    nothing_written(tmp_path)


def test_extra_tensor_in_one_model(cli, tmp_path):
    base = checkpoints(tmp_path)
    ft = finetune(base, 2)
    ft["model.extra.weight"] = torch.zeros(2, 2)
    save(tmp_path / "ckpt" / "extra", ft)
    cli.write("r.yaml", simple(ft="./ckpt/extra"))
    res = cli.fails(3, "plan", "r.yaml")
    assert "tensor 'model.extra.weight' is in model 'ft' but not in 'base'" in res.err_lines


def test_nan_input_is_refused_unless_allowed(cli, tmp_path):
    base = checkpoints(tmp_path)
    ft = finetune(base, 2)
    ft["lm_head.weight"][1, 2] = float("nan")
    save(tmp_path / "ckpt" / "nan", ft)
    cli.write("r.yaml", simple(ft="./ckpt/nan"))
    res = cli.fails(3, "run", "r.yaml")
    assert res.err_lines[1] == ("model 'ft': tensor 'lm_head.weight' contains NaN or Inf; fix "
                                "the checkpoint, or pass --allow-nonfinite to merge it anyway")
    nothing_written(tmp_path)
    cli.ok("run", "r.yaml", "--allow-nonfinite")
    got = read_tensors(tmp_path / "out" / "model")
    assert torch.isnan(got["lm_head.weight"][1, 2])
    assert int(torch.isnan(got["lm_head.weight"]).sum()) == 1
    for k in FLOATING:
        if k != "lm_head.weight":
            assert torch.equal(got[k], ft[k])
    # The lock and the released folder's tvrecipe.lock record it, so that recomputing lets
    # the NaN through as the run did (a lock of a run without it does not say it).
    assert "allow_nonfinite: true" in (tmp_path / "r.yaml.lock").read_text()
    assert "allow_nonfinite: true" in (tmp_path / "out/model/tvrecipe.lock").read_text()
    cli.ok("verify", "r.yaml", "--recompute")
    cli.ok("verify", "out/model", "--recompute")
    cli.write("r.yaml", simple())
    cli.ok("run", "r.yaml", "--force", "-q")
    assert "allow_nonfinite" not in (tmp_path / "r.yaml.lock").read_text()
    assert "allow_nonfinite" not in (tmp_path / "out/model/tvrecipe.lock").read_text()


def test_sha256_pin(cli, tmp_path):
    checkpoints(tmp_path)
    digest = cli.ok("hash", "ckpt/ft").stdout.strip()
    assert len(digest) == 64 and int(digest, 16) >= 0
    cli.write("good.yaml", simple(ft=f"{{path: ./ckpt/ft, sha256: {digest}}}"))
    cli.ok("run", "good.yaml")
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    cli.write("bad.yaml", simple(ft=f"{{path: ./ckpt/ft, sha256: {wrong}}}", out="./out/bad"))
    res = cli.fails(3, "run", "bad.yaml")
    assert f"content hash {digest} does not match the pinned sha256 {wrong}" in res.stderr
    assert "model 'ft'" in res.stderr
    assert "tvrecipe hash ./ckpt/ft" in res.stderr
    nothing_written(tmp_path, "out/bad", "bad.yaml")


def test_a_vectors_folder_is_pinned_with_tvrecipe_hash(cli, tmp_path, make_models):
    """`tvrecipe hash` of a vectors folder (several members and vectors.json) gives the digest
    a run records for it, which a `sha256:` pin then matches."""
    make_models(("math", "code"))
    cli.write("lib.yaml", "tvrecipe: 1\nmodels: {base: ./ckpt/base, math: ./ckpt/math, "
                          "code: ./ckpt/code}\nsteps:\n  tv: {op: extract, base: base, "
                          "finetuned: [math, code]}\noutputs:\n  tv: {from: tv, path: ./lib}\n")
    cli.ok("run", "lib.yaml", "-q")
    digest = cli.ok("hash", "lib").stdout.strip()
    use = ("tvrecipe: 1\nmodels:\n  base: ./ckpt/base\n  lib: {path: ./lib, kind: task_vector"
           "PIN}\nsteps:\n  merged: {op: sum, inputs: lib}\n  model: {op: apply, base: base, "
           "delta: merged}\noutputs:\n  model: {from: model, path: ./out/model}\n")
    cli.write("use.yaml", use.replace("PIN", ""))
    cli.ok("run", "use.yaml", "-q")
    assert f"sha256: {digest}" in (tmp_path / "use.yaml.lock").read_text()
    cli.write("use.yaml", use.replace("PIN", f", sha256: {digest}"))
    cli.ok("run", "use.yaml", "--force", "-q")


def test_pickle_only_folder_gets_conversion_advice(cli, tmp_path):
    checkpoints(tmp_path)
    pickled = tmp_path / "ckpt" / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    (pickled / "config.json").write_text("{}")
    cli.write("r.yaml", simple(ft="./ckpt/pickled"))
    for command in ("run", "plan"):
        res = cli.fails(3, command, "r.yaml")
        assert "holds only pickled weights (pytorch_model.bin)" in res.stderr
        assert "never unpickles" in res.stderr
        assert "torch.load(" in res.stderr and "weights_only=True" in res.stderr
        assert "safetensors.torch.save_file(" in res.stderr
    nothing_written(tmp_path)
    res = cli.fails(3, "hash", "ckpt/pickled")
    assert "holds only pickled weights" in res.stderr


# ---- output errors: exit 4 ------------------------------------------------------------------


def test_existing_output_needs_force(cli, tmp_path):
    base = checkpoints(tmp_path)
    old = tmp_path / "out" / "model"
    old.mkdir(parents=True)
    (old / "old.txt").write_text("keep me")
    cli.write("r.yaml", simple())
    res = cli.fails(4, "run", "r.yaml")
    assert "exists; pass --force to replace it" in res.stderr
    assert listing(old) == ["old.txt"]
    assert [p.name for p in old.parent.iterdir()] == ["model"]
    cli.ok("run", "r.yaml", "--force")
    assert "old.txt" not in listing(old)
    got = read_tensors(old)
    assert torch.equal(got[INT_BUFFER], base[INT_BUFFER])
    assert [p.name for p in old.parent.iterdir()] == ["model"]


@pytest.mark.parametrize("out, relation", [
    ("./ckpt/base/merged", "is inside the input"),
    ("./ckpt", "contains the input"),
    ("./ckpt/ft", "is the input"),
])
def test_output_overlapping_an_input(cli, tmp_path, out, relation):
    checkpoints(tmp_path)
    before = listing(tmp_path / "ckpt")
    cli.write("r.yaml", simple(out=out))
    for command in (("validate",), ("run",), ("run", "--force")):  # (a recipe error now)
        res = cli.fails(2, *command[:1], "r.yaml", *command[1:])
        assert relation in res.stderr
        assert "choose an output path outside every input" in res.stderr
    assert listing(tmp_path / "ckpt") == before


def test_report_in_a_missing_folder_is_an_output_error(cli, tmp_path):
    checkpoints(tmp_path)
    cli.write("r.yaml", simple())
    res = cli.fails(4, "run", "r.yaml", "--report", "nodir/report.json")
    assert "nodir/report.json" in res.stderr


def test_a_report_or_plot_never_overwrites_the_recipe_its_inputs_or_outputs(cli, tmp_path):
    checkpoints(tmp_path)
    cli.write("r.yaml", simple())
    cli.ok("run", "r.yaml", "-q")
    before = listing(tmp_path)
    for path, what in [("ckpt/base/model.safetensors", "input 'base'"),
                       ("ckpt/ft/new.json", "input 'ft'"), ("r.yaml", "the recipe"),
                       ("r.yaml.lock", "its lock file"), ("out/model/rep.json", "output 'model'"),
                       (".tvrecipe/hashes.json", "tvrecipe's folder")]:
        res = cli.fails(4, "run", "r.yaml", "--force", "--report", path)
        where = (tmp_path / path).resolve()
        folder = where if path.startswith("r.yaml") else where.parent
        assert res.err_lines[1:] == [(f"--report {path} would overwrite {what} ({folder}); "
                                     "write it elsewhere")]
        if what != "tvrecipe's folder":
            res = cli.fails(4, "inspect", "r.yaml", "tv", "--plot", path)
            assert res.err_lines[1:] == [(f"--plot {path} would overwrite {what} ({folder}); "
                                         "write it elsewhere")]
    assert listing(tmp_path) == before
    res = cli.fails(4, "inspect", "r.yaml", "tv", "--plot", "nodir/x.png")
    assert res.err_lines[1:] == [("--plot nodir/x.png: folder nodir does not exist; create it "
                                 "or choose another path")]
    res = cli.fails(4, "inspect", "r.yaml", "tv", "--plot", "x.safetensors")
    assert res.err_lines[1:] == ["--plot x.safetensors: the plot is a PNG; name a .png file"]
    cli.ok("run", "r.yaml", "--force", "-q", "--report", "rep.json")  # beside them: fine
    cli.ok("run", "r.yaml", "--force", "-q", "--report", "rep.json")  # and again


def test_engine_imports_pause_the_collector_then_freeze_what_they_loaded(monkeypatch):
    import gc
    import sys

    from tvrecipe.cli import _importing
    assert gc.isenabled()

    class Cycle:
        def __init__(self):
            self.me = self

    garbage = Cycle()
    ref = __import__("weakref").ref(garbage)
    del garbage
    before = gc.get_freeze_count()
    monkeypatch.delitem(sys.modules, "json.scanner")  # something to import
    try:
        with _importing("json.scanner"):
            assert not gc.isenabled()
            kept = [[] for _ in range(1000)]  # objects made while importing
            __import__("json.scanner")
        assert gc.isenabled()
        assert gc.get_freeze_count() >= before + len(kept)
        assert ref() is None  # garbage from before was collected, not frozen
        frozen = gc.get_freeze_count()
        with _importing("json.scanner"):  # imported already: nothing paused or frozen
            assert gc.isenabled()
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_a_negative_decompose_rank_is_a_located_recipe_error(cli, make_models, tmp_path):
    # It reached the kernel before ("runtime error: ... rank must be >= 0, got -1").
    ms = make_models(("a", "b"))
    cli.write("r.yaml", "tvrecipe: 1\n" + ms.models_yaml() + (
        "steps:\n"
        "  tv: {op: extract, base: base, finetuned: [a, b]}\n"
        "  p: {op: decompose, inputs: tv, rank: -1}\n"
        "outputs:\n"
        "  u: {from: p.unique, path: ./out/model}\n"))
    res = cli.fails(2, "run", "r.yaml")
    assert res.err_lines[1] == (
        "r.yaml:8:34: steps.p.rank: Input should be greater than or equal to 0, got -1")
    nothing_written(tmp_path)


def test_two_inputs_of_one_name_are_refused_where_results_are_named_by_input(
        cli, make_models, tmp_path):
    # decompose's parts and compress_basis's tasks are named by input: with two inputs named
    # t1, one part silently replaced the other before. A weight mapping cannot tell them
    # apart either; a list can.
    ms = make_models(("t1", "t2"))
    cli.write("r.yaml", "tvrecipe: 1\n" + ms.models_yaml() + (
        "steps:\n"
        "  tv: {op: extract, base: base, finetuned: [t1, t2]}\n"
        "  tw: {op: extract, base: base, finetuned: {t1: t2, t2: t1}}\n"
        "  p: {op: decompose, inputs: [tv.t1, tw.t1]}\n"
        "  c: {op: compress_basis, inputs: [tv, tw], m: 1}\n"
        "  s: {op: sum, inputs: [tv, tw], weights: {t1: 1, t2: 2}}\n"
        "  s2: {op: sum, inputs: [tv, tw], weights: [1, 2]}\n"
        "outputs:\n"
        "  u: {from: p.unique, path: ./out/model}\n"
        "  c: {from: c, path: ./out/c}\n"
        "  s: {from: s, path: ./out/s}\n"
        "  s2: {from: s2, path: ./out/s2}\n"))
    res = cli.fails(2, "run", "r.yaml")
    assert res.err_lines[1:] == [
        ("r.yaml:9:22: steps.p.inputs: two inputs are named 't1' (tv.t1 and tw.t1), and the "
        "parts are named by input: one would replace the other (give them distinct names: "
        "extract takes a mapping, such as finetuned: {t1_b: t1})"),
        ("r.yaml:10:27: steps.c.inputs: two inputs are named 't1' (tv.t1 and tw.t1), and the "
        "tasks a rebuild gives back are named by input: one would replace the other (give "
        "them distinct names: extract takes a mapping, such as finetuned: {t1_b: t1})"),
        ("r.yaml:11:34: steps.s.weights: a weight mapping cannot tell apart the inputs named "
        "'t1' (tv.t1 and tw.t1) (give the weights as a list, one per entry of 'inputs', or "
        "one number)")]
    nothing_written(tmp_path)
    # Renamed, the same recipe runs, and the list of weights applies per reference.
    cli.write("r.yaml", (tmp_path / "r.yaml").read_text()
              .replace("{t1: t2, t2: t1}", "{t1_b: t2, t2_b: t1}")
              .replace("tw.t1]", "tw.t1_b]").replace("weights: {t1: 1, t2: 2}", "weights: 1"))
    cli.ok("run", "r.yaml")
    got = read_tensors(tmp_path / "out" / "s2")
    want = {k: 3 * (ms.delta("t1")[k] + ms.delta("t2")[k]) for k in got}
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], atol=1e-6, rtol=1e-5)


def test_a_boolean_seed_is_refused(cli, make_models):
    # `seed: true` read as seed 1 before.
    ms = make_models(("a",))
    cli.write("r.yaml", "tvrecipe: 1\nsettings: {seed: true}\n" + ms.models_yaml() + (
        "steps:\n  tv: {op: extract, base: base, finetuned: a}\n"
        "outputs:\n  v: {from: tv, path: ./out/v}\n"))
    res = cli.fails(2, "validate", "r.yaml")
    assert res.err_lines[1] == "r.yaml:2:12: settings.seed: Input should be a valid integer, got True"


def test_a_lock_that_cannot_be_written_stops_the_run_before_any_output(cli, tmp_path,
                                                                       monkeypatch):
    import errno

    from tvrecipe.store import lock
    checkpoints(tmp_path)
    cli.write("r.yaml", simple())
    (tmp_path / "r.yaml.lock").mkdir()
    res = cli.fails(4, "run", "r.yaml")
    assert res.err_lines[1:] == [("the lock file r.yaml.lock is a folder; remove it or move it "
                                 "away, then run again (nothing was run)")]
    assert not (tmp_path / "out").exists()
    (tmp_path / "r.yaml.lock").rmdir()

    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(lock.tempfile, "mkstemp", read_only)
        res = cli.fails(4, "run", "r.yaml")
    assert res.err_lines[1:] == [("cannot write the lock file r.yaml.lock: Read-only file "
                                 "system; check the permissions of . and the space on its disk "
                                 "(nothing was run)")]
    nothing_written(tmp_path)
    cli.ok("run", "r.yaml", "-q")
    assert (tmp_path / "r.yaml.lock").is_file()


def test_della_probabilities_outside_the_unit_interval_are_refused_by_validate(cli, tmp_path):
    checkpoints(tmp_path)
    cli.write("r.yaml", simple().replace(
        "  model: {op: apply, base: base, delta: tv}",
        "  d: {op: della, input: tv, density: 0.5, epsilon: 0.9}\n"
        "  model: {op: apply, base: base, delta: d}"))
    for command in ("validate", "run"):
        res = cli.fails(2, command, "r.yaml")
        assert res.err_lines[1:] == [
            ("r.yaml:7:3: steps.d: density ± epsilon must lie strictly inside (0, 1), got density "
            "0.5 and epsilon 0.9 (take epsilon below 0.5)")]
    nothing_written(tmp_path)
    cli.write("r.yaml", (tmp_path / "r.yaml").read_text().replace("0.9", "0.4"))
    cli.ok("run", "r.yaml", "-q")


def _edited(lock: str, edit) -> str:
    import yaml
    data = yaml.safe_load(lock)
    edit(data)
    return yaml.safe_dump(data)


def _digest_as_number(lock: str) -> str:
    import re
    return re.sub(r"(\n  sha256: )[0-9a-f]{64}", r"\g<1>123456", lock, count=1)


@pytest.mark.parametrize("text, why", [
    ("- 1\n", "not a version-1 tvrecipe lock file"),
    ("a: [\n", "unreadable lock file (while parsing a flow node)"),
    (b"lock_version: \xe9\n", ("unreadable lock file ('utf-8' codec can't decode byte 0xe9 in "
                                "position 14: invalid continuation byte)")),
    # (a digest of digits alone, as YAML reads it unquoted: a number)
    (_digest_as_number, ("recipe.sha256 should be text, got 123456 (edited by hand, or "
                        "damaged)")),
    (lambda lock: lock.replace("\nsteps:\n", "\nsteps:\n- a\nx:\n"),
     "steps should be a mapping, got ['a'] (edited by hand, or damaged)"),
    (lambda lock: _edited(lock, lambda d: d["outputs"]["model"].update(files=None)),
     "outputs.model.files is empty (edited by hand, or damaged)"),
    (lambda lock: _edited(lock, lambda d: d["recipe"].update(sha256=None)),
     "recipe.sha256 should be text, got nothing (edited by hand, or damaged)"),
])
def test_a_damaged_lock_is_replaced_by_run_force(cli, tmp_path, text, why):
    checkpoints(tmp_path)
    cli.write("r.yaml", simple())
    cli.ok("run", "r.yaml", "-q")
    lock = tmp_path / "r.yaml.lock"
    if isinstance(text, bytes):  # (not UTF-8)
        lock.write_bytes(text)
    else:
        lock.write_text(text if isinstance(text, str) else text(lock.read_text()))
    for command in (("run", "r.yaml"), ("verify", "r.yaml")):
        res = cli.fails(6, *command)
        assert res.err_lines[1:] == [(f"r.yaml.lock: {why}; `tvrecipe run --force` writes the "
                                     "outputs and a new lock")]
    cli.ok("run", "r.yaml", "--force", "-q")
    cli.ok("verify", "r.yaml")


def test_outputs_that_nest_are_a_recipe_error(cli, tmp_path):
    checkpoints(tmp_path)
    recipe = simple() + "  tv: {from: tv, path: ./out/model/tv}\n"
    cli.write("r.yaml", recipe)
    for command in ("validate", "run"):
        res = cli.fails(2, command, "r.yaml")
        assert res.err_lines[1:] == [
            (f"r.yaml:10:18: outputs.tv.path: output path './out/model/tv' nests with output "
            f"'model''s: {tmp_path / 'out/model/tv'} lies inside {tmp_path / 'out/model'} "
            "(write each output to a folder of its own, side by side)")]
    nothing_written(tmp_path)
    cli.write("r.yaml", recipe.replace("./out/model/tv", "./out/tv"))
    cli.ok("run", "r.yaml", "-q")


def test_an_output_in_tvrecipes_own_folder_is_a_recipe_error(cli, tmp_path):
    checkpoints(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / ".tvrecipe").symlink_to(tmp_path / "elsewhere")  # (a link: where it leads)
    for path in ("./.tvrecipe", "./.tvrecipe/out"):
        cli.write("r.yaml", simple(out=path))
        res = cli.fails(2, "validate", "r.yaml")
        assert res.err_lines[1:] == [
            (f"r.yaml:9:24: outputs.model.path: output path {path!r} is in tvrecipe's own "
             f"folder {tmp_path / 'elsewhere'} (its cache and hash memo), which a run writes "
             "and replaces (write the output elsewhere)")]


def test_an_empty_model_path_is_a_recipe_error(cli, tmp_path):
    checkpoints(tmp_path)
    cli.write("r.yaml", simple(ft='""'))
    res = cli.fails(2, "validate", "r.yaml")
    assert res.err_lines[1:] == [("r.yaml:4:3: models.ft.path: a model path is empty; write the "
                                 "folder or file of the model, relative to the recipe's folder")]


def test_a_checkpoint_declared_a_task_vector_is_warned_about(cli, tmp_path):
    checkpoints(tmp_path)
    (tmp_path / "ckpt" / "ft" / "config.json").write_text("{}")
    recipe = ("tvrecipe: 1\nmodels:\n  base: ./ckpt/base\n  tvx: {path: PATH, kind: task_vector}\n"
              "steps:\n  m: {op: apply, base: base, delta: tvx}\n"
              "outputs:\n  m: {from: m, path: ./out/m}\n")
    cli.write("r.yaml", recipe.replace("PATH", "./ckpt/ft"))
    warning = ("warning: r.yaml:4:3: models.tvx: ./ckpt/ft holds a config.json and weights "
               "tvrecipe did not write, as a fine-tuned checkpoint does, yet kind: task_vector "
               "adds them whole as a delta; if it is a fine-tuned model, drop the kind and take "
               "its task vector with {op: extract, base: ..., finetuned: [tvx]}")
    assert cli.ok("validate", "r.yaml").err_lines == [warning]
    assert cli.ok("run", "r.yaml", "-q").err_lines == [f"tvrecipe: {warning}"]
    # A merged checkpoint tvrecipe wrote is no task vector either.
    (tmp_path / "out" / "m" / "config.json").write_text("{}")
    cli.write("r2.yaml", recipe.replace("PATH", "./out/m").replace("./out/m}", "./out/m2}"))
    assert cli.ok("validate", "r2.yaml").err_lines == [
        warning.replace("r.yaml", "r2.yaml").replace("./ckpt/ft", "./out/m")]
    # A vector a run wrote (with the base's config.json copied beside it): no warning.
    cli.write("tv.yaml", simple(out="./out/tv").replace("from: model", "from: tv").replace(
        "path: ./out/tv}", "path: ./out/tv, copy_files_from: base}"))
    cli.ok("run", "tv.yaml", "-q")
    (tmp_path / "out" / "tv" / "config.json").write_text("{}")
    cli.write("r.yaml", recipe.replace("PATH", "./out/tv"))
    assert cli.ok("validate", "r.yaml").err_lines == []


def test_a_task_vector_folder_not_written_yet_says_so(cli, tmp_path):
    checkpoints(tmp_path)
    recipe = ("tvrecipe: 1\nmodels:\n  base: ./ckpt/base\n  lib: {path: ./lib, kind: task_vector}"
              "\nsteps:\n  m: {op: sum, inputs: INPUTS}\n  model: {op: apply, base: base, delta: m}"
              "\noutputs:\n  model: {from: model, path: ./out/model}\n")
    cli.write("r.yaml", recipe.replace("INPUTS", "[lib.b0, lib.b1]"))
    res = cli.fails(2, "validate", "r.yaml")
    assert res.err_lines[1:] == [
        (f"r.yaml:6:{col}: steps.m.inputs[{i}]: 'lib' is a task_vector model whose folder ./lib "
         "does not exist yet, so its members are not known (run the recipe that writes it first)")
        for i, col in ((0, 25), (1, 33))]
    cli.write("r.yaml", recipe.replace("INPUTS", "lib"))
    cli.ok("validate", "r.yaml")
    res = cli.fails(3, "run", "r.yaml")
    assert res.err_lines[1:] == [
        (f"model 'lib' (./lib): {tmp_path / 'lib'} does not exist yet; a task_vector folder is "
        "the vector or vectors output of a recipe: run that recipe first (or check the path)")]
    nothing_written(tmp_path)


def test_a_union_field_gets_one_problem_naming_its_forms(cli, tmp_path):
    checkpoints(tmp_path)
    cli.write("r.yaml", "tvrecipe: 1\nmodels:\n  base: 5\n  m: ./ckpt/ft\n  c: ./ckpt/ft\n"
                        "steps:\n  tv: {op: extract, base: base, finetuned: [m, c]}\n"
                        "  s: {op: sum, inputs: tv, weights: abc}\n"
                        "  b: {op: cluster_basis, inputs: tv, k: 1.5}\n"
                        "  d: {op: decompose, inputs: tv, rank: {energy: 1.5}}\n"
                        "outputs:\n  tv: {from: s, path: ./o}\n")
    assert cli.fails(2, "validate", "r.yaml").err_lines[1:] == [
        ("r.yaml:3:3: models.base: a model is a path, or a mapping such as {path: ./ckpt/x, kind: "
        "task_vector}, got 5"),
        ("r.yaml:8:28: steps.s.weights: Input should be a valid number, a valid list or a valid "
        "dictionary, got 'abc'"),
        "r.yaml:9:38: steps.b.k: Input should be a valid integer or 'auto', got 1.5",
        "r.yaml:10:41: steps.d.rank.energy: Input should be less than or equal to 1, got 1.5"]


def test_a_boolean_is_no_number_nor_a_format_version(cli, tmp_path):
    """YAML's true equals 1 in Python: `weights: true` ran as weight 1 and `tvrecipe: true`
    as version 1, though `factor: true` was refused."""
    checkpoints(tmp_path)
    cli.write("r.yaml", "tvrecipe: true\nmodels:\n  base: ./ckpt/base\n  m: ./ckpt/ft\n"
                        "steps:\n  tv: {op: extract, base: base, finetuned: [m]}\n"
                        "  s: {op: sum, inputs: tv, weights: true}\n"
                        "  t: {op: sum, inputs: tv, weights: '1e-3'}\n"
                        "  b: {op: cluster_basis, inputs: tv, k: true}\n"
                        "  d: {op: decompose, inputs: tv, rank: true}\n"
                        "  p: {op: ties, inputs: tv, normalize: false}\n"
                        "outputs:\n  tv: {from: s, path: ./o}\n")
    assert cli.fails(2, "validate", "r.yaml").err_lines[1:] == [
        "r.yaml:1:1: tvrecipe: unsupported format version true (this tvrecipe reads 'tvrecipe: 1')",
        "r.yaml:7:28: steps.s.weights: expected a number, got true",
        "r.yaml:9:38: steps.b.k: expected a number, got true",
        "r.yaml:10:34: steps.d.rank: expected a number, got true"]


def test_a_weights_file_or_a_missing_recipe_is_named_as_such(cli, tmp_path):
    checkpoints(tmp_path)
    res = cli.fails(2, "run", "ckpt/base/model.safetensors")
    assert res.err_lines[1:] == [
        ("ckpt/base/model.safetensors: this is safetensors weights, not a recipe (YAML text) (give "
        "the recipe file, e.g. `tvrecipe run recipe.yaml`; a model's folder goes in the "
        "recipe's models:)")]
    for command in ("ls", "du", "gc", "clear"):
        res = cli.fails(2, "cache", command, "typo.yaml")
        assert res.err_lines[1:] == [("recipe file not found: typo.yaml (its cache is the one "
                                     "beside it; --cache-dir names a cache folder directly)")]


def test_a_value_not_of_its_form_names_the_field_and_the_form(cli, tmp_path):
    checkpoints(tmp_path)
    cli.write("r.yaml", simple().replace("tvrecipe: 1\n", "tvrecipe: 1\nsettings: {device: gpu}\n")
              .replace("finetuned: ft}", 'finetuned: [ft, "f t"]}'))
    assert cli.fails(2, "validate", "r.yaml").err_lines[1:] == [
        ("r.yaml:2:12: settings.device: 'gpu' is not a valid value of 'device' (Where kernels "
        "run: `auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.)"),
        ("r.yaml:7:49: steps.tv.finetuned[1]: 'f t' is not a valid value of 'finetuned' (a name "
        "starts with a letter or '_' and uses letters, digits, '_' and '-'; a member is "
        "NAME.MEMBER)")]


@pytest.mark.parametrize("cache_dir, message", [
    ("out/model/cache", ("the cache folder {root}/out/model/cache lies inside output 'model' "
     "({root}/out/model), which a run replaces whole")),
    ("out", ("output 'model' ({root}/out/model) lies inside the cache folder {root}/out, which "
     "holds the cache")),
])
def test_a_cache_folder_that_nests_with_an_output_is_refused(cli, tmp_path, cache_dir, message):
    # (a cache inside an output made the run refuse the output it had just created, and
    # --force then deleted the cache)
    checkpoints(tmp_path)
    cli.write("r.yaml", simple())
    res = cli.fails(4, "run", "r.yaml", "--cache-dir", cache_dir)
    assert res.err_lines[1:] == [message.format(root=tmp_path.resolve()) + (
        ": choose a --cache-dir (or TVRECIPE_CACHE) outside every output (nothing was run)")]
    assert not (tmp_path / "out").exists()
    nothing_written(tmp_path)


def test_a_quoted_format_version_says_to_unquote_it(cli):
    cli.write("r.yaml", 'tvrecipe: "1"\nmodels: {}\noutputs: {}\n')
    assert cli.fails(2, "validate", "r.yaml").err_lines[1] == (
        "r.yaml:1:1: tvrecipe: unsupported format version '1' (the version is a number: write "
        "it without quotes, 'tvrecipe: 1')")


def test_verify_of_a_lock_that_is_a_folder_says_so(cli, tmp_path):
    checkpoints(tmp_path)
    cli.write("r.yaml", simple())
    (tmp_path / "r.yaml.lock").mkdir()
    assert cli.fails(6, "verify", "r.yaml").err_lines[1:] == [
        ("the lock file r.yaml.lock is a folder; remove it or move it away, then `tvrecipe run` "
        "writes the lock")]


def test_an_output_under_a_file_says_the_file_is_in_the_way(cli, tmp_path):
    checkpoints(tmp_path)
    cli.write("r.yaml", simple())
    (tmp_path / "out").write_text("notes")
    assert cli.fails(4, "run", "r.yaml").err_lines[1:] == [
        (f"cannot write {tmp_path}/out: {tmp_path}/out is a file, not a folder; move that file "
        "away or write the output elsewhere")]
    assert (tmp_path / "out").read_text() == "notes"


@pytest.mark.parametrize("args", [("plan", "r.yaml"), ("--help",)])
def test_a_closed_stdout_ends_the_command_quietly_with_exit_141(tmp_path, args):
    # `tvrecipe plan r.yaml | head -1`: head leaves before tvrecipe writes. That was
    # "internal error: BrokenPipeError", exit 70; now silent, 141 (128 + SIGPIPE), as other
    # command-line tools. (The reading end is closed before the interpreter has started.)
    checkpoints(tmp_path)
    (tmp_path / "r.yaml").write_text(simple())
    proc = subprocess.Popen([sys.executable, "-m", "tvrecipe.cli", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert err == b""
