"""Decompositions cached as factors: the entry keeps each tensor's shared basis, not the parts.

A rerun reads the basis back, still reads the task vectors, and expands the parts from them:
the same bytes as a run without the cache, from an entry a small fraction of the inputs.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tvrecipe.cli import main
from tvrecipe.ops import decompose as decompose_dense

RECIPE = """\
tvrecipe: 1
models:
  base: ./base
  a: ./a
  b: ./b
  c: ./c
steps:
  tv: {op: extract, base: base, finetuned: [a, b, c]}
  parts: {op: decompose, inputs: tv, rank: RANK, threshold: 0.5}
  keep: {op: sum, inputs: parts.unique}
  model: {op: apply, base: base, delta: keep, scale: 1.0}
outputs:
  model: {from: model, path: ./out}
  shared: {from: parts.shared, path: ./shared}
"""

D_OUT, D_IN = 96, 64


def _make(tmp: Path, rank: int = 6) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """Three fine-tunes sharing a rank-3 direction set, each with one of its own."""
    gen = torch.Generator().manual_seed(3)
    common = torch.linalg.qr(torch.randn(D_OUT, 3, generator=gen)).Q
    models = {"base": {"w": torch.randn(D_OUT, D_IN, generator=gen),
                       "v": torch.randn(D_OUT, D_IN, generator=gen),
                       "embed_tokens": torch.randn(50, 16, generator=gen),
                       "n": torch.randn(D_IN, generator=gen)}}
    for name in ("a", "b", "c"):
        models[name] = {}
        for t, base in models["base"].items():
            if base.ndim == 2 and t != "embed_tokens":
                own = torch.randn(D_OUT, 2, generator=gen)
                delta = (common @ torch.randn(3, D_IN, generator=gen)
                         + own @ torch.randn(2, D_IN, generator=gen) * 0.5)
            else:
                delta = torch.randn(base.shape, generator=gen) * 0.1
            models[name][t] = base + delta
    for name, tensors in models.items():
        (tmp / name).mkdir()
        save_file(tensors, str(tmp / name / "model.safetensors"))
    recipe = tmp / "r.yaml"
    recipe.write_text(RECIPE.replace("RANK", str(rank)))
    return recipe, models


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _entry(tmp: Path) -> tuple[dict, Path]:
    """The decompose step's cache entry: its manifest and path."""
    (found,) = [(m, p) for p in sorted((tmp / ".tvrecipe" / "cache").glob("*/*.json"))
                if (m := json.loads(p.read_text()))["step"] == "parts"]
    return found


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_entry_holds_bases_and_rerun_expands_the_same_bytes(tmp_path):
    recipe, models = _make(tmp_path)
    res = _cli("run", recipe, "-q")
    assert res.exit_code == 0, res.output
    first = {"model": _bytes(tmp_path / "out"), "shared": _bytes(tmp_path / "shared")}

    manifest, path = _entry(tmp_path)
    assert manifest["factored"] is True and manifest["kind"] == "decomposition"
    (slot_file,) = path.parent.glob(f"{path.stem}~*.safetensors")
    with safe_open(str(slot_file), "pt") as f:
        names = sorted(f.keys())
        kept = {n: f.get_tensor(n) for n in names}
    # Only the 2-D, non-excluded tensors keep anything: their basis and the task ranks.
    assert names == ["v@basis", "v@ranks", "w@basis", "w@ranks"]
    for t in ("v", "w"):
        z = kept[f"{t}@basis"]
        assert z.shape == (D_OUT, 3)  # the planted common directions
        torch.testing.assert_close(z.T @ z, torch.eye(z.shape[1]), atol=1e-5, rtol=0)
        # rank 6 asked, but each delta has rank 3 + 2: numerically zero directions are dropped
        assert kept[f"{t}@ranks"].tolist() == [5, 5, 5]
    inputs = sum((tmp_path / m / "model.safetensors").stat().st_size for m in "abc")
    assert slot_file.stat().st_size < 0.05 * inputs

    # The basis is the one the dense kernel finds for the same deltas.
    deltas = [models[m]["w"] - models["base"]["w"] for m in "abc"]
    dense = decompose_dense(deltas, rank=6, threshold=0.5)
    shared_file = load_file(str(tmp_path / "shared" / "a.safetensors"))
    torch.testing.assert_close(shared_file["w"], dense.shared[0], atol=1e-5, rtol=1e-4)
    assert dense.info["shared_dim"] == kept["w@basis"].shape[1]

    res = _cli("run", recipe, "--force")
    assert res.exit_code == 0, res.output
    assert "from cache: parts" in res.output
    assert {"model": _bytes(tmp_path / "out"), "shared": _bytes(tmp_path / "shared")} == first

    res = _cli("run", recipe, "--force", "--no-cache")
    assert res.exit_code == 0, res.output
    assert {"model": _bytes(tmp_path / "out"), "shared": _bytes(tmp_path / "shared")} == first


def test_rerun_with_cached_basis_skips_the_svds(tmp_path, monkeypatch):
    recipe, _ = _make(tmp_path)
    assert _cli("run", recipe, "-q").exit_code == 0
    kernels = importlib.import_module("tvrecipe.ops.decompose")

    def no_svd(*_a, **_k):
        raise AssertionError("the cached basis should have been used")

    monkeypatch.setattr(kernels, "task_subspace", no_svd)
    res = _cli("run", recipe, "--force")
    assert res.exit_code == 0, res.output
    assert "from cache: parts" in res.output


def test_corrupt_basis_is_detected_and_recomputed(tmp_path):
    recipe, _ = _make(tmp_path)
    assert _cli("run", recipe, "-q").exit_code == 0
    first = _bytes(tmp_path / "out")
    _manifest, path = _entry(tmp_path)
    (slot_file,) = path.parent.glob(f"{path.stem}~*.safetensors")
    data = bytearray(slot_file.read_bytes())
    data[-3] ^= 0xFF  # the last basis entry
    slot_file.write_bytes(bytes(data))
    res = _cli("run", recipe, "--force")
    assert res.exit_code == 0, res.output
    assert "is corrupt" in res.output and "recomputing it" in res.output
    assert _bytes(tmp_path / "out") == first
    _cli("run", recipe, "--force")  # the recomputed entry serves again
    assert _bytes(tmp_path / "out") == first


def test_plan_reads_inputs_of_a_cached_decomposition(tmp_path):
    recipe, _ = _make(tmp_path)
    assert _cli("run", recipe, "-q").exit_code == 0
    recipe.write_text(recipe.read_text().replace("op: sum", "op: mean"))
    res = _cli("plan", recipe)
    assert res.exit_code == 0, res.output
    lines = {ln.split()[2]: ln for ln in res.output.splitlines()
             if ln.strip()[:1].isdigit() and len(ln.split()) > 2}
    assert "[cached]" in lines["parts"]
    assert "[compute]" in lines["tv"]  # the parts are expanded from the task vectors


def test_unread_parts_are_not_computed(tmp_path, monkeypatch):
    """Only parts.unique is read: no shared part is ever formed."""
    from tvrecipe.plan.graph import compile_recipe
    from tvrecipe.spec.load import load_recipe
    recipe, _ = _make(tmp_path)
    recipe.write_text(recipe.read_text().replace(
        "  shared: {from: parts.shared, path: ./shared}\n", ""))
    compiled = compile_recipe(load_recipe(recipe))
    assert compiled.reads()["parts"] == {("unique",)}

    kernels = importlib.import_module("tvrecipe.ops.decompose")
    seen = []
    real = kernels.decomposition_parts

    def spy(deltas, factors, **kw):
        sh, un = real(deltas, factors, **kw)
        seen.append((sh, un))
        return sh, un

    monkeypatch.setattr(kernels, "decomposition_parts", spy)
    res = _cli("run", recipe, "--no-cache")
    assert res.exit_code == 0, res.output
    assert len(seen) == 4  # w, v, the embedding, the norm
    assert all(s is None for sh, _un in seen for s in sh)
    assert all(u is not None for _sh, un in seen for u in un)
