"""How two versions of an output file differ (tvrecipe.store.compare), as verify says it."""

import torch
from safetensors.torch import save_file

from tvrecipe.store.compare import describe_difference


def _pair(tmp_path, a: dict, b: dict, meta_a=None, meta_b=None):
    x, y = tmp_path / "got.safetensors", tmp_path / "locked" / "got.safetensors"
    y.parent.mkdir(exist_ok=True)
    save_file(a, x, metadata=meta_a)
    save_file(b, y, metadata=meta_b)
    return x, y


def test_the_tensor_most_off_relative_to_its_scale_is_named(tmp_path):
    big = torch.tensor([100.0, -200.0, 50.0])
    small = torch.tensor([[0.5, 0.25], [0.125, 1.0]])
    got = {"big": big + torch.tensor([0.0, 1.0, 0.0]),  # 1 off on a largest |w| of 200
           "small": small + torch.tensor([[0.0, 0.0], [0.5, 0.0]]),  # 0.5 on 1: the most
           "same": torch.arange(4)}
    x, y = _pair(tmp_path, got, {"big": big, "small": small, "same": torch.arange(4)})
    assert describe_difference(x, y) == ("2 of 3 tensors differ; the most, 'small': max |Δ| "
                                         "0.5 (its largest |w| 1) in 1 of 4 entries")


def test_nan_and_negative_zero_count_as_differences_of_bits(tmp_path):
    locked = torch.tensor([1.0, 0.0, float("nan")], dtype=torch.bfloat16)
    got = torch.tensor([1.0, -0.0, float("nan")], dtype=torch.bfloat16)
    x, y = _pair(tmp_path, {"t": got}, {"t": locked})
    assert describe_difference(x, y) == ("1 of 1 tensors differ; the most, 't': max |Δ| 0 "
                                         "(its largest |w| 1) in 1 of 3 entries")
    got = torch.tensor([1.0, 0.0, 2.0], dtype=torch.bfloat16)
    x, y = _pair(tmp_path, {"t": got}, {"t": locked})
    assert describe_difference(x, y) == ("1 of 1 tensors differ; the most, 't': max |Δ| inf "
                                         "(its largest |w| 1) in 1 of 3 entries")


def test_names_forms_and_metadata(tmp_path):
    t = torch.ones(2, 3)
    x, y = _pair(tmp_path, {k: t.clone() for k in "abcde"}, {"a": t, "z": t.clone()})
    assert describe_difference(x, y) == ("tensors only in the recomputed file: b, c, d and 1 "
                                         "more; only in the locked one: z")
    x, y = _pair(tmp_path, {"a": t.half()}, {"a": t.T.contiguous()})
    assert describe_difference(x, y) == ("1 of 1 tensors differ; the most, 'a': float16 [2, 3] "
                                         "against locked float32 [3, 2]")
    x, y = _pair(tmp_path, {"a": t}, {"a": t}, {"k": "1", "same": "x"}, {"k": "2", "same": "x"})
    assert describe_difference(x, y) == "every tensor is equal; the metadata differs (k)"


def test_text_files_say_their_first_changed_line(tmp_path):
    (tmp_path / "locked").mkdir()
    x, y = tmp_path / "config.json", tmp_path / "locked" / "config.json"
    x.write_text('{\n  "a": 1,\n  "b": 2\n}\n')
    y.write_text('{\n  "a": 1,\n  "b": 3\n}\n')
    assert describe_difference(x, y) == 'first at line 3: recomputed "\\"b\\": 2", locked "\\"b\\": 3"'
    y.write_text('{\n  "a": 1,\n  "b": 2\n}')
    assert describe_difference(x, y) == "only in line endings or a final newline"
    (x.with_suffix(".bin")).write_bytes(b"\x00")
    (y.with_suffix(".bin")).write_bytes(b"\x01")
    assert describe_difference(x.with_suffix(".bin"), y.with_suffix(".bin")) is None
    y.unlink()
    assert describe_difference(x, y) is None  # (unreadable: nothing said)


def test_an_infinite_entry_is_said_as_such(tmp_path):
    x, y = _pair(tmp_path, {"t": torch.tensor([float("inf"), 2.0])},
                 {"t": torch.tensor([1.0, 2.0])})
    assert describe_difference(x, y) == ("1 of 1 tensors differ; the most, 't': max |Δ| inf "
                                         "(its largest |w| 2) in 1 of 2 entries")
