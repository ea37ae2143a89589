"""`kind: lora`: peft adapters read as task vectors, checked against peft's own merge.

Adapters are made by peft itself on tiny transformers models (no hub access): each test
compares what tvrecipe reads with ``merge_and_unload()`` minus the base, in float32.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import read_tensors

peft = pytest.importorskip("peft", reason="peft is a test oracle (the bench extra)")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=48, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg)


def make_adapter(tmp_path, name: str, make_model, seed: int = 1, **lora):
    """Save the base (once) and a peft adapter; return the expected delta per base tensor."""
    base = make_model()
    if not (tmp_path / "base").exists():
        base.save_pretrained(tmp_path / "base")
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **lora))
    if "modules_to_save" in lora:  # a trained copy differs from the base
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.data.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / name)
    merged = model.merge_and_unload().state_dict()
    stored = load_file(str(tmp_path / "base" / "model.safetensors"))
    return {k: (merged[k] - base_sd[k]) for k in stored if k in merged}


def run_vector(cli, tmp_path, name: str) -> dict[str, torch.Tensor]:
    cli.write(f"{name}.yaml", f"""\
        tvrecipe: 1
        models:
          base: ./base
          {name}: {{path: ./{name}, kind: lora}}
        outputs:
          v: {{from: {name}, path: ./out/{name}}}
        """)
    cli.ok("run", f"{name}.yaml", "-q")
    return read_tensors(tmp_path / "out" / name)


def assert_deltas(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    nonzero = 0
    for k, w in want.items():
        g = got[k]
        scale = max(float(w.abs().max()), 1e-30)
        assert float((g - w).abs().max()) <= 1e-6 * scale, k
        nonzero += bool(w.abs().max() > 0)
    assert nonzero > 0


CASES = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "up_proj"]},
    "patterns": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "gate_proj"],
                     "rank_pattern": {"layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
    "saved": {"r": 2, "lora_alpha": 4, "target_modules": ["k_proj"], "modules_to_save": ["lm_head"]},
    "embedding": {"r": 3, "lora_alpha": 5, "target_modules": ["embed_tokens", "o_proj"]},
}


@pytest.mark.parametrize("case", list(CASES))
def test_llama_adapters_read_as_peft_merges_them(cli, tmp_path, case):
    want = make_adapter(tmp_path, case, llama, **CASES[case])
    assert_deltas(run_vector(cli, tmp_path, case), want)


def test_fan_in_fan_out_conv1d_adapters(cli, tmp_path):
    want = make_adapter(tmp_path, "gpt", gpt2, r=4, lora_alpha=6, fan_in_fan_out=True,
                        target_modules=["c_attn", "c_fc"])
    got = run_vector(cli, tmp_path, "gpt")
    assert_deltas(got, {k: v for k, v in want.items() if k in got})
    assert any(k.endswith("c_attn.weight") and got[k].abs().max() > 0 for k in got)


def test_adapters_and_a_full_finetune_summed_and_applied(cli, tmp_path):
    d1 = make_adapter(tmp_path, "a1", llama, seed=1, **CASES["plain"])
    d2 = make_adapter(tmp_path, "a2", llama, seed=2, **CASES["patterns"])
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3))
          for k, v in base.items()}
    (tmp_path / "ft").mkdir()
    from safetensors.torch import save_file
    save_file(ft, str(tmp_path / "ft" / "model.safetensors"))
    cli.write("mix.yaml", """\
        tvrecipe: 1
        models:
          base: ./base
          a1: {path: ./a1, kind: lora}
          a2: {path: ./a2, kind: lora, base: base}
          ft: ./ft
        steps:
          tv: {op: extract, base: base, finetuned: ft}
          merged: {op: sum, inputs: [a1, a2, tv], weights: [0.5, 1.0, 0.25]}
          model: {op: apply, base: base, delta: merged}
        outputs:
          model: {from: model, path: ./out/model, dtype: float32}
        """)
    cli.ok("run", "mix.yaml", "-q")
    got = read_tensors(tmp_path / "out" / "model")
    for k, b in base.items():
        want = b + (0.5 * d1[k] + 1.0 * d2[k] + 0.25 * (ft[k] - b))
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-7)
    cli.ok("verify", "mix.yaml")
    cli.ok("verify", "out/model", "--recompute")


def test_bad_adapters_are_located_errors_and_write_nothing(cli, tmp_path):
    make_adapter(tmp_path, "ok", llama, **CASES["plain"])
    recipe = """\
        tvrecipe: 1
        models:
          base: ./base
          ad: {path: ./AD, kind: lora}
        outputs:
          v: {from: ad, path: ./out/v}
        """

    def fails(code: int, folder: str) -> list[str]:
        cli.write("bad.yaml", recipe.replace("AD", folder))
        res = cli.fails(code, "run", "bad.yaml")
        assert not (tmp_path / "out" / "v").exists()
        return res.err_lines

    (tmp_path / "empty").mkdir()
    lines = fails(3, "empty")
    assert lines[1].startswith("model 'ad' (./empty): ") and "no adapter_config.json" in lines[1]

    other = llama()  # another architecture: wider hidden size
    cfg = other.config
    cfg.hidden_size, cfg.intermediate_size = 32, 24
    torch.manual_seed(0)
    wide = transformers.LlamaForCausalLM(cfg)
    peft.get_peft_model(wide, peft.LoraConfig(r=2, target_modules=["q_proj"],
                                              init_lora_weights=False)).save_pretrained(
        tmp_path / "wide")
    lines = fails(3, "wide")
    assert "give [16, 32], but the base's 'model.layers.0.self_attn.q_proj.weight' is " \
           "[16, 16]; is this adapter for another base model?" in lines[1]

    import json
    import shutil
    shutil.copytree(tmp_path / "ok", tmp_path / "biased")
    cfg_file = tmp_path / "biased" / "adapter_config.json"
    cfg_json = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg_json, "bias": "all"}))
    lines = fails(3, "biased")
    assert lines[1].endswith("adapter_config.json: bias training (bias: 'all') is not "
                             "supported; merge such an adapter with peft's merge_and_unload and "
                             "use the merged checkpoint")
    cfg_file.write_text(json.dumps({**cfg_json, "use_dora": True}))
    assert "DoRA (use_dora: True) is not supported" in fails(3, "biased")[1]

    # A module the base does not have.
    from safetensors.torch import save_file
    shutil.copytree(tmp_path / "ok", tmp_path / "renamed")
    tensors = load_file(str(tmp_path / "renamed" / "adapter_model.safetensors"))
    tensors = {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.qq_proj"): v
               for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "renamed" / "adapter_model.safetensors"))
    assert ("adapter module 'model.layers.0.self_attn.qq_proj' has no tensor "
            "'model.layers.0.self_attn.qq_proj.weight' in the base") in fails(3, "renamed")[1]

    cli.write("nobase.yaml", "tvrecipe: 1\nmodels:\n  b0: ./base\n  ad: {path: ./ok, kind: lora}\n"
                             "outputs:\n  v: {from: ad, path: ./out/v}\n")
    res = cli.fails(2, "validate", "nobase.yaml")
    assert res.err_lines[1] == ("nobase.yaml:4:3: models.ad: a `kind: lora` model needs the "
                                "checkpoint it was trained on (add `base: MODEL` naming that "
                                "checkpoint model)")
