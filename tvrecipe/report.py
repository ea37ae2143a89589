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
        elif op == "decompose" and "tensors" in rep:
            infos = rep["tensors"].values()
            sub = [i for i in infos if i.get("mode") == "subspace"]
            dims = [i["shared_dim"] for i in sub]
            mean_dim = sum(dims) / len(dims) if dims else 0
            texts.append(f"{name} (decompose): {len(sub)} tensors split by subspace, "
                         f"mean shared dimension {mean_dim:.1f}, "
                         f"{len(rep['tensors']) - len(sub)} handled as 1-D/excluded")
    return texts
