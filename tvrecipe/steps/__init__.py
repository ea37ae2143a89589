"""The built-in ops, one module each; importing this package registers them.

The order is the order of ``tvrecipe ops``, the schema's op union and docs/ops.md.
"""

import importlib

BUILTIN = ("extract", "scale", "negate", "sum", "mean", "ties", "dare", "prune",
           "cluster_basis", "assign", "decompose", "apply",
           "linear", "slerp", "breadcrumbs", "della", "model_stock", "consensus")

for _name in BUILTIN:
    importlib.import_module(f"tvrecipe.steps.{_name}")
