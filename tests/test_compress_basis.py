"""compress_basis (PCA and autoencoder bases through the Gram matrix) and rebuild.

References are computed from explicit task-vector matrices in float64; the ops only ever see
the Gram matrix and stream the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from tvrecipe.cli import main
from tvrecipe.ops.compress import autoencoder_basis, pca_basis

T = 6


def _matrix(d: int = 200, t: int = T, seed: int = 0) -> torch.Tensor:
    """Task vectors as columns: a shared direction, a mean offset and noise."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, 1, generator=g)
    return (common @ torch.rand(1, t, generator=g) + torch.randn(d, t, generator=g) * 0.3
            + 0.5).double()


# ---- the math, on the Gram matrix ------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_pca_atoms_are_scaled_principal_directions(m):
    v = _matrix()
    basis = pca_basis(v.T @ v, m)
    mu = v.mean(1, keepdim=True)
    u, s, _vh = torch.linalg.svd(v - mu, full_matrices=False)
    atoms = v @ basis.atoms  # D x m
    for j in range(m):
        # the same direction up to sign, scaled by its singular value
        ref = u[:, j] * s[j]
        sign = torch.sign(atoms[:, j] @ ref)
        torch.testing.assert_close(atoms[:, j], sign * ref, atol=1e-8, rtol=1e-8)
    # rebuild: mean plus decoder-weighted atoms; the loss reaches Eckart–Young
    rebuilt = mu + atoms @ basis.decoder
    torch.testing.assert_close(v @ basis.rebuild, rebuilt, atol=1e-9, rtol=1e-9)
    err = ((v - rebuilt) ** 2).sum(0) / (v ** 2).sum(0)
    assert basis.errors == pytest.approx(err.tolist(), rel=1e-6, abs=1e-12)
    assert basis.loss == pytest.approx(float(((v - rebuilt) ** 2).sum()) / T**2, rel=1e-9)
    assert basis.loss == pytest.approx(float((s[m:] ** 2).sum()) / T**2, rel=1e-6)
    assert basis.loss == pytest.approx(basis.bound, rel=1e-6)
    assert basis.mean is True


def test_pca_with_t_minus_one_atoms_rebuilds_every_task_exactly():
    v = _matrix()
    basis = pca_basis(v.T @ v, T - 1)
    torch.testing.assert_close(v @ basis.rebuild, v, atol=1e-9, rtol=0)
    assert max(basis.errors) < 1e-20 and basis.bound == pytest.approx(0.0, abs=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bases_of_a_gram_matrix_on_the_gpu_are_the_cpus():
    # (the runner's Gram matrices are on the CPU; a library caller's may not be)
    v = _matrix()
    gram = v.T @ v
    for make in (lambda g: pca_basis(g, 3), lambda g: autoencoder_basis(g, 3, seed=0)):
        want, got = make(gram), make(gram.cuda())
        for name in ("atoms", "decoder", "rebuild"):
            torch.testing.assert_close(getattr(got, name).cpu(), getattr(want, name))


def test_pca_signs_are_fixed():
    v = _matrix()
    a = pca_basis(v.T @ v, 3)
    b = pca_basis((-v).T @ (-v), 3)  # same Gram
    assert torch.equal(a.atoms, b.atoms)
    for j in range(3):
        col = a.atoms[:, j]
        assert col[col.abs().argmax()] > 0


def test_autoencoder_atoms_are_convex_and_loss_above_bound():
    v = _matrix()
    g = v.T @ v
    basis = autoencoder_basis(g, 3, seed=7, steps=3000)
    assert bool((basis.atoms >= 0).all())
    torch.testing.assert_close(basis.atoms.sum(0), torch.ones(3, dtype=torch.float64))
    assert basis.loss >= basis.bound * (1 - 1e-9)
    start = float(torch.trace(g)) / T**2  # W = 0 rebuilds nothing
    assert basis.loss < 0.5 * start
    rebuilt = v @ basis.atoms @ basis.decoder
    assert basis.loss == pytest.approx(float(((v - rebuilt) ** 2).sum()) / T**2, rel=1e-9)
    lam = torch.linalg.eigvalsh(g).flip(0)
    assert basis.bound == pytest.approx(float(lam[3:].sum()) / T**2, rel=1e-9)
    assert basis.mean is False


def test_autoencoder_is_deterministic_by_seed():
    v = _matrix()
    g = v.T @ v
    a = autoencoder_basis(g, 2, seed=1, steps=200)
    b = autoencoder_basis(g, 2, seed=1, steps=200)
    c = autoencoder_basis(g, 2, seed=2, steps=200)
    assert torch.equal(a.atoms, b.atoms) and torch.equal(a.decoder, b.decoder)
    assert not torch.equal(a.atoms, c.atoms)


@pytest.mark.parametrize("m", [0, T, T + 1])
def test_atom_count_out_of_range_is_refused(m):
    g = torch.eye(T, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"m = {m} atoms for {T} task vectors"):
        pca_basis(g, m)


# ---- end to end ------------------------------------------------------------------------------

RECIPE = """\
tvrecipe: 1
models:
  base: ./base.safetensors
{models}
steps:
  tv: {{op: extract, base: base, finetuned: [{tasks}]}}
  basis: {{op: compress_basis, inputs: tv, method: {method}, m: {m}{extra}}}
  back: {{op: rebuild, basis: basis}}
  forget: {{op: rebuild, basis: basis, tasks: [t2]}}
  edited: {{op: apply, base: base, delta: forget.t2, scale: -1.0}}
outputs:
  basis: {{from: basis, path: ./basis}}
  back: {{from: back, path: ./back}}
  edited: {{from: edited, path: ./edited}}
"""


def _project(tmp: Path, method: str = "pca", m: int = T - 1, extra: str = "") -> Path:
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(48, 40, generator=g), "b": torch.randn(40, generator=g),
            "steps": torch.arange(4)}
    save_file(base, str(tmp / "base.safetensors"))
    common = torch.randn(48, 40, generator=g) * 0.1
    for i in range(T):
        ft = {"w": base["w"] + common * (1 + i / T) + torch.randn(48, 40, generator=g) * 0.05,
              "b": base["b"] + torch.randn(40, generator=g) * 0.05, "steps": base["steps"]}
        save_file(ft, str(tmp / f"t{i}.safetensors"))
    models = "\n".join(f"  t{i}: ./t{i}.safetensors" for i in range(T))
    tasks = ", ".join(f"t{i}" for i in range(T))
    recipe = tmp / "r.yaml"
    recipe.write_text(RECIPE.format(models=models, tasks=tasks, method=method, m=m,
                                    extra=extra))
    return recipe


def _cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def _task_vectors(tmp: Path) -> dict[str, dict[str, torch.Tensor]]:
    base = load_file(str(tmp / "base.safetensors"))
    return {f"t{i}": {k: (load_file(str(tmp / f"t{i}.safetensors"))[k] - base[k]).double()
                      for k in ("w", "b")} for i in range(T)}


def test_pca_basis_end_to_end_matches_the_float64_reference(tmp_path):
    recipe = _project(tmp_path, m=3)
    res = _cli("run", recipe, "--report", tmp_path / "report.json")
    assert res.exit_code == 0, res.output
    assert "basis (compress_basis, pca): 3 atoms and the mean for 6 tasks" in res.output
    tv = _task_vectors(tmp_path)
    names = [f"t{i}" for i in range(T)]
    # the whole-model Gram over both tensors, then PCA in float64
    flat = torch.stack([torch.cat([tv[n]["w"].flatten(), tv[n]["b"]]) for n in names], 1)
    ref = pca_basis(flat.T @ flat, 3)
    index = json.loads((tmp_path / "basis" / "vectors.json").read_text())
    assert index["members"] == ["atom0", "atom1", "atom2", "mean"]
    for j in range(3):
        atom = load_file(str(tmp_path / "basis" / f"atom{j}.safetensors"))
        for k in ("w", "b"):
            want = sum(ref.atoms[i, j] * tv[n][k] for i, n in enumerate(names))
            torch.testing.assert_close(atom[k].double(), want, atol=2e-6, rtol=1e-4)
        assert set(atom) == {"w", "b"}  # integer buffers are no task vectors
    mean = load_file(str(tmp_path / "basis" / "mean.safetensors"))
    torch.testing.assert_close(mean["w"].double(), sum(tv[n]["w"] for n in names) / T,
                               atol=1e-6, rtol=0)
    report = json.loads((tmp_path / "report.json").read_text())["basis"]
    assert report["relative_error"] == pytest.approx(dict(zip(names, ref.errors)), rel=1e-5)
    assert report["loss"] == pytest.approx(report["bound"], rel=1e-5)
    # negating the rebuilt t2: base - (mean + W·atoms)
    back = load_file(str(tmp_path / "back" / "t2.safetensors"))
    edited = load_file(str(tmp_path / "edited" / "model.safetensors"))
    base = load_file(str(tmp_path / "base.safetensors"))
    want = flat @ ref.rebuild[:, 2]
    torch.testing.assert_close(back["w"].double().flatten(), want[:48 * 40], atol=2e-6, rtol=0)
    torch.testing.assert_close(edited["w"], base["w"] - back["w"], atol=1e-6, rtol=0)
    assert torch.equal(edited["steps"], base["steps"])


def test_pca_with_t_minus_one_atoms_rebuilds_the_task_vectors(tmp_path):
    recipe = _project(tmp_path, m=T - 1)
    assert _cli("run", recipe).exit_code == 0
    tv = _task_vectors(tmp_path)
    for n, want in tv.items():
        got = load_file(str(tmp_path / "back" / f"{n}.safetensors"))
        for k in ("w", "b"):
            torch.testing.assert_close(got[k].double(), want[k], atol=2e-6, rtol=0)


def test_autoencoder_atoms_are_convex_combinations_end_to_end(tmp_path):
    recipe = _project(tmp_path, method="autoencoder", m=2, extra=", steps: 400")
    res = _cli("run", recipe, "--report", tmp_path / "report.json")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "report.json").read_text())["basis"]
    tv = _task_vectors(tmp_path)
    names = [f"t{i}" for i in range(T)]
    for j in range(2):
        weights = report["encoder"][f"atom{j}"]
        assert min(weights) >= 0 and sum(weights) == pytest.approx(1.0, abs=1e-12)
        atom = load_file(str(tmp_path / "basis" / f"atom{j}.safetensors"))
        want = sum(w * tv[n]["w"] for w, n in zip(weights, names))
        torch.testing.assert_close(atom["w"].double(), want, atol=1e-6, rtol=1e-5)
    assert not (tmp_path / "basis" / "mean.safetensors").exists()
    assert report["loss"] >= report["bound"]


def test_same_bytes_from_cache_and_by_row_blocks(tmp_path, monkeypatch):
    recipe = _project(tmp_path, m=3)
    assert _cli("run", recipe, "--no-cache").exit_code == 0
    first = {p.relative_to(tmp_path): p.read_bytes()
             for p in sorted(tmp_path.glob("*/*.safetensors"))}
    assert _cli("run", recipe, "-q", "--force").exit_code == 0  # fills the cache
    res = _cli("run", recipe, "--force")  # the basis from the cache, its report too
    assert res.exit_code == 0, res.output
    assert "from cache: basis" in res.output
    from tvrecipe.exec import runner
    monkeypatch.setattr(runner, "CHUNK_ELEMENTS", 8 * 40)  # 8-row blocks of w
    assert _cli("run", recipe, "--force", "--no-cache").exit_code == 0
    again = {p.relative_to(tmp_path): p.read_bytes()
             for p in sorted(tmp_path.glob("*/*.safetensors"))}
    assert again == first


@pytest.mark.parametrize(("edit", "message"), [
    ("m: 5}", "m = 6 atoms for 6 task vectors: a compressed basis has fewer atoms than tasks"),
    ("back: {op: rebuild, basis: basis}",
     "'tv' is not a compress_basis step"),
    ("tasks: [t2]", "'t9' is not a task of 'basis'"),
    ("tasks: [t2]}", ("steps.forget.tasks: [] names no task: leave 'tasks' out to rebuild every "
                     "task, or name the ones to rebuild")),
])
def test_mistakes_are_located(tmp_path, edit, message):
    recipe = _project(tmp_path)
    text = recipe.read_text()
    fixed = {"m: 5}": "m: 6}", "back: {op: rebuild, basis: basis}":
             "back: {op: rebuild, basis: tv}", "tasks: [t2]": "tasks: [t9]",
             "tasks: [t2]}": "tasks: []}"}[edit]
    recipe.write_text(text.replace(edit, fixed))
    res = _cli("validate", recipe)
    assert res.exit_code != 0
    assert message in res.output
    assert "r.yaml:" in res.output  # file:line


def test_inspect_a_rebuild_runs_the_basis_pass_first(tmp_path):
    # `tvrecipe inspect r.yaml back` streams `rebuild`, which needs compress_basis's decoder
    # from its whole-model pass: inspect runs that pass first, as `run` does (it was an
    # internal error, KeyError 'atoms'). Its cosines are those of the vectors `run` writes.
    recipe = _project(tmp_path, m=3)
    res = _cli("inspect", recipe, "back", "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    names = [f"t{i}" for i in range(T)]
    assert got["members"] == names
    assert not (tmp_path / "back").exists()  # inspect writes nothing
    assert _cli("run", recipe).exit_code == 0
    flat = {n: torch.cat([load_file(str(tmp_path / "back" / f"{n}.safetensors"))[k]
                          .double().flatten() for k in ("w", "b")]) for n in names}
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            want = torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0).item()
            assert got["cosine"][i][j] == pytest.approx(want, abs=1e-5)
