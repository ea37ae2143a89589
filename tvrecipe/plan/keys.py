"""Content keys of every node: ``{op}-{sha256(canonical JSON)[:16]}`` over op, version, params, inputs."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tvrecipe.plan.graph import DECOMPOSITION, VECTORS, Compiled, lora_base


def canonical(obj: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def node_key(op: str, version: int, payload: Any) -> str:
    """``{op}-{sha256(canonical JSON)[:16]}`` over the op, its version, the rule that tells
    buffers from weights (:data:`tvrecipe.store.checkpoint.BUFFER_RULE`: every op leaves
    buffers out, so a change of it changes what any op computes) and ``payload``."""
    from tvrecipe.store.checkpoint import BUFFER_RULE
    body = canonical({"op": op, "version": version, "buffers": BUFFER_RULE, **payload})
    return f"{op}-{hashlib.sha256(body.encode()).hexdigest()[:16]}"


def step_keys(compiled: Compiled, model_digests: dict[str, str]) -> dict[str, str]:
    """The key of every model and needed step, from the models' content hashes.

    Args:
        compiled: The compiled recipe.
        model_digests: Content hash of each needed model (``checkpoint_digest``).
    """
    settings = compiled.loaded.recipe.settings
    keys = {name: f"model-{digest[:16]}" for name, digest in model_digests.items()}
    for name in model_digests:  # an adapter's value depends on its base too
        if compiled.models[name].kind == "lora":
            base = lora_base(compiled.models, name)
            # 2: B·A formed on one thread (the same bytes on any number of cores)
            # 3: a layer saved beside its factors (.base_layer.) counts over another base
            keys[name] = node_key("lora", 3, {"adapter": keys[name], "base": keys[base]})
    for name, step in compiled.steps.items():
        inputs = {fld: [[keys[r.node], list(r.selector)] for r in refs]
                  for fld, refs in step.refs.items()}
        payload = {"params": step.spec.params(), "inputs": inputs,
                   "weights": step.weights, "compute_dtype": settings.compute_dtype}
        if step.type.kind in (VECTORS, DECOMPOSITION) or step.spec.whole_model:
            # The names of its entries, which its members and reports are named after: a
            # later step selects them by name (tv.math), a random one seeds each member's
            # draws with it, outputs are files named after them, a rebuild reads its decoder
            # by them. (The inputs above are contents, which a rename keeps.) A set whose
            # members a whole-model pass names (k: auto) counts by its reference's text.
            payload["names"] = {
                fld: ([e.name for e in step.entries[fld]] if step.entries.get(fld) is not None
                      else [r.text for r in refs])
                for fld, refs in step.refs.items()}
        if step.spec.seeded:
            payload["seed"] = settings.seed
            payload["step"] = name  # random masks derive from the step name (methods.md)
        keys[name] = node_key(step.op, step.spec.version, payload)
    return keys
