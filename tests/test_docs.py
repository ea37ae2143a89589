"""The documentation stays true: every example recipe in docs/recipe-format.md and
docs/cookbook.md loads and compiles, every mergekit config there imports into a recipe that
compiles, and every relative link in README.md and docs/*.md reaches a file (and heading) of
the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import tvrecipe.spec.registry
from tvrecipe.importers.mergekit import import_mergekit
from tvrecipe.plan.graph import compile_recipe
from tvrecipe.spec.load import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DOCS = ("docs/recipe-format.md", "docs/cookbook.md")
LINKED_DOCS = ("README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block (indented fences included, dedented)."""
    blocks: list[tuple[str, str]] = []
    lang, indent, body = None, 0, []
    for line in text.splitlines():
        stripped = line.lstrip()
        if lang is None:
            if stripped.startswith("```"):
                lang, indent, body = stripped[3:].strip().lower(), len(line) - len(stripped), []
        elif stripped.startswith("```") and not stripped.strip("`").strip():
            blocks.append((lang, "\n".join(body) + "\n"))
            lang = None
        else:
            # Drop the fence's indentation (a block inside a list item), never more.
            cut = min(indent, len(line) - len(line.lstrip(" ")))
            body.append(line[cut:])
    assert lang is None, "a fenced code block is never closed"
    return blocks


def first_statement(body: str) -> str:
    """The first line that is neither blank nor a YAML comment."""
    return next((ln.strip() for ln in body.splitlines()
                 if ln.strip() and not ln.lstrip().startswith("#")), "")


def yaml_blocks(doc: str, first: str) -> list[str]:
    text = (ROOT / doc).read_text(encoding="utf-8")
    return [body for lang, body in fenced_blocks(text)
            if lang in ("yaml", "yml") and first_statement(body).startswith(first)]


def _cases(first: str) -> list:
    cases = []
    for doc in RECIPE_DOCS:
        if not (ROOT / doc).is_file():
            cases.append(pytest.param(doc, -1, "", id=f"{doc}-missing"))
            continue
        cases += [pytest.param(doc, i, body, id=f"{Path(doc).stem}-{i}")
                  for i, body in enumerate(yaml_blocks(doc, first))]
    return cases


@pytest.mark.parametrize("doc", RECIPE_DOCS)
def test_docs_have_example_recipes(doc):
    assert (ROOT / doc).is_file(), f"{doc} is missing"
    assert yaml_blocks(doc, "tvrecipe: 1"), f"{doc} has no ```yaml block starting `tvrecipe: 1`"


@pytest.mark.parametrize(("doc", "index", "body"), _cases("tvrecipe: 1"))
def test_example_recipe_loads_and_compiles(doc, index, body, tmp_path):
    """Model paths need not exist: compiling reads no checkpoint."""
    assert index >= 0, f"{doc} is missing"
    assert first_statement(body) == "tvrecipe: 1"
    path = tmp_path / "recipe.yaml"
    path.write_text(body, encoding="utf-8")
    compiled = compile_recipe(load_recipe(path))
    assert compiled.outputs, f"{doc} block {index} writes nothing"
    assert not compiled.unused, f"{doc} block {index} has unused steps: {compiled.unused}"


@pytest.mark.parametrize(("doc", "index", "body"), _cases("merge_method:"))
def test_example_mergekit_config_imports(doc, index, body, tmp_path):
    """A mergekit config shown in the docs imports into a recipe that compiles."""
    assert index >= 0, f"{doc} is missing"
    config = tmp_path / "merge.yml"
    config.write_text(body, encoding="utf-8")
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(import_mergekit(config, recipe), encoding="utf-8")
    assert compile_recipe(load_recipe(recipe)).outputs


def test_cookbook_shows_what_import_writes(tmp_path, monkeypatch):
    """The cookbook's imported recipe is what `tvrecipe import merge.yml -o merge.yaml
    --output-path out/merged` writes today (comments aside)."""
    configs = yaml_blocks("docs/cookbook.md", "merge_method:")
    shown = [b for b in yaml_blocks("docs/cookbook.md", "tvrecipe: 1")
             if "Imported by `tvrecipe import`" in b]
    assert len(configs) == 1 and len(shown) == 1
    monkeypatch.chdir(tmp_path)  # the importer resolves paths as the CLI does, from the cwd
    Path("merge.yml").write_text(configs[0], encoding="utf-8")
    written = import_mergekit("merge.yml", "merge.yaml", "out/merged")
    assert yaml.safe_load(written) == yaml.safe_load(shown[0])


# --- links ------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation dropped,
    spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: keep its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    out = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "", line)  # code spans hold no links
        out += LINK.findall(line)
    return out


@pytest.mark.parametrize("doc", LINKED_DOCS)
def test_relative_links_resolve_inside_the_repository(doc):
    source = ROOT / doc
    bad = []
    for target in links(source):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (source.parent / file_part).resolve() if file_part else source
        try:
            dest.relative_to(ROOT)
        except ValueError:
            bad.append(f"{target}: outside the repository")
            continue
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"broken links in {doc}:\n" + "\n".join(bad)


def test_link_checker_sees_links_and_headings():
    """The checker itself: it finds links (not those in code) and GitHub's heading anchors."""
    assert slug("## `cluster_basis`".lstrip("# ")) == "cluster_basis"
    assert slug("5. Reproducing a release") == "5-reproducing-a-release"
    assert slug("Caching, keys and the lock file") == "caching-keys-and-the-lock-file"
    line = "see [ops](ops.md#sum), `[not](a-link.md)` and ![img](x.png \"t\")"
    assert LINK.findall(re.sub(r"`[^`]*`", "", line)) == ["ops.md#sum", "x.png"]


BUILTIN_OPS = sorted(tvrecipe.spec.registry.ops())


@pytest.mark.parametrize("op", BUILTIN_OPS)
def test_each_ops_example_compiles(op, tmp_path):
    """The example `tvrecipe ops OP` and docs/ops.md show is a step that validates, among
    the steps and models its names refer to."""
    example = tvrecipe.spec.registry.op_class(op).example
    name = example.split(":", 1)[0]
    steps = {"tv": "{op: extract, base: base, finetuned: [math, code, toxic, a, b]}",
             "sparse": "{op: prune, input: tv, density: 0.5}",
             "basis": "{op: compress_basis, inputs: tv, m: 1}",
             "novel": "{op: negate, input: tv.math}",
             "merged": "{op: sum, inputs: tv}"}
    steps[name] = example.split(":", 1)[1].strip()
    models = ["base", "math", "code", "toxic", "a", "b", "code_model", "math_model"]
    body = ("tvrecipe: 1\nmodels:\n" + "".join(f"  {m}: ./ckpt/{m}\n" for m in models)
            + "steps:\n" + "".join(f"  {k}: {v}\n" for k, v in steps.items())
            + "  final: {op: apply, base: base, delta: merged}\n"
            + "outputs:\n  model: {from: final, path: ./out}\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(body, encoding="utf-8")
    compiled = compile_recipe(load_recipe(path))
    assert name in compiled.steps or name in compiled.unused, body
