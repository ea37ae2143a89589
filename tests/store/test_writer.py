"""Tests for the streaming safetensors writer, shard planning, the index and parse_size."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file

from tvrecipe.store.checkpoint import open_checkpoint, st_dtype
from tvrecipe.store.writer import (
    CheckpointWriter,
    SafetensorsStreamWriter,
    TensorSpec,
    encode_header,
    parse_size,
    plan_shards,
)


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(4, generator=g).to(torch.float16),
        "w.f32": torch.randn(2, 3, generator=g),
        "w.f64": torch.randn(2, generator=g, dtype=torch.float64),
        "ids": torch.tensor([-(2**40), 0, 7], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.25),
        "empty": torch.zeros(0, 3),
        "f8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
    }


def specs_of(ts: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(k, st_dtype(v.dtype), tuple(v.shape)) for k, v in ts.items()]


def write_file(path, ts, metadata=None):
    with SafetensorsStreamWriter(path, specs_of(ts), metadata) as w:
        for name, value in ts.items():
            w.write(name, value)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert torch.equal(
            got[name].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)
        )


def test_round_trip_every_dtype(tmp_path):
    path = tmp_path / "x.safetensors"
    ts = sample()
    write_file(path, ts, {"b": "2", "a": "1"})
    assert_same(load_file(path), ts)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"a": "1", "b": "2"}
        assert torch.equal(f.get_tensor("scalar"), torch.tensor(1.25))
    assert_same({n: open_checkpoint(path).get(n) for n in ts}, ts)


def test_non_contiguous_and_cast(tmp_path):
    path = tmp_path / "x.safetensors"
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    with SafetensorsStreamWriter(path, [TensorSpec("t", "BF16", (3, 2))]) as w:
        w.write("t", base.t())
    assert torch.equal(load_file(path)["t"], base.t().to(torch.bfloat16))


def test_header_layout_and_padding():
    raw = encode_header([TensorSpec("a", "F32", (2,)), TensorSpec("b", "I8", ())], {"z": "1"})
    (n,) = struct.unpack("<Q", raw[:8])
    assert n == len(raw) - 8 and n % 8 == 0
    text = raw[8:].decode()
    assert text.rstrip(" ") == (
        '{"__metadata__":{"z":"1"},"a":{"data_offsets":[0,8],"dtype":"F32","shape":[2]},'
        '"b":{"data_offsets":[8,9],"dtype":"I8","shape":[]}}'
    )
    assert b"__metadata__" not in encode_header([TensorSpec("a", "F32", (2,))], {})


def test_write_twice_is_byte_identical(tmp_path):
    meta1 = {"step": "k", "recipe": "h", "version": "1"}
    meta2 = {"version": "1", "recipe": "h", "step": "k"}
    write_file(tmp_path / "a.safetensors", sample(), meta1)
    write_file(tmp_path / "b.safetensors", sample(), meta2)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_wrong_order_shape_and_missing(tmp_path):
    specs = [TensorSpec("a", "F32", (2,)), TensorSpec("b", "F32", (1,))]
    path = tmp_path / "x.safetensors"
    w = SafetensorsStreamWriter(path, specs)
    with pytest.raises(ValueError, match=f"^{path}: expected tensor 'a' next, got 'b'$"):
        w.write("b", torch.zeros(1))
    with pytest.raises(
        ValueError, match=r"tensor 'a' has shape \(3,\), but the planned shape is \(2,\)"
    ):
        w.write("a", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match=f"^{path}: tensors never written: b$"):
        w.close()


def nb(n: int, name: str) -> TensorSpec:
    return TensorSpec(name, "U8", (n,))


def test_plan_shards_boundaries():
    a, b, c, d = nb(4, "a"), nb(6, "b"), nb(10, "c"), nb(1, "d")
    assert plan_shards([a, b, c, d], 10) == [[a, b], [c], [d]]  # exact fits
    assert plan_shards([a, c, d], 5) == [[a], [c], [d]]  # c alone exceeds the size
    assert plan_shards([c, d, a], 3) == [[c], [d], [a]]
    assert plan_shards([a, b, d], 100) == [[a, b, d]]
    assert plan_shards([], 10) == []
    with pytest.raises(ValueError, match="shard_size must be a positive number of bytes, got 0"):
        plan_shards([a], 0)


def test_checkpoint_writer_single_file(tmp_path):
    ts = sample()
    w = CheckpointWriter(tmp_path / "out", specs_of(ts), shard_size=10**9, metadata={"k": "v"})
    for name, value in ts.items():
        w.write(name, value)
    assert w.close() == [tmp_path / "out" / "model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    assert_same(load_file(tmp_path / "out" / "model.safetensors"), ts)


def test_checkpoint_writer_shards_and_index(tmp_path):
    ts = {f"t{i}": torch.full((4,), float(i)) for i in range(5)}  # 16 bytes each
    out = tmp_path / "out"
    with CheckpointWriter(out, specs_of(ts), shard_size=32, metadata={"k": "v"}) as w:
        for name, value in ts.items():
            w.write(name, value)
    files = w.close()
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [f.name for f in files] == [*names, "model.safetensors.index.json"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index == {
        "metadata": {"total_size": 80},
        "weight_map": {
            "t0": names[0],
            "t1": names[0],
            "t2": names[1],
            "t3": names[1],
            "t4": names[2],
        },
    }
    assert list(load_file(out / names[2])) == ["t4"]
    with safe_open(out / names[1], framework="pt") as f:
        assert f.metadata() == {"k": "v"}
    ckpt = open_checkpoint(out)
    assert list(ckpt.tensors) == list(ts)
    assert_same({n: ckpt.get(n) for n in ts}, ts)


def test_checkpoint_writer_deterministic(tmp_path):
    ts = {f"t{i}": torch.full((4,), float(i)) for i in range(5)}
    for run in ("a", "b"):
        with CheckpointWriter(tmp_path / run, specs_of(ts), shard_size=40, prefix="delta") as w:
            for name, value in ts.items():
                w.write(name, value)
    a, b = sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir())
    assert [p.name for p in a] == [p.name for p in b]
    assert "delta.safetensors.index.json" in [p.name for p in a]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))


def test_checkpoint_writer_empty_model(tmp_path):
    w = CheckpointWriter(tmp_path, [], shard_size=10)
    assert w.close() == [tmp_path / "model.safetensors"]
    assert load_file(tmp_path / "model.safetensors") == {}


def test_checkpoint_writer_extra_tensor(tmp_path):
    w = CheckpointWriter(tmp_path, [nb(1, "a")], shard_size=10)
    w.write("a", torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(ValueError, match=f"^{tmp_path}: tensor 'b' written after the last one$"):
        w.write("b", torch.zeros(1))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2GB", 2_000_000_000),
        ("500MB", 500_000_000),
        ("1.5GiB", 1_610_612_736),
        ("4096", 4096),
        (4096, 4096),
        ("10 kib", 10240),
        ("3B", 3),
        (" 1TB ", 10**12),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GB", "2XB", "-1", "1e9", "two", True, 0, "0.1B"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def _sha(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


def test_file_digest_equals_hash_of_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    ts = sample()
    w = SafetensorsStreamWriter(path, specs_of(ts), {"k": "v"})
    for name, value in ts.items():
        assert w.sha256 is None  # not before the file is complete
        w.write(name, value)
    w.close()
    assert w.sha256 == _sha(path.read_bytes())
    assert w.tensor_digests == {}


def test_tensor_digests_cover_row_blocks(tmp_path):
    path = tmp_path / "x.safetensors"
    big = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    ts = {"big": big, "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    with SafetensorsStreamWriter(path, specs_of(ts), digest="tensors") as w:
        w.write("big", big[:4])  # written in two row blocks
        w.write("big", big[4:])
        w.write("scalar", ts["scalar"])
        w.write("empty", ts["empty"])
    assert w.sha256 is None
    # XXH3-64 of each tensor's bytes, whole, though "big" came in two blocks
    assert w.tensor_digests == {n: xxhash.xxh3_64_hexdigest(t.numpy().tobytes())
                                for n, t in ts.items()}
    assert w.tensor_digests["empty"] == "2d06800538d394c2"  # XXH3-64 of no bytes
    with pytest.raises(ValueError, match="digest must be 'file' or 'tensors', not 'crc'"):
        SafetensorsStreamWriter(tmp_path / "y.safetensors", [], digest="crc")


def test_checkpoint_writer_digests_every_file(tmp_path):
    ts = {f"t{i}": torch.full((4,), float(i)) for i in range(5)}
    with CheckpointWriter(tmp_path / "out", specs_of(ts), shard_size=32) as w:
        for name, value in ts.items():
            w.write(name, value)
    files = w.close()
    assert len(files) == 4 and w.sha256 == {f: _sha(f.read_bytes()) for f in files}


@pytest.mark.parametrize("durable", [True, False])
def test_durable_files_are_written_back_as_they_grow(tmp_path, monkeypatch, durable):
    from tvrecipe.store import writer
    calls, synced = [], []
    monkeypatch.setattr(writer, "_WRITEBACK_EVERY", 100)
    monkeypatch.setattr(writer, "_sync_file_range",
                        lambda fd, off, n, flags: calls.append((off, n, flags)) or 0)
    real = writer.os.fsync
    monkeypatch.setattr(writer.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    ts = {f"t{i}": torch.arange(30, dtype=torch.float32) + i for i in range(5)}  # 120 B each
    path = tmp_path / "x.safetensors"
    with SafetensorsStreamWriter(path, specs_of(ts), durable=durable) as w:
        for name, value in ts.items():
            w.write(name, value)
    back = load_file(str(path))
    assert all(torch.equal(back[k], v) for k, v in ts.items())
    if not durable:
        assert calls == [] and synced == []
        return
    assert len(synced) == 1
    # Every tensor passed the threshold: each call asks for what was written since the last.
    assert [flags for *_r, flags in calls] == [writer._SYNC_FILE_RANGE_WRITE] * 5
    ends = [off + n for off, n, _f in calls]
    assert [off for off, _n, _f in calls] == [0, *ends[:-1]]
    assert ends[-1] == path.stat().st_size


def test_sync_file_range_is_found_on_linux():
    import sys

    from tvrecipe.store import writer
    if sys.platform.startswith("linux"):
        assert callable(writer._sync_file_range)
    else:
        assert writer._sync_file_range is None
