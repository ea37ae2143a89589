"""End to end from the CLI: task arithmetic (extract, scale, negate, sum, mean, apply) on tiny
real checkpoints, checked against the same math done by hand with torch."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml
from safetensors import safe_open

from tests.conftest import (
    FLOATING,
    INT_BUFFER,
    SHAPES,
    read_metadata,
    read_tensors,
    snapshot,
    weight_files,
)
from tvrecipe.store.checkpoint import Checkpoint

TASKS = ("math", "code", "toxic")
W = {"math": 0.5, "code": 0.25, "toxic": -0.3}


def hand_sum(ms, weights: dict[str, float], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """θ₀ + scale · Σ w_i (θ_i − θ₀) in float32, tensor by tensor."""
    base = ms.f32("base")
    out = {}
    for k in FLOATING:
        delta = torch.zeros(SHAPES[k])
        for name, w in weights.items():
            delta += w * (ms.f32(name)[k] - base[k])
        out[k] = base[k] + scale * delta
    return out


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=lambda m: f"{what}: {m}")


def recipe(ms, steps: str, outputs: str, extra: str = "") -> str:
    return ("tvrecipe: 1\n" + extra + ms.models_yaml() + "steps:\n" + steps + "outputs:\n"
            + outputs)


# ---- exactness ----------------------------------------------------------------------------


def test_apply_of_extract_reproduces_each_finetune_exactly(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    steps = "  tv: {op: extract, base: base, finetuned: [math, code, toxic]}\n" + "".join(
        f"  back_{t}: {{op: apply, base: base, delta: tv.{t}}}\n" for t in TASKS)
    outs = "".join(f"  {t}: {{from: back_{t}, path: ./out/{t}, dtype: float32}}\n"
                   for t in TASKS)
    cli.write("r.yaml", recipe(ms, steps, outs))
    cli.ok("run", "r.yaml")
    for t in TASKS:
        got = read_tensors(tmp_path / "out" / t)
        assert set(got) == set(ms.weights["base"])
        for k in FLOATING:
            assert got[k].dtype == torch.float32
            assert torch.equal(got[k], ms.weights[t][k]), f"{t}: {k} differs from the fine-tune"
        # Integer buffers are never merged: the base's values, not the fine-tune's.
        assert got[INT_BUFFER].dtype == torch.int64
        assert torch.equal(got[INT_BUFFER], ms.weights["base"][INT_BUFFER])
        assert not torch.equal(got[INT_BUFFER], ms.weights[t][INT_BUFFER])


@pytest.mark.parametrize("inputs, weights, expected", [
    ("[tv.math, tv.code, tv.toxic]", "[0.5, 0.25, -0.3]", W),
    ("tv", "{math: 0.5, code: 0.25, toxic: -0.3}", W),
    ("tv", "0.4", dict.fromkeys(TASKS, 0.4)),
    ("[tv]", "[0.4]", dict.fromkeys(TASKS, 0.4)),
    ("[tv.code, tv.toxic]", "null", {"code": 1.0, "toxic": 1.0}),
], ids=["list", "mapping", "scalar", "set-weight", "default"])
def test_weighted_sum_matches_hand_computation(make_models, cli, tmp_path, inputs, weights,
                                               expected):
    ms = make_models(TASKS)
    steps = ("  tv: {op: extract, base: base, finetuned: [math, code, toxic]}\n"
             f"  merged: {{op: sum, inputs: {inputs}, weights: {weights}}}\n"
             "  model: {op: apply, base: base, delta: merged}\n")
    cli.write("r.yaml", recipe(ms, steps, "  m: {from: model, path: ./out/m, dtype: float32}\n"))
    cli.ok("run", "r.yaml")
    got = read_tensors(tmp_path / "out" / "m")
    want = hand_sum(ms, expected)
    for k in FLOATING:
        close(got[k], want[k], k)


def test_mean_scale_and_apply_scale(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    steps = ("  tv: {op: extract, base: base, finetuned: [math, code, toxic]}\n"
             "  avg: {op: mean, inputs: tv}\n"
             "  big: {op: scale, input: avg, factor: 3.0}\n"
             "  model: {op: apply, base: base, delta: big, scale: 0.5}\n")
    cli.write("r.yaml", recipe(ms, steps, "  m: {from: model, path: ./out/m}\n"))
    cli.ok("run", "r.yaml")
    got = read_tensors(tmp_path / "out" / "m")
    want = hand_sum(ms, dict.fromkeys(TASKS, 1 / 3), scale=1.5)
    for k in FLOATING:
        close(got[k], want[k], k)


def test_negate_twice_is_the_identity(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    steps = ("  tv: {op: extract, base: base, finetuned: [math, code, toxic]}\n"
             "  n1: {op: negate, input: tv.math}\n"
             "  n2: {op: negate, input: n1}\n"
             "  nn: {op: negate, input: tv}\n"
             "  nnn: {op: negate, input: nn}\n"
             "  model: {op: apply, base: base, delta: n2}\n")
    outs = ("  twice: {from: n2, path: ./out/twice}\n"
            "  once: {from: n1, path: ./out/once}\n"
            "  set: {from: nnn, path: ./out/set}\n"
            "  model: {from: model, path: ./out/model}\n")
    cli.write("r.yaml", recipe(ms, steps, outs))
    cli.ok("run", "r.yaml")
    tau = ms.delta("math")
    twice = read_tensors(tmp_path / "out" / "twice")
    once = read_tensors(tmp_path / "out" / "once")
    model = read_tensors(tmp_path / "out" / "model")
    assert set(twice) == set(FLOATING)  # task vectors have no integer buffers
    for k in FLOATING:
        assert torch.equal(twice[k], tau[k])
        assert torch.equal(once[k], -tau[k])
        assert torch.equal(model[k], ms.weights["math"][k])
    for t in TASKS:
        got = read_tensors(tmp_path / "out" / "set" / f"{t}.safetensors")
        for k in FLOATING:
            assert torch.equal(got[k], ms.delta(t)[k])


def test_zero_weights_give_the_base(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    steps = ("  tv: {op: extract, base: base, finetuned: [math, code, toxic]}\n"
             "  merged: {op: sum, inputs: tv, weights: 0}\n"
             "  model: {op: apply, base: base, delta: merged}\n")
    cli.write("r.yaml", recipe(ms, steps, "  m: {from: model, path: ./out/m}\n"))
    cli.ok("run", "r.yaml")
    got = read_tensors(tmp_path / "out" / "m")
    assert set(got) == set(ms.weights["base"])
    for k, v in ms.weights["base"].items():
        assert got[k].dtype == v.dtype
        assert torch.equal(got[k], v), k


# ---- dtypes ---------------------------------------------------------------------------------


def test_bf16_inputs_keep_bf16_by_default_and_float32_on_request(make_models, cli, tmp_path):
    ms = make_models(TASKS, dtype=torch.bfloat16)
    steps = ("  tv: {op: extract, base: base, finetuned: [math, code, toxic]}\n"
             "  merged: {op: sum, inputs: tv, weights: {math: 0.5, code: 0.25, toxic: -0.3}}\n"
             "  model: {op: apply, base: base, delta: merged}\n")
    outs = ("  native: {from: model, path: ./out/native}\n"
            "  wide: {from: model, path: ./out/wide, dtype: float32}\n"
            "  vec: {from: merged, path: ./out/vec}\n")
    cli.write("r.yaml", recipe(ms, steps, outs))
    cli.ok("run", "r.yaml")
    want = hand_sum(ms, W)  # computed in float32 from the stored bf16 values
    native = read_tensors(tmp_path / "out" / "native")
    wide = read_tensors(tmp_path / "out" / "wide")
    vec = read_tensors(tmp_path / "out" / "vec")
    base = ms.f32("base")
    for k in FLOATING:
        assert native[k].dtype == torch.bfloat16
        assert wide[k].dtype == torch.float32
        assert vec[k].dtype == torch.float32  # task vectors default to the compute dtype
        close(wide[k], want[k], k)
        close(vec[k], want[k] - base[k], k)
        # Cast only when writing: the bf16 output is the float32 result rounded once.
        assert torch.equal(native[k], wide[k].to(torch.bfloat16)), k
    assert torch.equal(native[INT_BUFFER], ms.weights["base"][INT_BUFFER])
    assert torch.equal(wide[INT_BUFFER], ms.weights["base"][INT_BUFFER])


# ---- layout, sharding, provenance ---------------------------------------------------------


def test_sharded_output_layout_config_and_metadata(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    steps = ("  tv: {op: extract, base: base, finetuned: [math, code, toxic]}\n"
             "  merged: {op: sum, inputs: tv, weights: {math: 0.5, code: 0.25, toxic: -0.3}}\n"
             "  model: {op: apply, base: base, delta: merged}\n")
    outs = ("  sharded: {from: model, path: ./out/sharded, dtype: float32, shard_size: 300}\n"
            "  single: {from: model, path: ./out/single, dtype: float32}\n")
    path = cli.write("r.yaml", recipe(ms, steps, outs))
    cli.ok("run", "r.yaml")
    sharded, single = tmp_path / "out" / "sharded", tmp_path / "out" / "single"

    assert sorted(p.name for p in single.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "tokenizer_config.json",
        "tvrecipe.lock", "tvrecipe.yaml"]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"]) == set(ms.weights["base"])
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:
        with safe_open(str(sharded / shard), framework="pt") as h:
            names = set(h.keys())
            sizes = [h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in names]
        assert names == {k for k, f in index["weight_map"].items() if f == shard}
        assert sum(sizes) <= 300 or len(names) == 1, shard
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total

    want = hand_sum(ms, W)
    got, ref = read_tensors(sharded), read_tensors(single)
    assert set(got) == set(ms.weights["base"])
    for k in got:
        assert torch.equal(got[k], ref[k]), k
    for k in FLOATING:
        close(got[k], want[k], k)
    assert torch.equal(got[INT_BUFFER], ms.weights["base"][INT_BUFFER])

    for folder in (sharded, single):
        for name in ("config.json", "tokenizer_config.json"):
            assert (folder / name).read_bytes() == (ms.path("base") / name).read_bytes()
    digest = hashlib.sha256(json.dumps(yaml.safe_load(path.read_text()), sort_keys=True,
                                       ensure_ascii=False, separators=(",", ":"))
                            .encode()).hexdigest()
    for f in weight_files(sharded) + weight_files(single):
        meta = read_metadata(f)
        assert meta["format"] == "pt"
        assert meta["tvrecipe.recipe_content_sha256"] == digest
    assert not list(tmp_path.joinpath("out").glob(".*")), "staging folders left behind"


def test_vectors_output_reads_back_as_task_vector_model(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    steps = ("  tv: {op: extract, base: base, finetuned: [math, code, toxic]}\n"
             "  merged: {op: sum, inputs: tv, weights: {math: 0.5, code: 0.25, toxic: -0.3}}\n"
             "  model: {op: apply, base: base, delta: merged}\n")
    outs = ("  model: {from: model, path: ./out/model, dtype: float32}\n"
            "  vectors: {from: tv, path: ./out/tv}\n"
            "  vector: {from: merged, path: ./out/merged}\n")
    first = cli.write("first.yaml", recipe(ms, steps, outs))
    cli.ok("run", "first.yaml")

    lib = tmp_path / "out" / "tv"
    assert sorted(p.name for p in lib.iterdir()) == [
        "code.safetensors", "math.safetensors", "toxic.safetensors", "vectors.json"]
    index = json.loads((lib / "vectors.json").read_text())
    assert index["members"] == list(TASKS)
    digest = hashlib.sha256(json.dumps(yaml.safe_load(first.read_text()), sort_keys=True,
                                       ensure_ascii=False, separators=(",", ":"))
                            .encode()).hexdigest()
    for t in TASKS:
        got = read_tensors(lib / f"{t}.safetensors")
        assert set(got) == set(FLOATING)
        for k in FLOATING:
            assert torch.equal(got[k], ms.delta(t)[k]), (t, k)
        meta = read_metadata(lib / f"{t}.safetensors")
        assert meta["tvrecipe.recipe_content_sha256"] == digest

    cli.write("second.yaml", f"""\
        tvrecipe: 1
        models:
          base: {ms.rel('base')}
          lib: {{path: out/tv, kind: task_vector}}
          vec: {{path: out/merged, kind: task_vector}}
        steps:
          merged: {{op: sum, inputs: lib, weights: {{math: 0.5, code: 0.25, toxic: -0.3}}}}
          model: {{op: apply, base: base, delta: merged}}
          again: {{op: apply, base: base, delta: vec}}
          one: {{op: apply, base: base, delta: lib.code}}
        outputs:
          model: {{from: model, path: ./out2/model, dtype: float32}}
          again: {{from: again, path: ./out2/again, dtype: float32}}
          one: {{from: one, path: ./out2/one, dtype: float32}}
        """)
    cli.ok("run", "second.yaml")
    ref = read_tensors(tmp_path / "out" / "model")
    for out in ("model", "again"):
        got = read_tensors(tmp_path / "out2" / out)
        assert set(got) == set(ref)
        for k in ref:
            assert torch.equal(got[k], ref[k]), (out, k)
    one = read_tensors(tmp_path / "out2" / "one")
    for k in FLOATING:
        assert torch.equal(one[k], ms.weights["code"][k])
    assert (tmp_path / "out2" / "model" / "config.json").is_file()


@pytest.mark.parametrize(("index", "complaint"), [
    ("{not json", ("not valid JSON (Expecting property name enclosed in double quotes: line 1 "
                  "column 2 (char 1))")),
    ('{"members": [], "files": {}}', ("'members' is not a list of distinct member names "
                                     "(got [])")),
    ('{"members": "math"}', "'members' is not a list of distinct member names (got 'math')"),
    ('{"members": ["math", "math"]}', ("'members' is not a list of distinct member names "
                                      "(got ['math', 'math'])")),
])
@pytest.mark.parametrize("command", ["validate", "run", "inspect"])
def test_a_broken_vectors_index_is_an_input_error(make_models, cli, tmp_path, index,
                                                  complaint, command):
    # Read as "no members" before: validate passed, run blamed "several .safetensors files",
    # inspect failed with an internal error, and "math" was read as the members m, a, t, h.
    ms = make_models(("math", "code"))
    cli.write("first.yaml", recipe(ms, "  tv: {op: extract, base: base, finetuned: [math, code]}\n",
                                   "  v: {from: tv, path: ./lib}\n"))
    cli.ok("run", "first.yaml")
    (tmp_path / "lib" / "vectors.json").write_text(index)
    cli.write("r.yaml", f"""\
        tvrecipe: 1
        models:
          base: {ms.rel('base')}
          lib: {{path: lib, kind: task_vector}}
        steps:
          s: {{op: sum, inputs: lib}}
        outputs:
          o: {{from: s, path: ./out/o}}
        """)
    res = cli.fails(3, *([command, "r.yaml"] + (["lib"] if command == "inspect" else [])))
    assert res.err_lines[1] == (
        f"model 'lib' (lib): {tmp_path / 'lib' / 'vectors.json'}: {complaint}; it is the index "
        "tvrecipe writes beside a vectors output, {\"members\": [\"math\", \"code\"], ...}: "
        "write the folder again with tvrecipe run")
    assert not (tmp_path / "out").exists()


def test_extract_with_a_mapping_names_the_members(make_models, cli, tmp_path):
    ms = make_models(("math", "code"))
    steps = "  tv: {op: extract, base: base, finetuned: {m: math, c: code}}\n"
    cli.write("r.yaml", recipe(ms, steps, "  v: {from: tv, path: ./out/v}\n"))
    cli.ok("run", "r.yaml")
    index = json.loads((tmp_path / "out" / "v" / "vectors.json").read_text())
    assert index["members"] == ["m", "c"]
    got = read_tensors(tmp_path / "out" / "v" / "c.safetensors")
    for k in FLOATING:
        assert torch.equal(got[k], ms.delta("code")[k])


# ---- streaming and determinism ------------------------------------------------------------

STREAM_STEPS = ("  tv: {op: extract, base: base, finetuned: [math, code, toxic]}\n"
                "  detox: {op: negate, input: tv.toxic}\n"
                "  merged: {op: sum, inputs: [tv.math, tv.code, detox], weights: [0.5, 0.5, 0.3]}\n"
                "  model: {op: apply, base: base, delta: merged}\n")
STREAM_OUTS = ("  model: {from: model, path: ./out/model, shard_size: 400}\n"
               "  wide: {from: model, path: ./out/wide, dtype: float32}\n"
               "  vectors: {from: tv, path: ./out/tv}\n"
               "  merged: {from: merged, path: ./out/merged, dtype: bfloat16}\n")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_row_chunk_streaming_gives_identical_bytes(make_models, cli, tmp_path, monkeypatch,
                                                   dtype):
    ms = make_models(TASKS, dtype=dtype)
    cli.write("r.yaml", recipe(ms, STREAM_STEPS, STREAM_OUTS))
    cli.ok("run", "r.yaml")
    whole = snapshot(tmp_path / "out")
    # Every tensor but the smallest is now read, computed and written in row blocks.
    monkeypatch.setattr("tvrecipe.exec.runner.CHUNK_ELEMENTS", 7)
    row_reads = []
    real_get = Checkpoint.get

    def spy(self, name, rows=None, **kw):
        if rows is not None:
            row_reads.append((name, rows))
        return real_get(self, name, rows, **kw)

    monkeypatch.setattr(Checkpoint, "get", spy)
    cli.ok("run", "r.yaml", "--force", "--no-cache")
    assert {name for name, _ in row_reads} >= set(FLOATING), "the run did not stream in chunks"
    chunked = snapshot(tmp_path / "out")
    assert sorted(chunked) == sorted(whole)
    for name in whole:
        assert chunked[name] == whole[name], f"{name} differs when streamed in row chunks"
    want = hand_sum(ms, {"math": 0.5, "code": 0.5, "toxic": -0.3})
    got = read_tensors(tmp_path / "out" / "wide")
    for k in FLOATING:
        close(got[k], want[k], k)


def test_two_runs_give_byte_identical_files(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    cli.write("r.yaml", recipe(ms, STREAM_STEPS, STREAM_OUTS))
    cli.ok("run", "r.yaml")
    first = snapshot(tmp_path / "out")
    assert len(first) >= 8
    cli.ok("run", "r.yaml", "--force", "--no-cache")
    second = snapshot(tmp_path / "out")
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name] == second[name], f"{name} differs between two runs"
    # A third run served from the cache the first one filled writes the same bytes too.
    cli.ok("run", "r.yaml", "--force")
    assert snapshot(tmp_path / "out") == first


# ---- results written into inputs that nothing reads later ---------------------------------

def same_bytes_without_in_place(cli, tmp_path, monkeypatch) -> None:
    """Run r.yaml as it is, then with in-place results off: the outputs must be identical."""
    from tvrecipe.exec.evaluate import StepEvaluator
    cli.ok("run", "r.yaml", "--no-cache")
    in_place = snapshot(tmp_path / "out")
    monkeypatch.setattr(StepEvaluator, "_scratch", lambda *a: None)
    cli.ok("run", "r.yaml", "--no-cache", "--force")
    assert snapshot(tmp_path / "out") == in_place


SCRATCH_STEPS = ("  tv: {op: extract, base: base,\n"
                 "       finetuned: {math: math, code: code, toxic: toxic, again: math}}\n"
                 "  merged: {op: sum, inputs: tv,\n"
                 "           weights: {math: 0.5, code: 0.25, toxic: -0.3, again: 0.5}}\n"
                 "  twice: {op: sum, inputs: [tv.math, tv.math], weights: [1, 1]}\n"
                 "  model: {op: apply, base: base, delta: merged, scale: 0.75}\n"
                 "  other: {op: apply, base: base, delta: merged}\n")


@pytest.mark.parametrize("outs", [
    "  model: {from: model, path: ./out/model, dtype: float32}\n",
    ("  model: {from: model, path: ./out/model, dtype: float32}\n"
     "  other: {from: other, path: ./out/other, dtype: float32}\n"
     "  merged: {from: merged, path: ./out/merged, dtype: float32}\n"
     "  twice: {from: twice, path: ./out/twice, dtype: float32}\n"
     "  tv: {from: tv, path: ./out/tv, dtype: float32}\n"),
], ids=["only-final", "intermediates-too"])
def test_results_written_in_place_match_fresh_buffers(make_models, cli, tmp_path, monkeypatch,
                                                      outs):
    # A step writes its result into an input when nothing reads that input later (model reads
    # and values used once, by one step, that are no output or cache entry). Values that are
    # outputs, read twice (math is listed twice) or read by two steps must stay intact.
    from tvrecipe.exec.evaluate import StepEvaluator
    ms = make_models(TASKS)
    cli.write("r.yaml", recipe(ms, SCRATCH_STEPS, outs))
    real = StepEvaluator._scratch
    reused = []

    def spy(self, values, node, t, others):
        got = real(self, values, node, t, others)
        if got is not None:
            reused.append(node)
        return got

    monkeypatch.setattr(StepEvaluator, "_scratch", spy)
    same_bytes_without_in_place(cli, tmp_path, monkeypatch)
    weights = {"math": 1.0, "code": 0.25, "toxic": -0.3}  # math listed twice: 0.5 + 0.5
    got = read_tensors(tmp_path / "out" / "model")
    for k, want in hand_sum(ms, weights, scale=0.75).items():
        close(got[k], want, k)
    if "merged" in outs:
        base = ms.f32("base")
        merged = read_tensors(tmp_path / "out" / "merged")
        twice = read_tensors(tmp_path / "out" / "twice")
        other = read_tensors(tmp_path / "out" / "other")
        for k, want in hand_sum(ms, weights).items():
            close(merged[k], want - base[k], k)
            close(other[k], want, k)
            close(twice[k], 2 * (ms.f32("math")[k] - base[k]), k)
        assert set(reused) == {"code", "toxic"}  # math is read twice; the rest are outputs
    else:
        # Only tv -> merged -> model runs: each value is read once, by the next step.
        assert set(reused) == {"code", "toxic", "tv", "merged"}


def test_a_value_that_aliases_another_is_not_written_in_place(make_models, cli, tmp_path,
                                                             monkeypatch):
    # assign's value IS one basis vector (no copy). It is read once (by apply), but the basis
    # is also written out: applying in place into it would change the basis output.
    ms = make_models(TASKS)
    steps = ("  tv: {op: extract, base: base, finetuned: [math, code]}\n"
             "  basis: {op: cluster_basis, inputs: tv, k: 1}\n"
             "  novel: {op: extract, base: base, finetuned: toxic}\n"
             "  near: {op: assign, input: novel, basis: basis}\n"
             "  model: {op: apply, base: base, delta: near, scale: 0.5}\n")
    outs = ("  model: {from: model, path: ./out/model, dtype: float32}\n"
            "  basis: {from: basis, path: ./out/basis, dtype: float32}\n")
    cli.write("r.yaml", recipe(ms, steps, outs))
    same_bytes_without_in_place(cli, tmp_path, monkeypatch)
    base = ms.f32("base")
    b0 = read_tensors(tmp_path / "out" / "basis" / "b0.safetensors")
    got = read_tensors(tmp_path / "out" / "model")
    assert set(b0) == set(FLOATING)
    for k in FLOATING:
        assert b0[k].abs().max() > 0, k
        close(got[k], base[k] + 0.5 * b0[k], k)


def test_rows_per_block():
    from tvrecipe.plan.tensors import rows_per_block
    assert rows_per_block((32000, 1024), 1 << 20) == 1024
    assert rows_per_block((3, 1 << 21), 1 << 20) == 1  # a row larger than a block: one row
    assert rows_per_block((1 << 20,), 1 << 20) is None  # fits in one block
    assert rows_per_block((1, 1 << 22), 1 << 20) is None  # one row: whole
    assert rows_per_block((100, 10), 7) == 1
    assert rows_per_block((100, 3), 7) == 2
    assert rows_per_block((), 7) is None


def test_a_linear_checkpoint_copies_its_first_inputs_config_and_tokenizer(make_models, cli,
                                                                         tmp_path):
    """As mergekit's without a base model: the merged checkpoint loads with the usual
    libraries, from the first input's config and tokenizer."""
    ms = make_models(TASKS)
    (ms.path("code") / "tokenizer_config.json").write_text('{"model_max_length": 32}\n')
    steps = "  soup: {op: linear, inputs: [code, math], weights: [0.5, 0.5]}\n"
    outs = "  soup: {from: soup, path: ./out/soup, dtype: float32}\n"
    cli.write("r.yaml", recipe(ms, steps, outs))
    cli.ok("run", "r.yaml")
    soup = tmp_path / "out" / "soup"
    for name in ("config.json", "tokenizer_config.json"):
        assert (soup / name).read_bytes() == (ms.path("code") / name).read_bytes()
    got = read_tensors(soup)
    for k in FLOATING:
        close(got[k], (ms.weights["code"][k] + ms.weights["math"][k]) / 2, k)
