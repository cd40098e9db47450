"""Reading ahead into the page cache: with --prefetch, the next units' bytes, in input order, never
more than the window ahead; at start-up (readahead.py), the first --readahead bytes of the shards in
the order the pipeline reads them; sequential-access hints on every read; and the output does not
depend on any of them."""

import json
import os
import time

import pytest

from conftest import run_cli, tree_digest
from shardconv import readahead, safetensors_io
from shardconv.formats import get_format
from shardconv.planning import build_plan
from shardconv.source import open_source
from shardconv.synth import write_checkpoint


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefetch") / "src"
    write_checkpoint(path, family="llama", num_layers=3, shard_size=150_000)
    return path


def record_warm(monkeypatch) -> list:
    """Every readahead.warm call as (file, offset, bytes), still reading."""
    calls = []
    real = readahead.warm
    monkeypatch.setattr(readahead, "warm", lambda fd, off, n, scratch: (
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), off, n)), real(fd, off, n, scratch))[1])
    return calls


def test_prefetch_covers_the_window_in_input_order(src, monkeypatch):
    calls = record_warm(monkeypatch)
    plan = build_plan(open_source(src), get_format("modelopt"), scales="max")
    units = plan.units
    window = 3 * max(u.in_bytes for u in units)
    p = readahead.Prefetcher([u.inputs for u in units], window)
    p.ahead_of(0)
    p.pool.shutdown(wait=True)
    ranges = [(str(t.path), t.offset, t.nbytes) for u in units[: p.queued] for t in u.inputs]
    assert calls == ranges
    queued = sum(u.in_bytes for u in units[: p.queued])
    assert queued - units[p.queued - 1].in_bytes < window <= queued  # just enough, never a unit more
    p.close()


def test_warm_reads_exactly_the_range(tmp_path, monkeypatch):
    f = tmp_path / "f.bin"
    f.write_bytes(bytes(range(256)) * 100)
    reads = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: (reads.append((off, len(bufs[0]))), real(fd, bufs, off))[1])
    fd = os.open(f, os.O_RDONLY)
    try:
        assert readahead.warm(fd, 1000, 2500, memoryview(bytearray(1024))) == 2500
        assert reads == [(1000, 1024), (2024, 1024), (3048, 452)]
        assert readahead.warm(fd, 25_000, 9_999, memoryview(bytearray(1024))) == 600  # stops at the end
    finally:
        os.close(fd)


def test_later_calls_only_add_units_past_the_window(src):
    plan = build_plan(open_source(src), get_format("modelopt"), scales="max")
    units = plan.units
    p = readahead.Prefetcher([u.inputs for u in units], 1)
    p.ahead_of(0)
    assert p.queued == 1
    p.ahead_of(0)
    assert p.queued == 1  # already a unit ahead: nothing new
    p.ahead_of(len(units) - 1)
    assert p.queued == len(units)
    p.close()
    off = readahead.Prefetcher([u.inputs for u in units], 0)
    off.ahead_of(0)
    assert off.queued == 0 and off.pool is None


def test_output_is_the_same_with_and_without_prefetch(src, tmp_path, monkeypatch):
    calls = record_warm(monkeypatch)
    plan = build_plan(open_source(src), get_format("modelopt"), scales="max")
    order = [(str(t.path), t.offset, t.nbytes) for u in plan.units for t in u.inputs]
    read = {}
    for name, extra in (("on", ("--prefetch", "2GiB")), ("off", ()), ("tiny", ("--prefetch", "1KB"))):
        calls.clear()
        rc, err = run_cli("convert", src, tmp_path / name, "--device", "cpu", "--scales", "max", "--no-progress",
                          "--readahead", "0", *extra)
        assert rc == 0, err
        read[name] = list(calls)
    assert tree_digest(tmp_path / "on") == tree_digest(tmp_path / "off") == tree_digest(tmp_path / "tiny")
    # the option reaches the pipeline: the units' ranges are read ahead in the pipeline's order (what
    # the readers finish first is cancelled, so not all of them), and nothing is without the option
    assert read["off"] == []
    for name in ("on", "tiny"):
        assert read[name] and all(r in order for r in read[name]), name
        positions = [order.index(r) for r in read[name]]
        assert positions == sorted(positions), name


def test_read_into_asks_for_sequential_read_ahead(src, monkeypatch):
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this OS")
    seen = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: seen.append(advice))
    info = next(iter(open_source(src).tensors.values()))
    safetensors_io.read_into(info)
    assert seen == [os.POSIX_FADV_SEQUENTIAL]


def settle(ra, timeout=20.0) -> int:
    """Wait until the start-up read-ahead has stopped moving (waiting for the readers, or finished)."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        with ra.cond:
            now = ra.position
        if now == last:
            return now
        last = now
        time.sleep(0.2)
    raise AssertionError("the read-ahead never settled")


def test_startup_readahead_reads_the_shards_in_pipeline_order_a_window_ahead(src, monkeypatch):
    shards = open_source(src).shards
    assert readahead.input_files(src) == shards  # the order plan.py's units follow
    sizes = [p.stat().st_size for p in shards]
    calls = record_warm(monkeypatch)
    monkeypatch.setattr(readahead, "PIECE", 40_000)
    monkeypatch.setattr(readahead, "SCRATCH", 10_000)
    window = sizes[0] + sizes[1] // 2
    ra = readahead.start(str(src), window)
    try:
        assert settle(ra) == ra.done == window  # the readers are at 0: one window, then it waits
        # a small first piece (the profile's first byte), then contiguous pieces, shard 0 whole, then shard 1
        want, left, first = [], window, True
        for path, size in zip(shards, sizes):
            off = 0
            while off < size and left > 0:
                n = min(10_000 if first else 40_000, size - off, left)
                want.append((str(path), off, n))
                off, left, first = off + n, left - n, False
        assert calls == want
        assert ra.first_byte_age is not None and 0 < ra.first_byte_age <= readahead.process_age()
        # the readers take shard 1 whole: the window moves on past it, and no further
        ra.reached([safetensors_io.TensorInfo("t", shards[1], "BF16", (1,), 0, sizes[1])])
        moved = settle(ra)
        assert moved == min(sum(sizes), sizes[0] + sizes[1] + window)
        # the rest of shard 1 is the readers': on from shard 2's first byte
        assert calls[len(want)][:2] == (str(shards[2]), 0)
        ends = {}
        for path, off, n in calls:
            assert off == ends.get(path, 0), "not front to back"
            ends[path] = off + n
        assert [p for p in dict.fromkeys(c[0] for c in calls)] == [str(s) for s in shards[: len(ends)]]
        # readers past the read-ahead: what they passed is skipped, not read again
        n_calls = len(calls)
        ra.reached([safetensors_io.TensorInfo("t", shards[-1], "BF16", (1,), 0, 1)])
        settle(ra)
        assert all(c[0] == str(shards[-1]) and c[1] >= 1 for c in calls[n_calls:])
    finally:
        readahead.stop()
    ra.thread.join(timeout=10)
    assert not ra.thread.is_alive() and readahead.active() is None


def test_stop_ends_a_waiting_startup_readahead(src, monkeypatch):
    calls = record_warm(monkeypatch)
    ra = readahead.start(str(src), 1000)
    settle(ra)
    assert ra.done == 1000 and ra.thread.is_alive()  # waiting for readers that never came
    readahead.stop()
    ra.thread.join(timeout=10)
    assert not ra.thread.is_alive()
    assert sum(n for _, _, n in calls) == 1000


def test_cli_readahead_follows_the_readers_to_the_end_and_stops(src, tmp_path, monkeypatch):
    """A window far smaller than the input: the old start-up read-ahead stopped after it; now the
    pipeline's readers move it on to the last shard, and it ends with the run, also a failed one."""
    calls = record_warm(monkeypatch)
    started, seen = [], []
    real, real_reached = readahead.start, readahead.ReadAhead.reached
    monkeypatch.setattr(readahead, "start", lambda s, budget: started.append(real(s, budget)) or started[-1])
    monkeypatch.setattr(readahead.ReadAhead, "reached",
                        lambda self, ranges: (real_reached(self, ranges), seen.append(self.consumed)))
    shards = [str(p) for p in open_source(src).shards]
    rc, err = run_cli("convert", src, tmp_path / "out", "--device", "cpu", "--scales", "max", "--no-progress",
                      "--readahead", "20KB")
    assert rc == 0, err
    ra = started[-1]
    ra.thread.join(timeout=10)
    assert not ra.thread.is_alive() and readahead.active() is None
    # the pipeline moved the window on, unit by unit, to the input's last byte
    assert len(seen) > len(shards) and seen == sorted(seen) and seen[-1] == ra.total == sum(
        os.path.getsize(p) for p in shards)
    # what it read (the readers may pass it on so small a checkpoint): front to back, 20 KB at most
    assert calls and {c[0] for c in calls} <= set(shards)
    assert max(n for _, _, n in calls) <= 20_000
    positions = [(shards.index(p), off) for p, off, _ in calls]
    assert positions == sorted(positions)
    # a run refused after the read-ahead started (an --exclude that matches nothing, --strict)
    rc, err = run_cli("convert", src, tmp_path / "refused", "--device", "cpu", "--scales", "max",
                      "--readahead", "1KB", "--exclude", "nothing.*", "--strict")
    assert rc == 2 and "matches no module" in err
    ra = started[-1]
    ra.thread.join(timeout=10)
    assert not ra.thread.is_alive() and readahead.active() is None and ra.stopped


def test_startup_readahead_does_nothing_where_it_cannot_help(src, tmp_path, monkeypatch):
    def listed(path):
        raise AssertionError(f"{path}: shards listed where nothing is read ahead")

    with monkeypatch.context() as m:  # these are refused before any file is looked for
        m.setattr(readahead, "input_files", listed)
        assert readahead.start(str(src), 0) is None
        assert readahead.start("meta-llama/Llama-3.1-8B", 2**30) is None  # a hub id: not a local folder
        (tmp_path / "file").write_bytes(b"x")
        assert readahead.start(str(tmp_path / "file"), 2**30) is None
    assert readahead.start(str(src), 0) is None
    assert readahead.start(None, 2**30) is None  # the built-in sample
    assert readahead.start("meta-llama/Llama-3.1-8B", 2**30) is None  # a hub id: not a local folder
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors.index.json").write_text("{not json")
    assert readahead.start(str(tmp_path / "bad"), 2**30) is None


def test_startup_readahead_never_reads_outside_src(tmp_path):
    """An index naming files outside SRC is refused by the conversion; the read-ahead, which runs
    before that check, must not read them either."""
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"x" * 100)
    root = tmp_path / "src"
    root.mkdir()
    (root / "a.safetensors").write_bytes(b"y" * 100)
    weight_map = {"t0": "a.safetensors", "t1": "../secret.safetensors", "t2": str(outside)}
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert readahead.input_files(root) == [root / "a.safetensors"]


def test_cli_reads_ahead_on_fresh_runs_only(src, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(readahead, "start", lambda s, budget: started.append((s, budget)))
    args = ("--device", "cpu", "--scales", "max", "--no-progress")
    assert run_cli("convert", src, tmp_path / "a", *args, "--readahead", "1MB")[0] == 0
    assert started == [(str(src), 10**6)]
    assert run_cli("convert", src, tmp_path / "b", *args, "--dry-run")[0] == 0
    assert run_cli("convert", src, tmp_path / "a", *args)[0] == 0  # resumes (nothing left): no read-ahead
    assert len(started) == 1
    assert run_cli("convert", src, tmp_path / "a", *args, "--overwrite")[0] == 0
    assert started[-1] == (str(src), None)  # default: readahead.auto_budget()
    assert 0 < readahead.auto_budget() <= readahead.MAX_AUTO
    monkeypatch.chdir(tmp_path)  # no DST: the default <SRC name>-NVFP4, here
    n = len(started)
    assert run_cli("convert", src, *args)[0] == 0 and (tmp_path / f"{src.name}-NVFP4").is_dir()
    assert len(started) == n + 1
    assert run_cli("convert", src, *args)[0] == 0  # a resume into the default DST: no read-ahead
    assert len(started) == n + 1



def resident_fraction(path) -> float | None:
    """Share of ``path``'s pages in the page cache (Linux ``mincore``), or None where it cannot be asked."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return None
            return sum(v & 1 for v in vec) / pages
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def test_warm_really_fills_the_page_cache(tmp_path):
    """What a WILLNEED hint did not do (Linux caps each hint at the read-ahead window): after
    ``readahead.warm`` the whole range is cached. Needs a file system whose clean pages DONTNEED
    evicts (not tmpfs) and ``mincore``; skipped elsewhere."""
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this OS")
    f = tmp_path / "data.bin"
    f.write_bytes(os.urandom(32 * 2**20))
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        before = resident_fraction(f)
        if before is None or before > 0.1:
            pytest.skip(f"cannot evict this file's pages here (resident after DONTNEED: {before})")
        assert readahead.warm(fd, 0, 24 * 2**20, memoryview(bytearray(2**20))) == 24 * 2**20
        assert resident_fraction(f) >= 0.74  # the 24 of 32 MiB asked for (kernel read-ahead may add more)
    finally:
        os.close(fd)
