"""Tests for the shared / unique decomposition kernels against the math in methods.md."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

dec = importlib.import_module("tvrecipe.ops.decompose")
from tvrecipe.ops.decompose import (
    METHODS,
    Decomposition,
    decompose,
    dense_shared_subspace,
    shared_subspace,
    task_subspace,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orth(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x).Q


def _proj(u: torch.Tensor) -> torch.Tensor:
    u = u.double()
    return u @ u.mT


def _assert_orthonormal(z: torch.Tensor, atol: float = 1e-5) -> None:
    eye = torch.eye(z.shape[1], dtype=F64)
    torch.testing.assert_close(z.double().mT @ z.double(), eye, atol=atol, rtol=0)


def _principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(_orth(a.double()).mT @ _orth(b.double()))


def _planted(k: int, d: int = 48, d_in: int = 20, common: int = 3, own: int = 3, seed: int = 0,
             noise: float = 0.0):
    """W_i = A C_i^T + B_i D_i^T with B_i orthogonal to A, so the shared part is exactly A C_i^T.

    D_i is also orthogonal to C_i and the common part is 4x stronger, so the top singular
    directions are span(A) first: an energy truncation then keeps span(A) whole.
    """
    g = _gen(seed)
    a = _orth(torch.randn(d, common, generator=g, dtype=F64))
    out, planted_shared = [], []
    for _ in range(k):
        b = torch.randn(d, own, generator=g, dtype=F64)
        b = _orth(b - a @ (a.mT @ b))
        c = torch.randn(d_in, common, generator=g, dtype=F64) * 4
        dd = torch.randn(d_in, own, generator=g, dtype=F64)
        qc = _orth(c)
        dd = dd - qc @ (qc.mT @ dd)
        w = a @ c.mT + b @ dd.mT + noise * torch.randn(d, d_in, generator=g, dtype=F64)
        out.append(w.float())
        planted_shared.append((a @ c.mT).float())
    return a, out, planted_shared


def _subspaces(ws, rank, method="sandwich", threshold=0.85):
    us = [task_subspace(w, rank=rank) for w in ws]
    return us, shared_subspace(us, method=method, threshold=threshold)


def _check_split(ws, res: Decomposition, atol: float = 1e-5) -> None:
    """Reconstruction, orthogonality and Pythagoras, relative to ||W_i||."""
    for w, sh, un in zip(ws, res.shared, res.unique):
        assert sh.shape == w.shape == un.shape
        scale = float(w.double().norm()) or 1.0
        torch.testing.assert_close((sh + un).double(), w.double(), atol=atol * scale, rtol=0)
        inner = float((sh.double() * un.double()).sum())
        assert abs(inner) <= atol * scale**2
        total = float(sh.double().norm() ** 2 + un.double().norm() ** 2)
        assert total == pytest.approx(float(w.double().norm() ** 2), rel=atol, abs=1e-12)


# ---------------------------------------------------------------- task_subspace


@pytest.mark.parametrize(
    ("energy", "expected"),
    [(0.5, 1), (9 / 14, 1), (0.65, 2), (0.9, 2), (13 / 14, 2), (0.95, 3), (1.0, 3)],
)
def test_energy_rank_is_smallest_r(energy, expected):
    # Singular values 3, 2, 1: energies 9/14, 13/14, 14/14; boundaries hit exactly count.
    w = torch.zeros(6, 5)
    w[0, 0], w[1, 1], w[2, 2] = 3.0, 2.0, 1.0
    u = task_subspace(w, rank={"energy": energy})
    assert u.shape == (6, expected)
    ref = torch.eye(6, dtype=F64)[:, :expected]
    torch.testing.assert_close(_proj(u), _proj(ref), atol=1e-6, rtol=0)


def test_int_rank_clamped_and_matches_svd():
    w = torch.randn(6, 4, generator=_gen(1))
    assert task_subspace(w, rank=10).shape == (6, 4)
    w = torch.randn(40, 30, generator=_gen(2), dtype=F64).float()
    u = task_subspace(w, rank=5)
    _assert_orthonormal(u)
    ref = torch.linalg.svd(w.double(), full_matrices=False).U[:, :5]
    torch.testing.assert_close(_proj(u), _proj(ref), atol=1e-5, rtol=0)


def test_zero_and_low_rank_inputs():
    assert task_subspace(torch.zeros(7, 5), rank=3).shape == (7, 0)
    assert task_subspace(torch.zeros(7, 5), rank={"energy": 0.9}).shape == (7, 0)
    assert task_subspace(torch.randn(7, 5), rank=0).shape == (7, 0)
    # Null directions are not part of the task's subspace even when an int rank asks for them.
    w = torch.randn(12, 2, generator=_gen(3)) @ torch.randn(2, 9, generator=_gen(4))
    assert task_subspace(w, rank=6).shape == (12, 2)


def test_rank_validation():
    w = torch.randn(5, 4)
    for bad in ({"energy": 0.0}, {"energy": 1.5}, {"energies": 0.9}, -1):
        with pytest.raises(ValueError):
            task_subspace(w, rank=bad)
    with pytest.raises(TypeError):
        task_subspace(w, rank=True)
    with pytest.raises(ValueError, match="at least 2 dims"):
        task_subspace(torch.randn(5), rank=2)


def _spectrum_matrix(d_out, d_in, sv, seed):
    """A matrix with exactly the given singular values and random singular vectors."""
    g = _gen(seed)
    u = _orth(torch.randn(d_out, len(sv), generator=g, dtype=F64))
    v = _orth(torch.randn(d_in, len(sv), generator=g, dtype=F64))
    return (u * torch.tensor(sv, dtype=F64)) @ v.mT, u


def test_randomized_path_matches_full_svd(monkeypatch):
    sv = [10.0 * 0.8**j for j in range(12)] + [0.05] * 40
    w64, u_true = _spectrum_matrix(256, 192, sv, seed=5)
    w = w64.float()
    big_svds = []
    real_svd = torch.linalg.svd

    def spy(a, *args, **kwargs):
        if min(a.shape) >= 192:
            big_svds.append(tuple(a.shape))
        return real_svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    s2 = torch.tensor(sv, dtype=F64) ** 2
    want = int((torch.cumsum(s2, 0) < 0.9 * s2.sum()).sum()) + 1
    u = task_subspace(w, rank={"energy": 0.9})
    assert u.shape == (256, want)
    _assert_orthonormal(u)
    torch.testing.assert_close(_proj(u), _proj(u_true[:, :want]), atol=1e-4, rtol=0)
    kept = float((u.double().mT @ w64).norm() ** 2 / w64.norm() ** 2)
    assert kept >= 0.9 - 1e-5
    u8 = task_subspace(w, rank=8)
    torch.testing.assert_close(_proj(u8), _proj(u_true[:, :8]), atol=1e-4, rtol=0)
    assert big_svds == []  # both calls stayed on the sketch


def test_energy_one_stops_at_exact_rank_on_randomized_path():
    w64, u_true = _spectrum_matrix(256, 192, [5.0, 4.0, 3.0, 2.0, 1.0, 0.5], seed=6)
    u = task_subspace(w64.float(), rank={"energy": 1.0})
    assert u.shape == (256, 6)
    torch.testing.assert_close(_proj(u), _proj(u_true), atol=1e-5, rtol=0)


def test_conv_kernel_reads_as_out_by_rest():
    w = torch.randn(8, 3, 3, 3, generator=_gen(7))
    u = task_subspace(w, rank=4)
    ref = task_subspace(w.reshape(8, 27), rank=4)
    assert u.shape == (8, 4)
    assert torch.equal(u, ref)


def test_deterministic_and_leaves_global_rng_alone():
    _, ws, _ = _planted(3, d=256, d_in=160, noise=0.01, seed=8)
    state = torch.get_rng_state()
    r1 = decompose(ws, rank={"energy": 0.9})
    r2 = decompose(ws, rank={"energy": 0.9})
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(r1.shared + r1.unique, r2.shared + r2.unique):
        assert a.numpy().tobytes() == b.numpy().tobytes()
    assert r1.info == r2.info
    torch.manual_seed(123)
    u1 = task_subspace(ws[0], rank=8)
    torch.manual_seed(456)
    assert torch.equal(u1, task_subspace(ws[0], rank=8))


# ---------------------------------------------------------------- shared_subspace


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rank", [6, {"energy": 1.0}])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_planted_common_subspace_is_recovered(method, rank, k):
    a, ws, planted_shared = _planted(k, seed=10 + k)
    us, z = _subspaces(ws, rank, method)
    assert [u.shape[1] for u in us] == [6] * k
    assert z.shape == (48, 3)
    _assert_orthonormal(z)
    torch.testing.assert_close(_principal_cosines(z, a), torch.ones(3, dtype=F64), atol=1e-5,
                               rtol=0)
    res = decompose(ws, method=method, rank=rank)
    assert res.info["shared_dim"] == 3 and res.info["mode"] == "subspace"
    assert res.info["ranks"] == [6] * k
    _check_split(ws, res)
    for sh, want, w, e in zip(res.shared, planted_shared, ws, res.info["shared_energy"]):
        torch.testing.assert_close(sh, want, atol=1e-4, rtol=0)
        assert e == pytest.approx(float(want.norm() ** 2 / w.norm() ** 2), rel=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_split_properties_on_noisy_tasks(method):
    _, ws, _ = _planted(4, d=40, d_in=24, noise=0.05, seed=20)
    res = decompose(ws, method=method, threshold=0.8)
    _check_split(ws, res)
    assert res.info["shared_dim"] == 3
    for e in res.info["shared_energy"]:
        assert 0.0 < e < 1.0


@pytest.mark.parametrize("method", METHODS)
def test_identical_tasks_have_no_unique_part(method):
    w = torch.randn(30, 5, generator=_gen(30)) @ torch.randn(5, 18, generator=_gen(31))
    ws = [w.clone() for _ in range(3)]
    res = decompose(ws, method=method, rank={"energy": 1.0})
    assert res.info["shared_dim"] == 5
    for un in res.unique:
        assert float(un.norm()) <= 1e-5 * float(w.norm())
    # With truncation the unique part is exactly the tail the rank left out.
    full = torch.randn(30, 18, generator=_gen(32))
    res = decompose([full, full.clone()], method=method, rank={"energy": 0.9})
    u = task_subspace(full, rank={"energy": 0.9})
    tail = full - u @ (u.mT @ full)
    for un in res.unique:
        torch.testing.assert_close(un, tail, atol=1e-5, rtol=0)
        assert float(un.norm() ** 2) <= 0.1 * float(full.norm() ** 2) + 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_orthogonal_subspaces_share_nothing(method):
    q = _orth(torch.randn(36, 36, generator=_gen(40), dtype=F64))
    ws = [(q[:, 9 * i: 9 * i + 4] @ torch.randn(4, 15, generator=_gen(41 + i), dtype=F64)).float()
          for i in range(4)]
    # 0.3 sits above 1/4, the mean_projector eigenvalue of a direction in one of 4 subspaces.
    _, z = _subspaces(ws, 4, method, threshold=0.3)
    assert z.shape == (36, 0)
    res = decompose(ws, method=method, rank=4, threshold=0.3)
    assert res.info["shared_dim"] == 0
    assert res.info["shared_energy"] == [0.0] * 4
    for w, sh, un in zip(ws, res.shared, res.unique):
        assert torch.count_nonzero(sh) == 0
        assert torch.equal(un, w)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rank", [6, {"energy": 0.9}])
def test_scaling_or_sign_flip_changes_no_subspace(method, rank):
    _, ws, _ = _planted(3, noise=0.02, seed=50)
    scaled = [ws[0], -2.0 * ws[1], 3.0 * ws[2]]
    us, z = _subspaces(ws, rank, method)
    us2, z2 = _subspaces(scaled, rank, method)
    for u, u2 in zip(us, us2):
        assert u.shape == u2.shape
        torch.testing.assert_close(_proj(u), _proj(u2), atol=1e-5, rtol=0)
    assert z.shape == z2.shape and z.shape[1] >= 3
    torch.testing.assert_close(_proj(z), _proj(z2), atol=1e-5, rtol=0)
    r1 = decompose(ws, method=method, rank=rank)
    r2 = decompose(scaled, method=method, rank=rank)
    assert r1.info["shared_dim"] == r2.info["shared_dim"]
    assert r1.info["shared_energy"] == pytest.approx(r2.info["shared_energy"], rel=1e-4)
    for c, a, b in zip([1.0, -2.0, 3.0], r1.shared, r2.shared):
        torch.testing.assert_close(b, c * a, atol=1e-4, rtol=0)


def _overlapping_bases(seed: int, d: int = 12, k: int = 3):
    """Subspaces sharing one exact direction and one direction at small, varying angles."""
    g = _gen(seed)
    common = torch.randn(d, 2, generator=g, dtype=F64)
    us = []
    for i in range(k):
        near = common[:, 1:] + 0.15 * (i + 1) * torch.randn(d, 1, generator=g, dtype=F64)
        rest = torch.randn(d, 1 + i % 3, generator=g, dtype=F64)
        us.append(_orth(torch.cat([common[:, :1], near, rest], 1)).float())
    return us


def _dense_spectrum(us, method):
    projs = [_proj(u) for u in us]
    if method == "mean_projector":
        return torch.linalg.eigvalsh(torch.stack(projs).mean(0))
    prod = projs[0]
    for p in projs[1:]:
        prod = prod @ p
    if method == "sandwich":
        return torch.linalg.svdvals(prod) ** 2
    return torch.linalg.eigvals(prod).real


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.85, 0.95])
@pytest.mark.parametrize(("seed", "k"), [(60, 2), (61, 3), (62, 4)])
def test_small_matrix_paths_match_dense(method, threshold, seed, k):
    us = _overlapping_bases(seed, k=k)
    spectrum = _dense_spectrum(us, method)
    # A cut-off right at an eigenvalue would make the comparison a coin flip.
    assert float((spectrum - threshold).abs().min()) > 1e-3
    z = shared_subspace(us, method=method, threshold=threshold)
    ref = dense_shared_subspace(us, method=method, threshold=threshold)
    assert z.shape[1] == ref.shape[1]
    _assert_orthonormal(z)
    torch.testing.assert_close(_proj(z), _proj(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("seed", "threshold", "dim"), [(22, 0.3, 3), (33, 0.4, 2)])
def test_chain_complex_eigenvalues_match_dense(seed, threshold, dim):
    g = _gen(seed)
    us = [_orth(torch.randn(8, 5, generator=g, dtype=F64)) for _ in range(4)]
    prod = torch.eye(8, dtype=F64)
    for u in us:
        prod = prod @ _proj(u)
    lam = torch.linalg.eigvals(prod)
    kept = lam[lam.real > threshold]
    assert bool((kept.imag.abs() > 1e-3).any())  # a conjugate pair is among the kept ones
    z = shared_subspace(us, method="chain", threshold=threshold)
    ref = dense_shared_subspace(us, method="chain", threshold=threshold)
    assert z.shape == (8, dim) and ref.shape == (8, dim)
    _assert_orthonormal(z, atol=1e-10)
    torch.testing.assert_close(_proj(z), _proj(ref), atol=1e-8, rtol=0)
    # The span is invariant under P_1...P_k, as an eigenspace must be.
    torch.testing.assert_close(_proj(z) @ prod @ _proj(z), prod @ _proj(z), atol=1e-8, rtol=0)


def test_mean_projector_is_order_free_and_counts_memberships():
    us = _overlapping_bases(70, k=4)
    z = shared_subspace(us, method="mean_projector", threshold=0.6)
    z_rev = shared_subspace(us[::-1], method="mean_projector", threshold=0.6)
    torch.testing.assert_close(_proj(z), _proj(z_rev), atol=1e-5, rtol=0)
    # A direction in 3 of 4 subspaces has eigenvalue 3/4: kept at 0.7, dropped at 0.8.
    g = _gen(71)
    e = _orth(torch.randn(20, 5, generator=g, dtype=F64)).float()
    us = [e[:, [0, 1]], e[:, [0, 2]], e[:, [0, 3]], e[:, [4]]]
    z = shared_subspace(us, method="mean_projector", threshold=0.7)
    torch.testing.assert_close(_proj(z), _proj(e[:, :1]), atol=1e-6, rtol=0)
    assert shared_subspace(us, method="mean_projector", threshold=0.8).shape == (20, 0)


def test_zero_task_gives_zero_energy_and_no_nan():
    _, ws, _ = _planted(3, seed=80)
    ws[1] = torch.zeros_like(ws[1])
    for method in METHODS:
        res = decompose(ws, method=method, rank=6)
        assert res.info["ranks"] == [6, 0, 6]
        assert res.info["shared_dim"] == 0  # 2/3 < 0.85 for mean_projector, empty for the rest
        assert res.info["shared_energy"] == [0.0, 0.0, 0.0]
        _check_split(ws, res)


# ---------------------------------------------------------------- errors


K1_MESSAGE = "decompose needs at least 2 task vectors to find a shared subspace, got 1"


def test_single_task_is_refused():
    w = torch.randn(6, 4)
    with pytest.raises(ValueError) as err:
        decompose([w])
    assert str(err.value) == K1_MESSAGE
    with pytest.raises(ValueError) as err:
        shared_subspace([task_subspace(w, rank=2)])
    assert str(err.value) == K1_MESSAGE
    with pytest.raises(ValueError) as err:
        decompose([torch.randn(4)], vectors_1d="mean")
    assert str(err.value) == K1_MESSAGE


def test_bad_options_are_refused():
    ws = [torch.randn(6, 4), torch.randn(6, 4)]
    with pytest.raises(ValueError, match="sandwich.*chain.*mean_projector"):
        decompose(ws, method="svd")
    with pytest.raises(ValueError, match="sandwich.*chain.*mean_projector"):
        shared_subspace([torch.eye(6)[:, :2]] * 2, method="nope")
    with pytest.raises(ValueError, match="threshold"):
        decompose(ws, threshold=1.5)
    with pytest.raises(ValueError, match="vectors_1d"):
        decompose(ws, vectors_1d="drop")
    with pytest.raises(ValueError, match="shape"):
        decompose([torch.randn(6, 4), torch.randn(6, 5)])


# ---------------------------------------------------------------- shapes and 1-D modes


@pytest.mark.parametrize("method", METHODS)
def test_conv_shaped_deltas(method):
    g = _gen(90)
    common = torch.randn(16, 2, generator=g)
    ws = [(torch.cat([common, torch.randn(16, 2, generator=g)], 1)
           @ torch.randn(4, 27, generator=g)).reshape(16, 3, 3, 3) for _ in range(3)]
    res = decompose(ws, method=method, rank=4)
    flat = decompose([w.reshape(16, 27) for w in ws], method=method, rank=4)
    assert res.info == flat.info and res.info["shared_dim"] == 2
    _check_split(ws, res)
    for sh, sh_flat in zip(res.shared, flat.shared):
        assert sh.shape == (16, 3, 3, 3)
        assert torch.equal(sh.reshape(16, 27), sh_flat)


@pytest.mark.parametrize("shape", [(7,), ()])
def test_1d_unique_mode(shape):
    ws = [torch.randn(shape, generator=_gen(100 + i)) for i in range(3)]
    res = decompose(ws, vectors_1d="unique", method="chain")
    assert res.info == {"ranks": [], "shared_dim": 0, "shared_energy": [0.0] * 3,
                        "mode": "1d-unique"}
    for w, sh, un in zip(ws, res.shared, res.unique):
        assert torch.count_nonzero(sh) == 0 and torch.equal(un, w)
        assert un.data_ptr() != w.data_ptr()


def test_1d_mean_mode():
    ws = [torch.randn(7, generator=_gen(110 + i)) for i in range(4)]
    mean = torch.stack(ws).mean(0)
    res = decompose(ws, vectors_1d="mean")
    assert res.info["mode"] == "1d-mean" and res.info["shared_dim"] == 0
    for w, sh, un, e in zip(ws, res.shared, res.unique, res.info["shared_energy"]):
        torch.testing.assert_close(sh, mean)
        torch.testing.assert_close(sh + un, w)
        assert e == pytest.approx(float(mean.norm() ** 2 / w.norm() ** 2), rel=1e-5)
    # The residuals cancel over tasks: the mean carries all the common part.
    torch.testing.assert_close(torch.stack(res.unique).sum(0), torch.zeros(7), atol=1e-5, rtol=0)


@pytest.mark.parametrize("vectors_1d", ["unique", "mean"])
def test_excluded_2d_tensor_follows_vectors_1d(vectors_1d):
    ws = [torch.randn(10, 6, generator=_gen(120 + i)) for i in range(3)]
    res = decompose(ws, vectors_1d=vectors_1d, excluded=True)
    assert res.info["mode"] == f"excluded-{vectors_1d}"
    want = torch.stack(ws).mean(0) if vectors_1d == "mean" else torch.zeros(10, 6)
    for w, sh, un in zip(ws, res.shared, res.unique):
        torch.testing.assert_close(sh, want)
        torch.testing.assert_close(un, w - want)


def test_info_is_json_friendly():
    import json

    _, ws, _ = _planted(3, seed=130)
    info = decompose(ws).info
    assert json.loads(json.dumps(info)) == info
    assert set(info) == {"ranks", "shared_dim", "shared_energy", "mode"}


# ---------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    k=st.integers(2, 4),
    d_out=st.integers(2, 24),
    d_in=st.integers(1, 24),
    method=st.sampled_from(METHODS),
    energy=st.floats(0.3, 1.0),
    threshold=st.floats(0.05, 1.0),
)
def test_split_is_exact_and_orthogonal_for_any_input(seed, k, d_out, d_in, method, energy,
                                                     threshold):
    g = _gen(seed)
    base = torch.randn(d_out, d_in, generator=g)
    ws = [base * float(torch.rand(1, generator=g)) + torch.randn(d_out, d_in, generator=g)
          for _ in range(k)]
    res = decompose(ws, method=method, rank={"energy": energy}, threshold=threshold)
    _check_split(ws, res, atol=2e-5)
    us = [task_subspace(w, rank={"energy": energy}) for w in ws]
    for u, w in zip(us, ws):
        _assert_orthonormal(u)
        kept = float((u.double().mT @ w.double()).norm() ** 2 / w.double().norm() ** 2)
        assert kept >= energy - 1e-4
        if u.shape[1] > 1:  # one fewer direction would miss the target
            less = float((u[:, :-1].double().mT @ w.double()).norm() ** 2
                         / w.double().norm() ** 2)
            assert less < energy + 1e-4
    z = shared_subspace(us, method=method, threshold=threshold)
    _assert_orthonormal(z)
    assert z.shape[1] == res.info["shared_dim"]
    if method != "mean_projector":  # an intersection-like rule: never wider than any U_i
        assert z.shape[1] <= min(u.shape[1] for u in us)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    _, ws, _ = _planted(3, d=256, d_in=160, noise=0.01, seed=140)
    cpu = decompose(ws)
    gpu = decompose([w.cuda() for w in ws])
    assert gpu.info["ranks"] == cpu.info["ranks"]
    assert gpu.info["shared_dim"] == cpu.info["shared_dim"]
    for a, b in zip(cpu.shared, gpu.shared):
        assert b.is_cuda
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)


def test_module_constants():
    assert METHODS == ("sandwich", "chain", "mean_projector")
    assert dec.DEFAULT_RANK == {"energy": 0.9}
