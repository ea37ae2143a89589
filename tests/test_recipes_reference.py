"""Every canonical recipe in recipes/, run from the CLI on tiny checkpoints, against a reference
computed here with plain torch from the formulas of docs/methods.md (no tvrecipe kernel is
called: a bug in a kernel cannot hide in its own reference).

Each test copies one recipe into ``tmp_path`` unchanged (or with one extra output, to look at an
intermediate value), writes the checkpoints it names under ``tmp_path/ckpt``, runs it, and
compares every tensor of every output with the reference: float32 results within 1e-5 relative
(entry by entry, with an absolute floor of 1e-6 of the tensor's largest entry for entries near
0). Integer buffers must be the base's, bit for bit.

Where a step is random (``dare``), its mask is fully determined by the documented key
(``derive_seed`` of methods.md, "Randomness"), so it is recomputed here and checked exactly,
along with the properties that hold whatever the key: each entry is 0 or τ/d, the kept fraction
is near d, and a rerun gives the same bytes. Where a step clusters (``cluster_basis``), the
tasks are planted in clearly separated groups, so the similarity matrix, the Laplacian spectrum,
the eigengap's k and the partition all follow from the math; each basis vector is then checked
against the documented merge of its cluster. Where a step decomposes (``decompose``), the
fine-tunes differ from the base by exactly low-rank dyadic deltas (so float32 holds them
exactly), and every fixture asserts that no singular-value energy, eigenvalue or principal-angle
cosine lies near the recipe's cut-off, so the reference's subspaces are the engine's too.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    FLOATING,
    MATRICES,
    SHAPES,
    base_weights,
    finetune,
    gen,
    read_tensors,
    save_model,
    snapshot,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
# The defaults of `decompose` (docs/ops.md): these tensors are handled like 1-D ones.
EXCLUDED = {"model.embed_tokens.weight", "lm_head.weight"}
SUBSPACE = tuple(k for k in MATRICES if k not in EXCLUDED)
Weights = dict[str, torch.Tensor]


# ---- checkpoints and recipes ----------------------------------------------------------------


def write_models(root: Path, base: Weights, deltas: dict[str, Weights]) -> dict[str, Weights]:
    """``root/ckpt/base`` and one fine-tune ``base + delta`` per name; returns what was stored."""
    stored = {"base": save_model(root / "ckpt" / "base", base)}
    for name, delta in deltas.items():
        ft = {k: (v + delta[k].float() if v.is_floating_point() else v) for k, v in base.items()}
        stored[name] = save_model(root / "ckpt" / name, ft)
    return stored


def random_models(root: Path, names: list[str], seed: int = 0) -> dict[str, Weights]:
    """A base and random fine-tunes (conftest's: deltas of about 0.005 on every tensor)."""
    base = base_weights(seed)
    stored = {"base": save_model(root / "ckpt" / "base", base)}
    for i, name in enumerate(names):
        stored[name] = save_model(root / "ckpt" / name, finetune(base, 100 * seed + i + 1))
    return stored


def tau(models: dict[str, Weights], name: str) -> Weights:
    """τ = θ_name − θ_base in float64, from the stored float32 weights."""
    return {k: models[name][k].double() - models["base"][k].double() for k in FLOATING}


def floats(w: Weights) -> Weights:
    return {k: w[k].double() for k in FLOATING}


def copy_recipe(name: str, root: Path, extra_outputs: dict[str, str] | None = None) -> str:
    """Copy ``recipes/NAME.yaml`` to ``root`` (with extra ``outputs:`` entries); its file name."""
    text = (RECIPES / f"{name}.yaml").read_text()
    if extra_outputs:
        assert text.rstrip("\n").splitlines()[-1].startswith("  "), "outputs: must come last"
        text = text.rstrip("\n") + "\n" + "".join(
            f"  {out}: {{from: {src}, path: ./out/{out}}}\n"
            for out, src in extra_outputs.items())
    (root / f"{name}.yaml").write_text(text)
    return f"{name}.yaml"


# ---- comparisons ----------------------------------------------------------------------------


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    """``got`` (float32) within ``rtol`` of ``want`` entry by entry, with a floor for zeros."""
    assert got.dtype == torch.float32, f"{what}: dtype {got.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)}"
    got, want = got.double(), want.double()
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = (got - want).abs()
    tol = rtol * want.abs() + 1e-6 * scale + 1e-30
    if bool((err > tol).any()):
        i = int(torch.argmax(err / tol))
        raise AssertionError(
            f"{what}: {int((err > tol).sum())} of {want.numel()} entries off; worst at flat "
            f"index {i}: got {got.flatten()[i].item()!r}, want {want.flatten()[i].item()!r} "
            f"(tensor scale {scale:.3g})")


def check_model(folder: Path, base: Weights, want: Weights) -> None:
    """A checkpoint output: every tensor of the base, floating ones as ``want``, ints copied."""
    got = read_tensors(folder)
    assert set(got) == set(base), sorted(set(got) ^ set(base))
    for k, v in got.items():
        if v.is_floating_point():
            assert_close(v, want[k], f"{folder.name}: {k}")
        else:
            assert torch.equal(v, base[k]), f"{folder.name}: {k} is not the base's"


def members_of(folder: Path) -> list[str]:
    return json.loads((folder / "vectors.json").read_text())["members"]


def check_vectors(folder: Path, want: dict[str, Weights]) -> None:
    """A ``vectors`` output: its members in order, each tensor as ``want``, no integer buffer."""
    assert members_of(folder) == list(want)
    for m, vec in want.items():
        got = read_tensors(folder / f"{m}.safetensors")
        assert set(got) == set(FLOATING), f"{m}: {sorted(set(got) ^ set(FLOATING))}"
        for k in FLOATING:
            assert_close(got[k], vec[k], f"{folder.name}/{m}: {k}")


def apply_ref(base: Weights, delta: Weights, scale: float = 1.0) -> Weights:
    """apply: θ = θ₀ + s·τ."""
    return {k: base[k].double() + scale * delta[k] for k in FLOATING}


def wsum(vectors: list[Weights], weights: list[float]) -> Weights:
    """sum: Σ_i w_i τ_i."""
    return {k: sum(w * v[k] for w, v in zip(weights, vectors)) for k in FLOATING}


# ---- references from docs/methods.md ---------------------------------------------------------


def trim_ref(x: torch.Tensor, density: float) -> torch.Tensor:
    """prune/TIES trim: keep k = max(1, ⌊d·n⌋) largest |x|, ties to the lowest flat index."""
    flat = x.flatten()
    n = flat.numel()
    k = max(1, int(density * n))  # floor of the float product
    if int((flat != 0).sum()) < k:
        return x.clone()
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view(x.shape)


def ties_ref(xs: list[torch.Tensor], weights: list[float], density: float,
             majority: str = "total", normalize: bool = True) -> torch.Tensor:
    """TIES: trim each input, elect γ per entry, disjoint (weighted) mean of the agreeing side."""
    c = torch.stack([w * trim_ref(x, density) for w, x in zip(weights, xs)])
    total = c.sum(0)
    if majority == "total":
        gamma = torch.sign(total)
    else:
        gamma = torch.sign(2 * torch.sign(c).sum(0) + torch.sign(total))
    agree = (c != 0) & (torch.sign(c) == gamma) & (gamma != 0)
    num = torch.where(agree, c, 0.0).sum(0)
    if not normalize:
        return num
    w = torch.tensor([abs(w) for w in weights], dtype=c.dtype).view(-1, *[1] * (c.dim() - 1))
    den = torch.where(agree, w.expand_as(c), 0.0).sum(0)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def derive_seed(seed: int, step: str, member: str, tensor: str) -> int:
    """methods.md, Randomness: SHA-256 of the canonical JSON, first 8 bytes, top bit cleared."""
    text = json.dumps([seed, step, member, tensor], separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1)


def dare_mask(seed: int, step: str, member: str, tensor: str, density: float) -> torch.Tensor:
    """The keep mask [u < d], u from torch.rand (float32, CPU) seeded with derive_seed."""
    g = torch.Generator().manual_seed(derive_seed(seed, step, member, tensor))
    return torch.rand(SHAPES[tensor], generator=g, dtype=torch.float32) < density


def gram(vectors: list[Weights]) -> torch.Tensor:
    """G_ij = Σ_tensors ⟨τ_i, τ_j⟩ over the whole model, in float64."""
    flat = torch.stack([torch.cat([v[k].flatten() for k in FLOATING]) for v in vectors])
    return flat @ flat.T


def cosines(g: torch.Tensor) -> torch.Tensor:
    """S_ij = G_ij / √(G_ii G_jj) (0 for a zero vector), unit diagonal."""
    d = g.diagonal().sqrt()
    s = torch.where(torch.outer(d, d) > 0, g / torch.outer(d, d).clamp_min(1e-300), 0.0)
    s.fill_diagonal_(1.0)
    return s


def laplacian_spectrum(s: torch.Tensor) -> torch.Tensor:
    """Eigenvalues λ_1 ≤ … ≤ λ_n of L = D − A, A = max(S, 0)."""
    a = s.clamp_min(0.0)
    return torch.linalg.eigvalsh(torch.diag(a.sum(1)) - a)


def eigengap_k(lam: torch.Tensor, k_max: int | None) -> int:
    """The i in 1 ≤ i ≤ min(n − 1, k_max) maximising λ_{i+1} − λ_i (the smallest on ties)."""
    top = lam.numel() - 1 if k_max is None else min(lam.numel() - 1, k_max)
    gaps = [float(lam[i] - lam[i - 1]) for i in range(1, top + 1)]
    return 1 + gaps.index(max(gaps))


def task_subspace(w: torch.Tensor, rank: float) -> tuple[torch.Tensor, list[float]]:
    """U_i: top r left singular vectors (int rank capped, or smallest r reaching the energy).

    Also returns the cumulative energy fractions, for the fixtures' margin checks.
    """
    u, s, _ = torch.linalg.svd(w, full_matrices=False)
    nonnull = int((s > 1e-9 * s[0]).sum())  # the deltas are exactly low rank: 0 or ≫ 1e-9
    energy = (s**2).cumsum(0) / (s**2).sum()
    if isinstance(rank, int):
        r = min(rank, min(w.shape))
    else:
        r = 1 + int((energy < rank).sum())
    return u[:, :min(r, nonnull)], energy.tolist()


def shared_basis(us: list[torch.Tensor], method: str, threshold: float
                 ) -> tuple[torch.Tensor, list[float]]:
    """Z of methods.md (``sandwich`` or ``mean_projector``) and the values compared to the cut."""
    if method == "sandwich":
        m = us[0].T @ us[1]
        for a, b in itertools.pairwise(us[1:]):
            m = m @ (a.T @ b)
        y, s, _ = torch.linalg.svd(m, full_matrices=False)
        return us[0] @ y[:, s**2 >= threshold], (s**2).tolist()
    assert method == "mean_projector"
    p = sum(u @ u.T for u in us) / len(us)
    lam, v = torch.linalg.eigh(p)
    return v[:, lam >= threshold], lam.tolist()


def decompose_ref(targets: dict[str, Weights], reference: list[Weights], *, method: str,
                  threshold: float, rank: float, margin: float = 0.02
                  ) -> tuple[dict[str, Weights], dict[str, Weights], dict[str, int]]:
    """shared_i = Z Zᵀ W_i and unique_i = W_i − shared_i per subspace tensor; 1-D and excluded
    tensors are all unique (``vectors_1d: unique``). Returns (shared, unique, dim Z per tensor).

    Asserts that the fixture is far from every cut-off (energy, eigenvalue or s²), by ``margin``.
    """
    shared = {t: {} for t in targets}
    unique = {t: {} for t in targets}
    dims = {}
    for k in FLOATING:
        if k not in SUBSPACE:
            for t, v in targets.items():
                shared[t][k] = torch.zeros_like(v[k])
                unique[t][k] = v[k].clone()
            continue
        ws = [v[k] for v in targets.values()] + [v[k] for v in reference]
        us = []
        for w in ws:
            u, energy = task_subspace(w, rank)
            if not isinstance(rank, int):
                assert all(abs(e - rank) > margin for e in energy[:-1]), (k, energy)
            us.append(u)
        z, values = shared_basis(us, method, threshold)
        assert all(abs(v - threshold) > margin for v in values), (k, method, values)
        dims[k] = z.shape[1]
        for t, v in targets.items():
            shared[t][k] = z @ (z.T @ v[k])
            unique[t][k] = v[k] - shared[t][k]
    return shared, unique, dims


# ---- planted fixtures -----------------------------------------------------------------------

DYADIC = 2.0**-14


def dyadic_base(seed: int = 0) -> Weights:
    """conftest's base rounded to multiples of 2⁻¹⁴, so base + dyadic delta is exact in float32."""
    return {k: (torch.round(v / DYADIC) * DYADIC if v.is_floating_point() else v)
            for k, v in base_weights(seed).items()}


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's n×n Hadamard matrix (n a power of 2): orthogonal rows of ±1."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def orthogonal_rows(dim: int, g: torch.Generator) -> torch.Tensor:
    """8 orthogonal integer vectors of length ``dim`` ≥ 8: Hadamard rows, zero-padded, with
    coordinates permuted and signs flipped at random (dense, not axis-aligned)."""
    rows = torch.zeros(8, dim, dtype=torch.float64)
    rows[:, :8] = hadamard(8)
    signs = torch.randint(0, 2, (dim,), generator=g).double() * 2 - 1
    return rows[:, torch.randperm(dim, generator=g)] * signs


def low_rank_deltas(plan: dict[str, str], seed: int) -> dict[str, Weights]:
    """Exactly low-rank integer deltas (× 2⁻¹⁴): ``plan`` maps a task to its column directions.

    Per subspace tensor, each letter names one column direction u, and the directions are
    orthogonal; a task's delta is Σ_j c_j u_j v_jᵀ over its letters, with its own orthogonal
    row directions v_j and distinct weights c_j ∈ {2, 3, 4} (so its singular values are
    c_j‖u‖‖v‖ and its left singular vectors the u_j); an upper-case letter is its direction
    with weight 1, weak enough for an energy rank to leave it out. A direction listed by m of k tasks is an
    eigenvector of the mean projector with eigenvalue m/k; the sandwich gives s = 1 for a
    direction in every task and 0 for the others. 1-D and excluded tensors get small random
    integers.
    """
    g = gen(seed)
    letters = sorted(set("".join(plan.values()).lower()))
    out: dict[str, Weights] = {t: {} for t in plan}
    for k in FLOATING:
        shape = SHAPES[k]
        if k not in SUBSPACE:
            for t in plan:
                out[t][k] = torch.randint(-64, 65, shape, generator=g).double() * DYADIC
            continue
        u = dict(zip(letters, orthogonal_rows(shape[0], g)))
        for t, dirs in plan.items():
            v = orthogonal_rows(shape[1], g)
            strong = iter((torch.randperm(3, generator=g) + 2).tolist())
            cs = [1 if a.isupper() else next(strong) for a in dirs]
            w = sum(c * torch.outer(u[a.lower()], v[j])
                    for j, (a, c) in enumerate(zip(dirs, cs)))
            out[t][k] = w * DYADIC
    return out


def exact_models(root: Path, deltas: dict[str, Weights]) -> dict[str, Weights]:
    """Checkpoints whose task vectors are exactly ``deltas`` in float32."""
    models = write_models(root, dyadic_base(), deltas)
    for t, d in deltas.items():
        for k in FLOATING:
            assert torch.equal(tau(models, t)[k], d[k]), (t, k)  # stored without rounding
    return models


def planted_clusters(groups: list[list[str]], seed: int, noise: float = 0.05
                     ) -> dict[str, Weights]:
    """Tasks of one group = one random direction + ``noise`` relative, per tensor."""
    g = gen(seed)
    out = {}
    for group in groups:
        direction = {k: 0.005 * torch.randn(SHAPES[k], generator=g) for k in FLOATING}
        for t in group:
            out[t] = {k: direction[k] + noise * 0.005 * torch.randn(SHAPES[k], generator=g)
                      for k in FLOATING}
    return out


# ---- the list -------------------------------------------------------------------------------

TESTED = {"analogy", "assign_new_task", "basis_library", "basis_merge", "compress_basis",
          "dare_ties",
          "detox_unique", "forget_negation", "multitask_sum", "shared_merge", "ties",
          "unique_mix"}


def test_every_canonical_recipe_has_a_reference_test():
    assert {p.stem for p in RECIPES.glob("*.yaml")} == TESTED


# ---- task arithmetic ------------------------------------------------------------------------


def test_analogy(cli, tmp_path):
    """θ = θ₀ + (τ_c + τ_b − τ_a)."""
    models = random_models(tmp_path, ["a", "b", "c"])
    cli.ok("run", copy_recipe("analogy", tmp_path))
    delta = wsum([tau(models, "c"), tau(models, "b"), tau(models, "a")], [1.0, 1.0, -1.0])
    check_model(tmp_path / "out" / "analogy", models["base"], apply_ref(models["base"], delta))


def test_forget_negation(cli, tmp_path):
    """θ = θ₀ + 0.5·(−τ_toxic)."""
    models = random_models(tmp_path, ["toxic"])
    cli.ok("run", copy_recipe("forget_negation", tmp_path))
    neg = {k: -v for k, v in tau(models, "toxic").items()}
    check_model(tmp_path / "out" / "detoxed", models["base"], apply_ref(models["base"], neg, 0.5))


def test_multitask_sum(cli, tmp_path):
    """θ = θ₀ + 0.4·Σ τ_t (a scalar weight 1.0 for the set), written as one shard."""
    names = ["math", "code", "chat"]
    models = random_models(tmp_path, names)
    cli.ok("run", copy_recipe("multitask_sum", tmp_path))
    folder = tmp_path / "out" / "multitask"
    assert len(list(folder.glob("*.safetensors"))) == 1  # shard_size: 2GB
    merged = wsum([tau(models, n) for n in names], [1.0] * 3)
    check_model(folder, models["base"], apply_ref(models["base"], merged, 0.4))


# ---- TIES and DARE ---------------------------------------------------------------------------


def test_ties(cli, tmp_path):
    """TIES at density 0.2, total majority, normalized, weights 1, on integer-valued deltas.

    Small integers (× 2⁻¹⁰) make magnitudes tie at the trim's cut (the lowest flat index wins)
    and weighted totals cancel exactly (γ = 0 gives 0), so both rules are exercised.
    """
    names = ["math", "code", "chat"]
    g = gen(5)
    deltas = {n: {k: torch.randint(-6, 7, SHAPES[k], generator=g).double() * 2.0**-10
                  for k in FLOATING} for n in names}
    models = write_models(tmp_path, dyadic_base(), deltas)
    cli.ok("run", copy_recipe("ties", tmp_path))
    taus = [tau(models, n) for n in names]
    merged = {k: ties_ref([t[k] for t in taus], [1.0] * 3, 0.2) for k in FLOATING}
    check_model(tmp_path / "out" / "ties", models["base"], apply_ref(models["base"], merged))

    # The fixture does exercise both rules: magnitudes tie at a trim cut, and trimmed values
    # cancel to a total of exactly 0.
    def tie_at_cut(x: torch.Tensor) -> bool:
        k = max(1, int(0.2 * x.numel()))
        mags = x.abs().flatten().sort(descending=True).values
        return k < mags.numel() and bool(mags[k - 1] == mags[k])

    assert any(tie_at_cut(t[k]) for t in taus for k in FLOATING)
    cancels = False
    for k in FLOATING:
        trimmed = torch.stack([trim_ref(t[k], 0.2) for t in taus])
        cancels |= bool(((trimmed.sum(0) == 0) & (trimmed != 0).any(0)).any())
    assert cancels


def test_dare_ties(cli, tmp_path):
    """DARE (seed 42, d = 0.3, τ/d) then TIES (d = 1, weights 1, 0.8, 0.5), then apply."""
    names = ["math", "code", "chat"]
    weights = [1.0, 0.8, 0.5]
    density = 0.3
    models = random_models(tmp_path, names)
    cli.ok("run", copy_recipe("dare_ties", tmp_path, {"dropped": "dropped", "merged": "merged"}))
    out = tmp_path / "out"
    first = snapshot(out)

    # DARE: each entry is 0 or exactly τ/d (in float32), and the mask is [u < d] with u keyed by
    # derive_seed(42, "dropped", member, tensor).
    assert members_of(out / "dropped") == names
    dropped: dict[str, Weights] = {}
    kept = total = 0
    for n in names:
        got = read_tensors(out / "dropped" / f"{n}.safetensors")
        assert set(got) == set(FLOATING)
        dropped[n] = {}
        for k in FLOATING:
            t32 = models[n][k] - models["base"][k]  # extract, in float32
            mask = got[k] != 0
            assert torch.equal(got[k][mask], (t32 / density)[mask]), (n, k)
            assert torch.equal(mask, dare_mask(42, "dropped", n, k, density) & (t32 != 0)), (n, k)
            # Every zero is +0.0.
            assert not bool(torch.signbit(got[k][~mask]).any()), (n, k)
            kept += int(mask.sum())
            total += mask.numel()
            dropped[n][k] = got[k].double()
    assert abs(kept / total - density) < 0.06, kept / total

    # TIES on the DARE vectors, as methods.md computes it, then apply with scale 1.
    merged = {k: ties_ref([dropped[n][k] for n in names], weights, 1.0) for k in FLOATING}
    got = read_tensors(out / "merged")
    for k in FLOATING:
        assert_close(got[k], merged[k], f"merged: {k}")
    check_model(out / "dare_ties", models["base"], apply_ref(models["base"], merged))

    # The same bytes on a rerun without the cache, and from the recipe as shipped.
    cli.ok("run", "dare_ties.yaml", "--force", "--no-cache")
    assert snapshot(out) == first, "same seed, other bytes"
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copytree(tmp_path / "ckpt", shipped / "ckpt")
    copy_recipe("dare_ties", shipped)
    cli.ok("run", shipped / "dare_ties.yaml")
    a, b = read_tensors(shipped / "out" / "dare_ties"), read_tensors(out / "dare_ties")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- task-vector bases -----------------------------------------------------------------------

BASIS_GROUPS = [["t1", "t4", "t7"], ["t2", "t5"], ["t3", "t6", "t8"]]


def check_clusters(report: dict, taus: list[Weights], tasks: list[str],
                   groups: list[list[str]], k_max: int | None, k: int | None) -> None:
    """The report's S, spectrum, k and partition against the math on the planted groups."""
    s = cosines(gram(taus))
    lam = laplacian_spectrum(s)
    assert report["tasks"] == tasks
    torch.testing.assert_close(torch.tensor(report["similarity"], dtype=torch.float64), s,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(report["eigenvalues"], dtype=torch.float64), lam,
                               rtol=1e-5, atol=1e-6)
    # The planted groups are unmistakable: any spectral clustering into them is forced.
    for i, a in enumerate(tasks):
        for j, b in enumerate(tasks):
            same = any(a in grp and b in grp for grp in groups)
            assert (s[i, j] > 0.95) if same else (abs(s[i, j]) < 0.3), (a, b, float(s[i, j]))
    want_k = eigengap_k(lam, k_max) if k is None else k
    assert want_k == len(groups)
    assert report["k"] == want_k
    # Clusters numbered by their smallest member (in task order).
    ordered = sorted(groups, key=lambda grp: min(tasks.index(t) for t in grp))
    assert report["basis"] == {f"b{j}": sorted(grp, key=tasks.index)
                               for j, grp in enumerate(ordered)}


def test_basis_merge_then_basis_library(cli, tmp_path):
    """cluster_basis (k auto ≤ 6, mean) on 8 tasks in 3 planted groups; θ = θ₀ + 0.5·Σ_j b_j;
    then basis_library.yaml reads the saved basis back and gives the same model."""
    tasks = [f"t{i}" for i in range(1, 9)]
    deltas = planted_clusters(BASIS_GROUPS, seed=7)
    models = write_models(tmp_path, base_weights(0), {t: deltas[t] for t in tasks})
    cli.ok("run", copy_recipe("basis_merge", tmp_path), "--report", "report.json")
    report = json.loads((tmp_path / "report.json").read_text())["basis"]
    taus = {t: tau(models, t) for t in tasks}
    check_clusters(report, list(taus.values()), tasks, BASIS_GROUPS, k_max=6, k=None)

    basis = {b: {k: sum(taus[t][k] for t in grp) / len(grp) for k in FLOATING}
             for b, grp in report["basis"].items()}
    check_vectors(tmp_path / "out" / "basis", basis)
    merged = wsum(list(basis.values()), [1.0] * len(basis))
    want = apply_ref(models["base"], merged, 0.5)
    check_model(tmp_path / "out" / "basis_merged", models["base"], want)

    cli.ok("run", copy_recipe("basis_library", tmp_path))
    check_model(tmp_path / "out" / "from_library", models["base"], want)


def test_basis_library(cli, tmp_path):
    """A saved ``vectors`` library read as a task_vector set: θ = θ₀ + 0.5·Σ_j b_j."""
    base = base_weights(0)
    save_model(tmp_path / "ckpt" / "base", base)
    folder = tmp_path / "out" / "basis"
    folder.mkdir(parents=True)
    g = gen(9)
    lib = {}
    for b in ("b0", "b1", "b2"):
        lib[b] = {k: 0.005 * torch.randn(SHAPES[k], generator=g) for k in FLOATING}
        save_model(folder, lib[b], config=False)
        (folder / "model.safetensors").rename(folder / f"{b}.safetensors")
    (folder / "vectors.json").write_text(json.dumps(
        {"format": "tvrecipe.vectors", "version": 1, "members": list(lib),
         "files": {b: f"{b}.safetensors" for b in lib}}))
    cli.ok("run", copy_recipe("basis_library", tmp_path))
    merged = wsum([{k: v.double() for k, v in vec.items()} for vec in lib.values()], [1.0] * 3)
    check_model(tmp_path / "out" / "from_library", base, apply_ref(base, merged, 0.5))


def test_assign_new_task(cli, tmp_path):
    """cluster_basis (k = 2, mean) of t1…t4, the new task assigned to the basis vector of largest
    whole-model cosine, θ = θ₀ + 0.8·b_assigned."""
    tasks = ["t1", "t2", "t3", "t4"]
    groups = [["t1", "t3"], ["t2", "t4"]]
    deltas = planted_clusters(groups + [["new"]], seed=3)
    # The new task: mostly the second group's direction, partly its own.
    for k in FLOATING:
        deltas["new"][k] = 0.5 * deltas["new"][k] + (deltas["t2"][k] + deltas["t4"][k]) / 2
    models = write_models(tmp_path, base_weights(0), {t: deltas[t] for t in tasks + ["new"]})
    res = cli.ok("run", copy_recipe("assign_new_task", tmp_path), "--report", "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    taus = {t: tau(models, t) for t in tasks}
    check_clusters(report["basis"], list(taus.values()), tasks, groups, k_max=None, k=2)

    basis = {b: {k: sum(taus[t][k] for t in grp) / len(grp) for k in FLOATING}
             for b, grp in report["basis"]["basis"].items()}
    new = tau(models, "new")
    g = gram([new, *basis.values()])
    cos = (g[0, 1:] / (g[0, 0] * g.diagonal()[1:]).sqrt()).tolist()
    assert report["near"]["cosine"] == pytest.approx(dict(zip(basis, cos)), rel=1e-5, abs=1e-6)
    chosen = list(basis)[cos.index(max(cos))]  # the first on a tie
    assert max(cos) - sorted(cos)[-2] > 0.1  # not a near tie
    assert chosen == "b1"  # b1 = {t2, t4}, the group the new task was made from
    assert report["near"]["assigned"] == chosen
    assert f"near (assign): {chosen} " in res.stdout
    want = apply_ref(models["base"], basis[chosen], 0.8)
    check_model(tmp_path / "out" / "assigned", models["base"], want)


# ---- shared and unique parts -----------------------------------------------------------------


def test_detox_unique(cli, tmp_path):
    """decompose tv.toxic against wiki and chat (mean_projector, threshold 0.6, energy 0.9);
    θ = θ₀ + 0.5·(−unique_toxic).

    Directions: a in all three tasks (eigenvalue 1 of the mean projector), b in toxic and
    wiki (2/3, above 0.6: shared), d wiki only, e chat only (1/3). c is strong in toxic and
    weak in chat (σ² shares 16 : 9 : 1), so chat's energy rank is 2 and c stays unique; with
    chat's rank 3 (or an energy of σ instead of σ²), c would be at 2/3 and shared."""
    deltas = low_rank_deltas({"toxic": "abc", "wiki": "abd", "chat": "aeC"}, seed=1)
    models = exact_models(tmp_path, deltas)
    cli.ok("run", copy_recipe("detox_unique", tmp_path, {"unique": "parts.unique",
                                                        "shared": "parts.shared"}),
           "--report", "report.json")
    shared, unique, dims = decompose_ref(
        {"toxic": deltas["toxic"]}, [deltas["wiki"], deltas["chat"]],
        method="mean_projector", threshold=0.6, rank=0.9)
    assert set(dims.values()) == {2}, dims  # a and b
    report = json.loads((tmp_path / "report.json").read_text())["parts"]["tensors"]
    for k, dim in dims.items():
        assert report[k]["shared_dim"] == dim, (k, report[k])
    check_vectors(tmp_path / "out" / "unique", unique)
    check_vectors(tmp_path / "out" / "shared", shared)
    neg = {k: -v for k, v in unique["toxic"].items()}
    check_model(tmp_path / "out" / "detoxed_unique", models["base"],
                apply_ref(models["base"], neg, 0.5))


def test_shared_merge(cli, tmp_path):
    """decompose tv (sandwich, threshold 0.85, energy 0.9); θ = θ₀ + 0.3·Σ τ_i + 0.2·Σ shared_i.

    Direction a is in all three tasks (s = 1 in the sandwich), b only in math and code."""
    names = ["math", "code", "chat"]
    deltas = low_rank_deltas({"math": "abc", "code": "abd", "chat": "ae"}, seed=2)
    models = exact_models(tmp_path, deltas)
    cli.ok("run", copy_recipe("shared_merge", tmp_path, {"shared": "parts.shared"}))
    shared, _unique, dims = decompose_ref({n: deltas[n] for n in names}, [],
                                          method="sandwich", threshold=0.85, rank=0.9)
    assert set(dims.values()) == {1}, dims  # a
    check_vectors(tmp_path / "out" / "shared", shared)
    merged = wsum([deltas[n] for n in names] + [shared[n] for n in names],
                  [0.3] * 3 + [0.2] * 3)
    check_model(tmp_path / "out" / "shared_merge", models["base"],
                apply_ref(models["base"], merged))


def test_unique_mix(cli, tmp_path):
    """decompose two styles (sandwich, default threshold 0.85, rank 16 capped, null directions
    dropped); θ = θ₀ + 0.7·unique_A + 0.5·unique_B; the unique parts are an output too."""
    deltas = low_rank_deltas({"style_a": "abc", "style_b": "ade"}, seed=4)
    models = exact_models(tmp_path, deltas)
    cli.ok("run", copy_recipe("unique_mix", tmp_path))
    _shared, unique, dims = decompose_ref({n: deltas[n] for n in ("style_a", "style_b")}, [],
                                          method="sandwich", threshold=0.85, rank=16)
    assert set(dims.values()) == {1}, dims  # a
    check_vectors(tmp_path / "out" / "unique_parts", unique)
    mix = wsum([unique["style_a"], unique["style_b"]], [0.7, 0.5])
    check_model(tmp_path / "out" / "unique_mix", models["base"], apply_ref(models["base"], mix))


def test_compress_basis(cli, tmp_path):
    """PCA of six task vectors through their whole-model Gram matrix, m = 3: the atoms are
    V·H·e_m, the library holds them and the mean, the merge adds the atoms, and the forgotten
    task is its rebuild μ + Σ_m W[m, t4]·s_m, all against float64 references from an explicit
    SVD of the centred task-vector matrix."""
    names = ["t1", "t2", "t3", "t4", "t5", "t6"]
    models = random_models(tmp_path, names)
    cli.ok("run", copy_recipe("compress_basis", tmp_path))
    taus = [tau(models, n) for n in names]
    flat = torch.stack([torch.cat([t[k].flatten() for k in FLOATING]) for t in taus], 1)
    mu = flat.mean(1, keepdim=True)
    u, s, _vh = torch.linalg.svd(flat - mu, full_matrices=False)
    sizes = [taus[0][k].numel() for k in FLOATING]

    def unflatten(v: torch.Tensor) -> Weights:
        return {k: p.view(SHAPES[k]) for k, p in zip(FLOATING, torch.split(v, sizes))}

    folder = tmp_path / "out" / "pca_basis"
    assert members_of(folder) == ["atom0", "atom1", "atom2", "mean"]
    atoms = []
    for m in range(3):
        got = read_tensors(folder / f"atom{m}.safetensors")
        ref = u[:, m] * s[m]
        flat_got = torch.cat([got[k].double().flatten() for k in FLOATING])
        ref = ref if float(flat_got @ ref) >= 0 else -ref  # the sign is the op's convention
        atoms.append(ref)
        for k, v in unflatten(ref).items():
            assert_close(got[k], v, f"atom{m}: {k}", rtol=1e-4)
    merged = unflatten(sum(atoms))
    check_model(tmp_path / "out" / "pca_merged", models["base"],
                apply_ref(models["base"], merged, 0.5))
    rebuilt = mu[:, 0] + sum(a * float(a @ (flat[:, 3] - mu[:, 0])) / float(a @ a)
                             for a in atoms)
    check_model(tmp_path / "out" / "without_t4", models["base"],
                apply_ref(models["base"], unflatten(rebuilt), -1.0))
