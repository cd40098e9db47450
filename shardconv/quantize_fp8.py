"""Quantize one FP8 member group (a mixed-precision recipe's FP8 layers) on a device.

Each member gets its own per-tensor ``weight_scale`` and ``input_scale`` (fp8_numerics.py: ModelOpt
does not fuse FP8 groups at export; engines requantize to the group's largest scale at load). The
same code runs on the CPU and on CUDA with the same bytes (correctly rounded fp32 operations only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import encodings, fp8_numerics
from .errors import AmaxError, QuantizationError
from .planning import Member


@dataclass
class Fp8Weight:
    """A per-tensor FP8 Linear weight in ModelOpt's conventions."""

    packed: torch.Tensor  # float8_e4m3fn [out, in]
    scale: torch.Tensor  # float32 0-d weight_scale
    input_scale: torch.Tensor | None  # float32 0-d, from the amax file
    ok: torch.Tensor | None = None  # with check=False: a device bool, False when a check would raise
    fp8: bool = True
    requantized: int = 0  # as QuantizedWeight's (MXFP4 cast blocks): an FP8 layer has none


def _saved_amax(m: Member) -> torch.Tensor | None:
    a = m.amax
    if a is None or a.weight is None:
        return None
    return (a.global_amax if a.static else a.weight).float().reshape(())


def quantize_fp8_group(members: list[Member], weights: list[torch.Tensor], method: str, device, *,
                       to_cpu: bool, chunk: int | None, check: bool, row_chunks, check_finite,
                       scalar_ok) -> list[Fp8Weight]:
    """quantize.quantize_group for FP8 members (its helpers passed in, so that module stays the one
    entry point)."""
    results = []
    for m, w in zip(members, weights):
        w = encodings.source_weight(m, w.to(device, non_blocking=True))  # encoded sources -> bf16
        if check:
            check_finite(m, w)
        rows = list(row_chunks(len(w), w[0].numel() if len(w) else 1, chunk))
        actual = fp8_numerics.weight_amax(w, rows) if len(w) else torch.zeros((), device=w.device)
        saved = _saved_amax(m) if method == "amax" else None
        amax = actual if saved is None else saved.to(w.device)
        lie = (amax == 0) & (actual > 0)  # the file's zero amax over weights that are not zero
        scale = fp8_numerics.weight_scale(amax)
        a_in = m.amax.input if m.amax is not None else None
        in_scale = fp8_numerics.input_scale(a_in.to(w.device)) if a_in is not None else None
        codes = torch.empty(tuple(w.shape), dtype=torch.float8_e4m3fn, device=w.device)
        for r in rows:
            codes[r] = fp8_numerics.quantize(w[r], scale)
        # weights that are not zero, every code 0: an amax far above the weights (quantize.all_codes_zero)
        dead = (actual > 0) & ~((codes.view(torch.uint8) & 0x7F) != 0).any()
        ok = scalar_ok(scale) & ~lie & ~dead & (scalar_ok(in_scale) if in_scale is not None else True)
        if check:
            where = f"{m.weight.path}: tensor {m.weight.name!r}"
            if bool(lie):
                raise AmaxError(f"{where}: the amax file gives a weight amax of 0 but the weight is not all zero "
                                "(the amax file does not fit this checkpoint)")
            if bool(dead):
                raise QuantizationError(f"{where}: every value quantizes to 0 in FP8 (its max |w| {float(actual):.3g} "
                                        f"against the amax {float(amax):.3g}): it would be written as zeros; the "
                                        "amax file does not fit this checkpoint? (--exclude keeps it)")
            if not bool(scalar_ok(scale)):
                raise QuantizationError(f"{where}: FP8 weight_scale would be {float(scale):.4g}: its max |w| is too "
                                        "small for FP8 scales (use --format-for or --exclude to keep it)")
            if in_scale is not None and not bool(scalar_ok(in_scale)):
                raise AmaxError(f"{where}: input_scale would be {float(in_scale):.4g} (from the amax file's "
                                "input_quantizer._amax): not a usable positive scale")
        else:
            finite = torch.stack([encodings.isfinite(w[r]).all() for r in rows]).all() if len(w) else True
            ok = ok & finite
        q = Fp8Weight(codes, scale, in_scale, None if check else ok)
        if to_cpu:
            q = Fp8Weight(*(t if t is None or isinstance(t, bool) else t.cpu()
                            for t in (q.packed, q.scale, q.input_scale, q.ok)))
        results.append(q)
    return results
