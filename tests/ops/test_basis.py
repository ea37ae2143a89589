"""Tests for task-vector bases: whole-model Gram, spectral clustering and per-cluster merges."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvrecipe.ops import arithmetic, basis
from tvrecipe.ops.basis import (
    Clustering,
    assign,
    cluster,
    cosine_from_gram,
    gram_update,
    merge_cluster,
)

SHAPES = [(64, 32), (100,), (16, 8, 4), (7, 300), (3,)]
# gram_update sums float32 partial products of 2048 elements in float64: each partial is
# rounded once to float32 and accumulates within the kernel (worst seen over 3000 random
# trials: 6.6e-7 of |τ_i| |τ_j|), so the tolerance is relative to the norms.
REL = 2e-6


def _reference_gram(per_tensor: list[list[torch.Tensor]]) -> torch.Tensor:
    """Float64 Gram of the task vectors as whole concatenated, flattened models."""
    n = len(per_tensor[0])
    whole = torch.stack(
        [torch.cat([deltas[i].reshape(-1).double() for deltas in per_tensor]) for i in range(n)]
    )
    return whole @ whole.T


def _streamed_gram(per_tensor: list[list[torch.Tensor]]) -> torch.Tensor:
    n = len(per_tensor[0])
    gram = torch.zeros(n, n, dtype=torch.float64)
    for deltas in per_tensor:
        gram_update(gram, deltas)
    return gram


def _planted(k: int, n: int = 9, noise: float = 0.1, seed: int = 0) -> list[list[torch.Tensor]]:
    """Task i = (random scale) · direction[i % k] + noise, split over tensors of SHAPES."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [int(np.prod(s)) for s in SHAPES]
    dim = sum(sizes)
    directions = torch.randn(k, dim, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    tasks = []
    for i in range(n):
        scale = 0.5 + torch.rand((), generator=gen)
        tasks.append(
            scale * (directions[i % k] + noise * torch.randn(dim, generator=gen) / dim**0.5)
        )
    per_tensor, start = [], 0
    for shape, size in zip(SHAPES, sizes):
        per_tensor.append([t[start : start + size].reshape(shape).clone() for t in tasks])
        start += size
    return per_tensor


def _block_affinity(groups: list[list[int]]) -> np.ndarray:
    n = sum(len(g) for g in groups)
    a = np.zeros((n, n))
    for g in groups:
        for i in g:
            for j in g:
                a[i, j] = 1.0
    return a


# ---------------------------------------------------------------- gram_update / cosine


def test_gram_update_equals_gram_of_concatenated_vectors():
    gen = torch.Generator().manual_seed(1)
    n = 5
    per_tensor = [[torch.randn(s, generator=gen) for _ in range(n)] for s in SHAPES]
    # A non-contiguous tensor and a bfloat16 one go through reshape / dtype conversion.
    per_tensor.append([torch.randn(40, 30, generator=gen).T for _ in range(n)])
    per_tensor.append([torch.randn(2500, generator=gen).bfloat16() for _ in range(n)])
    gram = _streamed_gram(per_tensor)
    ref = _reference_gram(per_tensor)
    norms = ref.diagonal().sqrt()
    assert torch.equal(gram, gram.T)
    assert ((gram - ref).abs() <= REL * torch.outer(norms, norms)).all()

    whole = [torch.cat([d[i].reshape(-1).double() for d in per_tensor]) for i in range(n)]
    expected = torch.stack(
        [
            torch.nn.functional.cosine_similarity(whole[i], whole[j], dim=0)
            for i in range(n)
            for j in range(n)
        ]
    ).reshape(n, n)
    torch.testing.assert_close(cosine_from_gram(gram), expected, atol=REL, rtol=0)


def test_gram_update_several_blocks_and_tail(monkeypatch):
    # Three 2048-element partials per staging block: 20_000 elements = 3 blocks + 1 + tail.
    monkeypatch.setattr(basis, "_BUFFER_CPU", 3 * 3 * 2048)
    gen = torch.Generator().manual_seed(2)
    per_tensor = [[torch.randn(20_000, generator=gen) for _ in range(3)]]
    ref = _reference_gram(per_tensor)
    norms = ref.diagonal().sqrt()
    assert ((_streamed_gram(per_tensor) - ref).abs() <= REL * torch.outer(norms, norms)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_gram_update_reads_aligned_rows_of_one_tensor_in_place_with_the_same_bits(
        n, dtype, monkeypatch):
    # A whole-model pass makes a set's deltas as rows of one tensor, each on a 64-byte
    # boundary (TensorContext.stacked): the float32 products then read them through strides,
    # with no staging buffer, and give bit for bit the Gram of the same deltas as separate
    # tensors. Float64 rows are staged: on an Intel avx512f CPU (the H200 machine, 2026-11-27)
    # eight float64 rows gave other last bits through strides than staged.
    monkeypatch.setattr(basis, "_BUFFER_CPU", 3 * n * 2048)  # several blocks, and a tail
    gen = torch.Generator().manual_seed(n)
    numel = 7 * 2048 + 123
    padded = torch.empty(n, numel + 5, dtype=dtype)  # rows 7 * 2048 + 128 entries apart
    padded[:, :numel] = (torch.randn(n, numel, generator=gen) * torch.rand(n, 1, generator=gen)
                         + torch.randn(numel, generator=gen))
    rows = [row[:numel] for row in padded]
    assert padded.data_ptr() % basis.ROW_ALIGN == 0
    assert basis._rows_of_one(rows) is not None
    separate = _streamed_gram([[r.clone() for r in rows]])
    staged = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: staged.append(a) or real_empty(*a, **k))
    in_place = _streamed_gram([rows])
    monkeypatch.setattr(torch, "empty", real_empty)
    assert (staged == []) == (dtype == torch.float32)
    assert torch.equal(in_place, separate)
    ref = _reference_gram([rows])
    norms = ref.diagonal().sqrt()
    assert ((in_place - ref).abs() <= REL * torch.outer(norms, norms)).all()


def test_gram_update_stages_rows_it_cannot_read_in_place_with_the_same_bits():
    # Rows at odd addresses gave other last bits through strides than staged: they, and
    # tensors that are not rows of one tensor in order, are staged.
    gen = torch.Generator().manual_seed(9)
    numel = 3 * 2048 + 1
    stack = torch.randn(4, numel, generator=gen) + torch.randn(numel, generator=gen)
    rows = list(stack)  # 4 * (3 * 2048 + 1) bytes apart: not 64-byte aligned
    aligned = list(torch.randn(4, 3 * 2048, generator=gen))
    assert basis._rows_of_one(rows) is None
    assert basis._rows_of_one(aligned[::-1]) is None  # not in storage order
    assert basis._rows_of_one([aligned[0], aligned[2], aligned[3]]) is None  # uneven steps
    assert basis._rows_of_one([aligned[0], aligned[1].clone()]) is None  # another storage
    assert basis._rows_of_one([aligned[1], aligned[2]]) is not None
    for pick in (rows, aligned[::-1], [aligned[0], aligned[2], aligned[3]]):
        assert torch.equal(_streamed_gram([pick]), _streamed_gram([[r.clone() for r in pick]]))


def test_gram_update_float64_inputs_are_exact_to_rounding():
    gen = torch.Generator().manual_seed(3)
    per_tensor = [
        [torch.randn(s, generator=gen, dtype=torch.float64) for _ in range(4)] for s in SHAPES
    ]
    torch.testing.assert_close(
        _streamed_gram(per_tensor), _reference_gram(per_tensor), rtol=1e-12, atol=1e-12
    )


def test_gram_update_long_vectors_keep_precision():
    # 4M elements with a large common component: one float32 dot product over the whole
    # vector drifts; the float64-summed partials must not.
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(1 << 22, generator=gen)
    deltas = [base + 0.01 * torch.randn(1 << 22, generator=gen) for _ in range(2)]
    gram = _streamed_gram([deltas])
    ref = _reference_gram([deltas])
    assert ((gram - ref).abs() / ref.abs()).max() < 1e-7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gram_update_on_cuda_is_float64_exact():
    gen = torch.Generator().manual_seed(8)
    per_tensor = [[torch.randn(s, generator=gen) for _ in range(3)] for s in [(300, 70), (5,)]]
    gram = _streamed_gram([[d.cuda() for d in deltas] for deltas in per_tensor])
    torch.testing.assert_close(gram, _reference_gram(per_tensor), rtol=1e-12, atol=1e-9)


def test_gram_update_accumulates_into_existing_gram_and_skips_empty_tensors():
    gram = torch.tensor([[1.0, 2.0], [2.0, 5.0]], dtype=torch.float64)
    gram_update(gram, [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])])
    gram_update(gram, [torch.zeros(0, 4), torch.zeros(0, 4)])
    # [[1, 2], [2, 5]] + [[1+4, 3-2], [3-2, 9+1]]
    assert gram.tolist() == [[6.0, 3.0], [3.0, 15.0]]


def test_gram_update_rejects_bad_arguments():
    x = torch.ones(3)
    with pytest.raises(ValueError, match="2x2 float64 CPU tensor"):
        gram_update(torch.zeros(2, 2), [x, x])
    with pytest.raises(ValueError, match="3x3 float64 CPU tensor"):
        gram_update(torch.zeros(2, 2, dtype=torch.float64), [x, x, x])
    with pytest.raises(ValueError, match="delta 1 has 4 elements, delta 0 has 3"):
        gram_update(torch.zeros(2, 2, dtype=torch.float64), [x, torch.ones(4)])
    with pytest.raises(TypeError, match="floating"):
        gram_update(torch.zeros(1, 1, dtype=torch.float64), [torch.ones(3, dtype=torch.int64)])


def test_cosine_from_gram_hand_computed_with_zero_vector():
    # τ0 = (2, 0), τ1 = (1, 0) parallel; τ2 = 0; τ3 = (0, -3).
    gram = torch.tensor(
        [[4.0, 2.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]],
        dtype=torch.float64,
    )
    s = cosine_from_gram(gram)
    assert s.dtype == torch.float64
    assert s.tolist() == [
        [1.0, 1.0, 0.0, 0.0],
        [1.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
    opposite = torch.tensor([[4.0, -6.0], [-6.0, 9.0]], dtype=torch.float64)
    assert cosine_from_gram(opposite).tolist() == [[1.0, -1.0], [-1.0, 1.0]]


def test_cosine_from_gram_rejects_invalid_gram():
    with pytest.raises(ValueError, match="square"):
        cosine_from_gram(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="holds NaN or Inf"):
        cosine_from_gram(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="negative diagonal"):
        cosine_from_gram(torch.tensor([[-1.0, 0.0], [0.0, 1.0]]))


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 4),
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_gram_and_cosine_properties(n, sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    per_tensor = [[torch.randn(m, generator=gen) for _ in range(n)] for m in sizes]
    gram = _streamed_gram(per_tensor)
    ref = _reference_gram(per_tensor)
    norms = ref.diagonal().sqrt()
    assert ((gram - ref).abs() <= REL * torch.outer(norms, norms) + 1e-12).all()
    s = cosine_from_gram(gram)
    assert torch.equal(s, s.T)
    assert (s.diagonal() == 1).all()
    assert (s.abs() <= 1).all()


# ---------------------------------------------------------------- cluster


@pytest.mark.parametrize("k", [2, 3, 4])
def test_planted_clusters_recovered_exactly(k):
    s = cosine_from_gram(_streamed_gram(_planted(k)))
    expected_labels = tuple(i % k for i in range(9))
    expected_members = tuple(tuple(range(c, 9, k)) for c in range(k))
    for chosen in ("auto", k):
        result = cluster(s, k=chosen)
        assert result.k == k
        assert result.labels == expected_labels
        assert result.members == expected_members
    # Deterministic: repeated calls give the same clustering, field for field.
    assert cluster(s) == cluster(s) == cluster(s.numpy().tolist())


def test_eigenvalues_and_eigengap_hand_computed():
    # A = [[·, .5, 0], [.5, ·, 0], [0, 0, ·]] (the -0.4 is clipped), L = [[.5, -.5, 0],
    # [-.5, .5, 0], [0, 0, 0]]: eigenvalues 0, 0, 1. The normalised Laplacian of the
    # zero-diagonal A is [[1, -1, 0], [-1, 1, 0], [0, 0, 0]] (task 2 has degree 0):
    # μ = 0, 0, 2; the only candidate gap μ3 − μ2 = 2 gives k* = 2, and the clusters
    # {0, 1}, {2} have mean affinity 0.5 inside, 0 across → k = 2.
    s = [[1.0, 0.5, -0.4], [0.5, 1.0, 0.0], [-0.4, 0.0, 1.0]]
    result = cluster(s)
    np.testing.assert_allclose(result.eigenvalues, [0.0, 0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(result.normalized_eigenvalues, [0.0, 0.0, 2.0], atol=1e-12)
    assert result.k == 2
    assert result.labels == (0, 0, 1)
    assert result.affinity == ((1.0, 0.5, 0.0), (0.5, 1.0, 0.0), (0.0, 0.0, 1.0))


def test_eigengap_respects_k_max_and_ties_pick_smallest():
    # Two disjoint triangles: μ = 0, 0, 3/2, 3/2, 3/2, 3/2 (λ = 0, 0, 3, 3, 3, 3 for D − A),
    # so the only non-zero gap is at i = 2.
    a = _block_affinity([[0, 2, 4], [1, 3, 5]])
    assert cluster(a).k == 2
    assert cluster(a).labels == (0, 1, 0, 1, 0, 1)
    assert cluster(a, k_max=1).k == 1
    # All tasks orthogonal: every gap is 0, so there is no structure and k = 1 (documented).
    assert cluster(np.eye(4)).k == 1


def test_negative_similarities_are_clipped():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(500, generator=gen)
    deltas = [
        a,
        -a,
        a + 0.1 * torch.randn(500, generator=gen),
        -a + 0.1 * torch.randn(500, generator=gen),
    ]
    s = cosine_from_gram(_streamed_gram([deltas]))
    assert s[0, 1] == -1.0
    result = cluster(s)
    assert result.k == 2
    assert result.labels == (0, 1, 0, 1)
    assert result.affinity[0][1] == 0.0
    assert result.affinity[0][3] == 0.0
    assert result.affinity[0][2] == pytest.approx(float(s[0, 2]))


def test_disconnected_graph_clusters_without_warning():
    a = _block_affinity([[0, 3, 6], [1, 4], [2, 5, 7]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = cluster(a, k=3)
    assert result.members == ((0, 3, 6), (1, 4), (2, 5, 7))
    # A task unrelated to all others (e.g. a zero task vector) is a component of its own.
    b = _block_affinity([[0, 1, 2], [3], [4, 5]])
    assert cluster(b, k=3).members == ((0, 1, 2), (3,), (4, 5))


def test_special_cases():
    one = cluster([[1.0]])
    assert (one.k, one.labels, one.members, one.eigenvalues) == (1, (0,), ((0,),), (0.0,))
    s = np.full((4, 4), 0.3) + 0.7 * np.eye(4)
    assert cluster(s, k=1).members == ((0, 1, 2, 3),)
    assert cluster(s, k=4).members == ((0,), (1,), (2,), (3,))
    assert cluster(s, k=4).labels == (0, 1, 2, 3)


def test_unrelated_tasks_refuse_a_k_between_1_and_n():
    # No positive similarity between any two tasks (orthogonal or opposed): scikit-learn's
    # labels for such a graph changed from one call to the next in one process, so a k
    # between 1 and n is refused; 1, n and auto are answered.
    s = np.array([[1.0, -0.2, 0.0, -0.01], [-0.2, 1.0, -0.3, 0.0],
                  [0.0, -0.3, 1.0, -0.5], [-0.01, 0.0, -0.5, 1.0]])
    for k in (2, 3):
        with pytest.raises(ValueError) as err:
            cluster(s, k=k)
        assert str(err.value) == (
            f"k={k}, but no two of the 4 task vectors have a positive cosine similarity (they "
            "are orthogonal or opposed), so there is nothing to cluster them by and any "
            "grouping would be arbitrary: use k: 1 (one basis vector of all), k: 4 (each task "
            "alone) or k: auto (which gives 1 here)")
    assert cluster(s, k=1).members == ((0, 1, 2, 3),)
    assert cluster(s, k=4).members == ((0,), (1,), (2,), (3,))
    assert cluster(s, k="auto").members == ((0, 1, 2, 3),)
    # One positive pair is an edge: clustered, and the same labels every time.
    s[0, 1] = s[1, 0] = 0.4
    assert {cluster(s, k=2).members for _ in range(5)} == {cluster(s, k=2).members}


@pytest.mark.parametrize("k", [0, -1, 4])
def test_k_out_of_range_message(k):
    with pytest.raises(
        ValueError, match=re.escape(f"k={k} is out of range for n=3 tasks: need 1 <= k <= 3")
    ):
        cluster(np.eye(3), k=k)


def test_invalid_k_and_similarity():
    with pytest.raises(
        ValueError, match=re.escape("k must be a positive integer or 'auto', got 'many'")
    ):
        cluster(np.eye(3), k="many")
    with pytest.raises(TypeError, match="k must be a positive integer"):
        cluster(np.eye(3), k=2.0)
    with pytest.raises(TypeError, match="k must be a positive integer"):
        cluster(np.eye(3), k=True)
    with pytest.raises(ValueError, match=re.escape("k_max must be >= 1, got 0")):
        cluster(np.eye(3), k_max=0)
    with pytest.raises(ValueError, match="symmetric"):
        cluster([[1.0, 0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match="square"):
        cluster(np.ones((2, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        cluster([[1.0, float("nan")], [float("nan"), 1.0]])


@settings(max_examples=25, deadline=None)
@given(data=st.data(), n=st.integers(1, 8))
def test_clustering_is_a_renumbered_partition(data, n):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    x = rng.standard_normal((n, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = np.clip(x @ x.T, -1, 1)
    k = data.draw(st.sampled_from(["auto", *range(1, n + 1)]))
    if k != "auto" and 1 < k < n and (s - np.diag(np.diag(s)) <= 0).all():
        with pytest.raises(ValueError, match="no two of the"):
            cluster(s, k=k)  # (no edge to cluster by: test_unrelated_tasks_refuse_a_k_between)
        return
    result = cluster(s, k=k)
    assert sorted(t for m in result.members for t in m) == list(range(n))
    assert result.k == len(result.members)
    assert all(result.labels[t] == c for c, m in enumerate(result.members) for t in m)
    # Clusters numbered by smallest member.
    assert [m[0] for m in result.members] == sorted(m[0] for m in result.members)
    if k != "auto":
        assert result.k == k
    eig = np.array(result.eigenvalues)
    assert (np.diff(eig) >= 0).all() and eig[0] == pytest.approx(0.0, abs=1e-9)
    mu = np.array(result.normalized_eigenvalues)
    assert (np.diff(mu) >= 0).all() and mu[0] == pytest.approx(0.0, abs=1e-9)
    assert (mu <= 2.0).all()


def test_clustering_to_dict_and_frozen():
    result = cluster(_block_affinity([[0, 2], [1]]), k=2)
    d = json.loads(json.dumps(result.to_dict()))
    assert d == {
        "k": 2,
        "labels": [0, 1, 0],
        "members": [[0, 2], [1]],
        "affinity": [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]],
        "eigenvalues": result.to_dict()["eigenvalues"],
        "normalized_eigenvalues": result.to_dict()["normalized_eigenvalues"],
    }
    np.testing.assert_allclose(d["eigenvalues"], [0.0, 0.0, 2.0], atol=1e-12)
    np.testing.assert_allclose(d["normalized_eigenvalues"], [0.0, 0.0, 2.0], atol=1e-12)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.k = 3  # type: ignore[misc]
    assert isinstance(result, Clustering)


def test_import_does_not_load_sklearn():
    # Load the file alone, so that what the rest of tvrecipe.ops imports does not count.
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('basis_alone', {basis.__file__!r}); "
        "module = sys.modules['basis_alone'] = importlib.util.module_from_spec(spec); "
        "spec.loader.exec_module(module); "
        "print(sorted({'sklearn', 'numpy', 'torch'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- merge / assign


def test_mean_basis_then_sum_is_task_arithmetic_with_cluster_weights():
    # Hand computation: clusters {0, 1} and {2}; means (2, 3) and (10, 0); sum (12, 3)
    # = ½(1, 2) + ½(3, 4) + 1·(10, 0).
    tasks = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([10.0, 0.0])]
    bases = [merge_cluster([tasks[0], tasks[1]]), merge_cluster([tasks[2]])]
    assert [b.tolist() for b in bases] == [[2.0, 3.0], [10.0, 0.0]]
    assert arithmetic.sum(bases, weights=[1.0, 1.0]).tolist() == [12.0, 3.0]

    # The same identity on planted clusters, tensor by tensor.
    per_tensor = _planted(3)
    result = cluster(cosine_from_gram(_streamed_gram(per_tensor)))
    size = [len(result.members[c]) for c in result.labels]
    for deltas in per_tensor:
        bases = [merge_cluster([deltas[t] for t in m], merge="mean") for m in result.members]
        merged = arithmetic.sum(bases, weights=[1.0] * result.k)
        expected = sum(d.double() / size[t] for t, d in enumerate(deltas))
        torch.testing.assert_close(merged.double(), expected, rtol=1e-6, atol=1e-7)


def test_k_equals_n_gives_inputs_back():
    gen = torch.Generator().manual_seed(6)
    tasks = [torch.randn(13, 7, generator=gen) for _ in range(4)]
    s = cosine_from_gram(_streamed_gram([tasks]))
    result = cluster(s, k=4)
    assert result.members == ((0,), (1,), (2,), (3,))
    for m in result.members:
        out = merge_cluster([tasks[t] for t in m])
        assert torch.equal(out, tasks[m[0]])
        assert out is not tasks[m[0]]


def test_merge_sum_and_ties_forwarding(monkeypatch):
    x, y = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 4.0])
    assert merge_cluster([x, y], merge="sum").tolist() == [1.5, 2.0]
    assert merge_cluster([x, y], merge="mean").tolist() == [0.75, 1.0]

    from tvrecipe.ops import sparsify

    calls = []

    def fake_ties(inputs, **options):
        calls.append((list(inputs), options))
        return torch.zeros(2)

    monkeypatch.setattr(sparsify, "ties", fake_ties, raising=False)
    out = merge_cluster([x, y], merge="ties", density=0.2, majority="count")
    assert out.tolist() == [0.0, 0.0]
    assert calls == [([x, y], {"density": 0.2, "majority": "count"})]


def test_merge_ties_trims_floor_count():
    # density 0.7 of 5 entries keeps k = int(3.5) = 3 per member (rounding would keep 4):
    # x keeps [4, _, 2, _, -3], y keeps [_, 2, _, 3, -4]; all kept signs agree, so the
    # disjoint mean is [4, 2, 2, 3, -3.5].
    x = torch.tensor([4.0, -1.0, 2.0, 0.5, -3.0])
    y = torch.tensor([-1.0, 2.0, 0.5, 3.0, -4.0])
    out = merge_cluster([x, y], merge="ties", density=0.7)
    assert out.tolist() == [4.0, 2.0, 2.0, 3.0, -3.5]


def test_merge_errors():
    x = torch.ones(2)
    with pytest.raises(
        ValueError, match=re.escape("unknown merge 'median': expected 'mean', 'sum' or 'ties'")
    ):
        merge_cluster([x], merge="median")
    with pytest.raises(
        TypeError, match=re.escape("merge 'mean' takes no options, got ['density']")
    ):
        merge_cluster([x], density=0.5)
    with pytest.raises(ValueError, match="at least one input"):
        merge_cluster([])


def test_assign_argmax_lowest_index_on_ties():
    assert assign([0.1, 0.7, 0.7, -1.0]) == 1
    assert assign(torch.tensor([-0.5, -0.2, -0.9])) == 1
    assert assign(np.array([0.3])) == 0
    with pytest.raises(ValueError, match="non-empty 1-D"):
        assign([])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        assign([[0.1, 0.2]])
    with pytest.raises(ValueError, match="NaN"):
        assign([0.1, float("nan")])


def test_assign_new_task_to_its_basis_through_the_gram():
    per_tensor = _planted(3)
    result = cluster(cosine_from_gram(_streamed_gram(per_tensor)))
    bases = [[merge_cluster([d[t] for t in m]) for m in result.members] for d in per_tensor]
    # A new task in the direction of task 5 (cluster 5 % 3 = 2), plus noise.
    gen = torch.Generator().manual_seed(7)
    new = [
        d[5] + 0.05 * d[5].norm() * torch.randn(d[5].shape, generator=gen) / d[5].numel() ** 0.5
        for d in per_tensor
    ]
    gram = torch.zeros(4, 4, dtype=torch.float64)
    for nw, bs in zip(new, bases):
        gram_update(gram, [nw, *bs])
    assert assign(cosine_from_gram(gram)[0, 1:]) == 2
