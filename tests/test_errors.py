"""Bad input: one clear line naming the file (and tensor), exit status 2, SRC untouched, no finished DST."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli, tree_digest
from shardconv.synth import write_checkpoint


@pytest.fixture()
def src(tmp_path):
    path = tmp_path / "src"
    write_checkpoint(path, family="llama", num_layers=2, shard_size=100_000)
    return path


def shards(src):
    return sorted(src.glob("model-*.safetensors"))


def check_fails(src, dst, *needles, args=()):
    before = tree_digest(src) if src.exists() else None
    rc, err = run_cli("convert", src, dst, "--no-progress", *args)
    assert rc == 2, err
    assert err.startswith("shardconv: error: ") and err.count("\n") == 1, err
    for n in needles:
        assert str(n) in err, (n, err)
    if before is not None:
        assert tree_digest(src) == before
    if dst.resolve() != src.resolve():
        assert not (dst / "model.safetensors.index.json").exists()
        assert not list(dst.glob("*.safetensors")) if dst.exists() else True
    return err


def test_missing_config(src, tmp_path):
    (src / "config.json").unlink()
    check_fails(src, tmp_path / "o", "config.json")


def test_config_not_json(src, tmp_path):
    (src / "config.json").write_text("{nope")
    check_fails(src, tmp_path / "o", "config.json", "JSON")


def test_no_safetensors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    check_fails(src, tmp_path / "o", "no .safetensors")


def test_index_names_missing_shard(src, tmp_path):
    shards(src)[-1].unlink()
    check_fails(src, tmp_path / "o", "model.safetensors.index.json", "does not exist")


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd"])
def test_index_name_outside_src(src, tmp_path, bad):
    idx = src / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = bad
    idx.write_text(json.dumps(data))
    check_fails(src, tmp_path / "o", "outside SRC", bad)


def test_truncated_shard(src, tmp_path):
    p = shards(src)[0]
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    check_fails(src, tmp_path / "o", p.name, "truncated")


def test_corrupt_header(src, tmp_path):
    p = shards(src)[0]
    data = bytearray(p.read_bytes())
    data[8:12] = b"}}}}"
    p.write_bytes(bytes(data))
    check_fails(src, tmp_path / "o", p.name, "header")


def test_header_length_beyond_file(src, tmp_path):
    p = shards(src)[0]
    data = bytearray(p.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 4)
    p.write_bytes(bytes(data))
    check_fails(src, tmp_path / "o", p.name, "header length")


def rewrite_header(path, edit):
    """Apply ``edit`` to a shard's parsed header and write it back with the same data section."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _tensors(header):
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _overlap(h):
    a, b = _tensors(h)[:2]
    h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + (h[b]["data_offsets"][1] - h[b]["data_offsets"][0])]


def _out_of_range(h):
    last = _tensors(h)[-1]
    span = h[last]["data_offsets"][1] - h[last]["data_offsets"][0]
    h[last]["data_offsets"] = [h[last]["data_offsets"][0] + 4096, h[last]["data_offsets"][1] + 4096]
    assert span


def _huge_shape(h):
    h[_tensors(h)[0]]["shape"] = [2**40, 2**40]


def _span_longer_than_shape(h):
    last = _tensors(h)[-1]
    h[last]["data_offsets"][1] += 16  # 16 more bytes than dtype x shape: a reader would take garbage


@pytest.mark.parametrize("edit, needle", [(_overlap, "overlap"), (_out_of_range, "truncated"), (_huge_shape, "needs"),
                                          (_span_longer_than_shape, "needs")])
def test_hostile_header_offsets_and_shapes(src, tmp_path, edit, needle):
    def count(path):
        return len(_tensors(json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])))

    p = max(shards(src), key=count)
    assert count(p) >= 2
    rewrite_header(p, edit)
    check_fails(src, tmp_path / "o", p.name, needle)


def test_duplicate_tensor_across_shards(src, tmp_path):
    first, second = shards(src)[:2]
    n = struct.unpack("<Q", first.read_bytes()[:8])[0]
    name = _tensors(json.loads(first.read_bytes()[8 : 8 + n]))[0]

    def add_twin(h):  # the second shard also claims a tensor of the first, over one of its own spans
        own = _tensors(h)[0]
        h[name] = dict(h.pop(own))

    rewrite_header(second, add_twin)
    (src / "model.safetensors.index.json").unlink()  # else the index check names the clash first
    check_fails(src, tmp_path / "o", name, "is also in", first.name, second.name)


def test_unsupported_weight_dtype(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}))
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(32, 32, dtype=torch.int8)}, str(src / "model.safetensors"))
    check_fails(src, tmp_path / "o", "model.safetensors", "model.layers.0.mlp.up_proj.weight", "I8")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_nan_in_weight_names_tensor_and_cleans_up(src, tmp_path, device):
    from safetensors.torch import load_file

    p = next(p for p in shards(src) if any(n.endswith("o_proj.weight") for n in load_file(str(p))))
    tensors = load_file(str(p))
    name = next(n for n in tensors if n.endswith("o_proj.weight"))
    tensors[name][1, 2] = float("nan")
    save_file(tensors, str(p), metadata={"format": "pt"})
    dst = tmp_path / "o"
    check_fails(src, dst, p.name, name, "NaN", "row 1, column 2", args=("--device", device))
    assert not dst.exists()  # created by the run, removed by it


def test_dst_not_empty_and_overwrite(src, tmp_path):
    dst = tmp_path / "o"
    dst.mkdir()
    (dst / "something").write_text("x")
    check_fails(src, dst, "not empty", "--overwrite")
    assert (dst / "something").read_text() == "x"
    # --overwrite replaces a previous output only: a folder holding no checkpoint is never emptied
    check_fails(src, dst, "not a checkpoint", args=("--overwrite",))
    assert (dst / "something").read_text() == "x"
    (dst / "config.json").write_text("{}")
    (dst / "model.safetensors").write_bytes(b"old")
    rc, err = run_cli("convert", src, dst, "--overwrite", "--no-progress")
    assert rc == 0, err
    assert (dst / "model.safetensors.index.json").exists() and not (dst / "something").exists()


def test_dst_inside_src(src):
    check_fails(src, src / "out", "inside SRC")
    check_fails(src, src, "inside SRC")


def test_not_a_folder_or_repo(tmp_path):
    rc, err = run_cli("convert", tmp_path / "nothing-here", tmp_path / "o")
    assert rc == 2 and "nothing-here" in err


def test_hub_repo_id_from_offline_cache(src, tmp_path, monkeypatch):
    """A repo id resolves through huggingface_hub's cache layout (symlinked files), offline."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    blobs = repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        shutil.copyfile(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(blobs / f"blob{i}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache), raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    rc, err = run_cli("convert", "acme/tiny", tmp_path / "o", "--no-progress")
    assert rc == 0, err
    assert (tmp_path / "o" / "model.safetensors.index.json").exists()


def test_the_command_reports_through_pipes_and_exits_with_its_status(src, tmp_path):
    """``python -m shardconv`` ends with os._exit (no teardown): what it printed must still arrive
    through block-buffered pipes, with the right exit status, and the output must be complete."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # pipes block-buffered, as usual
    ok = subprocess.run([sys.executable, "-m", "shardconv", "convert", str(src), str(tmp_path / "out"), "--device",
                         "cpu", "--scales", "max", "--no-progress"], capture_output=True, text=True, timeout=300,
                        env=env)
    assert ok.returncode == 0, ok.stderr
    assert f"wrote {tmp_path / 'out'}" in ok.stdout and "tensors quantized" in ok.stdout
    assert run_cli("verify", tmp_path / "out")[0] == 0
    bad = subprocess.run([sys.executable, "-m", "shardconv", "convert", str(tmp_path / "nowhere"), str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("shardconv: error: ") and "nowhere" in bad.stderr
