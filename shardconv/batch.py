"""Same-shape fusion groups quantized together: a MoE layer's experts in a few kernel launches.

A Qwen3-MoE layer has 128 experts, each a gate/up group and a down_proj; quantized one group at a
time, the GPU runs ~50 small kernels per weight and the main thread spends its time issuing them
(issue 11: 4.4-10.8 s of a MoE conversion). Groups of one structure (the same number of members, each
member the same shape and dtype) are stacked along a new first dimension and quantized with the same
element-wise fp32 operations, the group's global amax broadcast as ``[G, 1, 1]``: every byte equals
:func:`quantize.quantize_group` on each group alone (the operations are element-wise and the max is
exact in any order; tests/test_batch.py checks it).

Batched: every method. ``mse`` and ``four-over-six`` search all groups' blocks in one launch of
their Triton kernels (each block finds its group's candidate scales by index, sweep.block_amax_groups);
a group whose mse search cannot be exact there (an absurd global amax) is flagged not ``ok`` and
redone alone on the CPU by the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import numerics, scales, sweep
from .amax import ModuleAmax
from .host_buffers import aligned as _aligned
from .planning import Member, Unit
from .quantize import ZERO_GROUP_AMAX, QuantizedWeight, _row_chunks, _scalar_ok, quantize_group, zeroed
from .safetensors_io import TensorInfo, nonfinite

BATCHED_METHODS = ("max", "amax", *sweep.METHODS)
MAX_BATCH = 64  # groups quantized in one batch at most (the pipeline closes a batch at this count)


def structure(members: list[Member]) -> tuple | None:
    """What groups must share to be quantized as one batch (None: never batched)."""
    if any(m.stacked or m.encoded is not None or m.target != "nvfp4" or (m.amax is not None and m.amax.from_weights)
           for m in members):
        return None
    return tuple((m.weight.dtype, tuple(m.weight.shape), _amax_kind(m.amax)) for m in members)


def schedule(units: list[Unit], method: str, slab: int, batch_bytes: int, window: int) -> list[list[Unit]]:
    """The pipeline's steps, in plan order: each unit alone, or up to :data:`MAX_BATCH` groups of one
    :func:`structure` as one step, read into one host buffer per member position (each at most ``slab``
    bytes), uploaded in one copy each and quantized as one batch (at most ``batch_bytes`` of weights).

    Why planned, not gathered on the device: a Qwen3-MoE layer's 256 expert groups each cost the main
    thread a view and an upload per weight, and every torch call hands the GIL to one of the 15 other
    threads (H200 machine, stop 21: ~1.8 ms per group, the main thread busy 3.7 s of a 4.5 s run).

    A batch takes groups from at most ``window`` bytes of plan order past its first unit (the host
    budget), so the readers stay near the plan's order and output shards close in turn: a dense
    model's layers, each a ``window`` apart, go alone. A MoE layer's experts alternate (gate/up, down),
    so each structure keeps its own batch open.
    """
    if not batch_bytes or method not in BATCHED_METHODS:
        return [[u] for u in units]
    steps: list[list[Unit]] = []
    open_: dict[tuple, tuple[int, int]] = {}  # structure -> (its step's index, plan offset of its first unit)
    offset = 0
    for u in units:
        key = structure(u.members) if u.members else None
        here, offset = offset, offset + u.in_bytes
        if key is None:
            steps.append([u])
            continue
        sizes = [_aligned(m.weight.nbytes) for m in u.members]
        most = min(MAX_BATCH, slab // max(sizes), batch_bytes // max(1, sum(sizes)))
        at = open_.get(key)
        if at is not None and len(steps[at[0]]) < most and offset - at[1] <= window:
            steps[at[0]].append(u)
        else:
            open_[key] = (len(steps), here)
            steps.append([u])
    return steps


def stacked_view(info: TensorInfo, groups: int, buf: torch.Tensor) -> torch.Tensor:
    """The ``[groups, *shape]`` weights of one member position of a batch, back to back in ``buf``
    (:func:`schedule`): one view per position, not one per group."""
    return buf[: groups * info.nbytes].view(info.torch_dtype).view(groups, *info.shape)


def _amax_kind(a: ModuleAmax | None) -> str:
    if a is None or a.weight is None:
        return "none"
    return "static" if a.static else "dynamic"


@dataclass
class Stacked:
    """A batch's results: per group (``groups[g][i]``, views), and per member position ``i`` the
    batch-wide tensors those views are cut from (``tensors[i]``: codes ``[G, out, in/2]``, block scales
    ``[G, out, in/16]``, ``weight_scale_2`` ``[G]``), which the pipeline downloads in one copy each
    (host_outputs.copy_stacked) rather than one per group; ``tensors`` is None where the groups were
    quantized one at a time."""

    groups: list[list[QuantizedWeight]]
    tensors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


def quantize_batch(groups: list[list[Member]], weights: list[list[torch.Tensor]], method: str,
                   device: torch.device | str = "cpu", *, chunk: int | None = None) -> list[list[QuantizedWeight]]:
    """:func:`quantize.quantize_group` (with ``check=False``: each result carries its ``ok`` flag) for
    several groups of one :func:`structure`, in one pass per member position; results stay on
    ``device``."""
    return quantize_stacked(groups, weights, method, device, chunk=chunk).groups


def quantize_stacked(groups: list[list[Member]], weights: list[list[torch.Tensor]], method: str,
                     device: torch.device | str = "cpu", *, chunk: int | None = None) -> Stacked:
    """:func:`quantize_batch`, with the batch-wide tensors its results are views of (:class:`Stacked`)."""
    device = torch.device(device)
    if method not in BATCHED_METHODS or len(groups) == 1:
        return Stacked([quantize_group(ms, ws, method, device, to_cpu=False, chunk=chunk, check=False)
                        for ms, ws in zip(groups, weights)])
    stacked = [torch.stack([ws[i] if ws[i].device == device else ws[i].to(device, non_blocking=True) for ws in weights])
               for i in range(len(groups[0]))]
    return quantize_stacked_weights(groups, stacked, method, device, chunk=chunk)


def quantize_stacked_weights(groups: list[list[Member]], stacked: list[torch.Tensor], method: str,
                             device: torch.device | str = "cpu", *, chunk: int | None = None) -> Stacked:
    """:func:`quantize_stacked` of weights already stacked, ``stacked[i]`` the ``[G, out, in]`` weights of
    member position ``i`` (the pipeline reads a batch's weights into one host buffer per position and
    uploads each in one copy: no per-group torch calls, no device-side stack)."""
    device = torch.device(device)
    if method not in BATCHED_METHODS:
        return Stacked([quantize_group(ms, [w[g] for w in stacked], method, device, to_cpu=False, chunk=chunk,
                                       check=False) for g, ms in enumerate(groups)])
    n = len(groups)
    rows_of = [list(_row_chunks(w.shape[1], w.shape[2] * n, chunk)) for w in stacked]

    # the group's global amax, [G]: from the weights (max), or the file's (amax)
    member_max = torch.stack([_batch_amax(w, rows) for w, rows in zip(stacked, rows_of)])  # [M, G]
    if method == "amax":
        saved = torch.stack([torch.stack([(m.amax.global_amax if m.amax.static else m.amax.weight).float().reshape(())
                                          for m in ms]).amax() for ms in groups]).to(device, non_blocking=True)
        group_ok = ~((saved == 0) & (member_max.amax(dim=0) > 0))  # a zero amax over weights that are not zero
        group_amax = saved
    else:
        group_amax = member_max.amax(dim=0)
        group_ok = torch.ones(n, dtype=torch.bool, device=device)
    group_amax = torch.where(group_amax == 0, torch.full_like(group_amax, ZERO_GROUP_AMAX), group_amax)
    scale_2 = scales.weight_scale_2(group_amax, method)  # [G]
    in_scales = [scales.input_scale(ms) for ms in groups]
    group_ok = group_ok & _scalar_ok(scale_2)
    for g, s in enumerate(in_scales):
        if s is not None and not bool(_scalar_ok(s)):  # a host value: no sync
            group_ok[g] = False
    s2 = scale_2.view(n, 1, 1)

    results: list[list[QuantizedWeight]] = [[] for _ in groups]
    tensors = []
    for i, (w, rows_list) in enumerate(zip(stacked, rows_of)):
        _, out, cols = w.shape
        packed = torch.empty((n, out, cols // 2), dtype=torch.uint8, device=device)
        bscale = torch.empty((n, out, cols // numerics.BLOCK), dtype=torch.float8_e4m3fn, device=device)
        finite = torch.ones(n, dtype=torch.bool, device=device)
        for rows in rows_list:
            part = w[:, rows]
            finite &= ~nonfinite(part, _name(part.dtype)).flatten(1).any(dim=1)
            if method == "amax" and groups[0][i].amax.static:
                blocks = torch.stack([m.amax.weight.reshape(out, cols // numerics.BLOCK)[rows]
                                      for m in (ms[i] for ms in groups)]).to(device, non_blocking=True)
                s = numerics.block_scales_static(blocks, group_amax.view(n, 1, 1))
            elif method in sweep.METHODS:
                blocks, exact = sweep.block_amax_groups(part, group_amax, method)
                group_ok = group_ok & exact
                s = numerics.block_scales_static(blocks, group_amax.view(n, 1, 1), sweep.fp8_norm(method))
            else:
                s = numerics.block_scales_dynamic(part, s2)
            bscale[:, rows] = s
            packed[:, rows] = numerics.quantize(part, s, s2)
        scales_ok = ((bscale.view(torch.uint8) & 0x7F) != 0x7F).flatten(1).all(dim=1)
        ok = group_ok & finite & scales_ok & ~zeroed(packed, member_max[i])  # a member coded all 0 (quantize.py)
        # unbind: one call per batch for every group's view (each torch call costs the main thread a GIL hand-off)
        for g, (p, b, s2_g, ok_g) in enumerate(zip(packed.unbind(0), bscale.unbind(0), scale_2.unbind(0), ok.unbind(0))):
            results[g].append(QuantizedWeight(p, b, s2_g, in_scales[g], ok=ok_g))
        tensors.append((packed, bscale, scale_2))
    return Stacked(results, tensors)


def _batch_amax(w: torch.Tensor, rows_list: list[slice]) -> torch.Tensor:
    """max |w| per group of a ``[G, out, in]`` batch, a row chunk at a time (fp32 ``[G]``)."""
    return torch.stack([w[:, rows].abs().amax(dim=(1, 2)).float() for rows in rows_list]).amax(dim=0)


def _name(dtype: torch.dtype) -> str:
    from .safetensors_io import DTYPE_NAMES

    return DTYPE_NAMES[dtype]
