"""Reading input into the page cache ahead of the pipeline's readers.

Two uses: :func:`start`, while shardconv itself starts, and :class:`Prefetcher` (``--prefetch``), a
window ahead of the readers during the conversion.

Importing torch, starting CUDA and planning take seconds (5-7 s on the H200 machine, README
Performance) in which the disk would idle. :func:`start` reads, on a background thread, the first
bytes of the input in the order the pipeline will read them (plan.py: shards in name order, each
front to back), so that the readers find them in the page cache. It imports nothing heavy and reads
only the index and file sizes; anything unexpected makes it do nothing (the conversion reports real
problems itself).

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

MAX_AUTO = 8 * 2**30
PIECE = 64 * 2**20  # read in pieces, so the budget ends within a file
SCRATCH = 8 * 2**20  # bytes per read


def auto_budget() -> int:
    """How much to read ahead when not told: 1/8 of the memory available now, at most 8 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return min(MAX_AUTO, int(line.split()[1]) * 1024 // 8)
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
    """The background thread. A daemon: it never delays the exit, and it reads no further than
    ``budget``, so it needs no stopping (pages the readers already took are read from the cache)."""

    def __init__(self, files: list[Path], budget: int):
        self.files, self.budget = files, budget
        self.done = 0  # bytes read ahead so far
        self.thread = threading.Thread(target=self._run, name="shardconv-readahead", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        scratch = memoryview(bytearray(SCRATCH))
        for path in self.files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                return
            try:
                size = os.fstat(fd).st_size
                for off in range(0, size, PIECE):
                    n = min(PIECE, size - off, self.budget - self.done)
                    if n <= 0:
                        return
                    self.done += warm(fd, off, n, scratch)
            except OSError:
                return
            finally:
                os.close(fd)


def start(src: str | None, budget: int | None = None) -> ReadAhead | None:
    """Begin reading ahead SRC's shards (``budget`` bytes; ``None``: :func:`auto_budget`).

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
        files = input_files(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return ReadAhead(files, budget) if files else None
