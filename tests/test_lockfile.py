"""Lock file, `tvrecipe verify` and `run --locked`, end to end on tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from tvrecipe.cli import main

RECIPE = """\
tvrecipe: 1
models:
  base: ./base
  a: ./a
  b: ./b
steps:
  tv: {op: extract, base: base, finetuned: [a, b]}
  merged: {op: sum, inputs: tv, weights: 0.5}
  model: {op: apply, base: base, delta: merged}
outputs:
  model: {from: model, path: ./out}
"""


def _make(tmp: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    for name in ("base", "a", "b"):
        (tmp / name).mkdir()
        save_file({"w": torch.randn(4, 3, generator=gen), "n": torch.randn(3, generator=gen)},
                  str(tmp / name / "model.safetensors"))
    recipe = tmp / "r.yaml"
    recipe.write_text(RECIPE)
    return recipe


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_run_writes_lock_and_verify_passes(tmp_path):
    recipe = _make(tmp_path)
    assert _cli("run", str(recipe), "-q").exit_code == 0
    lock = (tmp_path / "r.yaml.lock").read_text()
    assert "lock_version: 1" in lock and "model.safetensors:" in lock
    res = _cli("verify", str(recipe))
    assert res.exit_code == 0, res.output
    assert "match the lock" in res.output


def test_unchanged_rerun_recomputes_nothing(tmp_path):
    recipe = _make(tmp_path)
    _cli("run", str(recipe), "-q")
    before = (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns
    res = _cli("run", str(recipe))
    assert res.exit_code == 0
    assert "up to date" in res.output
    assert (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns == before


def test_verify_fails_after_one_byte_changes(tmp_path):
    recipe = _make(tmp_path)
    _cli("run", str(recipe), "-q")
    f = tmp_path / "out" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    res = _cli("verify", str(recipe))
    assert res.exit_code == 6
    assert "./out/model.safetensors: content differs from the lock" in res.output


def test_verify_recompute_hashes_the_inputs_in_full(tmp_path):
    # An input edited in place with its size, inode and mtime kept (rsync --inplace -t) is not
    # seen by the memo, as documented; --recompute reads every input anyway, and hashes them
    # in full, so it names the input instead of blaming the machine for other bytes.
    import os
    recipe = _make(tmp_path)
    _cli("run", str(recipe), "-q")
    f = tmp_path / "a" / "model.safetensors"
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-4] ^= 0x01  # (the last float32's lowest mantissa bit: still a finite weight)
    with open(f, "r+b") as h:
        h.write(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_ino == st.st_ino and f.stat().st_size == st.st_size
    assert _cli("verify", str(recipe)).exit_code == 0  # (the memo's limit)
    res = _cli("verify", str(recipe), "--recompute")
    assert res.exit_code == 6
    assert "input 'a' (./a) changed: sha256 " in res.output
    # ... and the memo learns it: the commands after it see the change too.
    res = _cli("verify", str(recipe))
    assert res.exit_code == 6 and "input 'a' (./a) changed: sha256 " in res.output
    assert _cli("run", str(recipe), "--locked").exit_code == 6
    assert _cli("run", str(recipe), "-q").exit_code == 0
    assert _cli("verify", str(recipe), "--recompute").exit_code == 0


def test_locked_refuses_changed_input_and_names_it(tmp_path):
    recipe = _make(tmp_path)
    _cli("run", str(recipe), "-q")
    save_file({"w": torch.zeros(4, 3), "n": torch.zeros(3)}, str(tmp_path / "a" / "model.safetensors"))
    res = _cli("run", str(recipe), "--locked", "--force")
    assert res.exit_code == 6
    assert "input 'a' (./a) changed" in res.output


def test_locked_without_lock_is_refused(tmp_path):
    recipe = _make(tmp_path)
    res = _cli("run", str(recipe), "--locked")
    assert res.exit_code == 6
    assert "there is no lock file" in res.output


def test_forced_rerun_is_byte_identical(tmp_path):
    recipe = _make(tmp_path)
    _cli("run", str(recipe), "-q")
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert _cli("run", str(recipe), "-q", "--force").exit_code == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == first
    assert _cli("verify", str(recipe)).exit_code == 0


def test_changed_coefficient_changes_only_downstream_keys(tmp_path):
    import yaml
    recipe = _make(tmp_path)
    _cli("run", str(recipe), "-q")
    old = yaml.safe_load((tmp_path / "r.yaml.lock").read_text())["steps"]
    recipe.write_text(RECIPE.replace("weights: 0.5", "weights: 0.7"))
    _cli("run", str(recipe), "-q", "--force")
    new = yaml.safe_load((tmp_path / "r.yaml.lock").read_text())["steps"]
    assert new["tv"] == old["tv"]
    assert new["merged"] != old["merged"] and new["model"] != old["model"]


def test_verify_recompute_compares_fresh_bytes_and_cleans_up(tmp_path, monkeypatch):
    recipe = _make(tmp_path)
    # (on the CPU, as the messages below say: `auto` would take a GPU where there is one)
    recipe.write_text(RECIPE + "settings: {device: cpu}\n")
    assert _cli("run", str(recipe), "-q").exit_code == 0
    res = _cli("verify", str(recipe), "--recompute")
    assert res.exit_code == 0, res.output
    assert res.output == (f"{recipe}: ok, inputs, recipe and 1 output match the lock, and "
                          "recomputing them without the cache gave the same bytes\n")
    # (its temporary folder gone; the run lock, which kept runs of r.yaml out meanwhile, stays)
    assert sorted(p.name for p in (tmp_path / ".tvrecipe").iterdir()) == [
        "cache", "hashes.json", "r.yaml.run.lock"]

    # A run that no longer reproduces (here: apply adds one ulp more) is caught, although the
    # outputs on disk still match the lock.
    from tvrecipe import ops
    real_apply = ops.apply

    def drifting_apply(base, delta, *, scale=1.0, out=None):
        out = real_apply(base, delta, scale=scale, out=out)
        return torch.nextafter(out, torch.full_like(out, float("inf")))

    monkeypatch.setattr(ops, "apply", drifting_apply)
    res = _cli("verify", str(recipe), "--recompute")
    assert res.exit_code == 6
    lines = res.output.splitlines()
    assert lines[:2] == ["tvrecipe: verify error:",
                         "  recomputing the outputs gave other bytes than the lock:"]
    assert lines[2].startswith("  recomputed ./out/model.safetensors: content differs from the "
                               "lock (sha256 ")
    # ... and says how: one ulp (2^-24 at the largest |w| 0.904) on every entry
    assert lines[2].endswith("…): 2 of 2 tensors differ; the most, 'n': max |Δ| 5.96e-08 (its "
                             "largest |w| 0.904) in 3 of 3 entries")
    assert lines[3].startswith("  recomputed ./out/tvrecipe.lock: content differs from the lock")
    assert ': first at line 6: recomputed "model.safetensors: ' in lines[3]
    # Same versions, device and CPU as the lock: nothing explains it.
    assert lines[-1] == (
        "  the versions, device and CPU are those of the run that wrote the lock; if that run "
        "took steps from a cache filled on another machine or device, their bytes are that "
        "machine's (`tvrecipe run --no-cache --force` writes outputs and a lock from this "
        "machine alone); if not, please report this with the recipe")
    assert all(line.startswith("  recomputed ./out/") for line in lines[2:-1])
    assert sorted(p.name for p in (tmp_path / ".tvrecipe").iterdir()) == [
        "cache", "hashes.json", "r.yaml.run.lock"]
    assert _cli("verify", str(recipe)).exit_code == 0  # the outputs themselves are untouched

    # A lock written on a GPU, then on another CPU: the message says which, and what to do.
    import yaml

    from tvrecipe.exec import lockfile
    path = tmp_path / "r.yaml.lock"
    lock = yaml.safe_load(path.read_text())
    here = lockfile.machine()["cpu"]
    assert lock["machine"] == {"device": "cpu", "cpu": here}
    other = next(c for c in ("x86_64 GenuineIntel avx512f", "x86_64 AuthenticAMD avx2") if c != here)
    expected = {
        "cuda (NVIDIA H200)": (
            "  the lock was written on cuda (NVIDIA H200) and this run computed on cpu: the ops "
            'listed in docs/recipe-format.md ("CPU and GPU bytes") may differ in the last bits '
            "between them; recompute with --device cuda"),
        "cpu": (
            f"  the lock was written on CPU {other} and this is {here}: MKL "
            "and torch pick their kernels by CPU vendor and instruction set, so a product or a "
            "sum may round differently; recompute on a CPU like the lock's")}
    for device, line in expected.items():
        lock["machine"] = {"device": device, "cpu": other}
        path.write_text(yaml.safe_dump(lock))
        res = _cli("verify", str(recipe), "--recompute")
        assert res.exit_code == 6
        assert res.output.splitlines()[-1] == line
        assert not res.output.splitlines()[-2].startswith("  the lock was written")


def test_lock_records_the_bytes_on_disk(tmp_path):
    # Output hashes in the lock come from the writer, hashed as written: they must equal a
    # fresh hash of the files.
    import hashlib

    import yaml
    recipe = _make(tmp_path)
    assert _cli("run", str(recipe), "-q").exit_code == 0
    lock = yaml.safe_load((tmp_path / "r.yaml.lock").read_text())
    files = lock["outputs"]["model"]["files"]
    assert files == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                     for p in (tmp_path / "out").iterdir()}


def test_a_changed_recipe_replaces_the_output_its_lock_wrote_without_force(tmp_path):
    # The lock says this recipe wrote ./out and it is unchanged since: a rerun after a changed
    # coefficient replaces it without --force. A hand-edited output, or a folder the lock does
    # not list, still needs --force, and such a refused run writes nothing.
    import yaml
    from safetensors.torch import load_file
    recipe = _make(tmp_path)
    assert _cli("run", str(recipe), "-q").exit_code == 0
    first = load_file(str(tmp_path / "out" / "model.safetensors"))["w"]
    recipe.write_text(RECIPE.replace("weights: 0.5", "weights: 0.25"))
    res = _cli("run", str(recipe), "-q")
    assert res.exit_code == 0, res.output
    second = load_file(str(tmp_path / "out" / "model.safetensors"))["w"]
    base = load_file(str(tmp_path / "base" / "model.safetensors"))["w"]
    torch.testing.assert_close(second - base, 0.5 * (first - base), rtol=1e-5, atol=1e-7)
    assert _cli("verify", str(recipe)).exit_code == 0

    (tmp_path / "out" / "notes.txt").write_text("mine\n")  # a file the lock does not list
    lock_before = (tmp_path / "r.yaml.lock").read_bytes()
    recipe.write_text(RECIPE.replace("weights: 0.5", "weights: 0.75"))
    res = _cli("run", str(recipe), "-q")
    assert res.exit_code == 4
    assert res.output == ("tvrecipe: output error:\n"
                          "  output ./out was changed since this recipe wrote it:\n"
                          "  ./out/notes.txt: not in the lock\n"
                          "  pass --force to write it again\n")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine\n"
    assert (tmp_path / "r.yaml.lock").read_bytes() == lock_before
    assert _cli("run", str(recipe), "-q", "--force").exit_code == 0
    assert not (tmp_path / "out" / "notes.txt").exists()

    # An output renamed in the recipe still owns the folder its lock entry names.
    recipe.write_text(RECIPE.replace("weights: 0.5", "weights: 0.75")
                      .replace("  model: {from: model", "  merged: {from: model"))
    res = _cli("run", str(recipe), "-q")
    assert res.exit_code == 0, res.output
    assert "merged" in yaml.safe_load((tmp_path / "r.yaml.lock").read_text())["outputs"]
    (tmp_path / "out" / "notes.txt").write_text("mine\n")  # ... and not a changed one
    recipe.write_text(RECIPE.replace("  model: {from: model", "  renamed: {from: model"))
    res = _cli("run", str(recipe), "-q")
    assert res.exit_code == 4 and "./out/notes.txt: not in the lock" in res.output
    (tmp_path / "out" / "notes.txt").unlink()

    # Another recipe's lock owns nothing here.
    other = tmp_path / "other.yaml"
    other.write_text(RECIPE.replace("weights: 0.5", "weights: 0.1"))
    res = _cli("run", str(other), "-q")
    assert res.exit_code == 4 and "pass --force" in res.output


def test_machines_of_a_run_on_several_joins_what_differs():
    from tvrecipe.exec import lockfile
    a = {"device": "cpu", "cpu": "x86_64 AuthenticAMD avx2"}
    b = {"device": "cpu", "cpu": "x86_64 GenuineIntel avx512f"}
    assert lockfile.machines([a]) == a
    assert lockfile.machines([b, a, b]) == {
        "device": "cpu", "cpu": "x86_64 AuthenticAMD avx2; x86_64 GenuineIntel avx512f"}
    gpus = [{"device": "cuda (NVIDIA H100)", "cpu": a["cpu"]},
            {"device": "cuda (NVIDIA H200)", "cpu": a["cpu"]}]
    assert lockfile.machines(gpus) == {"device": "cuda (NVIDIA H100); cuda (NVIDIA H200)",
                                       "cpu": a["cpu"]}
    # A recompute on one of them names the difference.
    both = lockfile.machines([a, b])
    assert lockfile.machine_differences({"machine": both}, a) == [(
        "the lock was written on CPUs x86_64 AuthenticAMD avx2; x86_64 GenuineIntel avx512f "
        "and this is x86_64 AuthenticAMD avx2: MKL and torch pick their kernels by CPU vendor "
        "and instruction set, so a product or a sum may round differently; which worker "
        "computes which tensors is not fixed, so a run on several kinds of CPU may round "
        "differently each time; recompute on one of them")]
    # A local lock, recomputed on a mixed cluster: the lock's one CPU is the one to use.
    assert lockfile.machine_differences({"machine": a}, both) == [(
        "the lock was written on CPU x86_64 AuthenticAMD avx2 and this recompute ran on CPUs "
        "x86_64 AuthenticAMD avx2; x86_64 GenuineIntel avx512f: MKL and torch pick their "
        "kernels by CPU vendor and instruction set, so a product or a sum may round "
        "differently; recompute on a CPU like the lock's")]
    # The same mixed cluster: nothing differs, but such a run does not repeat its bytes.
    assert lockfile.machine_differences({"machine": both}, both) == [(
        "the lock was written on CPUs x86_64 AuthenticAMD avx2; x86_64 GenuineIntel avx512f, "
        "as this recompute ran: which worker computes which tensors is not fixed, so a run on "
        "several kinds of CPU may round differently each time; a run on one kind of CPU (a "
        "local run, or workers alike) repeats its bytes")]
    assert lockfile.machine_differences({"machine": b}, {}) == []  # (no machine: nothing)


def test_a_lock_names_the_packages_whose_versions_differ(tmp_path):
    # numpy (k: auto's eigenvalues) and scikit-learn (the spectral clustering) decide
    # cluster_basis's clusters, so a lock records them beside tvrecipe and torch.
    from importlib.metadata import version

    import yaml

    import tvrecipe
    from tvrecipe.exec import lockfile
    recipe = _make(tmp_path)
    assert _cli("run", str(recipe), "-q").exit_code == 0
    tool = yaml.safe_load((tmp_path / "r.yaml.lock").read_text())["tool"]
    assert tool == {"tvrecipe": tvrecipe.__version__,
                    "torch": version("torch").split("+")[0],
                    "numpy": version("numpy").split("+")[0],
                    "scikit-learn": version("scikit-learn").split("+")[0],
                    "python": tool["python"]}
    here = lockfile.machine()
    same = {"tool": tool, "machine": here}
    assert not any("was written by" in line for line in lockfile.machine_differences(same, here))
    # Only what differs is named, in the order tvrecipe, torch, numpy, scikit-learn.
    older = {**tool, "numpy": "1.24.0", "scikit-learn": "1.3.0"}
    assert lockfile.machine_differences({"tool": older, "machine": here}, here) == [(
        f"the lock was written by numpy 1.24.0 and scikit-learn 1.3.0 and this is numpy "
        f"{tool['numpy']} and scikit-learn {tool['scikit-learn']}; another version may compute "
        "an op differently: install the locked versions")]
    three = {**older, "torch": "2.4.0"}
    assert lockfile.machine_differences({"tool": three}, None)[0].startswith(
        "the lock was written by torch 2.4.0, numpy 1.24.0 and scikit-learn 1.3.0 and this is "
        f"torch {tool['torch']}, numpy {tool['numpy']} and scikit-learn {tool['scikit-learn']};")
    # Another Python changes no byte (a checkpoint output's own lock does not record it).
    assert not any("Python" in line or "was written by" in line
                   for line in lockfile.machine_differences(
                       {"tool": {**tool, "python": "3.0.0"}, "machine": here}, here))
    # A lock from before these were recorded: only the packages it names are compared.
    earlier = {"tvrecipe": tool["tvrecipe"], "torch": tool["torch"], "python": "3.0.0"}
    assert not any("was written by" in line
                   for line in lockfile.machine_differences({"tool": earlier}, None))


def test_a_renamed_recipe_is_a_change(tmp_path):
    """The outputs record the recipe's file name: a renamed recipe (with its lock) writes
    them again, so a recompute gives the lock's bytes."""
    recipe = _make(tmp_path)
    assert _cli("run", str(recipe), "-q").exit_code == 0
    other = tmp_path / "other.yaml"
    recipe.rename(other)
    (tmp_path / "r.yaml.lock").rename(tmp_path / "other.yaml.lock")
    res = _cli("verify", str(other))
    assert res.exit_code == 6
    assert "the recipe was renamed from r.yaml to other.yaml (the outputs record its file name)" \
        in res.output
    res = _cli("run", str(other))
    assert res.exit_code == 0 and "up to date" not in res.output
    assert _cli("verify", str(other), "--recompute").exit_code == 0


def test_an_inputs_copied_files_are_part_of_what_a_run_depends_on(tmp_path):
    """A checkpoint output copies its base's config and tokenizer files: a change to them is
    not 'up to date', and the next run copies the new ones."""
    recipe = _make(tmp_path)
    (tmp_path / "base" / "config.json").write_text('{"vocab_size": 256}')
    assert _cli("run", str(recipe), "-q").exit_code == 0
    (tmp_path / "base" / "config.json").write_text('{"vocab_size": 512}')
    for command in (("verify", str(recipe)), ("run", str(recipe), "--locked")):
        res = _cli(*command)
        assert res.exit_code == 6, command
        assert ("input 'base' (./base): its non-weight files (config, tokenizer, …), which "
                "outputs copy, changed") in res.output
    assert _cli("run", str(recipe), "-q").exit_code == 0
    assert (tmp_path / "out" / "config.json").read_text() == '{"vocab_size": 512}'
    assert _cli("verify", str(recipe), "--recompute").exit_code == 0


def test_the_order_of_a_sets_members_is_part_of_its_hash(tmp_path):
    """A vectors folder's vectors.json lists its members in the set's order, which ops such as
    decompose's chain depend on: reordering them is a changed input, not a cache hit."""
    recipe = _make(tmp_path)
    recipe.write_text(RECIPE.replace("  model: {from: model, path: ./out}",
                                     "  model: {from: model, path: ./out}\n"
                                     "  tv: {from: tv, path: ./lib}"))
    assert _cli("run", str(recipe), "-q").exit_code == 0
    use = tmp_path / "use.yaml"
    use.write_text("tvrecipe: 1\nmodels:\n  base: ./base\n  lib: {path: ./lib, kind: task_vector}\n"
                   "steps:\n  m: {op: sum, inputs: lib}\n  model: {op: apply, base: base, delta: m}"
                   "\noutputs:\n  model: {from: model, path: ./out2}\n")
    assert _cli("run", str(use), "-q").exit_code == 0
    index = tmp_path / "lib" / "vectors.json"
    data = __import__("json").loads(index.read_text())
    data["members"] = data["members"][::-1]
    index.write_text(__import__("json").dumps(data))
    res = _cli("verify", str(use))
    assert res.exit_code == 6 and "input 'lib' (./lib) changed" in res.output
    digest = _cli("hash", str(tmp_path / "lib")).output.strip()
    assert _cli("run", str(use), "-q").exit_code == 0
    assert f"sha256: {digest}" in (tmp_path / "use.yaml.lock").read_text()


def test_locked_in_a_fresh_checkout_makes_the_outputs_and_keeps_the_lock(tmp_path):
    # A clone has the recipe and its lock but not the (ignored) outputs: --locked makes them,
    # checks them against the lock and leaves the lock's bytes alone.
    import shutil
    recipe = _make(tmp_path)
    recipe.write_text(RECIPE + "  vectors: {from: tv, path: ./vec}\n")
    assert _cli("run", str(recipe), "-q").exit_code == 0
    lock = (tmp_path / "r.yaml.lock").read_bytes()
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "out")  # one output gone, the other there and unchanged
    res = _cli("run", str(recipe), "--locked", "--no-cache")
    assert res.exit_code == 0, res.output
    assert "wrote model:" in res.output
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == first
    assert (tmp_path / "r.yaml.lock").read_bytes() == lock
    assert _cli("verify", str(recipe)).exit_code == 0
    assert "up to date" in _cli("run", str(recipe), "--locked").output


def test_locked_refuses_outputs_that_come_out_other_than_the_lock(tmp_path):
    import shutil

    import yaml
    recipe = _make(tmp_path)
    assert _cli("run", str(recipe), "-q").exit_code == 0
    path = tmp_path / "r.yaml.lock"
    data = yaml.safe_load(path.read_text())
    files = data["outputs"]["model"]["files"]
    real = files["model.safetensors"]
    files["model.safetensors"] = "0" * 64  # as if the lock's run had computed other bytes
    path.write_text(yaml.safe_dump(data))
    lock = path.read_bytes()
    shutil.rmtree(tmp_path / "out")
    res = _cli("run", str(recipe), "--locked")
    assert res.exit_code == 6
    lines = res.output.splitlines()
    assert lines[:3] == [
        "tvrecipe: verify error:",
        "  --locked, but the outputs this run made differ from the lock, so none was written:",
        (f"  ./out/model.safetensors: content differs from the lock (sha256 {real[:12]}…, "
        "locked 000000000000…)")]
    assert not (tmp_path / "out").exists()  # nothing moved into place, no staging left
    assert path.read_bytes() == lock


def test_verify_recompute_of_a_basis_with_k_auto(tmp_path):
    # cluster_basis with k: auto knows its members only once it ran; the released folder's
    # own lock records the step keys as the recipe's lock does (taken before the run), so
    # the recompute gives the same bytes, its tvrecipe.lock included.
    recipe = _make(tmp_path)
    recipe.write_text(RECIPE.replace(
        "  merged: {op: sum, inputs: tv, weights: 0.5}",
        "  basis: {op: cluster_basis, inputs: tv, k: auto}\n"
        "  merged: {op: sum, inputs: basis, weights: 0.5}") + "settings: {device: cpu}\n")
    assert _cli("run", str(recipe), "-q", "--no-cache").exit_code == 0
    res = _cli("verify", str(recipe), "--recompute")
    assert res.exit_code == 0, res.output
    assert _cli("verify", str(tmp_path / "out")).exit_code == 0

    # The same through the Python API, which takes no state from the caller.
    from tvrecipe.exec.runner import RunOptions, run_recipe
    from tvrecipe.plan.graph import compile_recipe
    from tvrecipe.spec.load import load_recipe
    run_recipe(compile_recipe(load_recipe(recipe)),
               RunOptions(targets={"model": tmp_path / "again"}))
    assert ((tmp_path / "again" / "tvrecipe.lock").read_bytes()
            == (tmp_path / "out" / "tvrecipe.lock").read_bytes())


def test_locked_makes_outputs_in_an_empty_folder_and_as_the_lock_let_nan_in(tmp_path):
    # A checkout that made the output folder (mkdir -p out) counts as one without outputs;
    # and --locked repeats the locked run's --allow-nonfinite, which its outputs record.
    import math
    import shutil

    from safetensors.torch import load_file
    recipe = _make(tmp_path)
    w = load_file(str(tmp_path / "a" / "model.safetensors"))
    w["n"][0] = math.nan
    save_file(w, str(tmp_path / "a" / "model.safetensors"))
    assert _cli("run", str(recipe), "-q", "--allow-nonfinite").exit_code == 0
    lock = (tmp_path / "r.yaml.lock").read_bytes()
    shutil.rmtree(tmp_path / "out")
    (tmp_path / "out").mkdir()
    res = _cli("run", str(recipe), "--locked", "-q")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.yaml.lock").read_bytes() == lock
    assert _cli("verify", str(recipe)).exit_code == 0

    shutil.rmtree(tmp_path / "out")
    assert _cli("run", str(recipe), "-q", "--force").exit_code == 3  # (NaN: refused)
    assert _cli("run", str(recipe), "-q", "--force", "--allow-nonfinite").exit_code == 0
    data = (tmp_path / "r.yaml.lock").read_text().replace("allow_nonfinite: true\n", "")
    (tmp_path / "r.yaml.lock").write_text(data)  # as if locked by a run without the option
    res = _cli("run", str(recipe), "--locked", "--allow-nonfinite")
    assert res.exit_code == 6
    assert res.output.splitlines()[1] == (
        "  --locked, but the lock was written by a run without --allow-nonfinite (which "
        "refused NaN and Inf in its inputs): leave the option out to repeat it")


def test_outputs_written_under_an_earlier_lock_are_made_again_without_force(tmp_path):
    # A `git pull` brings a teammate's recipe and lock: the outputs here are as a run here
    # wrote them under the earlier lock (nothing changed by hand), so `run` and `run --locked`
    # make them again, as absent ones, without --force. One changed by hand is still refused.
    recipe = _make(tmp_path)
    lock = tmp_path / "r.yaml.lock"
    out = tmp_path / "out" / "model.safetensors"
    pulled = RECIPE.replace("weights: 0.5", "weights: 0.25")
    recipe.write_text(pulled)
    assert _cli("run", str(recipe), "-q").exit_code == 0
    theirs, their_bytes = lock.read_text(), out.read_bytes()
    recipe.write_text(RECIPE)
    assert _cli("run", str(recipe), "-q").exit_code == 0  # (replaces the pulled outputs too)
    ours = out.read_bytes()
    assert ours != their_bytes
    for command in (["run", "-q"], ["run", "--locked", "-q"]):  # the pull
        recipe.write_text(pulled)
        lock.write_text(theirs)
        res = _cli(*command[:1], str(recipe), *command[1:])
        assert res.exit_code == 0, res.output
        assert out.read_bytes() == their_bytes
        assert _cli("verify", str(recipe)).exit_code == 0
        recipe.write_text(RECIPE)  # (back to ours, for the next pull)
        assert _cli("run", str(recipe), "-q").exit_code == 0
    recipe.write_text(pulled)
    lock.write_text(theirs)
    data = bytearray(out.read_bytes())
    data[-4] ^= 0x01  # (changed by hand)
    out.write_bytes(bytes(data))
    res = _cli("run", str(recipe), "-q")
    assert res.exit_code == 4 and "was changed since this recipe wrote it" in res.output
    res = _cli("run", str(recipe), "--locked", "-q")
    assert res.exit_code == 6 and "--locked, but the outputs differ from the lock" in res.output
