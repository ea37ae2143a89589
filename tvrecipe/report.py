"""Human-readable run reports: cluster membership, decomposition ranks."""

from __future__ import annotations

from tvrecipe.plan.graph import Compiled


def render_reports(compiled: Compiled, reports: dict[str, dict]) -> list[str]:
    """Short tables for the steps that produced a report."""
    texts = []
    for name, rep in reports.items():
        step = compiled.steps.get(name)
        op = step.op if step else "?"
        if op == "cluster_basis" and "basis" in rep:
            lines = [f"{name} (cluster_basis): k = {rep.get('k')}"]
            for b, tasks in rep["basis"].items():
                lines.append(f"  {b}: {', '.join(tasks)}")
            texts.append("\n".join(lines))
        elif op == "assign" and "assigned" in rep:
            cos = ", ".join(f"{b} {c:.3f}" for b, c in rep["cosine"].items())
            texts.append(f"{name} (assign): {rep['assigned']} (cosine: {cos})")
        elif op == "decompose" and "tensors" in rep:
            infos = rep["tensors"].values()
            sub = [i for i in infos if i.get("mode") == "subspace"]
            dims = [i["shared_dim"] for i in sub]
            mean_dim = sum(dims) / len(dims) if dims else 0
            texts.append(f"{name} (decompose): {len(sub)} tensors split by subspace, "
                         f"mean shared dimension {mean_dim:.1f}, "
                         f"{len(rep['tensors']) - len(sub)} handled as 1-D/excluded")
    return texts


def render_inspection(name: str, result: dict) -> str:
    """A cosine matrix, or a per-tensor decomposition table, as aligned text."""
    if "cosine" in result:
        members = result["members"]
        width = max(6, *(len(m) for m in members))
        lines = [f"{name}: cosine similarity of {len(members)} task vectors",
                 " " * width + " " + " ".join(f"{m:>{width}}" for m in members)]
        for m, row in zip(members, result["cosine"]):
            lines.append(f"{m:>{width}} " + " ".join(f"{v:>{width}.3f}" for v in row))
        lines.append(f"{'norm':>{width}} " + " ".join(f"{v:>{width}.4g}" for v in result["norms"]))
        return "\n".join(lines)
    tensors = result["tensors"]
    width = max([6, *(len(t) for t in tensors)])
    lines = [f"{name}: shared/unique decomposition per tensor",
             f"{'tensor':<{width}}  {'mode':<16} {'ranks':<18} {'shared':>6}  shared energy"]
    for t, info in tensors.items():
        ranks = ",".join(str(r) for r in info.get("ranks", [])) or "-"
        energy = " ".join(f"{e:.2f}" for e in info.get("shared_energy", []))
        lines.append(f"{t:<{width}}  {info['mode']:<16} {ranks:<18} {info['shared_dim']:>6}  "
                     f"{energy}")
    return "\n".join(lines)
