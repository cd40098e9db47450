"""One conversion on many processes (``torchrun``, Slurm, or ``--rank/--world-size``).

Why this shape: shardconv already streams one output shard at a time, and the plan (built from
headers alone) fixes every shard's name, tensors and offsets. So the work unit of a rank is an
OUTPUT SHARD: every rank builds the same plan, :func:`assign` gives each shard to one rank (largest
input first onto the least-loaded rank, ties by shard index), and each rank reads only the inputs of
its shards and writes only them. The output is the same bytes for any number of ranks; only the
journal's history differs. No tensor crosses ranks: a fusion group never spans units, and a unit
never spans shards, so the numbers need no collective. The few messages (the plan's fingerprint,
which shards to skip, each rank's result) are Python objects over gloo, CPU-only, even with GPUs.
The ranks themselves, their gloo group and the assignment rule are ranks.py's.

Decisions:

* **DST lock**: rank 0 alone takes ``DST/.shardconv.lock`` (flock) for the whole job, before any rank
  writes, and holds it until the index is written; the other ranks never take that lock, so they
  cannot refuse each other, and a second job is refused by its rank 0 (and all its ranks stop with
  that line). Each other rank holds its own ``.shardconv.lock.rank-R`` while it writes, so that no
  later run, of one process or many, takes DST over while it still writes
  (destination.no_rank_still_writing).
  On a file system without working ``flock`` across nodes (some NFS setups) two jobs on different
  nodes are not kept apart.
* **Journal**: rank 0 writes DST's journal (journal.py) as in one process. Each other rank records the
  shards it finishes, with their digests, in ``.shardconv-journal.rank-R.json``, so a rank killed
  mid-run keeps its finished shards. When every rank has reported (an ``all_gather`` of results over
  gloo), rank 0 checks each recorded shard is there with its planned size, records them in the
  journal, removes the rank files, and only then copies SRC's other files, writes the configs and,
  last, the index. A later run, of any world size or of one process, folds the rank files of a failed
  run into the journal before it decides what to keep (``journal.fold_ranks``).
* **Failure**: every step that can fail on one rank ends in an ``all_gather`` of a status (planning,
  DST preparation on rank 0, each rank's shards, rank 0's finishing), so every rank stops with one
  line naming the first failed rank and its cause (:class:`RankError`). A crashed process closes its
  connections: the others' collective fails at once (torchrun also stops them). A hung one is seen
  only after ``SHARDCONV_DIST_TIMEOUT`` seconds (default 7 days: a rank may convert for hours while
  another, done, waits); ranks that do not all start within 10 minutes stop.
* **Resume**: which shards are kept is decided by rank 0 (with the lock) and broadcast; the remaining
  ones are assigned afresh, so a re-run with another world size works and balances what is left.
"""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .destination import RANK_LOCK, DstLock
from .errors import OptionError
from .ranks import RankError, World, assign, cause



def shard_bytes(plan) -> list[int]:
    """Input bytes each output shard is made from."""
    out = [0] * len(plan.shard_names)
    for u in plan.units:
        out[u.shard] += u.in_bytes
    return out


@dataclass
class _Result:
    """What a rank reports after its shards: what it recorded (even when it failed), or its error."""

    shards: dict[str, str]
    converted: int
    error: str | None = None
    synced: bool = False  # its shards were fsync'ed before being recorded (--fsync on that rank)


class Team:
    """Rank 0's side, called by conversion.py with DST locked: share the shards out, run its own,
    collect the others'. Every rank passes the same collectives in the same order:
    plan (api.py), go (:meth:`share`), results (:meth:`run`), finish (:func:`convert`)."""

    def __init__(self, world: World, plan):
        self.world, self.plan = world, plan
        self.bytes = shard_bytes(plan)
        self.shares: list[set[int]] | None = None
        self.step = "go"  # the collective the other ranks wait in

    def share(self, kept: set[int], done: bool) -> None:
        self.shares = assign(self.bytes, self.world.size, set(kept) if not done else set(range(len(self.bytes))))
        self.world.gather({"kept": sorted(kept), "done": done})
        self.step = "results"

    def not_mine(self, kept: set[int]) -> set[int]:
        return set(range(len(self.bytes))) - self.shares[0]

    def run(self, make_converter, log) -> None:
        """Convert rank 0's shards (``make_converter()``: a pipeline.Converter, or None when nothing is
        left), then wait for every rank's; record theirs in the journal."""
        from . import journal

        error, converter = None, None
        try:
            converter = make_converter()
            if converter is not None:
                converter.run()
        except BaseException as e:  # noqa: BLE001 - reported to the other ranks, then raised
            error = e
            if converter is not None:
                converter.shards.abort()
        mine = _Result(dict(log.shards), 0, None if error is None else cause(error))
        try:
            results = self.world.gather(mine)
        except RankError:
            self.step = None
            self._fold(log, None)  # a crashed rank's finished shards, from its journal file
            raise
        self.step = None
        self._fold(log, results)
        self.world.check([r.error for r in results], "converting its shards", error)
        self.step = "finish"  # the other ranks now wait for rank 0's last word
        self._check_recorded(log, results)
        for path in journal.rank_journals(log.path.parent):
            path.unlink(missing_ok=True)

    def _fold(self, log, results) -> None:
        """Record the other ranks' finished shards in the journal (a failed run keeps them too)."""
        from . import journal
        from .digest import DESCRIPTION

        shards = {}
        if results is None:
            folded = journal.fold_ranks(log.path.parent, {"fingerprint": log.fingerprint, "digest": DESCRIPTION,
                                                          "shards": {}})
            shards = folded["shards"] if folded else {}
        else:
            for r in results[1:]:
                shards.update(r.shards)
            if any(r.shards and not r.synced for r in results[1:]):
                log.synced = False  # the journal promises flushed shards only if every rank flushed its own
        shards = {k: v for k, v in shards.items() if k not in log.shards}
        if shards:
            with log.lock:
                log.shards.update(shards)
                log.save()

    def _check_recorded(self, log, results) -> None:
        """Every planned shard is recorded and on disk with its planned size, or no index."""
        from .errors import DestinationError
        from .shard_writer import file_size

        dst = log.path.parent
        for i, (name, tensors) in enumerate(zip(self.plan.shard_names, self.plan.shard_tensors)):
            path = dst / name
            if name not in log.shards or _opened_size(path) != file_size(tensors):
                owner = next((r for r, s in enumerate(self.shares) if i in s), None)
                raise DestinationError(f"{path}: not written by rank {owner} of {self.world.size} (missing from its "
                                       "journal or on disk); run the same command again to resume")


def _opened_size(path: Path) -> int | None:
    """The size of a file another node wrote, from an open file (NFS revalidates on open, not on stat)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        return st.st_size if stat.S_ISREG(st.st_mode) else None
    finally:
        os.close(fd)


def convert(world: World, plan, dst: Path, *, fmt, opts, overwrite: bool, fingerprint_extra: dict,
            max_extra_size: int):
    """Rank ``world.rank``'s part of one conversion; returns conversion.Summary (rank 0: the whole
    run's; another rank: its own shards'). Raises :class:`RankError` on every rank if any failed."""
    from . import conversion, journal

    world.agree("to plan the same conversion", lambda: _same_plan(world, plan, fingerprint_extra))
    if world.rank == 0:
        team = Team(world, plan)
        error = None
        try:
            summary = conversion.convert(plan, dst, fmt=fmt, opts=opts, overwrite=overwrite,
                                         fingerprint_extra=fingerprint_extra, max_extra_size=max_extra_size, team=team)
        except BaseException as e:  # noqa: BLE001
            error = e
        if team.step == "go":  # failed before any rank started (DST refused, locked by another job, ...)
            world.gather(cause(error))
            raise RankError(f"rank 0 of {world.size} failed to prepare DST: {cause(error)}") from error
        if team.step == "finish":  # every shard written: the others wait for rank 0's configs and index
            world.gather(None if error is None else cause(error))
        if error is not None:
            if isinstance(error, RankError):
                raise error
            raise RankError(f"rank 0 of {world.size} failed: {cause(error)}") from error
        return summary
    return _follow(world, plan, Path(dst), fmt, opts, journal.fingerprint(plan, fingerprint_extra))


def _same_plan(world: World, plan, fingerprint_extra: dict) -> None:
    """Every rank must plan the very same output from the same bytes: same options and version, and
    SRC's shards (one folder on a shared file system, or a copy per node) with the same sizes,
    headers and sampled content (identity.py; inode and times differ between copies and are not
    compared)."""
    from . import identity, journal

    files = [(f.name, f.size, f.header, f.sample) for f in identity.identify_source(plan.source)]
    mine = (journal.fingerprint(plan, fingerprint_extra), files)
    seen = world.gather(mine)
    other = next((r for r, f in enumerate(seen) if f[0] != seen[0][0]), None)
    if other is not None:
        raise OptionError(f"rank {other} plans another conversion than rank 0 (its SRC, options or shardconv "
                          "version differ)")
    for r, (_, theirs) in enumerate(seen):
        for a, b in zip(seen[0][1], theirs):
            if a != b:
                raise OptionError(f"rank {r} reads another {a[0]} than rank 0 (size, header or content differ): "
                                  "every rank must see the same SRC")


def _follow(world: World, plan, dst: Path, fmt, opts, run: str):
    from . import conversion, journal
    from .pipeline import Converter

    go = world.gather(None)[0]
    if isinstance(go, str):
        raise RankError(f"rank 0 of {world.size} failed to prepare DST: {go}")
    kept, done = set(go["kept"]), go["done"]
    shares = assign(shard_bytes(plan), world.size, kept if not done else set(range(len(plan.shard_names))))
    mine = shares[world.rank]
    log = journal.Journal(dst, run, synced=opts.fsync)
    log.path = Path(dst) / journal.rank_name(world.rank)
    start = time.perf_counter()
    error, converter = None, None
    lock = DstLock(dst, RANK_LOCK.format(world.rank))  # held while this rank writes: see destination.no_rank_still_writing
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, conversion._raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        lock.acquire()
        if mine:
            converter = Converter(plan, dst, fmt, opts, log, set(range(len(plan.shard_names))) - mine)
            converter.run()
    except BaseException as e:  # noqa: BLE001 - reported to every rank, then raised
        error = e
        if converter is not None:
            converter.shards.abort()
    finally:
        lock.release()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    converted = sum(u.in_bytes for u in plan.units if u.shard in mine)
    results = world.gather(_Result(dict(log.shards), converted, None if error is None else cause(error), opts.fsync))
    world.check([r.error for r in results], "converting its shards", error)
    final = world.gather(None)[0]  # rank 0: shards recorded, configs and index written
    if isinstance(final, str):
        raise RankError(f"rank 0 of {world.size} failed to finish DST: {final}")
    return conversion.Summary(
        quantized=sum(len(u.members) for u in plan.units if u.shard in mine),
        kept=sum(1 for u in plan.units if u.copy is not None and u.shard in mine),
        in_bytes=plan.in_bytes, out_bytes=plan.out_bytes, seconds=time.perf_counter() - start,
        shards=len(mine), device=str(opts.device), resumed=len(kept), converted_bytes=converted,
        already_complete=done, requantized=None)  # as rank 0 says: the ranks' counts are not gathered
