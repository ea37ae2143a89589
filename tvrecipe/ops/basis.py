"""Task-vector bases by clustering (Zeng et al., arXiv 2502.01015): Gram, clustering, merge."""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "MERGES",
    "Clustering",
    "assign",
    "cluster",
    "cosine_from_gram",
    "gram_update",
    "merge_cluster",
]

MERGES = ("mean", "sum", "ties")

# Each float32 partial dot product covers this many elements; the partials are summed in
# float64. One float32 matmul over a whole flattened tensor (16M elements) drifts by ~4e-3
# relative; 2048-element partials keep the error below ~1e-6 of |τ_i| |τ_j| (one partial)
# and near 1e-8 over many. On 2 CPU cores, 8 × 4096² float32 inputs took 70 ms, against
# 50 ms for their weighted sum, 140 ms to convert them from bf16, 1.4 s as one float64 matmul.
_PARTIAL = 2048
# Rows of one tensor that start at multiples of this many bytes are read in place (see
# _rows_of_one); TensorContext.stacked lays a set's members out so.
ROW_ALIGN = 64
# Elements of the staging buffer (n rows of copied blocks): bounds extra memory per call to
# about 16 MiB on the CPU, whatever the tensor size; the GPU gets bigger blocks for fewer
# kernel launches.
_BUFFER_CPU = 1 << 22
_BUFFER_GPU = 1 << 24
# Eigengaps of the normalised Laplacian (eigenvalues in [0, 2]) closer than this count as
# ties, and a gap no larger than this counts as no gap, so rounding noise in the eigensolver
# cannot flip the choice of k between machines.
_GAP_TIE = 1e-9
# k: auto keeps a split only if pairs in the same cluster are, on average, at least this many
# times as similar as pairs in different clusters (the affinity of 0 for opposed tasks).
_CONTRAST = 2.0


def gram_update(gram: torch.Tensor, deltas: Sequence[torch.Tensor]) -> None:
    """Add the Gram matrix of one tensor's task-vector deltas to ``gram``, in place.

    Called once per tensor of the model, it accumulates ``G_ij = τ_iᵀ τ_j`` over all tensors
    without ever holding a whole task vector. Blocks of the flattened deltas are copied into a
    small staging buffer (no n × numel copy), or read in place when the deltas are 64-byte
    aligned rows of one CPU float32 tensor (the same products; see
    :func:`_rows_of_one`), and multiplied there: on the CPU in float32, as
    2048-element partial products summed in float64 (error below about 1e-6 of
    ``|τ_i| |τ_j|``, so cosines to about 1e-6); on other devices (where float32 matmuls may
    run in TF32) in float64 throughout. Float64 deltas are always handled in float64.

    Args:
        gram: Running n × n float64 CPU tensor, updated in place.
        deltas: The n deltas of one tensor (any floating dtype, any shape, one device), in
            task order.

    Raises:
        ValueError: If ``gram`` is not n × n float64 on the CPU, or the deltas differ in
            size or device.
        TypeError: If a delta is not floating point.
    """
    import torch

    from tvrecipe.ops.parallel import serial

    n = len(deltas)
    if gram.dtype != torch.float64 or gram.device.type != "cpu" or gram.shape != (n, n):
        raise ValueError(
            f"gram must be a {n}x{n} float64 CPU tensor for {n} deltas, got "
            f"{tuple(gram.shape)} {gram.dtype} on {gram.device}"
        )
    if n == 0:
        return
    flat = [d.reshape(-1) for d in deltas]
    numel, device = flat[0].numel(), flat[0].device
    for i, f in enumerate(flat):
        if not f.is_floating_point():
            raise TypeError(f"delta {i} has dtype {f.dtype}; task vectors must be floating")
        if f.numel() != numel:
            raise ValueError(f"delta {i} has {f.numel()} elements, delta 0 has {numel}")
        if f.device != device:
            raise ValueError(f"delta {i} is on {f.device}, delta 0 is on {device}")
    if numel == 0:
        return
    if device.type not in ("cpu", "cuda"):
        # Backends such as MPS have no float64; their tensors are small enough to copy.
        flat, device = [f.cpu() for f in flat], torch.device("cpu")

    on_cpu = device.type == "cpu"
    exact = not on_cpu or any(f.dtype == torch.float64 for f in flat)
    work = torch.float64 if exact else torch.float32
    acc = torch.zeros((n, n), dtype=torch.float64, device=device)
    n_partials = numel // _PARTIAL
    if n_partials:
        per_block = max(1, (_BUFFER_CPU if on_cpu else _BUFFER_GPU) // (n * _PARTIAL))
        # Laid out (partial, task, element) so one bmm yields every partial Gram at once:
        # a view of the deltas when they are float32 rows of one tensor
        # (TensorContext.stacked), else copies in a staging buffer. The products are the same.
        # (Float32 on the CPU only: float64 rows through strides gave other last bits than
        # staged on an Intel avx512f CPU, and on a GPU no one has checked.)
        rows = (_rows_of_one(flat) if on_cpu and work == torch.float32
                and flat[0].dtype == work else None)
        buf = None if rows is not None else torch.empty(
            (min(per_block, n_partials), n, _PARTIAL), dtype=work, device=device)
        for first in range(0, n_partials, per_block):
            count = min(per_block, n_partials - first)
            lo, hi = first * _PARTIAL, (first + count) * _PARTIAL
            if rows is not None:
                block = rows[:, lo:hi].view(n, count, _PARTIAL).transpose(0, 1)
            else:
                block = buf[:count]
                for i, f in enumerate(flat):
                    block[:, i, :].copy_(f[lo:hi].view(count, _PARTIAL))
            partial = torch.bmm(block, block.transpose(1, 2))
            with serial():  # (a sum's bytes would depend on the thread count)
                acc += partial.sum(0, dtype=torch.float64)
    done = n_partials * _PARTIAL
    if done < numel:
        tail = torch.stack([f[done:] for f in flat]).to(torch.float64)
        acc += tail @ tail.T
    # The float32 products of (i, j) and (j, i) may round differently; keep G symmetric.
    gram += ((acc + acc.T) * 0.5).cpu()


def _rows_of_one(flat: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The n × numel view of flat tensors that are rows of one tensor, one after the other
    at a stride of whole ``ROW_ALIGN`` bytes from an address aligned to it, or None.

    Only such rows: the float32 products of a bmm depend on where its rows lie (over rows
    at odd addresses the same block gave other last bits than over its staged copy; rows
    64-byte aligned gave the staged copy's bits, at any stride and thread count).
    """
    first = flat[0]
    size, numel = first.element_size(), first.numel()
    step = (flat[1].data_ptr() - first.data_ptr() if len(flat) > 1
            else -(-numel * size // ROW_ALIGN) * ROW_ALIGN)  # (one row: any step will do)
    storage = first.untyped_storage().data_ptr()
    if (step < numel * size or step % ROW_ALIGN or first.data_ptr() % ROW_ALIGN
            or not all(f.is_contiguous() and f.dtype == first.dtype
                       and f.untyped_storage().data_ptr() == storage
                       and f.data_ptr() == first.data_ptr() + i * step
                       for i, f in enumerate(flat))):
        return None
    return first.as_strided((len(flat), numel), (step // size, 1))


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``S_ij = G_ij / sqrt(G_ii G_jj)`` from a Gram matrix.

    A zero task vector (``G_ii == 0``) has no direction: its similarity with every other task
    is 0. The diagonal is 1 for every task, the zero vector included, so ``S`` always has a
    unit diagonal; the diagonal never affects the clustering (:func:`cluster` sets it to 0
    in the affinity graph). Entries are clamped to [-1, 1] against rounding.

    Args:
        gram: n × n Gram matrix (from :func:`gram_update`).

    Returns:
        The n × n float64 similarity matrix, on the device of ``gram``.

    Raises:
        ValueError: If ``gram`` is not square, has non-finite entries, or has a negative
            diagonal entry.
    """
    import torch

    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square matrix, got shape {tuple(gram.shape)}")
    g = gram.to(torch.float64)
    if not bool(torch.isfinite(g).all()):
        raise ValueError("the Gram matrix of the task vectors holds NaN or Inf (so does a task "
                         "vector, let in by --allow-nonfinite?): cosine similarities need "
                         "finite task vectors; fix the checkpoint")
    diag = torch.diagonal(g)
    if bool((diag < 0).any()):
        raise ValueError("gram has a negative diagonal entry: it is not a Gram matrix")
    norms = diag.sqrt()
    denom = norms[:, None] * norms[None, :]
    s = torch.where(denom > 0, g / torch.where(denom > 0, denom, 1.0), 0.0)
    s.clamp_(-1.0, 1.0)
    s.fill_diagonal_(1.0)
    return s


@dataclass(frozen=True)
class Clustering:
    """Grouping of n tasks into k clusters.

    Attributes:
        labels: Cluster of each task, in task order. Clusters are numbered by their smallest
            member: cluster 0 holds task 0, cluster 1 the first task not in cluster 0, etc.
        members: Tasks of each cluster, ascending, in cluster order.
        k: Number of clusters (``len(members)``).
        affinity: ``max(S, 0)``: the similarity with negative entries set to 0, its unit
            diagonal kept. The graph that is clustered is this one with the diagonal set to 0.
        eigenvalues: Eigenvalues of the unnormalised Laplacian ``D − A`` of ``affinity``,
            ascending (for reference; the diagonal cancels in it).
        normalized_eigenvalues: Eigenvalues μ_1 ≤ … ≤ μ_n of the normalised Laplacian of the
            zero-diagonal affinity, each in [0, 2]: the ones ``k="auto"`` chooses from.
    """

    labels: tuple[int, ...]
    members: tuple[tuple[int, ...], ...]
    k: int
    affinity: tuple[tuple[float, ...], ...]
    eigenvalues: tuple[float, ...]
    normalized_eigenvalues: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form (lists and floats) for run reports and output metadata."""
        return {
            "k": self.k,
            "labels": list(self.labels),
            "members": [list(m) for m in self.members],
            "affinity": [list(row) for row in self.affinity],
            "eigenvalues": list(self.eigenvalues),
            "normalized_eigenvalues": list(self.normalized_eigenvalues),
        }


def cluster(
    similarity: Any,
    *,
    k: int | str = "auto",
    k_max: int | None = None,
    seed: int = 0,
) -> Clustering:
    """Spectral clustering of tasks by their whole-model cosine similarity.

    The affinity is ``A = max(S, 0)`` with its diagonal set to 0: negative similarities are
    clipped to 0, so opposed tasks are unrelated rather than negatively related (a graph with
    negative weights has no meaningful Laplacian; the paper's reference code did not clip),
    and a task's similarity with itself says nothing about grouping. Clustering uses
    scikit-learn's ``SpectralClustering`` on this precomputed affinity with
    ``assign_labels="cluster_qr"`` (no k-means restarts, invariant to the rotation of
    repeated eigenvectors that disconnected graphs produce); ``seed`` fixes the eigensolver's
    start vector. (scikit-learn's normalised Laplacian ignores the diagonal anyway, so the
    zero diagonal leaves its labels as they were with the unit diagonal.)

    With ``k="auto"``, k comes from the normalised Laplacian of the same graph,
    ``L_sym = I − D^{-1/2} A D^{-1/2}`` with ``D = diag(Σ_j A_ij)``; a task of degree 0
    (no positive similarity with any other task) gets a zero row and column instead, so it
    is a connected component of its own and, like every component, adds one eigenvalue 0.
    For its ascending eigenvalues μ_1 ≤ … ≤ μ_n (in [0, 2], unchanged by scaling A, so small
    cosines weigh as much as large ones) and gaps ``g_i = μ_{i+1} − μ_i``, with
    ``K = min(n − 1, k_max)``:

    1. ``k* = argmax_{2 ≤ i ≤ K} g_i``, the smallest such i on (near-)ties. k = 1 if K < 2
       or ``g_{k*}`` is 0 (no gap at all: every μ_i with i ≥ 2 equal).
    2. The graph is clustered into k* groups, and k = k* is kept if the mean affinity over
       the pairs of tasks in the same cluster is positive and at least twice the mean
       affinity over the pairs in different clusters; otherwise k = 1. When the largest
       off-diagonal affinity is below twice the smallest, no split can pass, and k = 1
       without clustering (same answer, no scikit-learn import).

    Why: g_1 is left out of step 1 because it is large whenever the groups are joined by any
    across-group similarity, as real task vectors always are (groups of cosine 0.035 inside
    and 0.013 across have g_1 > g_3, and the old rule, the largest gap of ``D − A``
    including the first, chose k = 1 there). Step 2 keeps noise from passing as structure:
    all-equal similarities give ``g_i = 0`` for every i ≥ 2, and near-equal ones give
    clusters hardly more similar inside than across. For k equal groups of m tasks with
    affinity w inside and a across, r = a/w and ``d = m − 1 + (n − m)·r``, the spectrum is
    0, ``1 − (m − 1 − m·r)/d`` (k − 1 times) and ``1 + 1/d`` (n − k times): step 1 finds k
    whenever a < w, and step 2 keeps it when w ≥ 2a.

    Edge cases: k is never n. k = 1 when n ≤ 2, when the affinity is 0 off the diagonal
    (mutually orthogonal or opposed tasks: nothing to cluster by; k = n keeps each alone),
    and when the graph has more than K connected components (no gap in range). A lone task
    has no affinity inside its own cluster, so one outlier comes out alone, but several may
    share a cluster or join a group. Pass k explicitly in such cases. An explicit
    1 < k < n with the affinity 0 off the diagonal is refused (ValueError): such a graph
    has no edge to cluster by, and scikit-learn's labels for it are not even repeatable.

    Args:
        similarity: n × n symmetric similarity (torch tensor, numpy array or nested lists),
            e.g. from :func:`cosine_from_gram`.
        k: Number of clusters (1 ≤ k ≤ n) or ``"auto"``.
        k_max: Largest k that ``"auto"`` may choose (default n − 1); ignored for an integer k.
        seed: Random state for the spectral embedding.

    Returns:
        The :class:`Clustering`. k = 1 and k = n are answered directly (all together, each
        task alone). If the label assignment leaves a cluster empty (rare), the result has
        fewer clusters than asked and a ``RuntimeWarning`` says so.

    Raises:
        ValueError: If ``similarity`` is not a finite symmetric square matrix, k is out of
            range or a string other than ``"auto"``, k_max < 1, or 1 < k < n is asked of
            tasks without a positive similarity between any two.
        TypeError: If k is neither an integer nor a string.
    """
    import numpy as np

    s = _as_matrix(similarity)
    n = s.shape[0]
    affinity = np.clip((s + s.T) * 0.5, 0.0, None)
    # Self-loops cancel in D − A, so the diagonal (1 for cosines) needs no special care.
    laplacian = np.diag(affinity.sum(axis=1)) - affinity
    eigenvalues = np.clip(np.linalg.eigvalsh(laplacian), 0.0, None)
    graph = affinity.copy()
    np.fill_diagonal(graph, 0.0)
    normalized = _normalized_spectrum(graph)

    raw: Sequence[int] | None = None
    if isinstance(k, str):
        if k != "auto":
            raise ValueError(f"k must be a positive integer or 'auto', got {k!r}")
        k_eff = _eigengap_k(normalized, k_max)
        if k_eff > 1 and not _contrast_possible(graph):
            k_eff = 1
        if k_eff > 1:
            raw = _spectral_labels(graph, k_eff, seed)
            if not _contrasted(graph, raw):
                k_eff, raw = 1, None
    else:
        if isinstance(k, bool):
            raise TypeError(f"k must be a positive integer or 'auto', got {k!r}")
        try:
            k_eff = operator.index(k)
        except TypeError:
            raise TypeError(f"k must be a positive integer or 'auto', got {k!r}") from None
        if not 1 <= k_eff <= n:
            raise ValueError(f"k={k_eff} is out of range for n={n} tasks: need 1 <= k <= {n}")
        if 1 < k_eff < n and not graph.any():
            # scikit-learn's embedding of a graph without edges is undefined: its labels
            # changed from one call to the next, in one process (scikit-learn 1.9.1).
            raise ValueError(
                f"k={k_eff}, but no two of the {n} task vectors have a positive cosine "
                "similarity (they are orthogonal or opposed), so there is nothing to cluster "
                "them by and any grouping would be arbitrary: use k: 1 (one basis vector of "
                f"all), k: {n} (each task alone) or k: auto (which gives 1 here)")

    if raw is not None:
        pass  # k: auto, already clustered for its step 2
    elif k_eff == 1:
        raw = [0] * n
    elif k_eff == n:
        raw = list(range(n))
    else:
        raw = _spectral_labels(graph, k_eff, seed)

    renumber: dict[int, int] = {}
    labels = tuple(renumber.setdefault(int(lab), len(renumber)) for lab in raw)
    members = tuple(tuple(t for t in range(n) if labels[t] == c) for c in range(len(renumber)))
    if len(members) != k_eff:
        warnings.warn(
            f"spectral clustering filled {len(members)} of the {k_eff} clusters asked for",
            RuntimeWarning,
            stacklevel=2,
        )
    return Clustering(
        labels=labels,
        members=members,
        k=len(members),
        affinity=tuple(tuple(float(x) for x in row) for row in affinity),
        eigenvalues=tuple(float(x) for x in eigenvalues),
        normalized_eigenvalues=tuple(float(x) for x in normalized),
    )


def _as_matrix(similarity: Any) -> Any:
    """Validated float64 numpy copy of a square, finite, symmetric similarity matrix."""
    import numpy as np

    if hasattr(similarity, "detach"):
        similarity = similarity.detach().to("cpu").double().numpy()
    s = np.array(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ValueError(f"similarity must be a non-empty square matrix, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("similarity has non-finite entries")
    if not np.allclose(s, s.T, rtol=0.0, atol=1e-6):
        raise ValueError("similarity must be symmetric")
    return s


def _normalized_spectrum(graph: Any) -> Any:
    """Ascending eigenvalues of ``D^{-1/2} (D − A) D^{-1/2}`` for a zero-diagonal affinity.

    On tasks of positive degree this is ``I − D^{-1/2} A D^{-1/2}``; a task of degree 0 gets
    ``D^{-1/2} = 0`` (the pseudo-inverse), hence a zero row and column and an eigenvalue 0 of
    its own, as every connected component has. Clipped to [0, 2] against rounding.
    """
    import numpy as np

    degree = graph.sum(axis=1)
    inv_sqrt = np.zeros_like(degree)
    np.divide(1.0, np.sqrt(degree), out=inv_sqrt, where=degree > 0)
    laplacian = (inv_sqrt[:, None] * (np.diag(degree) - graph)) * inv_sqrt[None, :]
    return np.clip(np.linalg.eigvalsh(laplacian), 0.0, 2.0)


def _eigengap_k(eigenvalues: Any, k_max: int | None) -> int:
    """Step 1 of ``k="auto"`` (see :func:`cluster`) on ascending normalised eigenvalues.

    ``k* = argmax_{2 ≤ i ≤ min(n − 1, k_max)} (μ_{i+1} − μ_i)``, the smallest i on near-ties;
    1 if that range is empty or its largest gap is 0.
    """
    n = len(eigenvalues)
    if k_max is not None and k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    limit = n - 1 if k_max is None else min(n - 1, k_max)
    if limit < 2:
        return 1
    # gaps[i - 1] = μ_{i+1} − μ_i in the 1-based notation of the docstring, for i = 2 … limit.
    gaps = [float(eigenvalues[i] - eigenvalues[i - 1]) for i in range(2, limit + 1)]
    best = max(gaps)
    if best <= _GAP_TIE:
        return 1
    return next(i + 2 for i, gap in enumerate(gaps) if gap >= best - _GAP_TIE)


def _contrasted(graph: Any, labels: Sequence[int]) -> bool:
    """Step 2 of ``k="auto"``: same-cluster pairs at least twice as similar as the others.

    Compares the mean affinity over pairs of distinct tasks with the same label with
    ``_CONTRAST`` times the mean over pairs with different labels (near-ties pass).
    """
    import numpy as np

    lab = np.asarray(labels)
    same = lab[:, None] == lab[None, :]
    np.fill_diagonal(same, False)
    across = lab[:, None] != lab[None, :]
    if not same.any() or not across.any():
        return False
    within_mean = float(graph[same].mean())
    across_mean = float(graph[across].mean())
    return within_mean > _GAP_TIE and within_mean >= _CONTRAST * across_mean - _GAP_TIE


def _contrast_possible(graph: Any) -> bool:
    """Whether any split of the tasks could pass step 2 of ``k="auto"`` (:func:`_contrasted`).

    A same-cluster mean is at most the largest off-diagonal affinity and an across-cluster
    mean at least the smallest, so if ``max < _CONTRAST · min`` (near-ties as in step 2) no
    labelling passes, and step 2 would answer k = 1 whatever the clustering: it is not run.
    """
    import numpy as np

    off = graph[~np.eye(graph.shape[0], dtype=bool)]
    largest, smallest = float(off.max()), float(off.min())
    return largest > _GAP_TIE and largest >= _CONTRAST * smallest - _GAP_TIE


def _spectral_labels(affinity: Any, k: int, seed: int) -> Sequence[int]:
    """Raw scikit-learn spectral-clustering labels for 1 < k < n."""
    from sklearn.cluster import SpectralClustering

    model = SpectralClustering(
        n_clusters=k, affinity="precomputed", assign_labels="cluster_qr", random_state=seed
    )
    with warnings.catch_warnings():
        # Unrelated task groups make a disconnected graph on purpose; the embedding is still
        # right (one indicator vector per component), so the warning is noise here.
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        return model.fit(affinity).labels_.tolist()


def merge_cluster(
    inputs: Sequence[torch.Tensor], *, merge: str = "mean", **options: Any
) -> torch.Tensor:
    """Merge one cluster's task vectors (of one tensor) into its basis vector.

    Args:
        inputs: The cluster members' deltas of one tensor.
        merge: ``"mean"`` (default), ``"sum"``, or ``"ties"`` (TIES-merging, see
            :func:`tvrecipe.ops.sparsify.ties`).
        **options: Options passed to ``ties``; ``mean`` and ``sum`` take none.

    Returns:
        A new tensor: the basis vector's part for this tensor.

    Raises:
        ValueError: If ``inputs`` is empty or ``merge`` is unknown.
        TypeError: If options are given to ``mean`` or ``sum``.
    """
    if merge not in MERGES:
        raise ValueError(f"unknown merge {merge!r}: expected 'mean', 'sum' or 'ties'")
    if not inputs:
        raise ValueError("merge_cluster needs at least one input")
    if merge == "ties":
        from tvrecipe.ops.sparsify import ties

        return ties(inputs, **options)
    if options:
        raise TypeError(f"merge {merge!r} takes no options, got {sorted(options)}")
    from tvrecipe.ops import arithmetic

    if merge == "mean":
        return arithmetic.mean(inputs)
    return arithmetic.sum(inputs, weights=[1.0] * len(inputs))


def assign(similarities: Any) -> int:
    """Index of the basis vector most similar to a new task vector.

    To get the similarities, accumulate with :func:`gram_update` the Gram of
    ``[τ_new, b_0, …, b_{k−1}]`` over all tensors and take ``cosine_from_gram(G)[0, 1:]``.

    Args:
        similarities: Cosine of the new task vector with each basis vector (1-D sequence,
            tensor or array).

    Returns:
        The argmax; the lowest index wins ties.

    Raises:
        ValueError: If ``similarities`` is empty, not 1-D, or has a NaN.
    """
    values = similarities.tolist() if hasattr(similarities, "tolist") else list(similarities)
    if not values or any(isinstance(v, (list, tuple)) for v in values):
        raise ValueError("similarities must be a non-empty 1-D sequence")
    floats = [float(v) for v in values]
    if any(math.isnan(v) for v in floats):
        raise ValueError("similarities contain NaN")
    best = 0
    for i, v in enumerate(floats):
        if v > floats[best]:
            best = i
    return best
