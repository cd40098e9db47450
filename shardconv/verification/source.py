"""Verify, against the source checkpoint: every source tensor is in DST, kept tensors are byte-identical
(FP8 weights kept dequantized: equal to their dequantization), and each quantized weight's relative
reconstruction error ``||W - deq(Q)|| / ||W||`` is reported (worst first) and stays under ``max_error``.
Bit-exact recomputation of the scales is recompute.py's."""

from __future__ import annotations

import math
import os

import torch

from .. import encodings, numerics
from ..safetensors_io import TensorInfo, read_into
from .mixed import fp8_rel_error
from .modules import weight_scale_2
from .report import FP8_MAX_ERROR, QModule, Report

_COMPARE_PIECE = 16 << 20  # bytes compared at a time by _same_bytes


def _same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    if a.nbytes != b.nbytes:
        return False
    with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
        done = 0
        while done < a.nbytes:
            n = min(_COMPARE_PIECE, a.nbytes - done)
            if os.pread(fa.fileno(), n, a.offset + done) != os.pread(fb.fileno(), n, b.offset + done):
                return False
            done += n
    return True


def _rel_error(source_w: torch.Tensor, q: QModule, s2: torch.Tensor) -> float:
    """``||W - deq|| / ||W||`` in float64 sums, a row chunk (or one expert) at a time."""
    packed, scale = read_into(q.packed), read_into(q.scale)
    if q.stacked:  # [E, in/2, out] -> per expert [out, in/2]
        pieces = ((source_w[e].T, packed[e].T, scale[e].T) for e in range(packed.shape[0]))
    else:
        step = max(1, (1 << 22) // max(1, source_w.shape[-1]))
        pieces = ((source_w[i:i + step], packed[i:i + step], scale[i:i + step]) for i in range(0, packed.shape[0], step))
    err = ref = 0.0
    for w, p, s in pieces:
        w = w.float()
        d = numerics.dequantize(p.contiguous(), s.contiguous(), s2)
        err += float((w - d).double().square().sum())
        ref += float(w.double().square().sum())
    if ref == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return math.sqrt(err / ref)


def compare_source(source, mods: dict[str, QModule], convention: str, tensors: dict[str, TensorInfo],
                   report: Report, max_error: float, found: dict[str, QModule] | None = None) -> set[str]:
    """``source``: an opened source.Source. Returns the modules whose reconstruction error is above
    ``max_error`` (FP8 layers: above report.FP8_MAX_ERROR too; reported here already)."""
    encoding = encodings.detect(source)
    encoded = encoding.weights(source)  # codes tensor name -> encoded weight
    dropped = encoding.dropped(source, encoded)
    # every quantized module, malformed ones too: their packed ``.weight`` is no kept tensor
    by_weight = {(q.module if q.stacked else f"{q.module}.weight"): q for q in (found or mods).values()}
    missing, differ, fp8 = [], [], set()
    for name, info in source.tensors.items():
        if name in dropped:
            continue
        coded = encoded.get(name)
        plain = coded.name if coded is not None else name  # the name (and shape) a plain checkpoint has
        plain_shape = tuple(coded.shape) if coded is not None else tuple(info.shape)
        q = by_weight.get(plain)
        if q is None:
            out = tensors.get(plain)
            if out is None:
                missing.append(plain)
            elif coded is not None:  # an excluded encoded weight: written dequantized
                same = out.dtype == encodings.DEQUANT_DTYPE_NAME and tuple(out.shape) == plain_shape
                if not same or not torch.equal(encodings.dequantize_excluded(coded).view(torch.int16),
                                               read_into(out).view(torch.int16)):
                    differ.append(plain)
            elif (out.dtype, out.shape) != (info.dtype, info.shape) or not _same_bytes(info, out):
                differ.append(name)
            continue
        if q.module not in mods or q.packed is None or q.scale is None or (q.scale_2 is None and not q.fp8):
            continue  # already reported
        in_features = q.packed.shape[-1] if q.fp8 else q.packed.shape[-2 if q.stacked else -1] * 2
        want_shape = ((q.packed.shape[0], in_features, q.packed.shape[2]) if q.stacked
                      else (q.packed.shape[0], in_features))
        if plain_shape != want_shape:
            report.fail(f"{q.packed.path}: quantized module {q.module} holds {list(want_shape)} but the source "
                        f"weight {plain} is {list(plain_shape)}")
            continue
        w = read_into(info)
        if coded is not None:
            w = coded.dequantize(w)
        if not w.dtype.is_floating_point:
            report.fail(f"{info.path}: source weight {name} is {info.dtype}, not a float")
            continue
        error = fp8_rel_error(w, q) if q.fp8 else _rel_error(w, q, weight_scale_2(q, convention))
        report.errors.append((q.module, plain_shape, error))
        if q.fp8:
            fp8.add(q.module)
        del w
    if missing:
        report.fail(f"{len(missing)} source tensors are missing from DST, e.g. {', '.join(missing[:3])}")
    if differ:
        report.fail(f"{len(differ)} kept tensors differ from the source, e.g. {', '.join(differ[:3])}")
    fp8_limit = min(max_error, FP8_MAX_ERROR)
    bad = [(m, e) for m, _, e in report.errors if not (e <= (fp8_limit if m in fp8 else max_error))]
    if bad:
        worst = max(bad, key=lambda x: x[1] if math.isfinite(x[1]) else math.inf)
        limit = f"{max_error}" + (f" (FP8 layers {fp8_limit})" if fp8 and fp8_limit < max_error else "")
        report.fail(f"{len(bad)} quantized weights reconstruct with relative error above {limit} "
                    f"(worst {worst[0]}: {worst[1]:.4g}); wrong scales or a mixed-up convention")
    return {m for m, _ in bad}
