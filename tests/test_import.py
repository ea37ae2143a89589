"""`tvrecipe import`: mergekit configs become recipes that validate and run; what a recipe cannot
express is refused with located errors, never dropped (mergekit itself is not needed here: the
parity with its outputs is tests/test_mergekit_parity.py)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import yaml

from tests.conftest import FLOATING, read_tensors


def write(cli, name: str, text: str) -> None:
    cli.write(name, textwrap.dedent(text))


def imported(cli, config: str, *extra: str) -> dict:
    write(cli, "mk.yml", config)
    res = cli.ok("import", "mk.yml", "-o", "r.yaml", *extra)
    assert res.stdout.startswith("wrote r.yaml: ")
    return yaml.safe_load((cli.root / "r.yaml").read_text())


def test_ties_with_gradients_and_filters_becomes_readable_steps(make_models, cli, tmp_path):
    make_models(("math", "code"))
    recipe = imported(cli, """
        merge_method: ties
        base_model: ./ckpt/base
        models:
          - model: ./ckpt/base
          - model: ./ckpt/math
            parameters: {weight: [{filter: self_attn, value: 0.8}], density: 0.5}
          - model: ./ckpt/code
            parameters: {weight: {filter: mlp, value: [0.1, 0.9]}, density: [0.3]}
        parameters: {weight: 0.3, lambda: 1.2, int8_mask: true}
        dtype: float32
        out_dtype: bfloat16
    """)
    assert recipe["models"] == {"base": "./ckpt/base", "math": "./ckpt/math",
                                "code": "./ckpt/code"}
    assert recipe["steps"] == {
        "tv": {"op": "extract", "base": "base", "finetuned": ["math", "code"]},
        # Densities differ: one trim per model; a one-number gradient is a number.
        "sparse_math": {"op": "prune", "input": "tv.math", "density": 0.5},
        "sparse_code": {"op": "prune", "input": "tv.code", "density": 0.3},
        # Per-model rules without a default fall through to the shared weight, as in mergekit;
        # a bare rule is a list of one; `filter` is written `match`.
        "merged": {"op": "consensus", "inputs": ["sparse_math", "sparse_code"],
                   "weights": [[{"match": "self_attn", "value": 0.8}, {"value": 0.3}],
                               [{"match": "mlp", "value": [0.1, 0.9]}, {"value": 0.3}]],
                   "majority": "total", "normalize": True},
        "model": {"op": "apply", "base": "base", "delta": "merged", "scale": 1.2}}
    assert recipe["outputs"] == {"model": {"from": "model", "path": "./merged",
                                           "dtype": "bfloat16", "copy_files_from": "base"}}
    assert recipe["settings"] == {"compute_dtype": "float32"}
    cli.ok("run", "r.yaml")
    assert set(read_tensors(tmp_path / "merged")) >= set(FLOATING)


def test_task_arithmetic_is_extract_sum_apply_and_matches_the_math(make_models, cli, tmp_path):
    ms = make_models(("math", "code"))
    recipe = imported(cli, """
        merge_method: task_arithmetic
        base_model: ./ckpt/base
        models:
          - {model: ./ckpt/math, parameters: {weight: 0.5}}
          - {model: ./ckpt/code, parameters: {weight: -0.25}}
        parameters: {lambda: 0.8}
    """, "--output-path", "out/ta")
    assert [s["op"] for s in recipe["steps"].values()] == ["extract", "sum", "apply"]
    assert recipe["outputs"]["model"]["path"] == "./out/ta"
    cli.ok("run", "r.yaml")
    got = read_tensors(tmp_path / "out" / "ta")
    base = ms.f32("base")
    for k in FLOATING:
        want = base[k] + 0.8 * (0.5 * ms.delta("math")[k] - 0.25 * ms.delta("code")[k])
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-7)


EXPECTED_OPS = {
    "dare_ties": ["extract", "dare", "consensus", "apply"],
    "dare_linear": ["extract", "dare", "sum", "apply"],
    "breadcrumbs": ["extract", "breadcrumbs", "sum", "apply"],
    "breadcrumbs_ties": ["extract", "breadcrumbs", "consensus", "apply"],
    "della": ["extract", "della", "consensus", "apply"],
    "della_linear": ["extract", "della", "sum", "apply"],
    "ties": ["extract", "prune", "consensus", "apply"],
    "task_arithmetic": ["extract", "sum", "apply"],
    "model_stock": ["extract", "model_stock", "apply"],
    "linear": ["linear"],
    "slerp": ["slerp"],
}


@pytest.mark.parametrize("method", list(EXPECTED_OPS))
def test_each_method_imports_to_a_recipe_that_validates(make_models, cli, method):
    make_models(("a", "b"))
    if method == "slerp":
        models, params = "[{model: ./ckpt/base}, {model: ./ckpt/a}]", "{t: [0, 1]}"
    else:
        models = ("[{model: ./ckpt/a, parameters: {weight: 1}}, "
                  "{model: ./ckpt/b, parameters: {weight: 1}}]")
        params = "{density: 0.5}" if method in GTA_SPARSE else "{}"
        if method == "linear":  # (mergekit merges base_model too: it needs a weight)
            params = "{weight: 0.5}"
        if method == "model_stock":
            models = "[{model: ./ckpt/a}, {model: ./ckpt/b}]"
    cli.write("mk.yml", f"merge_method: {method}\nbase_model: ./ckpt/base\n"
                        f"models: {models}\nparameters: {params}\n")
    cli.ok("import", "mk.yml", "-o", "r.yaml")
    cli.ok("validate", "r.yaml")
    steps = yaml.safe_load((cli.root / "r.yaml").read_text())["steps"]
    assert [s["op"] for s in steps.values()] == EXPECTED_OPS[method]


GTA_SPARSE = ("dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
              "della_linear", "ties")


def test_what_a_recipe_cannot_express_is_refused_and_located(cli):
    write(cli, "mk.yml", """\
        merge_method: tie
        slices:
          - sources: [{model: a, layer_range: [0, 4]}]
        tokenizer_source: ./other
        foo: 1
    """)
    res = cli.fails(2, "import", "mk.yml", "-o", "r.yaml")
    assert res.err_lines == [
        "tvrecipe: recipe error:",
        "mk.yml:1:1: merge_method: merge_method 'tie' is not imported (did you mean 'ties'?)",
        ("mk.yml:2:1: slices: 'slices' is not imported: layer slices (passthrough, "
         "frankenmerges) are not expressible in a recipe (the number of layers of 'a' is not "
         "known here (it needs a local folder whose config.json gives num_hidden_layers; a hub "
         "id is not read), so whether layer_range [0, 4] spans them all cannot be told: give "
         "its folder, or write the config with `models:`)"),
        ("mk.yml:4:1: tokenizer_source: tokenizer source './other' is not imported: only "
         "'base', 'union' or the base model itself, over models that share the base's "
         "vocabulary (the output takes the base's tokenizer files) (run this config in "
         "mergekit to take another model's tokenizer)"),
        "mk.yml:5:1: foo: unknown mergekit field 'foo'"]
    assert not (cli.root / "r.yaml").exists()


def test_parameters_are_checked_against_the_method(make_models, cli):
    make_models(("math", "code"))
    write(cli, "mk.yml", """\
        merge_method: ties
        base_model: ./ckpt/base
        models:
          - model: ./ckpt/math
            parameters: {density: 0.5, wieght: 1}
          - model: ./ckpt/code+./a+./b
            parameters: {weight: 1}
    """)
    res = cli.fails(2, "import", "mk.yml", "-o", "r.yaml")
    assert res.err_lines[1:] == [
        ("mk.yml:5:32: models[0].parameters.wieght: ties has no parameter 'wieght' (did you "
         "mean 'weight'?)"),
        ("mk.yml:6:5: models[1].model: './ckpt/code+./a+./b' is not MODEL+ADAPTER (one '+', a "
         "path on each side)")]
    write(cli, "mk.yml", """\
        merge_method: ties
        base_model: ./ckpt/base
        models:
          - {model: ./ckpt/math, parameters: {density: 0.5}}
          - {model: ./ckpt/code, parameters: {weight: [{filter: "*.mlp", value: 1}]}}
    """)
    res = cli.fails(2, "import", "mk.yml", "-o", "r.yaml")
    assert res.err_lines[1:] == [
        ("mk.yml:4:5: models[0]: model './ckpt/math' has no 'weight' and the config sets none "
         "for all models (ties needs a weight for every model)"),
        ("mk.yml:5:49: models[1].parameters.weight[0].filter: filter '*.mlp' has a glob "
         "character: mergekit matches it as a substring, a tvrecipe rule as a glob (use a "
         "filter without '*', '?' and '[')")]


@pytest.mark.parametrize("config, message", [
    (("merge_method: slerp\nbase_model: ./ckpt/base\nmodels: [{model: ./ckpt/math}, "
     "{model: ./ckpt/code}]\nparameters: {t: 0.5}\n"),
     ("mk.yml:3:1: models: slerp needs a base_model and exactly one other model; the config "
      "has 2 other models (name one of the two models base_model (slerp's t runs from it, at "
      "0, to the other, at 1))")),
    (("merge_method: slerp\nslices:\n  - sources:\n    - {model: ./ckpt/math, layer_range: "
      "[0, 2]}\n    - {model: ./ckpt/code, layer_range: [0, 2]}\nparameters: {t: 0.5}\n"),
     ("mk.yml:2:1: slices: slerp needs a base_model and exactly one other model; the config "
      "has no base_model (name one of the two models base_model (slerp's t runs from it, at "
      "0, to the other, at 1))")),
    (("merge_method: task_arithmetic\nbase_model: ./ckpt/base\nslices:\n  - sources:\n    - "
      "{model: ./ckpt/base, layer_range: [0, 2]}\n"),
     ("mk.yml:5:7: slices[0].sources[0]: no models to merge: the only model is base_model, so "
      "the merge is the base itself (use the base model as it is (a `MODEL+ADAPTER` base: a "
      "recipe that applies the adapter, as `tvrecipe import` writes for one among other "
      "models))")),
    ("a: 1\n---\nb: 2\n",
     ("mk.yml:2:1: this file holds several YAML documents (separated by ---); it is read as "
      "one (split it into one file per document (a mergekit-multi file: one config per "
      "file))")),
    ("merge_method: ties\nmodels: [{model: ./ckpt/math, parameters: {weight: 1}}]\n",
     ("mk.yml:1:1: merge_method: ties needs a base_model (task vectors are each model minus "
      "the base)")),
    ("merge_method: linear\nmodels: [{model: ./ckpt/math, parameters: {weight: abc}}]\n",
     ("mk.yml:2:44: models[0].parameters.weight: a parameter must be a number, a list of "
      "numbers (a gradient) or a list of {filter, value} rules, got 'abc'")),
])
def test_bad_method_inputs(make_models, cli, config, message):
    ms = make_models(("math", "code"))
    for name in ("base", "math", "code"):  # (2 layers: a slice of [0, 2] is the whole model)
        config_file = ms.path(name) / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                           "num_hidden_layers": 2}))
    cli.write("mk.yml", config)
    assert cli.fails(2, "import", "mk.yml", "-o", "r.yaml").err_lines[1:] == [message]


def test_an_existing_recipe_is_kept_unless_forced(make_models, cli):
    make_models(("math",))
    cli.write("r.yaml", "mine\n")
    write(cli, "mk.yml", """\
        merge_method: linear
        models: [{model: ./ckpt/math, parameters: {weight: 1}}]
    """)
    res = cli.fails(4, "import", "mk.yml", "-o", "r.yaml")
    assert res.err_lines[1:] == ["r.yaml exists; pass --force to replace it"]
    assert (cli.root / "r.yaml").read_text() == "mine\n"
    cli.ok("import", "mk.yml", "-o", "r.yaml", "--force")
    assert "op: linear" in (cli.root / "r.yaml").read_text()
    assert [p.name for p in cli.root.iterdir() if p.name.startswith(".r.yaml")] == []


def test_problems_of_the_method_and_of_the_models_come_together(cli):
    cli.write("mk.yml", "merge_method: tiez\nmodels:\n  - model: ./ckpt/a+\n")
    res = cli.fails(2, "import", "mk.yml", "-o", "r.yaml")
    assert res.err_lines[1:] == [
        "mk.yml:1:1: merge_method: merge_method 'tiez' is not imported (did you mean 'ties'?)",
        ("mk.yml:3:5: models[0].model: './ckpt/a+' is not MODEL+ADAPTER (one '+', a path on "
         "each side)")]


def test_what_mergekit_ignores_is_left_out_and_said(make_models, cli):
    make_models(("math",))
    write(cli, "mk.yml", """\
        merge_method: slerp
        base_model: ./ckpt/base
        models:
          - {model: ./ckpt/base}
          - {model: ./ckpt/math, parameters: {t: 0.9, normalize: true}}
        parameters: {t: 0.25, int8_mask: true}
    """)
    res = cli.ok("import", "mk.yml", "-o", "r.yaml")
    notes = [
        ("mk.yml:5:39: models[1].parameters.t: ignored, as mergekit ignores it: slerp's 't' is "
         "config-wide: mergekit reads parameters.t only"),
        ("mk.yml:5:47: models[1].parameters.normalize: ignored, as mergekit ignores it: slerp "
         "does not read 'normalize'"),
        ("mk.yml:6:23: parameters.int8_mask: ignored, as mergekit ignores it: slerp does not "
         "read 'int8_mask'")]
    assert res.err_lines == [f"note: {n}" for n in notes]
    text = (cli.root / "r.yaml").read_text()
    assert [line[2:] for line in text.splitlines()[2:5]] == notes
    recipe = yaml.safe_load(text)
    assert recipe["steps"] == {"model": {"op": "slerp", "a": "base", "b": "math", "t": 0.25}}


def test_parameters_written_beside_model_are_said_to_be_ignored(make_models, cli):
    # `density:` and `weight:` beside `model:` (not under parameters:) are dropped by
    # mergekit unread; the importer says so instead of dropping them silently.
    make_models(("math", "code"))
    write(cli, "mk.yml", """\
        merge_method: ties
        base_model: ./ckpt/base
        parameters: {weight: 1.0, density: 1.0}
        models:
          - model: ./ckpt/math
            density: 0.2
          - {model: ./ckpt/code}
    """)
    res = cli.ok("import", "mk.yml", "-o", "r.yaml")
    assert res.err_lines == [(
        "note: mk.yml:6:5: models[0].density: ignored, as mergekit ignores it: 'density' beside "
        "'model' is not one of its parameters (write it under parameters: to have it read)")]
    write(cli, "ns.yml", """\
        merge_method: nuslerp
        models: [{model: ./ckpt/math}, {model: ./ckpt/code}]
    """)
    res = cli.fails(2, "import", "ns.yml", "-o", "n.yaml")
    assert "merge_method 'nuslerp' is not imported (supported: task_arithmetic," in res.stderr
    assert "did you mean" not in res.stderr


def test_a_listed_base_models_own_parameters_are_said_to_weigh_nothing(make_models, cli):
    # A task-vector method takes base_model as the origin: its parameters weigh nothing
    # (mergekit and tvrecipe alike); the importer says so, as for other ignored settings.
    make_models(("math",))
    write(cli, "mk.yml", """\
        merge_method: ties
        base_model: ./ckpt/base
        models:
          - {model: ./ckpt/base, parameters: {weight: 0.8, density: 0.5}}
          - {model: ./ckpt/math, parameters: {weight: 1, density: 0.5}}
    """)
    res = cli.ok("import", "mk.yml", "-o", "r.yaml")
    assert res.err_lines == [
        (f"note: mk.yml:4:{col}: models[0].parameters.{key}: ignored, as mergekit ignores it: "
         f"ties merges the models' differences from base_model, so base_model's own {key!r} "
         "weighs nothing") for key, col in (("weight", 39), ("density", 52))]


@pytest.mark.parametrize("config, message", [
    (("merge_method: ties\nbase_model: ./ckpt/base\nmodels:\n"
     "  - {model: ./ckpt/math, parameters: {weight: 1, density: 0}}\n"),
     ("mk.yml:4:50: models[0].parameters.density: density 0 is not above 0: mergekit drops "
      "the whole task vector there, tvrecipe's ops keep at least one entry (leave the model "
      "out (or give it a weight of 0) where it should add nothing)")),
    (("merge_method: dare_linear\nbase_model: ./ckpt/base\nmodels:\n"
     "  - {model: ./ckpt/math, parameters: {weight: 1}}\nparameters: {density: [0.5, 1.2]}\n"),
     ("mk.yml:5:14: parameters.density: density gradient [0.5, 1.2] has a point outside "
      "(0, 1], the densities tvrecipe's ops take (mergekit reads <= 0 as nothing kept, >= 1 "
      "as everything) (keep its points in (0, 1]; 1 keeps a tensor whole)")),
    (("merge_method: linear\nmodels: [{model: ./ckpt/math, parameters: {weight: 1}}]\n"
     "dtype: bf16\n"),
     ("mk.yml:3:1: dtype: dtype 'bf16' is not a dtype a merged model is written in (one of: "
     "bfloat16, float16, float32, float64)")),
    (("merge_method: linear\nbase_model: ./ckpt/base\n"
     "models: [{model: ./ckpt/math, parameters: {weight: 1}}]\n"),
     ("mk.yml:2:1: base_model: mergekit merges base_model './ckpt/base' as one more input of "
      "linear, and the config gives it no 'weight' (list it among the models with a weight, "
      "set parameters.weight, or drop base_model)")),
    (("merge_method: task_arithmetic\nbase_model: ./ckpt/base\n"
      "models: [{model: ./ckpt/math, parameters: {weight: [1, .nan]}}]\nparameters: {lambda: .inf}\n"),
     ["mk.yml:3:44: models[0].parameters.weight: a parameter must be finite, got [1, nan]",
      "mk.yml:4:14: parameters.lambda: a parameter must be finite, got inf"]),
    (("merge_method: della\nbase_model: ./ckpt/base\n"
      "models: [{model: ./ckpt/math, parameters: {weight: 1, density: 0.5}}]\n"
      "parameters: {epsilon: 0.6}\n"),
     ("mk.yml:3:10: models[0]: della: density ± epsilon must lie strictly inside (0, 1), got "
      "density 0.5 and epsilon 0.6 for './ckpt/math' (take epsilon below 0.5)")),
    (("merge_method: slerp\nbase_model: ./ckpt/base\n"
     "models: [{model: ./ckpt/math, parameters: {t: 0.5}}]\n"),
     ("mk.yml:1:1: parameters: slerp needs a 't' parameter (set it config-wide: parameters: "
     "{t: ...})")),
])
def test_settings_mergekit_reads_otherwise_are_refused(make_models, cli, config, message):
    make_models(("math",))
    cli.write("mk.yml", config)
    messages = message if isinstance(message, list) else [message]
    assert cli.fails(2, "import", "mk.yml", "-o", "r.yaml").err_lines[1:] == messages
    assert not (cli.root / "r.yaml").exists()


def test_dtype_names_as_mergekit_takes_them(make_models, cli, tmp_path):
    make_models(("math",))
    recipe = imported(cli, """
        merge_method: task_arithmetic
        base_model: ./ckpt/base
        models: [{model: ./ckpt/math, parameters: {weight: 1}}]
        dtype: torch.float64
        out_dtype: torch.float16
    """)
    assert recipe["settings"] == {"compute_dtype": "float64"}
    assert recipe["outputs"]["model"]["dtype"] == "float16"
    cli.ok("run", "r.yaml")
    assert {t.dtype for t in read_tensors(tmp_path / "merged").values()
            if t.is_floating_point()} == {torch.float16}


def test_inputs_stored_in_different_float_dtypes_are_written_as_mergekit_promotes_them(
        make_models, cli, tmp_path):
    # Without dtype, mergekit adds the tensors as stored: float16 with bfloat16 promotes to
    # float32, which it writes. tvrecipe would write the base's dtype (float16).
    make_models(("math",), dtype=torch.float16)
    make_models(("code",), dtype=torch.bfloat16, folder="other")
    recipe = imported(cli, """
        merge_method: task_arithmetic
        base_model: ./ckpt/base
        models:
          - {model: ./ckpt/math, parameters: {weight: 0.5}}
          - {model: ./other/code, parameters: {weight: 0.5}}
    """)
    assert recipe["outputs"]["model"]["dtype"] == "float32"
    assert ("# dtype: the inputs are stored in BF16 and F16 and no dtype is given, so "
            "mergekit's sums promote to float32") in (tmp_path / "r.yaml").read_text()
    cli.ok("run", "r.yaml")
    assert {t.dtype for t in read_tensors(tmp_path / "merged").values()
            if t.is_floating_point()} == {torch.float32}
    # one dtype throughout: the base's, as before
    recipe = imported(cli, """
        merge_method: task_arithmetic
        base_model: ./ckpt/base
        models: [{model: ./ckpt/math, parameters: {weight: 0.5}}]
    """, "--force")
    assert "dtype" not in recipe["outputs"]["model"]


def two_layers(make_models) -> None:
    """A base and a fine-tune `math` whose config.json says they have 2 layers."""
    ms = make_models(("math",))
    for name in ("base", "math"):
        (ms.path(name) / "config.json").write_text('{"num_hidden_layers": 2}')


def test_a_slice_is_imported_only_when_it_spans_every_layer(make_models, cli):
    two_layers(make_models)
    whole = """\
        slices:
          - sources:
              - {model: ./ckpt/base, layer_range: [0, 2]}
              - {model: ./ckpt/math, layer_range: [0, LAST]}
        merge_method: slerp
        base_model: ./ckpt/base
        parameters: {t: 0.5}
    """
    recipe = imported(cli, whole.replace("LAST", "2"))
    assert recipe["steps"] == {"model": {"op": "slerp", "a": "base", "b": "math", "t": 0.5}}
    write(cli, "mk.yml", whole.replace("LAST", "1"))
    assert cli.fails(2, "import", "mk.yml", "-o", "r.yaml", "--force").err_lines[1:] == [
        ("mk.yml:1:1: slices: 'slices' is not imported: layer slices (passthrough, "
         "frankenmerges) are not expressible in a recipe ('./ckpt/math' has 2 layers and the "
         "slice takes layer_range [0, 1]: only [0, 2] (all of them) is imported, as models)")]
    # A hub id's layers are not read (no network): said, with the two ways out.
    write(cli, "mk.yml", whole.replace("./ckpt/math", "org/math").replace("LAST", "2"))
    assert cli.fails(2, "import", "mk.yml", "-o", "r.yaml", "--force").err_lines[1:] == [
        ("mk.yml:1:1: slices: 'slices' is not imported: layer slices (passthrough, "
         "frankenmerges) are not expressible in a recipe (the number of layers of 'org/math' "
         "is not known here (it needs a local folder whose config.json gives "
         "num_hidden_layers; a hub id is not read), so whether layer_range [0, 2] spans them "
         "all cannot be told: give its folder, or write the config with `models:`)")]


def test_tokenizer_source_needs_one_vocabulary(make_models, cli):
    ms = make_models(("math",))
    for name, vocab in (("base", 64), ("math", 66)):
        (ms.path(name) / "config.json").write_text(f'{{"vocab_size": {vocab}}}')
    cli.write("mk.yml", "merge_method: task_arithmetic\nbase_model: ./ckpt/base\n"
                        "models: [{model: ./ckpt/math, parameters: {weight: 1}}]\n"
                        "tokenizer_source: base\n")
    assert cli.fails(2, "import", "mk.yml", "-o", "r.yaml").err_lines[1:] == [
        ("mk.yml:4:1: tokenizer_source: tokenizer_source is imported only for models that "
         "share a vocabulary; their config.json vocab_size differ (./ckpt/base: 64, "
         "./ckpt/math: 66), and mergekit re-maps embedding rows between tokenizers, which "
         "tvrecipe does not (merge models with the base's vocabulary, or run this config in "
         "mergekit)")]
    (ms.path("math") / "config.json").write_text('{"vocab_size": 64}')
    cli.ok("import", "mk.yml", "-o", "r.yaml")
    # One vocabulary: a union of the tokenizers, the base model named by its path and
    # mergekit's newer `tokenizer: {source: ...}` all give the base's tokenizer.
    base_recipe = (cli.root / "r.yaml").read_text()
    for line in ("tokenizer_source: union", "tokenizer_source: ./ckpt/base",
                 "tokenizer: {source: base}", "tokenizer: {source: union}"):
        cli.write("mk.yml", "merge_method: task_arithmetic\nbase_model: ./ckpt/base\n"
                            "models: [{model: ./ckpt/math, parameters: {weight: 1}}]\n"
                            f"{line}\n")
        cli.ok("import", "mk.yml", "-o", "r.yaml", "--force")
        assert (cli.root / "r.yaml").read_text() == base_recipe, line
    (ms.path("math") / "config.json").write_text('{"vocab_size": 66}')
    assert cli.fails(2, "import", "mk.yml", "-o", "r.yaml", "--force").err_lines[1].startswith(
        "mk.yml:4:13: tokenizer.source: tokenizer_source is imported only for models that "
        "share a vocabulary")
    # With no base_model (linear), the models' vocabularies are checked all the same.
    cli.write("mk.yml", "merge_method: linear\nmodels: [{model: ./ckpt/base, parameters: "
                        "{weight: 1}}, {model: ./ckpt/math, parameters: {weight: 1}}]\n"
                        "tokenizer_source: union\n")
    assert cli.fails(2, "import", "mk.yml", "-o", "r.yaml", "--force").err_lines[1].startswith(
        "mk.yml:3:1: tokenizer_source: tokenizer_source is imported only for models that "
        "share a vocabulary")


def test_hub_ids_are_read_from_the_hub_as_mergekit_reads_them(cli):
    recipe = imported(cli, """
        merge_method: task_arithmetic
        base_model: mistralai/Mistral-7B-v0.1
        models: [{model: org/ft@abc, parameters: {weight: 1}}]
    """)
    assert recipe["models"] == {"base": "hf://mistralai/Mistral-7B-v0.1", "ft_abc": "hf://org/ft@abc"}
    text = (cli.root / "r.yaml").read_text()
    assert ('base: "hf://mistralai/Mistral-7B-v0.1"  # base_model; a hub id, read from the Hub '
            "(needs huggingface_hub; pin a revision with @REV, or write a local copy's folder)"
            ) in text
    cli.ok("validate", "r.yaml")


def test_models_named_like_steps_or_listed_twice(make_models, cli):
    """Folders named model, merged or tv take other names (the recipe's steps have those);
    a model listed twice is refused, as mergekit refuses duplicate inputs."""
    ms = make_models(("math",))
    for name in ("model", "merged", "tv", "sparse_x"):
        (ms.path("math").parent.parent / name).symlink_to(ms.path("math"))
    recipe = imported(cli, """
        merge_method: ties
        base_model: ./ckpt/base
        models:
          - {model: ./model, parameters: {weight: 1, density: 0.5}}
          - {model: ./merged, parameters: {weight: 1, density: 0.4}}
          - {model: ./tv, parameters: {weight: 1, density: 0.5}}
          - {model: ./sparse_x, parameters: {weight: 1, density: 0.5}}
    """)
    assert list(recipe["models"]) == ["base", "model_2", "merged_2", "tv_2", "m_sparse_x"]
    # (./merged, the default output, is an input here: the output takes the next free name)
    assert recipe["outputs"]["model"]["path"] == "./merged_2"
    cli.ok("validate", "r.yaml")
    write(cli, "mk.yml", """\
        merge_method: task_arithmetic
        base_model: ./ckpt/base
        models:
          - {model: ./ckpt/math, parameters: {weight: 1}}
          - {model: ./ckpt/math, parameters: {weight: 0.5}}
    """)
    assert cli.fails(2, "import", "mk.yml", "-o", "r.yaml", "--force").err_lines[1:] == [
        ("mk.yml:5:6: models[1].model: './ckpt/math' is listed twice; mergekit refuses duplicate "
        "inputs (list it once, with the weight it should have)")]


def test_a_whole_slice_needs_the_base_among_its_sources(make_models, cli):
    two_layers(make_models)
    config = """\
        slices:
          - sources:
              - {model: ./ckpt/math, layer_range: [0, 2], parameters: {weight: 0.5}}
            parameters: {lambda: 0.8}
        merge_method: task_arithmetic
        base_model: ./ckpt/base
        parameters: {lambda: 0.3}
    """
    write(cli, "mk.yml", config)
    assert cli.fails(2, "import", "mk.yml", "-o", "r.yaml").err_lines[1:] == [
        ("mk.yml:2:5: slices[0].sources: base_model is not among the slice's sources: mergekit "
        "adds it to a models list, not to a slice, and stops (add it to the sources with the "
        "same layer_range)")]
    recipe = imported(cli, config.replace(
        "          - sources:\n",
        "          - sources:\n              - {model: ./ckpt/base, layer_range: [0, 2]}\n"))
    # (the slice's own parameters come before the config's)
    assert recipe["steps"]["model"] == {"op": "apply", "base": "base", "delta": "merged",
                                        "scale": 0.8}


def test_models_written_as_mappings(make_models, cli):
    """mergekit's {model: {path: ...}} form: the base among the models is the base, and a
    mapping listed twice is refused like a path (it was an internal error)."""
    make_models(("math",))
    config = """\
        merge_method: task_arithmetic
        base_model: {model: {path: ./ckpt/base}}
        models:
          - {model: {model: {path: ./ckpt/math}}, parameters: {weight: 1}}
          - {model: {model: {path: ./ckpt/base}}}
    """
    assert list(imported(cli, config)["models"]) == ["base", "math"]
    write(cli, "mk.yml", config.rstrip(" ") + "          - {model: {model: {path: ./ckpt/math}}}\n")
    res = cli.fails(2, "import", "mk.yml", "-o", "r.yaml", "--force")
    assert res.err_lines[1:] == [
        ("mk.yml:6:6: models[2].model: {'model': {'path': './ckpt/math'}} is listed twice; "
        "mergekit refuses duplicate inputs (list it once, with the weight it should have)")]


def test_a_mergekit_config_given_to_run_says_how_to_import_it(make_models, cli):
    make_models(("math",))
    cli.write("mk.yml", "merge_method: ties\nbase_model: ./ckpt/base\n"
                        "models: [{model: ./ckpt/math, parameters: {weight: 1, density: 0.5}}]\n")
    for command in ("run", "validate", "plan"):
        assert cli.fails(2, command, "mk.yml").err_lines == [
            "tvrecipe: recipe error:",
            ("mk.yml:1:1: merge_method: this is a mergekit config, not a tvrecipe recipe "
             "(convert it once with `tvrecipe import mk.yml -o mk.recipe.yaml`, then run "
             "mk.recipe.yaml: its comments say what each mergekit field became)")]
    cli.ok("import", "mk.yml", "-o", "mk.recipe.yaml")
    cli.ok("run", "mk.recipe.yaml", "-q")


def _adapter(folder, seed: int, alpha: float = 4.0) -> dict[str, torch.Tensor]:
    """A peft LoRA adapter (r 2) of the test models' q_proj and down_proj; returns each
    targeted tensor's (alpha/r)·B·A."""
    import json

    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": alpha,
        "target_modules": ["q_proj", "down_proj"]}))
    g = torch.Generator().manual_seed(seed)
    factors, deltas = {}, {}
    for module, (rows, cols) in (("self_attn.q_proj", (8, 8)), ("mlp.down_proj", (8, 12))):
        a, b = 0.1 * torch.randn(2, cols, generator=g), 0.1 * torch.randn(rows, 2, generator=g)
        prefix = f"base_model.model.model.layers.0.{module}"
        factors[f"{prefix}.lora_A.weight"], factors[f"{prefix}.lora_B.weight"] = a, b
        deltas[f"model.layers.0.{module}.weight"] = (alpha / 2) * (b @ a)
    save_file(factors, str(folder / "adapter_model.safetensors"))
    return deltas


def test_a_model_with_a_lora_adapter_is_merged_with_it_first(make_models, cli):
    """mergekit's MODEL+ADAPTER (and {model: ..., lora: ...}): the adapter merged into its
    model (peft's merge_and_unload), then the merge, as mergekit does."""
    ms = make_models(("math", "code"))
    on_math = _adapter(cli.root / "lora_math", 1)
    on_base = _adapter(cli.root / "lora_base", 2)
    recipe = imported(cli, """
        merge_method: task_arithmetic
        base_model: ./ckpt/base+./lora_base
        models:
          - {model: ./ckpt/math+./lora_math, parameters: {weight: 0.5}}
          - {model: {model: {path: ./ckpt/code}}, parameters: {weight: 0.3}}
        dtype: float32
    """)
    assert recipe["models"] == {
        "base": "./ckpt/base", "base_lora": {"path": "./lora_base", "kind": "lora", "base": "base"},
        "math": "./ckpt/math", "math_lora": {"path": "./lora_math", "kind": "lora", "base": "math"},
        "code": "./ckpt/code"}
    assert recipe["steps"]["base_with_lora"] == {"op": "apply", "base": "base",
                                                 "delta": "base_lora"}
    assert recipe["steps"]["tv"]["base"] == "base_with_lora"
    assert recipe["steps"]["tv"]["finetuned"] == ["math_with_lora", "code"]
    assert recipe["outputs"]["model"]["copy_files_from"] == "base"
    cli.ok("run", "r.yaml", "-q")
    got = read_tensors(cli.root / "merged")
    base, math, code = (ms.f32(n) for n in ("base", "math", "code"))
    for k in FLOATING:
        b = base[k] + on_base.get(k, 0)
        want = b + 0.5 * (math[k] + on_math.get(k, 0) - b) + 0.3 * (code[k] - b)
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)


def test_lora_references_in_every_form_mergekit_reads(make_models, cli):
    """Two spellings of one reference are one input (the base listed among the models in the
    other form; a duplicate in the other form); revisions of the mapping form are kept; a
    slice's MODEL+ADAPTER source counts its model's layers; an adapter mapping without a
    path is refused."""
    import json
    ms = make_models(("math",))
    for name in ("base", "math"):
        (ms.path(name) / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    _adapter(cli.root / "ad", 3)
    recipe = imported(cli, """
        merge_method: task_arithmetic
        base_model: {model: ./ckpt/base, lora: ./ad}
        models:
          - {model: ./ckpt/base+./ad, parameters: {weight: 1.0}}
          - {model: ./ckpt/math, parameters: {weight: 0.5}}
        parameters: {normalize: true}
    """)
    assert recipe["steps"]["tv"] == {"op": "extract", "base": "base_with_lora",
                                     "finetuned": ["math"]}
    write(cli, "mk.yml", """\
        merge_method: linear
        models:
          - {model: ./ckpt/math+./ad, parameters: {weight: 1}}
          - {model: {model: {path: ./ckpt/math}, lora: {path: ./ad}}, parameters: {weight: 1}}
          - {model: {model: ./ckpt/base, lora: {revision: main}}, parameters: {weight: 1}}
    """)
    assert cli.fails(2, "import", "mk.yml", "-o", "r.yaml", "--force").err_lines[1:] == [
        ("mk.yml:4:6: models[1].model: {'model': {'path': './ckpt/math'}, 'lora': {'path': "
         "'./ad'}} is listed twice; mergekit refuses duplicate inputs (list it once, with the "
         "weight it should have)"),
        ("mk.yml:5:34: models[2].model.lora: a LoRA adapter must be a path, got "
         "{'revision': 'main'}")]
    recipe = imported(cli, """
        merge_method: linear
        models:
          - {model: {model: {path: org/ft, revision: abc}, lora: {path: org/ad, revision: v1}},
             parameters: {weight: 1}}
    """, "--force")
    assert [m if isinstance(m, str) else m["path"] for m in recipe["models"].values()] == [
        "hf://org/ft@abc", "hf://org/ad@v1"]
    recipe = imported(cli, """
        merge_method: slerp
        base_model: ./ckpt/base+./ad
        slices:
          - sources:
              - {model: ./ckpt/base+./ad, layer_range: [0, 1]}
              - {model: ./ckpt/math, layer_range: [0, 1]}
        parameters: {t: 0.5}
    """, "--force")
    assert recipe["steps"]["model"] == {"op": "slerp", "a": "base_with_lora", "b": "math",
                                        "t": 0.5}


def test_an_absolute_output_path_stays_absolute(make_models, cli, tmp_path):
    # It was written relative to the recipe (../release/merged), so it moved with the recipe.
    make_models(("math",))
    release = tmp_path.parent / f"{tmp_path.name}-release" / "merged"
    recipe = imported(cli, """
        merge_method: linear
        models: [{model: ./ckpt/math, parameters: {weight: 1}}]
    """, "--output-path", str(release))
    assert recipe["outputs"]["model"]["path"] == str(release)
    recipe = imported(cli, """
        merge_method: linear
        models: [{model: ./ckpt/math, parameters: {weight: 1}}]
    """, "--output-path", "out/m", "--force")
    assert recipe["outputs"]["model"]["path"] == "./out/m"  # (a relative one, as before)


def test_a_recipe_or_a_missing_config_given_to_import_is_named_as_such(cli):
    cli.write("r.yaml", "tvrecipe: 1\nmodels: {base: ./ckpt/base}\noutputs:\n"
                        "  model: {from: base, path: ./out}\n")
    res = cli.fails(2, "import", "r.yaml", "-o", "x.yaml")
    assert res.err_lines == [
        "tvrecipe: recipe error:",
        ("r.yaml:1:1: tvrecipe: this is a tvrecipe recipe already (it has 'tvrecipe:'), not a "
         "mergekit config, so there is nothing to import (run it as it is: `tvrecipe run "
         "r.yaml`; `tvrecipe import` converts a mergekit config (one with merge_method:))")]
    res = cli.fails(2, "import", "nowhere.yml", "-o", "x.yaml")
    assert res.err_lines == ["tvrecipe: recipe error:", "mergekit config not found: nowhere.yml"]
    assert not (cli.root / "x.yaml").exists()
