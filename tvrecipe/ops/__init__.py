"""Kernels: pure torch functions on concrete tensors.

Each kernel takes the YAML field names of its op as keyword arguments; the op's definition
(``tvrecipe.steps``) names its kernel.
"""

from tvrecipe.ops.arithmetic import apply, extract, mean, negate, scale, sum
from tvrecipe.ops.basis import assign, cluster, cosine_from_gram, gram_update, merge_cluster
from tvrecipe.ops.decompose import decompose
from tvrecipe.ops.parallel import parallel_map
from tvrecipe.ops.sparsify import dare, derive_seed, prune, ties

__all__ = ["apply", "assign", "cluster", "cosine_from_gram", "dare", "decompose",
           "derive_seed", "extract", "gram_update", "mean", "merge_cluster", "negate",
           "parallel_map", "prune", "scale", "sum", "ties"]
