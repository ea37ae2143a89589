"""Load a recipe file: YAML with positions, section-by-section validation, all problems at once."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from tvrecipe.errors import Problem, RecipeError
from tvrecipe.spec.models import (
    NAME_PATTERN,
    REF_PATTERN,
    ModelSpec,
    OutputSpec,
    Recipe,
    Settings,
)
from tvrecipe.spec.registry import ops, recipe_model
from tvrecipe.spec.yamlsource import KeyPath, SourceMap, load_yaml
from tvrecipe.store.remote import RemotePath, url_scheme

SUPPORTED_VERSIONS = (1,)


def did_you_mean(word: str, choices: Any) -> str | None:
    """A ``did you mean 'x'?`` hint for the closest of ``choices``, or None."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe with what is needed to locate problems and resolve paths.

    Attributes:
        recipe: The validated, frozen recipe.
        path: The recipe file.
        source: Positions of its keys, for error messages.
        text_sha256: Hash of the recipe file's bytes, line endings as LF
            (:func:`recipe_text_sha256`): the lock's record of the recipe.
        content_sha256: Hash of what the recipe says, not how it is written
            (:func:`recipe_content_sha256`): the provenance output files carry.
    """

    recipe: Recipe
    path: Path
    source: SourceMap
    text_sha256: str
    content_sha256: str = ""

    @property
    def root(self) -> Path:
        """The folder that relative paths in the recipe are relative to."""
        return self.path.resolve().parent

    def resolve(self, path: str) -> Path | RemotePath:
        """A recipe path made absolute against the recipe's folder; a URL (``s3://…``,
        ``hf://…``) as a :class:`~tvrecipe.store.remote.RemotePath`."""
        if url_scheme(path) is not None:
            return RemotePath(path)
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.root / p


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


# (and the models a field takes besides a plain value: a union names its branch by class)
_BRANCHES = {"int", "str", "float", "bool", "literal['auto']", "EnergyRank", "ModelCardSpec",
             "RankEnergy"}


def _branch_only(loc: tuple) -> bool:
    """True when ``loc`` names only a union's branches (``int``, ``list[str]``, ...), no key."""
    return all(isinstance(p, str) and ("[" in p or p.startswith(("constrained-", "function-"))
                                       or p in _BRANCHES) for p in loc)


def _convert(exc: ValidationError, prefix: KeyPath, model: type[BaseModel],
             smap: SourceMap) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = (*prefix, *loc)
        kind = err["type"]
        hint = None
        if kind == "extra_forbidden":
            field = loc[-1] if loc else "?"
            owner = model
            allowed = _field_names(owner) if len(loc) == 1 else []
            message = f"unknown field {field!r}"
            hint = did_you_mean(field, allowed) if allowed else None
            if allowed and not hint:
                hint = "allowed fields: " + ", ".join(a for a in allowed if a != "op")
            if path == ("settings", "cluster"):
                hint = ("where a recipe runs is not part of the recipe, and changes none of its "
                        "outputs: pass `tvrecipe run RECIPE --cluster ADDRESS` instead")
        elif kind == "missing":
            field = loc[-1] if loc else "?"
            message = f"missing required field {field!r}"
            info = model.model_fields.get(str(field)) if len(loc) == 1 else None
            if info is None and len(loc) == 1:
                info = next((f for f in model.model_fields.values() if f.alias == field), None)
            if info is not None and info.description:
                hint = info.description
        elif (isinstance(err.get("input"), list) and hasattr(model, "accepts")
              and kind != "value_error"  # a validator of a list field has its own message
              and loc and loc[0] in model.model_fields and _branch_only(loc[1:])
              and loc[0] not in model.per_tensor and loc[0] not in model.accepts):
            field = loc[0]
            message = f"'{field}' takes one value, not a list"
            varying = [f for f in model.per_tensor if f != field]
            hint = ("a value that varies by tensor (a layer gradient or rules) is accepted by "
                    + ", ".join(f"'{f}'" for f in varying) if varying else
                    "this op takes no values that vary by tensor")
        elif (isinstance(err.get("input"), list) and hasattr(model, "accepts")
              and kind == "string_type" and len(loc) == 1 and loc[0] in model.accepts):
            # (a field that takes a list of references accepts one, so its errors name items)
            field = loc[0]
            message = f"'{field}' takes one reference, not a list"
            hint = ("name one model, step or member (STEP.MEMBER); to use several, combine "
                    "them in a step first (e.g. sum) and name that step")
        elif kind in ("model_type", "dict_type") and model is ModelSpec and not loc:
            message = (f"a model is a path, or a mapping such as {{path: ./ckpt/x, kind: "
                       f"task_vector}}, got {err['input']!r}")
        elif kind == "literal_error":
            message = f"{err['msg']}, got {err['input']!r}"
            expected = re.findall(r"'([^']*)'", err["msg"])
            hint = did_you_mean(err["input"], expected) if isinstance(err["input"], str) else None
            if loc == ("compute_dtype",) and err["input"] in ("bfloat16", "float16"):
                hint = (f"kernels compute in float32 or float64; to write {err['input']}, give "
                        f"the output dtype: {err['input']}")
        elif kind == "string_pattern_mismatch":  # (the pattern itself says little to a user)
            keys = [p for p in loc if isinstance(p, str) and not _branch_only((p,))]
            field = keys[-1] if keys else None  # (an item of a list: the list's field)
            info = model.model_fields.get(field) if len(keys) == 1 else None
            message = (f"{err['input']!r} is not a valid value of '{field}'" if field
                       else err["msg"])
            hint = info.description if info is not None and info.description else None
            pattern = (err.get("ctx") or {}).get("pattern")
            if pattern in (NAME_PATTERN, REF_PATTERN):
                hint = ("a name starts with a letter or '_' and uses letters, digits, '_' and "
                        "'-'" + ("; a member is NAME.MEMBER" if pattern == REF_PATTERN else ""))
            if field == "sha256" and str(err["input"]).lower().startswith("sha256:"):
                hint = "write the 64 hex digits alone, without 'sha256:'"
        elif kind == "value_error":  # our validators' messages already show the input
            message = err["msg"].removeprefix("Value error, ")
        else:
            message = err["msg"]
            if "input" in err and not isinstance(err["input"], (dict, list)):
                message += f", got {err['input']!r}"
        # A union's branch names (e.g. 'int', 'list[str]') are not keys the user wrote.
        clean = tuple(p for p in path if not _branch_only((p,)))
        problems.append(smap.problem(clean, message, hint))
    return _one_per_union(problems)


_EXPECTED = "Input should be "


def _one_per_union(problems: list[Problem]) -> list[Problem]:
    """A union reports one error per branch. Where a branch said something specific (here or
    deeper in the value), the others' "Input should be a valid <type>" only add noise; where
    the branches only say what they expected ("a valid number", "a valid list", "'auto'"),
    one problem says all of it: ``Input should be 'auto' or a valid integer, got 1.5``."""
    def generic(p: Problem) -> bool:
        return p.message.startswith(_EXPECTED + "a valid")

    def expected(p: Problem) -> bool:  # "Input should be <what>, got …" and nothing else
        return p.message.startswith(_EXPECTED) and (generic(p) or p.message.startswith(
            _EXPECTED + "'"))

    def deeper(path: str | None) -> bool:
        return path is not None and any(
            q.key_path and q.key_path != path and q.key_path.startswith((path + ".", path + "["))
            for q in problems)

    by_path: dict[str | None, list[Problem]] = {}
    for p in problems:
        by_path.setdefault(p.key_path, []).append(p)
    kept, seen = [], set()
    for path, group in by_path.items():
        if deeper(path):
            group = [p for p in group if not generic(p)]
        if any(not expected(p) for p in group):
            group = [p for p in group if not generic(p)]
        elif len(group) > 1:
            wanted, got = [], ""
            for p in group:
                what, _, rest = p.message[len(_EXPECTED):].partition(", ")
                if what not in wanted:
                    wanted.append(what)
                got = got or (rest[rest.rindex("got "):] if "got " in rest else "")
            text = ", ".join(wanted[:-1]) + " or " + wanted[-1] if len(wanted) > 1 else wanted[0]
            first = group[0]
            group = [replace(first, message=f"{_EXPECTED}{text}"
                                                        + (f", {got}" if got else ""))]
        for p in group:
            if (p.key_path, p.message) not in seen:
                seen.add((p.key_path, p.message))
                kept.append(p)
    return kept


def _validate(model: type[BaseModel], value: Any, prefix: KeyPath, smap: SourceMap,
              problems: list[Problem]) -> BaseModel | None:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        problems.extend(_convert(exc, prefix, model, smap))
        return None


def _check_mapping(value: Any, prefix: KeyPath, what: str, smap: SourceMap,
                   problems: list[Problem]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(smap.problem(prefix, f"{what} must be a mapping of name: value, "
                                             f"got {type(value).__name__}"))
        return {}
    for name in value:
        if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
            problems.append(smap.problem(
                (*prefix, name), f"invalid name {name!r}",
                "names start with a letter or '_' and use letters, digits, '_' and '-' (no dots)"))
    return value


def _takes_bool(annotation: Any) -> bool:
    """Whether a field's type admits a boolean (anywhere in a union or Annotated)."""
    return annotation is bool or any(_takes_bool(a) for a in get_args(annotation))


def validate_data(data: Any, smap: SourceMap, problems: list[Problem]) -> Recipe | None:
    """Validate parsed YAML against the recipe models, appending every problem found."""
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        problems.append(smap.problem((), f"a recipe must be a YAML mapping, got {got}",
                                     "start from a bundled recipe: `tvrecipe new --list`, then `tvrecipe new NAME > my.yaml`"))
        return None
    if "tvrecipe" not in data and "merge_method" in data:
        # A mergekit config given where a recipe goes: one problem, and how to convert it.
        from pathlib import PurePath
        given = PurePath(smap.file)
        recipe = given.with_name(f"{given.stem}.recipe.yaml")
        problems.append(smap.problem(
            ("merge_method",), "this is a mergekit config, not a tvrecipe recipe",
            f"convert it once with `tvrecipe import {given} -o {recipe}`, then run {recipe}: "
            "its comments say what each mergekit field became"))
        return None
    top = _field_names(Recipe)
    for key in data:
        if key not in top:
            problems.append(smap.problem((key,), f"unknown top-level key {key!r}",
                                         did_you_mean(key, top) or "allowed: " + ", ".join(top)))
    version = data.get("tvrecipe")
    if "tvrecipe" not in data:
        problems.append(smap.problem((), "missing 'tvrecipe:' format version",
                                     "add 'tvrecipe: 1' as the first line"))
    elif isinstance(version, bool) or version not in SUPPORTED_VERSIONS:  # (true == 1)
        shown = str(version).lower() if isinstance(version, bool) else repr(version)
        hint = ("this tvrecipe reads 'tvrecipe: 1'" if str(version) not in
                {str(v) for v in SUPPORTED_VERSIONS} else
                "the version is a number: write it without quotes, 'tvrecipe: 1'")
        problems.append(smap.problem(("tvrecipe",), f"unsupported format version {shown}",
                                     hint))
    valid: dict[str, dict] = {"models": {}, "steps": {}, "outputs": {}, "broken": {}}
    if "settings" in data and data["settings"] is not None:
        _validate(Settings, data["settings"], ("settings",), smap, problems)
    for key, what in (("models", "models"), ("outputs", "outputs")):
        if key not in data:
            problems.append(smap.problem((), f"missing required section '{key}:'"))
    for name, spec in _check_mapping(data.get("models"), ("models",), "models", smap,
                                     problems).items():
        ok = _validate(ModelSpec, spec, ("models", name), smap, problems)
        valid["models" if ok else "broken"][name] = ok
    known = ops()
    for name, spec in _check_mapping(data.get("steps"), ("steps",), "steps", smap,
                                     problems).items():
        where = ("steps", name)
        if not isinstance(spec, dict):
            problems.append(smap.problem(where, "a step must be a mapping with an 'op' field",
                                         "e.g. {op: sum, inputs: [a, b]}"))
            continue
        op = spec.get("op")
        if op is None:
            problems.append(smap.problem(where, "step has no 'op'",
                                         "one of: " + ", ".join(known)))
        elif not isinstance(op, str) or op not in known:
            problems.append(smap.problem(
                (*where, "op"), f"unknown op {op!r}",
                did_you_mean(op, known) or "known ops: " + ", ".join(known)))
        else:
            cls = known[op]
            # YAML's true is 1 to Python: a field that takes no boolean refuses one (pydantic
            # would read `k: true` as 1).
            booleans = [k for k, v in spec.items() if isinstance(v, bool) and k in
                        cls.model_fields and not _takes_bool(cls.model_fields[k].annotation)]
            for k in booleans:
                problems.append(smap.problem((*where, k), "expected a number, got "
                                             + str(spec[k]).lower()))
            ok = None if booleans else _validate(cls, spec, where, smap, problems)
            if ok is not None:
                valid["steps"][name] = ok
                continue
        valid["broken"][name] = None
    for name, spec in _check_mapping(data.get("outputs"), ("outputs",), "outputs", smap,
                                     problems).items():
        ok = _validate(OutputSpec, spec, ("outputs", name), smap, problems)
        if ok is not None:
            valid["outputs"][name] = ok
    if problems:
        # Keep what is valid, so that the compiler can still report reference and kind
        # problems in the rest of the recipe: all problems are reported together.
        smap.partial = (Recipe.model_construct(
            tvrecipe=1, name=None, description=None, settings=Settings(),
            models=valid["models"], steps=valid["steps"], outputs=valid["outputs"]),
            frozenset(valid["broken"]))
        return None
    try:
        return recipe_model().model_validate(data)
    except ValidationError as exc:  # pragma: no cover - the sections above catch everything
        problems.extend(_convert(exc, (), Recipe, smap))
        return None


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read, parse and validate a recipe file (schema only: references are checked by compile).

    Raises:
        RecipeError: with every problem found, each located by file:line:col and key path.
    """
    path = Path(path)
    data, smap, problems = load_yaml(path)
    recipe = validate_data(data, smap, problems)
    if problems or recipe is None:
        problems.sort(key=lambda p: (p.line or 0, p.column or 0))
        error = RecipeError(problems)
        if smap.partial is not None:
            partial, broken = smap.partial
            error.partial = (LoadedRecipe(partial, path, smap, ""), broken)
        raise error
    return LoadedRecipe(recipe=recipe, path=path, source=smap,
                        text_sha256=recipe_text_sha256(path.read_bytes()),
                        content_sha256=recipe_content_sha256(data))


def recipe_text_sha256(text: bytes) -> str:
    """SHA-256 of a recipe file's bytes with CRLF line endings read as LF: a checkout that
    converts line endings (git's autocrlf) is the same recipe."""
    return hashlib.sha256(text.replace(b"\r\n", b"\n")).hexdigest()


def recipe_content_sha256(data: object) -> str:
    """SHA-256 of a parsed recipe as canonical JSON (keys sorted): comments, layout, quoting
    and the order of keys change it not, so output files, which carry it, keep their bytes
    through such edits."""
    text = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
