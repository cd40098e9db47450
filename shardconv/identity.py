"""Source file identities: what a resume and the end-of-run check compare, so neither trusts mtimes.

``cp -p`` and ``rsync -a`` give a replaced file the old size and mtime, so those prove nothing. A
source shard's identity here is: its size, the SHA-256 of its header bytes, the SHA-256 of
:data:`SAMPLES` pieces of :data:`SAMPLE_BYTES` spread evenly over its data section (the first and
last bytes included), and its inode and ctime. The kernel sets ctime on every write and every
metadata change and no call sets it back, so an in-place rewrite (``cp -p``) changes ctime and a
replacement by rename (``rsync -a``, a hub re-download) changes the inode, whatever the content: a
change that the samples miss is still seen there. Reading the whole source again would be the only
stronger check, and costs as much as reading the input for the conversion (README, Reliability).

Reading cost: the header and ``SAMPLES`` x 64 KiB per shard, at the start of every run and again
before the index is written (2.1 MiB per shard: 450 MB for 1 TB in 5 GB shards).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import SourceError
from .threads import io_threads

SAMPLES = 32  # evenly spread pieces, besides the first and the last
SAMPLE_BYTES = 64 * 2**10
COMPARED = ("size", "header", "sample", "ino", "ctime_ns")  # what a resume compares (not dev: it may change on reboot)


@dataclass(frozen=True)
class FileIdentity:
    """One source file as the run found it."""

    name: str  # relative to SRC
    size: int
    header: str  # SHA-256 of the 8-byte length and the header JSON
    sample: str  # SHA-256 of the sampled pieces of the data section
    ino: int
    ctime_ns: int
    mtime_ns: int
    dev: int

    def to_json(self) -> dict:
        return asdict(self)

    def differs(self, other: dict | None, keys=COMPARED) -> str | None:
        """The first field of ``keys`` that differs from ``other`` (a recorded identity), or None."""
        if not isinstance(other, dict):
            return "not recorded"
        mine = self.to_json()
        return next((k for k in keys if other.get(k) != mine[k]), None)


def sample_offsets(data_start: int, size: int) -> list[int]:
    """Start of each sampled piece: the first and last :data:`SAMPLE_BYTES` of the data section and
    :data:`SAMPLES` more, evenly spread between them (a function of the sizes alone)."""
    span = size - data_start
    if span <= SAMPLE_BYTES:
        return [data_start] if span > 0 else []
    last = size - SAMPLE_BYTES
    points = {data_start + (last - data_start) * i // (SAMPLES + 1) for i in range(SAMPLES + 2)}
    return sorted(points)


def _stat_key(st: os.stat_result) -> tuple:
    return st.st_size, st.st_ino, st.st_dev, st.st_ctime_ns, st.st_mtime_ns


def _planned_header(infos) -> dict:
    return {t.name: (t.dtype, list(t.shape), t.offset, t.nbytes) for t in infos}


def identify(path: Path, root: Path, planned=None) -> FileIdentity:
    """Read ``path``'s identity; with ``planned`` (the TensorInfos read from it at planning time),
    refuse a header that no longer says what the plan was made from."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        before = os.fstat(fd)
        head = os.pread(fd, 8, 0)
        hlen = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        raw = os.pread(fd, hlen, 8) if 0 <= hlen <= before.st_size - 8 else b""
        if hlen < 0 or len(raw) != hlen:
            raise SourceError(f"{path}: changed during the conversion (its header is gone)")
        if planned is not None and _parsed_header(raw, 8 + hlen) != _planned_header(planned):
            raise SourceError(f"{path}: changed during the conversion (its header differs from the planned one)")
        sample = hashlib.sha256()
        for pos in sample_offsets(8 + hlen, before.st_size):
            sample.update(os.pread(fd, SAMPLE_BYTES, pos))
        after = os.fstat(fd)
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if _stat_key(before) != _stat_key(after):
        raise SourceError(f"{path}: changed during the conversion (written while its samples were read)")
    name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    return FileIdentity(name, after.st_size, hashlib.sha256(head + raw).hexdigest(), sample.hexdigest(),
                        after.st_ino, after.st_ctime_ns, after.st_mtime_ns, after.st_dev)


def _parsed_header(raw: bytes, data_start: int) -> dict | None:
    try:
        header = json.loads(raw)
        header.pop("__metadata__", None)
        return {name: (e["dtype"], list(e["shape"]), data_start + e["data_offsets"][0],
                       e["data_offsets"][1] - e["data_offsets"][0]) for name, e in header.items()}
    except Exception:
        return None


def identify_source(source, threads: int | None = None) -> list[FileIdentity]:
    """Every source shard's identity, read on ``threads`` threads (small random reads; default: the
    reader count, threads.io_threads)."""
    planned: dict[Path, list] = {p: [] for p in source.shards}
    for t in source.tensors.values():
        planned.setdefault(t.path, []).append(t)
    with ThreadPoolExecutor(max(1, threads or io_threads()[0])) as pool:
        return list(pool.map(lambda p: identify(p, source.root, planned[p]), source.shards))


def check_unchanged(source, start: list[FileIdentity]) -> None:
    """Before the index is written: every source shard still is what the run started from (all of
    :class:`FileIdentity`'s fields), or the run fails naming the first one that changed."""
    for old, new in zip(start, identify_source(source)):
        what = new.differs(old.to_json(), keys=("size", "header", "sample", "ino", "dev", "ctime_ns", "mtime_ns"))
        if what is not None:
            raise SourceError(f"{source.root / old.name}: changed during the conversion ({what} differs); "
                                 "the index was not written: run the same command again to convert it anew")


def changed_since(recorded: list | None, now: list[FileIdentity]) -> dict[str, str]:
    """Source files (by name) whose identity differs from a journal's record, and the first field
    that differs; every file when the record is missing or of another form."""
    old = {d.get("name"): d for d in recorded or [] if isinstance(d, dict)}
    return {f.name: what for f in now if (what := f.differs(old.get(f.name))) is not None}


def dependent_shards(plan, names: set[str]) -> set[int]:
    """Output shards holding anything read from the source files ``names``."""
    root = plan.source.root
    paths = {root / n for n in names} | {Path(n) for n in names}
    return {u.shard for u in plan.units if any(t.path in paths for t in u.inputs)}


def read_whole(path: Path, loader):
    """``loader(path)`` and the SHA-256 of the whole file, refusing a file written meanwhile.

    For inputs read whole (the amax file): their content, not their mtime, goes into the run's
    fingerprint, so a resume never reuses shards made with other scales.
    """
    try:
        before = _stat_key(os.stat(path))
    except OSError as e:
        loader(path)  # it says what is wrong with the file, in its words
        raise SourceError(f"{path}: cannot read: {e.strerror or e}") from None
    value = loader(path)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(16 * 2**20):
                h.update(chunk)
        after = _stat_key(os.stat(path))
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror or e}") from None
    if before != after:
        raise SourceError(f"{path}: changed while it was read; run again once it is complete")
    return value, {"size": after[0], "sha256": h.hexdigest()}
