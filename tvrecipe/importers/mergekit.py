"""Convert a mergekit config into a tvrecipe recipe (``tvrecipe import``): one step per stage."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvrecipe.errors import Problem, RecipeError, TvrecipeError
from tvrecipe.spec.load import did_you_mean
from tvrecipe.spec.pertensor import GLOB_CHARS, is_rules
from tvrecipe.spec.yamlsource import SourceMap, load_yaml
from tvrecipe.store.checkpoint import folder_config, open_checkpoint


@dataclass(frozen=True)
class _Method:
    """A mergekit method of the generalized task arithmetic family (sparsify, then combine)."""

    sparsify: str | None      # tvrecipe op of the sparsifier, or None
    consensus: bool           # sign election (mergekit's ConsensusMethod.sum)
    normalize: bool           # mergekit's default for `normalize`
    rescale: bool             # mergekit's default for `rescale`
    extra: tuple[tuple[str, float], ...] = ()   # per-model parameters beyond weight, density


# mergekit 0.1.5's registry (merge_methods/registry.py), in tvrecipe's terms.
GTA = {
    "task_arithmetic": _Method(None, False, False, False),
    "ties": _Method("prune", True, True, False),
    "dare_ties": _Method("dare", True, False, True),
    "dare_linear": _Method("dare", False, False, True),
    "breadcrumbs": _Method("breadcrumbs", False, False, False, (("gamma", 0.01),)),
    "breadcrumbs_ties": _Method("breadcrumbs", True, False, False, (("gamma", 0.01),)),
    "della": _Method("della", True, True, True, (("epsilon", 0.15),)),
    "della_linear": _Method("della", False, False, True, (("epsilon", 0.15),)),
}
METHODS = (*GTA, "linear", "slerp", "model_stock")
# Parameters mergekit reads per method: per model (a config-wide value is their default) and
# config-wide only (mergekit ignores them under models[].parameters).
_PER_MODEL = {
    **{m: {"weight", "density", *(k for k, _ in g.extra)} for m, g in GTA.items()},
    "linear": {"weight"},
    "slerp": set(),
    "model_stock": set(),
}
_SHARED_ONLY = {
    **{m: {"normalize", "rescale", "lambda", "int8_mask"} for m in GTA},
    "linear": {"normalize"},
    "slerp": {"t"},
    "model_stock": {"filter_wise"},
}
# mergekit's methods the importer does not write (a near name is no typo of a supported one).
_OTHER_METHODS = {"nuslerp", "multislerp", "sce", "karcher", "passthrough", "arcee_fusion",
                  "nearswap"}
# Every parameter some method reads: one another method reads is ignored by mergekit, as the
# importer does (and says); any other name is refused as a likely typo.
_KNOWN_PARAMS = set().union(*_PER_MODEL.values(), *_SHARED_ONLY.values())
# Parameters with a range, as tvrecipe's ops take them (mergekit's own is wider: see value()).
_DENSITY_PARAMS = {"density"}
# mergekit's dtype names (common.dtype_from_name) that a float model can be written in.
_DTYPES = ("bfloat16", "float16", "float32", "float64")
# What a model's config.json calls its number of layers (a full layer_range ends there).
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_UNSUPPORTED = {
    "slices": "layer slices (passthrough, frankenmerges) are not expressible in a recipe",
    "modules": "per-module configs are not expressible in a recipe",
    "tokenizer": "tokenizer surgery is not supported; merge models that share a vocabulary",
    "chat_template": "chat templates are not written: the output keeps the chat template "
                     "of the model its tokenizer files come from (remove the line to keep "
                     "that one, or copy another into the output by hand)",
}
_NAME_RE = re.compile(r"[^A-Za-z0-9_\-]+")
# The steps an imported recipe has (and sparse_MODEL): no model takes one of these names.
_STEP_NAMES = ("tv", "sparse", "merged", "stock", "model")
# Strings written without quotes: names, references and paths YAML reads back as the same text.
_PLAIN = re.compile(r"^[A-Za-z_./][A-Za-z0-9_./\-]*$")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


@dataclass
class _Model:
    name: str
    path: str
    where: tuple
    parameters: dict[str, Any] = field(default_factory=dict)
    listed: bool = False   # the base model, listed among `models` too
    order: int = 1 << 30   # its place among the models (a base_model not listed: after them)
    # `MODEL+ADAPTER`: the adapter's path; then ``name`` is the step that merges it into the
    # checkpoint model ``checkpoint`` (mergekit merges it first, with peft), through the
    # `kind: lora` model ``adapter``.
    lora: str | None = None
    checkpoint: str | None = None
    adapter: str | None = None

    @property
    def files(self) -> str:
        """The model whose config and tokenizer the output copies."""
        return self.checkpoint or self.name


class _Importer:
    def __init__(self, data: Any, smap: SourceMap, source: Path, recipe: Path,
                 output_path: str | None):
        self.data = data
        self.smap = smap
        self.source = source
        self.recipe = recipe
        self.output_path = output_path
        self.problems: list[Problem] = []
        self.ignored: list[Problem] = []
        self.names: set[str] = set(_STEP_NAMES)  # (a model named so gets model_2, ...)
        self.slice_parameters: dict[str, Any] = {}
        self.slice_why: str | None = None  # why a slice is not read as models
        self.dtypes: dict[str, str] = {}  # dtype, out_dtype: as tvrecipe names them

    def problem(self, where: tuple, message: str, hint: str | None = None) -> None:
        self.problems.append(self.smap.problem(where, message, hint))
        self.problems.sort(key=lambda p: (p.line or 0, p.column or 0))

    def ignore(self, where: tuple, why: str) -> None:
        """A setting mergekit ignores: left out, as mergekit leaves it, and said (a comment
        atop the recipe, a note from the command)."""
        self.ignored.append(self.smap.problem(where, f"ignored, as mergekit ignores it: {why}"))
        self.ignored.sort(key=lambda p: (p.line or 0, p.column or 0))

    # ---- values --------------------------------------------------------------------------
    def value(self, raw: Any, where: tuple) -> Any:
        """A mergekit parameter setting as a tvrecipe per-tensor value (None if invalid)."""
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            # YAML 1.1 reads 5e-1 (no dot) as text; mergekit's pydantic takes it as a number.
            try:
                number = float(raw)
            except ValueError:
                pass
            else:
                if math.isfinite(number):
                    raw = number
        if isinstance(raw, (int, float)) or (
                isinstance(raw, list) and raw and all(isinstance(v, (int, float))
                                                      and not isinstance(v, bool) for v in raw)):
            if not all(math.isfinite(v) for v in (raw if isinstance(raw, list) else [raw])):
                self.problem(where, f"a parameter must be finite, got {raw!r}")
                return None
            if not isinstance(raw, list):
                return raw
            return raw[0] if len(raw) == 1 else list(raw)
        if isinstance(raw, dict):
            raw = [raw]  # mergekit accepts one bare rule
        if isinstance(raw, list) and raw and all(isinstance(v, dict) for v in raw):
            rules = []
            for i, rule in enumerate(raw):
                unknown = sorted(set(rule) - {"filter", "value"})
                if unknown or "value" not in rule:
                    self.problem((*where, i), f"a conditional parameter has keys "
                                              f"{sorted(rule)}", "write {filter: ..., value: ...}"
                                 + ("; mergekit ignores 'pattern', so this rule would apply to "
                                    "every tensor" if "pattern" in rule else ""))
                    return None
                pattern = rule.get("filter")
                value = self.value(rule["value"], (*where, i, "value"))
                if value is None or is_rules(value):
                    return None
                if pattern in (None, "", "*"):
                    rules.append({"value": value})
                    break  # mergekit never reaches the rules after a catch-all
                if set(str(pattern)) & GLOB_CHARS:
                    self.problem((*where, i, "filter"),
                                 f"filter {pattern!r} has a glob character: mergekit matches it "
                                 "as a substring, a tvrecipe rule as a glob",
                                 "use a filter without '*', '?' and '['")
                    return None
                rules.append({"match": str(pattern), "value": value})
            return rules
        self.problem(where, f"a parameter must be a number, a list of numbers (a gradient) or "
                            f"a list of {{filter, value}} rules, got {raw!r}")
        return None

    # ---- models --------------------------------------------------------------------------
    def density(self, raw: Any, where: tuple) -> Any:
        """:meth:`value` of a density, in the (0, 1] tvrecipe's ops take. mergekit keeps a
        tensor whole at a density >= 1, as a density of 1 does, so such a number is written
        1.0; one <= 0 (mergekit drops the whole delta) and a gradient with a point outside
        (its points between would be outside too) are refused."""
        value = self.value(raw, where)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value <= 0:
                self.problem(where, f"density {value!r} is not above 0: mergekit drops the "
                                    "whole task vector there, tvrecipe's ops keep at least "
                                    "one entry", "leave the model out (or give it a weight "
                                                 "of 0) where it should add nothing")
                return None
            return 1.0 if value >= 1 else value
        if isinstance(value, list) and value and not is_rules(value):
            if any(v <= 0 or v > 1 for v in value):
                self.problem(where, f"density gradient {value!r} has a point outside (0, 1], "
                                    "the densities tvrecipe's ops take (mergekit reads <= 0 "
                                    "as nothing kept, >= 1 as everything)",
                             "keep its points in (0, 1]; 1 keeps a tensor whole")
                return None
            return value
        if is_rules(value):
            out = []
            for i, rule in enumerate(value):
                one = self.density(rule["value"], (*where, i, "value"))
                if one is None:
                    return None
                out.append({**rule, "value": one})
            return out
        return value

    def models_key(self) -> tuple:
        """Where the config lists its models: ``models:``, else ``slices:`` (the top if
        neither)."""
        return next(((k,) for k in ("models", "slices") if k in self.data), ())

    def same_vocabulary(self, models: list[_Model], where: tuple) -> None:
        """With ``tokenizer_source``, mergekit maps every model's embedding rows onto that
        tokenizer's vocabulary; tvrecipe copies the base's tokenizer and merges the rows as
        they are, which is the same only when every (local) model has the base's vocabulary."""
        folder = self.recipe.resolve().parent
        sizes = {m.path: folder_config(folder / m.path).get("vocab_size") for m in models}
        known = {p: v for p, v in sizes.items() if isinstance(v, int)}
        if len(set(known.values())) > 1:
            said = ", ".join(f"{p}: {v}" for p, v in known.items())
            self.problem(where,
                         f"tokenizer_source is imported only for models that share a vocabulary; "
                         f"their config.json vocab_size differ ({said}), and mergekit re-maps "
                         "embedding rows between tokenizers, which tvrecipe does not",
                         "merge models with the base's vocabulary, or run this config in "
                         "mergekit")

    def whole_slice(self, slices: Any) -> list[tuple[tuple, dict]] | None:
        """The sources of a config's only slice as ``models`` entries (where, entry), when
        every source spans all its model's layers ([0, n], n from its config.json), so the
        slice is the models form (mergekit turns ``models`` into just such a slice): the
        common form of slerp configs. None for any other slices."""
        if not (isinstance(slices, list) and len(slices) == 1 and isinstance(slices[0], dict)
                and set(slices[0]) <= {"sources", "parameters"}
                and isinstance(slices[0].get("sources"), list)
                and isinstance(slices[0].get("parameters") or {}, dict)):
            return None
        out = []
        for i, src in enumerate(slices[0]["sources"]):
            reference = _reference(src.get("model")) if isinstance(src, dict) else None
            if reference is None or not set(src) <= {"model", "layer_range", "parameters"}:
                return None
            span = src.get("layer_range")
            model = _split(reference)[0]
            layers = _layers(Path(model).expanduser())
            if layers is None:
                self.slice_why = (
                    f"the number of layers of {model!r} is not known here "
                    "(it needs a "
                    "local folder whose config.json gives num_hidden_layers; a hub id is not "
                    f"read), so whether layer_range {span} spans them all cannot be told: give "
                    "its folder, or write the config with `models:`")
                return None
            if span != [0, layers]:
                self.slice_why = (f"{src['model']!r} has {layers} layers and the slice takes "
                                  f"layer_range {span}: only [0, {layers}] (all of them) is "
                                  "imported, as models")
                return None
            entry = {"model": src["model"], "parameters": src.get("parameters")}
            out.append((("slices", 0, "sources", i), entry))
        # The slice's own parameters come before the config's, for every tensor it covers:
        # all of them here.
        self.slice_parameters = dict(slices[0].get("parameters") or {})
        return out or None

    def model_ref(self, raw: Any, where: tuple) -> tuple[str, str | None] | None:
        """The model's path as the recipe writes it, and its LoRA adapter's (``MODEL+ADAPTER``,
        or ``{model: ..., lora: ...}``, as mergekit's ModelReference reads them), or None."""
        text = _reference(raw)
        if text is None:
            lora = raw.get("lora") if isinstance(raw, dict) else None
            if lora is not None and _reference(raw.get("model")) is not None:
                self.problem((*where, "lora"), f"a LoRA adapter must be a path, got {lora!r}")
            else:
                self.problem(where, f"a model must be a path, got {raw!r}")
            return None
        model, lora = _split(text)
        if lora is not None and not (model and lora and "+" not in lora):
            self.problem(where, f"{text!r} is not MODEL+ADAPTER (one '+', a path on each side)")
            return None
        return self._path(model), (self._path(lora) if lora is not None else None)

    def _path(self, raw: str) -> str:
        path = Path(raw).expanduser()
        if not path.is_absolute() and not (Path.cwd() / path).exists() and \
                raw.count("/") == 1 and not raw.startswith("."):
            return "hf://" + raw  # a hub id, as mergekit reads it: from the Hugging Face Hub
        return _beside(self.recipe, path)

    def model(self, raw: Any, where: tuple, at: tuple, wanted: str | None = None
              ) -> _Model | None:
        """The input ``raw`` (at ``at`` in the config) of the entry at ``where`` names; with a
        LoRA adapter, the names of its checkpoint, its adapter and the step that merges them."""
        ref = self.model_ref(raw, at)
        if ref is None:
            return None
        path, lora = ref
        if lora is None:
            return _Model(self.name_for(path, wanted), path, where)
        checkpoint = self.name_for(path, wanted)
        adapter = self.name_for(f"{checkpoint}_lora")
        return _Model(self.name_for(f"{checkpoint}_with_lora"), path, where, lora=lora,
                      checkpoint=checkpoint, adapter=adapter)

    def name_for(self, path: str, wanted: str | None = None) -> str:
        stem = wanted or Path(path.rstrip("/")).name or "model"
        name = _NAME_RE.sub("_", stem).strip("_-") or "model"
        if not re.match(r"[A-Za-z_]", name) or name.startswith("sparse_"):
            name = "m_" + name  # (sparse_NAME is a step's name)
        base, i = name, 2
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    # ---- conversion ----------------------------------------------------------------------
    def run(self) -> str:
        data = self.data
        if not isinstance(data, dict):
            self.problem((), "a mergekit config is a YAML mapping")
            raise RecipeError(self.problems)
        entries = [(("models", i), e) for i, e in enumerate(data.get("models") or [])]
        tok, tok_where = data.get("tokenizer_source"), ("tokenizer_source",)
        for key, why in _UNSUPPORTED.items():
            if not data.get(key):
                continue
            if key == "tokenizer" and isinstance(data[key], dict) and set(data[key]) == {"source"}:
                # (mergekit's newer spelling of tokenizer_source, with no tokens to add)
                tok, tok_where = data[key]["source"], ("tokenizer", "source")
                continue
            if key == "slices" and not entries:
                whole = self.whole_slice(data[key])
                if whole:
                    entries = whole
                    continue
            hint = ((self.slice_why or "a single slice whose sources all "
                     "span every layer is imported as models") if key == "slices" else None)
            self.problem((key,), f"'{key}' is not imported: {why}", hint)
        known = {"models", "merge_method", "base_model", "dtype", "out_dtype", "parameters",
                 "tokenizer_source", "name", *_UNSUPPORTED}
        for key in data:
            if key not in known:
                self.problem((key,), f"unknown mergekit field {key!r}",
                             did_you_mean(key, known))
        method = data.get("merge_method")
        if method not in METHODS:
            # (nuslerp and multislerp are other algorithms than slerp, not its misspellings)
            near = None if method in _OTHER_METHODS else did_you_mean(str(method), METHODS)
            self.problem(("merge_method",), f"merge_method {method!r} is not imported",
                         near or "supported: " + ", ".join(METHODS))
        for key in ("dtype", "out_dtype"):
            raw = data.get(key)
            name = raw[len("torch."):] if isinstance(raw, str) and raw.startswith("torch.") \
                else raw
            if name in _DTYPES:
                self.dtypes[key] = name
            elif raw is not None:
                self.problem((key,), f"{key} {raw!r} is not a dtype a merged model is written in",
                             "one of: " + ", ".join(_DTYPES))
        if tok not in (None, "base", "union") and (
                _reference(tok) is None or _reference(tok) != _reference(data.get("base_model"))):
            self.problem(tok_where, f"tokenizer source {tok!r} is not imported: only 'base', "
                                    "'union' or the base model itself, over models that share "
                                    "the base's vocabulary (the output takes the base's "
                                    "tokenizer files)",
                         "run this config in mergekit to take another model's tokenizer")
        base = None
        if data.get("base_model") is not None:
            base = self.model(data["base_model"], ("base_model",), ("base_model",), "base")
        models: list[_Model] = []
        seen: dict[str, tuple] = {}
        for order, (where, entry) in enumerate(entries):
            if not isinstance(entry, dict) or "model" not in entry:
                self.problem(where, "a models entry is {model: PATH, parameters: {...}}")
                continue
            # (mergekit tells inputs apart by their reference: a path's text, whichever form
            # writes it)
            text = _reference(entry["model"]) or json.dumps(entry["model"], sort_keys=True)
            if text in seen:
                self.problem((*where, "model"), f"{entry['model']!r} is listed twice; mergekit "
                                                "refuses duplicate inputs",
                             "list it once, with the weight it should have")
                continue
            seen[text] = where
            for key in sorted(set(entry) - {"model", "parameters"}, key=str):
                # (mergekit's model entries have no other field: it drops them unread)
                self.ignore((*where, key), f"{key!r} beside 'model' is not one of its "
                            f"parameters (write it under parameters: to have it read)")
            params = entry.get("parameters") or {}
            if base is not None and text == _reference(data.get("base_model")):
                # mergekit lists the base among the models at times: an input of linear and
                # slerp, never a task vector of its own.
                base.parameters, base.listed, base.where = params, True, where
                base.order = order
                continue
            model = self.model(entry["model"], where, (*where, "model"))
            if model is None:
                continue
            model.parameters, model.order = params, order
            models.append(model)
        if not models and not self.problems:
            if base is not None and base.listed:
                self.problem(base.where, "no models to merge: the only model is base_model, "
                                         "so the merge is the base itself",
                             "use the base model as it is (a `MODEL+ADAPTER` base: a recipe "
                             "that applies the adapter, as `tvrecipe import` writes for one "
                             "among other models)")
            else:
                self.problem(self.models_key(), "no models to merge")
        if "slices" in data and entries and base is not None and not base.listed:
            self.problem(("slices", 0, "sources"), "base_model is not among the slice's "
                                                   "sources: mergekit adds it to a models list, "
                                                   "not to a slice, and stops",
                         "add it to the sources with the same layer_range")
        if tok is not None:  # (the base's, or with none the first model's, vocabulary)
            self.same_vocabulary([*([base] if base is not None else []), *models], tok_where)
        shared = {**(data.get("parameters") or {}), **self.slice_parameters}
        if method not in METHODS:  # parameters are checked against a method's
            raise RecipeError(self.problems)
        per_model, shared_only = _PER_MODEL[method], _SHARED_ONLY[method]
        allowed = per_model | shared_only
        listed = models + ([base] if base is not None and base.listed else [])
        for where, params, own in [(("parameters",), shared, False)] + [
                ((*m.where, "parameters"), m.parameters, True) for m in listed]:
            for key in list(params):
                if own and key in shared_only:
                    self.ignore((*where, key), f"{method}'s {key!r} is config-wide: mergekit "
                                               f"reads parameters.{key} only")
                elif key in allowed:
                    continue
                elif key in _KNOWN_PARAMS:
                    self.ignore((*where, key), f"{method} does not read {key!r}")
                else:
                    self.problem((*where, key), f"{method} has no parameter {key!r}",
                                 f"{key} is a top-level field of the config, not a parameter"
                                 if key in ("dtype", "out_dtype", "tokenizer_source") else
                                 did_you_mean(key, allowed) or
                                 "its parameters: " + ", ".join(sorted(allowed)))
                    continue
                del params[key]
        if base is not None and base.listed and method not in ("linear", "slerp"):
            # (the task-vector methods take the base as the origin, never as an input)
            for key in list(base.parameters):
                self.ignore((*base.where, "parameters", key),
                            f"{method} merges the models' differences from base_model, so "
                            f"base_model's own {key!r} weighs nothing")
                del base.parameters[key]
        if self.problems:
            raise RecipeError(self.problems)
        writer = _Writer(self, method, base, models, shared)
        text = writer.write()
        if self.problems:
            raise RecipeError(self.problems)
        return text


def _float_dtypes(folders: list[Path]) -> set[str]:
    """The floating dtypes (safetensors names) the tensors of these local models are stored
    in, from their headers; a model that cannot be read counts for none."""
    found: set[str] = set()
    for folder in folders:
        try:
            ck = open_checkpoint(folder)
        except (OSError, ValueError, TvrecipeError):
            continue
        try:
            found.update(i.dtype for i in ck.tensors.values() if i.is_floating)
        finally:
            ck.close()
    return found


def _layers(folder: Path) -> int | None:
    """A local model's number of layers, from its config.json (None if not known)."""
    config = folder_config(folder)
    found = [config[k] for k in _LAYER_KEYS if isinstance(config.get(k), int)]
    return found[0] if found else None


def _beside(recipe: Path, path: Path) -> str:
    """``path`` (relative to the working folder, as mergekit reads it) as the recipe writes it:
    relative to the recipe's folder."""
    absolute = path if path.is_absolute() else Path.cwd() / path
    rel = os.path.relpath(absolute, recipe.resolve().parent)
    return rel if rel.startswith("..") or os.path.isabs(rel) else "./" + rel


def _reference(raw: Any) -> str | None:
    """A model reference as one text, as mergekit reads its forms: ``PATH``, ``PATH@REV``,
    ``MODEL+ADAPTER``, ``{model: MODEL, lora: ADAPTER}``, ``{path: PATH, revision: REV}``
    for either; None if it is none of them. (Two spellings of one model are one text.)"""
    def path(value: Any) -> str | None:
        if isinstance(value, str):
            return value or None
        if isinstance(value, dict) and isinstance(value.get("path"), str) and value["path"]:
            rev = value.get("revision")
            return value["path"] + (f"@{rev}" if isinstance(rev, str) and rev else "")
        return None

    if not isinstance(raw, dict) or "path" in raw:
        return path(raw)
    model = path(raw.get("model"))
    if model is None:
        return None
    if raw.get("lora") is None:
        return model
    lora = path(raw["lora"])
    return None if lora is None else f"{model}+{lora}"


def _split(text: str) -> tuple[str, str | None]:
    """``MODEL+ADAPTER`` as (model, adapter); a text with no '+' (or a local path that has
    one) as (text, None). More than one '+' leaves them in the adapter's part."""
    if "+" not in text or Path(text).exists():
        return text, None
    model, _sep, lora = text.partition("+")
    return model, lora


def _falls_through(own: Any, shared: Any) -> Any:
    """A per-model value whose rules, where none matches, give the shared value (mergekit
    resolves a missed per-model rule from the config's ``parameters``)."""
    if is_rules(own) and "match" in own[-1] and shared is not None:
        return own + (shared if is_rules(shared) else [{"value": shared}])
    return own


def _or_default(value: Any, default: Any) -> Any:
    """Rules that end without a catch-all, closed with the method's default: where none
    matches, mergekit takes the default (density 1, gamma 0.01, ...). No default (a required
    weight): left open, so the run names the tensor no rule matches, as mergekit fails."""
    if default is not None and is_rules(value) and "match" in value[-1]:
        return value + [{"value": default}]
    return value


def _fmt(value: Any) -> str:
    """A value as YAML flow text."""
    if value is None:  # only after a problem was reported: the text is not written
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        plain = _PLAIN.match(value) and value.lower() not in _YAML_WORDS
        return value if plain else json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"


class _Writer:
    def __init__(self, imp: _Importer, method: str, base: _Model | None, models: list[_Model],
                 shared: dict[str, Any]):
        self.imp = imp
        self.method = method
        self.base = base
        self.models = models
        self.shared = shared
        self.steps: list[tuple[str, str, str]] = []   # (name, flow mapping, comment)

    def read(self, key: str, raw: Any, where: tuple) -> Any:
        return (self.imp.density if key in _DENSITY_PARAMS else self.imp.value)(raw, where)

    def shared_value(self, key: str, default: Any) -> tuple[Any, str]:
        if key in self.shared:
            value = self.read(key, self.shared[key], ("parameters", key))
            return _or_default(value, default), f"parameters.{key}"
        return default, f"mergekit's default for {self.method}"

    def per_model(self, key: str, default: Any, required: bool = False
                  ) -> tuple[dict[str, Any], str]:
        """Each model's value of a per-model parameter, and where it came from."""
        shared, _source = self.shared_value(key, None)
        values, sources = {}, set()
        for m in self.models:
            if key in m.parameters:
                own = self.read(key, m.parameters[key], (*m.where, "parameters", key))
                values[m.name] = _or_default(_falls_through(own, shared), default)
                sources.add("models[].parameters")
            elif shared is not None:
                values[m.name] = _or_default(shared, default)
                sources.add("parameters")
            elif required and m is self.base and not m.listed:
                self.imp.problem(m.where, f"mergekit merges base_model {m.path!r} as one more "
                                          f"input of {self.method}, and the config gives it no "
                                          f"'{key}'", f"list it among the models with a {key}, "
                                                      f"set parameters.{key}, or drop base_model")
            elif required:
                self.imp.problem(m.where, f"model {m.path!r} has no '{key}' and the config "
                                          f"sets none for all models",
                                 f"{self.method} needs a {key} for every model")
            else:
                values[m.name] = default
                sources.add("default")
        return values, key + " from " + ", ".join(sorted(sources))

    def add(self, name: str, fields: dict[str, Any], comment: str) -> str:
        self.steps.append((name, _fmt(fields), comment))
        return name

    def write(self) -> str:
        method = self.method
        for m in [*([self.base] if self.base else []), *self.models]:
            if m.lora is not None:
                self.add(m.name, {"op": "apply", "base": m.checkpoint, "delta": m.adapter},
                         f"{m.checkpoint} with its LoRA adapter merged in, as mergekit does "
                         "first (peft's merge_and_unload: θ + (α/r)·B·A)")
        names = [m.name for m in self.models]
        if method == "linear":
            # mergekit adds a base_model it does not find among the models as the last input
            # (weighed by the config-wide weight); a listed one keeps its place.
            inputs = sorted(self.models + ([self.base] if self.base else []),
                            key=lambda m: m.order)
            self.models = inputs
            weights, src = self.per_model("weight", None, required=True)
            normalize, nsrc = self.shared_value("normalize", True)
            self.add("model", {"op": "linear", "inputs": [m.name for m in inputs],
                               "weights": [weights.get(m.name) for m in inputs],
                               "normalize": normalize}, f"{src}; normalize: {nsrc}")
        elif method == "slerp":
            if self.base is None or len(self.models) != 1:
                got = ("no base_model" if self.base is None else
                       f"{len(self.models)} other models")
                self.imp.problem(self.imp.models_key(), "slerp needs a base_model and "
                                 f"exactly one other model; the config has {got}",
                                 "name one of the two models base_model (slerp's t runs from "
                                 "it, at 0, to the other, at 1)")
                return ""
            t, src = self.shared_value("t", None)
            if t is None:
                if "t" not in self.shared:  # (else its own problem was said)
                    self.imp.problem(("parameters",), "slerp needs a 't' parameter",
                                     "set it config-wide: parameters: {t: ...}")
                return ""
            self.add("model", {"op": "slerp", "a": self.base.name, "b": names[0], "t": t},
                     f"t from {src}; t = 0 is base_model")
        else:
            if self.base is None:
                self.imp.problem(("merge_method",), f"{method} needs a base_model (task vectors "
                                                    "are each model minus the base)")
                return ""
            self.add("tv", {"op": "extract", "base": self.base.name, "finetuned": names},
                     "task vectors: each model minus base_model")
            if method == "model_stock":
                if len(names) < 2:
                    self.imp.problem(("models",), "model_stock needs at least 2 models besides "
                                                  "the base")
                fw, src = self.shared_value("filter_wise", False)
                self.add("stock", {"op": "model_stock", "inputs": "tv", "filter_wise": fw},
                         f"t·mean of the task vectors; filter_wise: {src}")
                self.add("model", {"op": "apply", "base": self.base.name, "delta": "stock"},
                         "θ₀ + t·mean(τ) = t·mean(θ) + (1 − t)·θ₀")
            else:
                self.gta(GTA[method], names)
        return self.text()

    def gta(self, m: _Method, names: list[str]) -> None:
        weights, wsrc = self.per_model("weight", None, required=True)
        density, dsrc = self.per_model("density", 1.0)
        normalize, nsrc = self.shared_value("normalize", m.normalize)
        rescale, rsrc = self.shared_value("rescale", m.rescale)
        lam, lsrc = self.shared_value("lambda", 1.0)
        extra = {k: self.per_model(k, d) for k, d in m.extra}
        inputs: Any = "tv"
        sparse = m.sparsify is not None and any(v != 1 and v != 1.0 for v in density.values())
        if sparse:
            def sparsifier(member: str) -> dict[str, Any]:
                f: dict[str, Any] = {"density": density[member]}
                f.update({k: vals[member] for k, (vals, _s) in extra.items()})
                if m.sparsify == "dare":
                    f["rescale"] = "l1" if rescale else False
                elif rescale:
                    f["rescale"] = True
                elif m.sparsify == "della":
                    f["rescale"] = False
                return f

            per = {n: sparsifier(n) for n in names}
            if m.sparsify == "della":
                self.della_range(per)
            comment = "; ".join([dsrc, *(s for _v, s in extra.values()),
                                 f"rescale: {rsrc} (mergekit's rescale keeps the L1 norm)"])
            if all(per[n] == per[names[0]] for n in names):
                inputs = self.add("sparse", {"op": m.sparsify, "input": "tv", **per[names[0]]},
                                  comment)
            else:
                inputs = [self.add(f"sparse_{n}", {"op": m.sparsify, "input": f"tv.{n}",
                                                   **per[n]}, comment) for n in names]
        # A list weighs a list of inputs; a set (tv, sparse) is weighed by member name.
        w_list: Any = ([weights.get(n) for n in names] if isinstance(inputs, list)
                       else {n: weights.get(n) for n in names})
        if m.consensus or normalize:
            fields = {"op": "consensus", "inputs": inputs, "weights": w_list,
                      "majority": "total" if m.consensus else "none", "normalize": normalize}
            how = "sign election (TIES) and " if m.consensus else ""
            self.add("merged", fields, f"{how}weights: {wsrc}; normalize: {nsrc}")
        else:
            self.add("merged", {"op": "sum", "inputs": inputs, "weights": w_list},
                     f"Σ weight·τ; weights: {wsrc}")
        self.add("model", {"op": "apply", "base": self.base.name, "delta": "merged",
                           "scale": lam}, f"θ₀ + λ·merged; λ: {lsrc}")

    def della_range(self, per: dict[str, dict[str, Any]]) -> None:
        """DELLA's keep probabilities density ± epsilon lie in (0, 1) (mergekit stops on a
        tensor where they do not): checked where both are numbers; said at the model."""
        for model in self.models:
            d, e = per[model.name]["density"], per[model.name]["epsilon"]
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                          for v in (d, e))
            if numbers and d < 1 and (d + e >= 1 or d - e <= 0):
                self.imp.problem(model.where, f"della: density ± epsilon must lie strictly "
                                              f"inside (0, 1), got density {d!r} and epsilon "
                                              f"{e!r} for {model.path!r}",
                                 f"take epsilon below {min(d, 1 - d):g}")

    def text(self) -> str:
        imp = self.imp
        rel_source = os.path.relpath(imp.source.resolve(), imp.recipe.resolve().parent)
        lines = [f"# Imported by `tvrecipe import` from the mergekit config {rel_source}",
                 f"# (merge_method: {self.method}). Values say in comments where they came from.",
                 *(f"# {p}" for p in imp.ignored),
                 "tvrecipe: 1", f"name: {_fmt(imp.source.stem)}",
                 f"description: {_fmt('mergekit ' + self.method + ' merge')}"]
        dtype = imp.dtypes.get("dtype")
        compute = "float64" if dtype == "float64" else "float32"
        note = (f"  # mergekit dtype: {dtype}; tvrecipe computes in float32 or float64"
                if dtype not in (None, "float32", "float64") else "")
        lines += ["settings:", f"  compute_dtype: {compute}{note}", "models:"]
        models = ([self.base] if self.base else []) + [
            m for m in self.models if m is not self.base]
        hub = ("a hub id, read from the Hub (needs huggingface_hub; pin a revision with @REV, "
               "or write a local copy's folder)")
        for m in models:
            said = ["base_model"] if m is self.base else []
            if m.path.startswith("hf://"):
                said.append(hub)
            note = f"  # {'; '.join(said)}" if said else ""
            lines.append(f"  {m.files}: {_fmt(m.path)}{note}")
            if m.lora is not None:
                adapter = {"path": m.lora, "kind": "lora", "base": m.checkpoint}
                note = f"  # {hub}" if m.lora.startswith("hf://") else ""
                lines.append(f"  {m.adapter}: {_fmt(adapter)}{note}")
        lines.append("steps:")
        width = max(len(n) for n, _f, _c in self.steps)
        for name, flow, comment in self.steps:
            lines.append(f"  {name + ':':<{width + 1}} {flow}")
            lines.append(f"  {'':<{width + 1}} # {comment}")
        out_dtype = imp.dtypes.get("out_dtype") or dtype
        out = {"from": "model", "path": self.output_path()}
        files = ("files (config, tokenizer) from base_model" if self.base is not None else
                 f"files (config, tokenizer) from {self.models[0].name}, the first model"
                 if self.models else "")
        note = f"  # dtype: out_dtype, else dtype; {files}"
        if out_dtype is None:
            # No dtype: mergekit adds the tensors as stored, and torch promotes a mix of
            # float types (float16 with bfloat16 gives float32), where tvrecipe would write
            # the base's dtype.
            stored = _float_dtypes([imp.recipe.resolve().parent / m.path for m in models
                                    if not m.path.startswith("hf://")])
            if len(stored) > 1:
                out_dtype = "float64" if "F64" in stored else "float32"
                *rest, last = sorted(stored)
                note = (f"  # dtype: the inputs are stored in {', '.join(rest)} and {last} "
                        f"and no dtype is given, so mergekit's sums promote to {out_dtype}; "
                        f"{files}")
        if out_dtype is not None:
            out["dtype"] = out_dtype
        if self.base is not None:
            out["copy_files_from"] = self.base.files
        elif self.models:
            out["copy_files_from"] = self.models[0].files
        lines += ["outputs:", f"  model: {_fmt(out)}{note}"]
        return "\n".join(lines) + "\n"

    def output_path(self) -> str:
        if self.imp.output_path is not None:
            given = Path(self.imp.output_path).expanduser()
            # An absolute path stays absolute (a release disk): it must not move with the recipe.
            return str(given) if given.is_absolute() else _beside(self.imp.recipe, given)
        # ./merged, or the first ./merged_N that is no input and overlaps none (a model
        # folder may be called merged)
        from tvrecipe.store.output import overlap

        folder = self.imp.recipe.resolve().parent
        inputs = [folder / p for m in [*self.models, self.base] if m
                  for p in (m.path, m.lora) if p and not p.startswith("hf://")]
        for n in range(1, 1000):
            name = "./merged" if n == 1 else f"./merged_{n}"
            if not any(overlap(folder / name, i) for i in inputs):
                return name
        return "./merged"  # pragma: no cover


def import_mergekit(config: str | Path, recipe: str | Path,
                    output_path: str | None = None, notes: list[Problem] | None = None) -> str:
    """The text of a recipe that computes what the mergekit ``config`` does.

    Args:
        config: A mergekit YAML config.
        recipe: Where the recipe will be written (paths in it are relative to its folder).
        output_path: The merged model's folder (default ``./merged`` beside the recipe).
        notes: Given, the settings mergekit ignores (and so the recipe) are appended to it,
            located in the config (the recipe says them in comments too).

    Raises:
        RecipeError: with every field that cannot be imported, located in the config.
    """
    config = Path(config)
    if not config.exists():  # (load_yaml would call it a recipe)
        raise RecipeError(Problem(f"mergekit config not found: {config}"))
    data, smap, problems = load_yaml(config)
    if problems:
        raise RecipeError(problems)
    if isinstance(data, dict) and "tvrecipe" in data and "merge_method" not in data:
        raise RecipeError(smap.problem(
            ("tvrecipe",), "this is a tvrecipe recipe already (it has 'tvrecipe:'), not a "
            "mergekit config, so there is nothing to import",
            f"run it as it is: `tvrecipe run {config}`; `tvrecipe import` converts a mergekit "
            "config (one with merge_method:)"))
    importer = _Importer(data, smap, config, Path(recipe), output_path)
    text = importer.run()
    if notes is not None:
        notes.extend(importer.ignored)
    return text
