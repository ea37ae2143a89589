"""End to end from the CLI: TIES, DARE, prune, cluster_basis and decompose on tiny checkpoints,
checked against the kernels applied by hand and against the math itself."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
import torch

from tests.conftest import (
    FLOATING,
    INT_BUFFER,
    INT_SHAPE,
    MATRICES,
    SHAPES,
    gen,
    read_tensors,
    snapshot,
)
from tvrecipe import ops

TASKS = ("math", "code", "toxic")


def recipe(ms, steps: str, outputs: str, settings: str = "") -> str:
    return ("tvrecipe: 1\n" + settings + ms.models_yaml() + "steps:\n" + steps + "outputs:\n"
            + outputs)


def members(folder) -> list[str]:
    return json.loads((folder / "vectors.json").read_text())["members"]


def ref_ties(xs, *, density, weights, majority, normalize):
    """TIES as methods.md states it (top-k trim, sign election, disjoint merge)."""
    n = xs[0].numel()
    k = max(1, int(density * n))  # mergekit's trim count: the float product rounded down
    trimmed = []
    for x in xs:
        f = x.flatten()
        keep = torch.zeros(n, dtype=torch.bool)
        keep[f.abs().topk(k).indices] = True
        trimmed.append(torch.where(keep, f, torch.zeros_like(f)))
    c = [w * t for w, t in zip(weights, trimmed)]
    total = torch.stack(c).sum(0)
    if majority == "total":
        gamma = torch.sign(total)
    else:
        votes = torch.stack([torch.sign(ci) for ci in c]).sum(0)
        gamma = torch.sign(2 * votes + torch.sign(total))
    agree = [(torch.sign(ci) == gamma) & (ci != 0) for ci in c]
    num = torch.stack([torch.where(a, ci, 0.0) for a, ci in zip(agree, c)]).sum(0)
    if not normalize:
        return num.view(xs[0].shape)
    den = torch.stack([torch.where(a, abs(w), 0.0) for a, w in zip(agree, weights)]).sum(0)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0).view(xs[0].shape)


# ---- TIES -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, kw, weights", [
    ("inputs: tv, density: 0.5", {"density": 0.5}, [1.0, 1.0, 1.0]),
    (("inputs: tv, density: 0.3, majority: count, normalize: false, "
     "weights: {math: 1.0, code: 0.5, toxic: 2.0}"),
     {"density": 0.3, "majority": "count", "normalize": False}, [1.0, 0.5, 2.0]),
    ("inputs: [tv.math, tv.code, tv.toxic], density: 1.0, weights: [0.2, 0.3, 0.5]",
     {"density": 1.0}, [0.2, 0.3, 0.5]),
], ids=["defaults", "count-unnormalized", "dense-weighted"])
def test_ties_matches_the_kernel_and_the_math(make_models, cli, tmp_path, fields, kw, weights):
    ms = make_models(TASKS)
    steps = ("  tv: {op: extract, base: base, finetuned: [math, code, toxic]}\n"
             f"  merged: {{op: ties, {fields}}}\n"
             "  model: {op: apply, base: base, delta: merged, scale: 0.7}\n")
    outs = ("  vec: {from: merged, path: ./out/vec}\n"
            "  model: {from: model, path: ./out/model}\n")
    cli.write("r.yaml", recipe(ms, steps, outs))
    cli.ok("run", "r.yaml")
    vec = read_tensors(tmp_path / "out" / "vec")
    model = read_tensors(tmp_path / "out" / "model")
    kw = {"majority": "total", "normalize": True, **kw}
    ws = weights
    base = ms.f32("base")
    assert set(vec) == set(FLOATING)
    for k in FLOATING:
        deltas = [ms.delta(t)[k] for t in TASKS]
        by_kernel = ops.ties(deltas, weights=ws, **kw)
        assert torch.equal(vec[k], by_kernel), k
        torch.testing.assert_close(vec[k], ref_ties(deltas, weights=ws, **kw),
                                   rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(model[k], base[k] + 0.7 * by_kernel, rtol=1e-6, atol=1e-8)


def test_ties_with_full_density_and_agreeing_signs_is_the_weighted_mean(make_models, cli,
                                                                       tmp_path):
    # Every fine-tune moves every entry the same way: TIES must reduce to the weighted mean.
    g = gen(5)
    direction = {k: torch.randn(SHAPES[k], generator=g) for k in FLOATING}
    deltas = {t: {k: 0.01 * (i + 1) * direction[k].sign() * (0.5 + torch.rand(SHAPES[k],
                                                                                  generator=g))
                  for k in FLOATING} for i, t in enumerate(TASKS)}
    ms = make_models(TASKS, deltas=deltas)
    steps = ("  tv: {op: extract, base: base, finetuned: [math, code, toxic]}\n"
             "  merged: {op: ties, inputs: tv, density: 1.0, weights: [2.0]}\n")
    cli.write("r.yaml", recipe(ms, steps, "  vec: {from: merged, path: ./out/vec}\n"))
    cli.ok("run", "r.yaml")
    vec = read_tensors(tmp_path / "out" / "vec")
    for k in FLOATING:
        mean = sum(ms.delta(t)[k] for t in TASKS) / 3
        torch.testing.assert_close(vec[k], mean, rtol=1e-6, atol=1e-9)


# ---- DARE -----------------------------------------------------------------------------------

DARE_STEPS = ("  tv: {op: extract, base: base, finetuned: [math, code, toxic]}\n"
              "  dared: {op: dare, input: tv, density: 0.5}\n"
              "  one: {op: dare, input: tv.math, density: 0.5, rescale: false}\n"
              "  same: {op: dare, input: tv.code, density: 1.0}\n"
              "  merged: {op: ties, inputs: dared, density: 0.5}\n")
DARE_OUTS = ("  dared: {from: dared, path: ./out/dared}\n"
             "  one: {from: one, path: ./out/one}\n"
             "  same: {from: same, path: ./out/same}\n"
             "  merged: {from: merged, path: ./out/merged}\n")


def test_dare_drops_and_rescales_deterministically(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    cli.write("r.yaml", recipe(ms, DARE_STEPS, DARE_OUTS, "settings: {seed: 3}\n"))
    cli.ok("run", "r.yaml")
    first = snapshot(tmp_path / "out")
    cli.ok("run", "r.yaml", "--force", "--no-cache")
    assert snapshot(tmp_path / "out") == first, "same seed, different bytes"

    dared = tmp_path / "out" / "dared"
    assert members(dared) == list(TASKS)
    kept = total = 0
    masks = {}
    for t in TASKS:
        got = read_tensors(dared / f"{t}.safetensors")
        masks[t] = torch.cat([(got[k] != 0).flatten() for k in FLOATING])
        for k in FLOATING:
            tau = ms.delta(t)[k]
            is_kept = got[k] != 0
            # Each entry is dropped (0) or kept and divided by the density, exactly.
            assert torch.equal(got[k][is_kept], (tau / 0.5)[is_kept]), (t, k)
            kept += int(is_kept.sum())
            total += tau.numel()
    assert 0.4 < kept / total < 0.6
    # Every member gets its own mask (the seed derives from step, member and tensor).
    assert not torch.equal(masks["math"], masks["code"])

    one = read_tensors(tmp_path / "out" / "one")
    same = read_tensors(tmp_path / "out" / "same")
    for k in FLOATING:
        tau = ms.delta("math")[k]
        assert torch.equal(one[k][one[k] != 0], tau[one[k] != 0])  # no rescale
        assert torch.equal(same[k], ms.delta("code")[k])  # density 1 is the identity

    # dare then ties composes: the ties output is ties of what dare gave.
    merged = read_tensors(tmp_path / "out" / "merged")
    for k in FLOATING:
        xs = [read_tensors(dared / f"{t}.safetensors")[k] for t in TASKS]
        assert torch.equal(merged[k], ops.ties(xs, density=0.5)), k


def test_dare_with_another_seed_gives_other_bytes(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    cli.write("a.yaml", recipe(ms, DARE_STEPS, DARE_OUTS.replace("./out/", "./a/"),
                               "settings: {seed: 3}\n"))
    cli.write("b.yaml", recipe(ms, DARE_STEPS, DARE_OUTS.replace("./out/", "./b/"),
                               "settings: {seed: 4}\n"))
    cli.ok("run", "a.yaml")
    cli.ok("run", "b.yaml")
    for t in TASKS:
        a = read_tensors(tmp_path / "a" / "dared" / f"{t}.safetensors")
        b = read_tensors(tmp_path / "b" / "dared" / f"{t}.safetensors")
        assert any(not torch.equal(a[k], b[k]) for k in FLOATING), t
    # density 1 does not depend on the seed at all
    a = read_tensors(tmp_path / "a" / "same")
    b = read_tensors(tmp_path / "b" / "same")
    assert all(torch.equal(a[k], b[k]) for k in FLOATING)


# ---- prune ----------------------------------------------------------------------------------


# Entries kept at density 0.3, k = max(1, floor(0.3 n)) by tensor size n (rounding would keep
# 29 of 96 and 4 of 12).
PRUNE_KEPT = {128: 38, 64: 19, 96: 28, 12: 3, 8: 2}


def test_prune_keeps_the_largest_entries_of_each_tensor(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    steps = ("  tv: {op: extract, base: base, finetuned: [math, code, toxic]}\n"
             "  pruned: {op: prune, input: tv, density: 0.3}\n"
             "  merged: {op: sum, inputs: pruned}\n"
             "  model: {op: apply, base: base, delta: merged}\n")
    outs = ("  pruned: {from: pruned, path: ./out/pruned}\n"
            "  model: {from: model, path: ./out/model}\n")
    cli.write("r.yaml", recipe(ms, steps, outs))
    cli.ok("run", "r.yaml")
    model = read_tensors(tmp_path / "out" / "model")
    base = ms.f32("base")
    total = {k: torch.zeros(SHAPES[k]) for k in FLOATING}
    for t in TASKS:
        got = read_tensors(tmp_path / "out" / "pruned" / f"{t}.safetensors")
        for k in FLOATING:
            tau = ms.delta(t)[k]
            assert torch.equal(got[k], ops.prune(tau, density=0.3)), (t, k)
            nz = got[k] != 0
            assert int(nz.sum()) == PRUNE_KEPT[tau.numel()], (t, k)
            assert torch.equal(got[k][nz], tau[nz])
            if (~nz).any():
                assert tau[nz].abs().min() >= tau[~nz].abs().max()
            total[k] += got[k]
    for k in FLOATING:
        torch.testing.assert_close(model[k], base[k] + total[k], rtol=1e-6, atol=1e-8)


# ---- cluster_basis --------------------------------------------------------------------------

CLUSTER_TASKS = tuple(f"t{i}" for i in range(6))


def planted_clusters(seed: int = 11) -> dict[str, dict[str, torch.Tensor]]:
    """Task i = direction (i mod 2) + 5% noise, per tensor: clusters {t0,t2,t4}, {t1,t3,t5}."""
    g = gen(seed)
    dirs = [{k: 0.01 * torch.randn(SHAPES[k], generator=g) for k in FLOATING} for _ in range(2)]
    return {t: {k: dirs[i % 2][k] + 0.0005 * torch.randn(SHAPES[k], generator=g)
                for k in FLOATING} for i, t in enumerate(CLUSTER_TASKS)}


@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_cluster_basis_recovers_planted_clusters(make_models, cli, tmp_path, merge):
    ms = make_models(CLUSTER_TASKS, deltas=planted_clusters())
    steps = (f"  tv: {{op: extract, base: base, finetuned: [{', '.join(CLUSTER_TASKS)}]}}\n"
             f"  basis: {{op: cluster_basis, inputs: tv, k: auto, merge: {merge}}}\n"
             "  merged: {op: sum, inputs: basis}\n"
             "  model: {op: apply, base: base, delta: merged}\n")
    outs = ("  basis: {from: basis, path: ./out/basis}\n"
            "  model: {from: model, path: ./out/model}\n")
    cli.write("r.yaml", recipe(ms, steps, outs))
    res = cli.ok("run", "r.yaml", "--report", "report.json")
    report = json.loads((tmp_path / "report.json").read_text())["basis"]
    assert report["k"] == 2
    assert report["labels"] == [0, 1, 0, 1, 0, 1]
    assert report["basis"] == {"b0": ["t0", "t2", "t4"], "b1": ["t1", "t3", "t5"]}
    assert report["tasks"] == list(CLUSTER_TASKS)
    assert "b0: t0, t2, t4" in res.stdout

    folder = tmp_path / "out" / "basis"
    assert sorted(p.name for p in folder.iterdir()) == [
        "b0.safetensors", "b1.safetensors", "vectors.json"]
    assert members(folder) == ["b0", "b1"]
    groups = {"b0": ("t0", "t2", "t4"), "b1": ("t1", "t3", "t5")}
    factor = 1 / 3 if merge == "mean" else 1.0
    for b, tasks in groups.items():
        got = read_tensors(folder / f"{b}.safetensors")
        for k in FLOATING:
            want = factor * sum(ms.delta(t)[k] for t in tasks)
            torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-9)
    # merge: mean + sum of the basis = task arithmetic with weight 1/|cluster| per task.
    model = read_tensors(tmp_path / "out" / "model")
    base = ms.f32("base")
    for k in FLOATING:
        want = base[k] + sum(factor * ms.delta(t)[k] for t in CLUSTER_TASKS)
        torch.testing.assert_close(model[k], want, rtol=1e-6, atol=1e-8)


def test_the_similarity_pass_sums_its_products_in_order_on_one_thread(
        make_models, cli, tmp_path, monkeypatch):
    # The Gram products run on a thread of their own beside the stream: every block in the
    # order the stream gives it, so the similarities are those of the same products summed
    # on one thread, bit for bit.
    from tvrecipe import ops
    from tvrecipe.exec import runner as runner_mod

    monkeypatch.setattr("tvrecipe.exec.runner.CHUNK_ELEMENTS", 24)  # many row blocks
    ms = make_models(CLUSTER_TASKS, deltas=planted_clusters())
    calls, real = [], ops.gram_update

    def spy(gram, xs):
        calls.append((threading.current_thread().name, [x.clone() for x in xs]))
        return real(gram, xs)

    monkeypatch.setattr(runner_mod.ops, "gram_update", spy)
    steps = (f"  tv: {{op: extract, base: base, finetuned: [{', '.join(CLUSTER_TASKS)}]}}\n"
             "  basis: {op: cluster_basis, inputs: tv, k: 2}\n")
    cli.write("r.yaml", recipe(ms, steps, "  basis: {from: basis, path: ./out/basis}\n"))
    cli.ok("run", "r.yaml", "--report", "report.json")
    assert len(calls) > len(FLOATING)  # the row blocks of every tensor
    assert {name for name, _ in calls} == {"tvrecipe-gram_0"}
    replay = torch.zeros(len(CLUSTER_TASKS), len(CLUSTER_TASKS), dtype=torch.float64)
    for _name, xs in calls:
        real(replay, xs)
    report = json.loads((tmp_path / "report.json").read_text())["basis"]
    assert report["similarity"] == ops.cosine_from_gram(replay).tolist()


@pytest.mark.parametrize("pooled", [False, True])
def test_the_similarity_pass_reads_a_sets_deltas_in_place_with_the_same_similarities(
        pooled, cli, tmp_path, monkeypatch):
    # In a whole-model pass, extract makes a set's deltas as 64-byte aligned rows of one
    # tensor, which the Gram products read in place (no staged copies): the similarities
    # are bit for bit those of the same deltas as separate tensors. Row blocks of about 2600
    # entries split the tensors; with ``pooled`` the stacks come from the
    # run's buffer pool (as 8 x 1M float32 blocks do), and the pass gives its maps back.
    # The merge pass makes no stacks.
    from safetensors.torch import save_file

    from tvrecipe.exec import buffers
    from tvrecipe.exec import runner as runner_mod
    from tvrecipe.ops import basis

    monkeypatch.setattr(runner_mod, "CHUNK_ELEMENTS", 2600)
    if pooled:
        monkeypatch.setattr(buffers, "MIN_BYTES", 1024)
    pools = []
    real_pool = buffers.BufferPool
    monkeypatch.setattr(runner_mod, "BufferPool", lambda: pools.append(real_pool()) or pools[-1])
    held = []  # the pool's maps as the merge pass starts
    real_pass = runner_mod.Runner._merge_pass

    def merge_pass(self, *args):
        held.append(self.buffers._held)
        return real_pass(self, *args)

    monkeypatch.setattr(runner_mod.Runner, "_merge_pass", merge_pass)
    merged = []
    real_merge = ops.merge_cluster

    def merge_spy(xs, **options):
        merged.append(basis._rows_of_one([x.reshape(-1) for x in xs]))
        return real_merge(xs, **options)

    monkeypatch.setattr(ops, "merge_cluster", merge_spy)
    g = gen(5)
    shapes = {"a.weight": (40, 130), "b.weight": (3, 2049), "c.bias": (7,)}  # 5200, 6147 entries
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    names = ["t0", "t1", "t2", "t3", "t4"]
    for name in ["base", *names]:
        ws = base if name == "base" else {
            k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(ws, str(tmp_path / f"{name}.safetensors"))
    calls, real = [], ops.gram_update

    def spy(gram, xs):
        time.sleep(0.05)  # (the last blocks' products still run as the stream ends)
        calls.append((basis._rows_of_one([x.reshape(-1) for x in xs]) is not None,
                      [x.clone() for x in xs]))
        return real(gram, xs)

    monkeypatch.setattr(runner_mod.ops, "gram_update", spy)
    models = "".join(f"  {n}: ./{n}.safetensors\n" for n in ["base", *names])
    cli.write("r.yaml", "tvrecipe: 1\nmodels:\n" + models + "steps:\n"
              f"  tv: {{op: extract, base: base, finetuned: [{', '.join(names)}]}}\n"
              "  basis: {op: cluster_basis, inputs: tv, k: 2}\n"
              "outputs:\n  basis: {from: basis, path: ./out/basis}\n")
    cli.ok("run", "r.yaml", "--report", "report.json", "--device", "cpu")  # (CPU layouts)
    # a.weight in two blocks of 20 rows, b.weight in three of one row (2049), c.bias whole
    assert [in_place for in_place, _ in calls] == [True] * 6
    assert [xs[0].shape for _, xs in calls] == [(20, 130)] * 2 + [(1, 2049)] * 3 + [(7,)]
    replay = torch.zeros(len(names), len(names), dtype=torch.float64)
    for _, xs in calls:
        assert basis._rows_of_one([x.reshape(-1) for x in xs]) is None  # (clones: staged)
        real(replay, xs)
    report = json.loads((tmp_path / "report.json").read_text())["basis"]
    assert report["similarity"] == ops.cosine_from_gram(replay).tolist()
    (pool,) = pools
    assert (pool.reused > 0) == pooled  # (a block's stack lent again to a later block)
    assert held == [0]  # (the similarity pass gave every map back)
    assert merged and all(rows is None for rows in merged)
    # In float64 nothing is stacked: gram_update would stage such rows anyway.
    calls.clear()
    cli.write("r.yaml", (tmp_path / "r.yaml").read_text().replace(
        "tvrecipe: 1\n", "tvrecipe: 1\nsettings: {compute_dtype: float64}\n"))
    cli.ok("run", "r.yaml", "--device", "cpu")
    assert [in_place for in_place, _ in calls] == [False] * 6


def test_cluster_basis_with_explicit_k_and_member_reference(make_models, cli, tmp_path):
    ms = make_models(CLUSTER_TASKS, deltas=planted_clusters())
    steps = (f"  tv: {{op: extract, base: base, finetuned: [{', '.join(CLUSTER_TASKS)}]}}\n"
             "  basis: {op: cluster_basis, inputs: tv, k: 2}\n"
             "  model: {op: apply, base: base, delta: basis.b1, scale: 2.0}\n")
    cli.write("r.yaml", recipe(ms, steps, "  model: {from: model, path: ./out/model}\n"))
    cli.ok("validate", "r.yaml")
    cli.ok("run", "r.yaml")
    model = read_tensors(tmp_path / "out" / "model")
    base = ms.f32("base")
    for k in FLOATING:
        b1 = sum(ms.delta(t)[k] for t in ("t1", "t3", "t5")) / 3
        torch.testing.assert_close(model[k], base[k] + 2.0 * b1, rtol=1e-6, atol=1e-8)


# ---- decompose ------------------------------------------------------------------------------


def planted_shared(seed: int = 21) -> tuple[dict, dict]:
    """Per 2-D tensor: one column direction a common to every task plus one of each task's own.

    Returns the deltas and the shared direction of each matrix.
    """
    g = gen(seed)
    shared_dir = {k: torch.randn(SHAPES[k][0], generator=g) for k in MATRICES}
    deltas = {}
    for t in TASKS:
        d = {}
        for k in FLOATING:
            if k in MATRICES:
                rows, cols = SHAPES[k]
                own = torch.randn(rows, generator=g)
                d[k] = 0.01 * (torch.outer(shared_dir[k], torch.randn(cols, generator=g))
                               + torch.outer(own, torch.randn(cols, generator=g)))
            else:
                d[k] = 0.01 * torch.randn(SHAPES[k], generator=g)
        deltas[t] = d
    return deltas, shared_dir


def test_decompose_parts_add_up_and_are_orthogonal(make_models, cli, tmp_path):
    deltas, shared_dir = planted_shared()
    ms = make_models(TASKS, deltas=deltas)
    steps = ("  tv: {op: extract, base: base, finetuned: [math, code, toxic]}\n"
             "  parts: {op: decompose, inputs: tv, rank: 2}\n")
    outs = ("  shared: {from: parts.shared, path: ./out/shared}\n"
            "  unique: {from: parts.unique, path: ./out/unique}\n")
    cli.write("r.yaml", recipe(ms, steps, outs))
    res = cli.ok("run", "r.yaml", "--report", "report.json")
    assert "parts (decompose)" in res.stdout
    assert members(tmp_path / "out" / "shared") == list(TASKS)
    assert members(tmp_path / "out" / "unique") == list(TASKS)
    report = json.loads((tmp_path / "report.json").read_text())["parts"]["tensors"]
    excluded = {"model.embed_tokens.weight", "lm_head.weight"}
    for t in TASKS:
        sh = read_tensors(tmp_path / "out" / "shared" / f"{t}.safetensors")
        un = read_tensors(tmp_path / "out" / "unique" / f"{t}.safetensors")
        tau = ms.delta(t)
        for k in FLOATING:
            torch.testing.assert_close(sh[k] + un[k], tau[k], rtol=1e-5, atol=1e-7)
            if k in MATRICES:
                inner = float((sh[k] * un[k]).sum())
                assert abs(inner) <= 1e-5 * float(sh[k].norm() * un[k].norm()) + 1e-12, k
            if k in excluded or k not in MATRICES:
                # Embeddings (excluded by default) and 1-D tensors: all unique.
                assert torch.equal(sh[k], torch.zeros_like(sh[k])), k
                assert torch.equal(un[k], tau[k]), k
            else:
                # The planted common direction a: shared = a aᵀ τ / ‖a‖².
                a = shared_dir[k] / shared_dir[k].norm()
                torch.testing.assert_close(sh[k], torch.outer(a, a @ tau[k]),
                                           rtol=1e-4, atol=1e-6)
                assert report[k]["shared_dim"] == 1
                assert report[k]["mode"] == "subspace"


def test_decompose_against_a_reference_gives_parts_for_the_target_only(make_models, cli,
                                                                       tmp_path):
    deltas, shared_dir = planted_shared()
    ms = make_models(TASKS, deltas=deltas)
    steps = ("  tv: {op: extract, base: base, finetuned: [math, code, toxic]}\n"
             "  parts: {op: decompose, inputs: tv.toxic, reference: [tv.math, tv.code], "
             "rank: 2}\n"
             "  detox: {op: negate, input: parts.unique.toxic}\n"
             "  model: {op: apply, base: base, delta: detox, scale: 0.5}\n")
    outs = ("  unique: {from: parts.unique, path: ./out/unique}\n"
            "  shared: {from: parts.shared, path: ./out/shared}\n"
            "  model: {from: model, path: ./out/model}\n")
    cli.write("r.yaml", recipe(ms, steps, outs))
    cli.ok("run", "r.yaml")
    for part in ("unique", "shared"):
        folder = tmp_path / "out" / part
        assert members(folder) == ["toxic"]
        assert sorted(p.name for p in folder.iterdir()) == ["toxic.safetensors", "vectors.json"]
    un = read_tensors(tmp_path / "out" / "unique" / "toxic.safetensors")
    sh = read_tensors(tmp_path / "out" / "shared" / "toxic.safetensors")
    model = read_tensors(tmp_path / "out" / "model")
    tau, base = ms.delta("toxic"), ms.f32("base")
    for k in FLOATING:
        torch.testing.assert_close(sh[k] + un[k], tau[k], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(model[k], base[k] - 0.5 * un[k], rtol=1e-6, atol=1e-8)
    k = "model.layers.0.self_attn.q_proj.weight"
    a = shared_dir[k] / shared_dir[k].norm()
    torch.testing.assert_close(sh[k], torch.outer(a, a @ tau[k]), rtol=1e-4, atol=1e-6)


def test_large_whole_tensors_are_read_in_turn_not_ahead(make_models, cli, tmp_path, monkeypatch):
    # A whole-tensor stream (TIES) reads the next tensor ahead of the compute, unless its
    # copies from every input pass PREFETCH_BYTES: that one is read when its turn comes (on
    # the computing thread), so two of them are never held at once. Same bytes either way.
    import threading

    from tvrecipe.exec.runner import Runner
    ms = make_models(("math", "code"))
    steps = ("  tv: {op: extract, base: base, finetuned: [math, code]}\n"
             "  merged: {op: ties, inputs: tv, density: 0.5}\n")
    cli.write("r.yaml", recipe(ms, steps, "  merged: {from: merged, path: ./out/m}\n"))
    cli.ok("run", "r.yaml", "--no-cache")
    ahead = snapshot(tmp_path / "out")
    threads: dict[str, str] = {}
    real_read = Runner._read

    def spy(self, nodes, tensor, rows, *args):
        threads[tensor] = threading.current_thread().name
        return real_read(self, nodes, tensor, rows, *args)

    monkeypatch.setattr(Runner, "_read", spy)
    # Copies from the 3 inputs in float32: 12 bytes per entry; the budget lets only tensors
    # of at most 8 entries be read ahead.
    monkeypatch.setattr("tvrecipe.exec.runner.PREFETCH_BYTES", 100)
    cli.ok("run", "r.yaml", "--no-cache", "--force")
    assert snapshot(tmp_path / "out") == ahead
    shapes = {**SHAPES, INT_BUFFER: INT_SHAPE}
    in_turn = {k for k, name in threads.items() if not name.startswith("tvrecipe-read")}
    assert in_turn == {k for k in threads if math.prod(shapes[k]) * 12 > 100}
    assert set(threads) - in_turn, "no tensor was small enough to be read ahead"


def test_cluster_basis_refuses_a_k_for_task_vectors_with_nothing_in_common(make_models, cli,
                                                                           tmp_path):
    # Each task changes a tensor of its own (or opposes another): no positive cosine between
    # any two, so k: 2 would group them arbitrarily (scikit-learn's labels for such a graph
    # were not repeatable). Refused after the similarity pass, nothing written; k: auto runs.
    names = ["a", "b", "c"]
    own = dict(zip(names, ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight",
                           "model.layers.0.self_attn.q_proj.weight"]))
    deltas = {}
    for i, name in enumerate(names):
        deltas[name] = {k: torch.zeros(s) for k, s in SHAPES.items()}
        sign = -1.0 if i == 2 else 1.0  # c opposes a
        deltas[name][own[name]] = sign * torch.full(SHAPES[own[name]], 0.01)
    ms = make_models(names, deltas=deltas)
    steps = ("  tv: {op: extract, base: base, finetuned: [a, b, c]}\n"
             "  basis: {op: cluster_basis, inputs: tv, k: 2}\n")
    cli.write("r.yaml", recipe(ms, steps, "  basis: {from: basis, path: ./out/basis}\n"))
    res = cli.fails(5, "run", "r.yaml")
    assert res.err_lines == [
        "tvrecipe: runtime error:",
        ("step 'basis' (cluster_basis), whole-model pass: k=2, but no two of the 3 task "
         "vectors have a positive cosine similarity (they are orthogonal or opposed), so there "
         "is nothing to cluster them by and any grouping would be arbitrary: use k: 1 (one "
         "basis vector of all), k: 3 (each task alone) or k: auto (which gives 1 here)")]
    assert not (tmp_path / "out").exists()
    cli.write("r.yaml", recipe(ms, steps.replace("k: 2", "k: auto"),
                               "  basis: {from: basis, path: ./out/basis}\n"))
    cli.ok("run", "r.yaml")
    assert sorted(p.name for p in (tmp_path / "out" / "basis").glob("*.safetensors")) == [
        "b0.safetensors"]
