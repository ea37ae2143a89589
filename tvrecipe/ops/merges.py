"""mergekit-style kernels: linear, slerp, breadcrumbs, DELLA, Model Stock, consensus merge."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tvrecipe.ops.arithmetic import divide_
from tvrecipe.ops.parallel import serial
from tvrecipe.ops.sparsify import (
    _check_density,
    _check_float_tensor,
    _check_inputs,
    _check_weights,
    _select,
    _selected,
)

__all__ = [
    "breadcrumbs",
    "consensus_merge",
    "della",
    "della_probabilities",
    "l1_rescale",
    "linear",
    "model_stock",
    "model_stock_merge",
    "model_stock_t",
    "model_stock_t_from_gram",
    "slerp",
    "slerp_coefficients",
    "slerp_combine",
]

# mergekit 0.1.5's constants, kept identical so that results agree with it.
SLERP_DOT_THRESHOLD = 0.9995  # |cos Ω| above this: (anti)colinear, interpolate linearly
SLERP_EPS = 1e-8  # a norm at or below this is treated as 1 (the tensor is not normalised)
L1_RESCALE_EPS = 1e-7  # an L1 norm below this (before or after masking): no rescale
STOCK_NORM_EPS = 1e-6  # floor of ‖Δ_i‖·‖Δ_j‖ in the cosine
STOCK_SINGULAR_EPS = 1e-6  # |1 + (k - 1) cos| below this: t = 0 (keep the base)
NO_CONSENSUS_EPS = 1e-8  # |Σ w_i| below this: no normalisation without a consensus mask

# Scratch bound for slerp's passes over the flattened tensors (entries per chunk).
_SLERP_CHUNK = 1 << 20

_MAJORITIES = ("total", "count")
_DELLA_RESCALES = (True, False, "l1", "inverse")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (mergekit's working precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_seed(seed: object, op: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{op}: seed must be an int in [0, 2**64), got {seed!r}")
    if not (0 <= seed < 1 << 64):
        raise ValueError(f"{op}: seed must be an int in [0, 2**64), got {seed!r}")
    return seed


def _check_real(value: object, name: str, op: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a finite number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be a finite number, got {value!r}")
    return v


def _check_bool(value: object, name: str, op: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be true or false, got {value!r}")
    return value


# --------------------------------------------------------------------------------------
# linear


def linear(
    inputs: Sequence[torch.Tensor], *, weights: Sequence[float], normalize: bool = True
) -> torch.Tensor:
    """Weighted average (mergekit ``linear``): Σ_i w_i x_i, divided by Σ_i w_i if normalize.

    Accumulated in input order in float32 (float64 for float64 inputs) and returned in the
    inputs' dtype. mergekit divides by Σ w_i without a guard and returns inf/NaN when it is
    0; here that is an error instead. Negative weights are allowed.

    Args:
        inputs: Tensors of one name (whole weights or task vectors), same shape, dtype and
            device (not modified).
        weights: One finite weight per input (required, as in mergekit).
        normalize: Divide by the sum of the weights (mergekit's default: true).

    Returns:
        A new tensor of the inputs' shape, dtype and device.

    Raises:
        ValueError: On no inputs, inputs of different shape/dtype/device, a weights length
            that differs from the inputs, a non-finite weight, or normalize with Σ w_i = 0.
        TypeError: On a non-tensor or non-floating-point input, a non-numeric weight or a
            non-bool normalize.
    """
    xs = _check_inputs(inputs, "linear")
    if weights is None:
        raise ValueError("linear: weights are required, one per input")
    ws = _check_weights(weights, len(xs), "linear")
    normalize = _check_bool(normalize, "normalize", "linear")
    dtype = xs[0].dtype
    cd = _compute_dtype(dtype)
    w = torch.tensor(ws, dtype=cd)
    if normalize:
        den = w.sum()
        if den.item() == 0.0:
            raise ValueError(f"linear: the weights {ws} sum to 0, so normalize (dividing by "
                             "their sum) is undefined; use normalize: false or other weights")
    out = torch.zeros(xs[0].shape, dtype=cd, device=xs[0].device)
    for x, wi in zip(xs, w.tolist()):
        out.add_(x.to(cd), alpha=wi)
    if normalize:
        divide_(out, den.item())
    return out.to(dtype)


# --------------------------------------------------------------------------------------
# slerp


def slerp(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    t: float,
    eps: float = SLERP_EPS,
    dot_threshold: float = SLERP_DOT_THRESHOLD,
) -> torch.Tensor:
    """Spherical interpolation of two whole tensors, as mergekit 0.1.5's ``slerp``.

    ``a`` is the base model (t = 0 gives ``a``, t = 1 gives ``b``). Both tensors are
    flattened; with ‖·‖ replaced by 1 where it is ≤ ``eps``, the cosine
    c = clip(Σ (a/‖a‖)(b/‖b‖), -1, 1). If |c| > ``dot_threshold`` (colinear or
    antipodal, including every 1-element or 0-dim tensor with nonzero entries) the result
    is the lerp (1 - t) a + t b; else, with Ω = arccos c,
    sin((1 - t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b on the unnormalised tensors. An all-zero
    tensor keeps norm 1, so its cosine with anything is 0 (Ω = π/2), not a lerp; an empty
    tensor is returned as an empty lerp. The coefficients are computed in float32
    (float64 for float64 inputs) and the result is returned in ``a``'s dtype.

    Args:
        a: The t = 0 tensor (mergekit's base model), not modified.
        b: The t = 1 tensor, same shape, dtype and device.
        t: Interpolation factor; values outside [0, 1] extrapolate (no check, as mergekit).
        eps: Norms at or below this are not divided by.
        dot_threshold: Colinearity threshold on |cos Ω|.

    Returns:
        A new tensor of ``a``'s shape, dtype and device.

    Raises:
        ValueError: If the tensors differ in shape, dtype or device, or t, eps or
            dot_threshold is not finite.
        TypeError: If a or b is not a floating-point tensor, or t is not a number.
    """
    _check_inputs([a, b], "slerp")
    t = _check_real(t, "t", "slerp")
    eps = _check_real(eps, "eps", "slerp")
    dot_threshold = _check_real(dot_threshold, "dot_threshold", "slerp")
    dtype = a.dtype
    cd = _compute_dtype(dtype)
    af, bf = a.reshape(-1), b.reshape(-1)
    n = af.numel()
    tt = torch.tensor(t, dtype=cd, device=a.device)
    if n == 0:
        return torch.empty_like(a)

    def norm_or_one(v: torch.Tensor) -> torch.Tensor:
        with serial():
            nv = torch.linalg.vector_norm(v.to(cd))
        return torch.where(nv > eps, nv, torch.ones_like(nv))

    na, nb = norm_or_one(af), norm_or_one(bf)
    # Divide before multiplying (as mergekit) so that the dot product cannot overflow, and
    # in chunks so that the scratch stays bounded for embedding-sized tensors.
    dot = torch.zeros((), dtype=cd, device=a.device)
    for s in range(0, n, _SLERP_CHUNK):
        part = (af[s:s + _SLERP_CHUNK].to(cd) / na) * (bf[s:s + _SLERP_CHUNK].to(cd) / nb)
        with serial():
            dot += torch.sum(part)
    dot = dot.clamp(-1.0, 1.0)
    # Compared as a tensor of the compute dtype, as mergekit does.
    if bool(dot.abs() > dot_threshold):
        ca, cb = 1 - tt, tt
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        ca = torch.sin((1 - tt) * theta) / sin_theta
        cb = torch.sin(tt * theta) / sin_theta
    out = torch.empty(n, dtype=dtype, device=a.device)
    for s in range(0, n, _SLERP_CHUNK):
        e = min(s + _SLERP_CHUNK, n)
        out[s:e] = ca * af[s:e].to(cd) + cb * bf[s:e].to(cd)
    return out.view(a.shape)


def slerp_coefficients(gram: torch.Tensor, *, t: float, eps: float = SLERP_EPS,
                       dot_threshold: float = SLERP_DOT_THRESHOLD) -> tuple[float, float]:
    """The coefficients (c_a, c_b) of :func:`slerp` from the 2 × 2 Gram matrix of a and b.

    With ‖a‖² = G₀₀, ‖b‖² = G₁₁ and ⟨a, b⟩ = G₀₁ accumulated over row blocks
    (``tvrecipe.ops.gram_update``), the same rule as :func:`slerp` (norms at or below ``eps``
    count as 1; |cos Ω| above ``dot_threshold`` falls back to lerp), so that
    ``c_a·a + c_b·b`` (:func:`slerp_combine`) can stream by rows. The cosine comes from a
    float64 Gram matrix rather than float32 chunks: the two agree to about 1e-7.
    """
    if gram.shape != (2, 2):
        raise ValueError(f"slerp: needs the 2 x 2 Gram matrix of a and b, got shape "
                         f"{list(gram.shape)}")
    t = _check_real(t, "t", "slerp")
    g = gram.double()
    na, nb = (math.sqrt(max(float(g[i, i]), 0.0)) for i in (0, 1))
    na, nb = (n if n > eps else 1.0 for n in (na, nb))
    dot = min(1.0, max(-1.0, float(g[0, 1]) / na / nb))
    if abs(dot) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(dot)
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp_combine(a: torch.Tensor, b: torch.Tensor, *, ca: float, cb: float) -> torch.Tensor:
    """c_a·a + c_b·b in float32 (float64 for float64 inputs), returned in a's dtype."""
    _check_inputs([a, b], "slerp")
    cd = _compute_dtype(a.dtype)
    tca, tcb = (torch.tensor(c, dtype=cd, device=a.device) for c in (ca, cb))
    return (tca * a.to(cd) + tcb * b.to(cd)).to(a.dtype)


# --------------------------------------------------------------------------------------
# Sparsifiers: breadcrumbs, DELLA, and mergekit's rescale


def l1_rescale(x: torch.Tensor, sparse: torch.Tensor, *, eps: float = L1_RESCALE_EPS
               ) -> torch.Tensor:
    """Scale ``sparse`` so its L1 norm equals x's: mergekit's ``rescale: true``.

    mergekit 0.1.x rescales every sparsified task vector (``dare_*``, ``della*``, and
    ``ties``/``breadcrumbs*`` when asked) this way, not by 1/density: the result is
    ``sparse · (‖x‖₁ / ‖sparse‖₁)``, or ``sparse`` unchanged when either norm is below
    ``eps``. The norms and the ratio are computed in float32 (float64 for float64 inputs).

    Args:
        x: The tensor before sparsification (not modified).
        sparse: The sparsified tensor, same shape, dtype and device (not modified).
        eps: Norms below this disable the rescale.

    Returns:
        A new tensor of x's shape, dtype and device.

    Raises:
        ValueError: If the tensors differ in shape, dtype or device.
        TypeError: If either is not a floating-point tensor.
    """
    _check_inputs([x, sparse], "l1_rescale")
    eps = _check_real(eps, "eps", "l1_rescale")
    cd = _compute_dtype(x.dtype)
    return _l1_rescale(x.to(cd), sparse.to(cd), eps).to(x.dtype)


def _l1_rescale(x: torch.Tensor, sparse: torch.Tensor, eps: float,
                in_place: bool = False) -> torch.Tensor:
    with serial():  # a sum's bytes would depend on the thread count
        before = x.abs().sum()
        after = sparse.abs().sum()
    if before.item() < eps or after.item() < eps:
        return sparse if in_place else sparse.clone()
    return sparse.mul_(before / after) if in_place else sparse * (before / after)


def _top_mask(xf: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of exactly k entries of the flat ``xf``: largest |x| first, ties by lowest index.

    This order is a total order, so the mask of k is a prefix of the mask of any k' > k.
    """
    n = xf.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=xf.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=xf.device)
    return _selected(xf, _select(xf, k, zero_ties=True))


def breadcrumbs(
    x: torch.Tensor, *, density: float, gamma: float = 0.01, rescale: bool = False
) -> torch.Tensor:
    """Model Breadcrumbs sparsifier (mergekit's ``magnitude_outliers``) for one task vector.

    With n entries, k = int(density · n) entries are kept (rounded down, no minimum: a
    small density can keep none) and g = int(gamma · n) outliers are dropped: in the order
    of decreasing |x| (ties: lowest flat index first) the first min(g, n - k) entries are
    dropped, the next k kept and the rest dropped. When k + g > n the outlier cut shrinks so
    that k entries are still kept (mergekit does the same). density 1 returns x unchanged
    whatever gamma is (mergekit skips the whole sparsifier then). The whole tensor is
    ranked at once, whatever its number of dimensions. With ``rescale`` the kept entries
    are scaled to x's L1 norm (:func:`l1_rescale`; mergekit's default for breadcrumbs is no
    rescale).

    mergekit breaks ties at the cut points with an unstable sort (an unspecified order);
    here they are broken by flat index, so the kept set can differ only among entries of
    equal magnitude at a cut.

    Args:
        x: A floating-point tensor (not modified).
        density: Fraction of entries to keep, in (0, 1].
        gamma: Fraction of the largest entries to drop, in [0, 1] (mergekit's default 0.01).
        rescale: Match the L1 norm of x after dropping.

    Returns:
        A new tensor of x's shape, dtype and device (zeros are +0.0).

    Raises:
        ValueError: If density is outside (0, 1] or gamma outside [0, 1].
        TypeError: If x is not a floating-point tensor, or an argument has the wrong type.
    """
    x = _check_float_tensor(x, "breadcrumbs")
    d = _check_density(density, "breadcrumbs")
    g = _check_real(gamma, "gamma", "breadcrumbs")
    if not (0.0 <= g <= 1.0):
        raise ValueError(f"breadcrumbs: gamma must be in [0, 1], got {gamma!r}")
    rescale = _check_bool(rescale, "rescale", "breadcrumbs")
    n = x.numel()
    if d >= 1.0 or n == 0:
        return x.clone()
    cd = _compute_dtype(x.dtype)
    xf = x.reshape(-1).to(cd)
    k = int(d * n)  # as mergekit: the float product rounded down
    n_top = min(int(g * n), n - k)
    keep = _top_mask(xf, n_top + k)
    if n_top > 0:
        keep &= ~_top_mask(xf, n_top)
    out = torch.where(keep, xf, torch.zeros((), dtype=cd, device=x.device))
    if rescale:
        out = _l1_rescale(xf, out, L1_RESCALE_EPS)
    return out.to(x.dtype).view(x.shape)


def della_probabilities(x: torch.Tensor, *, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability of every entry of x (mergekit's ``della_magprune``).

    Entries are ranked by |x| in rows: along dim 1 for tensors of 2 or more dimensions
    (each row of a matrix; for a conv kernel, each (out, kh, kw) fibre along the input
    channels, exactly as mergekit's ``argsort(dim=1)``), the whole tensor for 1-D and 0-dim
    tensors. With r = 0 … m - 1 the rank in a row of m entries (smallest |x| first, ties by
    lowest index), p = (density - epsilon) + (r / (m - 1)) · 2 · epsilon, so p runs linearly
    from density - epsilon to density + epsilon and averages density in every row. A row
    of one entry gets p = density (mergekit divides 0 by 0 there and fails).

    Args:
        x: A floating-point tensor (not modified).
        density: Mean keep probability, in (0, 1).
        epsilon: Half-width of the spread, ≥ 0 with density ± epsilon inside (0, 1).

    Returns:
        p in float32 (float64 for float64 x), of x's shape, on x's device.

    Raises:
        ValueError: On density or epsilon out of range.
        TypeError: If x is not a floating-point tensor or an argument is not a number.
    """
    x = _check_float_tensor(x, "della")
    d, eps = _check_della_args(density, epsilon)
    return _della_probs(x, d, eps)


def _check_della_args(density: object, epsilon: object) -> tuple[float, float]:
    d = _check_density(density, "della")
    eps = _check_real(epsilon, "epsilon", "della")
    if eps < 0.0:
        raise ValueError(f"della: epsilon must be >= 0, got {epsilon!r}")
    # Same test, in the same float arithmetic, as mergekit (only when density < 1, which
    # returns the input unchanged before any check there).
    if d < 1.0 and (d + eps >= 1.0 or d - eps <= 0.0):
        raise ValueError(f"della: density ± epsilon must lie strictly inside (0, 1), got "
                         f"density {density!r} and epsilon {epsilon!r}")
    return d, eps


_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _della_probs(x: torch.Tensor, d: float, eps: float) -> torch.Tensor:
    cd = _compute_dtype(x.dtype)
    rows = x.reshape(1, -1) if x.dim() < 2 else x
    m = rows.shape[1]
    if m <= 1:
        return torch.full(x.shape, d, dtype=cd, device=x.device)
    p = torch.empty(rows.shape, dtype=cd, device=x.device)
    # Rows are ranked independently: a few at a time, so that the sort's keys, indices and
    # ranks (20 bytes an entry) stay block-sized for embedding-sized tensors.
    step = max(1, _DELLA_BLOCK // max(1, rows[0].numel()))
    for s in range(0, rows.shape[0], step):
        p[s:s + step] = _della_rank_probs(rows[s:s + step], d, eps, cd)
    return p.view(x.shape)


_DELLA_BLOCK = 1 << 20


def _della_rank_probs(rows: torch.Tensor, d: float, eps: float, cd: torch.dtype
                      ) -> torch.Tensor:
    m = rows.shape[1]
    # Stable sort: equal magnitudes are ranked by index (mergekit's sort is unstable). The
    # bits of a non-negative float, read as a signed integer of its width, order as the float
    # does; sorting them is a quarter faster than sorting the floats (2816 × 1024: 0.10 s
    # against 0.135 s on one core), and DELLA's time is its sort.
    mags = rows.abs()
    bits = _INT_OF_WIDTH.get(mags.element_size())
    keys = mags.view(bits) if bits is not None else mags
    order = torch.sort(keys, dim=1, stable=True).indices
    view = [1] * rows.dim()
    view[1] = m
    positions = torch.arange(m, device=rows.device).view(view).expand(order.shape)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    # r / (m - 1) · 2 · epsilon + (density - epsilon), in mergekit's order of operations.
    return divide_(ranks.to(cd), m - 1).mul_(2.0).mul_(eps).add_(d - eps)


def della(
    x: torch.Tensor,
    *,
    density: float,
    epsilon: float = 0.15,
    seed: int,
    rescale: bool | str = True,
) -> torch.Tensor:
    """DELLA's MagPrune (Deep et al., 2024) for one task vector, as mergekit 0.1.5.

    Each entry is kept with its probability p_i from :func:`della_probabilities` (larger
    magnitude, higher probability, p_i in [density - epsilon, density + epsilon]). The
    mask is ``u < p`` with u = ``torch.rand`` in float32 on the CPU from
    ``torch.Generator().manual_seed(seed)`` (the convention of
    :func:`tvrecipe.ops.sparsify.dare`, so the mask does not depend on the device or order; the
    ``l1`` rescale's norms are sums on the device, which a GPU adds in another order).
    ``rescale``: ``True`` or ``"l1"`` scales the kept entries to x's L1 norm, as mergekit
    0.1.x does (:func:`l1_rescale`); ``"inverse"`` divides each kept entry by its p_i (the
    paper's rule, under which E[della(x)] = x); ``False`` keeps them as they are.
    density 1 returns an exact copy (mergekit skips the sparsifier then). With epsilon 0
    every p_i = density, and ``rescale="inverse"`` gives the bytes of ``dare`` with the
    same seed.

    Args:
        x: A floating-point tensor (not modified).
        density: Mean keep probability, in (0, 1].
        epsilon: Spread of the probabilities (mergekit's default 0.15); density ± epsilon
            must lie strictly inside (0, 1) when density < 1.
        seed: Generator seed in [0, 2**64), e.g. from
            :func:`tvrecipe.ops.sparsify.derive_seed`.
        rescale: ``True``/``"l1"``, ``"inverse"`` or ``False``.

    Returns:
        A new tensor of x's shape, dtype and device (zeros are +0.0).

    Raises:
        ValueError: On density or epsilon out of range, a seed outside [0, 2**64) or an
            unknown rescale.
        TypeError: If x is not a floating-point tensor or an argument has the wrong type.
    """
    x = _check_float_tensor(x, "della")
    d, eps = _check_della_args(density, epsilon)
    seed = _check_seed(seed, "della")
    if not any(rescale is r or (isinstance(r, str) and rescale == r) for r in _DELLA_RESCALES):
        raise ValueError(f"della: rescale must be true, false, 'l1' or 'inverse', "
                         f"got {rescale!r}")
    if d >= 1.0 or x.numel() == 0:
        return x.clone()
    cd = _compute_dtype(x.dtype)
    xc = x.to(cd)
    # By blocks of rows (a row's probabilities depend on that row alone, and the generator
    # draws one number per entry in order, so a block continues where the last one ended):
    # the probabilities, draws and mask of a block at a time, into one result, with the
    # bytes of the whole tensor's (an embedding's p, draws, mask and result side by side
    # were 13 times its float32 size).
    rows, values = (x.reshape(1, -1), xc.reshape(1, -1)) if x.dim() < 2 else (x, xc)
    out = torch.empty(values.shape, dtype=cd, device=x.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    zero = torch.zeros((), dtype=cd, device=x.device)
    step = max(1, _DELLA_BLOCK // max(1, rows[0].numel()))
    for s in range(0, rows.shape[0], step):
        block = values[s:s + step]
        p = (_della_rank_probs(rows[s:s + step], d, eps, cd) if rows.shape[1] > 1
             else torch.full(block.shape, d, dtype=cd, device=x.device))
        keep = torch.rand(block.shape, generator=gen, dtype=torch.float32).to(x.device, cd) < p
        torch.where(keep, block / p if rescale == "inverse" else block, zero,
                    out=out[s:s + step])
    out = out.view(x.shape)
    if rescale is True or rescale == "l1":
        out = _l1_rescale(xc, out, L1_RESCALE_EPS, in_place=True)
    return out.to(x.dtype)


# --------------------------------------------------------------------------------------
# Model Stock


def model_stock_t(deltas: Sequence[torch.Tensor], *, filter_wise: bool = False
                  ) -> torch.Tensor:
    """Model Stock's interpolation ratio t = k cos / (1 + (k - 1) cos) (Jang et al., 2024).

    cos is the mean over the k(k-1)/2 pairs of fine-tunes of
    clip(⟨Δ_i, Δ_j⟩ / max(‖Δ_i‖ ‖Δ_j‖, 1e-6), -1, 1), computed over the whole flattened
    tensor, or with ``filter_wise`` over the last dimension separately (each row of a
    matrix; for a conv kernel each last-axis vector, as mergekit's ``dim=-1``; 1-D and 0-dim
    tensors stay whole). Where |1 + (k - 1) cos| < 1e-6 (opposed deltas) t = 0, which keeps
    the base (mergekit 0.1.5's guard). Computed in float32 (float64 for float64 inputs).

    Args:
        deltas: k ≥ 2 task vectors Δ_i = θ_i - θ₀ of one tensor (not modified).
        filter_wise: One t per row instead of one per tensor.

    Returns:
        t: a 0-dim tensor, or with ``filter_wise`` on a tensor of 2+ dimensions a tensor of
        shape ``deltas[0].shape[:-1] + (1,)`` (broadcastable against the deltas).

    Raises:
        ValueError: On fewer than 2 deltas or deltas of different shape/dtype/device.
        TypeError: On a non-floating-point delta or a non-bool filter_wise.
    """
    xs = _check_inputs(deltas, "model_stock")
    if len(xs) < 2:
        raise ValueError(f"model_stock: needs at least 2 fine-tuned deltas (the angle is "
                         f"between pairs of them), got {len(xs)}")
    filter_wise = _check_bool(filter_wise, "filter_wise", "model_stock")
    cd = _compute_dtype(xs[0].dtype)
    if filter_wise and xs[0].dim() >= 2:
        vs = [x.to(cd) for x in xs]
    else:
        vs = [x.reshape(-1).to(cd) for x in xs]
    with serial():  # sums whose bytes would depend on the thread count
        norms = [torch.linalg.vector_norm(v, dim=-1) for v in vs]
    cosines = []
    for i in range(len(vs)):
        for j in range(i + 1, len(vs)):
            den = (norms[i] * norms[j]).clamp(min=STOCK_NORM_EPS)
            prod = vs[i] * vs[j]
            with serial():
                dot = prod.sum(dim=-1)
            cosines.append((dot / den).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean(dim=0)
    k = len(vs)
    den = 1 + (k - 1) * cos
    singular = den.abs() < STOCK_SINGULAR_EPS
    t = torch.where(singular, torch.zeros_like(cos),
                    (k * cos) / torch.where(singular, torch.ones_like(den), den))
    return t.unsqueeze(-1) if t.dim() > 0 else t


def model_stock_t_from_gram(gram: torch.Tensor) -> float:
    """Model Stock's ratio t from the k × k Gram matrix G_ij = ⟨Δ_i, Δ_j⟩ of one tensor's deltas.

    The same rule as :func:`model_stock_t` (cosines clipped to [-1, 1] with norm products
    floored at 1e-6, their mean over pairs, t = 0 where |1 + (k - 1) cos| < 1e-6), from a Gram
    matrix accumulated over row blocks (``tvrecipe.ops.gram_update``), so that the deltas never
    need to be held whole.

    Raises:
        ValueError: If ``gram`` is not a square matrix of at least 2 × 2.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 2:
        raise ValueError(f"model_stock: needs the Gram matrix of at least 2 deltas, got shape "
                         f"{list(gram.shape)}")
    g = gram.double()
    k = g.shape[0]
    norms = g.diagonal().clamp(min=0).sqrt()
    cos = [float((g[i, j] / (norms[i] * norms[j]).clamp(min=STOCK_NORM_EPS)).clamp(-1, 1))
           for i in range(k) for j in range(i + 1, k)]
    c = sum(cos) / len(cos)
    den = 1 + (k - 1) * c
    return 0.0 if abs(den) < STOCK_SINGULAR_EPS else k * c / den


def model_stock_merge(deltas: Sequence[torch.Tensor], *, t: float | torch.Tensor
                      ) -> torch.Tensor:
    """t · mean_i Δ_i, the Model Stock delta for a known ratio t (a number, or per row).

    Computed in float32 (float64 for float64 inputs), returned in the deltas' dtype.
    """
    xs = _check_inputs(deltas, "model_stock")
    cd = _compute_dtype(xs[0].dtype)
    mean = xs[0].to(cd, copy=True)
    for x in xs[1:]:
        mean.add_(x.to(cd))
    divide_(mean, len(xs))
    return (t * mean).to(xs[0].dtype)


def model_stock(deltas: Sequence[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """Model Stock merge of the fine-tunes' deltas: t · mean_i Δ_i, so θ = θ₀ + result.

    Equals mergekit's t · mean_i θ_i + (1 - t) θ₀ minus θ₀ (up to rounding), with t from
    :func:`model_stock_t`. mergekit requires a base and at least two other models.

    Args:
        deltas: k ≥ 2 task vectors Δ_i = θ_i - θ₀ of one tensor (not modified).
        filter_wise: One t per row (last dimension) instead of one per tensor.

    Returns:
        A new tensor of the deltas' shape, dtype and device.

    Raises:
        ValueError: On fewer than 2 deltas or deltas of different shape/dtype/device.
        TypeError: On a non-floating-point delta or a non-bool filter_wise.
    """
    return model_stock_merge(deltas, t=model_stock_t(deltas, filter_wise=filter_wise))


# --------------------------------------------------------------------------------------
# mergekit's generalized task arithmetic combine step


def consensus_merge(
    inputs: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    majority: str | None = "total",
    normalize: bool = True,
) -> torch.Tensor:
    """Combine (sparsified) task vectors as mergekit's generalized task arithmetic does.

    With c_i = w_i x_i:

    * ``majority=None`` (task_arithmetic, dare_linear, breadcrumbs, della_linear):
      Σ_i c_i, divided by Σ_i w_i when ``normalize`` unless |Σ_i w_i| < 1e-8;
    * ``"total"`` (ties, dare_ties, breadcrumbs_ties, della): γ = +1 where Σ_i c_i ≥ 0,
      else -1; ``"count"``: γ = +1 where Σ_i sign(c_i) ≥ 0, else -1 (ties go to +1, unlike
      :func:`tvrecipe.ops.sparsify.ties`, which gives 0 or uses the total). With
      A = {i : sign(c_i) = γ} (zeros never agree), the result is Σ_A c_i, divided by Σ_A w_i
      (signed weights, as mergekit; 1 where that is 0) when ``normalize``.

    No trimming happens here: sparsify first (:func:`tvrecipe.ops.sparsify.trim` for ties,
    :func:`breadcrumbs`, :func:`della`, :func:`tvrecipe.ops.sparsify.dare` with
    :func:`l1_rescale`), and apply ``lambda`` with ``scale``/``apply`` after. Computed in
    float32 (float64 for float64 inputs), products rounded before the sums, as mergekit.

    Args:
        inputs: Task vectors of one tensor, same shape, dtype and device (not modified).
        weights: One finite weight per input (required, as in mergekit).
        majority: ``"total"``, ``"count"`` or None (no sign election).
        normalize: Divide by the (agreeing) weights' sum.

    Returns:
        A new tensor of the inputs' shape, dtype and device (zeros are +0.0).

    Raises:
        ValueError: On no inputs, inputs of different shape/dtype/device, a weights length
            that differs from the inputs, a non-finite weight or an unknown majority.
        TypeError: On a non-tensor or non-floating-point input or a non-numeric weight.
    """
    xs = _check_inputs(inputs, "consensus_merge")
    if weights is None:
        raise ValueError("consensus_merge: weights are required, one per input")
    ws = _check_weights(weights, len(xs), "consensus_merge")
    if majority is not None and majority not in _MAJORITIES:
        raise ValueError(f"consensus_merge: majority must be 'total', 'count' or None, "
                         f"got {majority!r}")
    normalize = _check_bool(normalize, "normalize", "consensus_merge")
    dtype = xs[0].dtype
    cd = _compute_dtype(dtype)
    # The weights as mergekit holds them (a tensor of the compute dtype): c_i = x_i * w_i
    # rounds each product once before any sum.
    wt = [torch.tensor(w, dtype=cd, device=xs[0].device) for w in ws]
    flat = [x.reshape(-1) for x in xs]
    out = torch.empty(flat[0].numel(), dtype=dtype, device=xs[0].device)
    # Entry by entry: blocks of the flattened inputs give the same bytes as whole tensors,
    # and bound the scratch (about six block-sized buffers) for embedding-sized tensors.
    for s in range(0, out.numel(), _CONSENSUS_BLOCK):
        e = min(s + _CONSENSUS_BLOCK, out.numel())
        out[s:e] = _consensus_block([f[s:e] for f in flat], wt, majority, normalize, cd)
    return out.view(xs[0].shape)


_CONSENSUS_BLOCK = 1 << 20


def _consensus_block(xs: list[torch.Tensor], wt: list[torch.Tensor], majority: str | None,
                     normalize: bool, cd: torch.dtype) -> torch.Tensor:
    def contribution(i: int) -> torch.Tensor:
        return xs[i].to(cd) * wt[i]

    if majority is None:
        num = contribution(0)
        for i in range(1, len(xs)):
            num += contribution(i)
        if normalize:
            # Summed on the CPU, in order: a GPU's reduction groups 5 or more weights otherwise.
            den = torch.stack([w.cpu() for w in wt]).sum()
            if den.abs().item() >= NO_CONSENSUS_EPS:
                num /= den.to(num.device)
        return num.add_(0.0)

    # Pass 1: the statistic whose sign elects γ.
    stat = torch.zeros(xs[0].shape, dtype=cd, device=xs[0].device)
    for i in range(len(xs)):
        c = contribution(i)
        stat += c if majority == "total" else c.sign()
    gamma = torch.where(stat >= 0, 1.0, -1.0).to(cd)
    del stat
    # Pass 2: sum the agreeing contributions and their (signed) weights.
    num = torch.zeros_like(gamma)
    den = torch.zeros_like(gamma) if normalize else None
    for i in range(len(xs)):
        c = contribution(i)
        agree = c.sign() == gamma
        num += torch.where(agree, c, 0.0)
        if den is not None:
            den += torch.where(agree, wt[i], 0.0)
    if den is not None:
        den[den == 0] = 1.0
        num /= den
    return num.add_(0.0)
