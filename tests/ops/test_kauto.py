"""`cluster(..., k="auto")`: the eigengap rule on the normalised Laplacian (issue #16 §3).

The rule (see the docstring of :func:`tvrecipe.ops.basis.cluster`): A = max(S, 0) with a zero
diagonal, L_sym = I − D^{-1/2} A D^{-1/2} (zero row and column for a task of degree 0),
eigenvalues μ_1 ≤ … ≤ μ_n, gaps g_i = μ_{i+1} − μ_i, K = min(n − 1, k_max).
1. k* = argmax_{2 ≤ i ≤ K} g_i (smallest i on ties); k = 1 if K < 2 or g_{k*} = 0.
2. Cluster into k*; keep k = k* if the mean affinity of same-cluster pairs is > 0 and at least
   twice the mean affinity of different-cluster pairs; otherwise k = 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tvrecipe.ops.basis import cluster, cosine_from_gram, gram_update

# The real 8-task suite of the issue: 3 groups, within-group cosine ≈ 0.035, across ≈ 0.013.
WITHIN, ACROSS = 0.035, 0.013
WEAK_GROUPS = [[0, 3, 6], [1, 4, 7], [2, 5]]
WEAK_MEMBERS = ((0, 3, 6), (1, 4, 7), (2, 5))


def _planted_similarity(groups: list[list[int]], within: float, across: float) -> np.ndarray:
    n = sum(len(g) for g in groups)
    s = np.full((n, n), across)
    for g in groups:
        s[np.ix_(g, g)] = within
    np.fill_diagonal(s, 1.0)
    return s


def _weak_task_vectors(seed: int, dim: int = 1 << 18) -> list[torch.Tensor]:
    """Float32 task vectors whose cosines are WITHIN inside a group and ACROSS between groups.

    τ_t = √ACROSS·shared + √(WITHIN − ACROSS)·group_c + √(1 − WITHIN)·own_t, from independent
    Gaussian directions of norm ≈ 1: the cosines hit the targets up to ≈ 1/√dim = 0.002.
    """
    g = torch.Generator().manual_seed(seed)

    def direction() -> torch.Tensor:
        return torch.randn(dim, generator=g, dtype=torch.float64) / dim**0.5

    shared = direction()
    group = [direction() for _ in WEAK_GROUPS]
    tasks: list[torch.Tensor] = [torch.empty(0)] * 8
    for c, members in enumerate(WEAK_GROUPS):
        for t in members:
            v = ACROSS**0.5 * shared + (WITHIN - ACROSS) ** 0.5 * group[c]
            tasks[t] = (v + (1 - WITHIN) ** 0.5 * direction()).float()
    return tasks


def _similarity_of(tasks: list[torch.Tensor], block: int = 1 << 16) -> torch.Tensor:
    """Whole-model cosines, streamed through gram_update as 256-row tensors of one model."""
    n = len(tasks)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for lo in range(0, tasks[0].numel(), block):
        gram_update(gram, [t[lo : lo + block].reshape(256, -1) for t in tasks])
    return cosine_from_gram(gram)


def _gaps(result) -> list[float]:
    return np.diff(result.normalized_eigenvalues).tolist()


# ---------------------------------------------------------------- weak planted structure


def test_weak_planted_structure_from_the_similarity_matrix():
    s = _planted_similarity(WEAK_GROUPS, WITHIN, ACROSS)
    result = cluster(s)
    assert result.k == 3
    assert result.members == WEAK_MEMBERS
    assert result.labels == (0, 1, 2, 0, 1, 2, 0, 1)
    assert cluster(s, k=3) == result
    # Why the old rule chose 1: the first gap is the largest of all, in the unnormalised
    # Laplacian and in the normalised one. Step 1 leaves it out and finds i = 3; step 2
    # keeps it, as the groups are 0.035 / 0.013 ≈ 2.7 times as similar inside as across.
    assert np.diff(result.eigenvalues).argmax() == 0
    gaps = _gaps(result)
    assert max(gaps) == gaps[0]
    assert gaps.index(max(gaps[1:])) + 1 == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weak_planted_structure_from_random_task_vectors(seed):
    tasks = _weak_task_vectors(seed)
    s = _similarity_of(tasks).numpy()
    same = np.zeros((8, 8), dtype=bool)
    for g in WEAK_GROUPS:
        same[np.ix_(g, g)] = True
    off = ~np.eye(8, dtype=bool)
    # The fixture has the cosine levels.
    assert s[same & off].mean() == pytest.approx(WITHIN, abs=0.003)
    assert s[~same].mean() == pytest.approx(ACROSS, abs=0.003)
    result = cluster(s)
    assert result.k == 3
    assert result.members == WEAK_MEMBERS
    assert cluster(s) == result  # deterministic


def test_weak_structure_is_found_in_any_task_order():
    s = _planted_similarity(WEAK_GROUPS, WITHIN, ACROSS)
    perm = [5, 2, 7, 0, 3, 6, 1, 4]
    result = cluster(s[np.ix_(perm, perm)])
    assert result.k == 3
    found = {frozenset(perm[t] for t in m) for m in result.members}
    assert found == {frozenset(g) for g in WEAK_GROUPS}


def test_k_max_bounds_the_weak_structure():
    s = _planted_similarity(WEAK_GROUPS, WITHIN, ACROSS)
    assert cluster(s, k_max=3).k == 3
    # With k ≤ 2 the only candidate is i = 2, whose gap fails step 2: no split into two
    # groups is twice as tight inside as across.
    assert cluster(s, k_max=2).k == 1
    assert cluster(s, k_max=1).k == 1


# ---------------------------------------------------------------- strong planted clusters


@pytest.mark.parametrize(
    "groups",
    [[[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 2, 4], [1, 3], [5, 6, 7]], [[0], [1, 2, 3, 4, 5]]],
)
def test_strong_planted_clusters(groups):
    s = _planted_similarity(groups, 0.9, 0.05)
    result = cluster(s)
    assert result.k == len(groups)
    assert {frozenset(m) for m in result.members} == {frozenset(g) for g in groups}


def test_one_weak_outlier_is_a_cluster_of_its_own():
    # Task 0 has cosine 0.013 with the group {1, …, 5} of cosine 0.035: μ has its largest
    # gap after g_1 at i = 2, and {0} vs the group has mean affinity 0.035 inside (all from
    # the group's pairs) and 0.013 across.
    result = cluster(_planted_similarity([[0], [1, 2, 3, 4, 5]], WITHIN, ACROSS))
    assert result.k == 2
    assert result.members == ((0,), (1, 2, 3, 4, 5))


def test_two_outliers_share_a_cluster():
    # Documented limitation: tasks 0 and 1 resemble nothing (0.05 with everything, each
    # other included); with a zero diagonal neither has affinity of its own, and step 1
    # puts them together (k* = 2), which step 2 accepts.
    result = cluster(_planted_similarity([[0], [1], [2, 3, 4, 5]], 0.9, 0.05))
    assert result.k == 2
    assert result.members == ((0, 1), (2, 3, 4, 5))
    assert cluster(_planted_similarity([[0], [1], [2, 3, 4, 5]], 0.9, 0.05), k=3).members == (
        (0,),
        (1,),
        (2, 3, 4, 5),
    )


# ---------------------------------------------------------------- one cluster


@pytest.mark.parametrize("n", [2, 3, 5, 8, 16])
def test_all_equal_similarities_are_one_cluster(n):
    # The benchmark set: every pair has cosine 0.5 and nothing else. L_sym has eigenvalues
    # 0 and n/(n − 1) (n − 1 times): g_1 = n/(n − 1), every later gap 0, so k = 1.
    s = np.full((n, n), 0.5) + 0.5 * np.eye(n)
    result = cluster(s)
    assert result.k == 1
    np.testing.assert_allclose(
        result.normalized_eigenvalues, [0.0] + [n / (n - 1)] * (n - 1), atol=1e-12
    )


@pytest.mark.parametrize("seed", range(5))
def test_near_equal_similarities_are_one_cluster(seed):
    rng = np.random.default_rng(seed)
    for n in (3, 5, 8, 12):
        noise = rng.uniform(-0.05, 0.05, (n, n))
        s = 0.5 + (noise + noise.T) / 2
        np.fill_diagonal(s, 1.0)
        assert cluster(s).k == 1, (n, s)


def test_one_cluster_of_random_task_vectors():
    # As benchmarks/synth.py: a shared part and an own part of equal size, cosine ≈ 0.5.
    g = torch.Generator().manual_seed(3)
    dim = 1 << 16
    shared = torch.randn(dim, generator=g)
    tasks = [shared + torch.randn(dim, generator=g) for _ in range(8)]
    s = _similarity_of(tasks, block=1 << 14)
    assert float(s[~torch.eye(8, dtype=torch.bool)].mean()) == pytest.approx(0.5, abs=0.02)
    assert cluster(s).k == 1


# ---------------------------------------------------------------- the rule, by hand


@pytest.mark.parametrize(
    ("across", "eigenvalues", "k"),
    [
        # w = 0.5 inside the pairs {0, 1} and {2, 3}, a across; in units of w the degree is
        # d = 1 + 2a/w and L_sym has eigenvalues 0, 1 − (1 − 2a/w)/d, 1 + 1/d, 1 + 1/d.
        # Step 1: the candidate gaps g_2 = μ3 − μ2 > 0 and g_3 = 0 give k* = 2, and the
        # clustering into 2 is {0, 1}, {2, 3}. Step 2: mean affinity w inside, a across.
        # a = 0.2: d = 9/5, μ = 0, 8/9, 14/9, 14/9; 0.5 ≥ 2 · 0.2, so k = 2. (The old rule:
        # D − A has eigenvalues 0, 0.8, 1.4, 1.4, gaps 0.8, 0.6, so it chose 1.)
        (0.2, [0.0, 8 / 9, 14 / 9, 14 / 9], 2),
        # a = 0.25: d = 2, μ = 0, 1, 3/2, 3/2; 0.5 = 2 · 0.25, the threshold passes: k = 2.
        (0.25, [0.0, 1.0, 1.5, 1.5], 2),
        # a = 0.3: d = 11/5, μ = 0, 12/11, 16/11, 16/11; k* = 2 but 0.5 < 2 · 0.3: k = 1.
        (0.3, [0.0, 12 / 11, 16 / 11, 16 / 11], 1),
    ],
)
def test_rule_on_two_pairs_by_hand(across, eigenvalues, k):
    s = _planted_similarity([[0, 1], [2, 3]], 0.5, across)
    result = cluster(s)
    np.testing.assert_allclose(result.normalized_eigenvalues, eigenvalues, atol=1e-12)
    assert result.k == k
    assert result.labels == ((0, 0, 1, 1) if k == 2 else (0, 0, 0, 0))


def test_old_rule_spectrum_on_two_pairs_by_hand():
    # The unnormalised spectrum is still reported as `eigenvalues`: for a = 0.2 above,
    # L = D − A has eigenvalues 0, n·a = 0.8, (w + 2a) + w = 1.4 (twice).
    result = cluster(_planted_similarity([[0, 1], [2, 3]], 0.5, 0.2))
    np.testing.assert_allclose(result.eigenvalues, [0.0, 0.8, 1.4, 1.4], atol=1e-12)


def test_rule_with_isolated_tasks_by_hand():
    # Clique {0, 1, 2, 3} at 0.5 and two isolated tasks: μ = 0, 0, 0, 4/3 ×3; the gaps at
    # i = 2..5 are 0, 4/3, 0, 0 → k* = 3 (the clique, and each isolated task alone); mean
    # affinity 0.5 inside, 0 across → k = 3.
    s = np.eye(6)
    s[:4, :4] = 0.5 + 0.5 * np.eye(4)
    result = cluster(s)
    np.testing.assert_allclose(
        result.normalized_eigenvalues, [0, 0, 0, 4 / 3, 4 / 3, 4 / 3], atol=1e-12
    )
    assert result.k == 3
    assert result.members == ((0, 1, 2, 3), (4,), (5,))


# ---------------------------------------------------------------- isolated tasks


def test_mutually_orthogonal_tasks_give_one_cluster():
    # All-zero affinity off the diagonal: every task is isolated, every μ is 0, no gap:
    # nothing to cluster by, k = 1 (documented; pass k = n to keep each task alone).
    for n in (1, 2, 3, 6):
        result = cluster(np.eye(n))
        assert result.k == 1
        assert result.normalized_eigenvalues == (0.0,) * n
    # Opposed tasks clip to the same all-zero affinity.
    assert cluster([[1.0, -0.5, -0.2], [-0.5, 1.0, -0.1], [-0.2, -0.1, 1.0]]).k == 1


def test_an_isolated_task_is_a_cluster_of_its_own():
    # Task 2 is a zero task vector: its cosine with every task is 0, its degree is 0.
    gram = torch.tensor(
        [[1.0, 0.4, 0.0, 0.3], [0.4, 1.0, 0.0, 0.35], [0.0, 0.0, 0.0, 0.0], [0.3, 0.35, 0.0, 1.0]],
        dtype=torch.float64,
    )
    result = cluster(cosine_from_gram(gram))
    assert result.normalized_eigenvalues[:2] == pytest.approx((0.0, 0.0), abs=1e-12)
    assert result.k == 2
    assert result.members == ((0, 1, 3), (2,))


def test_two_tasks_are_one_cluster():
    # n = 2: K = min(n − 1, k_max) = 1, so k: auto gives 1 whatever the cosine.
    for c in (0.9, 0.01, 0.0):
        assert cluster([[1.0, c], [c, 1.0]]).k == 1


# ---------------------------------------------------------------- step 2 without clustering


def _no_clustering(*args, **kwargs):
    raise AssertionError("spectral clustering ran")


@pytest.mark.parametrize("seed", range(3))
def test_no_split_can_pass_so_no_clustering_runs(monkeypatch, seed):
    # Cosines in [0.45, 0.55]: any same-cluster mean is ≤ 0.55 < 2 · 0.45 ≤ 2 · any
    # across-cluster mean, so step 2 fails for every labelling and k = 1 is answered at once.
    from tvrecipe.ops import basis

    rng = np.random.default_rng(seed)
    noise = rng.uniform(-0.05, 0.05, (8, 8))
    s = 0.5 + (noise + noise.T) / 2
    np.fill_diagonal(s, 1.0)
    monkeypatch.setattr(basis, "_spectral_labels", _no_clustering)
    assert cluster(s).k == 1
    # The threshold case still clusters: max = 0.5 = 2 · min (a = 0.25 above) can pass.
    with pytest.raises(AssertionError, match="spectral clustering ran"):
        cluster(_planted_similarity([[0, 1], [2, 3]], 0.5, 0.25))


@pytest.mark.parametrize("seed", range(40))
def test_skipping_the_clustering_never_changes_k(monkeypatch, seed):
    # The bound is exact: with the pre-check forced off, every matrix gets the same clustering.
    # Planted groups with a within/across ratio in [1, 4] and noise: about half these seeds
    # are answered by the pre-check, and a third end with k ≥ 2.
    from tvrecipe.ops import basis

    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 10))
    labels = rng.integers(0, int(rng.integers(1, 4)), n)
    within = rng.uniform(0.05, 0.6)
    across = within / rng.uniform(1.0, 4.0)
    s = np.where(labels[:, None] == labels[None, :], within, across)
    noise = rng.uniform(-0.1, 0.1, (n, n)) * within
    s = s + (noise + noise.T) / 2
    np.fill_diagonal(s, 1.0)
    with_check = cluster(s)
    monkeypatch.setattr(basis, "_contrast_possible", lambda graph: True)
    assert cluster(s) == with_check
