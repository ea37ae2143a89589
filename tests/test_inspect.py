"""`tvrecipe inspect`: cosine matrices, cluster membership, decomposition ranks, and plots."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import FLOATING, MATRICES
from tests.test_e2e_merges import CLUSTER_TASKS, planted_clusters, recipe


def _cluster_recipe(ms) -> str:
    steps = (f"  tv: {{op: extract, base: base, finetuned: [{', '.join(CLUSTER_TASKS)}]}}\n"
             "  basis: {op: cluster_basis, inputs: tv, k: auto}\n"
             "  parts: {op: decompose, inputs: [tv.t0, tv.t2], rank: 2}\n"
             "  merged: {op: sum, inputs: basis}\n"
             "  model: {op: apply, base: base, delta: merged}\n")
    return recipe(ms, steps, "  model: {from: model, path: ./out/model}\n")


def test_cosine_matrix_of_a_set_matches_the_math(make_models, cli, tmp_path):
    deltas = planted_clusters()
    ms = make_models(CLUSTER_TASKS, deltas=deltas)
    cli.write("r.yaml", _cluster_recipe(ms))
    res = cli.ok("inspect", "r.yaml", "tv", "--json")
    got = json.loads(res.stdout)
    flat = {t: torch.cat([ms.delta(t)[k].flatten() for k in FLOATING]).double()
            for t in CLUSTER_TASKS}
    for i, a in enumerate(CLUSTER_TASKS):
        for j, b in enumerate(CLUSTER_TASKS):
            want = torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0).item()
            assert got["cosine"][i][j] == pytest.approx(want, abs=1e-6)
    assert not (tmp_path / "out").exists()  # inspect writes nothing


def test_cluster_step_shows_membership(make_models, cli):
    ms = make_models(CLUSTER_TASKS, deltas=planted_clusters())
    cli.write("r.yaml", _cluster_recipe(ms))
    res = cli.ok("inspect", "r.yaml", "basis")
    assert "  b0: t0, t2, t4" in res.stdout and "  b1: t1, t3, t5" in res.stdout
    assert "Laplacian eigenvalues:" in res.stdout


def test_decompose_step_shows_ranks_per_tensor(make_models, cli):
    ms = make_models(CLUSTER_TASKS, deltas=planted_clusters())
    cli.write("r.yaml", _cluster_recipe(ms))
    got = json.loads(cli.ok("inspect", "r.yaml", "parts", "--json").stdout)["tensors"]
    for name in MATRICES:
        info = got[name]
        if "embed" in name or "lm_head" in name:
            assert info["mode"] == "excluded-unique"
        else:  # two tasks sharing one planted direction: it is found, ranks as asked
            assert info["mode"] == "subspace" and info["ranks"] == [2, 2]
            assert info["shared_dim"] >= 1


def test_inspect_refuses_a_checkpoint(make_models, cli):
    ms = make_models(CLUSTER_TASKS, deltas=planted_clusters())
    cli.write("r.yaml", _cluster_recipe(ms))
    res = cli.fails(2, "inspect", "r.yaml", "model")
    assert "'model' is a checkpoint: inspect shows" in res.stderr


def test_an_unknown_name_is_matched_against_every_step(make_models, cli):
    """Steps no output needs (parts) are inspectable, so they are among the names offered."""
    ms = make_models(CLUSTER_TASKS, deltas=planted_clusters())
    cli.write("r.yaml", _cluster_recipe(ms))
    res = cli.fails(2, "inspect", "r.yaml", "part")
    assert res.err_lines[1:] == ["no step or model named 'part'; did you mean 'parts'?"]
    res = cli.fails(2, "inspect", "r.yaml", "nope")
    assert res.err_lines[1:] == [("no step or model named 'nope'; known: base, "
                                  + ", ".join(CLUSTER_TASKS) + ", tv, basis, parts, merged, model")]


def test_plot_writes_a_png(make_models, cli, tmp_path):
    pytest.importorskip("matplotlib")
    ms = make_models(CLUSTER_TASKS, deltas=planted_clusters())
    cli.write("r.yaml", _cluster_recipe(ms))
    cli.ok("inspect", "r.yaml", "basis", "--plot", "basis.png")
    cli.ok("inspect", "r.yaml", "parts", "--plot", "parts.png")
    for name in ("basis.png", "parts.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


SPECTRA = """\
tvrecipe: 1
settings: {compute_dtype: float64}
models:
  base: ./base.safetensors
  a: ./a.safetensors
  b: ./b.safetensors
  c: ./c.safetensors
steps:
  tv: {op: extract, base: base, finetuned: [a, b, c]}
  merged: {op: tsv_merge, inputs: tv}
  iso: {op: iso, inputs: tv, variant: cts}
  parts: {op: decompose, inputs: tv, rank: 4}
  basis: {op: compress_basis, inputs: tv, m: 2}
outputs:
  m: {from: merged, path: ./out/m}
"""


def _spectral_project(tmp_path):
    """Two layers of a 48 × 36 weight: a and b share their left subspace (rank 4, equal
    singular values), c's is orthogonal to it; plus a norm (1-D, left out) and an empty
    0 × 36 matrix (no spectrum: left out too; it was an internal error)."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(48, 8, generator=g, dtype=torch.float64)).Q
    ua, uc = q[:, :4], q[:, 4:]
    base = {f"model.layers.{i}.mlp.w.weight": torch.zeros(48, 36, dtype=torch.float64)
            for i in range(2)} | {"model.norm.weight": torch.ones(36, dtype=torch.float64),
                                  "model.layers.0.mlp.empty.weight": torch.zeros(0, 36)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for name, u in (("a", ua), ("b", ua), ("c", uc)):
        ft = {}
        for k, v in base.items():
            if v.numel() == 0:
                ft[k] = v
            elif v.dim() == 2:
                vt = torch.linalg.qr(torch.randn(36, 4, generator=g, dtype=torch.float64)).Q
                ft[k] = v + 2.0 * u @ vt.T
            else:
                ft[k] = v + 0.1
        save_file(ft, str(tmp_path / f"{name}.safetensors"))
    (tmp_path / "r.yaml").write_text(SPECTRA)


@pytest.mark.parametrize("step", ["merged", "iso", "parts"])
def test_spectral_steps_show_spectra_and_overlaps(cli, tmp_path, step):
    _spectral_project(tmp_path)
    got = json.loads(cli.ok("inspect", "r.yaml", step, "--json").stdout)
    assert got["tasks"] == ["a", "b", "c"]
    assert list(got["groups"]) == ["model.layers.*.mlp.w.weight"]  # the norm is left out
    g = got["groups"]["model.layers.*.mlp.w.weight"]
    assert g["count"] == 2 and g["shape"] == [48, 36]
    assert g["k"] == (4 if step == "parts" else 12)  # decompose's rank, else ⌊r/T⌋
    assert g["erank"] == pytest.approx([4.0] * 3, abs=1e-9)  # four equal singular values
    assert g["r90"] == [4.0] * 3
    assert g["energy_k"] == pytest.approx([1.0] * 3, abs=1e-12)
    # a and b span one subspace, c another: top-k overlaps 4/k and 0
    k = g["k"]
    overlap = torch.tensor(g["overlap"])
    torch.testing.assert_close(overlap.diagonal(), torch.full((3,), 4 / k, dtype=overlap.dtype))
    assert overlap[0, 1] == pytest.approx(4 / k, abs=1e-9)
    assert overlap[0, 2] == pytest.approx(0.0, abs=1e-9)
    assert overlap[1, 2] == pytest.approx(0.0, abs=1e-9)
    assert ("tensors" in got) == (step == "parts")  # decompose adds its per-tensor table
    text = cli.ok("inspect", "r.yaml", step).stdout
    assert "singular spectra of 3 task vectors" in text
    assert "model.layers.*.mlp.w.weight  (2 tensors, 48×36" in text
    assert not (tmp_path / "out").exists()


def _close(a, b, path="") -> None:
    """Two inspect reports alike: the same keys, strings and counts; numbers within float32's
    rounding of a decomposition's (the spectra themselves are float64)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), path
    else:
        assert a == b, path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("step", ["merged", "iso", "parts"])
def test_spectra_on_the_gpu_are_the_cpus(cli, tmp_path, step):
    # (the rank holding 90% of the energy once compared a GPU tensor with a CPU one)
    _spectral_project(tmp_path)
    cpu = json.loads(cli.ok("inspect", "r.yaml", step, "--json", "--device", "cpu").stdout)
    gpu = json.loads(cli.ok("inspect", "r.yaml", step, "--json", "--device", "cuda").stdout)
    _close(gpu, cpu)
    from tvrecipe.ops.lowrank import energy_rank, truncated_svd
    x = torch.randn(48, 36, generator=torch.Generator().manual_seed(3))
    s = torch.linalg.svdvals(x)
    r = energy_rank(s, 0.9)
    assert 1 < r < 36 and energy_rank(s.cuda(), 0.9) == r
    u, sv, vh = truncated_svd(x.cuda(), energy=0.9)
    assert u.is_cuda and u.shape == (48, r) and sv.shape == (r,) and vh.shape == (r, 36)


def test_spectra_plot_and_compressed_basis_inspection(cli, tmp_path):
    pytest.importorskip("matplotlib")
    _spectral_project(tmp_path)
    res = cli.ok("inspect", "r.yaml", "merged", "--plot", "spectra.png")
    assert (tmp_path / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote spectra.png" in res.stdout
    got = json.loads(cli.ok("inspect", "r.yaml", "basis", "--json").stdout)
    assert got["members"] == ["a", "b", "c"] and got["atoms"] == ["atom0", "atom1", "mean"]
    assert set(got["rebuild_error"]) == {"a", "b", "c"}
    assert got["loss"] == pytest.approx(got["bound"], rel=1e-6, abs=1e-12)
    assert "Eckart–Young bound" in cli.ok("inspect", "r.yaml", "basis").stdout


def test_a_set_named_by_an_upstream_clustering(make_models, cli):
    # `merged` sums cluster_basis's vectors, whose members (b0, b1) are known only once the
    # clustering ran: inspecting a scaled copy of them runs that pass first and names them.
    ms = make_models(CLUSTER_TASKS, deltas=planted_clusters())
    cli.write("r.yaml", _cluster_recipe(ms).replace(
        "  merged: {op: sum, inputs: basis}\n",
        "  merged: {op: sum, inputs: basis}\n  twice: {op: scale, input: basis, factor: 2}\n"))
    got = json.loads(cli.ok("inspect", "r.yaml", "twice", "--json").stdout)
    assert got["members"] == ["b0", "b1"]
    # b0 and b1 are the means of the two planted groups: their cosine is that of the means
    flat = {t: torch.cat([ms.delta(t)[k].flatten() for k in FLOATING]).double()
            for t in CLUSTER_TASKS}
    b0 = (flat["t0"] + flat["t2"] + flat["t4"]) / 3
    b1 = (flat["t1"] + flat["t3"] + flat["t5"]) / 3
    want = torch.nn.functional.cosine_similarity(b0, b1, dim=0).item()
    assert got["cosine"][0][1] == pytest.approx(want, abs=1e-5)
    assert got["norms"][0] == pytest.approx(2 * b0.norm().item(), rel=1e-5)
