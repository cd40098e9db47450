"""Start reading the input while shardconv itself starts.

Importing torch, starting CUDA and planning take seconds (3.5-5.5 s on the H200 machine, README
Performance) in which the disk would idle. :func:`start` asks the kernel, from a background thread,
to read the first bytes of the input into the page cache (``POSIX_FADV_WILLNEED``), in the order
the pipeline will read them (plan.py: shards in name order, each front to back), so the readers
find them there. It imports nothing heavy and reads only the index and file sizes; anything
unexpected makes it do nothing (the conversion reports real problems itself).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_AUTO = 8 * 2**30
PIECE = 64 * 2**20  # hinted in pieces, so the thread stops soon after being told to


def auto_budget() -> int:
    """How much to read ahead when not told: 1/8 of the memory available now, at most 8 GiB."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return min(MAX_AUTO, int(line.split()[1]) * 1024 // 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def input_files(src: Path) -> list[Path]:
    """The shard files in the order the pipeline reads them (source.open_source's order)."""
    index = src / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [src / n for n in sorted({os.path.normpath(s) for s in weight_map.values()})]
    if (src / SINGLE_NAME).is_file():
        return [src / SINGLE_NAME]
    return sorted(p for p in src.glob("*.safetensors") if p.is_file())


class ReadAhead:
    """The background thread; :meth:`stop` ends it after the piece in progress."""

    def __init__(self, files: list[Path], budget: int):
        self.files, self.budget = files, budget
        self.hinted = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="shardconv-readahead", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for path in self.files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                return
            try:
                size = os.fstat(fd).st_size
                for off in range(0, size, PIECE):
                    n = min(PIECE, size - off, self.budget - self.hinted)
                    if n <= 0 or self.stopped.is_set():
                        return
                    os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
                    self.hinted += n
            except OSError:
                return
            finally:
                os.close(fd)

    def stop(self) -> None:
        self.stopped.set()


def start(src: str | None, budget: int | None = None) -> ReadAhead | None:
    """Begin reading ahead SRC's shards (``budget`` bytes; ``None``: :func:`auto_budget`).

    Returns None, doing nothing, where SRC is not a local folder (a hub id, the built-in sample),
    the OS has no ``posix_fadvise``, or the index cannot be read.
    """
    if not src or not hasattr(os, "posix_fadvise"):
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
