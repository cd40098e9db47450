"""Reading safetensors files without loading them (shard_writer.py writes them).

Why not ``safetensors.safe_open``: a converter must validate hostile headers with a clear message,
read a tensor into a buffer it owns (reusable, pinnable) with ``pread`` rather than through a memory
map (a map keeps touched pages in the resident set, and a truncated file turns into SIGBUS), and
copy untouched tensors through a small buffer.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SourceError

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


def read_range(info: TensorInfo, out: torch.Tensor, start: int = 0, stop: int | None = None, base: int = 0) -> None:
    """Read bytes [start, stop) of one tensor with ``pread`` into bytes [base + start, base + stop) of
    ``out`` (a uint8 CPU tensor): the pipeline reads a tensor's pieces on several threads, and a batch's
    tensors one after the other into one buffer (batch.schedule)."""
    stop = info.nbytes if stop is None else stop
    mv = memoryview(out.view(torch.uint8).reshape(-1).numpy()).cast("B")[base + start:base + stop]
    if len(mv) != stop - start:
        raise ValueError(f"a buffer of {out.nbytes} bytes cannot hold bytes {base + start}-{base + stop}")
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
