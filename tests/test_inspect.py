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


def test_plot_writes_a_png(make_models, cli, tmp_path):
    pytest.importorskip("matplotlib")
    ms = make_models(CLUSTER_TASKS, deltas=planted_clusters())
    cli.write("r.yaml", _cluster_recipe(ms))
    cli.ok("inspect", "r.yaml", "basis", "--plot", "basis.png")
    cli.ok("inspect", "r.yaml", "parts", "--plot", "parts.png")
    for name in ("basis.png", "parts.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
