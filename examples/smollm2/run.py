"""Fine-tune SmolLM2-135M-Instruct on five classification tasks on CPU and merge the fine-tunes
with tvrecipe recipes; score everything and write the results into README.md.

    python examples/smollm2/run.py            # everything, cache in examples/smollm2/.work
    python examples/smollm2/run.py --smoke    # 2 tasks, tiny splits, cache in .work-smoke

Stages: prepare (dequantise the GGUF base), data (npm datasets, splits, the base's hidden
states), finetune, merge (recipes run by the tvrecipe CLI over a λ grid, λ picked on the
validation split), score (test split), report. Each stage skips work already in the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
import yaml
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as D
import model as M
import report as R

HERE = Path(__file__).resolve().parent
STAGES = ["prepare", "data", "finetune", "merge", "score", "report"]
SEED = 0

FULL = {
    "tasks": ["spam", "sentiment", "names", "genre", "party"],
    "sizes": {"train": 400, "val": 80, "test": 200},
    "max_text_tokens": 64, "steps": 150, "batch": 8, "lr": 5e-5,
    # recipe -> λ grid (None: the recipe has no λ)
    "merges": {"task_arithmetic": [0.3, 0.5, 0.7, 1.0], "ties": [0.7, 1.0, 1.5, 2.0],
               "dare_ties": [0.7, 1.0, 1.5, 2.0], "della": [0.7, 1.0, 1.5, 2.0],
               "cluster_basis": [0.5, 1.0, 1.5, 2.0], "shared_merge": [0.3, 0.5, 0.7, 1.0],
               "model_stock": [1.0], "linear": [None],
               # Iso's flat spectrum spreads a low-rank update over every direction: its
               # scale is far larger (at 0.5-2.0 validation rose to the grid's top).
               "tsv_merge": [0.5, 1.0, 1.5, 2.0], "iso_c": [2.0, 4.0, 8.0, 16.0],
               "iso_cts": [2.0, 4.0, 8.0, 16.0]},
    "forget": {"target": "sentiment", "keep": 0.95,
               "recipes": {"forget_negate": [0.5, 1.0, 1.5, 2.0],
                           "forget_unique": [0.5, 1.0, 1.5, 2.0]}},
}
SMOKE = {
    "tasks": ["sentiment", "names"],
    "sizes": {"train": 48, "val": 16, "test": 32},
    "max_text_tokens": 32, "steps": 24, "batch": 8, "lr": 1e-4,
    # The spectral merges too: the frozen blocks give exact-zero task vectors there.
    "merges": {"task_arithmetic": [0.5, 1.0], "ties": [1.0], "tsv_merge": [1.0],
               "iso_cts": [1.0]},
    "forget": {"target": "sentiment", "keep": 0.95, "recipes": {"forget_negate": [1.0]}},
}


class Run:
    def __init__(self, work: Path, cfg: dict, readme: Path | None):
        self.work, self.cfg, self.readme = work, cfg, readme
        self.base_dir = work / "models" / "base"
        self.scores_path = work / "results" / "scores.json"
        self.scores = json.loads(self.scores_path.read_text()) if self.scores_path.exists() else {}
        self._base = self._tok = self._data = None

    # -- shared state, loaded on first use --------------------------------------------------
    @property
    def base(self):
        if self._base is None:
            self._base = M.load(self.base_dir)
            self._base_state = {k: v.clone() for k, v in self._base.state_dict().items()}
        return self._base

    @property
    def tok(self):
        if self._tok is None:
            self._tok = AutoTokenizer.from_pretrained(self.base_dir)
        return self._tok

    def task_data(self, task: str) -> dict:
        if self._data is None:
            self._data = {}
        if task not in self._data:
            self._data[task] = torch.load(self.work / "data" / f"{task}.pt")
        return self._data[task]

    def labels(self, task: str) -> list[int]:
        return M.label_ids(self.tok, D.TASKS[task].labels)

    # -- stages ----------------------------------------------------------------------------
    def prepare(self) -> bool:
        if self.base_dir.exists():
            return False
        self.base_dir.parent.mkdir(parents=True, exist_ok=True)
        M.prepare_base(self.base_dir)
        return True

    def data(self) -> bool:
        out = self.work / "data"
        todo = [t for t in self.cfg["tasks"] if not (out / f"{t}.pt").exists()]
        if not todo:
            return False
        out.mkdir(parents=True, exist_ok=True)
        versions = D.npm_install(self.work / "npm", self.cfg["tasks"])
        manifest = {"npm": versions, "seed": SEED, "sizes": self.cfg["sizes"],
                    "max_text_tokens": self.cfg["max_text_tokens"], "tasks": {}}
        for t in todo:
            task = D.TASKS[t]
            examples = task.load(self.work / "npm")
            splits = D.split(examples, len(task.labels), self.cfg["sizes"], SEED)
            saved = {}
            for name, rows in splits.items():
                ids = [M.encode(self.tok, task.question, r["text"], self.cfg["max_text_tokens"])
                       for r in rows]
                saved[name] = {"texts": [r["text"] for r in rows], "ids": ids,
                               "labels": [r["label"] for r in rows],
                               "hidden": M.bottom_hidden(self.base, ids)}
            torch.save(saved, out / f"{t}.pt")
            print(f"  data {t}: {len(examples)} examples, splits "
                  f"{ {k: len(v['ids']) for k, v in saved.items()} }", flush=True)
        old = out / "manifest.json"
        if old.exists():
            manifest["tasks"] = json.loads(old.read_text()).get("tasks", {})
        for t in todo:
            manifest["tasks"][t] = {"labels": list(D.TASKS[t].labels),
                                    "question": D.TASKS[t].question}
        old.write_text(json.dumps(manifest, indent=1))
        return True

    def finetune(self) -> bool:
        did = False
        for t in self.cfg["tasks"]:
            out = self.work / "models" / t
            if out.exists():
                continue
            c = self.cfg
            log = M.finetune(self.base, self.task_data(t)["train"], self.labels(t), out, self.tok,
                             steps=c["steps"], batch=c["batch"], lr=c["lr"], seed=SEED)
            print(f"  finetune {t}: {log['seconds']:.0f}s, loss {log['loss_first']:.3f} -> "
                  f"{log['loss_last']:.3f}", flush=True)
            did = True
        return did

    def score(self, name: str, folder: Path, split: str) -> dict[str, float]:
        """Accuracy per task of the model in folder on split (cached by file size and mtime)."""
        st = (folder / "model.safetensors").stat()
        stamp = f"{st.st_size}-{st.st_mtime_ns}"
        keys = {t: f"{name}|{split}|{t}" for t in self.cfg["tasks"]}
        if all(self.scores.get(k, {}).get("stamp") == stamp for k in keys.values()):
            return {t: self.scores[k]["acc"] for t, k in keys.items()}
        self.base  # noqa: B018  (loads the base state)
        model = M.load(folder)
        assert M.is_tied(model), f"{folder}: lm_head is not tied to the embeddings"
        fast = M.bottom_equals(model, self._base_state)
        for t, k in keys.items():
            d = self.task_data(t)[split]
            preds = M.predict(model, d, self.labels(t), use_hidden=fast)
            acc = sum(p == y for p, y in zip(preds, d["labels"])) / len(preds)
            self.scores[k] = {"acc": acc, "n": len(preds), "stamp": stamp, "top_only": fast}
        self.scores_path.parent.mkdir(parents=True, exist_ok=True)
        self.scores_path.write_text(json.dumps(self.scores, indent=1))
        return {t: self.scores[k]["acc"] for t, k in keys.items()}

    def run_recipe(self, name: str, lam) -> tuple[Path, float]:
        """Write the λ variant of recipes/NAME.yaml into the cache and run it with the CLI."""
        recipe = yaml.safe_load((HERE / "recipes" / f"{name}.yaml").read_text())
        tasks = set(self.cfg["tasks"])
        recipe["models"] = {k: str(self.work / v.split(".work/", 1)[1])
                            for k, v in recipe["models"].items() if k == "base" or k in tasks}
        for step in recipe["steps"].values():
            for field in ("finetuned", "inputs", "reference"):
                if isinstance(step.get(field), list) and step["op"] != "sum":
                    step[field] = [r for r in step[field] if r.split(".")[-1] in tasks]
            if step["op"] == "apply" and lam is not None:
                step["scale"] = lam
        tag = f"{name}__{lam}" if lam is not None else name
        out = self.work / "merged" / tag
        recipe["outputs"]["model"]["path"] = str(out)
        path = self.work / "recipes" / f"{tag}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        t0 = time.time()
        cmd = [shutil.which("tvrecipe") or "tvrecipe", "run", str(path), "--force", "-q",
               "--report", str(path.with_suffix(".report.json"))]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
        return out, time.time() - t0

    def merge(self) -> bool:
        did = False
        forget = self.cfg["forget"]
        for name, grid in {**self.cfg["merges"], **forget["recipes"]}.items():
            sel_path = self.work / "merged" / f"{name}.json"
            if sel_path.exists():
                continue
            is_forget = name in forget["recipes"]
            base_val = self.score("base", self.base_dir, "val")
            trials, error = [], None
            for lam in grid:
                try:
                    folder, secs = self.run_recipe(name, lam)
                except RuntimeError as e:  # an engine failure is reported, not hidden
                    error = f"λ={lam}: {e}"
                    print(f"  merge {name} FAILED {error}", flush=True)
                    break
                val = self.score(f"{name}@{lam}", folder, "val")
                trials.append({"lambda": lam, "val": val, "recipe_seconds": secs,
                               "folder": str(folder.relative_to(self.work))})
                print(f"  merge {name} λ={lam}: recipe {secs:.1f}s, val {_fmt(val)}", flush=True)
            did = True
            if error is not None:
                for tr in trials:
                    shutil.rmtree(self.work / tr["folder"], ignore_errors=True)
                sel_path.write_text(json.dumps({"error": error}))
                continue
            best = _select(trials, base_val, forget if is_forget else None)
            for tr in trials:
                if tr is not best:
                    shutil.rmtree(self.work / tr["folder"], ignore_errors=True)
            sel_path.write_text(json.dumps({"chosen": best["lambda"], "folder": best["folder"],
                                            "forget": is_forget, "trials": trials}, indent=1))
        return did

    def models(self) -> list[tuple[str, Path, dict]]:
        """(name, folder, info) of every model the table reports."""
        out = [("zero-shot", self.base_dir, {})]
        out += [(f"ft {t}", self.work / "models" / t, {}) for t in self.cfg["tasks"]]
        for name in [*self.cfg["merges"], *self.cfg["forget"]["recipes"]]:
            sel = json.loads((self.work / "merged" / f"{name}.json").read_text())
            if "error" in sel:
                continue
            out.append((name, self.work / sel["folder"], sel))
        return out

    def score_all(self) -> bool:
        before = len(self.scores)
        for name, folder, _ in self.models():
            self.score(name, folder, "test")
        return len(self.scores) != before

    def similarity(self) -> dict:
        """`tvrecipe inspect` of the task vectors (the cluster_basis step where there is one)."""
        path = self.work / "results" / "inspect.json"
        if path.exists():
            return json.loads(path.read_text())
        name, step = ("cluster_basis", "basis") if "cluster_basis" in self.cfg["merges"] else (
            "task_arithmetic", "tv")
        sel = json.loads((self.work / "merged" / f"{name}.json").read_text())
        recipe = self.work / "recipes" / f"{Path(sel['folder']).name}.yaml"
        cmd = [shutil.which("tvrecipe") or "tvrecipe", "inspect", str(recipe), step, "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return {"error": f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}"}
        result = {"recipe": name, "step": step, **json.loads(proc.stdout)}
        path.write_text(json.dumps(result, indent=1))
        return result

    def decompositions(self) -> dict[str, dict]:
        """Per recipe with a `decompose` step: its run report (tensors, shared dimensions).

        Only the run that computed the step has it: later λ variants take the step's result
        from tvrecipe's cache and their --report holds no entry for it."""
        out = {}
        for name in [*self.cfg["merges"], *self.cfg["forget"]["recipes"]]:
            for path in sorted((self.work / "recipes").glob(f"{name}__*.report.json")):
                rep = json.loads(path.read_text()).get("parts")
                if rep:
                    out[name] = rep
                    break
        return out

    def report(self, timings: dict) -> bool:
        rows = [(name, info, self.score(name, folder, "test"))
                for name, folder, info in self.models()]
        machine = (f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
        timings["cache_gb"] = sum(f.stat().st_size for f in self.work.rglob("*")
                                  if f.is_file() and not f.is_symlink()) / 1e9
        manifest = json.loads((self.work / "data" / "manifest.json").read_text())
        failed = {}
        for name in [*self.cfg["merges"], *self.cfg["forget"]["recipes"]]:
            sel = json.loads((self.work / "merged" / f"{name}.json").read_text())
            if "error" in sel:
                failed[name] = sel["error"]
        text = R.results_markdown(rows, self.cfg, timings, machine, manifest, failed,
                                  self.similarity(), self.decompositions(),
                                  chart="results.png" if self.readme else None)
        (self.work / "results" / "report.md").write_text(text)
        R.chart(rows, self.cfg["tasks"], self.work / "results" / "results.png")
        if self.readme:
            shutil.copy(self.work / "results" / "results.png", self.readme.parent / "results.png")
            R.write_between_markers(self.readme, text)
        return True


def _fmt(acc: dict) -> str:
    return " ".join(f"{t} {a:.2f}" for t, a in acc.items())


def _select(trials: list[dict], base_val: dict, forget: dict | None) -> dict:
    """The multi-task merge with the best mean validation accuracy (first on ties); for
    forgetting, the largest drop of the target whose other tasks keep `keep` of the base's
    mean validation accuracy (the smallest λ if none does)."""
    if forget is None:
        return max(trials, key=lambda tr: sum(tr["val"].values()) / len(tr["val"]))
    target = forget["target"]
    others = [t for t in base_val if t != target]
    base_ctrl = sum(base_val[t] for t in others) / max(1, len(others))
    ok = [tr for tr in trials
          if sum(tr["val"][t] for t in others) / max(1, len(others)) >= forget["keep"] * base_ctrl]
    return min(ok, key=lambda tr: tr["val"][target]) if ok else trials[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="2 tasks, tiny splits, a few steps")
    ap.add_argument("--work", type=Path, help="cache folder (default .work or .work-smoke here)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    cfg = SMOKE if args.smoke else FULL
    work = (args.work or HERE / (".work-smoke" if args.smoke else ".work")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    run = Run(work, cfg, None if args.smoke else HERE / "README.md")
    tpath = work / "results" / "timings.json"
    tpath.parent.mkdir(parents=True, exist_ok=True)
    timings = json.loads(tpath.read_text()) if tpath.exists() else {}
    for stage in args.stages.split(","):
        t0 = time.time()
        print(f"[{stage}]", flush=True)
        did = {"prepare": run.prepare, "data": run.data, "finetune": run.finetune,
               "merge": run.merge, "score": run.score_all, "report": run.report}[stage]
        if stage == "report":
            did(timings)
        elif did() or stage not in timings:
            # A stage that does more work in a later run (a recipe added) adds its time.
            spent = time.time() - t0 + timings.get(stage, {}).get("seconds", 0.0)
            timings[stage] = {"seconds": spent, "date": time.strftime("%Y-%m-%d")}
        print(f"[{stage}] {time.time() - t0:.1f}s", flush=True)
        tpath.write_text(json.dumps(timings, indent=1))


if __name__ == "__main__":
    main()
