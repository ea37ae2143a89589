"""The built-in ops, one module each: importing this package imports every module in it, and
each module registers its op. Adding an op is adding a module here (and its tests).

Ops are registered in the order of their module names, which is the order of `tvrecipe ops`,
of the schema's op union and of docs/ops.md.
"""

import importlib
import pkgutil

BUILTIN = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)))

for _name in BUILTIN:
    importlib.import_module(f"{__name__}.{_name}")
