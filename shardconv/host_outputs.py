"""A quantized group's outputs on the way from the device into host buffers: each member's bytes, its
tensors packed at OUTPUT_ALIGN, the copy itself, and the groups' ``ok`` flags gathered for one download.

Split from pipeline.py, which only decides when these run: the packing is the part with numbers in it
(a tensor placed one byte off is written wrong), tested alone on the CPU (tests/test_buffer_pool.py).
"""

from __future__ import annotations

import torch

from .mixed import member_outputs
from .numerics import BLOCK
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


# -- a batch's outputs in one copy per tensor kind ------------------------------------------------------
# Why: downloading a MoE layer's 128 expert groups one at a time cost the main thread ~30 torch calls per
# group (a slice, views and a copy per output tensor, an event), each a GIL hand-off: with the reads and
# uploads, ~1.3 ms per group, which bounded Qwen3-MoE's cached rate (issue 11, stop 20). A sub-batch of
# ``k`` groups now lands in one host buffer with three copies per member position.


def stacked_bytes(tensors: list[tuple[torch.Tensor, ...]], k: int) -> int:
    """Host bytes for ``k`` groups of a batch's stacked tensors (batch.Stacked.tensors): each member
    position's codes, block scales and ``weight_scale_2`` for those groups, each at OUTPUT_ALIGN."""
    return sum(packed_size(k * t[0].numel() * t.element_size()) for kinds in tensors for t in kinds)


def stacked_group_bytes(members) -> int:
    """What one group of a batch adds to :func:`stacked_bytes`, from its members' shapes (plan time)."""
    return sum(m.out_features * (m.in_features // 2 + m.in_features // BLOCK) + 4 + 3 * OUTPUT_ALIGN
               for m in members)


def groups_per_copy(tensors: list[tuple[torch.Tensor, ...]], room: int) -> int:
    """How many of the batch's groups one host buffer of ``room`` bytes holds (at least one)."""
    n = tensors[0][0].shape[0]
    per_group = max(1, stacked_bytes(tensors, 1))
    k = max(1, min(n, room // per_group))
    while k > 1 and stacked_bytes(tensors, k) > room:
        k -= 1
    return k


def copy_stacked(tensors: list[tuple[torch.Tensor, ...]], start: int, stop: int,
                 buf: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Copy groups ``start:stop`` of every stacked tensor into ``buf`` (without waiting), packed as
    :func:`stacked_bytes` counts; returns the host copies, the same kinds with ``stop - start`` groups."""
    pos, out = 0, []
    for kinds in tensors:
        host = []
        for t in kinds:
            dst, pos = copy_packed(t[start:stop], buf, pos)
            host.append(dst)
        out.append(tuple(host))
    return out


def group_of(host: list[tuple[torch.Tensor, ...]], j: int, in_scale: torch.Tensor | None) -> list[QuantizedWeight]:
    """Group ``j`` of a :func:`copy_stacked` copy, as its members' QuantizedWeights (host views)."""
    return [QuantizedWeight(packed[j], scale[j], scale_2[j], in_scale) for packed, scale, scale_2 in host]
