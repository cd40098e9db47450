"""A resume trusts content, not timestamps; a source written during a run is caught before the index.

``cp -p`` rewrites a file in place and sets its old mtime back; ``rsync -a`` writes a new file and
renames it over the old one, with the old mtime. Both keep the size. None of that may resume into an
output that mixes shards made from the old bytes with shards made from the new ones.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli
from shardconv import identity, output_shards
from shardconv.safetensors_io import read_header
from shardconv.synth import write_checkpoint
from test_resume import ARGS, interrupted, stamp, without_journal

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "src"
    write_checkpoint(path, family="llama", weights="structured", num_layers=4, shard_size=300_000,
                     hidden_size=256, intermediate_size=512)
    assert len(list(path.glob("model-*.safetensors"))) >= 3
    return path


@pytest.fixture
def src(pristine, tmp_path):
    """A private copy of the source: these tests change it."""
    path = tmp_path / "src"
    shutil.copytree(pristine, path)
    return path


def source_shards(src):
    return sorted(src.glob("model-*.safetensors"))


def negated(path, start: int = 0, stop: int | None = None) -> bytes:
    """The file's bytes with the sign of every element of its first large tensor flipped within bytes
    [start, stop) of that tensor (same size and header, finite values, other output bytes)."""
    weight = first_large(path)
    stop = weight.nbytes if stop is None else stop
    data = bytearray(path.read_bytes())
    for i in range(weight.offset + start + 1, weight.offset + stop, 2):  # bf16: the sign is bit 7 of the high byte
        data[i] ^= 0x80
    return bytes(data)


def first_large(path):
    infos, _ = read_header(path)
    return next(t for t in sorted(infos.values(), key=lambda t: t.offset) if t.nbytes >= 8192 and t.dtype == "BF16")


def cp_p(path, content: bytes) -> None:
    """What ``cp -p`` does to an existing file: rewritten in place (same inode), old mtime set back."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(content)
        f.truncate()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def rsync_a(path, content: bytes) -> None:
    """What ``rsync -a`` does: a new file with the old mtime, renamed over the old one (a new inode)."""
    st = path.stat()
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_bytes(content)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def fresh(src, tmp_path, *extra):
    out = tmp_path / "fresh"
    rc, err = run_cli("convert", src, out, *ARGS, *extra)
    assert rc == 0, err
    return out


def made_from(src, dst, source_name) -> set[str]:
    """Output shards holding a tensor read from the source shard ``source_name``."""
    from shardconv.formats import get_format
    from shardconv.planning import build_plan
    from shardconv.source import open_source

    plan = build_plan(open_source(str(src)), get_format("modelopt"), max_shard_size=120_000)
    return {plan.shard_names[i] for i in identity.dependent_shards(plan, {source_name})}


@pytest.mark.parametrize("replace", [cp_p, rsync_a])
def test_source_replaced_with_same_size_and_mtime_is_not_resumed_into_a_mix(src, tmp_path, monkeypatch, replace):
    dst = tmp_path / "out"
    log = interrupted(src, dst, 3, monkeypatch)
    victim = source_shards(src)[0]  # the first source shard: the finished output shards were made from it
    affected = made_from(src, dst, victim.name)
    assert affected & set(log["shards"])  # else the test would prove nothing
    unaffected = {n: stamp(dst / n) for n in log["shards"] if n not in affected}
    replace(victim, negated(victim))
    rc, err = run_cli("convert", src, dst, *ARGS)
    assert rc == 0, err
    assert without_journal(dst) == without_journal(fresh(src, tmp_path))  # the new source's conversion, byte for byte
    assert {n: stamp(dst / n) for n in unaffected} == unaffected  # what the old bytes did not reach was kept


def test_a_change_between_the_samples_is_caught_by_ctime_not_by_the_samples(src, tmp_path, monkeypatch):
    """A sampled digest cannot see a change between its pieces: the inode and ctime must (the limit is
    in README, Reliability: only a file system that keeps no ctime would let it through)."""
    monkeypatch.setattr(identity, "SAMPLES", 2)
    monkeypatch.setattr(identity, "SAMPLE_BYTES", 512)
    dst = tmp_path / "out"
    interrupted(src, dst, 3, monkeypatch)
    victim = source_shards(src)[0]
    hlen = 8 + int.from_bytes(victim.read_bytes()[:8], "little")
    samples = identity.sample_offsets(hlen, victim.stat().st_size)
    weight = first_large(victim)
    start, stop = weight.offset + 1024, weight.offset + 5120  # 4 KiB of the weight, in the first gap
    assert samples[0] + 512 <= start and stop <= samples[1]
    before = identity.identify(victim, src)
    cp_p(victim, negated(victim, 1024, 5120))
    after = identity.identify(victim, src)
    assert (after.size, after.header, after.sample) == (before.size, before.header, before.sample)
    assert after.ctime_ns != before.ctime_ns  # all that differs
    rc, err = run_cli("convert", src, dst, *ARGS)
    assert rc == 0, err
    assert without_journal(dst) == without_journal(fresh(src, tmp_path))


def test_a_content_change_is_caught_by_the_samples_where_ctime_is_not_kept(src, tmp_path, monkeypatch):
    """On a file system that keeps no ctime (some FUSE mounts report it as the mtime), the sampled
    content digest alone must see a rewrite that changes the sampled bytes."""
    real = identity.identify
    monkeypatch.setattr(identity, "identify", lambda *a, **k: real(*a, **k).__class__(
        **{**real(*a, **k).to_json(), "ctime_ns": 0, "ino": 0}))
    dst = tmp_path / "out"
    interrupted(src, dst, 3, monkeypatch)
    victim = source_shards(src)[0]
    cp_p(victim, negated(victim))
    rc, err = run_cli("convert", src, dst, *ARGS)
    assert rc == 0, err
    assert json.loads((dst / ".shardconv-journal.json").read_text())["complete"]
    assert without_journal(dst) == without_journal(fresh(src, tmp_path))


@pytest.mark.parametrize("replace", [cp_p, rsync_a])
def test_a_source_written_during_the_run_fails_it_before_the_index(src, tmp_path, monkeypatch, replace):
    dst = tmp_path / "out"
    victim = source_shards(src)[-1]
    real = output_shards.Shards._done
    done = {"n": 0}

    def change_after_first_shard(self, shard, n):
        real(self, shard, n)
        if self.remaining[shard] == 0:
            done["n"] += 1
            if done["n"] == 1:
                replace(victim, negated(victim))

    monkeypatch.setattr(output_shards.Shards, "_done", change_after_first_shard)
    rc, err = run_cli("convert", src, dst, *ARGS)
    monkeypatch.setattr(output_shards.Shards, "_done", real)
    assert rc == 2 and "changed during the conversion" in err and victim.name in err, err
    assert err.count("\n") == 1, err
    assert not (dst / INDEX).exists() and not list(dst.glob("*.partial"))
    rc, err = run_cli("convert", src, dst, *ARGS)  # the resume sees the new identity: no stale shard kept
    assert rc == 0, err
    assert without_journal(dst) == without_journal(fresh(src, tmp_path))


def test_a_header_changed_between_planning_and_converting_is_refused(src, tmp_path, monkeypatch):
    from shardconv import planning as plan_module

    victim = source_shards(src)[0]
    real = plan_module.build_plan

    def plan_then_change(*a, **k):
        p = real(*a, **k)
        infos, _ = read_header(victim)
        name = next(iter(infos))
        text = victim.read_bytes()
        cp_p(victim, text.replace(name.encode(), name[:-1].encode() + b"X", 1))
        return p

    monkeypatch.setattr("shardconv.planning.build_plan", plan_then_change)
    rc, err = run_cli("convert", src, tmp_path / "out", *ARGS)
    assert rc == 2 and "changed during the conversion" in err and victim.name in err, err
    assert not (tmp_path / "out" / INDEX).exists()


@pytest.fixture
def amax(src, tmp_path):
    from shardconv.source import open_source
    from shardconv.safetensors_io import read_into

    source = open_source(str(src))
    amax = {}
    for name, info in source.tensors.items():
        if name.endswith("_proj.weight"):
            amax[name.replace(".weight", ".weight_quantizer._amax")] = read_into(info).abs().max().float()
            amax[name.replace(".weight", ".input_quantizer._amax")] = torch.tensor(4.0)
    path = tmp_path / "amax.safetensors"
    save_file(amax, str(path))
    return path, amax


def test_amax_changed_with_same_size_and_mtime_is_not_resumed_with_stale_scales(src, amax, tmp_path, monkeypatch):
    path, values = amax
    dst = tmp_path / "out"
    interrupted(src, dst, 3, monkeypatch, "--amax", path)
    other = tmp_path / "other.safetensors"
    save_file({k: v * 2 if "input" in k else v for k, v in values.items()}, str(other))
    assert other.stat().st_size == path.stat().st_size
    cp_p(path, other.read_bytes())
    rc, err = run_cli("convert", src, dst, *ARGS, "--amax", path)
    assert rc == 2 and "amax" in err and "--overwrite" in err and err.count("\n") == 1, err
    rc, err = run_cli("convert", src, dst, *ARGS, "--amax", path, "--overwrite")
    assert rc == 0, err
    assert without_journal(dst) == without_journal(fresh(src, tmp_path, "--amax", path))


def test_an_unchanged_source_touched_or_copied_back_still_resumes_correctly(src, tmp_path, monkeypatch):
    """Metadata alone (touch) costs the shards made from that file, never a wrong output or a refusal."""
    dst = tmp_path / "out"
    log = interrupted(src, dst, 3, monkeypatch)
    reference = fresh(src, tmp_path)
    os.utime(source_shards(src)[0])  # new mtime and ctime, same bytes
    rc, err = run_cli("convert", src, dst, *ARGS)
    assert rc == 0, err
    assert without_journal(dst) == without_journal(reference)
    assert set(json.loads((dst / ".shardconv-journal.json").read_text())["shards"]) >= set(log["shards"])
