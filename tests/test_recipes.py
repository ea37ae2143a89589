"""The canonical recipes: every one validates, plans and runs on tiny checkpoints made at the
paths it names; every invalid one is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path, PurePosixPath

import pytest
import torch
import yaml

from tests.conftest import FLOATING, base_weights, finetune, read_tensors, save_model

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
INVALID = sorted((REPO / "recipes" / "invalid").glob("*.yaml"))
QUICKSTART = REPO / "examples" / "quickstart"


def norm(path: str) -> str:
    """A recipe-relative path in one spelling (``./ckpt/a/`` → ``ckpt/a``)."""
    return str(PurePosixPath(path.strip()))


def parse(recipe: Path) -> dict:
    return yaml.safe_load(recipe.read_text())


def model_specs(data: dict) -> dict[str, dict]:
    """``models:`` with every entry as a mapping (``path``, ``kind``)."""
    out = {}
    for name, spec in (data.get("models") or {}).items():
        spec = {"path": spec} if isinstance(spec, str) else dict(spec)
        spec.setdefault("kind", "checkpoint")
        out[name] = spec
    return out


def producer_of(path: str) -> Path | None:
    """The canonical recipe whose output is written at ``path`` (a library another reads)."""
    for recipe in RECIPES:
        for out in (parse(recipe).get("outputs") or {}).values():
            if isinstance(out, dict) and norm(str(out.get("path", ""))) == norm(path):
                return recipe
    return None


def member_refs(data: dict, model: str) -> list[str]:
    """Member names the recipe's steps use on ``model`` (``model.x`` → ``x``)."""
    found: list[str] = []

    def walk(value):
        if isinstance(value, str) and value.startswith(model + "."):
            member = value.split(".")[1]
            if member not in found:
                found.append(member)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    walk(data.get("steps") or {})
    return found


def write_vectors(folder: Path, members: list[str]) -> None:
    """A saved ``vectors`` set, as a tvrecipe vectors output lays it out."""
    folder.mkdir(parents=True, exist_ok=True)
    base = base_weights(0)
    for i, m in enumerate(members):
        ft = finetune(base, 100 + i)
        save_model(folder, {k: ft[k] - base[k] for k in FLOATING}, config=False)
        (folder / "model.safetensors").rename(folder / f"{m}.safetensors")
    (folder / "vectors.json").write_text(json.dumps(
        {"format": "tvrecipe.vectors", "version": 1, "members": members,
         "files": {m: f"{m}.safetensors" for m in members}}))


def prepare(recipe: Path, root: Path, cli, done: set[str]) -> Path:
    """Copy ``recipe`` to ``root`` and create every input it names (running producers first)."""
    target = root / recipe.name
    if recipe.name in done:
        return target
    done.add(recipe.name)
    shutil.copy(recipe, target)
    data = parse(recipe)
    base = base_weights(0)
    for i, (name, spec) in enumerate(model_specs(data).items()):
        path = root / spec["path"]
        if path.exists():
            continue
        if spec["kind"] == "checkpoint":
            save_model(path, base if name == "base" else finetune(base, i + 1))
            continue
        producer = producer_of(spec["path"])
        if producer is not None:
            prepare(producer, root, cli, done)
            cli.ok("run", producer.name)
        else:
            write_vectors(path, member_refs(data, name) or ["b0", "b1"])
    return target


def outputs_of(recipe: Path) -> dict[str, dict]:
    return parse(recipe).get("outputs") or {}


def test_there_are_canonical_recipes():
    assert len(RECIPES) >= 3
    assert len(INVALID) >= 3


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_canonical_recipe_validates_plans_and_runs(cli, tmp_path, recipe):
    path = prepare(recipe, tmp_path, cli, set())
    res = cli.ok("validate", path.name)
    assert res.stdout.startswith(f"{path.name}: ok (")

    plan = cli.ok("plan", path.name).stdout
    assert "steps:" in plan and "outputs:" in plan
    assert "estimated peak working memory" in plan
    for name in outputs_of(recipe):
        assert f"  {name}: " in plan

    res = cli.ok("run", path.name, "--report", "report.json")
    assert res.stdout.rstrip().splitlines()[-1].startswith("done in ")
    for name, out in outputs_of(recipe).items():
        folder = tmp_path / out["path"]
        assert folder.is_dir(), f"output {name} was not written"
        assert f"wrote {name}: {folder}" in res.stdout
        tensors = [read_tensors(f) for f in folder.glob("*.safetensors")]
        assert tensors, f"output {name} holds no safetensors file"
        for t in tensors:
            for k, v in t.items():
                if v.is_floating_point():
                    assert bool(torch.isfinite(v).all()), f"{name}: {k} is not finite"
    json.loads((tmp_path / "report.json").read_text())


@pytest.mark.parametrize("fmt, first, edge", [("mermaid", "flowchart LR", "-->"),
                                              ("dot", "digraph recipe {", "->")])
def test_plan_draws_the_graph(cli, tmp_path, fmt, first, edge):
    recipe = REPO / "recipes" / "analogy.yaml"
    path = prepare(recipe, tmp_path, cli, set())
    text = cli.ok("plan", path.name, "--format", fmt).stdout
    lines = text.strip().splitlines()
    assert lines[0] == first
    body = "\n".join(lines[1:])
    assert edge in body
    for step in parse(recipe)["steps"]:
        assert step in body
    if fmt == "dot":
        assert lines[-1] == "}"


@pytest.mark.parametrize("recipe", INVALID, ids=[r.stem for r in INVALID])
def test_invalid_recipe_is_refused(cli, tmp_path, recipe):
    shutil.copy(recipe, tmp_path)
    res = cli.fails(2, "validate", recipe.name)
    assert res.err_lines[0] == "tvrecipe: recipe error:"
    assert all(line.startswith(f"{recipe.name}:") for line in res.err_lines[1:]), res.stderr
    assert res.stdout == ""


def test_quickstart_example_runs_and_matches_the_math(cli, tmp_path):
    shutil.copy(QUICKSTART / "recipe.yaml", tmp_path)
    shutil.copytree(QUICKSTART / "ckpt", tmp_path / "ckpt")
    cli.ok("run", "recipe.yaml", "--device", "cpu")
    model = read_tensors(tmp_path / "out" / "merged")
    weights = {m: read_tensors(tmp_path / "ckpt" / m) for m in ("base", "math", "code", "toxic")}
    base = {k: v.float() for k, v in weights["base"].items()}
    assert set(model) == set(base)
    assert len(list((tmp_path / "out" / "merged").glob("model-*.safetensors"))) >= 2
    for k, v in model.items():
        if not v.is_floating_point():
            assert torch.equal(v, weights["base"][k])
            continue
        assert v.dtype == torch.bfloat16
        tau = {m: weights[m][k].float() - base[k] for m in ("math", "code", "toxic")}
        want = base[k] + 0.5 * tau["math"] + 0.5 * tau["code"] - 0.3 * tau["toxic"]
        torch.testing.assert_close(v.float(), want, rtol=2 ** -8, atol=1e-6)
