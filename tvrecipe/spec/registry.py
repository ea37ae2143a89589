"""The op registry: every op's definition, registered once, and the recipe model built from it."""

from __future__ import annotations

import importlib
from typing import Annotated, Any, Union

from pydantic import Field, create_model

from tvrecipe.spec.models import Name, Recipe, StepSpec

_OPS: dict[str, type[StepSpec]] = {}
_BUILTINS_LOADED = False
_RECIPE: dict[tuple, type[Recipe]] = {}


def register(cls: type[StepSpec]) -> type[StepSpec]:
    """Add an op (a :class:`StepSpec` subclass) to the recipe language; usable as a decorator.

    Raises:
        ValueError: another op already has this name, or the class is no complete op.
    """
    name = cls.op_name()
    if name in _OPS and _OPS[name] is not cls:
        raise ValueError(f"op {name!r} is registered already (by {_OPS[name].__qualname__})")
    missing = [f for f in cls.accepts if f not in cls.model_fields]
    if missing:
        raise ValueError(f"op {name!r} accepts references in {missing}, which are no fields")
    if cls.weighted is not None and "weights" not in cls.model_fields:
        raise ValueError(f"op {name!r} weighs {cls.weighted!r} but has no 'weights' field")
    _OPS[name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove an op (tests that define their own)."""
    _OPS.pop(name, None)


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        importlib.import_module("tvrecipe.steps")  # its modules register the built-in ops


def ops() -> dict[str, type[StepSpec]]:
    """Every registered op by name, built-in ones first, in registration order."""
    _load_builtins()
    return dict(_OPS)


def op_class(name: str) -> type[StepSpec] | None:
    """The definition of the op called ``name``, or None."""
    _load_builtins()
    return _OPS.get(name)


def recipe_model() -> type[Recipe]:
    """The recipe model over the ops registered now: ``steps`` is their discriminated union."""
    classes = tuple(ops().values())
    model = _RECIPE.get(classes)
    if model is None:
        union = Annotated[Union[classes], Field(discriminator="op")]  # noqa: UP007
        model = _RECIPE[classes] = create_model(
            "Recipe", __base__=Recipe, __doc__=Recipe.__doc__,
            steps=(dict[Name, union], Field(default_factory=dict,
                                            description="Named operations, in any order.")))
    return model


def kernel(cls: type[StepSpec]) -> Any:
    """The function an op's ``kernel`` names (``module:function``).

    Looked up on every call, not kept: a module attribute replaced later (a test's spy) is
    the one called. ``import_module`` (not ``sys.modules``) because members are evaluated on
    several threads: one that finds the module while another is still importing it must wait
    for the import to finish, not read a half-initialised module.
    """
    module, _, attr = cls.kernel.partition(":")
    return getattr(importlib.import_module(module), attr)
