"""Parity with mergekit: `tvrecipe import` of a mergekit config, then `tvrecipe run`, gives the
model mergekit itself writes (deterministic methods: within 1e-5 of the largest weight; DARE
and DELLA: the same keep rate and scale, not the same bytes). Runs mergekit in-process; skipped
when it is not installed (`pip install -e '.[bench]'`)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import read_tensors

mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed (bench extra)")
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

HIDDEN, INTER, VOCAB, LAYERS = 16, 24, 40, 4
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
          "intermediate_size": INTER, "num_attention_heads": 2, "num_key_value_heads": 2,
          "num_hidden_layers": LAYERS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False, "max_position_embeddings": 64,
          "torch_dtype": "float32"}


def llama_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (HIDDEN,),
                       p + "post_attention_layernorm.weight": (HIDDEN,),
                       **{p + f"self_attn.{x}_proj.weight": (HIDDEN, HIDDEN) for x in "qkvo"},
                       p + "mlp.gate_proj.weight": (INTER, HIDDEN),
                       p + "mlp.up_proj.weight": (INTER, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, INTER)})
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return shapes


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A base and three fine-tunes of a 4-layer Llama, float32, with config.json."""
    root = tmp_path_factory.mktemp("mk")
    g = torch.Generator().manual_seed(11)
    base = {n: (torch.ones(s) + 0.05 * torch.randn(s, generator=g)) if len(s) == 1
            else 0.1 * torch.randn(s, generator=g) for n, s in llama_shapes().items()}
    shared = {n: 0.02 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    for name, tensors in [("base", base)] + [
            (f"ft{i}", {n: t + shared[n] + 0.02 * torch.randn(t.shape, generator=g)
                        for n, t in base.items()}) for i in range(3)]:
        folder = root / name
        folder.mkdir()
        save_file({n: t.contiguous() for n, t in tensors.items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(CONFIG))
    return root


def run_both(root: Path, tmp_path: Path, config: str, monkeypatch, cli
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """mergekit's output, tvrecipe's output and the imported recipe's text for one config."""
    monkeypatch.chdir(root)
    text = textwrap.dedent(config)
    (tmp_path / "mk.yml").write_text(text)
    mk_out = tmp_path / "mk-out"
    run_merge(MergeConfiguration.model_validate(__import__("yaml").safe_load(text)),
              str(mk_out), MergeOptions(copy_tokenizer=False, write_model_card=False,
                                        quiet=True, lazy_unpickle=False, random_seed=0))
    res = cli("import", str(tmp_path / "mk.yml"), "-o", str(tmp_path / "r.yaml"),
              "--output-path", str(tmp_path / "tv-out"))
    assert res.exit_code == 0, res.stderr
    recipe = (tmp_path / "r.yaml").read_text()
    res = cli("run", str(tmp_path / "r.yaml"), "-q")
    assert res.exit_code == 0, res.stderr + recipe
    return read_tensors(mk_out), read_tensors(tmp_path / "tv-out"), recipe


def assert_parity(mk: dict, tv: dict, tol: float = 1e-5) -> None:
    assert set(mk) == set(tv)
    largest = max(float(t.abs().max()) for t in mk.values())
    worst = max(float((mk[n].float() - tv[n].float()).abs().max()) for n in mk)
    assert worst <= tol * largest, f"max |mergekit - tvrecipe| = {worst:.3g}"


DETERMINISTIC = {
    "linear": """
        merge_method: linear
        models:
          - {model: ./ft0, parameters: {weight: 0.6}}
          - {model: ./ft1, parameters: {weight: [0.1, 0.9]}}
          - {model: ./ft2, parameters: {weight: [{filter: mlp, value: 0.5}, {value: 0.2}]}}
        dtype: float32
    """,
    "linear-unnormalized": """
        merge_method: linear
        models:
          - {model: ./base, parameters: {weight: 0.5}}
          - {model: ./ft0, parameters: {weight: 0.3}}
        parameters: {normalize: false}
        dtype: float32
    """,
    "slerp": """
        merge_method: slerp
        base_model: ./base
        models: [{model: ./base}, {model: ./ft0}]
        parameters:
          t:
            - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}
            - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}
            - {value: 0.5}
        dtype: float32
    """,
    "task_arithmetic": """
        merge_method: task_arithmetic
        base_model: ./base
        models:
          - {model: ./ft0, parameters: {weight: 0.5}}
          - {model: ./ft1, parameters: {weight: [0.2, 0.8]}}
          - {model: ./ft2, parameters: {weight: -0.3}}
        parameters: {lambda: 0.9}
        dtype: float32
    """,
    "task_arithmetic-normalized": """
        merge_method: task_arithmetic
        base_model: ./base
        models:
          - {model: ./ft0, parameters: {weight: 0.5}}
          - {model: ./ft1, parameters: {weight: 0.25}}
        parameters: {normalize: true}
        dtype: float32
    """,
    "ties": """
        merge_method: ties
        base_model: ./base
        models:
          - {model: ./ft0, parameters: {weight: 1.0, density: 0.5}}
          - {model: ./ft1, parameters: {weight: 0.5, density: [0.2, 0.9]}}
          - {model: ./ft2, parameters: {weight: 0.7, density: 0.29}}
        parameters: {int8_mask: true}
        dtype: float32
    """,
    "ties-shared-density": """
        merge_method: ties
        base_model: ./base
        models:
          - {model: ./ft0, parameters: {weight: 1.0}}
          - {model: ./ft1, parameters: {weight: 1.0}}
        parameters:
          density: [{filter: self_attn, value: 0.3}, {value: 0.7}]
          normalize: false
          lambda: 1.5
        dtype: float32
    """,
    "breadcrumbs": """
        merge_method: breadcrumbs
        base_model: ./base
        models:
          - {model: ./ft0, parameters: {weight: 1.0}}
          - {model: ./ft1, parameters: {weight: 0.5}}
        parameters: {density: 0.8, gamma: 0.05}
        dtype: float32
    """,
    "breadcrumbs_ties": """
        merge_method: breadcrumbs_ties
        base_model: ./base
        models:
          - {model: ./ft0, parameters: {weight: 1.0, density: 0.7, gamma: 0.02}}
          - {model: ./ft1, parameters: {weight: 0.5, density: 0.9, gamma: 0.1}}
          - {model: ./ft2, parameters: {weight: 0.8, density: 0.6, gamma: 0.0}}
        parameters: {normalize: true}
        dtype: float32
    """,
    # mergekit merges a base_model it does not find among the models as one more input,
    # weighed by the config-wide weight.
    "linear-base-not-listed": """
        merge_method: linear
        base_model: ./base
        models:
          - {model: ./ft0, parameters: {weight: 0.3}}
          - {model: ./ft1}
        parameters: {weight: 0.5}
        dtype: float32
    """,
    # The usual form of slerp configs: one slice spanning every layer of both models; and a
    # per-model t, which mergekit ignores (t is config-wide).
    "slerp-whole-slice": """
        slices:
          - sources:
              - {model: ./base, layer_range: [0, 4]}
              - {model: ./ft0, layer_range: [0, 4], parameters: {t: 0.9}}
        merge_method: slerp
        base_model: ./base
        parameters:
          t: [{filter: self_attn, value: [0, 0.5, 1]}, {value: 0.3}]
        dtype: torch.float32
    """,
    # Rules without a catch-all: where none matches, mergekit's default density (1). A
    # density of 1 or more keeps a tensor whole; 5e-1 (text to YAML 1.1) is a number.
    "ties-density-rules-without-default": """
        merge_method: ties
        base_model: ./base
        models:
          - {model: ./ft0, parameters: {weight: 1.0, density: [{filter: mlp, value: 0.3}]}}
          - {model: ./ft1, parameters: {weight: 0.5, density: 1.5}}
          - {model: ./ft2, parameters: {weight: 0.7}}
        parameters:
          density: [{filter: self_attn, value: 5e-1}]
        dtype: float32
    """,
    # base_model written otherwise than its entry among the models: mergekit tells models
    # apart by their text, so ./base is one more (zero) task vector, counted by normalize.
    "task_arithmetic-base-spelled-otherwise": """
        merge_method: task_arithmetic
        base_model: base
        models:
          - {model: ./base, parameters: {weight: 1.0}}
          - {model: ./ft0, parameters: {weight: 0.5}}
          - {model: ./ft1, parameters: {weight: 0.5}}
        parameters: {normalize: true}
        dtype: float32
    """,
    "model_stock": """
        merge_method: model_stock
        base_model: ./base
        models: [{model: ./ft0}, {model: ./ft1}, {model: ./ft2}]
        dtype: float32
    """,
    "model_stock-filter_wise": """
        merge_method: model_stock
        base_model: ./base
        models: [{model: ./ft0}, {model: ./ft1}, {model: ./ft2}]
        parameters: {filter_wise: true}
        dtype: float32
    """,
}


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_imported_recipe_gives_mergekits_model(name, models, tmp_path, monkeypatch, cli):
    mk, tv, _recipe = run_both(models, tmp_path, DETERMINISTIC[name], monkeypatch, cli)
    assert_parity(mk, tv)


RANDOM = {
    "dare_ties": ("""
        merge_method: dare_ties
        base_model: ./base
        models:
          - {model: ./ft0, parameters: {weight: 1.0, density: 0.3}}
          - {model: ./ft1, parameters: {weight: 1.0, density: 0.3}}
        dtype: float32
    """, 0.3),
    "dare_linear": ("""
        merge_method: dare_linear
        base_model: ./base
        models:
          - {model: ./ft0, parameters: {weight: 1.0, density: 0.4}}
        dtype: float32
    """, 0.4),
    "della": ("""
        merge_method: della
        base_model: ./base
        models:
          - {model: ./ft0, parameters: {weight: 1.0, density: 0.4, epsilon: 0.2}}
        dtype: float32
    """, 0.4),
    "della_linear": ("""
        merge_method: della_linear
        base_model: ./base
        models:
          - {model: ./ft0, parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}}
        parameters: {rescale: false}
        dtype: float32
    """, 0.5),
}


@pytest.mark.parametrize("name", list(RANDOM))
def test_random_methods_keep_what_mergekit_keeps(name, models, tmp_path, monkeypatch, cli):
    """Masks are random in both (mergekit draws from torch's global generator, seeded here so
    the test is repeatable): over every matrix of the model (10k entries), compare the keep
    rate and the L1 norm of the kept delta (what `rescale` preserves)."""
    config, density = RANDOM[name]
    mk, tv, _recipe = run_both(models, tmp_path, config, monkeypatch, cli)
    base = read_tensors(models / "base")
    mats = [n for n, t in base.items() if t.dim() == 2]
    kept = {k: sum(int(((out[n] - base[n]) != 0).sum()) for n in mats)
            for k, out in (("mk", mk), ("tv", tv))}
    l1 = {k: sum(float((out[n] - base[n]).abs().sum()) for n in mats)
          for k, out in (("mk", mk), ("tv", tv))}
    total = sum(base[n].numel() for n in mats)
    # Two independent keep rates over 10k entries differ by about 0.007 (one sigma).
    assert abs(kept["tv"] - kept["mk"]) / total < 0.02, kept
    if name != "dare_ties":  # one fine-tune: a fraction `density` survives
        assert abs(kept["tv"] / total - density) < 0.02, kept
    assert 0.95 < l1["tv"] / l1["mk"] < 1.05, l1


def test_the_recipe_reads_naturally_and_says_where_values_came_from(models, tmp_path,
                                                                     monkeypatch, cli):
    _mk, _tv, recipe = run_both(models, tmp_path, DETERMINISTIC["ties"], monkeypatch, cli)
    lines = recipe.splitlines()
    assert lines[0].startswith("# Imported by `tvrecipe import` from the mergekit config ")
    steps = [line.split(":")[0].strip() for line in lines
             if line.startswith("  ") and not line.strip().startswith("#")
             and "{op:" in line]
    assert steps == ["tv", "sparse_ft0", "sparse_ft1", "sparse_ft2", "merged", "model"]
    assert "# density from models[].parameters" in recipe
    assert "{op: consensus, inputs: [sparse_ft0, sparse_ft1, sparse_ft2]" in recipe


def test_the_config_says_the_dtype_the_weights_are_stored_in(models, tmp_path, monkeypatch,
                                                             cli):
    """As mergekit's: transformers loads a model in the config's torch_dtype ("auto")."""
    mk, tv, _recipe = run_both(models, tmp_path, """
        merge_method: task_arithmetic
        base_model: ./base
        models: [{model: ./ft0, parameters: {weight: 0.5}}]
        dtype: float32
        out_dtype: bfloat16
    """, monkeypatch, cli)
    assert {t.dtype for t in tv.values()} == {t.dtype for t in mk.values()} == {torch.bfloat16}
    assert_parity(mk, tv, tol=1e-2)
    configs = [json.loads((tmp_path / d / "config.json").read_text())
               for d in ("mk-out", "tv-out")]
    # (mergekit writes the config anew with transformers, whose newer versions call it dtype;
    # tvrecipe copies the base's and sets the dtype its key names)
    assert configs[0].get("dtype", configs[0].get("torch_dtype")) == "bfloat16"
    assert configs[1]["torch_dtype"] == "bfloat16"
    assert {k: v for k, v in configs[1].items() if k != "torch_dtype"} == {
        k: v for k, v in CONFIG.items() if k != "torch_dtype"}


def test_a_lora_adapter_on_a_model_is_merged_as_mergekit_merges_it(models, tmp_path,
                                                                   monkeypatch, cli):
    """`MODEL+ADAPTER`: mergekit merges the adapter into its model with peft
    (merge_and_unload) before the merge; the imported recipe applies it as a `kind: lora`
    task vector."""
    peft = pytest.importorskip("peft")
    adapter = models / "lora0"
    if not adapter.exists():
        adapter.mkdir()
        g = torch.Generator().manual_seed(5)
        (adapter / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
            "lora_dropout": 0.0, "target_modules": ["q_proj", "down_proj"], "bias": "none",
            "peft_version": peft.__version__}))
        factors = {}
        for i in range(LAYERS):
            for module, (rows, cols) in (("self_attn.q_proj", (HIDDEN, HIDDEN)),
                                         ("mlp.down_proj", (HIDDEN, INTER))):
                prefix = f"base_model.model.model.layers.{i}.{module}"
                factors[f"{prefix}.lora_A.weight"] = 0.1 * torch.randn(4, cols, generator=g)
                factors[f"{prefix}.lora_B.weight"] = 0.1 * torch.randn(rows, 4, generator=g)
        save_file(factors, str(adapter / "adapter_model.safetensors"))
    monkeypatch.chdir(models)
    text = textwrap.dedent("""
        merge_method: task_arithmetic
        base_model: ./base
        models:
          - {model: ./ft0+./lora0, parameters: {weight: 0.7}}
          - {model: ./ft1, parameters: {weight: 0.4}}
        dtype: float32
    """)
    (tmp_path / "mk.yml").write_text(text)
    run_merge(MergeConfiguration.model_validate(__import__("yaml").safe_load(text)),
              str(tmp_path / "mk-out"),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                           lazy_unpickle=False, random_seed=0,
                           lora_merge_cache=str(tmp_path / "lora-cache"),
                           lora_merge_dtype="float32"))
    cli.ok("import", str(tmp_path / "mk.yml"), "-o", str(tmp_path / "r.yaml"),
           "--output-path", str(tmp_path / "tv-out"))
    cli.ok("run", str(tmp_path / "r.yaml"), "-q")
    mk, tv = read_tensors(tmp_path / "mk-out"), read_tensors(tmp_path / "tv-out")
    assert_parity(mk, tv)
    # (and the adapter mattered: without it, q_proj would be task arithmetic of the plain models)
    q = "model.layers.0.self_attn.q_proj.weight"
    base, ft0, ft1 = (read_tensors(models / n)[q] for n in ("base", "ft0", "ft1"))
    assert float((tv[q] - (base + 0.7 * (ft0 - base) + 0.4 * (ft1 - base))).abs().max()) > 1e-3
