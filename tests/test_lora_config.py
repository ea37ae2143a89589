"""Malformed peft adapter folders are located input errors (exit 3), from `validate` as from
`run`, and write nothing; none of them is read as a silently different model. The adapters are
written by hand here (no peft needed): a [16, 8] target ``m.q.weight`` and a norm ``m.n.weight``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

P = "base_model.model."
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]}
FACTORS = {f"{P}m.q.lora_A.weight": torch.ones(2, 8), f"{P}m.q.lora_B.weight": torch.ones(16, 2)}


@pytest.fixture
def adapter(cli, tmp_path):
    (tmp_path / "base").mkdir()
    save_file({"m.q.weight": torch.zeros(16, 8), "m.n.weight": torch.ones(8)},
              str(tmp_path / "base" / "model.safetensors"))
    cli.write("r.yaml", "tvrecipe: 1\nmodels:\n  base: ./base\n  ad: {path: ./ad, kind: lora}\n"
                        "steps:\n  model: {op: apply, base: base, delta: ad}\n"
                        "outputs:\n  out: {from: model, path: ./out/m}\n")

    def write(config=CONFIG, tensors=FACTORS) -> None:
        (tmp_path / "ad").mkdir(exist_ok=True)
        (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(config))
        save_file(tensors, str(tmp_path / "ad" / "adapter_model.safetensors"))

    return write


def _fails_everywhere(cli, tmp_path) -> str:
    for command in ("validate", "run"):
        res = cli.fails(3, command, "r.yaml")
        assert not (tmp_path / "out").exists()
    assert res.err_lines[0] == "tvrecipe: input error:"
    return res.err_lines[1]


def test_the_well_formed_adapter_runs(adapter, cli, tmp_path):
    adapter()
    cli.ok("run", "r.yaml", "-q")
    from safetensors.torch import load_file
    got = load_file(str(tmp_path / "out" / "m" / "model.safetensors"))
    assert torch.equal(got["m.q.weight"], torch.full((16, 8), 2 * 4 / 2))  # B·A = 2, alpha/r = 2


@pytest.mark.parametrize(("config", "message"), [
    ([1, 2], "holds a JSON list, not an object; is this peft's adapter_config.json?"),
    ({**CONFIG, "lora_alpha": "8"}, "lora_alpha is '8'; it must be a number"),
    ({**CONFIG, "lora_alpha": None}, "lora_alpha is None; it must be a number"),
    ({**CONFIG, "alpha_pattern": {"q": "3"}}, "alpha_pattern['q'] is '3'; it must be a number"),
    ({**CONFIG, "alpha_pattern": {"q[": 3}},
     ("alpha_pattern key 'q[' is not a regular expression (unterminated character set at "
     "position 1)")),
])
def test_config_fields_of_the_wrong_type(adapter, cli, tmp_path, config, message):
    adapter(config=config)
    line = _fails_everywhere(cli, tmp_path)
    assert line.endswith(f"adapter_config.json: {message}"), line


@pytest.mark.parametrize(("config", "message"), [
    ({**CONFIG, "r": 0}, "r is 0; it must be a positive whole number (the rank of the factors)"),
    ({**CONFIG, "r": "four"}, ("r is 'four'; it must be a positive whole number (the rank of the "
                              "factors)")),
    ({**CONFIG, "rank_pattern": {"q": 2.5}}, ("rank_pattern is {'q': 2.5}; it must map module "
                                             "name patterns to positive whole numbers")),
])
def test_ranks_that_are_not_ranks(adapter, cli, tmp_path, config, message):
    adapter(config=config)
    line = _fails_everywhere(cli, tmp_path)
    assert line.endswith(f"adapter_config.json: {message}"), line


@pytest.mark.parametrize("config", [{**CONFIG, "r": 8}, {**CONFIG, "rank_pattern": {"q": 4}}])
def test_a_rank_the_factors_do_not_have_is_refused(adapter, cli, tmp_path, config):
    # The scale lora_alpha / r was taken with the factors' rank instead, silently.
    adapter(config=config)
    said = config.get("rank_pattern", {}).get("q", config["r"])
    assert _fails_everywhere(cli, tmp_path).endswith(
        f"module 'm.q' has factors of rank 2, but adapter_config.json gives it r = {said}, which "
        "its scale lora_alpha / r is taken with (peft would not load it); fix r (or "
        "rank_pattern), or save the adapter again")


def test_integer_factors_and_an_empty_adapter_are_refused(adapter, cli, tmp_path):
    adapter(tensors={k: v.to(torch.int32) for k, v in FACTORS.items()})
    assert _fails_everywhere(cli, tmp_path).endswith(
        "module 'm.q' has factors of dtype I32; LoRA factors are floating point (F16, BF16, F32, "
        "F64)")
    save_file({}, str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert _fails_everywhere(cli, tmp_path).endswith(
        "the adapter holds no LoRA factors (lora_A/lora_B tensors) and no saved modules, so it "
        "changes nothing; is adapter_model.safetensors the one peft saved?")


def test_rank_zero_factors(adapter, cli, tmp_path):
    adapter(tensors={f"{P}m.q.lora_A.weight": torch.ones(0, 8),
                     f"{P}m.q.lora_B.weight": torch.ones(16, 0)})
    assert _fails_everywhere(cli, tmp_path).endswith(
        "module 'm.q' has rank-0 factors [0, 8] and [16, 0]; leave the module out of the "
        "adapter instead")


def test_a_saved_module_of_another_shape_is_not_broadcast(adapter, cli, tmp_path):
    # A [1, 8] copy over the [16, 8] base tensor was broadcast into 16 equal rows (exit 0).
    adapter(config={**CONFIG, "modules_to_save": ["q"]},
            tensors={f"{P}m.q.modules_to_save.default.weight": torch.ones(1, 8)})
    assert _fails_everywhere(cli, tmp_path).endswith(
        "saved module tensor 'base_model.model.m.q.modules_to_save.default.weight' has shape "
        "[1, 8], but the base's 'm.q.weight' is [16, 8]; is this adapter for another base "
        "model?")


def test_two_adapters_in_one_file_are_not_half_read(adapter, cli, tmp_path):
    # The factors of a second adapter (or a lora_B bias) were dropped without a word.
    adapter(tensors={**FACTORS, f"{P}m.q.lora_B.other.weight": torch.ones(16, 2)})
    line = _fails_everywhere(cli, tmp_path)
    assert "module 'm.q' has two lora_B tensors" in line and "one adapter per file" in line


def test_a_lora_bias_is_not_dropped(adapter, cli, tmp_path):
    adapter(tensors={**FACTORS, f"{P}m.q.lora_B.bias": torch.ones(16)})
    assert _fails_everywhere(cli, tmp_path).endswith(
        "tensor 'base_model.model.m.q.lora_B.bias' is a LoRA bias term; LoRA bias terms are "
        "not supported (merge such an adapter with peft's merge_and_unload and use the merged "
        "checkpoint)")


def test_tvrecipe_hash_of_an_adapter_is_the_digest_a_run_records(adapter, cli, tmp_path):
    """The pin of a `kind: lora` model covers its factors and its config (the scales)."""
    adapter()
    cli.ok("run", "r.yaml", "-q")
    digest = cli.ok("hash", "ad").stdout.strip()
    assert f"sha256: {digest}" in (tmp_path / "r.yaml.lock").read_text()
    recipe = (tmp_path / "r.yaml").read_text()
    cli.write("r.yaml", recipe.replace("kind: lora}", f"kind: lora, sha256: {digest}}}"))
    cli.ok("run", "r.yaml", "--force", "-q")


def test_pattern_keys_match_as_peft_matches_them(adapter, cli, tmp_path):
    # peft: re.match(rf"(.*\.)?({key})$", name): a key with | is one pattern (ungrouped, the
    # alternative "zz" swallowed the prefix and "q" had to match the whole name).
    adapter(config={**CONFIG, "alpha_pattern": {"zz|q": 2}})
    cli.ok("run", "r.yaml", "-q")
    from safetensors.torch import load_file
    got = load_file(str(tmp_path / "out" / "m" / "model.safetensors"))
    assert torch.equal(got["m.q.weight"], torch.full((16, 8), 2 * 2 / 2))  # B·A = 2, alpha/r = 1


def test_embedding_tensors_are_written_as_peft_embedding_factors():
    # peft adapts nn.Embedding modules with lora_embedding_A/B and drops Linear factors there.
    from tvrecipe.store.lora import _EMBEDDING
    embeddings = ["model.embed_tokens.weight", "transformer.wte.weight", "transformer.wpe.weight",
                  "bert.embeddings.word_embeddings.weight",
                  "bert.embeddings.position_embeddings.weight",
                  "bert.embeddings.token_type_embeddings.weight",
                  "text_model.embeddings.position_embedding.weight",
                  "model.decoder.embed_positions.weight", "gpt_neox.embed_in.weight"]
    linear = ["lm_head.weight", "gpt_neox.embed_out.weight", "model.layers.0.mlp.up_proj.weight",
              "bert.embeddings.LayerNorm.weight"]
    assert [n for n in embeddings if not _EMBEDDING.search(n)] == []
    assert [n for n in linear if _EMBEDDING.search(n)] == []
