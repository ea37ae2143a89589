"""Per-tensor parameter values from the CLI: layer gradients and match rules resolved per tensor,
shown by plan, and part of the cache keys."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from tests.conftest import read_tensors, save_model

LAYERS = 3
NAMES = (["model.embed_tokens.weight"]
         + [f"model.layers.{i}.{part}.weight" for i in range(LAYERS)
            for part in ("self_attn.q_proj", "mlp.up_proj")]
         + ["model.norm.weight", "lm_head.weight"])


def make(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    base = {n: torch.randn(4, 6, generator=g) if not n.endswith("norm.weight")
            else torch.ones(6) for n in NAMES}
    models = {"base": base}
    for i, name in enumerate(("a", "b")):
        models[name] = {n: t + 0.01 * (i + 1) * torch.randn(t.shape, generator=g)
                        for n, t in base.items()}
    for name, tensors in models.items():
        save_model(root / "ckpt" / name, tensors)
    return models


RECIPE = """\
tvrecipe: 1
models: {{base: ./ckpt/base, a: ./ckpt/a, b: ./ckpt/b}}
steps:
  tv: {{op: extract, base: base, finetuned: [a, b]}}
  merged: {{op: sum, inputs: [tv.a, tv.b], weights: [[0, 1], {b_weight}]}}
  model: {{op: apply, base: base, delta: merged,
          scale: [{{match: "*.self_attn.*", value: 2}}, {{match: mlp, value: [1, 0]}},
                  {{value: 0.5}}]}}
outputs:
  model: {{from: model, path: ./out/model, dtype: float32}}
"""


def position(name: str) -> float:
    """mergekit's t: layer / (layers - 1); tensors outside the layers take the first value."""
    for i in range(LAYERS):
        if f".layers.{i}." in name:
            return i / (LAYERS - 1)
    return 0.0


def scale_of(name: str) -> float:
    if "self_attn" in name:
        return 2.0
    if "mlp" in name:
        return 1.0 - position(name)
    return 0.5


def test_gradients_and_rules_resolve_per_tensor(cli, tmp_path):
    models = make(tmp_path)
    cli.write("r.yaml", RECIPE.format(b_weight=0.25))
    cli.ok("run", "r.yaml")
    got = read_tensors(tmp_path / "out" / "model")
    base = models["base"]
    for n in NAMES:
        wa = position(n)  # gradient [0, 1]
        delta = wa * (models["a"][n] - base[n]) + 0.25 * (models["b"][n] - base[n])
        want = base[n] + scale_of(n) * delta
        torch.testing.assert_close(got[n], want, rtol=1e-6, atol=1e-7, msg=n)
    # The values really differ by tensor: layer 0's weight of a is 0, layer 2's is 1.
    mid = "model.layers.1.mlp.up_proj.weight"
    assert position(mid) == 0.5 and scale_of(mid) == 0.5


def test_plan_shows_resolved_values_and_unmatched_rules(cli, tmp_path):
    make(tmp_path)
    cli.write("r.yaml", RECIPE.format(b_weight='[{match: "typo", value: 1}, {value: 0.25}]'))
    plan = cli.ok("plan", "r.yaml").stdout
    section = plan[plan.index("per-tensor values"):plan.index("outputs:")].splitlines()
    assert section[:10] == [
        "per-tensor values (resolved for representative tensors):",
        "  merged.weights[a] = [0, 1] by layer",
        "      model.embed_tokens.weight               0",
        "      model.layers.0.self_attn.q_proj.weight  0",
        "      model.layers.0.mlp.up_proj.weight       0",
        "      model.layers.1.self_attn.q_proj.weight  0.5",
        "      model.layers.1.mlp.up_proj.weight       0.5",
        "      model.layers.2.self_attn.q_proj.weight  1",
        "      model.layers.2.mlp.up_proj.weight       1",
        "      lm_head.weight                          0"]
    assert section[10] == "  merged.weights[b] = 'typo': 1; else: 0.25"
    assert section[19:28] == [
        "  model.scale = '*.self_attn.*': 2; 'mlp': [1, 0]; else: 0.5",
        "      model.embed_tokens.weight               0.5",
        "      model.layers.0.self_attn.q_proj.weight  2",
        "      model.layers.0.mlp.up_proj.weight       1",
        "      model.layers.1.self_attn.q_proj.weight  2",
        "      model.layers.1.mlp.up_proj.weight       0.5",
        "      model.layers.2.self_attn.q_proj.weight  2",
        "      model.layers.2.mlp.up_proj.weight       0",
        "      lm_head.weight                          0.5"]
    assert section[28:] == [("  warning: r.yaml:5:43: steps.merged.weights[b]: rule [0] matches "
                             "no tensor of the model"), ""]


def test_changing_one_rule_reruns_only_the_steps_that_use_it(cli, tmp_path):
    make(tmp_path)
    cli.write("r.yaml", RECIPE.format(b_weight=0.25))
    cli.ok("run", "r.yaml")
    first = yaml.safe_load((tmp_path / "r.yaml.lock").read_text())["steps"]
    text = RECIPE.format(b_weight=0.25).replace("{match: mlp, value: [1, 0]}",
                                               "{match: mlp, value: [1, 0.5]}")
    cli.write("r.yaml", text)
    res = cli.ok("run", "r.yaml", "--force")
    assert "from cache: merged" in res.stdout
    second = yaml.safe_load((tmp_path / "r.yaml.lock").read_text())["steps"]
    assert second["merged"] == first["merged"] and second["tv"] == first["tv"]
    assert second["model"] != first["model"]
    cli.write("r.yaml", RECIPE.format(b_weight="[0.25, 0.5]"))
    cli.ok("run", "r.yaml", "--force")
    third = yaml.safe_load((tmp_path / "r.yaml.lock").read_text())["steps"]
    assert third["merged"] != first["merged"]


def test_rules_without_a_default_that_miss_a_tensor_fail_with_the_step_and_tensor(cli, tmp_path):
    make(tmp_path)
    cli.write("r.yaml", RECIPE.format(b_weight='[{match: "layers", value: 1}]'))
    res = cli.fails(5, "run", "r.yaml")
    assert res.err_lines[1] == (
        "step 'merged' (sum), tensor 'lm_head.weight': weights: no rule matches "
        "'lm_head.weight' and the rules have no default; end the rules with a default "
        "{value: ...}")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_validate_warns_of_rules_that_match_no_tensor(cli, tmp_path):
    make(tmp_path)
    cli.write("r.yaml", RECIPE.format(b_weight='[{match: "typo", value: 1}, {value: 0.25}]'))
    res = cli.ok("validate", "r.yaml")
    assert res.stdout == "r.yaml: ok (3 steps, 1 output)\n"
    assert res.stderr == ("warning: r.yaml:5:43: steps.merged.weights[b]: rule [0] matches no "
                          "tensor of the model\n")
    # Without the checkpoints there are no tensor names to check against: no warning, only
    # a note of each model that is not there.
    import shutil
    shutil.rmtree(tmp_path / "ckpt")
    assert cli.ok("validate", "r.yaml").err_lines == [
        f"note: r.yaml:2:{col}: models.{name}: ./ckpt/{name} does not exist (yet); validate "
        "checks the recipe alone, plan and run need the model there"
        for name, col in (("base", 10), ("a", 29), ("b", 42))]


def test_a_list_where_one_value_belongs_says_which_fields_vary_by_tensor(cli, tmp_path):
    make(tmp_path)
    cli.write("r.yaml", """\
tvrecipe: 1
models: {base: ./ckpt/base, a: ./ckpt/a, b: ./ckpt/b}
steps:
  tv: {op: extract, base: base, finetuned: [a, b]}
  basis: {op: cluster_basis, inputs: tv, k: [1, 2]}
  merged: {op: ties, inputs: tv, density: 0.5, majority: [total]}
  stock: {op: model_stock, inputs: tv, filter_wise: [true]}
outputs:
  m: {from: merged, path: ./out/m}
""")
    res = cli.fails(2, "validate", "r.yaml")
    assert res.err_lines[1:] == [
        ("r.yaml:5:42: steps.basis.k: 'k' takes one value, not a list (a value that varies by "
         "tensor (a layer gradient or rules) is accepted by 'density')"),
        ("r.yaml:6:48: steps.merged.majority: 'majority' takes one value, not a list (a value "
         "that varies by tensor (a layer gradient or rules) is accepted by 'density', "
         "'weights')"),
        ("r.yaml:7:40: steps.stock.filter_wise: 'filter_wise' takes one value, not a list (this "
         "op takes no values that vary by tensor)")]


def test_a_list_where_one_reference_belongs_says_so(cli, tmp_path):
    make(tmp_path)
    cli.write("r.yaml", """\
tvrecipe: 1
models: {base: ./ckpt/base, a: ./ckpt/a, b: ./ckpt/b}
steps:
  tv: {op: extract, base: base, finetuned: [a, b]}
  neg: {op: negate, input: [tv.a, tv.b]}
  model: {op: apply, base: [base, a], delta: neg}
outputs:
  m: {from: model, path: ./out/m}
""")
    res = cli.fails(2, "validate", "r.yaml")
    hint = ("(name one model, step or member (STEP.MEMBER); to use several, combine them in a "
            "step first (e.g. sum) and name that step)")
    assert res.err_lines[1:] == [
        f"r.yaml:5:21: steps.neg.input: 'input' takes one reference, not a list {hint}",
        f"r.yaml:6:22: steps.model.base: 'base' takes one reference, not a list {hint}"]


def test_a_rule_gives_each_tensor_the_result_of_its_own_value(cli, tmp_path):
    # decompose's threshold by rule: each tensor's parts are byte for byte those of a run with
    # that tensor's value for everything.
    make(tmp_path)

    def run(threshold: str, out: str) -> dict[str, torch.Tensor]:
        cli.write("d.yaml", (
            "tvrecipe: 1\nmodels: {base: ./ckpt/base, a: ./ckpt/a, b: ./ckpt/b}\nsteps:\n"
            "  tv: {op: extract, base: base, finetuned: [a, b]}\n"
            f"  parts: {{op: decompose, inputs: tv, rank: 2, threshold: {threshold}}}\n"
            f"outputs:\n  shared: {{from: parts.shared, path: ./out/{out}}}\n"))
        cli.ok("run", "d.yaml", "--no-cache")
        return read_tensors(tmp_path / "out" / out / "a.safetensors")

    low, high = run("0.05", "low"), run("0.999", "high")
    mixed = run('[{match: "*.self_attn.*", value: 0.05}, {value: 0.999}]', "mixed")
    attn = [n for n in mixed if "self_attn" in n]
    assert attn and any(not torch.equal(low[n], high[n]) for n in attn)
    for n, t in mixed.items():
        assert torch.equal(t, low[n] if "self_attn" in n else high[n]), n


def test_rules_need_not_cover_integer_buffers(cli, tmp_path):
    """A vector holds one delta per floating tensor: rules that cover every floating tensor
    are enough, though an integer buffer matches none of them (it comes from the base)."""
    models = make(tmp_path)
    ids = torch.arange(6, dtype=torch.int64)
    for name, tensors in models.items():
        save_model(tmp_path / "ckpt" / name, {**tensors, "model.position_ids": ids})
    cli.write("r.yaml", """\
        tvrecipe: 1
        models: {base: ./ckpt/base, a: ./ckpt/a, b: ./ckpt/b}
        steps:
          tv: {op: extract, base: base, finetuned: [a, b]}
          merged: {op: sum, inputs: tv, weights: [[{match: weight, value: 2}]]}
          model: {op: apply, base: base, delta: merged}
        outputs:
          model: {from: model, path: ./out/model, dtype: float32}
        """)
    cli.ok("run", "r.yaml")
    out = read_tensors(tmp_path / "out" / "model")
    assert torch.equal(out["model.position_ids"], ids)
    base, a, b = models["base"], models["a"], models["b"]
    for name in NAMES:
        want = base[name] + (2 * (a[name] - base[name]) + 2 * (b[name] - base[name]))
        torch.testing.assert_close(out[name], want, rtol=0, atol=1e-6)
