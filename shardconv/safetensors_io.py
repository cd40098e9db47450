"""Reading and writing safetensors files without loading them.

Why not ``safetensors.safe_open``: a converter must validate hostile headers with a clear message,
read a tensor into a buffer it owns (reusable, pinnable) with ``pread`` rather than through a memory
map (a map keeps touched pages in the resident set, and a truncated file turns into SIGBUS), and
copy untouched tensors through a small buffer. The writer lays out a whole shard before any data is produced:
the header is written first and tensors are written at their planned offsets in any order.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .digest import HASH_PIECE, combine_digests, piece_sha256
from .errors import DestinationError, SourceError
from .files import create_fresh

# safetensors dtype string -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute offset of the first data byte in the file
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


def _short(value: object, limit: int = 120) -> str:
    """repr for an error message, cut short: hostile headers can hold megabyte-long names and shapes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object hook: a name twice in one header would silently hide a tensor."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a shard header; returns tensors by name and the ``__metadata__`` dict."""
    path = Path(path)
    try:
        st = path.stat()
        size = st.st_size
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise SourceError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SourceError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER_BYTES:
                raise SourceError(f"{path}: safetensors header of {hlen} bytes is over the {MAX_HEADER_BYTES} byte "
                                     "limit (the safetensors library's own)")
            if 8 + hlen > size:
                raise SourceError(
                    f"{path}: corrupt safetensors header (header length {hlen} but file has {size} bytes)"
                )
            raw = f.read(hlen)
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise SourceError(f"{path}: corrupt safetensors header (key {_short(e.args[0])} appears twice)") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and int literals too long to convert
        raise SourceError(f"{path}: corrupt safetensors header (invalid JSON: {_short(str(e), 200)[1:-1]})") from None
    except RecursionError:
        raise SourceError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SourceError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_start = 8 + hlen
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        where = f"{path}: tensor {_short(name)}"
        if not isinstance(entry, dict):
            raise SourceError(f"{where}: corrupt header entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise SourceError(f"{where}: unsupported dtype {_short(dtype)}")
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**48 for d in shape)):
            raise SourceError(f"{where}: invalid shape {_short(shape)}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise SourceError(f"{where}: invalid data_offsets {_short(offsets)}")
        numel = 0 if 0 in shape else 1
        for d in shape:  # stop past 2**64: a hostile shape must not build a huge integer
            if numel >= 2**64:
                break
            numel *= d
        nbytes = numel * DTYPES[dtype][1]
        if offsets[1] - offsets[0] != nbytes:
            need = nbytes if numel < 2**64 else "more than 2**64"
            raise SourceError(
                f"{where}: data_offsets {_short(offsets)} hold {_short(offsets[1] - offsets[0])} bytes, "
                f"but {dtype}{shape[:8]}{'...' if len(shape) > 8 else ''} needs {need}"
            )
        if offsets[1] > data_len:
            raise SourceError(
                f"{where}: data ends at byte {data_start + offsets[1]} but the file has {size} bytes (truncated?)"
            )
        tensors[name] = TensorInfo(name, path, dtype, tuple(shape), data_start + offsets[0], nbytes)
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise SourceError(f"{path}: corrupt header: tensors {_short(n0)} and {_short(n1)} overlap")
    # Every data byte belongs to a tensor, as the safetensors library itself requires: a gap or a tail
    # is a tensor the header lost (or bytes nothing accounts for), so the file is not read whole.
    pos = 0
    for s0, e0, n0 in spans:
        if s0 > pos:
            raise SourceError(f"{path}: corrupt header: data bytes {pos}..{s0} before tensor {_short(n0)} "
                                 "belong to no tensor")
        pos = max(pos, e0)
    if pos != data_len:
        raise SourceError(f"{path}: corrupt safetensors file: {data_len - pos} bytes after the last tensor's data "
                             "belong to no tensor")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def advise(fd: int, offset: int, nbytes: int) -> None:
    """``posix_fadvise(SEQUENTIAL)`` where the OS has it: the range is read front to back, so the kernel
    may read further ahead. A hint: failures are ignored."""
    if hasattr(os, "posix_fadvise") and nbytes > 0:
        try:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass


MAX_PREAD = 256 * 2**20  # bytes per pread call (Linux returns at most about 2 GiB anyway)


def read_range(info: TensorInfo, out: torch.Tensor, start: int = 0, stop: int | None = None) -> None:
    """Read bytes [start, stop) of one tensor with ``pread`` into the same bytes of ``out`` (a uint8
    CPU tensor at least ``info.nbytes`` long): the pipeline reads a tensor's pieces on several threads."""
    stop = info.nbytes if stop is None else stop
    mv = memoryview(out.view(torch.uint8).reshape(-1)[start:stop].numpy()).cast("B")
    fd = os.open(info.path, os.O_RDONLY)
    advise(fd, info.offset + start, stop - start)
    try:
        pread_exact(fd, info, mv, start)
    finally:
        os.close(fd)


def pread_exact(fd: int, info: TensorInfo, mv: memoryview, start: int) -> None:
    """Fill ``mv`` with the tensor's bytes from ``start`` on (counted from the tensor's first byte),
    or fail with one line naming the file and the tensor."""
    done = 0
    while done < len(mv):
        try:
            n = os.preadv(fd, [mv[done : done + MAX_PREAD]], info.offset + start + done)
        except OSError as e:
            raise SourceError(f"{info.path}: tensor {info.name!r}: read failed: {e.strerror or e}") from None
        if n <= 0:
            raise SourceError(f"{info.path}: tensor {info.name!r}: file ended early (truncated?)")
        done += n


# dtype -> (integer view, exponent mask): NaN and Inf are the values whose exponent bits are all ones
# (e4m3fn has no Inf; its NaN is 0x7F/0xFF, every bit but the sign). Integer tests run 3-5x faster than
# torch.isfinite on bf16 on the CPU.
_NONFINITE_BITS = {
    "F16": (torch.int16, 0x7C00), "BF16": (torch.int16, 0x7F80), "F32": (torch.int32, 0x7F800000),
    "F64": (torch.int64, 0x7FF0000000000000), "F8_E4M3": (torch.uint8, 0x7F), "F8_E5M2": (torch.uint8, 0x7C),
}


def nonfinite(t: torch.Tensor, dtype_name: str) -> torch.Tensor:
    """Where ``t`` (raw bytes of a ``dtype_name`` tensor, any view) is NaN or Inf."""
    view, mask = _NONFINITE_BITS[dtype_name]
    return (t.view(view) & mask) == mask


_FINITE_SLICE = 2**20  # bytes tested at a time: stays in the core's cache, one pass over memory


def check_finite_bytes(info: TensorInfo, data: memoryview, start: int) -> None:
    """Refuse NaN/Inf in bytes [start, start + len(data)) of a floating-point tensor that is copied as it
    is: no tensor of a finished output may hold one (README, Reliability).

    numpy in 1 MiB slices through one small scratch: a value is NaN/Inf when its bits without the sign
    reach the exponent mask. This runs at memory speed on one core; whole-piece torch ops allocated two
    piece-sized temporaries and spread over every core from every reader at once, which made this check
    the kept tensors' slowest step on the H200 machine (README, Performance).
    """
    if info.dtype not in _NONFINITE_BITS or not len(data):
        return
    import numpy as np

    size = DTYPES[info.dtype][1]
    lead = -start % size  # whole elements only (copy_from refuses pieces that split one)
    data = data[lead: lead + (len(data) - lead) // size * size]
    if not len(data):
        return
    uint = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[size]
    mask = _NONFINITE_BITS[info.dtype][1]
    no_sign = uint((1 << (8 * size - 1)) - 1)
    values = np.frombuffer(data, dtype=uint)
    step = _FINITE_SLICE // size
    scratch = np.empty(min(step, len(values)), dtype=uint)
    for at in range(0, len(values), step):
        part = values[at: at + step]
        bits = np.bitwise_and(part, no_sign, out=scratch[: len(part)])
        if bits.max() >= mask:  # the exponent bits all ones (e4m3fn: every bit but the sign, its NaN)
            index = (start + lead) // size + at + int(np.flatnonzero(bits >= mask)[0])
            raise SourceError(f"{info.path}: tensor {info.name!r} holds NaN/Inf (first at flat index {index}); "
                              "a finished output must be finite (use a repaired source checkpoint)")


def tensor_view(info: TensorInfo, out: torch.Tensor) -> torch.Tensor:
    """The tensor of the stored dtype and shape that the first ``info.nbytes`` bytes of ``out`` hold."""
    if not info.nbytes:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    if out.dtype != torch.uint8 or out.dim() != 1:
        out = out.view(torch.uint8).reshape(-1)
    if out.numel() != info.nbytes:
        out = out[: info.nbytes]
    if info.torch_dtype != torch.uint8:
        out = out.view(info.torch_dtype)
    return out.view(info.shape)  # few torch calls: the pipeline's main thread makes one per weight


def read_into(info: TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes with pread into ``out`` (a uint8 CPU tensor, reused) or a new tensor.

    Returns a tensor of the stored dtype and shape that views ``out``.
    """
    if out is None:
        out = torch.empty(info.nbytes, dtype=torch.uint8)
    read_range(info, out)
    return tensor_view(info, out)


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
