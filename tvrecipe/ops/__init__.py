"""Kernels: pure torch functions on concrete tensors, one registry ``OPS`` keyed by op name.

Each kernel takes the YAML field names of its op as keyword arguments.
"""

from tvrecipe.ops.arithmetic import apply, extract, mean, negate, scale, sum
from tvrecipe.ops.basis import assign, cluster, cosine_from_gram, gram_update, merge_cluster
from tvrecipe.ops.decompose import decompose
from tvrecipe.ops.parallel import parallel_map
from tvrecipe.ops.sparsify import dare, derive_seed, prune, ties

OPS = {
    "extract": extract,
    "scale": scale,
    "negate": negate,
    "sum": sum,
    "mean": mean,
    "apply": apply,
    "ties": ties,
    "dare": dare,
    "prune": prune,
    "cluster_basis": merge_cluster,
    "decompose": decompose,
}

__all__ = ["OPS", "apply", "assign", "cluster", "cosine_from_gram", "dare", "decompose",
           "derive_seed", "extract", "gram_update", "mean", "merge_cluster", "negate",
           "parallel_map", "prune", "scale", "sum", "ties"]
