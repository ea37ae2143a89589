"""YAML loading that remembers where every key and item came from (file:line:col)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tvrecipe.errors import Problem, RecipeError

KeyPath = tuple[str | int, ...]


def format_key_path(path: KeyPath) -> str:
    """Render ``("steps", "merged", "inputs", 2)`` as ``steps.merged.inputs[2]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass
class SourceMap:
    """Positions of the nodes of one YAML document, by key path.

    Attributes:
        file: The file name as shown to users.
        positions: 1-based (line, column) of each key (for mapping entries) or item.
    """

    file: str
    positions: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)
    partial: Any = None  # the valid part of a recipe that has problems (see load_recipe)

    def locate(self, path: KeyPath) -> tuple[int | None, int | None]:
        """Line and column of ``path``, or of its nearest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.positions:
                return self.positions[path]
            path = path[:-1]
        return (1, 1) if self.positions else (None, None)

    def problem(self, path: KeyPath, message: str, hint: str | None = None) -> Problem:
        """A :class:`Problem` located at ``path``."""
        line, col = self.locate(path)
        return Problem(message, file=self.file, line=line, column=col,
                       key_path=format_key_path(path) or None, hint=hint)


def _walk(node: yaml.Node, path: KeyPath, smap: SourceMap, problems: list[Problem],
          walked: set[int] | None = None) -> None:
    walked = set() if walked is None else walked
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        # An alias reuses a node: walk each once, or a recursive or nested alias never ends.
        if id(node) in walked:
            return
        walked.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            sub = (*path, key)
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(Problem(
                    f"key {key!r} appears twice (first at line {seen[key]}); YAML keeps only the last",
                    file=smap.file, line=line, column=key_node.start_mark.column + 1,
                    key_path=format_key_path(sub), hint="remove or rename one of them"))
            seen[key] = line
            smap.positions[sub] = (line, key_node.start_mark.column + 1)
            _walk(value_node, sub, smap, problems, walked)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = (*path, i)
            smap.positions[sub] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _walk(item, sub, smap, problems, walked)


def _codepoint(character: int | str) -> int:
    return character if isinstance(character, int) else ord(character)


def _line_col(text: str | bytes, position: int) -> tuple[int, int]:
    """1-based line and column of a character (or byte) offset."""
    nl = "\n" if isinstance(text, str) else b"\n"
    before = text[:position]
    return before.count(nl) + 1, position - (before.rfind(nl) + 1) + 1


def load_yaml(path: Path, display_name: str | None = None) -> tuple[Any, SourceMap, list[Problem]]:
    """Parse a YAML file safely, returning its data, a source map and duplicate-key problems.

    Only ``yaml.SafeLoader`` is used: a recipe can never construct Python objects.

    Raises:
        RecipeError: the file cannot be read or is not valid YAML (with line and column).
    """
    name = display_name or str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise RecipeError(Problem(f"recipe file not found: {path}")) from None
    except OSError as exc:
        raise RecipeError(Problem(f"cannot read recipe: {exc.strerror}", file=name)) from None
    if b"\0" in raw[:4096]:  # text has no NUL: a weights file or another binary file
        what = ("safetensors weights" if Path(path).suffix == ".safetensors"
                else "a binary file")
        raise RecipeError(Problem(
            f"this is {what}, not a recipe (YAML text)", file=name,
            hint="give the recipe file, e.g. `tvrecipe run recipe.yaml`; a model's folder goes "
                 "in the recipe's models:"))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, col = _line_col(raw, exc.start)
        raise RecipeError(Problem(
            f"byte 0x{raw[exc.start]:02x} is not UTF-8", file=name, line=line, column=col,
            hint="save the recipe as UTF-8")) from None
    smap = SourceMap(name)
    problems: list[Problem] = []
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or "invalid YAML"
        ctx = f" ({exc.context})" if exc.context else ""
        message, hint = (f"YAML syntax error: {what}{ctx}",
                         "check indentation, colons and quotes around this spot")
        if "another document" in what:  # (several `---` documents: not a syntax error)
            message = ("this file holds several YAML documents (separated by ---); it is "
                       "read as one")
            hint = "split it into one file per document (a mergekit-multi file: one config per file)"
        raise RecipeError(Problem(
            message, file=name, line=mark.line + 1 if mark else None,
            column=mark.column + 1 if mark else None, hint=hint)) from None
    except yaml.reader.ReaderError as exc:
        line, col = _line_col(text, exc.position)
        raise RecipeError(Problem(
            f"character U+{_codepoint(exc.character):04X} is not allowed in YAML", file=name,
            line=line,
            column=col, hint="remove it or quote it in a string")) from None
    except yaml.YAMLError as exc:
        raise RecipeError(Problem(f"YAML error: {exc}", file=name)) from None
    except RecursionError:
        raise RecipeError(Problem("a YAML alias refers to itself", file=name,
                                  hint="remove the recursive '*alias'")) from None
    if node is not None:
        smap.positions[()] = (node.start_mark.line + 1, node.start_mark.column + 1)
        _walk(node, (), smap, problems)
    return data, smap, problems
