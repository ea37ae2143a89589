"""docs/errors.md lists every message tvrecipe shows a user, and every exit code.

The messages are found in the source, not in a hand-kept list: the test walks the syntax tree
of every module under ``tvrecipe/`` and collects the text of

* every ``X(...)`` where ``X`` is a subclass of :class:`tvrecipe.errors.TvrecipeError`
  (taken from the module, so a new family is covered without editing this test);
* every recipe problem, ``Problem(message, ..., hint=...)``;
* every ``click.BadParameter(...)`` and every ``click.echo(..., err=True)``;
* every warning (``....warnings.append(...)``, and any text that starts with ``warning:``);
* every ``ValueError``/``LookupError`` raised in the recipe models and per-tensor values
  (``tvrecipe/spec/models.py``, ``tvrecipe/spec/pertensor.py``, ``tvrecipe/steps/*.py``, and
  ``tvrecipe/exec/evaluate.py`` which wraps them): pydantic turns a validator's ValueError into
  a recipe error, and a step's into a runtime error;
* every call of a helper that forwards one of its arguments into one of the above (such as
  ``SourceMap.problem``, ``StepContext.problem``, ``_corrupt`` or ``CacheCorrupt``): the
  helpers are found by following parameters, until nothing new is found. Since a parameter
  may also be a path or a key, only a helper's arguments that read as prose (hold a space)
  count;
* the strings returned by the functions in ``MESSAGE_FUNCTIONS`` (a reason that a caller
  puts into a message).

A message's literal text is its constant parts: the constant pieces of an f-string, of a
``+`` concatenation (adjacent constants joined), and the string values a local variable or
module constant used in it is assigned (each of those is checked as a message of its own).

The rule: take each message's longest constant fragment, with whitespace collapsed,
backticks removed and punctuation and spaces stripped from both ends. When it is at least
``MIN_FRAGMENT`` characters, it must occur, case-sensitively, in docs/errors.md with
whitespace collapsed, backticks and ``<br>`` removed and ``\\|`` read as ``|``. A message whose
longest fragment is shorter must be in ``ALLOWLIST``, with a reason (texts assigned to
variables and arguments of helpers that are shorter are pieces of a checked message, and are
skipped).
"""

from __future__ import annotations

import ast
import re
import string
from dataclasses import dataclass
from pathlib import Path

import tvrecipe.errors as errors_module

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tvrecipe"
DOC = ROOT / "docs" / "errors.md"
MIN_FRAGMENT = 12

# Files whose ValueError / LookupError messages reach the user (validators of the recipe
# models, per-tensor values, and the evaluation that wraps a step's ValueError).
VALIDATOR_FILES = ("tvrecipe/spec/models.py", "tvrecipe/spec/pertensor.py",
                   "tvrecipe/exec/evaluate.py")
VALIDATOR_DIRS = ("tvrecipe/steps/",)

# Functions that return a message as a string, for a caller to report.
MESSAGE_FUNCTIONS = ("member_type",)

# Messages with no constant fragment of MIN_FRAGMENT characters: "file.py:text" -> reason.
# ``text`` is the message's constant pieces joined by "|" (what the failure message shows).
ALLOWLIST = {
    "cli.py::": "the family header line `tvrecipe: <family>:` written before every error",
    "cli.py:tvrecipe: ": "`run` says a warning of `validate` after `tvrecipe: ` (the warning "
                         "is catalogued: `... holds a config.json and weights ...`)",
    "cli.py:warning: ": "the head of that warning, split at its location (`warning: r.yaml:4:3: "
                        "models.tvx: ...`); the rest is catalogued",
    "cli.py:note: ": "`tvrecipe import`'s note before a setting mergekit ignores; catalogued "
                     "as `ignored, as mergekit ignores it: ...`",
    "cli.py:  see `| --help`": "the last line of a usage error (`see `tvrecipe CMD --help``)",
    "cli.py:unknown op |; ": "`tvrecipe ops NAME` with an unknown op; catalogued as "
                             "`unknown op 'zzzzzz'; known ops: ...`",
    "exec/lockfile.py:model | (|): ": "prefixes an input error with the model it is about "
                                      "(`model 'ft' (./ckpt/ft): ...`)",
    "store/lora.py:: unreadable (|)": "an adapter_config.json that is not JSON: the rest of "
        "the line is the file name and the parser's message",
    "exec/release.py:: unreadable (|)": "a released folder's tvrecipe.lock that cannot be "
                                        "read; catalogued under verify errors",
    "exec/runner.py:: ": "prefixes a reference's own problem with the reference given to "
                         "inspect (`'tv.x': has no member ...`)",
    "exec/evaluate.py:step | (|), tensor |: ": "prefixes a step's own message with the step "
                                               "and tensor (runtime errors)",
    "plan/summary.py:warning: ": "the located prefix of a rule warning; its text is checked "
                                 "separately (`rule [i] matches no tensor of the model`)",
    "plan/tensors.py:: ": "prefixes a checkpoint's own message with the model it belongs to",
    "spec/pertensor.py:rule [|] value | must be | ": "a rule value outside its field's range; "
                                                     "catalogued under per-tensor values",
    "spec/pertensor.py:: layer | is outside | layers": "a layer index beyond the layer count; "
                                                       "catalogued under per-tensor values",
    "spec/yamlsource.py:YAML error: ": "the YAML parser's own message follows; catalogued "
                                       "under recipe errors",
}


@dataclass(frozen=True)
class Message:
    where: str  # "tvrecipe/file.py:line"
    pieces: tuple[str, ...]  # constant pieces, in order
    kind: str  # "error", "helper" (argument of a forwarding helper) or "variable"

    @property
    def key(self) -> str:
        file = self.where.split(":")[0].removeprefix("tvrecipe/")
        return f"{file}:{'|'.join(self.pieces)}"

    @property
    def fragment(self) -> str:
        return max((normalise_fragment(p) for p in self.pieces), key=len, default="")


def normalise_fragment(text: str) -> str:
    text = " ".join(text.replace("`", "").split())
    return text.strip(string.punctuation + string.whitespace)


def normalise_doc(text: str) -> str:
    text = text.replace("<br>", " ").replace("\\|", "|").replace("`", "")
    return " ".join(text.split())


def error_classes() -> dict[str, type]:
    return {name: obj for name, obj in vars(errors_module).items()
            if isinstance(obj, type) and issubclass(obj, errors_module.TvrecipeError)}


# A sink: callee name -> (positions of message arguments, keyword names of them).
Sink = tuple[frozenset[int], frozenset[str]]


def _callee(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _is_super_init(call: ast.Call) -> bool:
    f = call.func
    return (isinstance(f, ast.Attribute) and f.attr == "__init__"
            and isinstance(f.value, ast.Call) and isinstance(f.value.func, ast.Name)
            and f.value.func.id == "super")


class Module:
    def __init__(self, path: Path):
        self.path = path
        self.rel = str(path.relative_to(ROOT))
        self.tree = ast.parse(path.read_text(encoding="utf-8"), filename=self.rel)
        self.validators = (self.rel in VALIDATOR_FILES
                           or any(self.rel.startswith(d) for d in VALIDATOR_DIRS))
        self.constants = _string_assignments(self.tree.body)
        # Each function, with the class it is defined in (for __init__).
        self.functions: list[tuple[ast.FunctionDef, str | None, bool]] = []
        self._collect(self.tree, None)

    def _collect(self, node: ast.AST, cls: ast.ClassDef | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                self._collect(child, child)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                exc_class = cls is not None and any(
                    isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception")))
                    for b in cls.bases)
                self.functions.append((child, cls.name if cls else None, exc_class))
                self._collect(child, None)


def _string_assignments(body) -> dict[str, list[ast.expr]]:
    """name -> every value assigned to it in ``body`` (not nested functions)."""
    out: dict[str, list[ast.expr]] = {}
    stack = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out.setdefault(target.id, []).append(node.value)
        elif (isinstance(node, (ast.AnnAssign, ast.AugAssign)) and node.value is not None
              and isinstance(node.target, ast.Name)):
            out.setdefault(node.target.id, []).append(node.value)
        stack.extend(ast.iter_child_nodes(node))
    return out


def _params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    return [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]


def _message_args(call: ast.Call, sink: Sink) -> list[ast.expr]:
    positions, keywords = sink
    args = [arg for i, arg in enumerate(call.args) if i in positions]
    args += [kw.value for kw in call.keywords if kw.arg in keywords]
    return args


class Extractor:
    def __init__(self):
        self.modules = [Module(p) for p in sorted(PACKAGE.rglob("*.py"))]
        one = (frozenset({0}), frozenset({"message"}))
        self.sinks: dict[str, Sink] = {name: one for name in error_classes()}
        self.sinks["Problem"] = (frozenset({0, 5}), frozenset({"message", "hint"}))
        self.sinks["BadParameter"] = one
        self.base = set(self.sinks)
        self._find_helpers()

    def sink_of(self, call: ast.Call, module: Module, cls_is_exc: bool) -> Sink | None:
        name = _callee(call)
        zero = (frozenset({0}), frozenset())
        if name == "echo" and any(kw.arg == "err" for kw in call.keywords):
            return (frozenset({0}), frozenset({"message"}))
        if (name == "append" and isinstance(call.func, ast.Attribute)
                and isinstance(call.func.value, ast.Attribute)
                and call.func.value.attr == "warnings"):
            return zero
        if name in ("ValueError", "LookupError") and module.validators:
            return zero
        if cls_is_exc and _is_super_init(call):
            return zero
        return self.sinks.get(name) if name else None

    def _calls(self):
        """(module, function or None, call, the function's class is an exception)."""
        for module in self.modules:
            owner: dict[int, tuple] = {}
            for fn, _cls, exc in module.functions:
                for node in ast.walk(fn):
                    owner[id(node)] = (fn, exc)  # innermost function wins (walked last)
            for node in ast.walk(module.tree):
                if isinstance(node, ast.Call):
                    fn, exc = owner.get(id(node), (None, False))
                    yield module, fn, node, exc

    def _find_helpers(self) -> None:
        """Functions that pass one of their parameters into a sink's message become sinks."""
        changed = True
        while changed:
            changed = False
            for module, fn, call, exc in list(self._calls()):
                sink = self.sink_of(call, module, exc)
                if fn is None or sink is None:
                    continue
                params = _params(fn)
                method = bool(params) and params[0] in ("self", "cls")
                used = {n.id for arg in _message_args(call, sink) for n in ast.walk(arg)
                        if isinstance(n, ast.Name)}
                for i, p in enumerate(params):
                    if p not in used or (method and i == 0):
                        continue
                    if fn.name == "__init__":
                        cls = next(c for f, c, _ in module.functions if f is fn)
                        name = cls
                    else:
                        name = fn.name
                    pos = i - 1 if method else i
                    old = self.sinks.get(name, (frozenset(), frozenset()))
                    new = (old[0] | {pos}, old[1] | {p})
                    if new != old and name not in self.base:
                        self.sinks[name] = new
                        changed = True

    def messages(self) -> list[Message]:
        found: dict[tuple[str, tuple[str, ...]], Message] = {}
        for module, fn, call, exc in self._calls():
            sink = self.sink_of(call, module, exc)
            if sink is None:
                continue
            name = _callee(call)
            kind = "error" if (name in self.base or name in ("echo", "append", "ValueError",
                                                              "LookupError")
                               or _is_super_init(call)) else "helper"
            local = _string_assignments(fn.body) if fn is not None else {}
            params = set(_params(fn)) if fn is not None else set()
            for arg in _message_args(call, sink):
                for msg in self._texts(arg, module, local, params, call.lineno, kind):
                    found.setdefault((msg.where, msg.pieces), msg)
        for module in self.modules:
            for fn, _cls, _exc in module.functions:
                if fn.name not in MESSAGE_FUNCTIONS:
                    continue
                local = _string_assignments(fn.body)
                for node in ast.walk(fn):
                    if isinstance(node, ast.Return) and node.value is not None:
                        for msg in self._texts(node.value, module, local, set(_params(fn)),
                                               node.lineno, "error"):
                            if msg.kind == "error" and not any(" " in p for p in msg.pieces):
                                continue  # not a string
                            found.setdefault((msg.where, msg.pieces), msg)
        # Any other text that starts with "warning:" (rule warnings collected in a list).
        for module in self.modules:
            for node in ast.walk(module.tree):
                if isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant)
                                                       and isinstance(node.value, str)):
                    for msg in self._texts(node, module, {}, set(), node.lineno, "error"):
                        if msg.pieces and msg.pieces[0].startswith("warning:"):
                            found.setdefault((msg.where, msg.pieces), msg)
        return sorted(found.values(), key=lambda m: (m.where.split(":")[0],
                                                     int(m.where.split(":")[1])))

    def _texts(self, expr, module, local, params, line, kind, depth=0) -> list[Message]:
        pieces: list[str | None] = []
        extra: list[Message] = []

        def resolve(name: str) -> None:
            if name in params or depth > 3:
                return
            for value in local.get(name, []) or module.constants.get(name, []):
                extra.extend(self._texts(value, module, local, params,
                                         getattr(value, "lineno", line), "variable", depth + 1))

        def walk(e) -> None:
            if isinstance(e, ast.Constant) and isinstance(e.value, str):
                pieces.append(e.value)
            elif isinstance(e, ast.JoinedStr):
                for v in e.values:
                    if isinstance(v, ast.Constant):
                        pieces.append(v.value)
                    else:
                        pieces.append(None)
                        if isinstance(v.value, ast.Name):
                            resolve(v.value.id)
                        elif isinstance(v.value, (ast.IfExp, ast.BoolOp)):
                            walk(v.value)
            elif isinstance(e, ast.BinOp) and isinstance(e.op, ast.Add):
                walk(e.left)
                walk(e.right)
            elif isinstance(e, (ast.IfExp, ast.BoolOp)):
                pieces.append(None)
                branches = [e.body, e.orelse] if isinstance(e, ast.IfExp) else e.values
                for b in branches:
                    extra.extend(self._texts(b, module, local, params, line, "variable",
                                             depth + 1))
            elif isinstance(e, ast.Name):
                pieces.append(None)
                resolve(e.id)
            else:
                pieces.append(None)

        walk(expr)
        joined: list[str] = []
        current: str | None = None
        for p in pieces:
            if p is None:
                if current is not None:
                    joined.append(current)
                current = None
            else:
                current = (current or "") + p
        if current is not None:
            joined.append(current)
        out = extra
        prose = kind == "error" or any(" " in j.strip() for j in joined)
        if joined and any(j.strip() for j in joined) and prose:
            out = [Message(f"{module.rel}:{line}", tuple(joined), kind), *extra]
        return out


def _catalog() -> str:
    return normalise_doc(DOC.read_text(encoding="utf-8"))


def test_extractor_finds_the_known_families():
    """The extractor itself works: messages of every kind of sink are found."""
    texts = {"…".join(m.pieces) for m in Extractor().messages()}
    for expected in (
        "--plot needs matplotlib, which is not installed",
        "use a number and a unit: 30d, 12h, 90m, 45s",  # click.BadParameter
        "is corrupt",  # CacheCorrupt (a helper class) and the cache warning
        "a step must be a mapping with an 'op' field",  # SourceMap.problem, a helper
        "decompose needs at least 2 task vectors",  # StepContext.problem, a helper
        "header is not a JSON object",  # _corrupt, a helper
        "free space on that disk or write the output elsewhere",  # a variable in a message
        "this is a bug in tvrecipe; rerun with -v for the traceback and report it",  # echo
        "matches no tensor of the model",  # a rule warning
        "shard_size must be a positive size such as 2GB, 500MB, 1.5GiB or a number of bytes",
    ):
        assert any(expected in t for t in texts), f"no message with {expected!r} was found"


def test_every_message_is_catalogued():
    doc = _catalog()
    missing, short = [], []
    for msg in Extractor().messages():
        fragment = msg.fragment
        if len(fragment) < MIN_FRAGMENT:
            if msg.kind == "error" and msg.key not in ALLOWLIST:
                short.append(f"  {msg.where}: {msg.pieces!r}")
            continue
        if fragment not in doc:
            missing.append(f"  {msg.where}: {fragment!r}")
    report = []
    if missing:
        report.append(f"{len(missing)} message(s) are not in docs/errors.md (add each, with "
                      "what triggers it, to the table of its family):\n" + "\n".join(missing))
    if short:
        report.append(f"{len(short)} message(s) have no constant text of {MIN_FRAGMENT}+ "
                      "characters to look up: add them to ALLOWLIST in "
                      "tests/test_errors_catalog.py with a reason:\n" + "\n".join(short))
    assert not report, "\n".join(report)


def test_allowlist_is_current():
    """Every allowlisted message still exists (a stale entry would hide a new one)."""
    keys = {m.key for m in Extractor().messages()}
    stale = sorted(set(ALLOWLIST) - keys)
    assert not stale, f"ALLOWLIST entries that match no message any more: {stale}"


def test_every_exit_code_and_family_is_in_the_table():
    doc = DOC.read_text(encoding="utf-8")
    rows = {(m[1], m[2]) for m in re.finditer(r"^\| (\d+) \| `([^`]*)` \|", doc, re.MULTILINE)}
    expected = {(str(cls.exit_code), cls.family) for name, cls in error_classes().items()
                if name != "TvrecipeError"}
    expected |= {("2", "usage error"), ("70", "internal error")}
    missing = sorted(expected - rows)
    assert not missing, f"exit codes/families missing from the table in docs/errors.md: {missing}"


def test_internal_error_code_matches_the_cli():
    from tvrecipe import cli
    assert cli.EXIT_BUG == 70
    assert "| 70 | `internal error` |" in DOC.read_text(encoding="utf-8")
