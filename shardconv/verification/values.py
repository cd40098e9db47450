"""Verify, kept tensors' values: every floating-point tensor that is not part of a quantized module
(bf16 copies, FP8 weights dequantized to bf16, norms, biases, embeddings) is finite. Engines load a
NaN or Inf silently and it poisons every token. Read in pieces: memory stays small."""

from __future__ import annotations

import os

import torch

from ..errors import SourceError
from ..safetensors_io import DTYPES, TensorInfo, nonfinite
from .report import QModule, Report

PIECE = 16 << 20  # bytes read at a time
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")


def _position(flat: int, shape: tuple[int, ...]) -> list[int]:
    pos = []
    for d in reversed(shape):
        pos.append(flat % d)
        flat //= d
    return pos[::-1]


def first_not_finite(info: TensorInfo) -> tuple[int, list[int]] | None:
    """(count, position of the first) NaN/Inf elements of a float tensor, or None when all are finite."""
    size = DTYPES[info.dtype][1]
    step = max(size, PIECE // size * size)
    count, first = 0, None
    with open(info.path, "rb") as f:
        for start in range(0, info.nbytes, step):
            n = min(step, info.nbytes - start)
            raw = os.pread(f.fileno(), n, info.offset + start)
            if len(raw) != n:
                raise SourceError(f"{info.path}: tensor {info.name!r}: file ended early (truncated?)")
            mask = nonfinite(torch.frombuffer(bytearray(raw), dtype=torch.uint8), info.dtype)  # the pipeline's test
            k = int(mask.sum())
            if k and first is None:
                first = start // size + int(mask.nonzero()[0, 0])
            count += k
    return None if not count else (count, _position(first, info.shape))


def check_finite(tensors: dict[str, TensorInfo], mods: dict[str, QModule], skip: set[str],
                 report: Report) -> int:
    """Every float tensor outside the quantized modules (and ``skip``: scales checked elsewhere) is
    finite. Returns how many were checked."""
    quantized = {t.name for q in mods.values() for t in (q.packed, q.scale, q.scale_2, q.input_scale) if t is not None}
    n = 0
    for name, info in sorted(tensors.items()):
        if info.dtype not in FLOAT_DTYPES or name in quantized or name in skip or not info.nbytes:
            continue
        n += 1
        bad = first_not_finite(info)
        if bad:
            report.fail(f"{info.path}: tensor {name!r} has {bad[0]} NaN/Inf values (first at {bad[1]}); "
                        "engines would load them as they are")
    return n
