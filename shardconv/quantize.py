"""Quantize one fusion group on a device, in row chunks so temporaries stay small.

The same function runs on the CPU and on CUDA; the bytes are identical because the numerics use only
correctly rounded fp32 operations (see numerics.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from . import cast, encodings, numerics, scales
from .amax import ModuleAmax
from .threads import usable as usable_cores
from .errors import AmaxError, OptionError, QuantizationError, SourceError
from .numerics import CHUNK_ELEMENTS
from .planning import Member
from .quantize_fp8 import quantize_fp8_group



@dataclass
class QuantizedWeight:
    """An NVFP4 Linear weight, on the CPU, in ModelOpt's conventions."""

    packed: torch.Tensor  # uint8 [out, in/2] (stacked experts: [E, in/2, out], ModelOpt's BMM layout)
    scale: torch.Tensor  # float8_e4m3fn [out, in/16] (stacked experts: [E, in/16, out])
    scale_2: torch.Tensor  # float32 0-d
    input_scale: torch.Tensor | None  # float32 0-d, W4A4 only
    ok: torch.Tensor | None = None  # with check=False: a device bool; False: redo_on_cpu() decides
    requantized: int = 0  # scales "cast": MXFP4 blocks outside the lossless window (cast.py)


def _row_chunks(rows: int, cols: int, chunk: int | None = None):
    step = max(1, (chunk or CHUNK_ELEMENTS) // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


# A fusion group whose weights are all zero has no max to scale by. ModelOpt writes weight_scale_2 = 0
# and NaN block scales for it (0 / 0), which engines turn into NaN outputs; shardconv uses the amax
# ModelOpt's export gives an unused quantizer (the e2m1 maximum, 6.0) instead: every code is 0, so the
# weight still dequantizes to exact zeros, and every scale is a plain finite number (README, Reliability).
ZERO_GROUP_AMAX = numerics.FP4_MAX
# The smallest weight_scale_2 (and input_scale) written: a normal fp32 whose reciprocal (the
# compressed-tensors global scale) is finite too. A group max below ~3e-35 is refused, not written.
MIN_GLOBAL_SCALE = 2.0**-126


def check_finite(member: Member, weight: torch.Tensor) -> None:
    for rows in _row_chunks(weight.shape[0], weight[0].numel() if len(weight) else 1):
        if not encodings.isfinite(weight[rows]).all():
            bad = (~encodings.isfinite(weight[rows])).nonzero()[0].tolist()
            bad[0] += rows.start
            where = f"row {bad[0]}, column {bad[1]}" if len(bad) == 2 else f"index {bad}"
            raise SourceError(
                f"{member.weight.path}: tensor {member.weight.name!r} has NaN/Inf values "
                + (f"after {member.encoded.encoding.label} dequantization with its "
                   f"{', '.join(p.name.rpartition('.')[2] for p in member.encoded.parts)} "
                   if member.encoded is not None else "")
                + f"(first at {where}); cannot quantize it"
            )


def quantize_group(
    members: list[Member],
    weights: list[torch.Tensor],
    method: str,
    device: torch.device | str = "cpu",
    *,
    to_cpu: bool = True,
    chunk: int | None = None,
    check: bool = True,
) -> list[QuantizedWeight]:
    """Quantize every member of a group with one shared ``weight_scale_2`` and ``input_scale``.

    ``weights`` are CPU (or device) tensors in their source dtype; results come back on the CPU
    unless ``to_cpu`` is False (the pipeline copies them back itself, on its own stream).
    ``check=False`` skips the NaN/Inf check, which synchronises a GPU; the caller then checks.
    """
    device = torch.device(device)
    if members[0].target == "fp8":  # a mixed-precision recipe's FP8 layers (quantize_fp8.py)
        return quantize_fp8_group(members, weights, method, device, to_cpu=to_cpu, chunk=chunk, check=check,
                                  row_chunks=_row_chunks, check_finite=check_finite, scalar_ok=_scalar_ok)
    on_device = [w.to(device, non_blocking=True) for w in weights]
    on_device = [encodings.source_weight(m, w) for m, w in zip(members, on_device)]  # encoded -> bf16
    for m, w in zip(members, on_device):
        if check:
            check_finite(m, w)
    cast_group = None
    if method == "cast":  # MXFP4 members get their static amax from the E8M0 exponents; others use mse
        if cast.applies(members):
            cast_group = cast.prepare(members, device)
            members = cast_group.members
        else:
            method = cast.FALLBACK_METHOD
    chunks = [list(_row_chunks(len(w), w[0].numel() if len(w) else 1, chunk)) for w in on_device]
    per_member = [scales.weight_global_amax(m, w, method, c) for m, w, c in zip(members, on_device, chunks)]
    group_amax = torch.stack(per_member).amax()
    if check and method == "amax":
        _check_saved_amax(members, on_device, chunks, group_amax)
    group_amax = torch.where(group_amax == 0, torch.full_like(group_amax, ZERO_GROUP_AMAX), group_amax)
    scale_2 = scales.weight_scale_2(group_amax, method)
    in_scale = scales.input_scale(members)
    if check:
        _check_global_scales(members, scale_2, in_scale)
    results = []
    searches_exact: list[torch.Tensor] = []  # check=False: the sweep searches' device flags
    for m, w in zip(members, on_device):
        if m.stacked:
            results.append(_quantize_stacked(m, w, group_amax, scale_2, in_scale, method, device, chunk))
            continue
        out, cols = w.shape
        packed = torch.empty((out, cols // 2), dtype=torch.uint8, device=device)
        bscale = torch.empty((out, cols // numerics.BLOCK), dtype=torch.float8_e4m3fn, device=device)
        for rows in _row_chunks(out, cols, chunk):
            if check:
                s = scales.block_scales(m, w[rows], group_amax, method, rows)
            else:  # no device wait per row chunk: a search that could not be exact flags the group
                s, exact = scales.block_scales_flagged(m, w[rows], group_amax, method, rows)
                if exact is not None:
                    searches_exact.append(exact)
            bscale[rows] = s
            packed[rows] = numerics.quantize(w[rows], s, scale_2)
        results.append(QuantizedWeight(packed, bscale, scale_2, in_scale))
    maxima = [_member_max(m, w, c, method, a) for m, w, c, a in zip(members, on_device, chunks, per_member)]
    if check:
        for m, q, top in zip(members, results, maxima):
            _check_block_scales(m, q.scale)
            _check_not_all_zero(m, q.packed, top, group_amax)
    else:  # one device flag per member, read by the caller once the group is done (no sync here)
        group_ok = _scalar_ok(scale_2) & (_scalar_ok(in_scale) if in_scale is not None else True)
        if searches_exact:
            group_ok = group_ok & torch.stack(searches_exact).all()
        if method == "amax":
            group_ok = group_ok & ~_zero_amax_lies(members, on_device, chunks, torch.stack(per_member).amax())
        for m, w, c, q, top in zip(members, on_device, chunks, results, maxima):
            finite = torch.stack([encodings.isfinite(w[rows]).all() for rows in c]).all() if len(w) else True
            scales_ok = (((q.scale.view(torch.uint8) & 0x7F) != 0x7F).all())
            q.ok = group_ok & finite & scales_ok & ~all_codes_zero(q.packed, top)
    if cast_group is not None:
        if check:
            cast.check_exact(cast_group, on_device, results)
        for q, n, w, exact in zip(results, cast_group.requantized, on_device, cast_group.exact):
            q.requantized = n
            if not check:
                q.ok = q.ok & ~cast.mismatch(w, q, exact)
    if to_cpu:
        results = [
            QuantizedWeight(*(t if t is None or isinstance(t, bool) else t.cpu()
                              for t in (q.packed, q.scale, q.scale_2, q.input_scale, q.ok)), q.requantized)
            for q in results
        ]
    return results


def _scalar_ok(t: torch.Tensor) -> torch.Tensor:
    """A global scale engines can use: finite, at least MIN_GLOBAL_SCALE, with a finite reciprocal."""
    t = t.float()
    return torch.isfinite(t) & (t >= MIN_GLOBAL_SCALE) & torch.isfinite(1.0 / t)


def _names(members: list[Member]) -> str:
    return ", ".join(m.weight.name for m in members)


def _check_global_scales(members: list[Member], scale_2: torch.Tensor, in_scale: torch.Tensor | None) -> None:
    """Refuse a group whose weight_scale_2 or input_scale is not a usable positive number."""
    where = f"{members[0].weight.path}: tensor {_names(members)}"
    if not bool(_scalar_ok(scale_2)):
        raise QuantizationError(
            f"{where}: weight_scale_2 would be {float(scale_2):.4g}: the group's max |w| is too small for NVFP4 "
            "scales (use --exclude to keep it in source precision)")
    if in_scale is not None and not bool(_scalar_ok(in_scale)):
        raise AmaxError(f"{where}: input_scale would be {float(in_scale):.4g} (from the amax file's "
                             "input_quantizer._amax): not a usable positive scale")


def _zero_amax_lies(members, weights, chunks, saved_amax) -> torch.Tensor:
    """True (a device bool) when the amax file gives the group a zero global amax but a weight is not zero."""
    actual = torch.stack([torch.stack([w[rows].abs().amax().float() for rows in c]).amax() if len(w) else
                          torch.zeros((), device=w.device) for w, c in zip(weights, chunks)]).amax()
    return (saved_amax == 0) & (actual > 0)


def _check_saved_amax(members, weights, chunks, saved_amax) -> None:
    if bool(_zero_amax_lies(members, weights, chunks, saved_amax)):
        raise AmaxError(f"{members[0].weight.path}: tensor {_names(members)}: the amax file gives a global "
                             "amax of 0 but the weights are not all zero (the amax file does not fit this checkpoint)")


def _member_max(member: Member, weight: torch.Tensor, chunks, method: str, amax: torch.Tensor) -> torch.Tensor:
    """The member's max |w| (fp32 0-d): ``amax`` where the method took it from the weights already."""
    if not len(weight):
        return torch.zeros((), device=weight.device)
    if member.stacked:  # [E]: each expert of a stack is held to the rule on its own
        return torch.stack([weight[e].abs().amax().float() for e in range(len(weight))])
    if not scales.amax_from_file(member, method):
        return amax
    return torch.stack([weight[rows].abs().amax().float() for rows in chunks]).amax()


def all_codes_zero(packed: torch.Tensor, member_max: torch.Tensor) -> torch.Tensor:
    """True (a device bool) for a member (or an expert of a stacked member) whose weights are not all zero
    but whose every FP4 code is 0 (or -0): it would be written as zeros. Why refused: one ``weight_scale_2`` serves a fusion group, and
    block scales are clamped at e4m3's smallest, so a member below ~2e-7 of the group's max loses every
    value. No real fused projection is that far below its partners; a corrupt source scale (an FP8 block
    scale of 1e30 in one member) does it to the others, which ModelOpt's export writes as zeros and
    engines serve as a dead projection."""
    return zeroed(packed, member_max).any()


def zeroed(packed: torch.Tensor, member_max: torch.Tensor) -> torch.Tensor:
    """Which of the member (0-d ``member_max``), of a stack's experts or of a batch's groups (``member_max``
    [E] or [G], ``packed`` with that first dimension) are not zero but coded all 0."""
    nonzero = (packed & 0x77) != 0
    nonzero = nonzero.flatten(1).any(dim=1) if member_max.dim() else nonzero.any()
    return (member_max > 0) & ~nonzero


def _check_not_all_zero(member: Member, packed: torch.Tensor, member_max: torch.Tensor,
                        group_amax: torch.Tensor) -> None:
    dead = zeroed(packed, member_max)
    if bool(dead.any()):
        which = f" (expert {int(dead.nonzero()[0, 0])})" if dead.dim() else ""
        raise QuantizationError(
            f"{member.weight.path}: tensor {member.weight.name!r}{which}: every value quantizes to 0 (its max |w| "
            f"{float(member_max[dead].max()):.3g} against its fusion group's {float(group_amax):.3g}): it would "
            "be written as zeros; a corrupt scale in the source? (--exclude keeps the group in source precision)")


def _check_block_scales(member: Member, scale: torch.Tensor) -> None:
    bad = (scale.view(torch.uint8) & 0x7F) == 0x7F
    if bool(bad.any()):
        first = [int(i) for i in bad.nonzero()[0]]
        raise QuantizationError(f"{member.weight.path}: tensor {member.weight.name!r}: block scale {first} is NaN "
                             "(a bad scale source); nothing was written for it")


def redo_on_cpu(members: list[Member], weights: list[torch.Tensor], method: str) -> list[QuantizedWeight]:
    """A group the device flagged (``ok == False``), quantized again by the CPU reference with every
    check on: it raises the ShardconvError the input deserves (NaN weights, unusable scales), or
    returns the reference's result (a batched mse search that could not be exact on the device for
    an absurd global amax; the bytes are the reference's by definition)."""
    return quantize_group(members, [w.cpu() for w in weights], method, "cpu", check=True)


def _quantize_stacked(m: Member, w: torch.Tensor, group_amax, scale_2, in_scale, method, device, chunk):
    """A stacked ``[E, in, out]`` expert tensor (GPT-OSS, Llama-4), as ModelOpt exports it: each expert's
    transpose ``[out, in]`` is quantized (blocks along ``in``) under the one ``scale_2`` of the whole
    stack, and the results are transposed back: ``[E, in/2, out]`` and ``[E, in/16, out]``."""
    experts, cols, out = w.shape
    packed = torch.empty((experts, cols // 2, out), dtype=torch.uint8, device=device)
    bscale = torch.empty((experts, cols // numerics.BLOCK, out), dtype=torch.float8_e4m3fn, device=device)
    a = m.amax
    for e in range(experts):
        # this expert as a plain [out, in] Linear (static block amax are in transposed order, [E, out, in/16])
        sub = replace(m, stacked=False, encoded=None, weight=replace(m.weight, shape=(out, cols)))
        if a is not None and a.static:
            sub.amax = ModuleAmax(weight=a.weight.reshape(experts, -1)[e], global_amax=a.global_amax, input=a.input)
        we = w[e].T
        for rows in _row_chunks(out, cols, chunk):
            s = scales.block_scales(sub, we[rows], group_amax, method, rows)
            bscale[e, :, rows] = s.T
            packed[e, :, rows] = numerics.quantize(we[rows], s, scale_2).T
    return QuantizedWeight(packed, bscale, scale_2, in_scale)


def cpu_threads(requested: int | None = None) -> int:
    """Threads for torch's CPU kernels: ``requested``, else the cores this process may run on less the
    load other processes already put on them (at least one). torch's default (every core) collapses on
    a busy machine: one MSE scale search took 0.37 s with 1 thread and 7.98 s with 2 on a 2-core VM
    whose other core was busy (issue 11's measurement)."""
    if requested is not None:
        if requested < 1:
            raise OptionError(f"--threads {requested}: must be at least 1")
        return requested
    cores = usable_cores()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:  # no load average on this system
        busy = 0
    return max(1, cores - busy)


def set_cpu_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads (:func:`cpu_threads`); returns the number."""
    n = cpu_threads(requested)
    torch.set_num_threads(n)
    return n


def pick_device(choice: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"--device {choice}: no CUDA device is available (use --device cpu)")
    try:
        return torch.device(choice)
    except RuntimeError:
        raise OptionError(f"--device {choice}: not a device (auto, cpu, cuda, cuda:N)") from None

