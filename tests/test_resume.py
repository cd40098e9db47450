"""Interrupted runs: killed at random points, stopped by signals, resumed to byte-identical output."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import run_cli, tree_digest
from shardconv import output_shards
from shardconv.synth import write_checkpoint

ARGS = ("--device", "cpu", "--max-shard-size", "120KB", "--no-progress")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "src"
    write_checkpoint(path, family="llama", weights="structured", num_layers=4, shard_size=300_000,
                     hidden_size=256, intermediate_size=512)
    return path


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("ref") / "out"
    rc, err = run_cli("convert", src, dst, *ARGS)
    assert rc == 0, err
    assert len(list(dst.glob("model-*.safetensors"))) >= 6
    return dst


def without_journal(path):
    # a kill after the index is written, before the lock file is removed, leaves that (empty-of-data) file
    return {k: v for k, v in tree_digest(path).items() if k not in (".shardconv-journal.json", ".shardconv.lock")}


def spawn(src, dst, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "shardconv", "convert", str(src), str(dst), *ARGS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def disk_full_after(n_shards, monkeypatch):
    """Make the writer fail (ENOSPC) right after the n-th output shard is finished, and every write after
    it (a full disk stays full); returns the undo. The count and the shard's completion happen under one
    lock: writer and copy threads finish shards concurrently, and without it a second shard could be
    finished while the n-th one raises (seen once in CI: 4 recorded shards for 3)."""
    real = output_shards.Shards._done
    finished = {"n": 0}
    lock = threading.Lock()

    def failing(self, shard, n):
        with lock:
            if finished["n"] >= n_shards:
                raise OSError(28, "No space left on device")
            real(self, shard, n)
            finished["n"] += self.remaining[shard] == 0
            if finished["n"] == n_shards:
                raise OSError(28, "No space left on device")

    monkeypatch.setattr(output_shards.Shards, "_done", failing)
    return lambda: monkeypatch.setattr(output_shards.Shards, "_done", real)


def stamp(path) -> tuple[int, int]:
    """Inode and modification time: a file written again differs in at least one (an inode alone may
    be reused by the new file)."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def interrupted(src, dst, n_shards, monkeypatch, *extra) -> dict:
    """Run until the disk fills after ``n_shards`` finished shards; returns the journal it left."""
    undo = disk_full_after(n_shards, monkeypatch)
    assert run_cli("convert", src, dst, *ARGS, *extra)[0] == 2
    undo()
    log = json.loads((dst / ".shardconv-journal.json").read_text())
    assert len(log["shards"]) == n_shards and not log["complete"]
    return log


def test_failure_mid_run_keeps_finished_shards_and_resumes(src, reference, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    undo = disk_full_after(3, monkeypatch)
    rc, err = run_cli("convert", src, dst, *ARGS)
    assert rc == 2 and "No space left on device" in err and err.count("\n") == 1, err
    undo()
    assert not (dst / "model.safetensors.index.json").exists() and not list(dst.glob("*.partial"))
    finished = json.loads((dst / ".shardconv-journal.json").read_text())["shards"]
    assert finished and not json.loads((dst / ".shardconv-journal.json").read_text())["complete"]
    stamps = {n: stamp(dst / n) for n in finished}
    rc, err = run_cli("convert", src, dst, *ARGS)
    assert rc == 0, err
    assert tree_digest(dst) == tree_digest(reference)
    assert {n: stamp(dst / n) for n in finished} == stamps  # kept, not written again


def journal_written_since(dst, start_ns: int, p, timeout: float = 60) -> bool:
    """Wait until run ``p`` has written DST's journal (its first write, after imports and planning)."""
    journal, deadline = dst / ".shardconv-journal.json", time.monotonic() + timeout
    while p.poll() is None and time.monotonic() < deadline:
        try:
            if journal.stat().st_mtime_ns >= start_ns:
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    return False


@pytest.mark.heavy
def test_sigkill_at_random_points_then_resume_is_byte_identical(src, reference, tmp_path):
    """Kills land at random points of the conversion itself: after the journal is written (start-up
    would test nothing), within the time an uninterrupted run takes from there."""
    rng = random.Random(1234)
    timing = tmp_path / "timing"
    p = spawn(src, timing)
    assert journal_written_since(timing, 0, p)
    t0 = time.monotonic()
    p.communicate()
    span = time.monotonic() - t0  # journal to exit, for a whole run
    dst = tmp_path / "out"
    kills = tries = 0
    while kills < 24 and tries < 60:  # a run that finishes before its kill does not count
        tries += 1
        start = time.time_ns()
        p = spawn(src, dst)
        if journal_written_since(dst, start, p):
            time.sleep(rng.uniform(0, span))
        if p.poll() is None:
            p.kill()
            kills += 1
        p.communicate()
        if (dst / "model.safetensors.index.json").exists():  # the index is written last: all else is done
            assert without_journal(dst) == without_journal(reference)
        if p.returncode == 0:  # finished before the kill: start over to keep killing mid-run
            assert tree_digest(dst) == tree_digest(reference)
            start = time.time_ns()
            p = spawn(src, dst, "--overwrite")
            if journal_written_since(dst, start, p):
                time.sleep(rng.uniform(0, span / 2))
            p.kill()
            p.communicate()
    assert kills >= 20
    p = spawn(src, dst)
    out, err = p.communicate()
    assert p.returncode == 0, err
    assert tree_digest(dst) == tree_digest(reference)


def test_sigterm_stops_cleanly_and_resumes(src, reference, tmp_path):
    dst = tmp_path / "out"
    for _ in range(10):  # signal once a shard is being written (the handlers are in place by then)
        shutil.rmtree(dst, ignore_errors=True)
        p = spawn(src, dst)
        deadline = time.monotonic() + 60
        while p.poll() is None and not list(dst.glob("*.safetensors.partial")) and time.monotonic() < deadline:
            time.sleep(0.005)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate()
        if p.returncode == 130:
            break
    assert p.returncode == 130, (p.returncode, err)
    assert "resume" in err and err.count("\n") == 1
    assert not list(dst.glob("*.partial")) and not (dst / "model.safetensors.index.json").exists()
    rc, err = run_cli("convert", src, dst, *ARGS)
    assert rc == 0, err
    assert tree_digest(dst) == tree_digest(reference)


def test_a_different_plan_is_refused_unless_overwrite(src, tmp_path, monkeypatch):
    dst = tmp_path / "out"

    real = output_shards.Shards._done
    lock = threading.Lock()

    def boom_when_shard_1_is_finished(self, s, n):
        # decided after the write, under a lock: deciding from `remaining` beforehand raced with the
        # thread finishing shard 1's other tensor, and then nothing failed (seen once)
        with lock:
            real(self, s, n)
            if s == 1 and self.remaining[s] == 0:
                raise OSError(5, "I/O error")

    monkeypatch.setattr(output_shards.Shards, "_done", boom_when_shard_1_is_finished)
    rc, err = run_cli("convert", src, dst, *ARGS)
    assert rc == 2 and "I/O error" in err, err
    monkeypatch.setattr(output_shards.Shards, "_done", real)
    rc, err = run_cli("convert", src, dst, "--device", "cpu", "--max-shard-size", "200KB", "--no-progress")
    assert rc == 2 and "different conversion" in err
    rc, err = run_cli("convert", src, dst, "--device", "cpu", "--max-shard-size", "200KB", "--no-progress", "--overwrite")
    assert rc == 0, err
    fresh = tmp_path / "fresh"  # the same conversion into an empty folder: nothing of the old plan may be left
    assert run_cli("convert", src, fresh, "--device", "cpu", "--max-shard-size", "200KB", "--no-progress")[0] == 0
    assert without_journal(dst) == without_journal(fresh)


def test_a_damaged_finished_shard_is_rewritten_on_resume(src, reference, tmp_path, monkeypatch):
    """Without --fsync a power loss can leave a renamed shard incomplete: resume re-hashes what it keeps."""
    dst = tmp_path / "out"
    log = interrupted(src, dst, 3, monkeypatch)
    assert log["synced"] is False
    victim = dst / sorted(log["shards"])[0]
    data = bytearray(victim.read_bytes())
    data[-4096:] = bytes(b ^ 0x5A for b in data[-4096:])  # same size, other bytes: a page lost in a crash
    victim.write_bytes(bytes(data))
    others = {n: stamp(dst / n) for n in log["shards"] if n != victim.name}
    rc, err = run_cli("convert", src, dst, *ARGS)
    assert rc == 0, err
    assert tree_digest(dst) == tree_digest(reference)
    assert {n: stamp(dst / n) for n in others} == others  # the undamaged ones were kept


def test_fsync_run_is_trusted_by_size_and_journal_says_so(src, reference, tmp_path, monkeypatch):
    from shardconv import digest

    dst = tmp_path / "out"
    log = interrupted(src, dst, 2, monkeypatch, "--fsync")
    assert log["synced"] is True
    inodes = {name: stamp(dst / name) for name in log["shards"]}

    def no_rehash(*a, **k):
        raise AssertionError("a flushed shard was hashed again")

    monkeypatch.setattr(digest, "shard_digest", no_rehash)  # trusted by size and the journal alone
    rc, err = run_cli("convert", src, dst, *ARGS, "--fsync")
    assert rc == 0, err
    assert {name: stamp(dst / name) for name in inodes} == inodes  # kept, not rewritten
    assert without_journal(dst) == without_journal(reference)


def test_journal_of_another_digest_scheme_keeps_no_shard(src, reference, tmp_path, monkeypatch):
    """Digests recorded by another scheme (an older version hashed whole files) cannot vouch for a
    shard, even one recorded as flushed: every shard is written again."""
    dst = tmp_path / "out"
    log = interrupted(src, dst, 2, monkeypatch, "--fsync")
    log["digest"] = "sha256 of the file"
    (dst / ".shardconv-journal.json").write_text(json.dumps(log))
    for name in log["shards"]:  # same size, other bytes: trusted by size, this would survive
        (dst / name).write_bytes(b"\0" * (dst / name).stat().st_size)
    rc, err = run_cli("convert", src, dst, *ARGS, "--fsync")
    assert rc == 0, err
    assert without_journal(dst) == without_journal(reference)
    assert json.loads((dst / ".shardconv-journal.json").read_text())["digest"] != "sha256 of the file"


def test_resume_with_fsync_after_a_run_without(src, reference, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    first = interrupted(src, dst, 2, monkeypatch)
    assert first["synced"] is False
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    rc, err = run_cli("convert", src, dst, *ARGS, "--fsync")  # fsync is no part of the plan: a resume
    assert rc == 0, err
    assert set(first["shards"]) <= set(synced)  # the kept shards were flushed too, not only the new ones
    log = json.loads((dst / ".shardconv-journal.json").read_text())
    assert log["synced"] is True and log["complete"] is True
    assert without_journal(dst) == without_journal(reference)


def test_killed_while_the_first_shard_is_written_then_resumed(src, reference, tmp_path):
    """The journal is written before any shard, so a DST killed at its first write is resumable as is."""
    dst = tmp_path / "out"
    p = spawn(src, dst)
    deadline = time.monotonic() + 60
    while p.poll() is None and not list(dst.glob("*.safetensors.partial")) and time.monotonic() < deadline:
        time.sleep(0.002)
    p.kill()
    p.communicate()
    assert p.returncode == -signal.SIGKILL  # killed mid-run, not finished before the kill
    assert (dst / ".shardconv-journal.json").exists()
    rc, err = run_cli("convert", src, dst, *ARGS)
    assert rc == 0, err
    assert tree_digest(dst) == tree_digest(reference)
