"""A quantized group's outputs on the way from the device into host buffers: each member's bytes, its
tensors packed at OUTPUT_ALIGN, the copy itself, and the groups' ``ok`` flags gathered for one download.

Split from pipeline.py, which only decides when these run: the packing is the part with numbers in it
(a tensor placed one byte off is written wrong), tested alone on the CPU (tests/test_buffer_pool.py).
"""

from __future__ import annotations

import torch

from .mixed import member_outputs
from .planning import Plan
from .quantize import QuantizedWeight


def output_bytes(plan: Plan, fmt) -> dict[str, int]:
    """Host bytes of each quantized module's outputs, packed as the pipeline downloads them
    (:func:`copy_packed`)."""
    return {m.module: sum(packed_size(t.nbytes) for t in member_outputs(fmt, m, plan.w4a4))
            for u in plan.units for m in u.members}


OUTPUT_ALIGN = 64  # a member's output tensors are packed into its host buffer at this alignment


def packed_size(n: int) -> int:
    """``n`` bytes rounded up to OUTPUT_ALIGN: the room a tensor takes in a packed buffer."""
    return (n + OUTPUT_ALIGN - 1) // OUTPUT_ALIGN * OUTPUT_ALIGN


def copy_packed(t: torch.Tensor, buf: torch.Tensor, pos: int) -> tuple[torch.Tensor, int]:
    """Copy ``t`` (without waiting) into the uint8 ``buf`` at byte ``pos``; returns the copy, a view of
    ``buf`` of t's dtype and shape, and where the next tensor goes (OUTPUT_ALIGN). Few torch calls:
    each costs the main thread a GIL hand-off."""
    n = t.numel() * t.element_size()
    dst = buf[pos : pos + n]
    if t.dtype != torch.uint8:
        dst = dst.view(t.dtype)
    dst = dst.view(t.shape)
    dst.copy_(t, non_blocking=True)
    return dst, pos + packed_size(n)


def group_flags(results: list[list[QuantizedWeight]]) -> torch.Tensor:
    """Each group's ``ok`` (all of its members'), as one [G] bool tensor on their device: a few launches
    per batch rather than per group (a MoE layer has 128 experts, and each torch call on the main
    thread costs a GIL hand-off: issue 11). The groups of a batch have the same member count."""
    return torch.stack([q.ok for r in results for q in r]).view(len(results), -1).all(dim=1)
