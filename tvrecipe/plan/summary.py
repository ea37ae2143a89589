"""Render a compiled recipe as text (steps, tensors, memory and size estimates), Mermaid or DOT."""

from __future__ import annotations

import math

from tvrecipe.plan.graph import CHECKPOINT, VECTOR, Compiled
from tvrecipe.plan.tensors import (
    TensorPlan,
    build_tensor_plan,
    in_flight,
    rows_per_block,
    rowwise,
)
from tvrecipe.spec import pertensor
from tvrecipe.store.checkpoint import dtype_size

_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}


def human(n: float) -> str:
    """Bytes as a short human string (decimal units, like shard sizes)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def estimates(compiled: Compiled, plan: TensorPlan) -> dict[str, float]:
    """Estimated peak working memory and the size of each output, from headers only."""
    cbytes = _BYTES[compiled.loaded.recipe.settings.compute_dtype]
    by_rows = rowwise(compiled.steps.values())
    unit = 0  # elements of the largest block held of one value
    for t in plan.tensors.values():
        rows = rows_per_block(t.shape) if by_rows else None
        numel = math.prod(t.shape)
        unit = max(unit, numel if rows is None else rows * (numel // t.shape[0]))
    inputs = sum(len(m.parts) for m in plan.models.values())
    values = sum(max(1, len(s.type.members or ())) for s in compiled.steps.values())
    written = sum(max(1, len(res.type.members or ())) for _spec, res in compiled.outputs.values())
    ahead = in_flight(by_rows)
    # Blocks read ahead plus the current one, every step's value, and output values waiting
    # to be written behind the compute.
    live = (ahead + 1) * inputs + values + ahead * written
    out: dict[str, float] = {"peak_bytes": live * unit * cbytes}
    # A `format: peft` output factors each 2-D delta whole: the tensor gathered from its
    # blocks and its float32 working copy (the SVD's own scratch is rank-sized).
    adapters = sum(spec.format == "peft" for spec, _res in compiled.outputs.values())
    if adapters:
        largest = max((math.prod(t.shape) for t in plan.tensors.values()
                       if len(t.shape) == 2 and t.is_floating), default=0)
        out["peak_bytes"] += adapters * largest * (cbytes + 4)
    for name, (spec, res) in compiled.outputs.items():
        total = 0
        members = 1 if res.type.kind in (CHECKPOINT, VECTOR) else len(res.type.members or ())
        for t in plan.tensors.values():
            if res.type.kind != CHECKPOINT and not t.is_floating:
                continue
            size = (_BYTES[spec.dtype] if spec.dtype and t.is_floating else
                    dtype_size(t.dtype) if res.type.kind == CHECKPOINT else cbytes)
            total += math.prod(t.shape) * size
        out[f"output:{name}"] = total * max(members, 1)
    return out


def run_status(compiled: Compiled, cached: set[str]) -> dict[str, str]:
    """Each needed step's fate in a run: ``compute``, ``cached``, or ``skipped`` (only feeds
    cached steps). A cached ``factored`` step still needs its inputs computed."""
    reached: set[str] = set()
    stack = [res.node for _, res in compiled.outputs.values()]
    while stack:
        node = stack.pop()
        if node in reached or node not in compiled.steps:
            continue
        reached.add(node)
        if node not in cached or compiled.steps[node].spec.factored:
            stack.extend(r.node for refs in compiled.steps[node].refs.values() for r in refs)
    return {n: ("cached" if n in cached and n in reached else
                "compute" if n in reached else "skipped") for n in compiled.steps}


def _text(compiled: Compiled, status: dict[str, str] | None = None) -> str:
    loaded = compiled.loaded
    lines = [f"recipe {loaded.path} ({loaded.recipe.name or 'unnamed'})", "", "steps:"]
    for i, (name, step) in enumerate(compiled.steps.items(), 1):
        kind = step.type.kind
        members = step.type.members
        what = f"{kind}[{', '.join(members)}]" if members else kind
        reduce = "  (whole-model pass)" if step.spec.whole_model else ""
        ins = ", ".join(r.text for refs in step.refs.values() for r in refs)
        mark = f"{'[' + status[name] + ']':<10}" if status else ""
        lines.append(f"  {i:>2}. {mark}{name:<14} {step.op:<13} {ins} -> {what}{reduce}")
    if compiled.unused:
        lines.append(f"  not needed by any output: {', '.join(compiled.unused)}")
    plan = build_tensor_plan(compiled)
    try:
        est = estimates(compiled, plan)
        floating = len(plan.floating)
        lines += ["", (f"tensors: {len(plan.tensors)} ({floating} floating) from model "
                      f"{plan.reference!r}; inputs: {', '.join(plan.models)}"),
                  (f"estimated peak working memory: {human(est['peak_bytes'])} (the tensors "
                   "in flight, roughly; Python, torch and the run's buffers add about "
                   "250-600 MB, the most where a step makes a whole-model pass first)")]
        for name, handle in plan.models.items():
            adapter = handle.parts.get("")
            covered = getattr(adapter, "covered", None)
            if covered is not None:  # a LoRA adapter: deltas only where it has factors
                factors = sum(i.nbytes for i in adapter.adapter.tensors.values())
                full = sum(4 * math.prod(adapter.tensors[t].shape) for t in covered)
                lines.append(f"adapter {name!r}: covers {len(covered)} of {floating} floating "
                             f"tensors ({human(full)} as float32 deltas, from "
                             f"{human(factors)} of factors); the others are 0")
        if status is not None:
            lines.append(_io_estimate(compiled, plan, status, est))
        lines += _per_tensor_values(compiled, plan)
        lines += ["", "outputs:"]
        for name, (spec, res) in compiled.outputs.items():
            lines.append(f"  {name}: {res.text} ({res.type.kind}) -> {spec.path}  "
                         f"~{human(est['output:' + name])}")
    finally:
        plan.close()
    return "\n".join(lines)


def per_tensor_params(compiled: Compiled):
    """``(step, field, label, value)`` of every parameter whose value varies by tensor."""
    for step_name, step in compiled.steps.items():
        for field in step.spec.per_tensor:
            if field == "weights":  # one value per entry of the weighted field
                entries = step.entries.get(step.spec.weighted or "", [])
                labelled = [(f"{field}[{e.name}]", w)
                            for e, w in zip(entries, step.weights or [])]
            else:
                labelled = [(field, step.spec.model_dump(mode="json")[field])]
            for label, value in labelled:
                if value is not None and not pertensor.is_scalar(value):
                    yield step_name, field, label, value


def rule_warnings(compiled: Compiled, tensor_names: list[str]) -> list[str]:
    """Rules whose pattern matches no tensor of the model (likely a typo), located."""
    out = []
    for step_name, field, label, value in per_tensor_params(compiled):
        for i in pertensor.unmatched_rules(value, tensor_names):
            line, col = compiled.loaded.source.locate(("steps", step_name, field))
            where = f"{compiled.loaded.path.name}:{line}:{col}: " if line else ""
            out.append(f"warning: {where}steps.{step_name}.{label}: rule [{i}] matches no "
                       "tensor of the model")
    return out


def _per_tensor_values(compiled: Compiled, plan: TensorPlan) -> list[str]:
    """Parameters that vary by tensor, resolved for a few representative tensors, and rules
    whose pattern matches no tensor of the model."""
    names = list(plan.tensors)
    layers = plan.layers
    shown = pertensor.representative_tensors(names)
    width = max((len(t) for t in shown), default=0)
    lines: list[str] = []
    for step_name, field, label, value in per_tensor_params(compiled):
        lines.append(f"  {step_name}.{label} = {pertensor.describe(value)}")
        # As the run resolves it: where no rule matches, the field's default (weights have
        # none: the run stops there).
        default = type(compiled.steps[step_name].spec).per_tensor_default(field)
        for t in shown:
            try:
                got = f"{pertensor.value_at(value, t, layers, default=default):.6g}"
            except LookupError:
                got = "no rule matches: the run stops here"
            lines.append(f"      {t:<{width}}  {got}")
    lines += [f"  {w}" for w in rule_warnings(compiled, names)]
    return ["", "per-tensor values (resolved for representative tensors):", *lines] if lines \
        else []


def _io_estimate(compiled: Compiled, plan: TensorPlan, status: dict[str, str],
                 est: dict[str, float]) -> str:
    """What a run will read (inputs of computed steps, cached results) and write."""
    live = [n for n, st in status.items() if st == "compute"]
    models = {r.node for n in live for refs in compiled.steps[n].refs.values() for r in refs}
    models |= {res.node for _, res in compiled.outputs.values()}
    read = sum(info.nbytes for m in models if m in plan.models
               for ck in plan.models[m].parts.values() for info in ck.tensors.values())
    floating = sum(math.prod(t.shape) for t in plan.tensors.values() if t.is_floating)
    cbytes = _BYTES[compiled.loaded.recipe.settings.compute_dtype]
    reused = sum(floating * cbytes * max(1, len(compiled.steps[n].type.members or ()))
                 for n, st in status.items() if st == "cached")
    written = sum(v for k, v in est.items() if k.startswith("output:"))
    computed = [n for n, st in status.items() if st == "compute"]
    entries = [n for n in computed if compiled.steps[n].spec.cached]
    extra = f" (plus cache entries of {', '.join(entries)})" if entries else ""
    return (f"a run computes {len(computed)} of {len(status)} steps; reads ~{human(read)} of "
            f"inputs and ~{human(reused)} of cached results; writes ~{human(written)} of "
            f"outputs{extra}")


def _edges(compiled: Compiled):
    for name, step in compiled.steps.items():
        for refs in step.refs.values():
            for r in refs:
                yield r.node, name
    for name, (_spec, res) in compiled.outputs.items():
        yield res.node, f"out:{name}"


def render_plan(compiled: Compiled, fmt: str = "text",
                status: dict[str, str] | None = None) -> str:
    """The plan as ``text``, ``mermaid`` or ``dot``; ``status`` marks steps cached/compute."""
    if fmt == "text":
        return _text(compiled, status)
    edges = sorted(set(_edges(compiled)))
    label = {n: f"{n} ({s.op})" for n, s in compiled.steps.items()}
    ident = {}

    def node_id(n: str) -> str:
        return ident.setdefault(n, f"n{len(ident)}")

    if fmt == "mermaid":
        lines = ["flowchart LR"]
        for a, b in edges:
            lines.append(f'  {node_id(a)}["{label.get(a, a)}"] --> {node_id(b)}["{label.get(b, b)}"]')
        return "\n".join(lines)
    lines = ["digraph recipe {", "  rankdir=LR;"]
    for a, b in edges:
        lines.append(f'  "{label.get(a, a)}" -> "{label.get(b, b)}";')
    lines.append("}")
    return "\n".join(lines)
