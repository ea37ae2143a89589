"""End to end from the CLI: linear, slerp, breadcrumbs, della and model_stock on tiny real
checkpoints, against their kernels' math (the kernels are checked in tests/ops/test_merges.py)."""

from __future__ import annotations

import torch

from tests.conftest import FLOATING, INT_BUFFER, read_tensors
from tvrecipe.ops import derive_seed
from tvrecipe.ops.merges import breadcrumbs, della, model_stock, slerp

TASKS = ("math", "code", "chat")


def close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=lambda m: f"{what}: {m}")


def recipe(ms, steps: str, outputs: str) -> str:
    return "tvrecipe: 1\n" + ms.models_yaml() + "steps:\n" + steps + "outputs:\n" + outputs


def test_linear_is_the_normalized_weighted_average(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    cli.write("r.yaml", recipe(ms, "  soup: {op: linear, inputs: [math, code], weights: [3, 1]}\n",
                               "  soup: {from: soup, path: ./out/soup, dtype: float32}\n"))
    cli.ok("run", "r.yaml")
    got = read_tensors(tmp_path / "out" / "soup")
    for k in FLOATING:
        close(got[k], 0.75 * ms.f32("math")[k] + 0.25 * ms.f32("code")[k], k)
    assert torch.equal(got[INT_BUFFER], ms.weights["math"][INT_BUFFER])


def test_slerp_ends_and_middle(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    steps = "".join(f"  s{i}: {{op: slerp, a: math, b: code, t: {t}}}\n"
                    for i, t in enumerate((0, 0.3, 1)))
    outs = "".join(f"  s{i}: {{from: s{i}, path: ./out/s{i}, dtype: float32}}\n"
                   for i in range(3))
    cli.write("r.yaml", recipe(ms, steps, outs))
    cli.ok("run", "r.yaml")
    a, b = ms.f32("math"), ms.f32("code")
    for k in FLOATING:
        assert torch.equal(read_tensors(tmp_path / "out" / "s0")[k], a[k]), k
        close(read_tensors(tmp_path / "out" / "s2")[k], b[k], k)
        mid = read_tensors(tmp_path / "out" / "s1")[k]
        close(mid, slerp(a[k], b[k], t=0.3), k)
        # Spherical, not linear, where the tensors are not colinear: between the two ends.
        assert mid.shape == a[k].shape


def test_breadcrumbs_della_and_model_stock_match_their_kernels(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    steps = ("  tv: {op: extract, base: base, finetuned: [math, code, chat]}\n"
             "  crumbs: {op: breadcrumbs, input: tv, density: 0.5, gamma: 0.1}\n"
             "  pruned: {op: della, input: tv, density: 0.5, epsilon: 0.2}\n"
             "  stock: {op: model_stock, inputs: tv}\n")
    outs = ("  crumbs: {from: crumbs, path: ./out/crumbs}\n"
            "  pruned: {from: pruned, path: ./out/pruned}\n"
            "  stock: {from: stock, path: ./out/stock}\n")
    cli.write("r.yaml", recipe(ms, steps, outs))
    cli.ok("run", "r.yaml")
    deltas = {t: ms.delta(t) for t in TASKS}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stock = read_tensors(tmp_path / "out" / "stock")
    for k in FLOATING:
        close(stock[k], model_stock([deltas[t][k] for t in TASKS]), k)
    for t in TASKS:
        crumbs = read_tensors(tmp_path / "out" / "crumbs" / f"{t}.safetensors")
        pruned = read_tensors(tmp_path / "out" / "pruned" / f"{t}.safetensors")
        for k in FLOATING:
            assert torch.equal(crumbs[k], breadcrumbs(deltas[t][k], density=0.5, gamma=0.1))
            # on the device the run took (`auto`): the mask is the same on any, the l1
            # rescale's norm is a sum a GPU adds in another order
            want = della(deltas[t][k].to(device), density=0.5, epsilon=0.2,
                         seed=derive_seed(0, "pruned", t, k)).cpu()
            assert torch.equal(pruned[k], want), (t, k)
    # A rerun gives the same bytes (della's masks derive from the seed, step, member, tensor).
    first = (tmp_path / "out" / "pruned" / "math.safetensors").read_bytes()
    cli.ok("run", "r.yaml", "--force", "--no-cache")
    assert (tmp_path / "out" / "pruned" / "math.safetensors").read_bytes() == first


def test_model_stock_and_slerp_refuse_what_they_cannot_do(make_models, cli):
    ms = make_models(TASKS)
    cli.write("r.yaml", recipe(ms, (
        "  tv: {op: extract, base: base, finetuned: math}\n"
        "  stock: {op: model_stock, inputs: tv}\n"
        "  mixed: {op: slerp, a: math, b: tv, t: 0.5}\n"),
        "  stock: {from: stock, path: ./out/stock}\n  mixed: {from: mixed, path: ./out/m}\n"))
    res = cli.fails(2, "validate", "r.yaml")
    assert res.err_lines[1:] == [
        ("r.yaml:9:28: steps.stock.inputs: model_stock needs at least 2 task vectors, got 1 "
         "(the ratio comes from the angle between pairs of fine-tunes)"),
        ("r.yaml:10:31: steps.mixed.b: slerp interpolates two values of one kind, but 'a' is a "
         "checkpoint and 'b' a vector (give two checkpoints or two vectors)")]


def test_consensus_elects_signs_and_normalizes_like_the_definition(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    steps = ("  tv: {op: extract, base: base, finetuned: [math, code, chat]}\n"
             "  elected: {op: consensus, inputs: tv, weights: {math: 1, code: 0.5, chat: 2}}\n"
             "  plain: {op: consensus, inputs: tv, majority: none, normalize: false}\n")
    outs = ("  elected: {from: elected, path: ./out/elected}\n"
            "  plain: {from: plain, path: ./out/plain}\n")
    cli.write("r.yaml", recipe(ms, steps, outs))
    cli.ok("run", "r.yaml")
    w = {"math": 1.0, "code": 0.5, "chat": 2.0}
    elected = read_tensors(tmp_path / "out" / "elected")
    plain = read_tensors(tmp_path / "out" / "plain")
    for k in FLOATING:
        c = torch.stack([w[t] * ms.delta(t)[k].double() for t in TASKS])
        sign = torch.where(c.sum(0) >= 0, 1.0, -1.0).double()
        agree = c.sign() == sign
        ws = torch.tensor([w[t] for t in TASKS], dtype=torch.float64).view(-1, *[1] * sign.dim())
        den = (ws * agree).sum(0)
        want = (c * agree).sum(0) / torch.where(den == 0, 1.0, den)
        close(elected[k], want.float(), k)
        close(plain[k], sum(ms.delta(t)[k] for t in TASKS), k)


def test_dare_l1_and_prune_rescale_keep_the_l1_norm(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    steps = ("  tv: {op: extract, base: base, finetuned: [math, code, chat]}\n"
             "  dropped: {op: dare, input: tv.math, density: 0.5, rescale: l1}\n"
             "  pruned: {op: prune, input: tv.math, density: 0.3, rescale: true}\n")
    outs = ("  dropped: {from: dropped, path: ./out/dropped}\n"
            "  pruned: {from: pruned, path: ./out/pruned}\n")
    cli.write("r.yaml", recipe(ms, steps, outs))
    cli.ok("run", "r.yaml")
    for name in ("dropped", "pruned"):
        got = read_tensors(tmp_path / "out" / name)
        for k in FLOATING:
            x = ms.delta("math")[k]
            assert (got[k] == 0).sum() > 0, (name, k)  # entries were dropped
            torch.testing.assert_close(got[k].abs().sum(), x.abs().sum(), rtol=1e-5, atol=1e-8)
            kept = got[k] != 0
            ratio = got[k][kept] / x[kept]  # one factor for every kept entry
            torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), rtol=1e-5, atol=0)


def test_model_stock_streams_in_row_blocks_with_whole_tensor_ratios(make_models, cli, tmp_path,
                                                                    monkeypatch):
    # t comes from a whole-model pass over row blocks (each tensor's Gram matrix); t·mean(τ)
    # then streams by rows. Small blocks must give the whole-tensor kernel's result.
    from tvrecipe.store.checkpoint import Checkpoint
    ms = make_models(TASKS)
    steps = ("  tv: {op: extract, base: base, finetuned: [math, code, chat]}\n"
             "  stock: {op: model_stock, inputs: tv}\n"
             "  rows: {op: model_stock, inputs: tv, filter_wise: true}\n")
    outs = ("  stock: {from: stock, path: ./out/stock}\n"
            "  rows: {from: rows, path: ./out/rows}\n")
    cli.write("r.yaml", recipe(ms, steps, outs))
    monkeypatch.setattr("tvrecipe.exec.runner.CHUNK_ELEMENTS", 7)
    blocks = []
    real_get = Checkpoint.get

    def spy(self, name, rows=None, **kw):
        if rows is not None:
            blocks.append(name)
        return real_get(self, name, rows, **kw)

    monkeypatch.setattr(Checkpoint, "get", spy)
    res = cli.ok("run", "r.yaml", "--report", "rep.json")
    assert set(blocks) >= {k for k in FLOATING if len(ms.f32("base")[k].shape) == 2}
    assert "stock (model_stock): t from " in res.stdout
    stock = read_tensors(tmp_path / "out" / "stock")
    rows = read_tensors(tmp_path / "out" / "rows")
    for k in FLOATING:
        deltas = [ms.delta(t)[k] for t in TASKS]
        torch.testing.assert_close(stock[k], model_stock(deltas), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(rows[k], model_stock(deltas, filter_wise=True),
                                   rtol=1e-5, atol=1e-7)


def test_slerp_streams_in_row_blocks_with_whole_tensor_angles(make_models, cli, tmp_path,
                                                              monkeypatch):
    # The angle of each tensor comes from a whole-model pass over row blocks (‖a‖², ‖b‖²,
    # ⟨a, b⟩); c_a·a + c_b·b then streams by rows. Small blocks give the whole-tensor kernel.
    ms = make_models(TASKS)
    steps = ("  s: {op: slerp, a: math, b: code, t: [0.2, 0.7]}\n"
             "  same: {op: slerp, a: math, b: math, t: 0.4}\n")  # colinear: lerp, exactly a
    outs = ("  s: {from: s, path: ./out/s, dtype: float32}\n"
            "  same: {from: same, path: ./out/same, dtype: float32}\n")
    cli.write("r.yaml", recipe(ms, steps, outs))
    monkeypatch.setattr("tvrecipe.exec.runner.CHUNK_ELEMENTS", 7)
    cli.ok("run", "r.yaml")
    got, same = read_tensors(tmp_path / "out" / "s"), read_tensors(tmp_path / "out" / "same")
    a, b = ms.f32("math"), ms.f32("code")
    for k in FLOATING:
        t = 0.7 if ".layers." in k else 0.2  # one layer: t = 1 on it, the first value outside
        close(got[k], slerp(a[k], b[k], t=t), k)
        close(same[k], a[k], k)
    assert torch.equal(got[INT_BUFFER], ms.weights["math"][INT_BUFFER])


def test_floating_buffers_are_kept_from_the_reference_not_merged(cli, tmp_path):
    # Older transformers saved rotary inverse frequencies and GPT-2's attention mask beside the
    # weights. They are no weights: a linear merge whose weights add up to 1.2 scaled them by
    # 1.2, and a task vector carried a fine-tune's own (say, another rope_theta). Now every
    # op keeps the reference model's (linear's first input, else the base), stored as it is.
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    names = ["base", "a", "b"]
    inv = {n: 1.0 / (10000.0 + 1000.0 * i) ** (torch.arange(0, 8, 2).float() / 8)
           for i, n in enumerate(names)}
    mask = torch.tril(torch.ones(1, 1, 4, 4))
    weights = {}
    w0 = torch.randn(8, 8, generator=gen)
    for i, n in enumerate(names):
        weights[n] = {"model.layers.0.self_attn.q_proj.weight": w0 + 0.01 * i * torch.randn(
                          8, 8, generator=gen),
                      "model.layers.0.self_attn.rotary_emb.inv_freq": inv[n],
                      "h.0.attn.bias": mask.clone(), "h.0.attn.masked_bias": torch.tensor(-1e4),
                      "h.0.crossattention.bias": mask.clone(),
                      "gpt_neox.layers.0.attention.masked_bias": torch.tensor(-1e9),
                      "transformer.rotary_pos_emb.inv_freq": inv[n] * 2,
                      # (a real bias of a module named attn: merged, as 1-D, not a mask)
                      "blocks.0.attn.bias": torch.randn(8, generator=gen)}
        (tmp_path / n).mkdir()
        save_file(weights[n], str(tmp_path / n / "model.safetensors"))
    cli.write("r.yaml", """\
tvrecipe: 1
models: {base: ./base, a: ./a, b: ./b}
steps:
  soup: {op: linear, inputs: [a, b], weights: [0.3, 0.9], normalize: false}
  tv: {op: extract, base: base, finetuned: [a, b]}
  merged: {op: ties, inputs: tv, density: 0.5}
  model: {op: apply, base: base, delta: merged}
  sl: {op: slerp, a: a, b: b, t: 0.5}
outputs:
  soup: {from: soup, path: ./out/soup, dtype: bfloat16}
  model: {from: model, path: ./out/model}
  sl: {from: sl, path: ./out/sl}
  tv: {from: tv, path: ./out/tv}
""")
    cli.ok("run", "r.yaml", "-q")
    q, rot = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.rotary_emb.inv_freq"
    soup = read_tensors(tmp_path / "out" / "soup")
    for k in (q, "blocks.0.attn.bias"):
        close(soup[k].float(), (0.3 * weights["a"][k] + 0.9 * weights["b"][k]).bfloat16().float(),
              k)
    for out, ref in (("soup", "a"), ("model", "base"), ("sl", "a")):
        got = read_tensors(tmp_path / "out" / out)
        for k in (rot, "h.0.attn.bias", "h.0.attn.masked_bias", "h.0.crossattention.bias",
                  "gpt_neox.layers.0.attention.masked_bias",
                  "transformer.rotary_pos_emb.inv_freq"):
            assert got[k].dtype == torch.float32 and torch.equal(got[k], weights[ref][k]), (out, k)
    for task in ("a", "b"):
        assert set(read_tensors(tmp_path / "out" / "tv" / f"{task}.safetensors")) == {
            q, "blocks.0.attn.bias"}


def test_a_cached_result_that_merged_a_buffer_is_not_read_for_it(cli, tmp_path, monkeypatch):
    # tvrecipe 0.2.1 merged floating buffers and cached them with the rest (sum's key over
    # stored task vectors did not change since): such a slot is not read; the buffer is the
    # base's, as without the cache, in the torch and the numpy executor alike.
    from safetensors.torch import save_file

    import tvrecipe.exec.evaluate as evaluate_module
    import tvrecipe.store.checkpoint as checkpoint_module
    mask = torch.tril(torch.ones(1, 1, 4, 4))
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(4))
    (tmp_path / "base").mkdir()
    save_file({"h.0.attn.c_attn.weight": w, "h.0.attn.bias": mask},
              str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "tv").mkdir()
    save_file({"h.0.attn.c_attn.weight": 0.1 * w, "h.0.attn.bias": torch.full_like(mask, 0.5)},
              str(tmp_path / "tv" / "model.safetensors"))
    for scale in ("1.0", "[{value: 1.0}]"):  # (rules: the torch executor; a number: numpy's)
        cli.write("r.yaml", f"""\
tvrecipe: 1
models: {{base: ./base, tv: {{path: ./tv, kind: task_vector}}}}
steps:
  s: {{op: sum, inputs: [tv, tv]}}
  m: {{op: apply, base: base, delta: s, scale: {scale}}}
outputs:
  m: {{from: m, path: ./out/m}}
""")
        with monkeypatch.context() as m:  # as 0.2.1 did: the buffer merged, and cached
            m.setattr(checkpoint_module, "is_buffer", lambda name, ndim: False)
            m.setattr(evaluate_module, "is_buffer", lambda name, ndim: False)
            cli.ok("run", "r.yaml", "-q", "--force")
        assert not torch.equal(read_tensors(tmp_path / "out" / "m")["h.0.attn.bias"], mask)
        cli.ok("run", "r.yaml", "-q", "--force")
        got = read_tensors(tmp_path / "out" / "m")
        assert torch.equal(got["h.0.attn.bias"], mask), scale
        close(got["h.0.attn.c_attn.weight"], 1.2 * w, scale)


def test_results_made_under_another_buffer_rule_are_not_reused(cli, tmp_path, monkeypatch):
    # 0.2.3 took every `attn.bias` for GPT-2's mask, a 1-D one too (kept from the base, left
    # out of task vectors and sums) and cached its results: every step's key carries the
    # rule's version, so those entries are not read now and the bias is merged.
    from safetensors.torch import save_file

    import tvrecipe.exec.evaluate as evaluate_module
    import tvrecipe.store.checkpoint as checkpoint_module
    g = torch.Generator().manual_seed(6)
    for name in ("ta", "tb"):
        (tmp_path / name).mkdir()
        save_file({"h.0.attn.bias": torch.randn(8, generator=g),
                   "h.0.mlp.weight": torch.randn(4, 8, generator=g)},
                  str(tmp_path / name / "model.safetensors"))
    cli.write("r.yaml", """\
tvrecipe: 1
models: {ta: {path: ./ta, kind: task_vector}, tb: {path: ./tb, kind: task_vector}}
steps:
  merged: {op: sum, inputs: [ta, tb], weights: 0.5}
outputs:
  v: {from: merged, path: ./out/v}
""")
    old = lambda name, ndim=0: name.endswith(checkpoint_module._BUFFER_ENDS)
    with monkeypatch.context() as m:  # as 0.2.3 did
        m.setattr(checkpoint_module, "is_buffer", old)
        m.setattr(evaluate_module, "is_buffer", old)
        m.setattr(checkpoint_module, "BUFFER_RULE", 1)
        cli.ok("run", "r.yaml", "-q")
    assert "h.0.attn.bias" not in read_tensors(tmp_path / "out" / "v")
    res = cli.ok("run", "r.yaml", "--force")
    assert "from cache" not in res.stdout
    want = 0.5 * (read_tensors(tmp_path / "ta")["h.0.attn.bias"]
                  + read_tensors(tmp_path / "tb")["h.0.attn.bias"])
    close(read_tensors(tmp_path / "out" / "v")["h.0.attn.bias"], want, "h.0.attn.bias")
