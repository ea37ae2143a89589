"""Human-readable run reports and inspections (cosine matrices, decomposition ranks)."""

from __future__ import annotations

from tvrecipe.plan.graph import Compiled


def render_reports(compiled: Compiled, reports: dict[str, dict]) -> list[str]:
    """Short texts for the steps that produced a report (each op renders its own)."""
    texts = []
    for name, rep in reports.items():
        step = compiled.steps.get(name)
        text = step.spec.render_report(name, rep) if step is not None else None
        if text:
            texts.append(text)
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
        if "norms" in result:
            lines.append(f"{'norm':>{width}} "
                         + " ".join(f"{v:>{width}.4g}" for v in result["norms"]))
        for b, tasks in result.get("basis", {}).items():
            lines.append(f"  {b}: {', '.join(tasks)}")
        if "eigenvalues" in result:
            lines.append("  Laplacian eigenvalues: "
                         + " ".join(f"{v:.3g}" for v in result["eigenvalues"]))
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


def plot_inspection(name: str, result: dict, path: str) -> None:
    """Draw an inspection as a PNG: a cosine heatmap (clusters boxed) or shared dimensions.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'tvrecipe[plot]'``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if "cosine" in result:
        members = result["members"]
        order = list(range(len(members)))
        labels = result.get("labels")
        if labels:
            order.sort(key=lambda i: (labels[i], i))
        cos = [[result["cosine"][i][j] for j in order] for i in order]
        n = len(members)
        fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.6 * n), max(3.5, 1 + 0.6 * n)))
        im = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(len(order)), [members[i] for i in order], rotation=45, ha="right")
        ax.set_yticks(range(len(order)), [members[i] for i in order])
        if labels:
            start = 0
            for k in sorted(set(labels)):
                size = labels.count(k)
                ax.add_patch(Rectangle((start - 0.5, start - 0.5), size, size, fill=False,
                                       edgecolor="black", linewidth=2))
                start += size
        fig.colorbar(im, ax=ax, label="cosine similarity")
        ax.set_title(f"{name}: task-vector similarity")
    else:
        tensors = [t for t, i in result["tensors"].items() if i["mode"] == "subspace"]
        dims = [result["tensors"][t]["shared_dim"] for t in tensors]
        fig, ax = plt.subplots(figsize=(8, 1.5 + 0.18 * len(tensors)))
        ax.barh(range(len(tensors)), dims)
        ax.set_yticks(range(len(tensors)), tensors, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("shared subspace dimension")
        ax.set_title(f"{name}: shared dimension per tensor")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
