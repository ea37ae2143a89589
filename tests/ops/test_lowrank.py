"""tvrecipe.ops.lowrank: the factors of an adapter output and their error, by hand."""

import numpy as np
import torch

from tvrecipe.ops import lowrank


def test_squares_by_row_blocks_are_the_float64_norms(monkeypatch):
    # ‖x‖² and ‖x − b·a‖² summed over row blocks (no float64 copy of x): the float64 values,
    # for blocks of one row, several rows, and the whole matrix.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 11, generator=g)
    b, a = torch.randn(37, 3, generator=g), torch.randn(3, 11, generator=g)
    xd = x.numpy().astype(np.float64)
    r = xd - b.numpy().astype(np.float64) @ a.numpy().astype(np.float64)
    for entries in (1, 11 * 5, 1 << 22):
        monkeypatch.setattr(lowrank, "_SQUARES_ENTRIES", entries)
        assert abs(lowrank._squares(x) - (xd ** 2).sum()) <= 1e-12 * (xd ** 2).sum()
        assert abs(lowrank._squares(x, b, a) - (r ** 2).sum()) <= 1e-12 * (r ** 2).sum()
        assert abs(lowrank._squares(x.T) - (xd ** 2).sum()) <= 1e-12 * (xd ** 2).sum()
        x64 = x.double()  # (its rows are read, not changed)
        lowrank._squares(x64, b, a)
        assert torch.equal(x64, x.double())


def test_lora_factors_error_of_an_exact_low_rank_matrix():
    # A rank-3 matrix at rank 3: B·A gives it back, and the error (computed outright when
    # ‖x‖² − Σσ² is below the float32 σ's resolution) is at rounding level; at rank 2 it is
    # σ_3 / ‖x‖ from the singular values.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 3, generator=g) @ torch.randn(3, 200, generator=g)
    b, a, err, norm = lowrank.lora_factors(x, 3)
    s = np.linalg.svd(x.numpy().astype(np.float64), compute_uv=False)
    assert abs(norm - np.sqrt((s ** 2).sum())) <= 1e-9 * norm
    assert err <= 1e-6 and torch.allclose(b @ a, x, atol=1e-4)
    _b, _a, err2, _ = lowrank.lora_factors(x, 2)
    assert abs(err2 - s[2] / np.sqrt((s ** 2).sum())) <= 1e-5
