"""Models at URLs: fsspec's ``memory://`` (and ``file://`` of ``tmp_path``) stand in for
object stores and the Hub. A recipe reading URLs writes the bytes the same recipe writes
from local copies; headers and tensors are read by byte range; the lock records the URL and
the content hash, and a changed remote file is caught; missing files, unknown schemes,
uninstalled filesystems and network failures are clear errors with no traceback."""

from __future__ import annotations

import hashlib
import importlib
import json
import threading
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from tests.conftest import read_tensors, snapshot
from tvrecipe.store import remote
from tvrecipe.store.checkpoint import RemoteCheckpoint, open_checkpoint
from tvrecipe.store.hashing import HashMemo, checkpoint_digest, sha256_file
from tvrecipe.store.remote import RemotePath

fsspec = pytest.importorskip("fsspec", reason="remote models need fsspec (the remote extra)")
from fsspec.implementations.memory import MemoryFileSystem

TASKS = ("math", "code")
STEPS = """\
steps:
  tv:     {op: extract, base: base, finetuned: [math, code]}
  trim:   {op: ties, inputs: tv, density: 0.5}
  merged: {op: sum, inputs: tv, weights: {math: 0.5, code: -0.25}}
  both:   {op: sum, inputs: [merged, trim]}
  model:  {op: apply, base: base, delta: both, scale: 0.8}
"""


@pytest.fixture
def mem():
    """A fresh folder of the in-memory filesystem: ``(fs, "memory://<root>")``, removed after."""
    fs = fsspec.filesystem("memory")
    root = f"tvr-{uuid.uuid4().hex[:8]}"
    yield fs, f"memory://{root}"
    if fs.exists(f"/{root}"):
        fs.rm(f"/{root}", recursive=True)


def upload(fs, folder: Path, url: str) -> None:
    """Copy every file under a local folder to ``url`` (memory://...)."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            fs.pipe(f"{url}/{p.relative_to(folder).as_posix()}", p.read_bytes())


def models_yaml(paths: dict[str, str]) -> str:
    return "models:\n" + "".join(f"  {n}: {p}\n" for n, p in paths.items())


def recipe(paths: dict[str, str], out: str, steps: str = STEPS, extra: str = "") -> str:
    return ("tvrecipe: 1\n" + models_yaml(paths) + steps + "outputs:\n"
            f"  model: {{from: model, path: {out}{extra}}}\n")


def weights_and_config(folder: Path) -> dict[str, object]:
    """The files of an output that do not name the inputs (the card, recipe and lock do),
    each weight file as its tensor entries and data bytes (its metadata names the recipe)."""
    out: dict[str, object] = {}
    for name, data in snapshot(folder).items():
        if name in ("README.md", "tvrecipe.yaml", "tvrecipe.lock"):
            continue
        if name.endswith(".safetensors"):
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + n])
            header.pop("__metadata__", None)
            out[name] = (header, data[8 + n:])
        else:
            out[name] = data
    return out


@pytest.fixture
def remote_models(make_models, mem):
    """A base and two fine-tunes, locally under ckpt/ and uploaded to memory://."""
    fs, url = mem
    ms = make_models(TASKS)
    for name in ("base", *TASKS):
        upload(fs, ms.path(name), f"{url}/ckpt/{name}")
    return ms, fs, url


# ---- same bytes as local ------------------------------------------------------------------


def test_recipe_on_memory_urls_writes_the_bytes_of_the_local_recipe(remote_models, cli,
                                                                     tmp_path):
    ms, _fs, url = remote_models
    names = ("base", *TASKS)
    cli.write("local.yaml", recipe({n: ms.rel(n) for n in names}, "./out/local"))
    cli.write("remote.yaml", recipe({n: f"{url}/ckpt/{n}" for n in names}, "./out/remote"))
    cli.ok("run", "local.yaml", "-q")
    cli.ok("run", "remote.yaml", "-q")
    local, got = tmp_path / "out" / "local", tmp_path / "out" / "remote"
    # Weights, and the config and tokenizer files copied from the base (fetched by URL).
    assert weights_and_config(got) == weights_and_config(local)
    assert {"config.json", "tokenizer_config.json", "model.safetensors"} <= set(snapshot(got))
    # The released recipe keeps the URLs as they are (no relative path is made of them).
    pinned = (got / "tvrecipe.yaml").read_text()
    assert f"path: '{url}/ckpt/base'" in pinned or f"path: {url}/ckpt/base" in pinned


def test_file_urls_write_the_bytes_of_local_paths(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    names = ("base", *TASKS)
    cli.write("local.yaml", recipe({n: ms.rel(n) for n in names}, "./out/local"))
    cli.write("urls.yaml", recipe({n: ms.path(n).as_uri() for n in names}, "./out/urls"))
    cli.ok("run", "local.yaml", "-q")
    cli.ok("run", "urls.yaml", "-q")
    assert (weights_and_config(tmp_path / "out" / "urls")
            == weights_and_config(tmp_path / "out" / "local"))
    lock = (tmp_path / "urls.yaml.lock").read_text()
    assert f"path: {ms.path('math').as_uri()}" in lock


def test_an_output_may_not_be_inside_an_input_named_by_a_file_url(make_models, cli, tmp_path):
    ms = make_models(TASKS)
    inside = ms.path("base") / "merged"
    cli.write("r.yaml", recipe({"base": ms.path("base").as_uri(), "math": ms.rel("math"),
                                "code": ms.rel("code")}, str(inside)))
    for command in ("validate", "run"):  # (a recipe error: the URL's local path is checked)
        res = cli.fails(2, command, "r.yaml")
        assert "is inside the input 'base'" in res.stderr


def test_sharded_checkpoint_through_its_index_url(mem, tmp_path):
    fs, url = mem
    g = torch.Generator().manual_seed(1)
    shards = {"model-00001-of-00002.safetensors": {"a": torch.randn(5, 3, generator=g)},
              "model-00002-of-00002.safetensors": {"b": torch.randn(4, generator=g),
                                                   "c": torch.randn(2, 2, generator=g)}}
    local = tmp_path / "sharded"
    local.mkdir()
    weight_map = {}
    for file, tensors in shards.items():
        save_file(tensors, str(local / file))
        weight_map.update(dict.fromkeys(tensors, file))
    (local / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    upload(fs, local, f"{url}/sharded")
    for where in (f"{url}/sharded", f"{url}/sharded/model.safetensors.index.json"):
        with open_checkpoint(where) as ck, open_checkpoint(local) as want:
            assert isinstance(ck, RemoteCheckpoint)
            assert [f.name for f in ck.files] == [f.name for f in want.files]
            assert list(ck.tensors) == list(want.tensors)
            for name in want.tensors:
                assert torch.equal(ck.get(name), want.get(name))
        assert (checkpoint_digest(open_checkpoint(where).files)
                == checkpoint_digest(open_checkpoint(local).files))


def test_folder_rules_are_the_local_ones(mem, tmp_path):
    """One .safetensors file in a folder, a file URL, and a folder of several files."""
    fs, url = mem
    data = save({"w": torch.ones(2, 2)})
    fs.pipe(f"{url}/single/weights.safetensors", data)
    fs.pipe(f"{url}/single/notes.txt", b"hi")
    fs.pipe(f"{url}/two/a.safetensors", data)
    fs.pipe(f"{url}/two/b.safetensors", data)
    assert [f.name for f in open_checkpoint(f"{url}/single").files] == ["weights.safetensors"]
    assert list(open_checkpoint(f"{url}/single/weights.safetensors").tensors) == ["w"]
    with pytest.raises(Exception, match=r"several \.safetensors files \(a\.safetensors, "
                                        r"b\.safetensors\) and no model\.safetensors"):
        open_checkpoint(f"{url}/two")


# ---- ranged reads -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_blocks_of_remote_tensors_equal_local_ones(mem, tmp_path, monkeypatch, dtype):
    fs, url = mem
    g = torch.Generator().manual_seed(2)
    tensors = {"emb": torch.randn(700, 96, generator=g).to(dtype),
               "norm": torch.randn(96, generator=g).to(dtype),
               "ids": torch.arange(12, dtype=torch.int64).reshape(3, 4)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    fs.pipe(f"{url}/m.safetensors", (tmp_path / "m.safetensors").read_bytes())
    monkeypatch.setattr(remote, "CHUNK", 1000)  # many chunks, fetched a batch at a time
    with open_checkpoint(tmp_path / "m.safetensors") as want, \
            open_checkpoint(f"{url}/m.safetensors") as got:
        assert got.tensors.keys() == want.tensors.keys()
        for name, t in tensors.items():
            assert torch.equal(got.get(name), t)
            assert (got.get_bits(name) == want.get_bits(name)).all()
        for rows in ((0, 1), (5, 137), (137, 600), (699, 700), (0, 700)):
            assert torch.equal(got.get("emb", rows), want.get("emb", rows)), rows
            assert (got.get_bits("emb", rows) == want.get_bits("emb", rows)).all(), rows


class Fetched:
    """Counts the bytes the in-memory filesystem hands out (every read goes through
    ``cat_file``, whole-file and ranged alike)."""

    def __init__(self, monkeypatch):
        self.bytes = 0
        original = MemoryFileSystem.cat_file

        def cat_file(fs, path, start=None, end=None, **kw):
            data = original(fs, path, start=start, end=end, **kw)
            self.bytes += len(data)
            return data

        monkeypatch.setattr(MemoryFileSystem, "cat_file", cat_file)


def test_headers_are_read_by_byte_range(make_models, mem, cli, monkeypatch):
    """validate (with a rule, so that it reads the headers) and a second plan (hashes
    memoised) fetch a few KB of 3 × 4 MB checkpoints; the first plan hashes every byte."""
    fs, url = mem
    g = torch.Generator().manual_seed(3)
    base = {"model.embed_tokens.weight": torch.randn(1024, 1024, generator=g),
            "model.norm.weight": torch.ones(1024)}
    total = 0
    for name, scale in (("base", 0.0), ("math", 0.01), ("code", 0.02)):
        data = save({k: v + scale for k, v in base.items()})
        fs.pipe(f"{url}/{name}/model.safetensors", data)
        total += len(data)
    steps = STEPS.replace("density: 0.5", 'density: [{match: "*.embed_*", value: 0.3}, '
                                          '{value: 0.5}]')
    cli.write("r.yaml", recipe({n: f"{url}/{n}" for n in ("base", *TASKS)}, "./out", steps))
    fetched = Fetched(monkeypatch)
    cli.ok("validate", "r.yaml")
    assert 0 < fetched.bytes <= 3 * remote.HEAD_BYTES < total / 10
    fetched.bytes = 0
    cli.ok("plan", "r.yaml")  # hashes each input once: every byte, in large chunks
    assert total <= fetched.bytes < total + 3 * remote.HEAD_BYTES * 3
    fetched.bytes = 0
    cli.ok("plan", "r.yaml")  # the memo knows the hashes: headers only
    assert 0 < fetched.bytes <= 6 * remote.HEAD_BYTES < total / 10


def test_remote_hashes_match_local_and_are_memoised(mem, tmp_path, monkeypatch):
    fs, url = mem
    data = save({"w": torch.randn(300, 300)})
    (tmp_path / "m.safetensors").write_bytes(data)
    fs.pipe(f"{url}/m.safetensors", data)
    monkeypatch.setattr(remote, "CHUNK", 4096)
    path = RemotePath(f"{url}/m.safetensors")
    memo = HashMemo(tmp_path / "hashes.json")
    assert sha256_file(path, memo=memo) == hashlib.sha256(data).hexdigest()
    entry = json.loads((tmp_path / "hashes.json").read_text())["entries"][path.url]
    assert entry["id"][0] == len(data) and len(entry["id"]) > 1
    fetched = Fetched(monkeypatch)
    assert sha256_file(path, memo=HashMemo(tmp_path / "hashes.json")) == entry["sha256"]
    assert fetched.bytes == 0
    fs.pipe(f"{url}/m.safetensors", data[:-1] + bytes([data[-1] ^ 1]))  # same size
    assert sha256_file(path, memo=HashMemo(tmp_path / "hashes.json")) != entry["sha256"]
    assert fetched.bytes == len(data)


def test_a_stated_lfs_sha256_is_the_hash_without_a_download(mem, monkeypatch):
    # A Hugging Face LFS file names its object by the SHA-256 of its bytes: hashing takes
    # it from the listing, so a first run downloads the weights once (to read them), not
    # twice. A field that is no SHA-256 is not trusted: the file is streamed as usual.
    fs, url = mem
    data = save({"w": torch.randn(50, 50)})
    fs.pipe(f"{url}/m.safetensors", data)
    true = hashlib.sha256(data).hexdigest()
    stated = "ab" * 32  # differs from the bytes' hash: proves it is not recomputed
    path = RemotePath(f"{url}/m.safetensors", {"size": len(data), "type": "file",
                                               "lfs": {"sha256": stated, "size": len(data)}})
    fetched = Fetched(monkeypatch)
    assert sha256_file(path) == stated and fetched.bytes == 0
    for bad in ("AB" * 32, "ab" * 31, None, 7):
        path = RemotePath(f"{url}/m.safetensors", {"size": len(data), "type": "file",
                                                   "lfs": {"sha256": bad}})
        assert path.stated_sha256() is None
        assert sha256_file(path) == true


def test_identity_of_an_hf_url_at_a_commit_is_immutable():
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert "revision=commit" in remote.remote_identity(f"hf://org/m@{commit}/a.safetensors",
                                                       {"size": 3})
    assert remote.remote_identity("hf://org/m@main/a.safetensors", {"size": 3}) is None
    assert remote.remote_identity("s3://b/k", {"size": 3, "ETag": '"abc"'}) == [3, 'ETag="abc"']


# ---- the lock -----------------------------------------------------------------------------


def test_lock_records_the_url_and_the_content_hash(remote_models, cli, tmp_path):
    ms, _fs, url = remote_models
    import yaml
    cli.write("r.yaml", recipe({n: f"{url}/ckpt/{n}" for n in ("base", *TASKS)}, "./out"))
    cli.ok("run", "r.yaml", "-q")
    lock = yaml.safe_load((tmp_path / "r.yaml.lock").read_text())
    for name in ("base", *TASKS):
        local_hash = cli.ok("hash", str(ms.path(name))).stdout.strip()
        assert lock["inputs"][name] == {"path": f"{url}/ckpt/{name}", "sha256": local_hash}
        assert cli.ok("hash", f"{url}/ckpt/{name}").stdout.strip() == local_hash
    cli.ok("verify", "r.yaml")
    assert "up to date" in cli.ok("run", "r.yaml").stdout


def test_a_changed_remote_input_is_caught(remote_models, cli, tmp_path):
    _ms, fs, url = remote_models
    cli.write("r.yaml", recipe({n: f"{url}/ckpt/{n}" for n in ("base", *TASKS)}, "./out"))
    cli.ok("run", "r.yaml", "-q")
    target = f"{url}/ckpt/math/model.safetensors"
    data = bytearray(fs.cat_file(target))
    data[-1] ^= 1  # one bit of the last tensor: same size, new bytes
    fs.pipe(target, bytes(data))
    line = f"input 'math' ({url}/ckpt/math) changed: sha256 "
    res = cli.fails(6, "verify", "r.yaml")
    assert res.err_lines[:2] == ["tvrecipe: verify error:", "does not match the lock:"]
    assert res.err_lines[2].startswith(line)
    res = cli.fails(6, "run", "r.yaml", "--locked")
    assert res.err_lines[1] == "--locked, but the run would differ from the lock:"
    assert res.err_lines[2].startswith(line)


def test_a_sha256_pin_applies_to_a_url(remote_models, cli):
    ms, _fs, url = remote_models
    wrong = "0" * 64
    cli.write("r.yaml", recipe({"base": f"{url}/ckpt/base",
                                "math": f"{{path: {url}/ckpt/math, sha256: '{wrong}'}}",
                                "code": ms.rel("code")}, "./out"))
    res = cli.fails(3, "run", "r.yaml")
    assert f"model 'math' ({url}/ckpt/math): content hash " in res.stderr
    assert f"does not match the pinned sha256 {wrong}" in res.stderr


# ---- adapters and vector sets -------------------------------------------------------------


def _adapter(folder: Path, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    prefix = "base_model.model.model.layers.0."
    save_file({f"{prefix}self_attn.q_proj.lora_A.weight": torch.randn(2, 8, generator=g),
               f"{prefix}self_attn.q_proj.lora_B.weight": torch.randn(8, 2, generator=g),
               f"{prefix}mlp.up_proj.lora_A.weight": torch.randn(2, 8, generator=g),
               f"{prefix}mlp.up_proj.lora_B.weight": torch.randn(12, 2, generator=g)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "up_proj"]}))


def test_lora_adapters_and_vector_sets_from_urls(remote_models, cli, tmp_path):
    ms, fs, url = remote_models
    _adapter(tmp_path / "adapters" / "style")
    upload(fs, tmp_path / "adapters" / "style", f"{url}/adapters/style")
    # A vectors set written by a first run, then read back locally and by URL.
    cli.write("lib.yaml", "tvrecipe: 1\n" + models_yaml({n: ms.rel(n) for n in
                                                         ("base", *TASKS)})
              + "steps:\n  tv: {op: extract, base: base, finetuned: [math, code]}\n"
              + "outputs:\n  lib: {from: tv, path: ./lib}\n")
    cli.ok("run", "lib.yaml", "-q")
    upload(fs, tmp_path / "lib", f"{url}/lib")
    steps = ("steps:\n  merged: {op: sum, inputs: [lib, style], weights: [0.5, 1.0]}\n"
             "  model: {op: apply, base: base, delta: merged}\n")
    local = {"base": ms.rel("base"), "lib": "{path: ./lib, kind: task_vector}",
             "style": "{path: ./adapters/style, kind: lora}"}
    urls = {"base": f"{url}/ckpt/base", "lib": f"{{path: {url}/lib, kind: task_vector}}",
            "style": f"{{path: {url}/adapters/style, kind: lora}}"}
    cli.write("local.yaml", recipe(local, "./out/local", steps))
    cli.write("urls.yaml", recipe(urls, "./out/urls", steps))
    cli.ok("validate", "urls.yaml")
    cli.ok("run", "local.yaml", "-q")
    cli.ok("run", "urls.yaml", "-q")
    assert (weights_and_config(tmp_path / "out" / "urls")
            == weights_and_config(tmp_path / "out" / "local"))
    lock = (tmp_path / "urls.yaml.lock").read_text()
    assert f"path: {url}/adapters/style" in lock and f"path: {url}/lib" in lock


# ---- errors -------------------------------------------------------------------------------


def test_a_missing_remote_model_is_an_input_error(remote_models, cli):
    _ms, _fs, url = remote_models
    cli.write("r.yaml", recipe({"base": f"{url}/ckpt/base", "math": f"{url}/ckpt/nope",
                                "code": f"{url}/ckpt/code"}, "./out"))
    for command in ("plan", "run"):
        res = cli.fails(3, command, "r.yaml")
        assert res.err_lines == [
            "tvrecipe: input error:",
            (f"model 'math' ({url}/ckpt/nope): {url}/ckpt/nope: no such file or folder; "
            "check the path to the checkpoint")]


def test_a_missing_shard_at_a_url(mem, tmp_path):
    fs, url = mem
    fs.pipe(f"{url}/s/model-00001-of-00002.safetensors", save({"a": torch.ones(2)}))
    fs.pipe(f"{url}/s/model.safetensors.index.json", json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors"}}).encode())
    with pytest.raises(Exception) as info:
        open_checkpoint(f"{url}/s")
    assert str(info.value) == (
        f"{url}/s/model.safetensors.index.json: names shard 'model-00002-of-00002.safetensors', "
        f"but {url}/s/model-00002-of-00002.safetensors does not exist; download the missing "
        "shard or regenerate the index")


def test_an_unknown_url_scheme_is_a_located_recipe_error(cli):
    cli.write("r.yaml", """\
        tvrecipe: 1
        models:
          base: ./ckpt/base
          math: {path: "nosuchfs://bucket/math"}
        steps:
          model: {op: apply, base: base, delta: math}
        outputs:
          model: {from: model, path: ./out}
        """)
    res = cli.fails(2, "validate", "r.yaml")
    assert res.err_lines == [
        "tvrecipe: recipe error:",
        ("r.yaml:4:10: models.math.path: unknown URL scheme nosuchfs:// in "
        "'nosuchfs://bucket/math'; a model path is a local path or a URL that fsspec reads, "
        "such as s3://, gs://, hf://, https:// or file://")]


def test_a_remote_output_path_is_a_located_recipe_error(cli):
    cli.write("r.yaml", """\
        tvrecipe: 1
        models:
          base: ./ckpt/base
        outputs:
          model: {from: base, path: "s3://bucket/merged"}
        """)
    res = cli.fails(2, "validate", "r.yaml")
    assert res.err_lines == [
        "tvrecipe: recipe error:",
        ("r.yaml:5:23: outputs.model.path: 's3://bucket/merged' is a URL, but outputs are "
        "written to local folders only; write the output to a local folder, then upload it "
        "(for example `huggingface-cli upload ORG/NAME ./out/merged` or `aws s3 cp "
        "--recursive ./out/merged s3://…`)")]


@pytest.fixture
def fake_scheme():
    """A scheme fsspec knows whose package is not installed (as s3:// without s3fs)."""
    from fsspec.registry import known_implementations
    known_implementations["tvfake"] = {"class": "tvrecipe_fake_fs.FakeFileSystem",
                                       "err": "Install tvrecipe_fake_fs to access tvfake"}
    yield "tvfake"
    known_implementations.pop("tvfake", None)


def test_a_scheme_whose_package_is_missing_says_what_to_install(cli, fake_scheme):
    cli.write("r.yaml", recipe({"base": "tvfake://bucket/base", "math": "./ckpt/math",
                                "code": "./ckpt/code"}, "./out"))
    cli.ok("validate", "r.yaml")  # a known scheme: validate reads no checkpoint
    for command in ("plan", "run"):
        res = cli.fails(7, command, "r.yaml")
        assert res.err_lines == [
            "tvrecipe: missing package:",
            ("model 'base' (tvfake://bucket/base): tvfake://bucket/base: reading tvfake:// URLs "
            "needs tvrecipe-fake-fs, which is not installed: pip install 'tvrecipe-fake-fs'")]
    res = cli.fails(7, "hash", "tvfake://bucket/base")
    assert res.err_lines[1].startswith("tvfake://bucket/base: reading tvfake:// URLs needs ")


@pytest.mark.parametrize(("module", "url", "needs"), [
    ("s3fs", "s3://bucket/model", "s3fs"),
    ("aiohttp", "https://example.invalid/model.safetensors", "fsspec[http]"),
])
def test_a_scheme_without_its_package_names_it(cli, module, url, needs):
    try:
        importlib.import_module(module)
    except ImportError:
        pass
    else:
        pytest.skip(f"{module} is installed")
    scheme = url.split("://")[0]
    res = cli.fails(7, "hash", url)
    assert res.err_lines == [
        "tvrecipe: missing package:",
        (f"{url}: reading {scheme}:// URLs needs {needs}, which is not installed: "
         f"pip install '{needs}'")]


class FlakyFileSystem(MemoryFileSystem):
    """The in-memory files, behind a network that lists them but drops every read."""

    protocol = "tvflaky"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("tvflaky://", "memory://", 1))

    def cat_file(self, path, start=None, end=None, **kwargs):
        raise ConnectionResetError(104, "Connection reset by peer")


def test_a_network_failure_names_the_model_and_the_url(remote_models, cli):
    _ms, _fs, url = remote_models
    fsspec.register_implementation("tvflaky", FlakyFileSystem, clobber=True)
    flaky = url.replace("memory://", "tvflaky://")
    cli.write("r.yaml", recipe({"base": f"{url}/ckpt/base", "math": f"{flaky}/ckpt/math",
                                "code": f"{url}/ckpt/code"}, "./out"))
    res = cli.fails(3, "run", "r.yaml")
    assert res.err_lines == [
        "tvrecipe: input error:",
        (f"model 'math' ({flaky}/ckpt/math): cannot read {flaky}/ckpt/math/model.safetensors: "
        "ConnectionResetError: [Errno 104] Connection reset by peer; check the URL, your "
        "credentials and the network connection, then retry")]
    assert not (cli.root / "out").exists()


def test_a_read_that_fails_mid_run_names_the_model(remote_models, monkeypatch):
    """Headers read, then the storage goes away: the tensor read names model and URL."""
    from tvrecipe.plan.graph import load_and_compile
    from tvrecipe.plan.tensors import build_tensor_plan
    ms, _fs, url = remote_models
    path = ms.root / "r.yaml"
    path.write_text(recipe({n: f"{url}/ckpt/{n}" for n in ("base", *TASKS)}, "./out"))
    plan = build_tensor_plan(load_and_compile(path))
    monkeypatch.setattr(MemoryFileSystem, "cat_file", FlakyFileSystem.cat_file)
    with pytest.raises(Exception) as info:
        plan.models["code"].parts[""].get("lm_head.weight")
    assert str(info.value) == (
        f"model 'code' ({url}/ckpt/code): cannot read {url}/ckpt/code/model.safetensors: "
        "ConnectionResetError: [Errno 104] Connection reset by peer; check the URL, your "
        "credentials and the network connection, then retry")
    plan.close()


# ---- http(s) with ranged requests (needs fsspec's http implementation) --------------------


def _range_server(root: Path):
    """An HTTP server on 127.0.0.1 serving ``root`` with Range requests (the standard
    library's own handler ignores Range), counting the bytes it sends."""
    import http.server

    sent = {"bytes": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _file(self) -> Path | None:
            p = root / self.path.lstrip("/").split("?")[0]
            return p if p.is_file() else None

        def do_HEAD(self):
            p = self._file()
            if p is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(p.stat().st_size))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{p.stat().st_mtime_ns}-{p.stat().st_size}"')
            self.end_headers()

        def do_GET(self):
            p = self._file()
            if p is None:
                self.send_error(404)
                return
            data = p.read_bytes()
            header = self.headers.get("Range")
            if header:
                first, _, last = header.removeprefix("bytes=").partition("-")
                start = int(first)
                end = min(int(last) + 1, len(data)) if last else len(data)
                body = data[start:end]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            else:
                body = data
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            self.wfile.write(body)
            sent["bytes"] += len(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, sent


def test_http_urls_are_read_by_range(tmp_path):
    pytest.importorskip("aiohttp", reason="fsspec's http:// needs aiohttp (fsspec[http])")
    g = torch.Generator().manual_seed(4)
    tensors = {"w": torch.randn(512, 256, generator=g), "b": torch.randn(256, generator=g)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    server, sent = _range_server(tmp_path)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/model.safetensors"
        ck = open_checkpoint(url)
        size = (tmp_path / "model.safetensors").stat().st_size
        assert 0 < sent["bytes"] <= remote.HEAD_BYTES < size
        before = sent["bytes"]
        assert torch.equal(ck.get("w", (100, 110)), tensors["w"][100:110])
        assert sent["bytes"] - before == 10 * 256 * 4
        assert torch.equal(ck.get("b"), tensors["b"])
        assert sha256_file(RemotePath(url)) == hashlib.sha256(
            (tmp_path / "model.safetensors").read_bytes()).hexdigest()
        with pytest.raises(Exception, match="no such file or folder"):
            open_checkpoint(url.replace("model.safetensors", "nope.safetensors"))
    finally:
        server.shutdown()


def test_local_paths_stay_local(tmp_path):
    """A plain path never goes through fsspec: the local reader, with its open handles."""
    save_file({"w": torch.ones(3)}, str(tmp_path / "m.safetensors"))
    ck = open_checkpoint(str(tmp_path / "m.safetensors"))
    assert type(ck).__name__ == "Checkpoint" and isinstance(ck.files[0], Path)
    assert torch.equal(read_tensors(tmp_path / "m.safetensors")["w"], ck.get("w"))
    assert not remote.is_url("C:/models/base") and remote.is_url("hf://org/m@main")


def test_hash_of_a_url_with_an_unknown_scheme(cli):
    res = cli.fails(3, "hash", "nosuchfs://bucket/model")
    assert res.err_lines == [
        "tvrecipe: input error:",
        ("nosuchfs://bucket/model: unknown URL scheme nosuchfs://; use a local path or a URL "
        "that fsspec reads (s3://, gs://, hf://, https://, file://)")]


def test_urls_without_fsspec_say_to_install_the_extra(cli, monkeypatch):
    import sys
    for name in [m for m in sys.modules if m == "fsspec" or m.startswith("fsspec.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fsspec raises ImportError
    cli.write("r.yaml", recipe({"base": "s3://bucket/base", "math": "./ckpt/math",
                                "code": "./ckpt/code"}, "./out"))
    cli.ok("validate", "r.yaml")  # the scheme cannot be checked without fsspec
    res = cli.fails(7, "plan", "r.yaml")
    assert res.err_lines == [
        "tvrecipe: missing package:",
        ("model 'base' (s3://bucket/base): s3://bucket/base: model paths that are URLs need "
        "fsspec, which is not installed: pip install 'tvrecipe[remote]'")]
