"""Compile a recipe into a step DAG: resolve references, check kinds, find cycles, prune to outputs."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from tvrecipe.errors import InputError, MissingPackage, Problem, RecipeError, about
from tvrecipe.spec.kinds import CHECKPOINT, DECOMPOSITION, VECTOR, VECTORS, ValueType
from tvrecipe.spec.load import LoadedRecipe, did_you_mean, load_recipe
from tvrecipe.spec.models import ModelSpec, OutputSpec, StepSpec
from tvrecipe.spec.registry import ops
from tvrecipe.store.output import overlap

__all__ = ["CHECKPOINT", "DECOMPOSITION", "VECTOR", "VECTORS", "Compiled", "CompiledStep",
           "Entry", "Resolved", "TypeContext", "ValueType", "compile_recipe", "load_and_compile"]

VECTORS_INDEX = "vectors.json"


@dataclass(frozen=True)
class Resolved:
    """A resolved reference: the node it names, the path inside it, and the resulting type."""

    text: str
    node: str
    selector: tuple[str, ...]
    type: ValueType


@dataclass(frozen=True)
class Entry:
    """One task vector among the expanded ``inputs`` of a multi-input op."""

    ref: Resolved
    member: str | None      # member of a vectors value, None for a vector
    part: str | None        # 'shared' / 'unique' for members of a decomposition
    name: str               # display name, used to match weight mappings
    field_index: int        # index of the reference in the user's list


@dataclass
class CompiledStep:
    """One step ready to schedule."""

    name: str
    op: str
    spec: StepSpec
    refs: dict[str, list[Resolved]]
    entries: dict[str, list[Entry]]
    type: ValueType
    weights: list[Any] | None = None  # one per entry: a number, a gradient or rules


def duplicate_names(entries: list[Entry]) -> tuple[str, str, str] | None:
    """The first member name two entries share, with the two references (``tv.t1``) that
    give it, or None when every name is distinct."""
    seen: dict[str, str] = {}
    for e in entries:
        explicit = e.member is None or (e.ref.selector and e.ref.selector[-1] == e.member)
        text = e.ref.text if explicit else f"{e.ref.text}.{e.member}"
        if e.name in seen:
            return e.name, seen[e.name], text
        seen[e.name] = text
    return None


@dataclass
class TypeContext:
    """What an op's ``output_type`` sees at compile time.

    Attributes:
        name: The step's name.
        refs: Its resolved references by field.
        known: Member names learnt at run time for this step (``k: auto``), or None.
    """

    name: str
    refs: dict[str, list[Resolved]]
    _entries: dict[str, list[Entry] | None]
    _problem: Any
    known: tuple[str, ...] | None = None
    _steps: dict[str, CompiledStep] = field(default_factory=dict)

    def step(self, node: str) -> CompiledStep | None:
        """The compiled step a reference names (compiled before this one), or None."""
        return self._steps.get(node)

    def entries(self, fld: str) -> list[Entry] | None:
        """The expanded entries of a field; None when a set's members are not known yet."""
        return self._entries.get(fld)

    def problem(self, fld: str, message: str, hint: str | None = None) -> None:
        """Report a problem located at one of the step's fields."""
        self._problem(("steps", self.name, fld), message, hint)

    def distinct_names(self, fld: str, entries: list[Entry] | None, what: str) -> bool:
        """Report two entries of the same name where the op names its results by them
        (``what``: which results, for the message); True when all names are distinct."""
        twice = duplicate_names(entries or [])
        if twice is None:
            return True
        name, first, second = twice
        self.problem(fld, f"two inputs are named {name!r} ({first} and {second}), and {what} "
                          "are named by input: one would replace the other",
                     "give them distinct names: extract takes a mapping, such as "
                     "finetuned: {t1_b: t1}")
        return False


@dataclass
class Compiled:
    """A compiled recipe: the graph, the steps outputs need, in order, and the outputs."""

    loaded: LoadedRecipe
    graph: nx.DiGraph
    models: dict[str, ModelSpec]
    model_types: dict[str, ValueType]
    steps: dict[str, CompiledStep]          # only needed steps, in topological order
    outputs: dict[str, tuple[OutputSpec, Resolved]]
    unused: list[str] = field(default_factory=list)
    targets: tuple[str, ...] = ()  # extra nodes kept without an output (for inspect)

    def reads(self) -> dict[str, set[tuple[str, ...]]]:
        """Node -> the selectors its readers (steps and outputs) take of it: ``()`` for the
        whole value, ``("unique",)`` for ``parts.unique``, ``("unique", "a")`` for
        ``parts.unique.a``. Nodes nothing reads are absent."""
        found: dict[str, set[tuple[str, ...]]] = {}
        for step in self.steps.values():
            for refs in step.refs.values():
                for r in refs:
                    found.setdefault(r.node, set()).add(r.selector)
        for _spec, res in self.outputs.values():
            found.setdefault(res.node, set()).add(res.selector)
        return found

    def type_of(self, node: str) -> ValueType:
        """The value type of a model or step."""
        return self.model_types[node] if node in self.model_types else self.steps[node].type


def member_type(vt: ValueType, part: str) -> ValueType | str:
    """The type of ``.part`` of a value of type ``vt``, or what is wrong, as
    ``"<what> (<hint>)"`` to follow the value's name."""
    if vt.kind == DECOMPOSITION and part in ("shared", "unique"):
        return ValueType(VECTORS, vt.members)
    if vt.kind == VECTORS:
        if vt.members is not None and part not in vt.members:
            hint = did_you_mean(part, vt.members) or "members: " + ", ".join(vt.members)
            return f"has no member {part!r} ({hint})"
        return ValueType(VECTOR)
    hint = ("a decomposition has .shared and .unique" if vt.kind == DECOMPOSITION
            else f"a {vt.kind} has no members")
    return f"is a {vt.kind} and has no member {part!r} ({hint})"


def _number(value: Any) -> Any:
    """A weight as a float when it is one number (gradients and rules stay as they are)."""
    return float(value) if isinstance(value, (int, float)) else value


def _op_for(mistake: str) -> type[StepSpec] | None:
    """The op a hint suggests for a mistake (its ``suggested_for``), if one is registered."""
    return next((c for c in ops().values() if c.suggested_for == mistake), None)


def lora_base(models: dict[str, ModelSpec], name: str) -> str | None:
    """The checkpoint model a ``kind: lora`` model's deltas are over: its ``base``, else the
    model named ``base`` when there is one."""
    spec = models[name]
    if spec.base is not None:
        return spec.base
    return "base" if "base" in models and name != "base" else None


def _model_type(loaded: LoadedRecipe, spec: ModelSpec) -> ValueType:
    if spec.kind == "checkpoint":
        return ValueType(CHECKPOINT)
    if spec.kind == "lora":
        return ValueType(VECTOR)
    index = loaded.resolve(spec.path) / VECTORS_INDEX
    if index.is_file():
        return ValueType(VECTORS, _index_members(index))
    return ValueType(VECTOR)


def _index_members(index: Any) -> tuple[str, ...]:
    """The members a vectors folder's ``vectors.json`` lists (each in MEMBER.safetensors).

    Raises:
        InputError: The file is not JSON, or its ``members`` is not a non-empty list of
            distinct names.
    """
    fix = ("it is the index tvrecipe writes beside a vectors output, "
           '{"members": ["math", "code"], ...}: write the folder again with tvrecipe run')
    try:
        data = json.loads(index.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{index}: not valid JSON ({exc}); {fix}") from None
    members = data.get("members") if isinstance(data, dict) else None
    if (not isinstance(members, list) or not members
            or not all(isinstance(m, str) and m and "/" not in m for m in members)
            or len(set(members)) != len(members)):
        raise InputError(f"{index}: 'members' is not a list of distinct member names "
                         f"(got {members!r}); {fix}")
    return tuple(members)


class _Compiler:
    def __init__(self, loaded: LoadedRecipe, known_members: dict[str, tuple[str, ...]],
                 broken: frozenset[str] = frozenset(), targets: tuple[str, ...] = ()):
        self.loaded = loaded
        self.targets = targets
        self.broken = broken
        self.known = known_members
        self.recipe = loaded.recipe
        self.src = loaded.source
        self.problems: list[Problem] = []
        self.types: dict[str, ValueType | None] = {}
        # task_vector models whose folder does not exist (yet): their kind and members are
        # not known, which a mistake about them says (name -> path)
        self.unwritten: dict[str, str] = {}

    def problem(self, path: tuple, message: str, hint: str | None = None) -> None:
        self.problems.append(self.src.problem(path, message, hint))

    def resolve(self, text: str, where: tuple) -> Resolved | None:
        head, *rest = text.split(".")
        if head not in self.types:
            # (steps are typed in dependency order: a typo's candidates are every name)
            names = {*self.types, *self.recipe.models, *self.recipe.steps}
            if where[:1] == ("steps",):
                names.discard(where[1])  # (not itself)
            self.problem(where, f"unknown reference {text!r}",
                         did_you_mean(head, names) or "known names: " + ", ".join(sorted(names)))
            return None
        vt = self.types[head]
        if vt is None:  # depends on a broken or cyclic step: already reported
            return None
        for i, part in enumerate(rest):
            found = member_type(vt, part)
            if isinstance(found, str):
                if head in self.unwritten:
                    self.not_written(head, where)
                    return None
                message, _, hint = found.partition(" (")
                self.problem(where, f"{'.'.join([head, *rest[:i]])!r} {message}",
                             hint[:-1] or None)
                return None
            vt = found
        return Resolved(text, head, tuple(rest), vt)

    def not_written(self, name: str, where: tuple) -> None:
        self.problem(where, f"{name!r} is a task_vector model whose folder "
                            f"{self.unwritten[name]} does not exist yet, so its members are not "
                            "known", "run the recipe that writes it first")

    def check_kind(self, step: str, spec: StepSpec, fld: str, res: Resolved, where: tuple
                   ) -> bool:
        allowed = spec.accepts[fld]
        op = spec.op
        if res.type.kind in allowed:
            return True
        if res.node in self.unwritten:
            self.not_written(res.node, where)
            return False
        hint = None
        if res.type.kind == VECTORS and VECTOR in allowed:
            combine = _op_for("combine")
            if combine is not None:
                takes = next(f for f, k in combine.accepts.items() if VECTORS in k)
                hint = (f"combine the set first, e.g. {{op: {combine.op_name()}, {takes}: "
                        f"{res.text}}}, or pick a member")
        elif res.type.kind == DECOMPOSITION:
            hint = f"use {res.text}.shared or {res.text}.unique"
        elif res.type.kind == CHECKPOINT:
            make = _op_for("task_vector")
            if make is not None:
                fields = ", ".join(f"{f}: ..." for f in make.accepts)
                hint = f"{make.op_name()} a task vector first: {{op: {make.op_name()}, {fields}}}"
        self.problem(where, f"step {step!r} ({op}) wants {' or '.join(sorted(allowed))} in "
                            f"'{fld}', but {res.text!r} is a {res.type.kind}", hint)
        return False

    def expand(self, refs: list[Resolved]) -> list[Entry] | None:
        entries = []
        for i, r in enumerate(refs):
            if r.type.kind in (VECTOR, CHECKPOINT):
                entries.append(Entry(r, None, None, r.text.split(".")[-1], i))
            elif r.type.kind == VECTORS:
                if r.type.members is None:
                    return None
                entries += [Entry(r, m, None, m, i) for m in r.type.members]
            elif r.type.kind == DECOMPOSITION:
                if r.type.members is None:
                    return None
                for part in ("shared", "unique"):
                    entries += [Entry(r, m, part, f"{part}.{m}", i) for m in r.type.members]
        return entries

    def weights(self, name: str, step: Any, entries: list[Entry]) -> list[Any] | None:
        # The plain (JSON) form: per-tensor values stay gradients or rule lists, resolved for
        # each tensor when the step runs.
        w = step.model_dump(mode="json")["weights"]
        where = ("steps", name, "weights")
        if w is None:
            return [1.0] * len(entries)
        if isinstance(w, (int, float)):
            return [float(w)] * len(entries)
        if isinstance(w, list):
            listed = getattr(step, step.weighted)
            n_refs = len(listed) if isinstance(listed, list) else 1
            if len(w) != n_refs:
                self.problem(where, f"{len(w)} weights for {n_refs} "
                                    f"input{'s' if n_refs != 1 else ''}",
                             f"give one weight per entry of '{step.weighted}' (a weight for a set "
                             "applies to each member), a mapping, or one number")
                return None
            return [_number(w[e.field_index]) for e in entries]
        names = [e.name for e in entries]
        twice = duplicate_names(entries)
        if twice:
            self.problem(where, f"a weight mapping cannot tell apart the inputs named "
                                f"{twice[0]!r} ({twice[1]} and {twice[2]})",
                         "give the weights as a list, one per entry of "
                         f"'{step.weighted}', or one number")
            return None
        unknown = [k for k in w if k not in names]
        for k in unknown:
            self.problem((*where, k), f"weight for {k!r}, which is not among the inputs",
                         did_you_mean(k, names) or "inputs: " + ", ".join(names))
        missing = [n for n in names if n not in w]
        if missing:
            self.problem(where, "no weight for " + ", ".join(missing),
                         "a weight mapping names every input")
        return None if unknown or missing else [_number(w[n]) for n in names]

    def run(self) -> Compiled:
        recipe = self.recipe
        graph = nx.DiGraph()
        for name, spec in recipe.models.items():
            try:  # a task_vector model's vectors.json, which may be at a URL
                self.types[name] = _model_type(self.loaded, spec)
            except (InputError, MissingPackage) as exc:
                raise about(exc, f"model {name!r} ({spec.path})") from None
            folder = self.loaded.resolve(spec.path)
            if spec.kind == "task_vector" and isinstance(folder, Path) and not folder.exists():
                self.unwritten[name] = spec.path
            graph.add_node(name, kind="model")
        for name, spec in recipe.models.items():
            if spec.kind != "lora":
                continue
            base = lora_base(recipe.models, name)
            if base is None:
                self.problem(("models", name), "a `kind: lora` model needs the checkpoint it was "
                             "trained on", "add `base: MODEL` naming that checkpoint model")
            elif base not in recipe.models or recipe.models[base].kind != "checkpoint":
                self.problem(("models", name, "base") if spec.base else ("models", name),
                             f"base {base!r} of this adapter is not a checkpoint model of the "
                             "recipe", "name the checkpoint the adapter was trained on")
        for name in self.broken:  # invalid entries: known names, problems already reported
            self.types[name] = None
        for name in recipe.steps:
            if name in recipe.models:
                self.problem(("steps", name), f"name {name!r} is used by a model and a step",
                             "rename one of them: models and steps share one namespace")
            graph.add_node(name, kind="step", op=recipe.steps[name].op)
        for name, step in recipe.steps.items():
            for _, text in step.references():
                head = text.split(".")[0]
                if head in graph:
                    graph.add_edge(head, name)
        cyclic: set[str] = set()
        for cycle in nx.simple_cycles(graph):
            cyclic.update(cycle)
            first = min(cycle, key=lambda n: (self.src.locate(("steps", n))[0] or 0, n))
            # Start at the step written first, so the message does not depend on hash order.
            at = cycle.index(first)
            cycle = cycle[at:] + cycle[:at]
            chain = " -> ".join([*cycle, cycle[0]])
            self.problem(("steps", first), f"cycle: {chain}",
                         "a step cannot depend on itself, directly or through others")
        for name in cyclic:  # known names whose problem is reported: no "unknown reference"
            self.types[name] = None
        acyclic = graph.subgraph([n for n in graph if n not in cyclic])
        steps: dict[str, CompiledStep] = {}
        for name in nx.lexicographical_topological_sort(acyclic):
            if name not in recipe.steps:
                continue
            step = recipe.steps[name]
            refs: dict[str, list[Resolved]] = {}
            ok = True
            for path, text in step.references():
                where = ("steps", name, *path)
                res = self.resolve(text, where)
                if res is None or not self.check_kind(name, step, path[0], res, where):
                    ok = False
                    continue
                refs.setdefault(path[0], []).append(res)
            if not ok:
                self.types[name] = None
                continue
            entries = {f: self.expand(rs) for f, rs in refs.items()}
            vt = step.output_type(TypeContext(name, refs, entries, self.problem,
                                              self.known.get(name), steps))
            self.types[name] = vt
            weights = None
            if step.weighted and entries.get(step.weighted) is not None:
                weights = self.weights(name, step, entries[step.weighted])
            steps[name] = CompiledStep(name, step.op, step, refs,
                                       {k: v for k, v in entries.items() if v is not None},
                                       vt, weights)
        outputs: dict[str, tuple[OutputSpec, Resolved]] = {}
        paths: dict[str, str] = {}
        for name, out in recipe.outputs.items():
            where = ("outputs", name, "from")
            res = self.resolve(out.from_, where)
            if res is not None and res.type.kind == DECOMPOSITION:
                self.problem(where, f"{out.from_!r} is a decomposition; write one part",
                             f"from: {out.from_}.shared or from: {out.from_}.unique")
                res = None
            if res is not None and out.format == "peft" and res.type.kind != VECTOR:
                self.problem(("outputs", name, "format"),
                             f"`format: peft` writes one vector; {out.from_!r} is a "
                             f"{res.type.kind}",
                             "take its task vector first: {op: extract, base: ..., finetuned: "
                             f"{out.from_}}}" if res.type.kind == CHECKPOINT else
                             "write one member (from: NAME.MEMBER) or combine the set with sum")
                res = None
            if (res is not None and not isinstance(out.model_card, bool)
                    and out.format != "peft" and res.type.kind != CHECKPOINT):
                what = "a vectors set" if res.type.kind == VECTORS else f"a {res.type.kind}"
                self.problem(("outputs", name, "model_card"),
                             f"a model card is written for checkpoint and `format: peft` "
                             f"outputs only, and {out.from_!r} is {what}",
                             "remove model_card: this output gets no card")
            if (res is not None and "shard_size" in out.model_fields_set
                    and (res.type.kind == VECTORS or out.format == "peft")):
                what = ("a vectors set, written one file per member" if out.format != "peft"
                        else "a peft adapter, written as one adapter_model.safetensors")
                self.problem(("outputs", name, "shard_size"),
                             f"shard_size applies to checkpoint and vector outputs; "
                             f"{out.from_!r} is {what}",
                             "remove shard_size" if out.format == "peft" else
                             "remove shard_size, or write members one by one "
                             f"(from: {out.from_}.MEMBER), which are sharded")
            if out.base is not None and (out.base not in recipe.models
                                         or recipe.models[out.base].kind != "checkpoint"):
                self.problem(("outputs", name, "base"),
                             f"base {out.base!r} is not a checkpoint model of the recipe",
                             did_you_mean(out.base, recipe.models)
                             or "name the checkpoint the deltas are over")
            if out.copy_files_from is not None and out.copy_files_from not in recipe.models:
                self.problem(("outputs", name, "copy_files_from"),
                             f"unknown model {out.copy_files_from!r}",
                             did_you_mean(out.copy_files_from, recipe.models))
            target = str(self.loaded.resolve(out.path).resolve())
            own = str((self.loaded.root / ".tvrecipe").resolve())  # (a link: where it leads)
            if overlap(Path(target), Path(own)) in ("is", "is inside"):
                self.problem(("outputs", name, "path"),
                             f"output path {out.path!r} is in tvrecipe's own folder {own} (its "
                             "cache and hash memo), which a run writes and replaces",
                             "write the output elsewhere")
            for model, spec in recipe.models.items():  # (run checks again, through links)
                place = self.loaded.resolve(spec.path)
                place = getattr(place, "local", place)  # (a file:// URL: its local path)
                if not isinstance(place, Path):
                    continue  # a URL
                relation = overlap(Path(target), place)
                if relation is not None:
                    self.problem(("outputs", name, "path"),
                                 f"output path {out.path!r} {relation} the input {model!r} "
                                 f"({spec.path}); writing it could destroy the input",
                                 "choose an output path outside every input")
            if target in paths:
                self.problem(("outputs", name, "path"),
                             f"output path {out.path!r} is also used by output {paths[target]!r}")
            else:
                # One output inside another's folder: replacing the outer one would delete
                # the inner one, and the inner one cannot be written before the outer is.
                for other, other_name in paths.items():
                    inner, outer = ((target, other) if target.startswith(other + os.sep)
                                    else (other, target) if other.startswith(target + os.sep)
                                    else (None, None))
                    if inner is not None:
                        self.problem(("outputs", name, "path"),
                                     f"output path {out.path!r} nests with output "
                                     f"{other_name!r}'s: {inner} lies inside {outer}",
                                     "write each output to a folder of its own, side by side")
            paths[target] = name
            if res is not None:
                outputs[name] = (out, res)
        if self.problems:
            self.problems.sort(key=lambda p: (p.line or 0, p.column or 0))
            raise RecipeError(self.problems)
        needed: set[str] = set()
        for node in [res.node for _, res in outputs.values()] + [
                t for t in self.targets if t in graph and t not in cyclic]:
            needed |= {node, *nx.ancestors(graph, node)}
        ordered = {n: s for n, s in steps.items() if n in needed}
        unused = [n for n in recipe.steps if n not in needed]
        model_types = {n: t for n, t in self.types.items() if n in recipe.models}
        return Compiled(self.loaded, graph, dict(recipe.models), model_types, ordered,
                        outputs, unused, self.targets)


def compile_recipe(loaded: LoadedRecipe,
                   known_members: dict[str, tuple[str, ...]] | None = None,
                   targets: tuple[str, ...] = ()) -> Compiled:
    """Check every reference and kind and order the steps outputs need.

    Args:
        loaded: The validated recipe.
        known_members: Member names learnt at run time (``cluster_basis`` with ``k: auto``),
            by step name; references to them are checked once they are known.
        targets: Steps to keep even when no output needs them (``tvrecipe inspect``).

    Raises:
        RecipeError: with every problem found (unknown references, kind mismatches, cycles,
            names used twice, bad weights), each located in the recipe file.
    """
    return _Compiler(loaded, known_members or {}, targets=targets).run()


def load_and_compile(path: str | Path, targets: tuple[str, ...] = ()) -> Compiled:
    """Load, validate and compile a recipe file, reporting every problem of every phase at once.

    When the schema check finds problems, the valid rest of the recipe is still compiled so
    that unknown references, kind mismatches and cycles elsewhere are reported with them.

    Raises:
        RecipeError: with all problems, sorted by position in the file.
    """
    try:
        loaded = load_recipe(path)
    except RecipeError as exc:
        if exc.partial is None:
            raise
        partial, broken = exc.partial
        compiler = _Compiler(partial, {}, broken)
        try:
            compiler.run()
        except RecipeError as more:
            problems = [p for p in more.problems if "section" not in p.message]
            exc = RecipeError(sorted([*exc.problems, *problems],
                                     key=lambda p: (p.line or 0, p.column or 0)))
        raise exc from None
    return compile_recipe(loaded, targets=targets)
