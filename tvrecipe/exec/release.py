"""Releases that explain themselves: what a checkpoint output (or a peft adapter output)
carries besides its weights.

Such an output folder gets three files unless its output says ``model_card: false``:

- ``tvrecipe.yaml``: the recipe reduced to this output (only the steps and models it needs),
  every input pinned by its content hash, paths relative to the folder itself;
- ``README.md``: a model card (Hugging Face front matter, the steps in words, the recipe, the
  inputs with their hashes, the tvrecipe version and the commands that check and rebuild it);
- ``tvrecipe.lock``: this output's lock entry (recipe and input hashes, step keys, the SHA-256
  of every other file in the folder), which ``tvrecipe verify FOLDER`` checks the folder against.

Every byte of the three depends only on the recipe, the inputs' hashes and the tool versions,
never on where or when the run happened, so rebuilding the folder from its own
``tvrecipe.yaml`` gives the same bytes. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from tvrecipe import __version__
from tvrecipe.errors import Problem, VerifyError
from tvrecipe.plan.graph import Compiled
from tvrecipe.store.lock import LOCK_VERSION
from tvrecipe.store.remote import url_scheme

RECIPE_FILE = "tvrecipe.yaml"
LOCK_FILE = "tvrecipe.lock"
CARD_FILE = "README.md"
RELEASE_FILES = (RECIPE_FILE, CARD_FILE, LOCK_FILE)
DEFAULT_TAGS = ["merge", "tvrecipe", "task-vectors"]
# A Hugging Face Hub repository id (``owner/name``), as config.json's ``_name_or_path`` holds
# it for a model loaded from the Hub.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    """The recipe a run was given (file name and the hash of its content,
    :func:`tvrecipe.spec.load.recipe_content_sha256`), which output headers record.

    A rebuild from a folder's own ``tvrecipe.yaml`` passes the original's, so that its bytes
    are the original run's.
    """

    file: str
    sha256: str


def needed_by(compiled: Compiled, output: str) -> tuple[list[str], list[str]]:
    """The models and steps one output depends on, each in recipe order."""
    spec, res = compiled.outputs[output]
    stack, seen = [res.node], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        step = compiled.steps.get(node)
        if step is not None:
            stack.extend(r.node for refs in step.refs.values() for r in refs)
    if spec.copy_files_from:
        seen.add(spec.copy_files_from)
    models = [m for m in compiled.models if m in seen]
    steps = [s for s in compiled.steps if s in seen]
    return models, steps


def _relative(compiled: Compiled, path: str, output: str) -> str:
    """A recipe's model path as a release of ``output`` writes it: seen from the output's
    folder. Absolute paths and URLs stay as they are (as a relative path from the folder, an
    absolute one would change when the project moves, and so would the release's bytes); so
    do all paths when the output's own path is absolute (a folder outside the project, such
    as /scratch/merged: a path from there to the project's models would change with where
    the project is checked out), and they are then relative to the recipe's folder."""
    if (url_scheme(path) is not None or Path(path).expanduser().is_absolute()
            or not _moves_with_project(compiled, output)):
        return path
    folder = compiled.loaded.resolve(compiled.outputs[output][0].path)
    rel = os.path.relpath(compiled.loaded.resolve(path), folder)
    return PurePosixPath(Path(rel)).as_posix()


def _moves_with_project(compiled: Compiled, output: str) -> bool:
    """Whether an output's folder is given relative to the recipe (and so moves with it)."""
    return not Path(compiled.outputs[output][0].path).expanduser().is_absolute()


def _raw_recipe(compiled: Compiled) -> dict[str, Any]:
    text = compiled.loaded.path.read_bytes()
    from tvrecipe.spec.load import recipe_text_sha256
    if recipe_text_sha256(text) != compiled.loaded.text_sha256:
        raise VerifyError(f"{compiled.loaded.path} changed while it ran; run it again")
    return yaml.safe_load(text)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks; everything else as PyYAML writes it."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def pinned_recipe(compiled: Compiled, output: str, digests: dict[str, str]) -> str:
    """The recipe that rebuilds one output from inside its folder: only what that output
    needs, model paths relative to the folder, each input pinned by ``sha256``, and the output
    written to ``.``.

    Args:
        digests: Content hash of each input model (``lockfile.run_state``'s ``inputs``).
    """
    raw = _raw_recipe(compiled)
    models, steps = needed_by(compiled, output)
    doc: dict[str, Any] = {"tvrecipe": raw["tvrecipe"]}
    for key in ("name", "description", "settings"):
        if raw.get(key) is not None:
            doc[key] = raw[key]
    doc["models"] = {}
    for name in models:
        entry = raw["models"][name]
        entry = dict(entry) if isinstance(entry, dict) else {"path": entry}
        entry["path"] = _relative(compiled, entry["path"], output)
        if name in digests:
            entry["sha256"] = digests[name]
        doc["models"][name] = entry
    if steps:
        doc["steps"] = {name: raw["steps"][name] for name in steps}
    doc["outputs"] = {output: {**raw["outputs"][output], "path": "."}}
    where = ("Model paths are relative to this folder" if _moves_with_project(compiled, output)
             else "Model paths are relative to the folder of the recipe that built it (give\n"
                  "# --input NAME=PATH for each one from elsewhere)")
    head = ("# Rebuilds the model in this folder: `tvrecipe verify . --recompute` (from this\n"
            f"# folder). {where}; each input is pinned by its\n"
            f"# content hash. Written by tvrecipe {__version__}.\n")
    return head + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                            default_flow_style=None, width=100)


def card_options(spec: Any) -> dict[str, Any]:
    """An output's ``model_card`` mapping as set (``true``, ``false``: {})."""
    card = spec.model_card
    return card.model_dump(exclude_none=True) if hasattr(card, "model_dump") else {}


def _base_model_id(compiled: Compiled, output: str) -> str | None:
    """The Hub id of the base checkpoint, where its config.json says it came from the Hub."""
    from tvrecipe.exec.results import base_model_of

    return hub_id(compiled, base_model_of(compiled, compiled.outputs[output][1].node))


def _merged_ids(compiled: Compiled, output: str) -> str | list[str] | None:
    """The Hub ids of the checkpoints a checkpoint output is made of, its base first: one
    id, or a list (how the Hub shows a merge's parents, as mergekit's cards list them)."""
    ids = [i for i in [_base_model_id(compiled, output)] if i]
    for m in needed_by(compiled, output)[0]:
        if compiled.models[m].kind == "checkpoint":
            i = hub_id(compiled, m)
            if i and i not in ids:
                ids.append(i)
    return ids[0] if len(ids) == 1 else ids or None


def vector_base_id(compiled: Compiled, node: str) -> str | None:
    """The Hub id of the checkpoint a vector's deltas are over (:func:`vector_base`), where
    its config.json names one."""
    return hub_id(compiled, vector_base(compiled, node))


def vector_base(compiled: Compiled, node: str) -> str | None:
    """The checkpoint model a vector's deltas are over: the ``base`` of the nearest
    ``extract`` (or adapter) upstream; None when there is none."""
    from tvrecipe.plan.graph import lora_base

    stack, seen = [node], set()
    while stack:
        n = stack.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n in compiled.models:
            if compiled.models[n].kind == "lora":
                return lora_base(compiled.models, n)
            continue
        step = compiled.steps.get(n)
        if step is None:
            continue
        base = step.refs.get("base")
        if base and base[0].node in compiled.models:
            return base[0].node
        stack.extend(r.node for refs in step.refs.values() for r in refs)
    return None


def model_config(compiled: Compiled, model: str | None) -> dict[str, Any]:
    """A checkpoint model's config.json; {} when it has none that can be read."""
    from tvrecipe.store.checkpoint import folder_config

    if model is None or model not in compiled.models:
        return {}
    return folder_config(compiled.loaded.resolve(compiled.models[model].path))


def hub_id(compiled: Compiled, model: str | None) -> str | None:
    """A checkpoint model's Hub id: its ``hf://`` URL's repository, else the repository of
    the Hugging Face cache folder it is in (``models--ORG--NAME/snapshots/REV``), else
    ``_name_or_path`` in its config.json when that has the form of one and is no path from
    a folder on the way to the model (not from where the run starts, nor the recipe: the
    card must be the same bytes wherever the recipe is run from, and rebuilt)."""
    if model is None or model not in compiled.models:
        return None
    path = compiled.models[model].path
    hub = re.match(r"^hf://([A-Za-z0-9][\w.-]*/[\w.-]+?)(@[^/]*)?/?$", path)
    if hub:  # a Hub repository itself (not a dataset or a file in it)
        return hub[1]
    where = compiled.loaded.resolve(path)
    if isinstance(where, Path):
        parts = where.parts
        for i, part in enumerate(parts[:-2]):
            cached = re.fullmatch(r"models--([A-Za-z0-9][\w.-]*?)--([\w.-]+)", part)
            if cached and parts[i + 1] == "snapshots":
                return f"{cached[1]}/{cached[2]}"
    name = model_config(compiled, model).get("_name_or_path", "")
    if not (isinstance(name, str) and _HUB_ID.match(name)) or not isinstance(where, Path):
        return None
    # (a path from a folder on the way to the model: where transformers saved it from)
    folder = where.resolve()
    # (the model's own folder named as its Hub id, `hf download --local-dir org/name`, is one)
    if any(os.path.lexists(up / name) and (up / name).resolve() != folder
           for up in (folder, *folder.parents)):
        return None
    return name


_LICENSE_KEYS = ("license", "license_name", "license_link")


def license_source(compiled: Compiled, output: str) -> str | None:
    """The model whose card's license a released output takes: the one it copies files
    from (an adapter: its base); None for an output that writes no card, or whose
    ``model_card`` gives the license itself."""
    from tvrecipe.exec.results import copy_source, releases

    spec, res = compiled.outputs[output]
    if not releases(compiled, output) or card_options(spec).get("license"):
        return None
    model = (spec.base or vector_base(compiled, res.node) if spec.format == "peft"
             else copy_source(compiled, spec, res))
    return model if model in compiled.models else None


def model_license(compiled: Compiled, model: str) -> dict[str, str]:
    """The license fields (``license``, ``license_name``, ``license_link``) of the front
    matter of a local model folder's README.md; {} when it has none."""
    folder = compiled.loaded.resolve(compiled.models[model].path)
    try:
        text = (folder / CARD_FILE).read_text(encoding="utf-8-sig") \
            if isinstance(folder, Path) else ""
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.DOTALL)
    try:
        front = yaml.safe_load(match[1]) if match else None
    except yaml.YAMLError:
        return {}
    if not isinstance(front, dict) or not isinstance(front.get("license"), str):
        return {}
    return {k: front[k] for k in _LICENSE_KEYS if isinstance(front.get(k), str)}


def license_conflict(compiled: Compiled, output: str) -> Problem | None:
    """Why a released output's card cannot take its :func:`license_source`'s license: another
    model merged into it names another license in its README (a merge is bound by each of
    its models' licenses, so the card must not say the base's alone). None when they agree,
    or when the other models' READMEs name none."""
    source = license_source(compiled, output)
    if source is None:
        return None
    mine = model_license(compiled, source)
    for model in needed_by(compiled, output)[0]:
        theirs = model_license(compiled, model) if model != source else {}
        if theirs and _license_text(theirs).lower() != _license_text(mine).lower():
            said = f"{_license_text(mine)}, from its README.md" if mine else \
                "its README.md names none"
            return compiled.loaded.source.problem(
                ("outputs", output),
                f"the model card would take the license of {source!r} ({said}), but "
                f"{model!r}'s README.md names {_license_text(theirs)}: a merge is bound by "
                "the license of every model in it",
                hint="say the release's license in the output's `model_card: {license: …}` "
                     "(or write no card: `model_card: false`)")
    return None


def _license_text(fields: dict[str, str]) -> str:
    name = fields.get("license", "")
    return f"{name} ({fields['license_name']})" if fields.get("license_name") else name


def base_license(compiled: Compiled, output: str) -> dict[str, str]:
    """The license fields a released output's card takes from its :func:`license_source`:
    a release under the base's license says so. {} when there are none."""
    model = license_source(compiled, output)
    return {} if model is None else model_license(compiled, model)


def _step_line(name: str, raw_step: dict[str, Any], compiled: Compiled) -> str:
    step = compiled.steps[name]
    params = ", ".join(f"{k}: {_flow(v)}" for k, v in raw_step.items() if k != "op")
    summary = type(step.spec).summary().rstrip(".")
    return f"- `{name}` = `{step.spec.op}` ({params}): {summary}."


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-4].strip() if text.endswith(("\n...", " ...")) else text


def model_card(compiled: Compiled, output: str, recipe_text: str,
               inputs: dict[str, dict[str, str]], files: list[str]) -> str:
    """The ``README.md`` of one checkpoint output."""
    spec, _res = compiled.outputs[output]
    options = card_options(spec)
    raw = yaml.safe_load(recipe_text)
    front: dict[str, Any] = {}
    adapter = spec.format == "peft"
    base = options.get("base_model") or (
        spec.base_model or vector_base_id(compiled, compiled.outputs[output][1].node)
        if adapter else _merged_ids(compiled, output))
    if base:
        front["base_model"] = base
    licensing = ({k: options[k] for k in _LICENSE_KEYS if options.get(k)}
                 if options.get("license") else base_license(compiled, output))
    front.update(licensing)
    library = options.get("library_name") or (
        "peft" if adapter else "transformers" if "config.json" in files else None)
    if library:
        front["library_name"] = library
    front["tags"] = DEFAULT_TAGS + [t for t in options.get("tags", []) if t not in DEFAULT_TAGS]
    title = raw.get("name") or output
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---",
             "", f"# {title}", ""]
    if raw.get("description"):
        lines += [raw["description"].strip(), ""]
    lines += [(f"This {'adapter' if adapter else 'model'} was built by tvrecipe {__version__} "
               "from a merge recipe: the file "
               f"`{RECIPE_FILE}` in this folder rebuilds it byte for byte from the inputs "
               "below."), "",
              "## How it was made", ""]
    steps = raw.get("steps") or {}
    if steps:
        lines += [_step_line(n, s, compiled) for n, s in steps.items()]
    else:
        lines.append("No steps: the output is an input model, written again.")
    lines += ["", f"Output `{output}` writes `{raw['outputs'][output]['from']}`.", "",
              "## Inputs", "", "| model | path (from this folder) | sha256 |", "|---|---|---|"]
    for name, entry in inputs.items():
        lines.append(f"| `{name}` | `{entry['path']}` | `{entry['sha256']}` |")
    lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip("\n"), "```", "",
              "## Check and rebuild", "",
              "```bash",
              f"pip install tvrecipe=={__version__}",
              "tvrecipe verify .              # every file against tvrecipe.lock",
              "tvrecipe verify . --recompute  # rebuild from the inputs, compare byte for byte",
              "```", "",
              ("`--recompute` reads the inputs at the paths in `tvrecipe.yaml`; where one is "
               "elsewhere, add `--input NAME=PATH` (its pinned sha256 makes sure it is the same "
               "model)."), ""]
    return "\n".join(lines)


def write_release(compiled: Compiled, output: str, staging: Path, digests: dict[str, str],
                  state: dict[str, Any], source: Source, tool: dict[str, str],
                  allow_nonfinite: bool = False) -> dict[str, str]:
    """Write ``tvrecipe.yaml``, ``README.md`` and ``tvrecipe.lock`` into a staging folder.

    Args:
        digests: SHA-256 of the files already hashed as they were written (weights).
        state: ``lockfile.run_state`` of the run (input hashes and step keys).
        allow_nonfinite: The run let NaN or Inf in its inputs through: recorded (only then),
            so that ``verify --recompute`` lets them through too.

    Returns:
        SHA-256 of the three files and of every file in the folder, by relative path.
    """
    from tvrecipe.store.hashing import sha256_file

    models, steps = needed_by(compiled, output)
    inputs = {m: {"path": _relative(compiled, compiled.models[m].path, output),
                  "sha256": state["inputs"][m]["sha256"]}
              for m in models if m in state["inputs"]}
    recipe_text = pinned_recipe(compiled, output,
                                {m: e["sha256"] for m, e in inputs.items()})
    files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    card = model_card(compiled, output, recipe_text, inputs, files + [RECIPE_FILE])
    out: dict[str, str] = {}
    for name, text in ((RECIPE_FILE, recipe_text), (CARD_FILE, card)):
        data = text.encode("utf-8")
        (staging / name).write_bytes(data)
        out[name] = hashlib.sha256(data).hexdigest()
    hashes = {}
    for p in sorted(staging.rglob("*")):
        rel = str(p.relative_to(staging))
        if p.is_file() and rel != LOCK_FILE:
            hashes[rel] = out.get(rel) or digests.get(rel) or sha256_file(p)
    entry = {"lock_version": LOCK_VERSION, "output": output,
             "recipe": {"file": RECIPE_FILE,
                        "sha256": hashlib.sha256(recipe_text.encode("utf-8")).hexdigest()},
             "built_from": {"file": source.file, "sha256": source.sha256},
             "inputs": inputs, "steps": {s: state["steps"][s] for s in steps},
             "files": hashes, "tool": tool}
    if allow_nonfinite:
        entry["allow_nonfinite"] = True
    data = yaml.safe_dump(entry, sort_keys=True, default_flow_style=False,
                          allow_unicode=True).encode("utf-8")
    (staging / LOCK_FILE).write_bytes(data)
    out[LOCK_FILE] = hashlib.sha256(data).hexdigest()
    return {**hashes, LOCK_FILE: out[LOCK_FILE]}


def read_release(folder: Path) -> dict[str, Any]:
    """The lock entry an output folder carries.

    Raises:
        VerifyError: the folder has none, or it is unreadable.
    """
    path = folder / LOCK_FILE
    if not path.is_file():
        raise VerifyError(
            f"{folder} is a folder without {LOCK_FILE}: `tvrecipe verify` takes a recipe file, "
            "or a checkpoint output folder written with its model card (an output without "
            "`model_card: false`)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise VerifyError(f"{path}: unreadable ({exc})") from None
    if (not isinstance(data, dict) or data.get("lock_version") != LOCK_VERSION
            or not isinstance(data.get("files"), dict)):
        raise VerifyError(f"{path}: not a version-{LOCK_VERSION} tvrecipe output lock")
    from tvrecipe.store.lock import lock_shape_problem
    wrong = lock_shape_problem(data)
    if wrong:
        raise VerifyError(f"{path}: {wrong}: not the lock tvrecipe wrote")
    return data


def folder_differences(folder: Path, locked: dict[str, str], label: str,
                       reference: Path | None = None) -> list[str]:
    """How the files of a folder (its own lock file aside) differ from ``locked``; with
    ``reference`` (a folder with the locked bytes), how each differing file differs."""
    from tvrecipe.store.hashing import HashMemo
    from tvrecipe.store.lock import diff_hashes, hash_tree

    got = hash_tree(folder, HashMemo(None), hidden=False) if folder.is_dir() else {}
    got.pop(LOCK_FILE, None)
    return diff_hashes(locked, got, label, None if reference is None else (folder, reference))
