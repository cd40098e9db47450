"""One conversion on several ranks (distributed.py): gloo on the CPU, ranks forked from this process
(torch and transformers already imported: a rank costs no start-up), each running the CLI with
``--rank/--world-size``. The output must be the single-process bytes for any world size, a failed or
killed rank must stop every rank with one line, and the same command must resume."""

import contextlib
import io
import json
import multiprocessing
import os
import signal
import socket

import pytest

from conftest import run_cli, tree_digest
from shardconv import distributed, journal, ranks
from shardconv.cli import main
from shardconv.destination import RANK_LOCK, DstLock
from shardconv.synth import write_checkpoint

ARGS = ("--device", "cpu", "--scales", "max", "--max-shard-size", "120KB", "--no-progress", "--threads", "1")
INDEX = "model.safetensors.index.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, size, port, argv, out, fault):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(var, None)
    if fault is not None and fault[0] == rank and fault[1] == "skip":
        # this rank leaves out one of its shards and says nothing (as a buggy rank would)
        assign = distributed.assign

        def lazy(*args, **kwargs):
            shares = assign(*args, **kwargs)
            if shares[rank]:
                shares[rank].remove(min(shares[rank]))
            return shares

        distributed.assign = lazy
    elif fault is not None and fault[0] == rank:
        # after this rank's first finished shard: raise (an I/O error) or die at once (SIGKILL)
        original = journal.Journal.record

        def record(self, name, digest):
            original(self, name, digest)
            if fault[1] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected fault")

        journal.Journal.record = record
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        rc = main([str(a) for a in (*argv, "--rank", rank, "--world-size", size)])
    with open(out, "w") as f:
        json.dump({"rc": rc, "err": stderr.getvalue(), "out": stdout.getvalue()}, f)
    os._exit(0)


def run_ranks(tmp_path, size, argv, fault=None, timeout=120, stdout=False, extra=None):
    """Run ``shardconv ARGV`` on ``size`` forked ranks; returns [(exit status, stderr)] by rank
    (exit status None: the rank died without reporting), with ``stdout``: (exit status, stderr, stdout).
    ``extra``: rank -> more arguments for that rank alone."""
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    outs = [tmp_path / f"rank{r}-{port}.json" for r in range(size)]
    procs = [ctx.Process(target=_rank_main, args=(r, size, port, [str(a) for a in [*argv, *(extra or {}).get(r, ())]],
                                                  outs[r], fault))
             for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
            pytest.fail(f"a rank hung: {[q.exitcode for q in procs]}")
    results = []
    for out in outs:
        if out.exists():
            data = json.loads(out.read_text())
            results.append((data["rc"], data["err"], data["out"]) if stdout else (data["rc"], data["err"]))
        else:
            results.append((None, "", "") if stdout else (None, ""))
    return results


def output(path):
    return {k: v for k, v in tree_digest(path).items() if not k.startswith(".shardconv-journal")}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "src"
    write_checkpoint(path, family="llama", weights="structured", num_layers=4, shard_size=300_000, seed=3)
    return path


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("dist-ref") / "out"
    rc, err = run_cli("convert", src, dst, *ARGS)  # also imports everything the forked ranks need
    assert rc == 0, err
    assert len(list(dst.glob("model-*.safetensors"))) >= 6
    return output(dst)


def test_assignment_is_largest_first_onto_the_least_loaded_rank():
    assert ranks.assign([5, 9, 5, 1, 9], 2) == [{1, 0, 3}, {4, 2}]
    assert ranks.assign([5, 9, 5, 1, 9], 3) == [{1, 3}, {4}, {0, 2}]
    assert ranks.assign([5, 9, 5, 1, 9], 2, skip={1}) == [{4, 3}, {0, 2}]
    assert ranks.assign([1, 1], 4) == [{0}, {1}, set(), set()]


@pytest.mark.parametrize("size", [2, 3])
def test_ranks_write_the_bytes_of_one_process(src, reference, tmp_path, size):
    dst = tmp_path / "out"
    results = run_ranks(tmp_path, size, ["convert", src, dst, *ARGS])
    assert [rc for rc, _ in results] == [0] * size, results
    assert output(dst) == reference
    assert not journal.rank_journals(dst)
    log = journal.Journal.read(dst)
    assert log["complete"] and sorted(log["shards"]) == sorted(k for k in reference if k.startswith("model-"))
    assert run_cli("verify", dst)[0] == 0


def _inodes(dst):
    return {p.name: p.stat().st_ino for p in dst.glob("model-*.safetensors")}


def test_a_failing_rank_stops_every_rank_and_the_same_command_resumes(src, reference, tmp_path):
    dst = tmp_path / "out"
    argv = ["convert", src, dst, *ARGS]
    results = run_ranks(tmp_path, 3, argv, fault=(1, "raise"))
    for rc, err in results:
        assert rc == 2, results
        assert err.startswith("shardconv: error: rank 1 of 3 failed converting its shards") and err.count("\n") == 1, err
        assert "injected fault" in err, err
    assert not (dst / INDEX).exists()
    recorded = journal.Journal.read(dst)["shards"]
    assert recorded and recorded == journal.fold_ranks(dst, journal.Journal.read(dst))["shards"]  # every rank's, by rank 0
    kept = {name: ino for name, ino in _inodes(dst).items() if name in recorded}
    results = run_ranks(tmp_path, 3, argv)
    assert [rc for rc, _ in results] == [0, 0, 0], results
    assert output(dst) == reference
    assert {name: ino for name, ino in _inodes(dst).items() if name in kept} == kept  # kept, not rewritten


def test_a_killed_rank_stops_the_others_and_any_world_size_resumes(src, reference, tmp_path):
    dst = tmp_path / "out"
    results = run_ranks(tmp_path, 3, ["convert", src, dst, *ARGS], fault=(2, "kill"))
    assert results[2][0] is None  # died without a word
    for rc, err in results[:2]:
        assert rc == 2 and err.count("\n") == 1, results
        assert "lost the other ranks" in err or "rank 2 of 3" in err, err
    assert not (dst / INDEX).exists()
    # the killed rank's finished shard is in its own journal, or folded into rank 0's
    recorded = set(journal.fold_ranks(dst, journal.Journal.read(dst))["shards"])
    kept = {name: ino for name, ino in _inodes(dst).items() if name in recorded}
    assert kept
    results = run_ranks(tmp_path, 2, ["convert", src, dst, *ARGS])  # another world size
    assert [rc for rc, _ in results] == [0, 0], results
    assert output(dst) == reference
    assert {name: ino for name, ino in _inodes(dst).items() if name in kept} == kept
    assert not journal.rank_journals(dst)


def test_one_process_resumes_what_ranks_left(src, reference, tmp_path):
    dst = tmp_path / "out"
    results = run_ranks(tmp_path, 2, ["convert", src, dst, *ARGS], fault=(0, "kill"))  # rank 0 dies: no fold
    assert results[0][0] is None and results[1][0] == 2, results
    (rank1,) = journal.rank_journals(dst)  # rank 1's shards are in its own journal only
    recorded = set(json.loads(rank1.read_text())["shards"]) - set(journal.Journal.read(dst)["shards"])
    kept = {name: ino for name, ino in _inodes(dst).items() if name in recorded}
    assert kept
    rc, err = run_cli("convert", src, dst, *ARGS)
    assert rc == 0, err
    assert output(dst) == reference
    assert {name: ino for name, ino in _inodes(dst).items() if name in kept} == kept


def test_a_second_job_on_the_same_dst_is_refused_by_every_rank(src, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    lock = DstLock(dst).acquire()  # a first job's rank 0
    try:
        results = run_ranks(tmp_path, 2, ["convert", src, dst, *ARGS])
    finally:
        lock.release()
    for rc, err in results:
        assert rc == 2 and err.count("\n") == 1, results
        assert "rank 0 of 2 failed to prepare DST" in err and "another shardconv run is writing here" in err, err
    assert not list(dst.glob("*.safetensors"))


def two_ranks(tmp_path, argvs) -> list[dict]:
    """Run rank 0 and rank 1 with their own command lines; their exit codes and stderr."""
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    outs = [tmp_path / f"r{r}.json" for r in range(2)]
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, [str(a) for a in argv], outs[r], None))
             for r, argv in enumerate(argvs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return [json.loads(out.read_text()) for out in outs]


def test_ranks_that_plan_differently_are_refused(src, tmp_path):
    dst = tmp_path / "out"
    argv = ["convert", src, dst, *ARGS]
    # rank 1 asks for other shards than rank 0
    for data in two_ranks(tmp_path, [argv, [*argv, "--max-shard-size", "200KB"]]):
        assert data["rc"] == 2 and "rank 1 plans another conversion than rank 0" in data["err"], data
    assert not dst.exists() or not list(dst.glob("*.safetensors"))


def test_world_size_options_are_checked(src, tmp_path):
    rc, err = run_cli("convert", src, tmp_path / "o", *ARGS, "--rank", "2", "--world-size", "2")
    assert rc == 2 and "--rank 2: must be in 0..1" in err, err
    env = {k: os.environ.pop(k) for k in ("MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    try:
        rc, err = run_cli("convert", src, tmp_path / "o", *ARGS, "--rank", "0", "--world-size", "2")
    finally:
        os.environ.update(env)
    assert rc == 2 and "needs MASTER_ADDR and MASTER_PORT" in err, err


def test_a_rank_whose_copy_of_src_differs_is_refused(src, tmp_path):
    """SRC may be a copy per node; a copy with other bytes (same shapes: the same plan) is refused."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    shard = sorted(copy.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-2:] = bytes([data[-2] ^ 0x40, data[-1]])  # the last bf16 value changes (the samples cover the end)
    shard.write_bytes(bytes(data))
    dst = tmp_path / "out"
    for data in two_ranks(tmp_path, [("convert", s, dst, *ARGS) for s in (src, copy)]):
        assert data["rc"] == 2 and f"rank 1 reads another {shard.name} than rank 0" in data["err"], data
    assert not dst.exists() or not list(dst.glob("*.safetensors"))


def test_rank_0_writes_no_index_unless_every_shard_is_recorded_and_on_disk(src, reference, tmp_path):
    dst = tmp_path / "out"
    results = run_ranks(tmp_path, 2, ["convert", src, dst, *ARGS], fault=(1, "skip"))
    for rc, err in results:
        assert rc == 2 and err.count("\n") == 1, results
        assert "rank 0 of 2 failed to finish DST" in err or "rank 0 of 2 failed:" in err, err
        assert "not written by rank 1 of 2" in err, err
    assert not (dst / INDEX).exists()
    assert [rc for rc, _ in run_ranks(tmp_path, 2, ["convert", src, dst, *ARGS])] == [0, 0]
    assert output(dst) == reference


def test_a_rank_of_an_earlier_run_still_writing_is_refused(src, reference, tmp_path):
    """Its rank 0 died, it did not: its shards could replace the new run's after they are recorded."""
    dst = tmp_path / "out"
    results = run_ranks(tmp_path, 2, ["convert", src, dst, *ARGS], fault=(1, "raise"))
    assert [rc for rc, _ in results] == [2, 2]
    assert not list(dst.glob(".shardconv.lock*"))  # the ranks' locks went with them
    zombie = DstLock(dst, RANK_LOCK.format(1)).acquire()
    try:
        results = run_ranks(tmp_path, 2, ["convert", src, dst, *ARGS])
    finally:
        zombie.release()
    for rc, err in results:
        assert rc == 2 and "a rank of an earlier run is still writing here" in err and err.count("\n") == 1, results
    assert [rc for rc, _ in run_ranks(tmp_path, 2, ["convert", src, dst, *ARGS])] == [0, 0]
    assert output(dst) == reference
    assert not list(dst.glob(".shardconv.lock*"))


@pytest.mark.parametrize("extra", [(), ("--overwrite",)])
def test_a_one_process_run_is_refused_while_a_rank_of_an_earlier_run_writes(src, reference, tmp_path, extra):
    """Not only a distributed run: a one-process re-run (or --overwrite) into that DST would prune the
    rank's lock and record shards the rank may still replace."""
    dst = tmp_path / "out"
    assert run_cli("convert", src, dst, *ARGS)[0] == 0
    zombie = DstLock(dst, RANK_LOCK.format(1)).acquire()
    before = output(dst)
    try:
        rc, err = run_cli("convert", src, dst, *ARGS, *extra)
        assert rc == 2 and "a rank of an earlier run is still writing here" in err and err.count("\n") == 1, err
        assert (dst / RANK_LOCK.format(1)).exists() and output(dst) == before
    finally:
        zombie.release()
    assert run_cli("convert", src, dst, *ARGS, *extra)[0] == 0 and output(dst) == reference


def test_the_journal_promises_flushed_shards_only_when_every_rank_flushed(src, reference, tmp_path):
    """--fsync on rank 0 alone: the other rank's shards were not flushed, so the journal must not say
    ``synced`` (a resume would then trust them without re-hashing, even after a power loss); with
    --fsync on every rank it does."""
    for name, extra, synced in (("some", {0: ["--fsync"]}, False), ("all", {0: ["--fsync"], 1: ["--fsync"]}, True)):
        dst = tmp_path / name
        assert [rc for rc, _ in run_ranks(tmp_path, 2, ["convert", src, dst, *ARGS], extra=extra)] == [0, 0]
        doc = json.loads((dst / journal.NAME).read_text())
        assert doc["synced"] is synced and len(doc["shards"]) > 1, doc
        assert output(dst) == reference



def _api_rank(rank, size, port, src, dst, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from shardconv import api

    result = api.convert(src, dst, device="cpu", threads=1, max_shard_size="150KB", rank=rank, world_size=size)
    with open(out, "w") as f:
        json.dump({"requantized": result.requantized_blocks, "mxfp4": result.mxfp4_blocks}, f)
    os._exit(0)


def test_no_rank_claims_a_count_of_requantized_mxfp4_blocks_it_did_not_gather(tmp_path):
    """The ranks' requantized-block counts are not gathered, so no rank's result gives one (a rank
    other than 0 said 0 of N blocks, whatever its share requantized)."""
    from shardconv.synth_mxfp4 import write_mxfp4_checkpoint

    src = write_mxfp4_checkpoint(tmp_path / "gptoss", num_layers=2, shard_size=200_000)
    ctx, port = multiprocessing.get_context("fork"), free_port()
    outs = [tmp_path / f"r{r}.json" for r in range(2)]
    procs = [ctx.Process(target=_api_rank, args=(r, 2, port, src, tmp_path / "dst", outs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    got = [json.loads(o.read_text()) for o in outs]
    assert all(g["mxfp4"] > 0 for g in got)  # the cast ran on both
    assert [g["requantized"] for g in got] == [None, None]
