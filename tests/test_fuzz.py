"""Property tests (hypothesis): random valid recipes run and obey the algebra of task vectors;
random mutations of valid recipes give located recipe errors, never a crash.

Every example works in its own temporary folder (no pytest fixture, no hypothesis database), so
the file runs the same with ``-p no:cacheprovider`` and leaves nothing in the repository.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import textwrap
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import tvrecipe.exec.runner as runner_module
from tvrecipe.cli import main

REPO = Path(__file__).resolve().parents[1]
# Fixed examples by default, so CI is stable; TVRECIPE_FUZZ_EXAMPLES=500 explores new ones.
_HUNT = int(os.environ.get("TVRECIPE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_HUNT or 25, deadline=None, database=None, derandomize=not _HUNT,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

CHECKPOINT, VECTOR, VECTORS = "checkpoint", "vector", "vectors"
INT_BUFFER = "buffers.position_ids"


def invoke(*args: str) -> tuple[int, str, str, BaseException | None]:
    """Run the CLI in-process: exit code, stdout, stderr, and an exception that is not an exit."""
    res = CliRunner().invoke(main, list(args), catch_exceptions=True)
    exc = None if isinstance(res.exception, SystemExit) else res.exception
    return res.exit_code, res.stdout, res.stderr, exc


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output folder (one file, or shards) or of one ``.safetensors`` file."""
    files = [folder] if folder.is_file() else sorted(folder.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 - safe_open handles are not mappings
                assert k not in out
                out[k] = h.get_tensor(k)
    return out


# ---- 1. random valid recipes ----------------------------------------------------------------

# Model names: not s<digits> (step names) and not o<digits> (output names), to stay distinct.
MODEL_NAME = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True).filter(
    lambda n: not re.fullmatch(r"[so]\d+|nn_[ab]|back", n))
WEIGHT = st.integers(-12, 12).map(lambda i: i / 4)           # exact binary fractions
# Scalars and empty dimensions included: they must stream and round-trip like any tensor.
SHAPE = st.one_of(st.just(()), st.tuples(st.integers(0, 6)),
                  st.tuples(st.integers(0, 7), st.integers(0, 5)))


def fmt(w: float) -> str:
    return f"{w:g}"


class Vec(dict):
    """A vector in the reference model: tensor name -> (value, magnitude) in float64."""


class Vecs(dict):
    """A vectors set: member -> Vec."""


class Ckpt(dict):
    """A checkpoint: tensor name -> (value, magnitude) for floating tensors."""


@dataclass
class Plan:
    """A random recipe and what is needed to check its outputs."""

    base: str
    finetunes: list[str]
    shapes: dict[str, tuple[int, ...]]
    with_int: bool
    seed: int
    delta_scale: float
    steps: list[tuple[str, dict]] = field(default_factory=list)  # name, spec (YAML-ready)
    outputs: list[tuple[str, str, str]] = field(default_factory=list)  # name, from, kind
    shard_size: int | None = None
    chunk: int = 1 << 22
    negate_pair: tuple[str, str] = ("", "")   # (x, negate(negate(x))) output names
    back: tuple[str, str] = ("", "")          # (output name, fine-tune it must equal)

    def text(self) -> str:
        lines = ["tvrecipe: 1", "models:", f"  {self.base}: ./ckpt/{self.base}"]
        lines += [f"  {m}: {{path: ./ckpt/{m}}}" for m in self.finetunes]
        lines.append("steps:")
        for name, spec in self.steps:
            body = ", ".join(f"{k}: {v}" for k, v in spec.items())
            lines.append(f"  {name}: {{{body}}}")
        lines.append("outputs:")
        for name, src, kind in self.outputs:
            # (a set's members are not sharded, and validate refuses a shard_size there)
            extra = (f", shard_size: {self.shard_size}" if self.shard_size and kind != VECTORS
                     else "")
            lines.append(f"  {name}: {{from: {src}, path: ./out/{name}{extra}}}")
        return "\n".join(lines) + "\n"


def ref_list(refs: list[str]) -> str:
    return "[" + ", ".join(refs) + "]"


@st.composite
def plans(draw) -> Plan:
    n_ft = draw(st.integers(1, 3))
    names = draw(st.lists(MODEL_NAME, min_size=n_ft + 1, max_size=n_ft + 1, unique=True))
    n_t = draw(st.integers(1, 4))
    shapes = {f"t{i}.weight": draw(SHAPE) for i in range(n_t)}
    plan = Plan(names[0], names[1:], shapes, draw(st.booleans()), draw(st.integers(0, 2**16)),
                draw(st.sampled_from([1e-3, 1e-2, 0.1])))
    plan.shard_size = draw(st.sampled_from([None, None, 64, 300]))
    plan.chunk = draw(st.sampled_from([1 << 22, 1, 5, 16]))
    kinds: dict[str, str] = {}          # reference text -> kind
    members: dict[str, list[str]] = {}  # vectors reference -> members
    ckpts = [plan.base, *plan.finetunes]
    for m in ckpts:
        kinds[m] = CHECKPOINT

    def add(name: str, spec: dict, kind: str, mems: list[str] | None = None) -> None:
        plan.steps.append((name, spec))
        kinds[name] = kind
        if kind == VECTORS:
            members[name] = mems or []
            for m in members[name]:
                kinds[f"{name}.{m}"] = VECTOR

    # Extract: a list (members named after the models), a mapping, or one fine-tune.
    form = draw(st.sampled_from(["list", "map", "single"]))
    if form == "single":
        for i, m in enumerate(plan.finetunes):
            add(f"s{len(plan.steps)}", {"op": "extract", "base": plan.base, "finetuned": m},
                VECTOR)
            if i == 0:
                back_delta, back_ft = plan.steps[-1][0], m
    elif form == "list":
        add("s0", {"op": "extract", "base": plan.base, "finetuned": ref_list(plan.finetunes)},
            VECTORS, list(plan.finetunes))
        back_ft = draw(st.sampled_from(plan.finetunes))
        back_delta = f"s0.{back_ft}"
    else:
        mems = [f"x{i}" for i in range(len(plan.finetunes))]
        mapping = "{" + ", ".join(f"{a}: {m}" for a, m in zip(mems, plan.finetunes)) + "}"
        add("s0", {"op": "extract", "base": plan.base, "finetuned": mapping}, VECTORS, mems)
        i = draw(st.integers(0, len(mems) - 1))
        back_delta, back_ft = f"s0.{mems[i]}", plan.finetunes[i]

    for _ in range(draw(st.integers(1, 5))):
        name = f"s{len(plan.steps)}"
        vec_refs = sorted(r for r, k in kinds.items() if k in (VECTOR, VECTORS))
        one_refs = sorted(r for r, k in kinds.items() if k == VECTOR)
        op = draw(st.sampled_from(["scale", "negate", "sum", "mean", "apply"]))
        if op in ("scale", "negate"):
            src = draw(st.sampled_from(vec_refs))
            spec = {"op": op, "input": src}
            if op == "scale":
                spec["factor"] = fmt(draw(WEIGHT))
            add(name, spec, kinds[src], members.get(src))
        elif op in ("sum", "mean"):
            refs = draw(st.lists(st.sampled_from(vec_refs), min_size=1, max_size=4, unique=True))
            single = len(refs) == 1 and draw(st.booleans())
            spec = {"op": op, "inputs": refs[0] if single else ref_list(refs)}
            if op == "sum":
                how = draw(st.sampled_from(["none", "scalar", "list"]))
                if how == "scalar":
                    spec["weights"] = fmt(draw(WEIGHT))
                elif how == "list" and not single:
                    spec["weights"] = ref_list([fmt(draw(WEIGHT)) for _ in refs])
            add(name, spec, VECTOR)
        else:
            spec = {"op": "apply", "base": draw(st.sampled_from(ckpts)),
                    "delta": draw(st.sampled_from(one_refs))}
            if draw(st.booleans()):
                spec["scale"] = fmt(draw(WEIGHT))
            add(name, spec, CHECKPOINT)
            ckpts.append(name)

    # The identities checked exactly: negate(negate(x)) == x and apply(extract) == fine-tune.
    x = draw(st.sampled_from(sorted(r for r, k in kinds.items() if k in (VECTOR, VECTORS))))
    add("nn_a", {"op": "negate", "input": x}, kinds[x], members.get(x))
    add("nn_b", {"op": "negate", "input": "nn_a"}, kinds[x], members.get(x))
    add("back", {"op": "apply", "base": plan.base, "delta": back_delta}, CHECKPOINT)
    sources = [n for n, _ in plan.steps] + ([x] if "." in x else [])
    for i, src in enumerate(sources):
        plan.outputs.append((f"o{i}", src, kinds[src]))
    out_of = {src: name for name, src, _ in plan.outputs}
    plan.negate_pair = (out_of[x], out_of["nn_b"])
    plan.back = (out_of["back"], back_ft)
    return plan


def make_weights(plan: Plan) -> dict[str, dict[str, torch.Tensor]]:
    """Base ~ N(0, 0.02²) (norm-like tensors near 1), fine-tunes = base + small deltas."""
    g = torch.Generator().manual_seed(plan.seed)
    base = {}
    for i, (name, shape) in enumerate(plan.shapes.items()):
        t = 0.02 * torch.randn(shape, generator=g)
        base[name] = t + 1.0 if i % 3 == 2 else t
    weights = {plan.base: base}
    for m in plan.finetunes:
        weights[m] = {k: v + plan.delta_scale * torch.randn(v.shape, generator=g)
                      for k, v in base.items()}
    if plan.with_int:
        for i, m in enumerate(weights):
            weights[m][INT_BUFFER] = torch.full((2, 3), i, dtype=torch.int64)
    return weights


def evaluate(plan: Plan, weights: dict[str, dict[str, torch.Tensor]]) -> dict[str, object]:
    """The value of every step, computed in float64 with a magnitude bound for tolerances."""
    values: dict[str, object] = {}
    for m, w in weights.items():
        values[m] = Ckpt({k: (v.double(), v.double().abs()) for k, v in w.items()
                          if v.is_floating_point()})

    def get(ref: str):
        head, *rest = ref.split(".")
        v = values[head]
        for part in rest:
            v = v[part]
        return v

    def entries(text: str) -> list[Vec]:
        refs = [r.strip() for r in text.strip("[]").split(",")]
        out = []
        for r in refs:
            v = get(r)
            out.append([v] if isinstance(v, Vec) else list(v.values()))
        return out

    def lin(vecs: list[Vec], ws: list[float]) -> Vec:
        out = Vec()
        for k in plan.shapes:
            val = sum(w * v[k][0] for w, v in zip(ws, vecs))
            mag = sum(abs(w) * v[k][1] for w, v in zip(ws, vecs))
            out[k] = (val, mag)
        return out

    def each(v, fn):
        return Vecs({m: fn(x) for m, x in v.items()}) if isinstance(v, Vecs) else fn(v)

    for name, spec in plan.steps:
        op = spec["op"]
        if op == "extract":
            base = values[spec["base"]]
            fin = spec["finetuned"]

            def delta(model: str, base=base) -> Vec:
                ft = values[model]
                return Vec({k: (ft[k][0] - base[k][0], ft[k][1] + base[k][1])
                            for k in plan.shapes})

            if fin.startswith("["):
                values[name] = Vecs({m: delta(m) for m in fin.strip("[]").split(", ")})
            elif fin.startswith("{"):
                pairs = [p.split(": ") for p in fin.strip("{}").split(", ")]
                values[name] = Vecs({a: delta(m) for a, m in pairs})
            else:
                values[name] = delta(fin)
        elif op in ("scale", "negate"):
            f = float(spec.get("factor", -1))
            values[name] = each(get(spec["input"]), lambda v, f=f: lin([v], [f]))
        elif op in ("sum", "mean"):
            groups = entries(spec["inputs"])
            flat = [v for g in groups for v in g]
            if op == "mean":
                ws = [1.0 / len(flat)] * len(flat)
            elif "weights" not in spec:
                ws = [1.0] * len(flat)
            elif spec["weights"].startswith("["):
                per_ref = [float(w) for w in spec["weights"].strip("[]").split(", ")]
                ws = [w for w, g in zip(per_ref, groups) for _ in g]
            else:
                ws = [float(spec["weights"])] * len(flat)
            values[name] = lin(flat, ws)
        else:  # apply
            base, d = get(spec["base"]), get(spec["delta"])
            s = float(spec.get("scale", 1))
            values[name] = Ckpt({k: (base[k][0] + s * d[k][0], base[k][1] + abs(s) * d[k][1])
                                 for k in plan.shapes})
    return values


def assert_near(got: torch.Tensor, want: tuple[torch.Tensor, torch.Tensor], what: str) -> None:
    val, mag = want
    assert got.dtype == torch.float32, what
    assert tuple(got.shape) == tuple(val.shape), what
    # float32 rounding of a short chain of sums: a few ulps of the magnitudes involved.
    err = (got.double() - val).abs()
    bound = 1e-5 * mag + 1e-30
    assert bool((err <= bound).all()), f"{what}: max error {float(err.max())}"


def check_output(folder: Path, kind: str, want, plan: Plan, what: str) -> None:
    if kind == VECTORS:
        members = sorted(p.stem for p in folder.glob("*.safetensors"))
        assert members == sorted(want), what
        for m in members:
            check_output(folder / f"{m}.safetensors", VECTOR, want[m], plan, f"{what}.{m}")
        return
    got = read_tensors(folder)
    floating = set(plan.shapes)
    if kind == CHECKPOINT:
        expected_names = floating | ({INT_BUFFER} if plan.with_int else set())
    else:
        expected_names = floating  # task vectors have no integer buffers
    assert set(got) == expected_names, what
    for k in plan.shapes:
        assert_near(got[k], want[k], f"{what}: {k}")


@FUZZ
@given(plan=plans())
def test_random_valid_recipes_run_and_obey_the_algebra(plan: Plan):
    weights = make_weights(plan)
    with tempfile.TemporaryDirectory(prefix="tvrecipe-fuzz-") as tmp:
        root = Path(tmp)
        for m, w in weights.items():
            (root / "ckpt" / m).mkdir(parents=True)
            save_file(w, str(root / "ckpt" / m / "model.safetensors"))
        recipe = root / "r.yaml"
        recipe.write_text(plan.text())
        code, out, err, exc = invoke("validate", str(recipe))
        assert (code, exc) == (0, None), plan.text() + err
        steps, outputs = len(plan.steps), len(plan.outputs)
        assert (f"ok ({steps} step{'s' * (steps != 1)}, "
                f"{outputs} output{'s' * (outputs != 1)})") in out
        code, out, err, exc = invoke("plan", str(recipe))
        assert (code, exc) == (0, None), plan.text() + err
        with mock.patch.object(runner_module, "CHUNK_ELEMENTS", plan.chunk):
            code, out, err, exc = invoke("run", str(recipe), "-q", "--device", "cpu",
                                         "--cache-dir", str(root / "cache"))
        assert (code, exc) == (0, None), plan.text() + err
        values = evaluate(plan, weights)
        for name, src, kind in plan.outputs:
            head, *rest = src.split(".")
            want = values[head]
            for part in rest:
                want = want[part]
            check_output(root / "out" / name, kind, want, plan, f"{name} (from {src})")

        # Exact identities, bit for bit in float32.
        x_out, nn_out = plan.negate_pair
        x_dir, nn_dir = root / "out" / x_out, root / "out" / nn_out
        x_files = sorted(p.name for p in x_dir.glob("*.safetensors"))
        assert x_files == sorted(p.name for p in nn_dir.glob("*.safetensors"))
        for f in x_files:
            a, b = read_tensors(x_dir / f), read_tensors(nn_dir / f)
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), f"negate(negate(x)) != x for {f}: {k}"
        back_out, ft = plan.back
        got = read_tensors(root / "out" / back_out)
        for k in plan.shapes:
            assert torch.equal(got[k], weights[ft][k]), f"apply(extract({ft})): {k}"
        if plan.with_int:  # integer buffers come from the base, never merged
            assert torch.equal(got[INT_BUFFER], weights[plan.base][INT_BUFFER])


# ---- 2. mutations of valid recipes ----------------------------------------------------------

BLOCK_STYLE = textwrap.dedent("""\
    # yaml-language-server: $schema=../schemas/recipe.schema.json
    tvrecipe: 1
    name: block-style
    settings:
      device: cpu
      seed: 3
    models:
      base: ./ckpt/base
      math:
        path: ./ckpt/math
      code: ./ckpt/code
      toxic: ./ckpt/toxic
    steps:
      tv:
        op: extract
        base: base
        finetuned: [math, code, toxic]
      detox:
        op: negate
        input: tv.toxic
      merged:
        op: sum
        inputs:
          - tv.math
          - tv.code
          - detox
        weights: [0.5, 0.5, 0.3]
      model:
        op: apply
        base: base
        delta: merged
    outputs:
      model:
        from: model
        path: ./out/merged
        dtype: bfloat16
        shard_size: 2GB
      vectors: {from: tv, path: ./out/task_vectors}
    """)
SEEDS = [BLOCK_STYLE] + [p.read_text() for p in sorted((REPO / "recipes").glob("*.yaml"))]

VALUE_TOKEN = re.compile(r"(?<=: )[^,{}\[\]\n#]+|(?<=\[)[^,\[\]\n]+|(?<=, )[^,{}\[\]\n:]+")
WORD_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
NUMBER_TOKEN = re.compile(r"(?<![\w.])-?\d+(\.\d+)?(?![\w.])")
RANDOM_NUMBER = st.one_of(
    st.floats().map(repr), st.integers(-3, 10**20).map(str),
    st.sampled_from([".nan", ".inf", "-.inf", "1e400", "-0.0", "0", "0.0", "1", "true", "1.5"]))
KEY_LINE = re.compile(r"^(\s*)([A-Za-z_][\w\-]*):")
# The "shape" edit puts a value of the bugs pinned below (op as a list or mapping, an empty list
# of references, a huge k, a number that is not finite, a recursive alias) into a step field.
STEP_FIELD = re.compile(r"\b(?:op|inputs|finetuned|input|k|weights|factor|scale|density|"
                        r"threshold): (\[[^\]\n]*\]|\{[^}\n]*\}|[^,{}\[\]\n#]+)")
BUG_SHAPE = st.sampled_from([
    "[]", "{}", "[sum]", "{sum: 1}", "[ties, sum]",
    "200000", "100000000000", "99999999999999999999", "1e400",
    ".nan", ".inf", "-.inf", "[.nan]", "[1, .inf]", "{math: .nan}", "[{value: .inf}]",
    "&r [tv, *r]", "&r {op: sum, inputs: [*r]}", "&r [[*r]]", "&r {a: *r}"])

# Any character UTF-8 can hold, control characters included: those YAML refuses must give a
# located error too (test_unreadable_characters_are_located pins the fix).
TEXT_CHAR = st.one_of(st.characters(codec="utf-8", exclude_categories=("Cs", "Cn")),
                      st.characters(max_codepoint=0x1F))
RANDOM_SCALAR = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["null", "~", "true", "no", "''", "[]", "{}", "[a, b]", "{op: sum}",
                     "auto", "-1", "0", "1e400", ".nan", ".inf", "-.inf", "0x1F", "1_000", "2GB",
                     "lots", "tv.math.x", "'a: b'", "*anchor", "&a x", "!!binary aGk=",
                     "!!python/name:os.system", "<<", "2001-01-01", "? a", "|", ">", "@x",
                     "`x`", "%TAG", "- a", "a: b: c", "{a: [}", "'unterminated", '"\\q"',
                     "base", "tv", "tv.math", "merged.x.y", "steps", "99999999999999999999"]),
    st.text(alphabet=TEXT_CHAR, max_size=8),
    st.lists(st.from_regex(r"[a-z][a-z0-9_.]{0,4}", fullmatch=True), max_size=3).map(
        lambda xs: "[" + ", ".join(xs) + "]"),
)
GARBAGE = st.text(alphabet=TEXT_CHAR, min_size=1, max_size=4)


@st.composite
def mutated(draw) -> str:
    """A valid recipe with one to three random edits."""
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 3))):
        lines = text.split("\n")
        kind = draw(st.sampled_from(["delete", "duplicate", "value", "rename", "garbage",
                                     "indent", "swap", "number", "shape"]))
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        if kind == "delete" and len(lines) > 1:
            del lines[i]
        elif kind == "duplicate":
            keyed = [j for j, line in enumerate(lines) if KEY_LINE.match(line)]
            if keyed:
                j = draw(st.sampled_from(keyed))
                copy = lines[j]
                if draw(st.booleans()):  # same key, another value
                    m = KEY_LINE.match(copy)
                    copy = f"{m.group(0)} {draw(RANDOM_SCALAR)}"
                lines.insert(j + draw(st.integers(1, 2)), copy)
        elif kind == "value":
            spots = [m.span() for m in VALUE_TOKEN.finditer(text)]
            if spots:
                a, b = draw(st.sampled_from(spots))
                text = text[:a] + draw(RANDOM_SCALAR) + text[b:]
                continue
        elif kind == "number":
            spots = [m.span() for m in NUMBER_TOKEN.finditer(text)]
            if spots:
                a, b = draw(st.sampled_from(spots))
                text = text[:a] + draw(RANDOM_NUMBER) + text[b:]
                continue
        elif kind == "shape":
            spots = [m.span(1) for m in STEP_FIELD.finditer(text)]
            if spots:
                a, b = draw(st.sampled_from(spots))
                text = text[:a] + draw(BUG_SHAPE) + text[b:]
                continue
        elif kind == "rename":
            spots = [m.span() for m in WORD_TOKEN.finditer(text)]
            if spots:
                a, b = draw(st.sampled_from(spots))
                word = text[a:b]
                new = draw(st.one_of(
                    st.from_regex(r"[a-z][a-z0-9_]{0,6}(\.[a-z0-9]{1,4})?", fullmatch=True),
                    st.just(word + draw(st.sampled_from(["x", "_", ".a", "-1", "."]))),
                    st.just(word[:-1])))
                text = text[:a] + new + text[b:]
                continue
        elif kind == "garbage":
            pos = draw(st.integers(0, len(text)))
            text = text[:pos] + draw(GARBAGE) + text[pos:]
            continue
        elif kind == "swap" and len(lines) > 1:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "indent" and lines:
            line = lines[i]
            how = draw(st.sampled_from(["more", "less", "tab"]))
            n = draw(st.integers(1, 4))
            if how == "more":
                lines[i] = " " * n + line
            elif how == "tab":
                lines[i] = "\t" + line
            else:
                lines[i] = line[min(n, len(line) - len(line.lstrip(" "))):]
        text = "\n".join(lines)
    return text


LOCATED = re.compile(r"^r\.yaml:\d+:\d+: ")       # file:line:col
KEY_PATH = re.compile(r"^r\.yaml: [A-Za-z_][\w\-]*(\.[\w\-]+|\[\d+\])*: ")  # file: key.path


@FUZZ
@given(text=mutated())
def test_mutated_recipes_give_located_errors_never_a_crash(text: str):
    with tempfile.TemporaryDirectory(prefix="tvrecipe-fuzz-") as tmp:
        recipe = Path(tmp) / "r.yaml"
        recipe.write_text(text, encoding="utf-8")
        res = CliRunner().invoke(main, ["validate", str(recipe)], catch_exceptions=True)
        shown = f"--- recipe ---\n{text}\n--- stderr ---\n{res.stderr}\n{res.exception!r}"
        assert res.exit_code in (0, 2), shown
        assert res.exception is None or isinstance(res.exception, SystemExit), shown
        assert "Traceback" not in res.stdout + res.stderr, shown
        assert "internal error" not in res.stderr, shown
        if res.exit_code == 0:
            assert res.stdout.startswith(f"{recipe}: ok ("), shown
            # (only notes of model folders the mutation renamed away, located)
            for line in res.stderr.replace(str(recipe), "r.yaml").splitlines():
                assert re.match(r"^note: r\.yaml:\d+:\d+: models\.[\w\-]+: .* does not exist "
                                r"\(yet\)", line), shown
            return
        lines = res.stderr.replace(str(recipe), "r.yaml").splitlines()
        assert lines[0] == "tvrecipe: recipe error:", shown
        assert len(lines) > 1, shown
        for line in lines[1:]:
            assert line.startswith("  "), shown
            line = line[2:]
            if line.startswith("r.yaml: this is a binary file"):  # (a NUL: the whole file)
                continue
            assert LOCATED.match(line) or KEY_PATH.match(line), \
                f"error line without a location: {line!r}\n{shown}"


_TEMPLATE: list[Path] = []


def checkpoint_template() -> Path:
    """Tiny checkpoints for every ``./ckpt/NAME`` the seed recipes name (made once)."""
    if _TEMPLATE:
        return _TEMPLATE[0]
    root = Path(tempfile.mkdtemp(prefix="tvrecipe-fuzz-ckpt-"))
    atexit.register(shutil.rmtree, root, True)
    names = sorted({m for text in SEEDS for m in re.findall(r"\./ckpt/([\w-]+)", text)})
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": 0.02 * torch.randn(4, 3, generator=g),
            "a.bias": 0.02 * torch.randn(4, generator=g),
            INT_BUFFER: torch.arange(3, dtype=torch.int64)}
    for name in names:
        w = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
             for k, v in base.items()} if name != "base" else base
        (root / name).mkdir()
        save_file(w, str(root / name / "model.safetensors"))
    _TEMPLATE.append(root)
    return root


def out_path(output: object) -> str:
    """An output's path as the recipe loader reads it (YAML ``!!binary`` becomes text too)."""
    path = output.get("path") if isinstance(output, dict) else None
    return path.decode("utf-8", "replace") if isinstance(path, bytes) else str(path)


def inside(path: str, root: Path) -> bool:
    p = Path(path).expanduser()
    p = (p if p.is_absolute() else root / p).resolve()
    return p != root and root in p.parents


@FUZZ
@given(text=mutated())
def test_mutated_recipes_that_validate_run_without_a_crash(text: str):
    with tempfile.TemporaryDirectory(prefix="tvrecipe-fuzz-") as tmp:
        root = Path(tmp).resolve()
        recipe = root / "r.yaml"
        recipe.write_text(text, encoding="utf-8")
        if invoke("validate", str(recipe))[0] != 0:
            return
        outputs = yaml.safe_load(text)["outputs"]
        # Mutated output paths may point anywhere: run only what stays inside this folder.
        assume(all(inside(out_path(o), root) for o in outputs.values()))
        shutil.copytree(checkpoint_template(), root / "ckpt")
        before = {name: (root / out_path(o)).exists() for name, o in outputs.items()}
        code, _out, err, exc = invoke("run", str(recipe), "-q", "--device", "cpu",
                                      "--cache-dir", str(root / "cache"))
        shown = f"--- recipe ---\n{text}\n--- stderr ---\n{err}\n{exc!r}"
        assert code in (0, 3, 4, 5), shown
        assert exc is None and "Traceback" not in err and "internal error" not in err, shown
        event(f"run exit {code}")
        if code:
            assert err.startswith("tvrecipe: "), shown
            for name, o in outputs.items():  # a failed run writes no output
                assert (root / out_path(o)).exists() == before[name], shown


# ---- bugs the fuzzers found (fixed; each test pins its fix) --------------------------------

SMALL = """\
tvrecipe: 1
models:
  base: ./ckpt/base
  ft: ./ckpt/ft
steps:
  tv: {{op: extract, base: base, finetuned: [ft, base]}}
  x: {step}
outputs:
  x: {{from: x, path: ./out/x}}
"""


def validate_text(tmp_path: Path, data: str | bytes) -> tuple[int, list[str]]:
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    code, _out, err, exc = invoke("validate", str(recipe))
    assert exc is None
    return code, [line.strip().replace(str(recipe), "r.yaml") for line in err.splitlines()]


@pytest.mark.parametrize("data", [
    pytest.param(SMALL.format(step="{op: sum, inputs: tv\x01}").encode(), id="control-char"),
    pytest.param(SMALL.format(step="{op: sum, inputs: tv\xe9}").encode("latin-1"),
                 id="not-utf8"),
])
def test_unreadable_characters_are_located(tmp_path, data):
    code, lines = validate_text(tmp_path, data)
    assert code == 2
    assert len(lines) == 2 and lines[1].startswith("r.yaml:7:"), lines


@pytest.mark.parametrize("op", ["[]", "{}", "[sum]"])
def test_op_that_is_not_a_string(tmp_path, op):
    code, lines = validate_text(tmp_path, SMALL.format(step=f"{{op: {op}, inputs: tv}}"))
    assert code == 2, lines
    assert lines[1].startswith("r.yaml:7:") and "steps.x.op: " in lines[1], lines


@pytest.mark.parametrize("step, key", [
    ("{op: sum, inputs: []}", "steps.x.inputs"),
    ("{op: mean, inputs: []}", "steps.x.inputs"),
    ("{op: decompose, inputs: []}", "steps.x.inputs"),
    ("{op: cluster_basis, inputs: [], k: 1}", "steps.x.inputs"),
    ("{op: extract, base: base, finetuned: []}", "steps.x.finetuned"),
])
def test_empty_reference_list(tmp_path, step, key):
    code, lines = validate_text(tmp_path, SMALL.format(step=step))
    assert code == 2, lines
    assert any(line.startswith("r.yaml:7:") and f"{key}: " in line for line in lines), lines


@pytest.mark.parametrize("step, key", [
    ("{op: sum, inputs: tv, weights: .nan}", "steps.x.weights"),
    ("{op: sum, inputs: [tv.ft], weights: [.inf]}", "steps.x.weights[0]"),
    ("{op: scale, input: tv.ft, factor: 1e400}", "steps.x.factor"),
    ("{op: apply, base: base, delta: tv.ft, scale: -.inf}", "steps.x.scale"),
])
def test_non_finite_parameter(tmp_path, step, key):
    code, lines = validate_text(tmp_path, SMALL.format(step=step))
    assert code == 2, lines
    assert any(line.startswith("r.yaml:7:") and f"{key}: " in line for line in lines), lines


@pytest.mark.parametrize("step", ["&a {op: sum, inputs: [*a]}", "{op: sum, inputs: &x [tv, *x]}"])
def test_recursive_alias(tmp_path, step):
    code, lines = validate_text(tmp_path, SMALL.format(step=step))
    assert code == 2, lines
    assert lines[1].startswith("r.yaml:7:"), lines


def test_huge_k_is_reported_without_building_k_names(tmp_path):
    text = SMALL.format(step="{op: cluster_basis, inputs: tv, k: 200000}")
    tracemalloc.start()
    try:
        code, lines = validate_text(tmp_path, text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 2
    assert "k must be 'auto' or between 1 and 4096, got 200000" in lines[1]
    assert peak < 2_000_000, f"validate used {peak / 1e6:.0f} MB for one recipe"
