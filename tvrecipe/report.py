"""Human-readable run reports and inspections (cosine matrices, decomposition ranks)."""

from __future__ import annotations

import json
import math
from typing import Any

from tvrecipe.plan.graph import Compiled


def json_text(data: Any) -> str:
    """``data`` as strict JSON text (indented, keys sorted): a NaN or infinite number (a
    report of inputs let in by --allow-nonfinite, or of an overflow) becomes ``null``, since
    JSON has no such numbers and strict parsers refuse Python's ``NaN``."""
    return json.dumps(_finite_only(data), indent=2, sort_keys=True, allow_nan=False)


def _finite_only(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite_only(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite_only(v) for v in data]
    return data


def render_reports(compiled: Compiled, reports: dict[str, dict]) -> list[str]:
    """Short texts for the steps that produced a report (each op renders its own)."""
    texts = []
    for name, rep in reports.items():
        step = compiled.steps.get(name)
        text = step.spec.render_report(name, rep) if step is not None else None
        if text:
            texts.append(text)
    return texts


def _render_spectra(name: str, result: dict) -> list[str]:
    """Per group of like tensors: each task's effective rank, 90%-energy rank and the energy
    of its top k directions, then the mean overlap of the tasks' top-k subspaces."""
    tasks = result["tasks"]
    width = max(8, *(len(t) for t in tasks))
    lines = [(f"{name}: singular spectra of {len(tasks)} task vectors, per group of tensors "
             "(means over the group)"),
             ("  effective rank exp(entropy of σ²); r90: rank holding 90% of ‖τ‖²; energy@k: "
             "share of ‖τ‖² in the top k directions; overlap: ‖U_iᵀU_j‖²/k of the top-k "
             "subspaces (1 = the same)")]
    for group, g in result["groups"].items():
        shape = "×".join(str(d) for d in g["shape"])
        lines += ["", (f"{group}  ({g['count']} tensor{'s' if g['count'] != 1 else ''}, "
                      f"{shape}, k = {g['k']})"),
                  f"  {'task':<{width}} {'eff. rank':>9} {'r90':>7} {'energy@k':>9}"]
        for i, t in enumerate(tasks):
            lines.append(f"  {t:<{width}} {g['erank'][i]:>9.1f} {g['r90'][i]:>7.1f} "
                         f"{g['energy_k'][i]:>9.3f}")
        lines.append(f"  {'overlap':<{width}} " + " ".join(f"{t:>{width}}" for t in tasks))
        for t, row in zip(tasks, g["overlap"]):
            lines.append(f"  {t:<{width}} " + " ".join(f"{v:>{width}.3f}" for v in row))
    return lines


def render_inspection(name: str, result: dict) -> str:
    """A cosine matrix, a per-tensor decomposition table or spectra, as aligned text."""
    if "groups" in result:
        lines = _render_spectra(name, result)
        if "tensors" in result:
            lines += ["", render_inspection(name, {"tensors": result["tensors"]})]
        return "\n".join(lines)
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
        if "rebuild_error" in result:
            lines.append(f"{'error':>{width}} " + " ".join(
                f"{result['rebuild_error'][m]:>{width}.4f}" for m in members))
            lines.append(f"  {len(result['atoms'])} vectors ({', '.join(result['atoms'])}); "
                         f"loss {result['loss']:.4g}, Eckart–Young bound {result['bound']:.4g}"
                         " (error: each task's relative squared rebuild error)")
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

    if "groups" in result:
        _plot_spectra(plt, name, result)
        fig = plt.gcf()
    elif "cosine" in result:
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


def _plot_spectra(plt, name: str, result: dict) -> None:
    """Left: each group's normalised spectrum σ_i/σ_1 against i/r (mean over its tasks, log
    scale); right: the tasks' top-k subspace overlaps, averaged over the groups."""
    groups = result["groups"]
    tasks = result["tasks"]
    n = len(tasks)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for group, g in groups.items():
        curve = [sum(c[i] for c in g["curve"]) / n for i in range(len(g["curve"][0]))]
        xs = [i / max(1, len(curve) - 1) for i in range(len(curve))]
        left.plot(xs, [max(v, 1e-12) for v in curve], label=group, linewidth=1)
    left.set_yscale("log")
    left.set_xlabel("i / r")
    left.set_ylabel("σ_i / σ_1 (mean over tasks)")
    left.set_title("singular spectra per group")
    if len(groups) <= 12:
        left.legend(fontsize=6)
    mean = [[sum(g["overlap"][i][j] for g in groups.values()) / max(1, len(groups))
             for j in range(n)] for i in range(n)]
    im = right.imshow(mean, cmap="viridis", vmin=0, vmax=1)
    right.set_xticks(range(n), tasks, rotation=45, ha="right")
    right.set_yticks(range(n), tasks)
    fig.colorbar(im, ax=right, label="overlap of top-k subspaces")
    right.set_title("subspace overlap (mean over groups)")
    fig.suptitle(f"{name}: spectra of its inputs")
