"""The results section (markdown tables, observations) and the chart, from the scores."""

from __future__ import annotations

from pathlib import Path

BEGIN, END = "<!-- results:begin (written by run.py) -->", "<!-- results:end -->"
STAGE_NAMES = ["prepare", "data", "finetune", "merge", "score"]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def results_markdown(rows, cfg, timings, machine, manifest, failed, similarity, decomp,
                     chart=None) -> str:
    tasks = cfg["tasks"]
    acc = {name: a for name, _, a in rows}
    ft = {t: acc[f"ft {t}"][t] for t in tasks}
    names = {n for n, _, _ in rows}
    forget = [n for n in cfg["forget"]["recipes"] if n in names]
    date = max((v["date"] for v in timings.values() if isinstance(v, dict)), default="?")
    total = sum(timings.get(s, {}).get("seconds", 0.0) for s in STAGE_NAMES)
    stages = ", ".join(f"{s} {timings[s]['seconds'] / 60:.1f} min"
                       for s in STAGE_NAMES if s in timings)
    out = [BEGIN, "", (f"Run of {date} on {machine}. Stage wall times (summed over the runs "
           f"that did its work): {stages}; total {total / 60:.1f} min. The cache folder holds "
           f"{timings.get('cache_gb', 0):.1f} GB (checkpoints, tvrecipe's step cache)."), ""]
    if chart:
        out += [f"![test accuracy per task and model]({chart})", ""]

    out += [("Test accuracy (%) per task, the mean over tasks, and the normalised accuracy "
            "(merged accuracy / the task's own fine-tune's accuracy, averaged over tasks). "
            "λ was picked on the validation split."), ""]
    out += ["| model | λ | " + " | ".join(tasks) + " | mean | normalised |",
            "|---|---:|" + "---:|" * len(tasks) + "---:|---:|"]
    for name, info, a in rows:
        if name in forget:
            continue
        lam = info.get("chosen")
        norm = sum(a[t] / ft[t] for t in tasks) / len(tasks)
        out.append(f"| {name} | {'' if lam is None else lam} | "
                   + " | ".join(_pct(a[t]) for t in tasks)
                   + f" | {_pct(sum(a.values()) / len(a))} | {norm:.3f} |")

    target = cfg["forget"]["target"]
    others = [t for t in tasks if t != target]
    base = acc["zero-shot"]
    ctrl = sum(base[t] for t in others) / len(others)
    out += ["", (f"Forgetting `{target}` (test accuracy %, change against the zero-shot base in "
                 f"brackets; the fine-tune reached {_pct(ft[target])}). λ is the largest drop "
                 f"of `{target}` on validation that keeps the other tasks' mean validation "
                 f"accuracy at ≥ {cfg['forget']['keep']:.2f} × the base's."), "",
            f"| model | λ | {target} | other tasks (mean) |", "|---|---:|---:|---:|",
            f"| zero-shot | | {_pct(base[target])} | {_pct(ctrl)} |"]
    for name, info, a in rows:
        if name in forget:
            c = sum(a[t] for t in others) / len(others)
            out.append(f"| {name} | {info['chosen']} | {_pct(a[target])} "
                       f"({100 * (a[target] - base[target]):+.1f}) | {_pct(c)} "
                       f"({100 * (c - ctrl):+.1f}) |")

    out += ["", ("Validation grid (mean validation accuracy % over tasks, or target / others "
                 "for forgetting) and the seconds of each `tvrecipe run`:"), "",
            "| recipe | λ: validation (run s) |", "|---|---|"]
    for name, info, _ in rows:
        if "trials" not in info:
            continue
        cells = []
        for tr in info["trials"]:
            v = tr["val"]
            if name in forget:
                o = sum(v[t] for t in others) / len(others)
                s = f"{_pct(v[target])} / {_pct(o)}"
            else:
                s = _pct(sum(v.values()) / len(v))
            cells.append(f"{tr['lambda']}: {s} ({tr['recipe_seconds']:.0f} s)")
        out.append(f"| `{name}` | " + "; ".join(cells) + " |")

    out += ["", *similarity_markdown(similarity)]
    for name, rep in decomp.items():
        tensors = rep.get("tensors", {})
        shared = sum(1 for v in tensors.values() if v.get("shared_dim", 0) > 0)
        dims = sum(v.get("shared_dim", 0) for v in tensors.values())
        out += ["", (f"`decompose` in `{name}`: {shared} of {len(tensors)} tensors have a shared "
                f"subspace (shared dimensions in all: {dims}).")]
    out += ["", "Data (npm packages: " + ", ".join(f"`{k}@{v}`" for k, v in
                                                    manifest["npm"].items()) + "):", "",
            "| task | labels (scored words) | train / val / test |", "|---|---|---|"]
    sizes = manifest["sizes"]
    for t in tasks:
        out.append(f"| {t} | {', '.join(manifest['tasks'][t]['labels'])} | "
                   f"{sizes['train']} / {sizes['val']} / {sizes['test']} |")
    out += ["", *observations(rows, tasks, ft, forget, target), ""]
    for name, error in failed.items():
        out += [f"- `{name}` failed in the engine and has no row: `{error.splitlines()[-1]}`"]
    out += ["", END]
    return "\n".join(out) + "\n"


def similarity_markdown(sim: dict) -> list[str]:
    """The cosine matrix of the task vectors (and clusters) from `tvrecipe inspect --json`."""
    if "error" in sim:
        return [f"`tvrecipe inspect` failed: `{sim['error'].strip().splitlines()[-1]}`"]
    members = sim["members"]
    title = (f"Cosine similarity of the task vectors over the whole model (`tvrecipe inspect` "
             f"of step `{sim['step']}` in the `{sim['recipe']}` recipe):")
    out = [title, "",
           "| | " + " | ".join(members) + " |", "|---|" + "---:|" * len(members)]
    for m, row in zip(members, sim["cosine"]):
        out.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    if sim.get("basis"):
        out += ["", "`cluster_basis` (k: auto) formed these clusters: " + "; ".join(
            f"{b} = {', '.join(ts)}" for b, ts in sim["basis"].items()) + "."]
    return out


def observations(rows, tasks, ft, forget, target) -> list[str]:
    """A few sentences computed from the scores (no number in them is typed by hand)."""
    acc = {name: a for name, _, a in rows}
    merges = [n for n, _, _ in rows if n != "zero-shot" and not n.startswith("ft ")
              and n not in forget]

    def mean(n):
        return sum(acc[n].values()) / len(tasks)

    def norm(n):
        return sum(acc[n][t] / ft[t] for t in tasks) / len(tasks)
    ranked = sorted(merges, key=mean, reverse=True)
    lines = ["Observations (computed from the table):", ""]
    if ranked:
        lines.append(f"- Best merge by mean test accuracy: `{ranked[0]}` ({_pct(mean(ranked[0]))}%, "
                     f"normalised {norm(ranked[0]):.3f}); worst: `{ranked[-1]}` "
                     f"({_pct(mean(ranked[-1]))}%). Zero-shot mean: {_pct(mean('zero-shot'))}%.")
    for n in ranked:
        below = [t for t in tasks if acc[n][t] < acc["zero-shot"][t]]
        if below:
            lines.append(f"- `{n}` is below the zero-shot base on: " + ", ".join(
                f"{t} ({_pct(acc[n][t])} vs {_pct(acc['zero-shot'][t])})" for t in below) + ".")
    for name, info, _ in rows:
        grid = [tr["lambda"] for tr in info.get("trials", [])]
        if name not in forget and len(grid) > 1 and info["chosen"] == max(grid):
            lines.append(f"- `{name}`: the chosen λ is the largest of its grid, so a larger λ "
                         "might score better on validation.")
    ft_best = {t: max(acc[f"ft {t}"][t], 1e-9) for t in tasks}
    for n in ranked[:1]:
        gap = [t for t in tasks if acc[n][t] < 0.9 * ft_best[t]]
        if gap:
            lines.append(f"- Even `{n}` keeps less than 90% of the fine-tuned accuracy on: "
                         + ", ".join(gap) + ".")
    base = acc["zero-shot"]
    others = [t for t in tasks if t != target]
    for n in forget:
        drop = base[target] - acc[n][target]
        ctrl = sum(base[t] - acc[n][t] for t in others) / len(others)
        lines.append(f"- `{n}`: `{target}` drops by {100 * drop:.1f} points, the other tasks by "
                     f"{100 * ctrl:.1f} points on average.")
    return lines


def chart(rows, tasks, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, _, _ in rows]
    grid = [[a[t] * 100 for t in tasks] + [100 * sum(a.values()) / len(a)] for _, _, a in rows]
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(names) + 1.2), dpi=90)
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(tasks) + 1), [*tasks, "mean"])
    ax.set_yticks(range(len(names)), names)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if v < 60 else "black")
    ax.set_title("SmolLM2-135M: test accuracy (%)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_between_markers(readme: Path, text: str) -> None:
    """Replace the text between the markers in readme (append them if absent)."""
    old = readme.read_text() if readme.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + text.rstrip("\n") + rest.split(END, 1)[1]
    else:
        new = old + ("\n" if old else "") + text
    readme.write_text(new)
