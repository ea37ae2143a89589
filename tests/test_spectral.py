"""`tsv_merge` and `iso`: the spectral merges of methods.md, through the CLI, against
references computed here in float64 with numpy, and their defining properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import MATRICES, SHAPES, read_tensors

TASKS = ("a", "b", "c")


def run(cli, ms, tmp_path, step: str, name: str = "r") -> dict[str, np.ndarray]:
    cli.write(f"{name}.yaml", "tvrecipe: 1\nsettings: {compute_dtype: float64}\n"
              + ms.models_yaml() + "steps:\n  tv: {op: extract, base: base, finetuned: ["
              + ", ".join(t for t in ms.weights if t != "base") + "]}\n"
              f"  merged: {step}\n"
              f"outputs:\n  v: {{from: merged, path: ./out/{name}, dtype: float64}}\n")
    cli.ok("run", f"{name}.yaml", "-q")
    return {k: v.numpy() for k, v in read_tensors(tmp_path / "out" / name).items()}


def delta(ms, task: str, key: str) -> np.ndarray:
    """τ in float64, as the engine computes it with compute_dtype float64."""
    return (ms.weights[task][key].double() - ms.weights["base"][key].double()).numpy()


def deltas(ms, names=TASKS) -> dict[str, list[np.ndarray]]:
    return {k: [delta(ms, t, k) for t in names] for k in SHAPES}


def polar(u: np.ndarray) -> np.ndarray:
    p, _s, qh = np.linalg.svd(u, full_matrices=False)
    return p @ qh


def tsv_reference(xs: list[np.ndarray], fraction: float) -> np.ndarray:
    if xs[0].ndim != 2:
        return sum(xs) / len(xs)
    k = max(1, int(fraction * min(xs[0].shape) / len(xs)))
    parts = [np.linalg.svd(x, full_matrices=False) for x in xs]
    u = np.concatenate([p[0][:, :k] for p in parts], 1)
    s = np.concatenate([p[1][:k] for p in parts])
    v = np.concatenate([p[2][:k].T for p in parts], 1)
    return polar(u) @ np.diag(s) @ polar(v).T


def close(got: np.ndarray, want: np.ndarray, key: str) -> None:
    scale = max(float(np.abs(want).max()), 1e-30)
    assert float(np.abs(got - want).max()) <= 1e-9 * scale, key


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_tsv_merge_matches_the_formula(make_models, cli, tmp_path, fraction):
    ms = make_models(TASKS)
    got = run(cli, ms, tmp_path, f"{{op: tsv_merge, inputs: tv, fraction: {fraction}}}")
    for key, xs in deltas(ms).items():
        close(got[key], tsv_reference(xs, fraction), key)


def test_tsv_merge_of_one_task_is_its_truncation(make_models, cli, tmp_path):
    ms = make_models(("a",))
    got = run(cli, ms, tmp_path, "{op: tsv_merge, inputs: tv, fraction: 0.5}")
    for key in MATRICES:
        x = delta(ms, "a", key)
        u, s, vh = np.linalg.svd(x, full_matrices=False)
        k = int(0.5 * min(x.shape))
        close(got[key], (u[:, :k] * s[:k]) @ vh[:k], key)


def test_tsv_merge_of_orthogonal_tasks_is_the_sum_of_truncations(make_models, cli, tmp_path):
    # Two tasks on disjoint row and column blocks: their singular vectors are orthogonal.
    gen = torch.Generator().manual_seed(3)
    plan = {}
    for i, t in enumerate(("a", "b")):
        plan[t] = {}
        for key, shape in SHAPES.items():
            d = torch.zeros(shape)
            if len(shape) == 2:
                h0, h1 = shape[0] // 2, shape[1] // 2
                rows = slice(0, h0) if i == 0 else slice(h0, shape[0])
                cols = slice(0, h1) if i == 0 else slice(h1, shape[1])
                d[rows, cols] = 0.01 * torch.randn(d[rows, cols].shape, generator=gen)
            plan[t][key] = d
    ms = make_models(("a", "b"), deltas=plan)
    got = run(cli, ms, tmp_path, "{op: tsv_merge, inputs: tv}")
    for key in MATRICES:
        want = 0
        for t in ("a", "b"):
            x = delta(ms, t, key)
            u, s, vh = np.linalg.svd(x, full_matrices=False)
            k = min(x.shape) // 2
            want = want + (u[:, :k] * s[:k]) @ vh[:k]
        close(got[key], want, key)


def test_iso_c_flattens_the_spectrum_of_the_sum(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    got = run(cli, ms, tmp_path, "{op: iso, inputs: tv}")
    for key, xs in deltas(ms).items():
        total = sum(xs)
        if total.ndim != 2:
            close(got[key], total / len(xs), key)
            continue
        u, s, vh = np.linalg.svd(total, full_matrices=False)
        close(got[key], s.mean() * u @ vh, key)
        sv = np.linalg.svd(got[key], compute_uv=False)
        assert np.allclose(sv, s.mean(), rtol=1e-9), key  # a flat spectrum
        # Same column and row spaces as the sum.
        close(u @ (u.T @ got[key]), got[key], key)
        close((got[key] @ vh.T) @ vh, got[key], key)


def test_iso_cts_keeps_the_common_subspace_and_a_flat_spectrum(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    got = run(cli, ms, tmp_path, "{op: iso, inputs: tv, variant: cts, common: 0.5}")
    for key in MATRICES:
        xs = deltas(ms)[key]
        total = sum(xs)
        u, s, vh = np.linalg.svd(total, full_matrices=False)
        r, t = s.size, len(xs)
        per_task = round((r - int(0.5 * r)) / t)  # (the reference's rounding, half to even)
        k = r - per_task * t
        us, vs, ss = [u[:, :k]], [vh[:k].T], [s[:k]]
        for x in xs:
            res = x - u[:, :k] @ (u[:, :k].T @ x)
            ut, st, vht = np.linalg.svd(res, full_matrices=False)
            us.append(ut[:, :per_task])
            vs.append(vht[:per_task].T)
            ss.append(st[:per_task])
        sigma = np.concatenate(ss).mean()
        want = sigma * polar(np.concatenate(us, 1)) @ polar(np.concatenate(vs, 1)).T
        close(got[key], want, key)
        assert np.allclose(np.linalg.svd(got[key], compute_uv=False), sigma, rtol=1e-9), key


def test_iso_cts_with_the_whole_rank_common_is_iso_c(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    cts = run(cli, ms, tmp_path, "{op: iso, inputs: tv, variant: cts, common: 1.0}", "cts")
    c = run(cli, ms, tmp_path, "{op: iso, inputs: tv}", "c")
    for key in MATRICES:
        close(cts[key], c[key], key)


def _decaying(m: int, n: int, seed: int) -> torch.Tensor:
    """A matrix with the fast-decaying spectrum real task vectors have (σ_i = 0.8^i)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64)).Q
    return (u * 0.8 ** torch.arange(min(m, n), dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("shape", [(240, 200), (200, 240), (200, 200)])
def test_large_tensors_agree_with_the_exact_formulas(shape, flat):
    """Singular vectors from Gram eigendecompositions, Iso-CTS residuals through the
    complement of the common subspace (wide) or formed (tall): TSV-M and Iso-CTS match the
    float64 references built from full SVDs and explicit residuals, on matrices with a
    decaying spectrum (where a randomised SVD would already be off) and on flat ones."""
    from tvrecipe.ops.spectral import iso, tsv_merge
    g = torch.Generator().manual_seed(1)
    xs = ([torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(8)] if flat
          else [_decaying(*shape, seed) for seed in range(8)])
    r = min(shape)
    want = tsv_reference([x.numpy() for x in xs], 1.0)
    got = tsv_merge(xs).numpy()
    assert np.abs(got - want).max() <= 1e-9 * np.abs(want).max()
    # Iso-CTS with the residual formed explicitly and a full SVD of it
    per = round((r - int(0.8 * r)) / 8)
    ref = iso_cts_reference(xs, r - per * 8, per)
    got = iso(xs, variant="cts").numpy()
    assert np.abs(got - ref).max() <= 1e-9 * np.abs(ref).max()
    u, s, vh = torch.linalg.svd(sum(xs), full_matrices=False)
    # Iso-C weighs every direction alike, the weakest too, and those come from the Gram
    # matrix: float64 resolves singular values down to about 1e-8 of the largest
    want_c = ((u * s.mean()) @ vh).numpy()
    got_c = iso(xs, variant="c").numpy()
    assert np.abs(got_c - want_c).max() <= 1e-7 * np.abs(want_c).max()


@pytest.mark.parametrize("zeros", ["all", "one"])
def test_exact_zero_deltas(zeros):
    """Frozen tensors give exact-zero task vectors (a fine-tune of some blocks only): the
    spectral merges give zeros for them, and a zero task among others takes no directions."""
    from tvrecipe.ops.spectral import iso, spectra_summary, tsv_merge
    g = torch.Generator().manual_seed(3)
    xs = [torch.zeros(12, 9) for _ in range(3)]
    if zeros == "one":
        xs[1] = torch.randn(12, 9, generator=g)
        xs[2] = torch.randn(12, 9, generator=g)
    for got in (tsv_merge(xs), iso(xs, variant="c"), iso(xs, variant="cts")):
        assert got.shape == (12, 9) and bool(torch.isfinite(got).all())
        if zeros == "all":
            assert torch.equal(got, torch.zeros(12, 9))
    if zeros == "one":
        # the zero task's k slots hold nothing: TSV-M of the other two with k = ⌊9/3⌋
        k = 3
        parts = [np.linalg.svd(x.double().numpy(), full_matrices=False) for x in xs[1:]]
        u = np.concatenate([p[0][:, :k] for p in parts], 1)
        s = np.concatenate([p[1][:k] for p in parts])
        v = np.concatenate([p[2][:k].T for p in parts], 1)
        want = polar(u) @ np.diag(s) @ polar(v).T
        assert np.abs(tsv_merge(xs).double().numpy() - want).max() <= 1e-5 * np.abs(want).max()
    summary = spectra_summary(xs)
    assert summary["erank"][0] == 0.0 and summary["energy_k"][0] == 0.0


@pytest.mark.parametrize("step", ["{op: tsv_merge, inputs: tv}",
                                  "{op: iso, inputs: tv, variant: cts}",
                                  "{op: decompose, inputs: tv, rank: 2}"])
def test_an_empty_matrix_passes_through(cli, make_models, tmp_path, step):
    # A 0 × 8 tensor has no spectrum (it was a runtime error from torch: "max(): Expected
    # reduction dim..." or "cannot reshape tensor of 0 elements"): it comes out empty, and
    # every other tensor comes out as it does without it.
    from safetensors.torch import load_file, save_file

    ms = make_models(TASKS)
    out = "  v: {from: merged" + (".unique" if "decompose" in step else "") + ", path: ./out/X}\n"
    recipe = ("tvrecipe: 1\n" + ms.models_yaml() + "steps:\n  tv: {op: extract, base: base, "
              "finetuned: [a, b, c]}\n  merged: " + step + "\noutputs:\n" + out)
    cli.write("plain.yaml", recipe.replace("X", "plain"))
    cli.ok("run", "plain.yaml", "-q")
    for name in ms.weights:
        for f in ms.path(name).glob("*.safetensors"):
            tensors = load_file(str(f))
            tensors["model.layers.0.mlp.empty.weight"] = torch.zeros(0, 8)
            save_file(tensors, str(f))
    cli.write("empty.yaml", recipe.replace("X", "empty"))
    cli.ok("run", "empty.yaml", "-q")
    for plain_file in sorted((tmp_path / "out" / "plain").glob("*.safetensors")):
        plain = load_file(str(plain_file))
        got = load_file(str(tmp_path / "out" / "empty" / plain_file.name))
        assert got.pop("model.layers.0.mlp.empty.weight").shape == (0, 8)
        assert set(got) == set(plain)
        for k in plain:
            assert torch.equal(got[k], plain[k]), k


def iso_cts_reference(xs: list[torch.Tensor], k: int, per: int) -> np.ndarray:
    """Iso-CTS in float64 from full SVDs: the top k directions of the sum, each task's top
    ``per`` of its residual, polar factors, every singular value their mean."""
    u, s, vh = torch.linalg.svd(sum(xs), full_matrices=False)
    us, vs, ss = [u[:, :k]], [vh[:k].T], [s[:k]]
    for x in xs:
        ut, st, vht = torch.linalg.svd(x - u[:, :k] @ (u[:, :k].T @ x), full_matrices=False)
        us.append(ut[:, :per])
        vs.append(vht[:per].T)
        ss.append(st[:per])
    return (torch.from_numpy(polar(torch.cat(us, 1).numpy())) * torch.cat(ss).mean()
            @ torch.from_numpy(polar(torch.cat(vs, 1).numpy())).T).numpy()


def test_iso_cts_rounds_the_task_directions_as_the_reference_does():
    """k = int(common·r), then r − k rounded (half to even) to a multiple of T: r = 12, T = 4,
    common 0.8 gives k = 8 and one direction per task (rounding down gave k = 12: Iso-C);
    common 0.9 gives r − k = 2 → 0 per task, which is Iso-C."""
    from tvrecipe.ops.spectral import iso
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(12, 20, generator=g, dtype=torch.float64) for _ in range(4)]
    ref = iso_cts_reference(xs, 8, 1)
    got = iso(xs, variant="cts", common=0.8).numpy()
    assert np.abs(got - ref).max() <= 1e-9 * np.abs(ref).max()
    c = iso(xs, variant="c").numpy()
    assert np.abs(got - c).max() > 1e-3 * np.abs(c).max()
    assert np.abs(iso(xs, variant="cts", common=0.9).numpy() - c).max() <= 1e-9 * np.abs(c).max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_iso_cts_of_low_rank_tasks_raises_no_rounding_noise(dtype):
    """Tasks of rank 3 (LoRA-like): every direction of each lies in Δ_TA's top k = 9, so the
    residuals Δ_t − U_k·U_kᵀ·Δ_t are rounding noise only. The flat spectrum must not raise
    that noise to σ̄: the result has Δ_TA's rank and column space, and σ̄ is the mean over
    all r = 48 values (zeros included), as the reference's. Before, 9 noise directions got
    σ̄ too (rank 18, half the energy outside every task's columns)."""
    from tvrecipe.ops.spectral import iso
    g = torch.Generator().manual_seed(3)
    xs = [(torch.randn(64, 3, generator=g, dtype=torch.float64)
           @ torch.randn(3, 48, generator=g, dtype=torch.float64) / 10).to(dtype)
          for _ in range(3)]
    out = iso(xs, variant="cts", common=0.8).double()
    total = sum(x.double() for x in xs)
    u, s, _ = torch.linalg.svd(total)
    sigma = torch.linalg.svdvals(out)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (sigma > tol * sigma[0]).sum() == 9
    expected = s[:9].sum() / 48  # (the mean of all 48, zeros included)
    assert torch.allclose(sigma[:9], expected.expand(9), rtol=tol)
    outside = out - u[:, :9] @ (u[:, :9].mT @ out)
    assert outside.norm() <= tol * out.norm()
