"""`kind: lora`: peft adapters read as task vectors, checked against peft's own merge.

Adapters are made by peft itself on tiny transformers models (no hub access): each test
compares what tvrecipe reads with ``merge_and_unload()`` minus the base, in float32.
"""

from __future__ import annotations

import json
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


def test_saved_embedding_layers_count_over_another_checkpoint(cli, tmp_path):
    """peft saves an adapted embedding's own weights (`.base_layer.`) and loads them over the
    model's: over a checkpoint other than the adapter's base, the delta is s·B·A plus their
    difference (mergekit's `ft+adapter` merges so); over its own base, s·B·A alone."""
    make_adapter(tmp_path, "emb", llama, r=3, lora_alpha=5,
                 target_modules=["embed_tokens", "lm_head", "k_proj"])
    assert any(".base_layer." in k for k in load_file(str(tmp_path / "emb" /
                                                             "adapter_model.safetensors")))
    ft = llama()
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ft.save_pretrained(tmp_path / "ft")
    ft_sd = {k: v.clone() for k, v in ft.state_dict().items()}
    merged = peft.PeftModel.from_pretrained(ft, str(tmp_path / "emb")).merge_and_unload()
    stored = load_file(str(tmp_path / "ft" / "model.safetensors"))
    want = {k: merged.state_dict()[k] - ft_sd[k] for k in stored}
    cli.write("r.yaml", """\
        tvrecipe: 1
        models:
          base: ./base
          ft: ./ft
          emb: {path: ./emb, kind: lora, base: ft}
        outputs:
          v: {from: emb, path: ./out/v}
        """)
    cli.ok("run", "r.yaml", "-q")
    got = read_tensors(tmp_path / "out" / "v")
    assert_deltas(got, want)
    assert float((want["model.embed_tokens.weight"]).abs().max()) > 0


def biased(tmp_path, name: str, bias: str, **lora):
    """A GPT-2 adapter that trained biases (peft saves them whole, base + delta); the
    expected delta per base tensor, from peft's own merge."""
    base = gpt2()
    base.save_pretrained(tmp_path / "base")
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(3)
    model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, bias=bias,
                                                      fan_in_fan_out=True, **lora))
    with torch.no_grad():  # (training would move them)
        for n, p in model.named_parameters():
            if n.endswith("bias") and p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / name)
    merged = model.merge_and_unload().state_dict()
    stored = load_file(str(tmp_path / "base" / "model.safetensors"))
    return {k: (merged[k] - base_sd[k]) for k in stored if k in merged}


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_adapters_that_trained_biases_read_as_peft_merges_them(cli, tmp_path, bias):
    want = biased(tmp_path, "b", bias, r=2, target_modules=["c_attn"])
    saved = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert any(k.endswith("c_attn.base_layer.bias") for k in saved)
    got = run_vector(cli, tmp_path, "b")
    assert_deltas({k: v for k, v in got.items() if k in want}, want)
    changed = {k for k, v in want.items() if k.endswith("bias") and v.abs().max() > 0}
    assert changed == ({"transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"}
                       if bias == "lora_only" else
                       {k for k in want if k.endswith(".bias") and ".attn.bias" not in k})


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


# ---- out: a vector written as a peft adapter -----------------------------------------------


def finetuned(tmp_path, scale: float = 0.02, model=llama):
    """A base (tiny Llama unless ``model`` makes another, saved by transformers) and a dense
    fine-tune of it."""
    base = model()
    base.save_pretrained(tmp_path / "base")
    stored = load_file(str(tmp_path / "base" / "model.safetensors"))
    gen = torch.Generator().manual_seed(5)
    ft = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in stored.items()}
    (tmp_path / "ft").mkdir()
    from safetensors.torch import save_file
    save_file(ft, str(tmp_path / "ft" / "model.safetensors"))
    return base, stored, ft


def truncation(delta: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).float()


OUT = """\
tvrecipe: 1
models: {base: ./base, ft: ./ft}
steps:
  tv: {op: extract, base: base, finetuned: ft}
outputs:
  adapter: {from: tv, path: ./out/adapter, format: peft, RANK}
"""


@pytest.mark.parametrize("rank", [3, 16])
def test_a_vector_written_as_an_adapter_merges_to_its_truncation(cli, tmp_path, rank):
    _base, stored, ft = finetuned(tmp_path)
    cli.write("out.yaml", OUT.replace("RANK", f"rank: {rank}, base_model: org/tiny"))
    res = cli.ok("run", "out.yaml")
    assert "peft adapter: 16 modules" in res.stdout  # 2 x 7 linear, embeddings, head
    merged = peft.PeftModel.from_pretrained(llama(), tmp_path / "out" / "adapter")
    assert merged.peft_config["default"].base_model_name_or_path == "org/tiny"
    merged = merged.merge_and_unload().state_dict()
    for k, b in stored.items():
        delta = ft[k] - b
        if delta.dim() != 2:  # norms cannot be LoRA targets: left out
            torch.testing.assert_close(merged[k], b, rtol=0, atol=0)
            continue
        want = b + (delta if rank >= min(delta.shape) else truncation(delta, rank))
        scale = float((want - b).abs().max())
        assert float((merged[k] - want).abs().max()) <= 1e-5 * scale + 1e-7, k
    # Read back as an adapter, it is the same vector.
    cli.write("back.yaml", "tvrecipe: 1\nmodels: {base: ./base, ad: {path: ./out/adapter, "
                           "kind: lora}}\noutputs:\n  v: {from: ad, path: ./out/back}\n")
    cli.ok("run", "back.yaml", "-q")
    back = read_tensors(tmp_path / "out" / "back")
    for k in back:
        torch.testing.assert_close(back[k] + stored[k], merged[k], rtol=1e-5, atol=1e-7)


def test_a_gpt2_adapter_output_factors_conv1d_layers_as_peft_applies_them(cli, tmp_path):
    # GPT-2's Conv1D layers store W as (in, out); peft adapts them with fan_in_fan_out,
    # ΔW = (B·A)ᵀ. Plain factors would not load where W is not square (c_attn, c_fc) and
    # would be applied transposed where it is (attn.c_proj).
    _base, stored, ft = finetuned(tmp_path, model=gpt2)
    # (the vocabulary is 48, so every full-rank delta is kept exactly at rank 48)
    cli.write("out.yaml", OUT.replace("RANK", "rank: 48"))
    res = cli.ok("run", "out.yaml")
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    merged = peft.PeftModel.from_pretrained(gpt2(), tmp_path / "out" / "adapter"
                                            ).merge_and_unload().state_dict()
    adapted = [k for k, v in stored.items() if v.dim() == 2 and "wpe" not in k]
    assert any(k.endswith("attn.c_proj.weight") for k in adapted)
    for k in adapted:
        torch.testing.assert_close(merged[k], ft[k], rtol=0, atol=1e-5)
    # what the adapter cannot carry is said, with its share of the vector
    left = [k for k, v in stored.items() if v.dim() != 2]
    delta = {k: (ft[k] - stored[k]).double() for k in stored}
    share = (sum(float(delta[k].square().sum()) for k in left)
             / sum(float(d.square().sum()) for d in delta.values())) ** 0.5
    assert (f"relative error 0.0000 (Frobenius, of the 2-D deltas); left out {len(left)} "
            f"nonzero tensors that are not 2-D (norms, biases), {share:.4f} of the vector's norm, "
            "where peft keeps the base's") in res.stdout


def test_a_gpt2_adapter_with_conv1d_and_linear_layers_reads_back_as_written(cli, tmp_path):
    # The config's fan_in_fan_out is one flag for the adapter; peft decides by each layer's
    # type, and so does the reader where the base's config.json names the architecture: a
    # Linear head beside Conv1D layers is not read transposed.
    def classifier():
        torch.manual_seed(0)
        return transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
            vocab_size=48, n_embd=16, n_layer=1, n_head=2, n_positions=32, num_labels=16,
            pad_token_id=0))

    _base, stored, ft = finetuned(tmp_path, model=classifier)
    cli.write("out.yaml", OUT.replace("RANK", "rank: 48"))
    cli.ok("run", "out.yaml", "-q")
    assert json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text()
                      )["fan_in_fan_out"] is True
    cli.write("back.yaml", "tvrecipe: 1\nmodels:\n  base: ./base\n  ad: {path: ./out/adapter, "
                           "kind: lora, base: base}\noutputs:\n  v: {from: ad, path: ./out/back}\n")
    cli.ok("run", "back.yaml", "-q")
    got = read_tensors(tmp_path / "out" / "back")
    assert got["score.weight"].shape == (16, 16)  # (square: a transposed read would not fail)
    for k, v in got.items():
        if stored[k].dim() == 2:
            torch.testing.assert_close(v, ft[k] - stored[k], rtol=0, atol=1e-5, msg=k)


def test_an_adapter_output_is_stored_in_its_dtype(cli, tmp_path):
    finetuned(tmp_path)
    cli.write("f.yaml", OUT.replace("RANK", "rank: 3"))
    cli.ok("run", "f.yaml", "-q")
    f32 = read_tensors(tmp_path / "out" / "adapter")
    cli.write("b.yaml", OUT.replace("RANK", "rank: 3, dtype: bfloat16").replace(
        "./out/adapter", "./out/adapter16"))
    cli.ok("run", "b.yaml", "-q")
    bf16 = read_tensors(tmp_path / "out" / "adapter16")
    assert f32.keys() == bf16.keys() and {t.dtype for t in bf16.values()} == {torch.bfloat16}
    assert all(torch.equal(bf16[k], f32[k].to(torch.bfloat16)) for k in f32)


def test_an_adapter_forward_pass_agrees_with_the_merged_model(cli, tmp_path):
    _base, stored, ft = finetuned(tmp_path)
    cli.write("out.yaml", OUT.replace("RANK", "rank: 4"))
    cli.ok("run", "out.yaml", "-q", "--report", "rep.json")
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    adapted = peft.PeftModel.from_pretrained(llama(), tmp_path / "out" / "adapter").eval()
    merged = llama().eval()
    merged.load_state_dict({k: v + (truncation(ft[k] - v, 4) if v.dim() == 2 else 0)
                            for k, v in stored.items()}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-4,
                                   atol=1e-5)
    import json
    report = json.loads((tmp_path / "rep.json").read_text())["output:adapter"]
    for k, entry in report["tensors"].items():
        delta = (ft[k] - stored[k]).double()
        s = torch.linalg.svdvals(delta)
        want = float((s[4:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
        assert entry["rank"] == 4 and entry["relative_error"] == pytest.approx(want, rel=1e-6)
    assert sorted(report["left_out"]) == sorted(k for k, v in stored.items() if v.dim() != 2)


def test_energy_ranks_per_tensor(cli, tmp_path):
    _base, stored, ft = finetuned(tmp_path)
    cli.write("out.yaml", OUT.replace("RANK", "rank: {energy: 0.6}"))
    cli.ok("run", "out.yaml", "-q", "--report", "rep.json")
    import json
    report = json.loads((tmp_path / "rep.json").read_text())["output:adapter"]["tensors"]
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    for k, entry in report.items():
        s2 = torch.linalg.svdvals((ft[k] - stored[k]).double()) ** 2
        share = torch.cumsum(s2, 0) / s2.sum()
        r = entry["rank"]
        assert share[r - 1] >= 0.6 and (r == 1 or share[r - 2] < 0.6), k
        module = k.removesuffix(".weight")
        assert config["rank_pattern"].get(module, config["r"]) == r
        assert config["alpha_pattern"].get(module, config["lora_alpha"]) == r  # scale 1


def test_peft_output_mistakes_are_recipe_errors(cli, tmp_path):
    finetuned(tmp_path)
    cli.write("a.yaml", OUT.replace(", RANK", ""))
    res = cli.fails(2, "validate", "a.yaml")
    assert "`format: peft` needs `rank`: a number such as 16, or `{energy: 0.9}`" in res.stderr
    cli.write("b.yaml", OUT.replace("RANK", "rank: 4").replace("finetuned: ft", "finetuned: [ft]"))
    res = cli.fails(2, "validate", "b.yaml")
    assert ("outputs.adapter.format: `format: peft` writes one vector; 'tv' is a vectors "
            "(write one member (from: NAME.MEMBER) or combine the set with sum)") in res.stderr
    cli.write("b3.yaml", OUT.replace("RANK", "rank: true"))
    res = cli.fails(2, "validate", "b3.yaml")
    assert res.stderr.splitlines()[1:] == [  # (one line: no union branch named by class)
        "  b3.yaml:6:58: outputs.adapter.rank: expected a number, got true"]
    cli.write("b4.yaml", OUT.replace("RANK", "rank: [{match: q_proj, value: 2}]"))
    res = cli.fails(5, "run", "b4.yaml")
    assert res.err_lines[0] == "tvrecipe: runtime error:"
    assert res.err_lines[1].startswith("output 'adapter', tensor '")
    assert res.err_lines[1].endswith("and the rules have no default; end the rules with a "
                                     "default {value: ...}")
    cli.write("b2.yaml", OUT.replace("RANK", "rank: 4").replace("from: tv", "from: ft"))
    res = cli.fails(2, "validate", "b2.yaml")
    assert ("outputs.adapter.format: `format: peft` writes one vector; 'ft' is a checkpoint "
            "(take its task vector first: {op: extract, base: ..., finetuned: ft})") in res.stderr
    cli.write("c.yaml", OUT.replace("format: peft, RANK", "rank: 4"))
    res = cli.fails(2, "validate", "c.yaml")
    assert ("`rank`, `full_tensors`, `base` and `base_model` are for `format: peft` outputs "
            "only") in res.stderr


# ---- uncovered tensors: exact zeros, never read or allocated where an op can skip them ----


STEPS = {
    "sum": "{op: sum, inputs: [A1, A2, tv], weights: [0.5, -1.0, 0.25]}",
    "mean": "{op: mean, inputs: [A1, A2, tv]}",
    "ties": "{op: ties, inputs: [A1, A2, tv], density: 0.5}",
    "dare": "{op: dare, input: A1, density: 0.5}",
    "negate": "{op: negate, input: A2}",
    "tsv": "{op: tsv_merge, inputs: [A1, A2, tv]}",
    "iso": "{op: iso, inputs: [A1, A2, tv], variant: cts}",
    "stock": "{op: model_stock, inputs: [A1, A2, tv]}",
    "crumbs": "{op: breadcrumbs, input: A1, density: 0.8, gamma: 0.1}",
    # Negate one adapter's unique part (its shared part computed against the others).
    "negu": "{op: negate, input: parts.unique.a2}",
}


def test_every_op_reads_an_uncovered_tensor_as_an_exact_zero(cli, tmp_path, monkeypatch):
    """Each op over adapters equals the same op over the adapters written out as full task
    vectors (zeros included), and no uncovered tensor is ever read from an adapter."""
    make_adapter(tmp_path, "a1", llama, seed=1, **CASES["plain"])
    make_adapter(tmp_path, "a2", llama, seed=2, **CASES["saved"])
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    gen = torch.Generator().manual_seed(4)
    (tmp_path / "ft").mkdir()
    from safetensors.torch import save_file
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()},
              str(tmp_path / "ft" / "model.safetensors"))
    cli.write("dense.yaml", "tvrecipe: 1\nmodels:\n  base: ./base\n"
              "  a1: {path: ./a1, kind: lora}\n  a2: {path: ./a2, kind: lora}\n"
              "outputs:\n  a1: {from: a1, path: ./dense/a1}\n  a2: {from: a2, path: ./dense/a2}\n")
    cli.ok("run", "dense.yaml", "-q")

    from tvrecipe.store.lora import LoraAdapter
    read = []
    real_get = LoraAdapter.get
    monkeypatch.setattr(LoraAdapter, "get", lambda self, name, rows=None, device=None: (
        read.append((self, name)), real_get(self, name, rows, device))[1])

    def recipe(a1: str, a2: str) -> str:
        steps = "".join(f"  {n}: {s.replace('A1', 'a1').replace('A2', 'a2')}\n"
                        for n, s in STEPS.items())
        outs = "".join(f"  {n}: {{from: {n}, path: ./out-{{tag}}/{n}, dtype: float32}}\n"
                       for n in STEPS)
        return ("tvrecipe: 1\nmodels:\n  base: ./base\n  ft: ./ft\n"
                f"  a1: {a1}\n  a2: {a2}\nsteps:\n"
                "  tv: {op: extract, base: base, finetuned: ft}\n"
                "  parts: {op: decompose, inputs: [a1, a2, tv], method: mean_projector, "
                "threshold: 0.5}\n" + steps
                + "outputs:\n" + outs)

    cli.write("lora.yaml", recipe("{path: ./a1, kind: lora}", "{path: ./a2, kind: lora}")
              .replace("{tag}", "lora"))
    cli.write("full.yaml", recipe("{path: ./dense/a1, kind: task_vector}",
                                  "{path: ./dense/a2, kind: task_vector}").replace("{tag}", "full"))
    cli.ok("run", "lora.yaml", "-q", "--no-cache")
    cli.ok("run", "full.yaml", "-q", "--no-cache")
    for name in STEPS:
        got = read_tensors(tmp_path / "out-lora" / name)
        want = read_tensors(tmp_path / "out-full" / name)
        assert got.keys() == want.keys(), name
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-9,
                                       msg=f"{name}: {k}")
    assert read and all(adapter.covers(name) for adapter, name in read)


def test_a_sum_of_adapters_allocates_no_zeros_for_what_they_do_not_cover(cli, tmp_path,
                                                                         monkeypatch):
    make_adapter(tmp_path, "a1", llama, seed=1, **CASES["plain"])
    make_adapter(tmp_path, "a2", llama, seed=2, **CASES["rslora"])
    cli.write("s.yaml", """\
        tvrecipe: 1
        models:
          base: ./base
          a1: {path: ./a1, kind: lora}
          a2: {path: ./a2, kind: lora}
        steps:
          merged: {op: sum, inputs: [a1, a2]}
          model: {op: apply, base: base, delta: merged}
        outputs:
          model: {from: model, path: ./out/model}
        """)
    from tvrecipe.exec.runner import Runner
    filled = []
    real = Runner._zero_fill

    def spy(self, value, info, block):
        if info.is_floating and value is None:
            filled.append(info.name)
        return real(self, value, info, block)

    monkeypatch.setattr(Runner, "_zero_fill", spy)
    cli.ok("run", "s.yaml", "-q", "--no-cache")
    assert filled == []  # uncovered tensors: None through sum, the base through apply


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adapters_form_their_deltas_on_the_gpu(cli, tmp_path):
    want = make_adapter(tmp_path, "plain", llama, **CASES["plain"])
    cli.write("g.yaml", "tvrecipe: 1\nmodels:\n  base: ./base\n  ad: {path: ./plain, kind: lora}\n"
                        "outputs:\n  v: {from: ad, path: ./out/g}\n")
    cli.ok("run", "g.yaml", "-q", "--device", "cuda")
    assert_deltas(read_tensors(tmp_path / "out" / "g"), want)


def test_validate_checks_adapters_against_the_base_headers(cli, tmp_path):
    make_adapter(tmp_path, "ok", llama, **CASES["plain"])
    import shutil
    shutil.copytree(tmp_path / "ok", tmp_path / "renamed")
    from safetensors.torch import save_file
    tensors = load_file(str(tmp_path / "renamed" / "adapter_model.safetensors"))
    save_file({k.replace("layers.1.self_attn.v_proj", "layers.1.self_attn.vv_proj"): v
               for k, v in tensors.items()},
              str(tmp_path / "renamed" / "adapter_model.safetensors"))
    cli.write("v.yaml", "tvrecipe: 1\nmodels:\n  base: ./base\n  good: {path: ./ok, kind: lora}\n"
                        "  bad: {path: ./renamed, kind: lora}\n"
                        "steps:\n  merged: {op: sum, inputs: [good, bad]}\n"
                        "outputs:\n  v: {from: merged, path: ./out/v}\n")
    res = cli.fails(3, "validate", "v.yaml")
    assert res.err_lines[0] == "tvrecipe: input error:"
    assert res.err_lines[1].startswith("v.yaml:5:3: models.bad: ")
    assert res.err_lines[1].endswith("adapter module 'model.layers.1.self_attn.vv_proj' has no "
                                     "tensor 'model.layers.1.self_attn.vv_proj.weight' in the "
                                     "base; is this adapter for another base model?")
    assert len(res.err_lines) == 2
    assert not (tmp_path / "out").exists()


def test_rank_rules_and_full_tensors_saved_whole(cli, tmp_path):
    _base, stored, ft = finetuned(tmp_path)
    cli.write("out.yaml", OUT.replace(
        "RANK", "rank: [{match: '*.mlp.*', value: 2}, {match: lm_head, value: 5}, {value: [3, 6]}],"
                " full_tensors: save, base: base"))
    cli.ok("run", "out.yaml", "-q", "--report", "rep.json")
    import json
    report = json.loads((tmp_path / "rep.json").read_text())["output:adapter"]
    ranks = {k: e["rank"] for k, e in report["tensors"].items()}
    assert ranks["model.layers.0.mlp.up_proj.weight"] == 2
    assert ranks["lm_head.weight"] == 5
    assert ranks["model.layers.0.self_attn.q_proj.weight"] == 3  # gradient over 2 layers
    assert ranks["model.layers.1.self_attn.q_proj.weight"] == 6
    assert report["left_out"] == []
    assert sorted(report["saved_whole"]) == sorted(k for k, v in stored.items() if v.dim() == 1)
    merged = peft.PeftModel.from_pretrained(llama(), tmp_path / "out" / "adapter")
    merged = merged.merge_and_unload().state_dict()
    for k, b in stored.items():
        if b.dim() == 1:  # a norm, saved whole: the fine-tune's own values
            torch.testing.assert_close(merged[k], ft[k], rtol=0, atol=1e-7)
        else:
            want = b + truncation(ft[k] - b, ranks[k])
            torch.testing.assert_close(merged[k], want, rtol=1e-5, atol=1e-7)
    cli.write("bad.yaml", OUT.replace("RANK", "rank: 4, full_tensors: save"))
    res = cli.fails(2, "validate", "bad.yaml")
    assert ("`full_tensors: save` writes base + delta: name the checkpoint the deltas are over "
            "with `base: MODEL`") in res.stderr


def test_biases_of_adapted_modules_are_saved_as_peft_saves_them(cli, tmp_path):
    # GPT-2's layers have biases: with full_tensors: save, an adapted module's bias goes in
    # as peft's bias "lora_only" saves it (base + delta, `.base_layer.bias`), so peft's merge
    # gives the fine-tune's biases; with drop, the base's.
    _base, stored, ft = finetuned(tmp_path, model=gpt2)
    cli.write("out.yaml", OUT.replace("RANK", "rank: 48, full_tensors: save, base: base"))
    cli.ok("run", "out.yaml", "-q", "--report", "rep.json")
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["bias"] == "lora_only"
    report = json.loads((tmp_path / "rep.json").read_text())["output:adapter"]
    assert report["left_out"] == []
    merged = peft.PeftModel.from_pretrained(gpt2(), tmp_path / "out" / "adapter"
                                            ).merge_and_unload().state_dict()
    biases = [k for k, v in stored.items() if k.endswith(".bias") and v.dim() == 1]
    assert "transformer.h.0.attn.c_attn.bias" in biases
    for k in biases:
        torch.testing.assert_close(merged[k], ft[k], rtol=0, atol=1e-6)
    for k, b in stored.items():
        if b.dim() == 2 and not k.endswith(".attn.bias"):
            scale = float((ft[k] - b).abs().max())
            assert float((merged[k] - ft[k]).abs().max()) <= 1e-5 * scale, k
    # Read back, the adapter is the vector it was made of.
    cli.write("back.yaml", "tvrecipe: 1\nmodels: {base: ./base, ad: {path: ./out/adapter, "
                           "kind: lora}}\noutputs:\n  v: {from: ad, path: ./out/back}\n")
    cli.ok("run", "back.yaml", "-q")
    back = read_tensors(tmp_path / "out" / "back")
    for k in biases:
        torch.testing.assert_close(back[k], ft[k] - stored[k], rtol=0, atol=1e-6)
    cli.write("drop.yaml", OUT.replace("RANK", "rank: 48"))
    cli.ok("run", "drop.yaml", "-q", "--force")
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["bias"] == "none"


def test_an_adapter_output_loads_with_auto_peft_model(cli, tmp_path):
    # task_type from the base's architecture, and the card's base_model as the adapter's
    # base_model_name_or_path (the two agree): AutoPeftModelForCausalLM can load it.
    _base, _stored, ft = finetuned(tmp_path)
    cli.write("out.yaml", OUT.replace("RANK", f"rank: 16, model_card: {{base_model: "
                                             f"'{tmp_path / 'base'}'}}"))
    cli.ok("run", "out.yaml", "-q")
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    model = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out" / "adapter")
    merged = model.merge_and_unload().state_dict()
    k = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[k], ft[k], rtol=1e-5, atol=1e-6)
    from tvrecipe.store.lora import peft_task_type
    assert peft_task_type({"architectures": ["GPT2LMHeadModel"]}) == "CAUSAL_LM"
    assert peft_task_type({"architectures": ["T5ForConditionalGeneration"],
                           "model_type": "t5", "is_encoder_decoder": True}) == "SEQ_2_SEQ_LM"
    assert peft_task_type({"architectures": ["WhisperForConditionalGeneration"],
                           "model_type": "whisper", "is_encoder_decoder": True}) is None
    assert peft_task_type({"architectures": ["T5WithLMHeadModel"],
                           "model_type": "t5"}) == "SEQ_2_SEQ_LM"
    assert peft_task_type({"architectures": ["LlavaForConditionalGeneration"]}) is None
    assert peft_task_type({"architectures": ["BertForSequenceClassification"]}) == "SEQ_CLS"
    assert peft_task_type({}) is None


def test_the_randomised_svd_of_a_large_delta_reaches_the_optimal_error():
    """Above a quarter of the smaller side the SVD is exact; below it (large matrices) the
    seeded randomised SVD (float32) must still find the best rank-r error to 1e-5, and give
    the same bytes on every run."""
    from tvrecipe.ops.lowrank import lora_factors
    gen = torch.Generator().manual_seed(0)
    m, n, r = 300, 2000, 12
    u = torch.linalg.qr(torch.randn(m, 40, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, 40, generator=gen, dtype=torch.float64)).Q
    s = torch.logspace(0, -2, 40, dtype=torch.float64)
    x = ((u * s) @ v.T + 1e-4 * torch.randn(m, n, generator=gen, dtype=torch.float64)).float()
    b, a, err, _norm = lora_factors(x, r, seed=3)
    sv = torch.linalg.svdvals(x.double())
    optimal = float(((sv[r:] ** 2).sum() / (sv ** 2).sum()).sqrt())
    assert err == pytest.approx(optimal, rel=1e-5)  # float32 sketch, 3 power iterations
    assert err == pytest.approx(float(torch.linalg.norm(x.double() - b.double() @ a.double())
                                      / torch.linalg.norm(x.double())), rel=1e-5)
    b2, a2, _err, _norm = lora_factors(x, r, seed=3)
    assert torch.equal(b, b2) and torch.equal(a, a2)


def test_an_adapter_release_explains_itself_and_verifies_on_its_own(cli, tmp_path):
    finetuned(tmp_path)
    cli.write("out.yaml", OUT.replace("RANK", "rank: 4, base_model: org/tiny"))
    cli.ok("run", "out.yaml", "-q")
    folder = tmp_path / "out" / "adapter"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "tvrecipe.lock",
        "tvrecipe.yaml"]
    card = (folder / "README.md").read_text()
    import yaml
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {"base_model": "org/tiny", "library_name": "peft",
                     "tags": ["merge", "tvrecipe", "task-vectors"]}
    assert "This adapter was built by tvrecipe" in card
    cli.ok("verify", "out/adapter", "--recompute")
    peft.PeftModel.from_pretrained(llama(), folder)  # the extra files do not bother peft


def test_zero_deltas_are_left_out_whatever_the_rank(cli, tmp_path):
    # A fine-tune equal to its base except in one projection: with a fixed rank, the zero
    # deltas got all-zero factors before (the docs say they are left out); now only the
    # changed module is a target, and peft merges it back.
    _base, stored, ft = finetuned(tmp_path)
    key = "model.layers.0.mlp.up_proj.weight"
    same = {k: (ft[k] if k == key else v.clone()) for k, v in stored.items()}
    from safetensors.torch import save_file
    save_file(same, str(tmp_path / "ft" / "model.safetensors"))
    cli.write("out.yaml", OUT.replace("RANK", "rank: 2"))
    res = cli.ok("run", "out.yaml")
    assert "peft adapter: 1 modules" in res.stdout or "peft adapter: 1 module" in res.stdout
    factors = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert sorted(factors) == ["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
                               "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"]
    merged = peft.PeftModel.from_pretrained(llama(), tmp_path / "out" / "adapter")
    merged = merged.merge_and_unload().state_dict()
    want = stored[key] + truncation(ft[key] - stored[key], 2)
    assert float((merged[key] - want).abs().max()) <= 1e-5 * float(want.abs().max())


@pytest.mark.parametrize("rank", ["rank: 2", "rank: {energy: 0.9}",
                                  "rank: 2, full_tensors: save, base: base"])
def test_an_all_zero_vector_is_no_adapter(cli, tmp_path, rank):
    # peft cannot load an adapter with no target module: say so instead of writing one.
    _base, stored, _ft = finetuned(tmp_path)
    from safetensors.torch import save_file
    save_file(stored, str(tmp_path / "ft" / "model.safetensors"))
    cli.write("out.yaml", OUT.replace("RANK", rank))
    res = cli.fails(5, "run", "out.yaml")
    assert res.err_lines[1] == (
        "output 'adapter' (peft adapter): no 2-D tensor of this vector is nonzero (is a "
        "fine-tune equal to its base?), so the adapter would adapt no module, and peft cannot "
        "load that: write the vector with format: safetensors")
    assert not (tmp_path / "out").exists()  # no adapter, no staging, not even the out/ made


# ---- adapters as peft users publish them (a user's audit, 2026-11-28) -----------------------


def test_adapters_over_a_base_peft_changes_at_init_are_refused(cli, tmp_path):
    # PiSSA and OLoRA move the base's principal part into the factors, again when peft loads
    # the adapter: s·B·A over this base is not what peft merges (0.94x and 2.47x off).
    for init in ("pissa", "olora"):
        make_adapter(tmp_path, init, llama, r=2, target_modules=["q_proj"])
        cfg_file = tmp_path / init / "adapter_config.json"
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()),
                                        "init_lora_weights": init}))
        cli.write("r.yaml", f"tvrecipe: 1\nmodels: {{base: ./base, ad: {{path: ./{init}, "
                            "kind: lora}}\noutputs:\n  v: {from: ad, path: ./out/v}\n")
        res = cli.fails(3, "run", "r.yaml")
        assert (f"adapter_config.json: init_lora_weights {init!r} takes part of the base's "
                "weights into the factors when peft loads the adapter") in res.stderr


def test_a_saved_copy_of_a_tied_input_embedding_is_refused(cli, tmp_path):
    # peft unties them (the head keeps the base's embedding); a checkpoint that stays tied
    # would give the head the new embedding.
    def tied():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24,
                                       num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(cfg)

    make_adapter(tmp_path, "chat", tied, r=2, target_modules=["q_proj"],
                 modules_to_save=["embed_tokens"])
    assert "lm_head.weight" not in load_file(str(tmp_path / "base" / "model.safetensors"))
    cli.write("r.yaml", "tvrecipe: 1\nmodels: {base: ./base, ad: {path: ./chat, kind: lora}}\n"
                        "outputs:\n  v: {from: ad, path: ./out/v}\n")
    res = cli.fails(3, "validate", "r.yaml")
    assert ("saves a copy of the input embedding 'model.embed_tokens.weight' of a model whose "
            "output head is tied to it (the base stores no lm_head.weight); peft unties the "
            "two") in " ".join(res.stderr.split())


def test_an_adapter_saved_as_pickle_says_how_to_convert_it(cli, tmp_path):
    make_adapter(tmp_path, "old", llama, r=2, target_modules=["q_proj"])
    weights = tmp_path / "old" / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), tmp_path / "old" / "adapter_model.bin")
    weights.unlink()
    cli.write("r.yaml", "tvrecipe: 1\nmodels: {base: ./base, ad: {path: ./old, kind: lora}}\n"
                        "outputs:\n  v: {from: ad, path: ./out/v}\n")
    said = " ".join(cli.fails(3, "run", "r.yaml").stderr.split())
    assert "holds only pickled weights (adapter_model.bin); tvrecipe never unpickles" in said
    assert "torch.load('adapter_model.bin', weights_only=True)" in said


def test_fan_in_fan_out_is_ignored_where_the_architecture_has_no_conv1d(cli, tmp_path):
    # peft sets the flag back to False on a Linear layer: a Llama's square q_proj is not
    # transposed whatever a hand-edited config says.
    want = make_adapter(tmp_path, "flag", llama, r=2, target_modules=["q_proj", "o_proj"])
    cfg_file = tmp_path / "flag" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "fan_in_fan_out": True}))
    assert_deltas(run_vector(cli, tmp_path, "flag"), want)


def test_saved_modules_in_every_key_layout_peft_writes_read_alike(cli, tmp_path):
    # A modules_to_save copy saved as `X.weight`, as `X.modules_to_save.weight` (no adapter
    # name) beside the plain one, or with the original module too (a resized vocabulary):
    # the copy counts, the original module does not.
    from safetensors.torch import save_file

    want = make_adapter(tmp_path, "plain", llama, r=2, target_modules=["q_proj"],
                        modules_to_save=["lm_head"])
    tensors = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    head = "base_model.model.lm_head.weight"
    assert head in tensors
    base_head = load_file(str(tmp_path / "base" / "model.safetensors"))["lm_head.weight"]
    (tmp_path / "layouts").mkdir()
    import shutil
    shutil.copytree(tmp_path / "plain", tmp_path / "layouts" / "named")
    save_file({**tensors, "base_model.model.lm_head.modules_to_save.weight": tensors[head].clone(),
               "base_model.model.lm_head.original_module.weight": base_head},
              str(tmp_path / "layouts" / "named" / "adapter_model.safetensors"))
    cli.write("r.yaml", "tvrecipe: 1\nmodels: {base: ./base, ad: {path: ./layouts/named, "
                        "kind: lora}}\noutputs:\n  v: {from: ad, path: ./out/v}\n")
    cli.ok("run", "r.yaml", "-q")
    got = read_tensors(tmp_path / "out" / "v")
    assert_deltas(got, want)
    assert float(got["lm_head.weight"].abs().max()) > 0


def test_t5_shared_embeddings_are_written_as_embedding_factors(cli, tmp_path):
    # peft adapts nn.Embedding layers with lora_embedding_A/B; T5's `shared` and
    # `relative_attention_bias` are embeddings under other names (Linear factors were
    # dropped by peft: their whole delta lost).
    def t5():
        torch.manual_seed(0)
        cfg = transformers.T5Config(vocab_size=48, d_model=16, d_kv=4, d_ff=24, num_layers=1,
                                    num_heads=2, decoder_start_token_id=0)
        return transformers.T5ForConditionalGeneration(cfg)

    _base, stored, ft = finetuned(tmp_path, model=t5)
    cli.write("out.yaml", OUT.replace("RANK", "rank: 48"))
    cli.ok("run", "out.yaml", "-q")
    keys = set(load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.shared.lora_embedding_A" in keys
    merged = peft.PeftModel.from_pretrained(t5(), tmp_path / "out" / "adapter"
                                            ).merge_and_unload().state_dict()
    for k in ("shared.weight",
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"):
        scale = float((ft[k] - stored[k]).abs().max())
        assert float((merged[k] - ft[k]).abs().max()) <= 1e-5 * scale, k


def test_a_gpt2_base_stored_bare_takes_adapters_of_the_model_with_its_head(cli, tmp_path):
    # The Hub's GPT-2 checkpoints store `h.0.…`, not `transformer.h.0.…`; peft adapts
    # GPT2LMHeadModel, whose names have the prefix: adapters go both ways over such a base.
    from safetensors.torch import save_file

    _base, stored, ft = finetuned(tmp_path, model=gpt2)
    want = {k.removeprefix("transformer."): v for k, v in
            make_adapter(tmp_path, "lm", gpt2, r=2, target_modules=["c_attn"],
                         fan_in_fan_out=True).items() if k != "lm_head.weight"}
    bare = {k.removeprefix("transformer."): v for k, v in stored.items() if k != "lm_head.weight"}
    for name, tensors in (("base", bare), ("ft", {k.removeprefix("transformer."): v
                                                   for k, v in ft.items()
                                                   if k != "lm_head.weight"})):
        (tmp_path / name / "model.safetensors").unlink()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    cli.write("out.yaml", OUT.replace("RANK", "rank: 48"))
    cli.ok("run", "out.yaml", "-q")
    keys = set(load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    model = gpt2()
    model.load_state_dict({**{f"transformer.{k}": v for k, v in bare.items()},
                           "lm_head.weight": bare["wte.weight"]}, strict=False)
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "out" / "adapter"
                                            ).merge_and_unload().state_dict()
    k = "transformer.h.0.attn.c_attn.weight"
    scale = float((ft[k] - stored[k]).abs().max())
    assert float((merged[k] - ft[k]).abs().max()) <= 1e-5 * scale
    # The other way: an adapter made on GPT2LMHeadModel, read over the bare base.
    got = run_vector(cli, tmp_path, "lm")
    assert_deltas({k: v for k, v in got.items() if k in want}, want)


def test_an_adapter_with_a_head_the_base_lacks_says_which(cli, tmp_path):
    # A sequence-classification adapter (its `score` head saved whole) over a causal LM:
    # the message names the head, not only "another base model".
    make_adapter(tmp_path, "ok", llama, r=2, target_modules=["q_proj"])

    def classifier():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, num_labels=3, pad_token_id=0)
        return transformers.LlamaForSequenceClassification(cfg)

    torch.manual_seed(1)
    model = peft.get_peft_model(classifier(), peft.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["score"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "cls")
    cli.write("r.yaml", "tvrecipe: 1\nmodels: {base: ./base, ad: {path: ./cls, kind: lora}}\n"
                        "outputs:\n  v: {from: ad, path: ./out/v}\n")
    said = " ".join(cli.fails(3, "validate", "r.yaml").stderr.split())
    assert ("matches no tensor of the base (looked for 'score.weight'); the base has no module "
            "'score' at all: is this adapter for a model with another head (a classification "
            "head over a language model?), or for another base model?") in said


def test_plan_counts_an_adapter_outputs_whole_tensors(cli, tmp_path):
    # A `format: peft` output factors each 2-D delta whole: the plan adds its largest 2-D
    # tensor twice (gathered, and its float32 working copy) to what the same vector written
    # as safetensors needs.
    import math

    from tvrecipe.plan.graph import compile_recipe
    from tvrecipe.plan.summary import estimates
    from tvrecipe.plan.tensors import build_tensor_plan
    from tvrecipe.spec.load import load_recipe
    _base, stored, _ft = finetuned(tmp_path)
    largest = max(math.prod(v.shape) for v in stored.values() if v.dim() == 2)
    peaks = {}
    for name, form in (("a", "format: peft, rank: 4"), ("b", "dtype: float32")):
        path = cli.write(f"{name}.yaml", OUT.replace("format: peft, RANK", form))
        compiled = compile_recipe(load_recipe(path))
        peaks[name] = estimates(compiled, build_tensor_plan(compiled))["peak_bytes"]
    assert peaks["a"] - peaks["b"] == largest * (4 + 4)
