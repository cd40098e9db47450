"""Hostile inputs, class 3: a checkpoint is read whole or refused.

Every shard that the index lists or that ``<stem>-0000i-of-0000N`` names imply must be there (and
listed); every data byte of a shard belongs to a tensor, as the safetensors library itself requires;
config fields shardconv reads are type-checked; files that are not regular files are named as such.
"""

import json
import os
import struct

import pytest

from conftest import run_cli, tree_digest
from shardconv.synth import write_checkpoint


@pytest.fixture()
def src(tmp_path):
    path = write_checkpoint(tmp_path / "src", family="llama", num_layers=2, shard_size=100_000)
    assert len(list(path.glob("model-*-of-*.safetensors"))) >= 3
    return path


def refused(src, dst, *needles):
    before = tree_digest(src)
    rc, err = run_cli("convert", src, dst, "--no-progress", "--device", "cpu")
    assert rc == 2 and err.startswith("shardconv: error: ") and err.count("\n") == 1, err
    for n in needles:
        assert str(n) in err, (n, err)
    assert tree_digest(src) == before
    assert not (dst / "model.safetensors.index.json").exists()
    return err


def shards(src):
    return sorted(src.glob("model-*-of-*.safetensors"))


def test_numbered_shard_missing_without_an_index(src, tmp_path):
    (src / "model.safetensors.index.json").unlink()
    gone = shards(src)[1]
    gone.unlink()
    refused(src, tmp_path / "out", gone.name, "missing")


def test_shard_on_disk_that_the_index_does_not_list(src, tmp_path):
    """The index describes shards 1..N-1 only (say, an index from an older upload): the last shard's
    tensors would silently be left out."""
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    last = shards(src)[-1].name
    index["weight_map"] = {t: s for t, s in index["weight_map"].items() if s != last}
    index_path.write_text(json.dumps(index))
    refused(src, tmp_path / "out", last, "lists no tensor")


def test_shard_number_beyond_its_count(src, tmp_path):
    (src / "model.safetensors.index.json").unlink()
    first = shards(src)[0]
    n = len(shards(src))
    first.rename(src / f"model-{n + 1:05d}-of-{n:05d}.safetensors")
    refused(src, tmp_path / "out", "outside 1..")


def test_trailing_bytes_in_a_shard(src, tmp_path):
    shard = shards(src)[0]
    with open(shard, "ab") as f:
        f.write(b"\0" * 64)
    refused(src, tmp_path / "out", shard.name, "64 bytes after the last tensor")


def test_gap_between_tensors(src, tmp_path):
    """A header entry removed, its data left in place: a tensor the header lost."""
    wm = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    shard = max(shards(src), key=lambda p: (sum(1 for s in wm.values() if s == p.name), p.name))
    data = shard.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
    assert len(names) >= 3
    victim = names[len(names) // 2]
    del header[victim]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + hlen:])
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][victim]
    index_path.write_text(json.dumps(index))
    refused(src, tmp_path / "out", shard.name, "belong to no tensor")


def test_header_over_the_size_limit_names_the_limit(src, tmp_path):
    shard = shards(src)[0]
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 100 * 2**20 + 8)
    shard.write_bytes(bytes(data))
    refused(src, tmp_path / "out", shard.name, "over the 104857600 byte limit")


@pytest.mark.parametrize("what", ["config", "index", "shard"])
def test_fifo_in_place_of_a_file_is_named_as_such(src, tmp_path, what):
    target = {"config": src / "config.json", "index": src / "model.safetensors.index.json",
              "shard": shards(src)[1]}[what]
    target.unlink()
    os.mkfifo(target)
    err = refused(src, tmp_path / "out", target.name, "not a regular file")
    assert "does not exist" not in err and "not found" not in err


def test_directory_in_place_of_config(src, tmp_path):
    (src / "config.json").unlink()
    (src / "config.json").mkdir()
    refused(src, tmp_path / "out", "config.json", "not a regular file")


@pytest.mark.parametrize("key,value", [("tie_word_embeddings", "yes"), ("num_hidden_layers", "2"),
                                       ("num_hidden_layers", True), ("architectures", "LlamaForCausalLM")])
def test_config_fields_shardconv_reads_are_type_checked(src, tmp_path, key, value):
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    refused(src, tmp_path / "out", "config.json", key)


def test_a_stray_tensor_named_like_a_planned_output_is_refused_at_plan_time(src, tmp_path):
    """A kept ``q_proj.weight_scale`` beside the q_proj that shardconv quantizes (e.g. left by an
    earlier quantization) would be written twice: refused before anything is written, naming it."""
    import torch
    from safetensors.torch import load_file, save_file

    last = shards(src)[-1]
    tensors = load_file(last)
    name = "model.layers.0.self_attn.q_proj.weight_scale"
    tensors[name] = torch.ones(4, dtype=torch.bfloat16)
    save_file(tensors, last, metadata={"format": "pt"})
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][name] = last.name
    index.write_text(json.dumps(data))
    err = refused(src, tmp_path / "out", name, "written twice")
    assert "bug" not in err
    assert not (tmp_path / "out").exists()
