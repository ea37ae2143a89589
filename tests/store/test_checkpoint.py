"""Tests for the checkpoint reader: folder layouts, header validation, tensor reads."""

from __future__ import annotations

import json
import re
import struct
import threading

import pytest
import torch
from safetensors.torch import save_file

from tvrecipe.errors import InputError
from tvrecipe.store.checkpoint import (
    TensorInfo,
    open_checkpoint,
    read_header,
    st_dtype,
    torch_dtype,
)


def exact(message: str) -> str:
    """A ``match`` pattern for exactly ``message``."""
    return "^" + re.escape(message) + "$"


def tensors() -> dict[str, torch.Tensor]:
    return {
        "embed.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "layer.0.weight": torch.tensor([[1.5, -2.0], [0.25, 8.0]], dtype=torch.bfloat16),
        "layer.0.bias": torch.tensor([1, 2, 3], dtype=torch.int64),
    }


def write_sharded(folder, index_name="model.safetensors.index.json"):
    ts = tensors()
    folder.mkdir(exist_ok=True)
    save_file({"embed.weight": ts["embed.weight"]}, folder / "model-00001-of-00002.safetensors")
    rest = {k: ts[k] for k in ("layer.0.weight", "layer.0.bias")}
    save_file(rest, folder / "model-00002-of-00002.safetensors")
    weight_map = {
        "embed.weight": "model-00001-of-00002.safetensors",
        "layer.0.weight": "model-00002-of-00002.safetensors",
        "layer.0.bias": "model-00002-of-00002.safetensors",
    }
    index = {"metadata": {"total_size": 70}, "weight_map": weight_map}
    (folder / index_name).write_text(json.dumps(index))
    return folder / index_name


def test_single_file_reads_exact_values_and_metadata(tmp_path):
    file = tmp_path / "weights.safetensors"
    save_file(tensors(), file, metadata={"format": "pt", "note": "x"})
    with open_checkpoint(file) as ckpt:
        assert ckpt.path == file
        assert ckpt.files == [file]
        assert ckpt.metadata == {"format": "pt", "note": "x"}
        for name, value in tensors().items():
            got = ckpt.get(name)
            assert got.dtype == value.dtype and torch.equal(got, value)
        info = ckpt.tensors["layer.0.weight"]
        assert info.dtype == "BF16" and info.shape == (2, 2) and info.nbytes == 8
        assert info.file == file and info.is_floating
        assert not ckpt.tensors["layer.0.bias"].is_floating


def test_tensors_in_data_offset_order(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file(tensors(), file)
    ckpt = open_checkpoint(file)
    offsets = [t.offset for t in ckpt.tensors.values()]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert sum(t.nbytes for t in ckpt.tensors.values()) == 48 + 8 + 24


def test_folder_with_model_safetensors(tmp_path):
    save_file(tensors(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.path == tmp_path and ckpt.files == [tmp_path / "model.safetensors"]
    assert set(ckpt.tensors) == set(tensors())


def test_folder_with_one_other_safetensors_file(tmp_path):
    save_file(tensors(), tmp_path / "adapter.safetensors")
    assert open_checkpoint(tmp_path).files == [tmp_path / "adapter.safetensors"]


def test_sharded_folder_in_shard_order(tmp_path):
    write_sharded(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    assert [f.name for f in ckpt.files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert next(iter(ckpt.tensors)) == "embed.weight"
    assert ckpt.tensors["layer.0.bias"].file == tmp_path / "model-00002-of-00002.safetensors"
    assert torch.equal(ckpt.get("layer.0.bias"), tensors()["layer.0.bias"])
    ckpt.close()


@pytest.mark.parametrize("use_file", [False, True])
def test_other_index_name(tmp_path, use_file):
    index = write_sharded(tmp_path, "pytorch_model.safetensors.index.json")
    ckpt = open_checkpoint(index if use_file else tmp_path)
    assert len(ckpt.files) == 2 and len(ckpt.tensors) == 3


def test_get_from_two_threads(tmp_path):
    write_sharded(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    results = {}

    def read(name):
        results[name] = ckpt.get(name)

    threads = [threading.Thread(target=read, args=(n,)) for n in tensors()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(results[n], v) for n, v in tensors().items())


def test_get_unknown_name_suggests(tmp_path):
    save_file(tensors(), tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path)
    with pytest.raises(
        InputError,
        match=exact(f"{tmp_path}: no tensor named 'embed.weights'; did you mean 'embed.weight'?"),
    ):
        ckpt.get("embed.weights")


def test_missing_path(tmp_path):
    path = tmp_path / "nope"
    with pytest.raises(
        InputError, match=exact(f"{path}: no such file or folder; check the path to the checkpoint")
    ):
        open_checkpoint(path)


def test_pickle_only_folder_refused_with_conversion_snippet(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    (tmp_path / "config.json").write_text("{}")
    bin_path, out = tmp_path / "pytorch_model.bin", tmp_path / "model.safetensors"
    expected = (
        f"{tmp_path}: holds only pickled weights (pytorch_model.bin); tvrecipe never "
        "unpickles files, since unpickling can run arbitrary code. Convert them to "
        "safetensors, for example:\n"
        "    import torch, safetensors.torch\n"
        f"    sd = torch.load('{bin_path}', map_location='cpu', weights_only=True)\n"
        "    safetensors.torch.save_file({k: v.contiguous().clone() for k, v in sd.items()}, "
        f"'{out}')"
    )
    with pytest.raises(InputError) as info:
        open_checkpoint(tmp_path)
    assert str(info.value) == expected


def test_pickle_file_refused(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"x")
    with pytest.raises(InputError, match=r"weights\.pt\); tvrecipe never unpickles"):
        open_checkpoint(path)


def test_folder_without_weights_lists_contents(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    msg = (
        f"{tmp_path}: no weights found (it holds config.json, sub/); expected model.safetensors, "
        "model.safetensors.index.json or one *.safetensors file"
    )
    with pytest.raises(InputError, match=exact(msg)):
        open_checkpoint(tmp_path)


def test_several_safetensors_without_index(tmp_path):
    save_file(tensors(), tmp_path / "a.safetensors")
    save_file(tensors(), tmp_path / "b.safetensors")
    msg = (
        f"{tmp_path}: several .safetensors files (a.safetensors, b.safetensors) and no "
        "model.safetensors or model.safetensors.index.json; name the one to use"
    )
    with pytest.raises(InputError, match=exact(msg)):
        open_checkpoint(tmp_path)


def test_missing_shard_names_index_and_shard(tmp_path):
    index = write_sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    shard = tmp_path / "model-00002-of-00002.safetensors"
    msg = (
        f"{index}: names shard 'model-00002-of-00002.safetensors', but {shard} does not exist; "
        "download the missing shard or regenerate the index"
    )
    with pytest.raises(InputError, match=exact(msg)):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("shard", ["/etc/passwd", "../other/model.safetensors", "sub/x.safetensors",
                                   ".."])
def test_an_index_naming_a_shard_outside_its_folder_is_refused(tmp_path, shard):
    index = write_sharded(tmp_path)
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = shard
    index.write_text(json.dumps(data))
    msg = (f"{index}: names shard {shard!r}, which is not a file name beside the index; a "
           "sharded checkpoint's shards lie in its folder: regenerate the index")
    with pytest.raises(InputError, match=exact(msg)):
        open_checkpoint(tmp_path)


def test_an_index_may_name_a_shard_with_dot_slash(tmp_path):
    index = write_sharded(tmp_path)
    data = json.loads(index.read_text())
    data["weight_map"] = {k: "./" + v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    with open_checkpoint(tmp_path) as ck:
        assert sorted(ck.tensors) == sorted(data["weight_map"])


def test_index_entry_not_in_its_shard(tmp_path):
    index = write_sharded(tmp_path)
    data = json.loads(index.read_text())
    data["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    msg = (
        f"{index}: maps tensor 'ghost' to 'model-00001-of-00002.safetensors', but that file does "
        "not hold it; the index does not match the shards: re-download them or regenerate the index"
    )
    with pytest.raises(InputError, match=exact(msg)):
        open_checkpoint(tmp_path)


def test_index_without_weight_map(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata": {}}')
    msg = f'{index}: no "weight_map" of tensor names to shard files; re-download or re-export it'
    with pytest.raises(InputError, match=exact(msg)):
        open_checkpoint(tmp_path)


def test_same_tensor_in_two_shards(tmp_path):
    write_sharded(tmp_path)
    first = tmp_path / "model-00001-of-00002.safetensors"
    second = tmp_path / "model-00002-of-00002.safetensors"
    save_file({"embed.weight": torch.zeros(1), "layer.0.bias": torch.zeros(1)}, first)
    msg = (
        f"{tmp_path}: tensor 'layer.0.bias' is in both {first} and {second}; "
        "a checkpoint holds each tensor once: remove the duplicate shard"
    )
    with pytest.raises(InputError, match=exact(msg)):
        open_checkpoint(tmp_path)


def raw_file(path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_file_shorter_than_8_bytes(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"abc")
    msg = (
        f"{path}: corrupt safetensors file: it is 3 bytes long, shorter than the 8-byte header "
        "length; re-download or re-export it"
    )
    with pytest.raises(InputError, match=exact(msg)):
        open_checkpoint(path)


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    msg = (
        f"{path}: corrupt safetensors file: header length 1000 exceeds the 2 bytes after it "
        "(truncated?); re-download or re-export it"
    )
    with pytest.raises(InputError, match=exact(msg)):
        open_checkpoint(path)


def test_invalid_json_header(tmp_path):
    path = tmp_path / "model.safetensors"
    raw_file(path, b"{not json")
    with pytest.raises(InputError, match=r"corrupt safetensors file: header is not valid JSON \("):
        open_checkpoint(path)


def test_unknown_dtype(tmp_path):
    path = tmp_path / "model.safetensors"
    raw_file(path, b'{"w":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}', b"\0")
    with pytest.raises(
        InputError,
        match=re.escape(f"{path}: tensor 'w' has unknown dtype 'Q7'; tvrecipe reads BF16, BOOL"),
    ):
        open_checkpoint(path)


def test_wrong_byte_count(tmp_path):
    path = tmp_path / "model.safetensors"
    raw_file(path, b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', b"\0" * 4)
    msg = (
        f"{path}: corrupt safetensors file: tensor 'w' of shape [2] and dtype F32 needs 8 bytes "
        "but its data_offsets span 4; re-download or re-export it"
    )
    with pytest.raises(InputError, match=exact(msg)):
        open_checkpoint(path)


def test_truncated_file_detected_at_open(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(tensors(), path)
    path.write_bytes(path.read_bytes()[:-3])
    msg = (
        f"{path}: corrupt safetensors file: tensor 'layer.0.weight' ends at byte 80 of the data "
        "but the file holds only 77 bytes of data (truncated file); re-download or re-export it"
    )
    with pytest.raises(InputError, match=exact(msg)):
        open_checkpoint(tmp_path)


def test_trailing_bytes_detected(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(tensors(), path)
    path.write_bytes(path.read_bytes() + b"xx")
    with pytest.raises(InputError, match="2 unexpected bytes after the last tensor"):
        read_header(path)


def test_read_header_returns_infos(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"s": torch.tensor(2.0, dtype=torch.float64)}, path)
    infos, meta = read_header(path)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert infos == {"s": TensorInfo("s", "F64", (), path, 0, 8, 8 + header_len)} and meta == {}


def test_dtype_maps_round_trip():
    for name in ("F32", "BF16", "F16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3"):
        assert st_dtype(torch_dtype(name)) == name
    assert torch_dtype("BF16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown safetensors dtype 'X'"):
        torch_dtype("X")
