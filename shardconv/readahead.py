"""Reading input into the page cache ahead of the pipeline's readers.

Two uses: :func:`start`, while shardconv itself starts, and :class:`Prefetcher` (``--prefetch``), a
window ahead of the readers during the conversion.

Importing torch, starting CUDA and planning take seconds (5-25 s on the H200 machine, README
Performance) in which the disk would idle. :func:`start`, the command line's first act, reads on a
background thread the input in the order the pipeline will read it (planning.py: shards in name order,
each front to back), so that the readers find it in the page cache, and keeps a window ahead of
them (:meth:`ReadAhead.reached`) to the last byte: the disk does not idle once the cached start
runs out either. It imports nothing heavy and reads only the index and file sizes; anything
unexpected makes it do nothing (the conversion reports real problems itself).

Why it reads (:func:`warm`) rather than hint with ``POSIX_FADV_WILLNEED``: Linux caps each
WILLNEED call at the device's read-ahead window (``force_page_cache_ra``), so a 64 MiB hint loads
8 MiB where read_ahead_kb is 8192 (seen with ``fincore`` on the development VM); and hints in
window-sized steps queue the whole budget at once, ahead of the libraries torch is loading.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .files import INDEX_NAME, indexed_shard_names, stays_inside, unindexed_shards
from .profile import process_age

MAX_AUTO = 32 * 2**30
PIECE = 64 * 2**20  # read in pieces, so the budget ends within a file
SCRATCH = 8 * 2**20  # bytes per read


def auto_budget() -> int:
    """How much to read ahead when not told: 1/4 of the memory available now, at most 32 GiB.

    Page cache, not process memory, and each byte is consumed soon after. With 1/8 and at most 8 GiB,
    the H200 machine's disk (1.5-1.9 GB/s) filled the window ~5 s into a cold 70B slice's 9-12 s
    start-up (the helper's transformers import, linears_helper.py) and then idled; 32 GiB covers a
    start-up of ~15 s at that speed.
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return min(MAX_AUTO, int(line.split()[1]) * 1024 // 4)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def input_files(src: Path) -> list[Path]:
    """The shard files in the order the pipeline reads them (files.py's rules, as source.py uses);
    names that leave SRC are skipped here (source.py refuses them)."""
    index = src / INDEX_NAME
    if index.is_file():
        names = indexed_shard_names(json.loads(index.read_text())["weight_map"].values())
        return [src / n for n in names if stays_inside(n)]
    return unindexed_shards(src)


def warm(fd: int, offset: int, nbytes: int, scratch: memoryview) -> int:
    """Read bytes [offset, offset + nbytes) of ``fd`` through ``scratch`` and drop them: they stay in
    the page cache. Returns the bytes read (fewer at the end of the file)."""
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [scratch[: nbytes - done]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def warm_range(path: Path, offset: int, nbytes: int, scratch: memoryview) -> None:
    """:func:`warm` on a file by name; a file that cannot be read is left to the readers to report."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        warm(fd, offset, nbytes, scratch)
    except OSError:
        pass
    finally:
        os.close(fd)


class Prefetcher:
    """Keeps the page cache filling ``window`` bytes ahead of the readers (``--prefetch``).

    The host buffer pools bound what shardconv itself holds; without this the disk idles whenever
    every buffer is in use. ``steps`` are the pipeline's units in order, each the byte ranges it
    reads (objects with ``path``, ``offset`` and ``nbytes``: plan.Unit.inputs); one background thread
    reads them ahead, in that order.
    """

    def __init__(self, steps: list[list], window: int):
        self.steps, self.window = steps, window
        self.sizes = [sum(r.nbytes for r in step) for step in steps]
        self.queued = 0  # steps [0, queued) have been handed to the thread
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="shardconv-prefetch") if window > 0 else None
        self.scratch = memoryview(bytearray(SCRATCH)) if window > 0 else None  # the one thread's

    def ahead_of(self, current: int) -> None:
        """Read steps from ``current`` on until ``window`` bytes are covered."""
        if self.pool is None:
            return
        self.queued = max(self.queued, current)
        ahead = sum(self.sizes[current : self.queued])
        while self.queued < len(self.steps) and ahead < self.window:
            step = self.steps[self.queued]
            self.pool.submit(lambda step=step: [warm_range(r.path, r.offset, r.nbytes, self.scratch) for r in step])
            ahead += self.sizes[self.queued]
            self.queued += 1

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class ReadAhead:
    """The start-up read-ahead: one daemon thread reads SRC's shards front to back, in the pipeline's
    order, at most ``window`` bytes past what the pipeline's readers have reached (:meth:`reached`),
    from process start to the last byte, so the disk never idles between start-up and the readers.

    Positions are bytes into the shards laid end to end (``starts``). Before the pipeline runs, the
    readers are at 0: the first ``window`` bytes are read while torch, CUDA and the plan start.
    :meth:`stop` (the pipeline's end, an error) ends it before its next piece."""

    def __init__(self, files: list[Path], window: int):
        self.files, self.window = files, window
        self.sizes = [_size(f) for f in files]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(files))]  # each file's start in the stream
        self.starts = {str(f): start for f, start in reversed(list(zip(files, self.offsets)))}  # first wins
        self.total = sum(self.sizes)
        self.done = 0  # bytes read ahead (pieces the readers had passed are skipped, not counted)
        self.position = 0  # where the read-ahead is: the stream offset of its next piece
        self.consumed = 0  # how far the pipeline's readers have asked for
        self.first_byte_age: float | None = None  # process age when the first piece was in
        self.stopped = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="shardconv-readahead", daemon=True)
        self.thread.start()

    def reached(self, ranges) -> None:
        """The pipeline's readers have been given ``ranges`` (objects with ``path``, ``offset``,
        ``nbytes``: plan.Unit.inputs): the window moves on to the furthest end among them."""
        ends = [self.starts[str(r.path)] + r.offset + r.nbytes for r in ranges if str(r.path) in self.starts]
        if ends and max(ends) > self.consumed:
            with self.cond:
                self.consumed = max(self.consumed, max(ends))
                self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def _next(self) -> bool:
        """Wait until the window has room; False when stopped or the input is all read."""
        with self.cond:
            while not self.stopped and self.position - self.consumed >= self.window:
                self.cond.wait()
            self.position = max(self.position, self.consumed)  # what the readers passed is theirs
            return not self.stopped and self.position < self.total

    def _run(self) -> None:
        scratch = memoryview(bytearray(SCRATCH))
        for path, start, size in zip(self.files, self.offsets, self.sizes):
            if self.position >= start + size:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                return
            try:
                while self._next() and self.position < start + size:
                    off = self.position - start
                    # the first piece is small, so the profile's first byte is when the disk answered
                    piece = SCRATCH if self.first_byte_age is None else PIECE
                    n = min(piece, size - off, self.consumed + self.window - self.position)
                    got = warm(fd, off, n, scratch)
                    if self.first_byte_age is None and got > 0:
                        self.first_byte_age = process_age()
                    with self.cond:
                        self.done += got
                        self.position += n
                    if got < n:  # the file shrank: the readers will say so
                        return
            except OSError:
                return
            finally:
                os.close(fd)
            if self.stopped:
                return

    def summary(self) -> str:
        """One profile line: when the first byte came, and how far it has read."""
        first = "no input byte read yet" if self.first_byte_age is None else \
            f"first input byte read {self.first_byte_age:.2f} s after process start"
        return (f"start-up read-ahead: {first}; {self.done / 1e9:.2f} GB read ahead, at {self.position / 1e9:.2f} "
                f"of {self.total / 1e9:.2f} GB, readers at {self.consumed / 1e9:.2f} GB, window {self.window / 1e9:.2f} GB")


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


ACTIVE: list[ReadAhead] = []  # the running start-up read-ahead, for the pipeline (CLI runs only)


def active() -> ReadAhead | None:
    return ACTIVE[-1] if ACTIVE else None


def describe() -> str:
    """The running read-ahead's :meth:`ReadAhead.summary`, for ``SHARDCONV_PROFILE``."""
    ra = active()
    return ra.summary() if ra is not None else "start-up read-ahead: none"


def stop() -> None:
    """End the start-up read-ahead (the pipeline has finished, or the run failed)."""
    while ACTIVE:
        ACTIVE.pop().stop()


def start(src: str | None, budget: int | None = None) -> ReadAhead | None:
    """Begin reading SRC's shards ahead of the pipeline, ``budget`` bytes ahead at most (``None``:
    :func:`auto_budget`), and register it as :func:`active`.

    Returns None, doing nothing, where SRC is not a local folder (a hub id, the built-in sample),
    the OS has no ``preadv``, or the index cannot be read.
    """
    if not src or not hasattr(os, "preadv"):
        return None
    budget = auto_budget() if budget is None else budget
    path = Path(src).expanduser()
    if budget <= 0 or not path.is_dir():
        return None
    try:
        files = input_files(path.resolve())  # named as source.py names them: the pipeline's paths
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError):
        return None
    if not files:
        return None
    stop()
    ACTIVE.append(ReadAhead(files, budget))
    return ACTIVE[-1]
