"""Kernels: pure torch functions on concrete tensors.

Each kernel takes the YAML field names of its op as keyword arguments; the op's definition
(``tvrecipe.steps``) names its kernel.
"""

from tvrecipe.ops.arithmetic import (
    all_finite,
    apply,
    divide,
    divide_,
    extract,
    mean,
    negate,
    scale,
    sum,
)
from tvrecipe.ops.basis import assign, cluster, cosine_from_gram, gram_update, merge_cluster
from tvrecipe.ops.decompose import decompose
from tvrecipe.ops.deferred import Deferred
from tvrecipe.ops.merges import (
    breadcrumbs,
    consensus_merge,
    della,
    l1_rescale,
    linear,
    model_stock,
    model_stock_merge,
    model_stock_t,
    model_stock_t_from_gram,
    slerp,
    slerp_coefficients,
    slerp_combine,
)
from tvrecipe.ops.parallel import parallel_map
from tvrecipe.ops.sparsify import dare, derive_seed, prune, ties

__all__ = ["Deferred", "all_finite", "apply", "assign", "breadcrumbs", "cluster", "consensus_merge", "cosine_from_gram",
           "dare", "decompose", "della", "derive_seed", "divide", "divide_", "extract", "gram_update", "l1_rescale",
           "linear", "mean", "merge_cluster", "model_stock", "model_stock_merge",
           "model_stock_t", "model_stock_t_from_gram", "negate", "parallel_map", "prune",
           "scale", "slerp", "slerp_coefficients", "slerp_combine", "sum",
           "ties"]
