"""Content keys of every node: ``{op}-{sha256(canonical JSON)[:16]}`` over op, version, params, inputs."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tvrecipe.plan.graph import Compiled

# Bump an op's version when its kernel's output for the same inputs changes.
# dare 2: every zero of the result is +0.0 (a kept -0.0 input was -0.0 in version 1).
# apply 2: θ₀ + (s·τ) rounded twice; version 1 fused the multiply-add (differs in the last bit).
OP_VERSIONS: dict[str, int] = {"dare": 2, "apply": 2}


def canonical(obj: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def node_key(op: str, payload: Any) -> str:
    """``{op}-{sha256(canonical JSON)[:16]}``."""
    body = canonical({"op": op, "version": OP_VERSIONS.get(op, 1), **payload})
    return f"{op}-{hashlib.sha256(body.encode()).hexdigest()[:16]}"


def step_keys(compiled: Compiled, model_digests: dict[str, str]) -> dict[str, str]:
    """The key of every model and needed step, from the models' content hashes.

    Args:
        compiled: The compiled recipe.
        model_digests: Content hash of each needed model (``checkpoint_digest``).
    """
    settings = compiled.loaded.recipe.settings
    keys = {name: f"model-{digest[:16]}" for name, digest in model_digests.items()}
    for name, step in compiled.steps.items():
        inputs = {fld: [[keys[r.node], list(r.selector)] for r in refs]
                  for fld, refs in step.refs.items()}
        payload = {"params": step.spec.params(), "inputs": inputs,
                   "weights": step.weights, "compute_dtype": settings.compute_dtype}
        if step.op in ("dare", "cluster_basis"):
            payload["seed"] = settings.seed
            payload["step"] = name  # DARE masks derive from the step name (methods.md)
        keys[name] = node_key(step.op, payload)
    return keys
