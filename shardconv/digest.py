"""Shard digests: a SHA-256 over the SHA-256s of a file's consecutive 64 MiB pieces.

Pieces, not one running SHA-256 over the file, so that they are hashed in parallel and in any order,
as soon as each is written (shard_writer.ShardWriter); a single running hash must wait for the
file's bytes in order and left a whole shard to hash after its last write (README, Performance).
The journal records these digests and ``verify`` and resume recompute them (:func:`shard_digest`).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .threads import io_threads

HASH_PIECE = 64 * 2**20


def combine_digests(digests: list[bytes]) -> str:
    """A shard's digest from its pieces' SHA-256s, in file order."""
    return hashlib.sha256(b"".join(digests)).hexdigest()


_local = threading.local()
READ_BACK = 4 << 20  # bytes per read where the file cannot be mapped


def piece_sha256(fd: int, start: int, end: int, mapped: bool = False) -> bytes:
    """SHA-256 of bytes [start, end) of ``fd``, read through one reused buffer per thread.

    ``mapped``: hashed straight from the page cache through a read-only mapping, about a quarter faster
    than reading into a buffer first (one more pass over every output byte); for the shard a writer
    has just written and holds (shard_writer.ShardWriter) only. A mapped file that shrinks kills the
    process with SIGBUS, not an error naming the file, so files others may change (a resume's or
    ``verify``'s DST) are read. A file that cannot be mapped (some network or FUSE file systems), or a
    ``start`` that is no multiple of the page size, is read too.
    """
    if mapped and end > start:
        try:
            with mmap.mmap(fd, end - start, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), mmap.PROT_READ,
                           offset=start) as view:
                return hashlib.sha256(view).digest()
        except (OSError, ValueError):
            pass
    buf = getattr(_local, "buffer", None)
    if buf is None:
        buf = _local.buffer = memoryview(bytearray(READ_BACK))
    h = hashlib.sha256()
    pos = start
    while pos < end:
        n = os.preadv(fd, [buf[: min(end - pos, READ_BACK)]], pos)
        if not n:
            raise OSError(f"file ended at byte {pos}, expected {end}")
        h.update(buf[:n])
        pos += n
    return h.digest()


def shard_digest(path: Path, threads: int | None = None, piece: int | None = None) -> str:
    """:func:`combine_digests` of a file on disk (what ShardWriter records while writing), read on
    ``threads`` threads (default: the reader count, threads.io_threads)."""
    piece = piece or HASH_PIECE
    threads = threads or io_threads()[0]
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        starts = range(0, max(size, 1), piece)
        with ThreadPoolExecutor(max(1, threads)) as pool:
            return combine_digests(list(pool.map(lambda s: piece_sha256(fd, s, min(s + piece, size)), starts)))
    finally:
        os.close(fd)


DESCRIPTION = f"sha256 of the sha256 of each {HASH_PIECE >> 20} MiB piece"  # written into the journal
