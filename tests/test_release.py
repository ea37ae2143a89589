"""Releases that explain themselves: model card, pinned recipe and lock entry in checkpoint
outputs, and ``tvrecipe verify FOLDER`` on a folder with no recipe beside it."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import snapshot
from tvrecipe.store.hashing import checkpoint_digest

STEPS = """\
steps:
  tv: {op: extract, base: base, finetuned: [math, code, toxic]}
  merged: {op: sum, inputs: [tv.math, tv.code], weights: [0.5, 0.5]}
  model: {op: apply, base: base, delta: merged, scale: 0.8}
  math_only: {op: apply, base: base, delta: tv.math}
"""


def project(make_models, cli, outputs: str, name: str = "r.yaml"):
    ms = make_models(("math", "code", "toxic"))
    text = ("tvrecipe: 1\nname: release test\ndescription: Two skills in one model.\n"
            + ms.models_yaml() + STEPS + "outputs:\n" + outputs)
    return ms, cli.write(name, text)


OUTPUTS = ("  model: {from: model, path: ./out/model}\n"
           "  math: {from: math_only, path: ./out/math, dtype: bfloat16}\n"
           "  copy: {from: base, path: ./out/copy}\n"
           "  vectors: {from: tv, path: ./out/vectors}\n")
INPUTS = ["--input", "base=ckpt/base", "--input", "math=ckpt/math", "--input", "code=ckpt/code",
          "--input", "toxic=ckpt/toxic"]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_checkpoint_outputs_carry_card_pinned_recipe_and_lock_entry(make_models, cli, tmp_path):
    ms, _ = project(make_models, cli, OUTPUTS)
    cli.ok("run", "r.yaml", "-q")
    out = tmp_path / "out"
    digests = {m: checkpoint_digest([ms.path(m) / "model.safetensors"]) for m in ms.weights}

    # The pinned recipe holds only what its output needs, paths from the folder, hashes pinned.
    pinned = yaml.safe_load((out / "math" / "tvrecipe.yaml").read_text())
    assert pinned["models"] == {m: {"path": f"../../ckpt/{m}", "sha256": digests[m]}
                                for m in ("base", "math", "code", "toxic")}
    assert list(pinned["steps"]) == ["tv", "math_only"]  # not merged, not model
    assert pinned["steps"]["tv"] == {"op": "extract", "base": "base",
                                     "finetuned": ["math", "code", "toxic"]}
    assert pinned["outputs"] == {"math": {"from": "math_only", "path": ".", "dtype": "bfloat16"}}
    assert pinned["name"] == "release test"
    full = yaml.safe_load((out / "model" / "tvrecipe.yaml").read_text())
    assert list(full["models"]) == ["base", "math", "code", "toxic"]
    assert list(full["steps"]) == ["tv", "merged", "model"]
    copy = yaml.safe_load((out / "copy" / "tvrecipe.yaml").read_text())
    assert copy["models"] == {"base": {"path": "../../ckpt/base", "sha256": digests["base"]}}
    assert "steps" not in copy
    assert "No steps: the output is an input model, written again." in (
        out / "copy" / "README.md").read_text()

    # The lock entry: every other file by hash, and the same inputs and keys as the run's lock.
    main_lock = yaml.safe_load((tmp_path / "r.yaml.lock").read_text())
    for name in ("model", "math", "copy"):
        folder = out / name
        entry = yaml.safe_load((folder / "tvrecipe.lock").read_text())
        assert entry["files"] == {p.name: sha(p) for p in folder.iterdir()
                                  if p.name != "tvrecipe.lock"}
        assert entry["recipe"] == {"file": "tvrecipe.yaml", "sha256": sha(folder / "tvrecipe.yaml")}
        assert entry["built_from"] == {"file": "r.yaml", "sha256": hashlib.sha256(json.dumps(
            yaml.safe_load((tmp_path / "r.yaml").read_text()), sort_keys=True,
            ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()}
        assert entry["output"] == name
        # tvrecipe and torch: the recipe's lock also records numpy and scikit-learn,
        # and Python, which would make a rebuild's lock differ after an upgrade of either.
        assert entry["tool"] == {k: main_lock["tool"][k] for k in ("tvrecipe", "torch")}
        assert {"numpy", "scikit-learn"} <= set(main_lock["tool"])
        for m, e in entry["inputs"].items():
            assert e["sha256"] == main_lock["inputs"][m]["sha256"] == digests[m]
        for s, key in entry["steps"].items():
            assert key == main_lock["steps"][s]
        # The run's lock covers the three files too.
        assert set(main_lock["outputs"][name]["files"]) == {p.name for p in folder.iterdir()}

    # The card: Hub front matter, the steps in words, every input with its hash, the recipe.
    card = (out / "model" / "README.md").read_text()
    assert front_matter(card) == {"library_name": "transformers",
                                  "tags": ["merge", "tvrecipe", "task-vectors"]}
    assert "# release test\n\nTwo skills in one model.\n" in card
    assert ("- `merged` = `sum` (inputs: [tv.math, tv.code], weights: [0.5, 0.5]): Weighted sum "
            "of task vectors (task arithmetic).") in card
    for m in ("base", "math", "code", "toxic"):
        assert f"| `{m}` | `../../ckpt/{m}` | `{digests[m]}` |" in card
    assert "```yaml\n" + (out / "model" / "tvrecipe.yaml").read_text() in card
    assert "tvrecipe verify . --recompute" in card

    # Task vectors carry their own index, no card.
    assert sorted(p.name for p in (out / "vectors").iterdir()) == [
        "code.safetensors", "math.safetensors", "toxic.safetensors", "vectors.json"]


def test_release_files_do_not_depend_on_where_the_project_lives(make_models, cli, tmp_path):
    project(make_models, cli, OUTPUTS)
    cli.ok("run", "r.yaml", "-q")
    moved = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("out", ".tvrecipe", "elsewhere",
                                                                    "*.lock"))
    cli.ok("run", str(moved / "r.yaml"), "-q")
    for name in ("model", "math"):
        assert snapshot(moved / "out" / name) == snapshot(tmp_path / "out" / name)


def test_a_project_with_absolute_model_paths_moves_without_changing_its_releases(
        make_models, cli, tmp_path):
    # Absolute paths are written as they are: as a path from the output folder they would
    # change when the project moves (and the release's bytes with them).
    project(make_models, cli, "  model: {from: model, path: ./out/model}\n")
    recipe = (tmp_path / "r.yaml").read_text().replace("./ckpt/", f"{tmp_path}/ckpt/")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "r.yaml").write_text(recipe)
    cli.ok("run", str(tmp_path / "a" / "r.yaml"), "-q")
    moved = tmp_path / "b" / "deeper"
    moved.mkdir(parents=True)
    (moved / "r.yaml").write_text(recipe)
    cli.ok("run", str(moved / "r.yaml"), "-q")
    assert snapshot(moved / "out" / "model") == snapshot(tmp_path / "a" / "out" / "model")
    pinned = yaml.safe_load((moved / "out" / "model" / "tvrecipe.yaml").read_text())
    assert pinned["models"]["base"]["path"] == f"{tmp_path}/ckpt/base"
    cli.ok("verify", str(moved / "r.yaml"), "--recompute")


def test_a_release_outside_the_project_is_the_same_from_any_clone(make_models, cli, tmp_path):
    # An absolute output path (a scratch disk) with relative model paths: a path from the
    # output to the models would change with where the project is checked out, so the
    # release keeps the recipe's own paths (relative to the recipe's folder), and a clone
    # elsewhere reproduces it byte for byte (`run --locked`).
    project(make_models, cli, f"  model: {{from: model, path: {tmp_path}/scratch/m}}\n")
    recipe = (tmp_path / "r.yaml").read_text()
    for where in ("alice", "team/bob"):
        shutil.copytree(tmp_path / "ckpt", tmp_path / where / "ckpt")
        (tmp_path / where / "r.yaml").write_text(recipe)
    cli.ok("run", str(tmp_path / "alice" / "r.yaml"), "-q")
    release = tmp_path / "scratch" / "m"
    before = snapshot(release)
    pinned = (release / "tvrecipe.yaml").read_text()
    assert yaml.safe_load(pinned)["models"]["base"]["path"] == "./ckpt/base"
    assert ("# folder). Model paths are relative to the folder of the recipe that built it "
            "(give\n# --input NAME=PATH for each one from elsewhere); each input") in pinned
    assert "| `base` | `./ckpt/base` |" in (release / "README.md").read_text()
    shutil.copy(tmp_path / "alice" / "r.yaml.lock", tmp_path / "team" / "bob" / "r.yaml.lock")
    shutil.rmtree(release)
    cli.ok("run", str(tmp_path / "team" / "bob" / "r.yaml"), "--locked", "-q")
    assert snapshot(release) == before
    res = cli.fails(3, "verify", str(release), "--recompute")
    assert "tvrecipe.yaml names inputs that are not there: 'base' (./ckpt/base)" in res.stderr
    cli.ok("verify", str(release), "--recompute", "--input", f"base={tmp_path}/ckpt/base",
           *[f"--input={m}={tmp_path}/ckpt/{m}" for m in ("math", "code", "toxic")])


def test_verify_folder_checks_every_file_against_the_lock_it_carries(make_models, cli, tmp_path):
    project(make_models, cli, OUTPUTS)
    cli.ok("run", "r.yaml", "-q")
    folder = tmp_path / "out" / "model"
    res = cli.ok("verify", "out/model")
    assert res.stdout == "out/model: ok, 5 files match its tvrecipe.lock (built from r.yaml)\n"

    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    (folder / "notes.txt").write_text("hand-made\n")
    (folder / "tokenizer_config.json").unlink()
    res = cli.fails(6, "verify", "out/model")
    assert res.err_lines[:2] == ["tvrecipe: verify error:",
                                 "out/model does not match its tvrecipe.lock:"]
    assert res.err_lines[2].startswith("out/model/model.safetensors: content differs from the "
                                       "lock (sha256 ")
    assert res.err_lines[3:] == ["out/model/notes.txt: not in the lock",
                                 "out/model/tokenizer_config.json: missing"]

    lock = folder / "tvrecipe.lock"  # a digest YAML reads as a number: said, not a crash
    lock.write_text(re.sub(r"(\n  config.json: )[0-9a-f]{64}", r"\g<1>123456", lock.read_text()))
    res = cli.fails(6, "verify", "out/model")
    assert res.err_lines[1:] == [(f"{Path('out/model/tvrecipe.lock')}: files.config.json should "
                                 "be text, got 123456: not the lock tvrecipe wrote")]


def test_verify_recompute_rebuilds_the_folder_from_its_own_recipe(make_models, cli, tmp_path):
    project(make_models, cli, OUTPUTS)
    cli.ok("run", "r.yaml", "-q")
    folder = tmp_path / "out" / "math"
    before = snapshot(tmp_path / "out")
    res = cli.ok("verify", "out/math", "--recompute")
    assert res.stdout == ("out/math: ok, 5 files match its tvrecipe.lock, and rebuilding them "
                          "from tvrecipe.yaml gave the same bytes\n")
    assert snapshot(tmp_path / "out") == before  # nothing written into or beside the folder
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tvrecipe-")) == []

    # Other weights whose hash is put in the lock pass a plain verify; a rebuild catches them.
    weights = folder / "model.safetensors"
    other = tmp_path / "out" / "model" / "model.safetensors"
    entry = yaml.safe_load((folder / "tvrecipe.lock").read_text())
    weights.write_bytes(other.read_bytes())
    entry["files"]["model.safetensors"] = sha(weights)
    (folder / "tvrecipe.lock").write_text(yaml.safe_dump(entry))
    cli.ok("verify", "out/math")
    res = cli.fails(6, "verify", "out/math", "--recompute")
    assert res.err_lines[1] == ("rebuilding out/math from its tvrecipe.yaml gave other bytes than "
                                "its tvrecipe.lock:")
    assert res.err_lines[2].startswith("recomputed out/math/model.safetensors: content differs")
    assert res.err_lines[2].endswith(  # (another output's float32 weights put in its place)
        "…): 7 of 8 tensors differ; the most, 'lm_head.weight': bfloat16 [16, 8] against locked "
        "float32 [16, 8]")
    assert len(res.err_lines) == 3
    # The same tensors with other metadata: said so.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    cli.ok("run", "r.yaml", "-q", "--force")
    with safe_open(weights, framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(weights), weights, metadata={**metadata, "note": "re-saved"})
    entry = yaml.safe_load((folder / "tvrecipe.lock").read_text())
    entry["files"]["model.safetensors"] = sha(weights)
    (folder / "tvrecipe.lock").write_text(yaml.safe_dump(entry))
    res = cli.fails(6, "verify", "out/math", "--recompute")
    assert res.err_lines[2].endswith("…): every tensor is equal; the metadata differs (note)")


def test_a_moved_folder_rebuilds_with_inputs_given_where_they_are(make_models, cli, tmp_path):
    project(make_models, cli, OUTPUTS)
    cli.ok("run", "r.yaml", "-q")
    shutil.copytree(tmp_path / "out" / "math", tmp_path / "download" / "a" / "b" / "math")
    res = cli.fails(3, "verify", "download/a/b/math", "--recompute")
    assert res.err_lines[0] == "tvrecipe: input error:"
    assert res.err_lines[1:] == [
        ("download/a/b/math/tvrecipe.yaml names inputs that are not there: 'base' "
        "(../../ckpt/base), 'math' (../../ckpt/math), 'code' (../../ckpt/code), 'toxic' "
        "(../../ckpt/toxic); pass --input NAME=PATH for each (its pinned sha256 makes sure it "
        "is the same model; a release written to an absolute path names them relative to the "
        "folder of the recipe that built it)")]

    # Only some inputs given: the others are looked for where the folder's recipe says,
    # relative to the folder (not to the temporary copy of the recipe), and named so.
    res = cli.fails(3, "verify", "download/a/b/math", "--recompute", "--input", "base=ckpt/base")
    assert ".tvrecipe-verify" not in res.stderr
    assert "names inputs that are not there: 'math' (../../ckpt/math), 'code'" in res.stderr
    assert "'base'" not in res.stderr  # (given)

    res = cli.ok("verify", "download/a/b/math", "--recompute", *INPUTS)
    assert res.stdout.endswith("gave the same bytes (README.md and tvrecipe.yaml aside: they "
                               "name the original input paths)\n")
    res = cli.fails(6, "verify", "download/a/b/math", "--recompute", *INPUTS[2:], "--input",
                    "base=ckpt/code")
    assert res.err_lines[1:] == [
        "download/a/b/math/tvrecipe.yaml no longer computes what tvrecipe.lock records:",
        (f"input 'base' ({tmp_path / 'ckpt' / 'code'}) has sha256 "
        f"{checkpoint_digest([tmp_path / 'ckpt' / 'code' / 'model.safetensors'])[:12]}…; the "
        f"folder was built from {checkpoint_digest([tmp_path / 'ckpt/base/model.safetensors'])[:12]}…")]
    res = cli.fails(2, "verify", "download/a/b/math", "--recompute", "--input", "bse=ckpt/base")
    assert res.err_lines[1] == ("--input bse=...: download/a/b/math/tvrecipe.yaml has no model "
                                "'bse'; it has base, math, code, toxic")
    res = cli.fails(2, "verify", "download/a/b/math", "--recompute", "--input", "base")
    assert res.err_lines[1] == ("--input 'base': expected NAME=PATH, e.g. --input "
                                "base=./models/base")


def test_model_card_false_writes_none_of_the_three(make_models, cli, tmp_path):
    project(make_models, cli, "  model: {from: model, path: ./out/model, model_card: false}\n")
    cli.ok("run", "r.yaml", "-q")
    folder = tmp_path / "out" / "model"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer_config.json"]
    cli.ok("verify", "r.yaml")
    # (a wrong argument, exit 2, not a mismatch with a lock, exit 6)
    res = cli.fails(2, "verify", "out/model")
    assert res.err_lines == [
        "tvrecipe: usage error:",
        ("out/model is a folder without tvrecipe.lock: `tvrecipe verify` takes a recipe file, "
         "or a checkpoint output folder written with its model card (an output without "
         "`model_card: false`)"),
        "Usage: tvrecipe verify [OPTIONS] RECIPE|FOLDER", "see `tvrecipe verify --help`"]


def test_a_folder_locked_by_another_tvrecipe_is_judged_by_its_bytes(make_models, cli, tmp_path):
    """Another tvrecipe may derive step keys otherwise (0.2.1 put task names in extract's)
    and give the same bytes: verify --recompute compares the bytes. With the same tvrecipe,
    other keys mean the recipe computes otherwise, and are said at once."""
    import tvrecipe
    project(make_models, cli, OUTPUTS)
    cli.ok("run", "r.yaml", "-q")
    lock_file = tmp_path / "out" / "model" / "tvrecipe.lock"
    lock = yaml.safe_load(lock_file.read_text())
    lock["steps"]["tv"] = "extract-0000000000000000"
    lock["tool"]["tvrecipe"] = "0.2.0"
    lock_file.write_text(yaml.safe_dump(lock, sort_keys=False))
    res = cli.ok("verify", "out/model", "--recompute")
    assert "gave the same bytes" in res.stdout
    lock["tool"]["tvrecipe"] = tvrecipe.__version__
    lock_file.write_text(yaml.safe_dump(lock, sort_keys=False))
    res = cli.fails(6, "verify", "out/model", "--recompute")
    assert res.err_lines[1:3] == [
        "out/model/tvrecipe.yaml no longer computes what tvrecipe.lock records:",
        f"step 'tv': key {lockfile_key(tmp_path)}, locked extract-0000000000000000"]


def lockfile_key(root) -> str:
    """The key the recipe's lock gives step tv."""
    return yaml.safe_load((root / "r.yaml.lock").read_text())["steps"]["tv"]


def test_card_front_matter_on_an_output_that_gets_no_card_is_refused(make_models, cli):
    """rank or base_model on a plain output are errors; so is the card's front matter on a
    vector output, which gets no card (it was ignored)."""
    project(make_models, cli, "  vectors: {from: tv, path: ./out/v, model_card: {license: mit}}\n"
                              "  one: {from: tv.math, path: ./out/m, model_card: false}\n")
    res = cli.fails(2, "validate", "r.yaml")
    assert [line.split(": ", 1)[1] for line in res.err_lines[1:]] == [
        ("outputs.vectors.model_card: a model card is written for checkpoint and `format: peft` "
         "outputs only, and 'tv' is a vectors set (remove model_card: this output gets no card)")]


def test_card_front_matter_from_the_recipe_or_the_base_config(make_models, cli, tmp_path):
    ms, _ = project(make_models, cli, (
        "  model: {from: model, path: ./out/model, model_card: {base_model: org/base-1b, "
        "license: apache-2.0, tags: [math, merge]}}\n"
        "  math: {from: math_only, path: ./out/math}\n"))
    config = json.loads((ms.path("base") / "config.json").read_text())
    (ms.path("base") / "config.json").write_text(
        json.dumps({**config, "_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    cli.ok("run", "r.yaml", "-q")
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert front_matter(card) == {"base_model": "org/base-1b", "license": "apache-2.0",
                                  "library_name": "transformers",
                                  "tags": ["merge", "tvrecipe", "task-vectors", "math"]}
    card = (tmp_path / "out" / "math" / "README.md").read_text()
    assert front_matter(card)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_model_card_field_is_validated_with_its_location(make_models, cli):
    project(make_models, cli, "  model: {from: model, path: ./out/model, model_card: {lisence: x}}\n")
    res = cli.fails(2, "validate", "r.yaml")
    assert any("outputs.model.model_card" in line and "lisence" in line for line in res.err_lines)


@pytest.mark.parametrize("change", ["scale: 0.8", "weights: [0.5, 0.5]"])
def test_a_rerun_after_a_change_writes_a_card_that_verifies(make_models, cli, tmp_path, change):
    _ms, path = project(make_models, cli, OUTPUTS)
    cli.ok("run", "r.yaml", "-q")
    new = {"scale: 0.8": "scale: 0.6", "weights: [0.5, 0.5]": "weights: [0.25, 0.5]"}[change]
    path.write_text(path.read_text().replace(change, new))
    cli.ok("run", "r.yaml", "-q")  # replaces the folders its lock says it wrote
    pinned = (tmp_path / "out" / "model" / "tvrecipe.yaml").read_text()
    assert new in pinned
    cli.ok("verify", "out/model", "--recompute")
    cli.ok("verify", "r.yaml")


# ---- what a published folder carries (a user's audit, 2026-11-28) ----------------------------


def test_the_base_files_a_release_must_not_carry_are_left_out_and_named(make_models, cli,
                                                                         tmp_path):
    # The base's weights in other formats (a merge would publish them unmerged), its own card
    # and release files, its code and sub-folders are not copied; `run` names each, and why.
    ms, _ = project(make_models, cli, OUTPUTS.replace("path: ./out/copy}",
                                                      "path: ./out/copy, model_card: false}"))
    base = ms.path("base")
    for name in ("model.onnx", "64.tflite", "rust_model.ot", "pytorch_model.bin"):
        (base / name).write_bytes(b"unmerged")
    (base / "README.md").write_text("---\nlicense: mit\n---\n# The base\n")
    (base / "tvrecipe.lock").write_text("lock_version: 1\n")
    (base / "modeling_x.py").write_text("import os\n")
    (base / "tokenizer").mkdir()
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "auto_map": {
        "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
    res = cli.ok("run", "r.yaml")
    for name in ("model", "copy"):
        files = sorted(p.name for p in (tmp_path / "out" / name).iterdir())
        assert not {"model.onnx", "64.tflite", "rust_model.ot", "pytorch_model.bin",
                    "modeling_x.py", "tokenizer"} & set(files)
        assert ("README.md" in files) == (name == "model")  # (its own card, not the base's)
        assert (tmp_path / "out" / name / "tvrecipe.lock").exists() == (name == "model")
    lines = res.stdout.splitlines()
    at = lines.index(f"wrote copy: {tmp_path / 'out' / 'copy'}")
    assert lines[at + 1:at + 9] == [
        "  left out 64.tflite: weights of base in another format, not the merged ones",
        "  left out README.md: describes base, not this output",
        "  left out model.onnx: weights of base in another format, not the merged ones",
        ("  left out modeling_x.py: code: copy it yourself if you trust it; config.json's "
         "auto_map needs it to load the model"),
        "  left out pytorch_model.bin: weights of base in another format, not the merged ones",
        "  left out rust_model.ot: weights of base in another format, not the merged ones",
        "  left out tokenizer/: a folder: copy it yourself if the model needs it",
        "  left out tvrecipe.lock: describes base, not this output"]
    at = lines.index(f"wrote model: {tmp_path / 'out' / 'model'}")
    assert not any("README.md" in line or "tvrecipe.lock" in line for line in lines[at:at + 8])
    cli.ok("verify", "r.yaml")
    cli.ok("verify", "out/model")


def test_a_release_takes_the_base_license_and_names_no_local_folder(make_models, cli,
                                                                     tmp_path):
    ms, _ = project(make_models, cli, "  model: {from: model, path: ./out/model}\n")
    base = ms.path("base")
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\n"
                                    "license_link: LICENSE\ntags: [x]\n---\n# Base\n")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path":
                                                  "/home/alice/private/tiny-base"}))
    recipe = (tmp_path / "r.yaml").read_text()
    cli.ok("run", "r.yaml", "-q")
    out = tmp_path / "out" / "model"
    card = (out / "README.md").read_text()
    assert front_matter(card) == {"license": "other", "license_name": "tiny-license",
                                  "license_link": "LICENSE", "library_name": "transformers",
                                  "tags": ["merge", "tvrecipe", "task-vectors"]}
    for name in ("README.md", "tvrecipe.yaml", "tvrecipe.lock", "config.json"):
        text = (out / name).read_text()
        assert str(tmp_path) not in text and "/home/alice" not in text, name
    assert "_name_or_path" not in json.loads((out / "config.json").read_text())
    # The license is the recipe's own when it says one; a change of the base's card is a
    # change of the inputs (the card takes the license from it).
    cli.ok("verify", "r.yaml")
    readme = (base / "README.md").read_text()
    (base / "README.md").write_text(readme + "More about the base.\n")  # (prose: no change)
    cli.ok("verify", "r.yaml")
    (base / "README.md").write_text("\ufeff---\nlicense: apache-2.0\n---")  # (BOM, no newline)
    res = cli.fails(6, "verify", "r.yaml")
    assert (f"input 'base' ({base.relative_to(tmp_path).as_posix()}): the license in its "
            "README.md, which a release's model card takes, changed") in " ".join(
        res.stderr.split()).replace("./", "")
    cli.ok("run", "r.yaml", "-q")
    assert front_matter((out / "README.md").read_text())["license"] == "apache-2.0"
    cli.write("r.yaml", recipe.replace("path: ./out/model}", "path: ./out/model, model_card: "
                                     "{license: other, license_name: mine, license_link: "
                                     "https://example.org/l}}"))
    cli.ok("run", "r.yaml", "-q")
    assert front_matter((out / "README.md").read_text())["license_name"] == "mine"
    (base / "README.md").write_text("---\nlicense: mit\n---\n")  # (the recipe's own wins)
    cli.ok("verify", "r.yaml")


def test_a_release_of_models_under_other_licenses_must_say_its_own(make_models, cli,
                                                                    tmp_path):
    # The card takes the base's license only where no merged model's README names another:
    # a fine-tune under another license (or a licensed fine-tune of a base with none) makes
    # the run stop before it reads a weight, at the output's line, until the recipe says
    # the release's license.
    ms, _ = project(make_models, cli, "  model: {from: model, path: ./out/model}\n")
    recipe = (tmp_path / "r.yaml").read_text()
    line = recipe.splitlines().index("  model: {from: model, path: ./out/model}") + 1
    (ms.path("base") / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Base\n")
    (ms.path("code") / "README.md").write_text("---\nlicense: Apache-2.0\n---\n")  # (case)
    (ms.path("toxic") / "README.md").write_text("# no front matter\n")
    cli.ok("run", "r.yaml", "-q")  # (the same license, or none said: the base's)
    assert front_matter((tmp_path / "out/model/README.md").read_text())["license"] == \
        "apache-2.0"
    (ms.path("math") / "README.md").write_text(
        "---\nlicense: other\nlicense_name: llama3.1\n---\n")
    for command in ("run", "plan", "verify"):
        res = cli.fails(2, command, "r.yaml")
        assert (f"r.yaml:{line}:3: outputs.model: the model card would take the license of "
                "'base' (apache-2.0, from its README.md), but 'math''s README.md names other "
                "(llama3.1): a merge is bound by the license of every model in it (say the "
                "release's license in the output's `model_card: {license: …}` (or write no "
                "card: `model_card: false`))") in " ".join(res.stderr.split()), command
    (ms.path("base") / "README.md").unlink()
    res = cli.fails(2, "run", "r.yaml")
    assert "of 'base' (its README.md names none), but 'math''s README.md names" in " ".join(
        res.stderr.split())
    cli.write("r.yaml", recipe.replace("path: ./out/model}",
                                       "path: ./out/model, model_card: {license: other, "
                                       "license_name: llama3.1}}"))
    cli.ok("run", "r.yaml", "-q")
    assert front_matter((tmp_path / "out/model/README.md").read_text())["license_name"] == \
        "llama3.1"


def test_the_card_names_the_merged_models_the_same_from_any_folder(make_models, cli, tmp_path,
                                                                  monkeypatch):
    # Hub ids from a Hugging Face cache folder's name and from _name_or_path (where it names
    # no path beside the recipe); where the run starts from does not change the card.
    ms = make_models(("math", "code"))
    cache = tmp_path / "hub" / "models--org--math-ft" / "snapshots" / "abc123"
    shutil.copytree(ms.path("math"), cache)
    config = json.loads((ms.path("base") / "config.json").read_text())
    (ms.path("base") / "config.json").write_text(json.dumps({**config,
                                                             "_name_or_path": "org/base"}))
    (ms.path("code") / "config.json").write_text(json.dumps({**config,
                                                             "_name_or_path": "ckpt/code"}))
    cli.write("r.yaml", """\
        tvrecipe: 1
        models: {base: ./ckpt/base, math: ./hub/models--org--math-ft/snapshots/abc123,
                  code: ./ckpt/code}
        steps:
          m: {op: linear, inputs: [base, math, code]}
        outputs:
          model: {from: m, path: ./out/model}
        """)
    cli.ok("run", "r.yaml", "-q")
    card = (tmp_path / "out" / "model" / "README.md").read_bytes()
    assert front_matter(card.decode())["base_model"] == ["org/base", "org/math-ft"]
    monkeypatch.chdir("/")
    cli.ok("run", str(tmp_path / "r.yaml"), "-q", "--force")
    # A folder named as its own Hub id (`hf download org/code --local-dir models/org/code`).
    shutil.copytree(ms.path("code"), tmp_path / "models" / "org" / "code")
    config_file = tmp_path / "models" / "org" / "code" / "config.json"
    config_file.write_text(json.dumps({**config, "_name_or_path": "org/code"}))
    named = (tmp_path / "r.yaml").read_text().replace("code: ./ckpt/code", "code: ./models/org/code")
    cli.write("n.yaml", named.replace("./out/model", "./out/named"))
    cli.ok("run", str(tmp_path / "n.yaml"), "-q")
    assert front_matter((tmp_path / "out" / "named" / "README.md").read_text())[
        "base_model"] == ["org/base", "org/math-ft", "org/code"]
    assert (tmp_path / "out" / "model" / "README.md").read_bytes() == card
    cli.ok("verify", str(tmp_path / "out" / "model"), "--recompute")


def test_a_hub_download_of_a_release_verifies(make_models, cli, tmp_path):
    # A Hub repository has a .gitattributes, and `hf download --local-dir` adds .cache/.
    project(make_models, cli, "  model: {from: model, path: ./out/model}\n")
    cli.ok("run", "r.yaml", "-q")
    dl = tmp_path / "dl"
    shutil.copytree(tmp_path / "out" / "model", dl)
    (dl / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (dl / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (dl / ".cache" / "huggingface" / "download" / "model.safetensors.metadata").write_text("x")
    cli.ok("verify", "dl")
    (dl / "extra.json").write_text("{}")  # (a file that is not hidden still counts)
    assert "dl/extra.json: not in the lock" in cli.fails(6, "verify", "dl").stderr


def test_vector_files_say_their_format_and_sets_take_no_shard_size(make_models, cli, tmp_path):
    from safetensors import safe_open

    project(make_models, cli, "  vectors: {from: tv, path: ./out/vectors}\n"
                              "  math: {from: tv.math, path: ./out/math, shard_size: 2000}\n")
    cli.ok("run", "r.yaml", "-q")
    files = [*(tmp_path / "out" / "vectors").glob("*.safetensors"),
             *(tmp_path / "out" / "math").glob("*.safetensors")]
    assert len(files) > 4
    for f in files:
        with safe_open(str(f), "pt") as g:
            assert g.metadata()["format"] == "pt"
    project(make_models, cli, "  vectors: {from: tv, path: ./out/vectors, shard_size: 2GB}\n",
            name="s.yaml")
    res = cli.fails(2, "validate", "s.yaml")
    assert res.err_lines[1].endswith(
        "outputs.vectors.shard_size: shard_size applies to checkpoint and vector outputs; 'tv' "
        "is a vectors set, written one file per member (remove shard_size, or write members "
        "one by one (from: tv.MEMBER), which are sharded)")


def test_a_release_written_under_an_earlier_lock_is_made_again_without_force(make_models, cli,
                                                                             tmp_path):
    # A release (card, recipe, lock, copied config and tokenizer files) as a run here wrote
    # it, then a `git pull` of another recipe and lock: made again without --force; with one
    # of its files removed by hand, refused and named.
    project(make_models, cli, "  model: {from: model, path: ./out/model}\n")
    ours = (tmp_path / "r.yaml").read_text()
    theirs = ours.replace("scale: 0.8", "scale: 0.7")
    cli.write("r.yaml", theirs)
    cli.ok("run", "r.yaml", "-q")
    their_lock, their_files = (tmp_path / "r.yaml.lock").read_text(), snapshot(tmp_path / "out")
    cli.write("r.yaml", ours)
    cli.ok("run", "r.yaml", "-q")
    assert "config.json" in {p.name for p in (tmp_path / "out" / "model").iterdir()}
    cli.write("r.yaml", theirs)
    (tmp_path / "r.yaml.lock").write_text(their_lock)
    cli.ok("run", "r.yaml", "-q")
    assert snapshot(tmp_path / "out") == their_files
    cli.write("r.yaml", ours)
    cli.ok("run", "r.yaml", "-q")
    cli.write("r.yaml", theirs)
    (tmp_path / "r.yaml.lock").write_text(their_lock)
    (tmp_path / "out" / "model" / "tokenizer_config.json").unlink()
    res = cli.fails(4, "run", "r.yaml")
    assert "./out/model/tokenizer_config.json: missing" in res.stderr


def test_edits_that_change_no_meaning_leave_the_release_as_it_is(make_models, cli, tmp_path):
    # Output files carry the hash of what the recipe says: a comment, other layout, reordered
    # keys and CRLF line endings (a git autocrlf checkout) give the same bytes, and a CRLF
    # checkout of the recipe is the locked recipe for --locked.
    project(make_models, cli, OUTPUTS)
    cli.ok("run", "r.yaml", "-q")
    before = snapshot(tmp_path / "out")
    text = (tmp_path / "r.yaml").read_text()
    lock = (tmp_path / "r.yaml.lock").read_bytes()
    (tmp_path / "r.yaml").write_bytes(text.replace("\n", "\r\n").encode())
    cli.ok("run", "r.yaml", "--locked", "-q")
    assert (tmp_path / "r.yaml.lock").read_bytes() == lock
    head, rest = text.split("steps:", 1)
    (tmp_path / "r.yaml").write_text("# merged for the release\n" + head + "\nsteps:  # ours\n"
                                     + rest.replace("weights: [0.5, 0.5]",
                                                    "weights: [ 0.5 , 0.50 ]"))
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    res = cli.ok("run", "r.yaml")  # (what it computes is the same: only the lock changes)
    assert res.stdout == ("r.yaml: only the recipe's text changed (comments, layout), not what "
                          "it computes: the lock records the new text; the outputs stay as they "
                          "are (--force writes them again)\n")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == stamps
    assert (tmp_path / "r.yaml.lock").read_bytes() != lock
    cli.ok("verify", "r.yaml")
    assert "up to date" in cli.ok("run", "r.yaml").stdout
    cli.ok("run", "r.yaml", "-q", "--force")  # (and a rerun writes the same bytes)
    assert snapshot(tmp_path / "out") == before
    # Reordered keys: the same weights and vectors; a release's card and tvrecipe.yaml show
    # the recipe as written, so they follow.
    (tmp_path / "r.yaml").write_text(text.replace(
        "merged: {op: sum, inputs: [tv.math, tv.code], weights: [0.5, 0.5]}",
        "merged: {weights: [0.5, 0.5], op: sum, inputs: [tv.math, tv.code]}"))
    cli.ok("run", "r.yaml", "-q")
    after = snapshot(tmp_path / "out")
    assert {k for k in before if after[k] != before[k]} == {  # (math does not use merged)
        f"model/{f}" for f in ("README.md", "tvrecipe.lock", "tvrecipe.yaml")}
