"""Writing an output shard: its header laid out first (every tensor's place planned), then each tensor's
bytes written at its offset, checked finite, hashed in pieces as they complete.

Split from safetensors_io.py, which reads: the writer is the half whose mistakes make a finished-looking
bad file, and it is tested alone (tests/test_shard_writer.py).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .digest import HASH_PIECE, combine_digests, piece_sha256
from .errors import DestinationError
from .files import create_fresh
from .safetensors_io import DTYPE_NAMES, DTYPES, TensorInfo, advise, check_finite_bytes, pread_exact


@dataclass
class PlannedTensor:
    """One tensor of an output shard: name, dtype string, shape, and (once laid out) its offset."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # relative to the data section

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n


def _aligned_in_order(tensors: list[PlannedTensor]) -> bool:
    pos = 0
    for t in tensors:
        if pos % DTYPES[t.dtype][1]:
            return False
        pos += t.nbytes
    return True


def layout(tensors: list[PlannedTensor], metadata: dict[str, str] | None = None) -> bytes:
    """Assign data offsets and return the header bytes (space-padded to a multiple of 8 bytes, as the
    safetensors library writes it).

    Tensors keep their given order (the order the pipeline produces them, so a shard fills roughly
    front to back) when every tensor then lands on a multiple of its element size, as loaders need;
    otherwise widest dtype first, which always aligns.
    """
    order = list(range(len(tensors)))
    if not _aligned_in_order(tensors):
        order.sort(key=lambda i: (-DTYPES[tensors[i].dtype][1], i))
    pos = 0
    for i in order:
        tensors[i].offset = pos
        pos += tensors[i].nbytes
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for i in order:
        t = tensors[i]
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.offset, t.offset + t.nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


SHARD_METADATA = {"format": "pt"}  # the one metadata key output shards carry (FORMAT.md §5)


def file_size(tensors: list[PlannedTensor], metadata: dict[str, str] | None = SHARD_METADATA) -> int:
    """Bytes of a shard holding ``tensors`` as :class:`ShardWriter` writes it."""
    return len(layout(list(tensors), metadata)) + sum(t.nbytes for t in tensors)


# bytes per read/write of a kept tensor: small enough that the bytes read are still in the core's cache
# when they are checked and written (32 MiB pieces went out to memory and back twice)
COPY_PIECE = 4 * 2**20


class ShardWriter:
    """An output shard whose header is known up front; tensors are written at their planned offsets.

    The file is created as ``<name>.partial`` and renamed by :meth:`finish`, so a shard that exists
    under its final name is complete. Its digest (:attr:`digest` after :meth:`finish`, see
    digest.py) is computed while it is written: whichever thread completes a piece hashes
    it (read back from the page cache), so finishing a shard does not re-read it. Safe for concurrent
    writes of different tensors.
    """

    piece = HASH_PIECE

    def __init__(self, path: Path, tensors: list[PlannedTensor], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        header = layout(tensors, metadata)
        self.data_start = len(header)
        self.by_name = {t.name: t for t in tensors}
        self.pending = set(self.by_name)
        self.size = self.data_start + sum(t.nbytes for t in tensors)
        self.digest: str | None = None
        pieces = max(1, -(-self.size // self.piece))
        self._missing = [min(self.piece, self.size - i * self.piece) for i in range(pieces)]  # bytes unwritten
        self._digests: list[bytes | None] = [None] * pieces
        self._lock = threading.Lock()
        self._copying: dict[str, list[int]] = {}  # tensors being copied in pieces
        self.fd = create_fresh(self.partial, os.O_RDWR)  # never through a link planted at that name
        try:
            os.pwrite(self.fd, header, 0)
            os.ftruncate(self.fd, self.size)
        except OSError as e:
            self.abort()
            raise DestinationError(f"{self.partial}: cannot write: {e.strerror or e}") from None
        self._written(0, len(header))

    def _written(self, start: int, end: int) -> None:
        """Record bytes [start, end) as final; hash the pieces this completes."""
        full = []
        with self._lock:
            for i in range(start // self.piece, -(-end // self.piece)):
                p0 = i * self.piece
                self._missing[i] -= min(end, p0 + self.piece) - max(start, p0)
                if self._missing[i] == 0:
                    full.append(i)
        for i in full:
            try:
                digest = piece_sha256(self.fd, i * self.piece, min((i + 1) * self.piece, self.size), mapped=True)
            except OSError as e:
                raise DestinationError(f"{self.partial}: cannot read back what was written: {e}") from None
            self._digests[i] = digest

    def _target(self, name: str, nbytes: int) -> int:
        t = self.by_name[name]
        if name not in self.pending:
            raise RuntimeError(f"{self.path}: tensor {name!r} written twice")
        if nbytes != t.nbytes:
            raise RuntimeError(f"{self.path}: tensor {name!r} has {nbytes} bytes, planned {t.nbytes}")
        self.pending.discard(name)
        return self.data_start + t.offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a CPU tensor (of the planned dtype and shape) at its planned offset."""
        t = self.by_name[name]
        if DTYPE_NAMES.get(tensor.dtype) != t.dtype or tuple(tensor.shape) != t.shape:
            raise RuntimeError(
                f"{self.path}: tensor {name!r} is {tensor.dtype}{tuple(tensor.shape)}, planned {t.dtype}{t.shape}"
            )
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        with self._lock:  # writer threads and copying readers share a shard
            pos = self._target(name, data.numel())
        mv = memoryview(data.numpy()).cast("B")
        self._pwrite_all(mv, pos)
        self._written(pos, pos + data.numel())

    def copy_from(self, name: str, src: TensorInfo, buffer: memoryview | None = None, start: int = 0,
                  stop: int | None = None) -> bool:
        """Copy bytes [start, stop) (default: all) of a tensor from its input file through ``buffer``
        (reused by the caller). Pieces of one tensor may be copied by several threads at once;
        returns True for the call that completed the tensor.

        Large ``pread``/``pwrite`` pieces, not ``copy_file_range``, which was about half as fast from a
        cold cache on the H200 machine (README, Performance).
        """
        stop = src.nbytes if stop is None else stop
        size = DTYPES[src.dtype][1] if src.dtype in DTYPES else 1
        if start % size or (stop % size and stop != src.nbytes) or (buffer is not None and len(buffer) < size):
            # an element split between pieces would be checked for NaN/Inf by neither
            raise RuntimeError(f"{self.path}: tensor {name!r}: copy piece [{start}, {stop}) or its buffer is not "
                               f"whole {size}-byte elements")
        with self._lock:
            if name not in self._copying:
                self._copying[name] = [self._target(name, src.nbytes), src.nbytes]  # [file position, bytes left]
            pos = self._copying[name][0] + start
        mv = buffer if buffer is not None else memoryview(bytearray(max(min(stop - start, COPY_PIECE), size)))
        mv = mv[: len(mv) // size * size]  # pieces of whole elements, so each is checked for NaN/Inf whole
        fd = os.open(src.path, os.O_RDONLY)
        advise(fd, src.offset + start, stop - start)
        try:
            for piece in range(start, stop, len(mv)):
                n = min(len(mv), stop - piece)
                pread_exact(fd, src, mv[:n], piece)
                check_finite_bytes(src, mv[:n], piece)
                self._pwrite_all(mv[:n], pos)
                self._written(pos, pos + n)
                pos += n
        finally:
            os.close(fd)
        with self._lock:
            self._copying[name][1] -= stop - start
            return self._copying[name][1] == 0

    def _pwrite_all(self, mv: memoryview, pos: int) -> None:
        try:
            while len(mv):
                n = os.pwrite(self.fd, mv, pos)
                mv, pos = mv[n:], pos + n
        except OSError as e:
            raise DestinationError(f"{self.partial}: write failed: {e.strerror or e}") from None

    def finish(self, sync: bool = False) -> None:
        """Rename to the final name; with ``sync``, flush to the disk first (survives a power loss)."""
        if self.pending:
            raise RuntimeError(f"{self.path}: tensors never written: {sorted(self.pending)[:5]}")
        if any(d is None for d in self._digests):
            raise RuntimeError(f"{self.path}: pieces left unhashed: {self._missing}")
        self.digest = combine_digests(self._digests)
        if sync:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.partial.unlink(missing_ok=True)
