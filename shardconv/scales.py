"""Scale sources: where a fusion group's global amax and each member's block scales come from.

- ``max``: from the weights (ModelOpt's dynamic export path): ``g`` is the group's max |W|.
- ``amax``: from a saved amax file: static per-block amax with a global amax, or a per-tensor
  (dynamic) amax, in which case block scales come from the weights as for ``max``. An uncalibrated
  expert's weight amax (``ModuleAmax.from_weights``) is the max of its weights, per block when static.
- ``mse``, ``four-over-six``: data-free searches (``sweep.py``) that pick a static per-block amax
  from the weights under ``g`` = the group's max |W|; four-over-six also normalises by 256.
- ``cast``: MXFP4 sources, a static per-block amax from the E8M0 exponents (cast.py), set on the
  members before these functions run; groups that are not MXFP4 use ``mse``.

The group's ``g`` is settled before any block scale is computed (FORMAT.md §3).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from . import numerics, sweep
from .planning import Member

METHODS = ("max", "amax", *sweep.METHODS, "cast")
_STATIC = ("amax", "cast")  # methods that read each member's ModuleAmax


def amax_from_file(member: Member, method: str) -> bool:
    """Whether the member's global amax comes from its amax file (else from its weights)."""
    return method in _STATIC and not member.amax.from_weights


def weight_global_amax(member: Member, weight: torch.Tensor, method: str, chunks: Iterable[slice]) -> torch.Tensor:
    """This member's contribution to the group's global amax (fp32 0-d, on the weight's device).

    From the weights, the max is taken over the row slices ``chunks`` one at a time, so that no
    full-size temporary is made."""
    if amax_from_file(member, method):
        a = member.amax
        value = a.global_amax if a.static else a.weight
        return value.reshape(()).to(weight.device)
    return torch.stack([weight[rows].abs().amax().float() for rows in chunks]).amax()


def input_scale(members: list[Member]) -> torch.Tensor | None:
    """Shared activation scale of the group: the max of the members' input amax."""
    amaxes = [m.amax.input for m in members if m.amax is not None and m.amax.input is not None]
    if not amaxes:
        return None
    amax = torch.stack([a.reshape(()) for a in amaxes]).amax()
    if amax == 0:  # ModelOpt's export_amax: an unused quantizer (amax 0) exports the fp4 max bound
        amax = torch.tensor(numerics.FP4_MAX)
    return numerics.global_scale(amax)


def weight_scale_2(group_amax: torch.Tensor, method: str) -> torch.Tensor:
    """The group's ``weight_scale_2``: g / (6 * 448), or g / (6 * 256) for four-over-six (cast: exactly
    the power of two ModelOpt's cast writes, whatever the export rounding)."""
    if method == "cast":
        return numerics.true_div(numerics._per_tensor(group_amax), numerics.FP4_MAX * numerics.FP8_MAX)
    return numerics.global_scale(group_amax, sweep.fp8_norm(method))


def block_scales(
    member: Member, weight: torch.Tensor, group_amax: torch.Tensor, method: str, rows: slice
) -> torch.Tensor:
    """e4m3 block scales for ``weight`` (the rows ``rows`` of the member) under the group's amax."""
    if method == "amax" and member.amax.from_weights == "static":  # an uncalibrated expert: max calibration
        return numerics.block_scales_static(numerics.block_amax(weight), group_amax)
    if method in _STATIC and member.amax.static:
        n_blocks = member.in_features // numerics.BLOCK
        block = member.amax.weight.reshape(member.out_features, n_blocks)[rows].to(weight.device)
        return numerics.block_scales_static(block, group_amax)
    if method in sweep.METHODS:
        return numerics.block_scales_static(sweep.block_amax(weight, group_amax, method), group_amax,
                                            sweep.fp8_norm(method))
    return numerics.block_scales_dynamic(weight, numerics.global_scale(group_amax))


def block_scales_flagged(member: Member, weight: torch.Tensor, group_amax: torch.Tensor, method: str,
                         rows: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`block_scales`, and for a sweep method on a CUDA weight a device bool that is False where the
    search could not be exact (absurd g: the caller redoes the group on the CPU), else None.

    Why: :func:`sweep.block_amax` reads the candidate scales on the host to decide that, a device wait
    per row chunk, which kept a dense model's ``mse`` issuing at the device's pace (issue 11: 2.4-2.8 s
    of a 70B slice's 3.9-5.1 s). Flagged, it is the batched search of one group (same kernels, same
    bytes), with no wait."""
    if method in sweep.METHODS and weight.is_cuda:
        amax, exact = sweep.block_amax_groups(weight.unsqueeze(0), group_amax.reshape(1), method)
        return numerics.block_scales_static(amax[0], group_amax, sweep.fp8_norm(method)), exact[0]
    return block_scales(member, weight, group_amax, method, rows), None
