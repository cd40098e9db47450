"""Scale method ``cast``: MXFP4 weights to NVFP4 losslessly, from their E8M0 exponents.

An MXFP4 block of 32 is ``e2m1 * 2**k``. Split in two NVFP4 blocks of 16 that keep the codes, it needs
the block scale ``2**(k - m)`` under ``weight_scale_2 = 2**m``; e4m3 holds powers of two from 2**-9 to
2**8 exactly, so with ``m = k_max - 8`` (``k_max``: the group's largest exponent of a nonzero E8M0 byte)
every block with ``k >= k_max - 17`` comes back bit for bit (the sign of a zero aside: -0 becomes +0).
This is ModelOpt's closed-form cast (``mxfp4_to_nvfp4_global_amax`` / ``..._per_block_amax``, one
shared ``k_max`` per fused group), written as the static path shardconv already has: per-block amax
``6 * 2**k`` and global amax ``6 * 448 * 2**m``. A block below the window gets the smallest scale,
2**-9, as ModelOpt's data-derived amax also does (its scale is clamped there either way): it is
requantized, and counted. E8M0 byte 0 (2**-127, what MXFP4 quantizers write for all-zero blocks) is
left out of ``k_max`` and of the count, as ModelOpt does.

After quantizing, every block inside the window is dequantized and compared with the source element
by element; a difference is refused (it would be a bug, not a rounding). Groups that are not all
MXFP4 (gpt-oss's bf16 attention) take the default ``mse`` scales.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import numerics
from .amax import ModuleAmax
from .encodings.mxfp4 import BLOCK, Mxfp4, pow2
from .errors import QuantizationError
from .safetensors_io import read_into

FALLBACK_METHOD = "mse"  # for groups that are not MXFP4
E4M3_KMIN, E4M3_KMAX = -9, 8  # e4m3 holds 2**k exactly for k in [-9, 8]
WINDOW = E4M3_KMAX - E4M3_KMIN  # blocks with k >= k_max - 17 cast exactly
BIAS = 127
K_MAX_LIMIT = 124  # above it 6 * 448 * 2**(k_max - 8) overflows float32


def applies(members) -> bool:
    """Whether the group is cast: every member an MXFP4 weight."""
    return all(m.encoded is not None and isinstance(m.encoded.encoding, Mxfp4) for m in members)


def exponents(member) -> torch.Tensor:
    """The member's E8M0 bytes ``[E, out, in/32]`` on the CPU."""
    return read_into(member.encoded.parts[0]).view(torch.uint8)


def k_max(e8m0: torch.Tensor) -> int:
    """The largest exponent of a nonzero E8M0 byte (0 when every byte is 0, as ModelOpt)."""
    nonzero = e8m0[e8m0 > 0]
    return int(nonzero.max()) - BIAS if nonzero.numel() else 0


def out_of_window(e8m0: torch.Tensor, kmax: int) -> torch.Tensor:
    """Blocks the cast requantizes: a nonzero exponent below ``k_max - 17``."""
    return (e8m0 > 0) & (e8m0.to(torch.int32) - BIAS < kmax - WINDOW)


@dataclass
class CastGroup:
    members: list  # the group's members with their static amax
    k_max: int
    requantized: list[int]  # per member, MXFP4 blocks (32 elements) outside the window
    exact: list[torch.Tensor]  # per member, bool [E, out, in/32] on the device: blocks that must come back exact


def prepare(members, device) -> CastGroup:
    """The group's shared ``k_max`` and each member's static amax (on ``device``), from the E8M0 bytes."""
    e8 = [exponents(m) for m in members]
    kmax = max(k_max(e) for e in e8)
    if kmax > K_MAX_LIMIT:
        raise QuantizationError(f"{members[0].encoded.parts[0].path}: tensor {members[0].encoded.parts[0].name!r}: "
                                f"an E8M0 exponent of {kmax} is beyond NVFP4's float32 global scale")
    g = torch.full((), 6.0 * 448.0 * 2.0 ** (kmax - E4M3_KMAX), dtype=torch.float32, device=device)
    out, counts, exact = [], [], []
    for m, e in zip(members, e8):
        outside = out_of_window(e, kmax)
        counts.append(int(outside.sum()))
        e_dev = e.to(device)
        block_amax = (pow2(e_dev) * 6.0).repeat_interleave(2, dim=-1).reshape(-1)  # [E, out, in/16], flat
        amax = ModuleAmax(weight=block_amax, global_amax=g, input=m.amax.input if m.amax is not None else None)
        out.append(replace(m, amax=amax))
        exact.append(((e_dev.to(torch.int32) - BIAS) >= kmax - WINDOW))
    return CastGroup(out, kmax, counts, exact)


def mismatch(weight: torch.Tensor, q, exact: torch.Tensor) -> torch.Tensor:
    """A device bool: some element of a block inside the window does not come back bit for bit.

    ``weight``: the dequantized source ``[E, in, out]``; ``q``: its stacked NVFP4 result."""
    bad = torch.zeros((), dtype=torch.bool, device=weight.device)
    for e in range(weight.shape[0]):
        got = numerics.dequantize(q.packed[e].T.contiguous(), q.scale[e].T.contiguous(), q.scale_2)  # [out, in]
        want = weight[e].T.float()
        mask = exact[e].repeat_interleave(BLOCK, dim=-1)
        bad |= ((got != want) & mask).any()
    return bad


def first_mismatch(weight: torch.Tensor, q, exact: torch.Tensor) -> str:
    """Where the cast first lost a value, for the error line (CPU, only on failure)."""
    for e in range(weight.shape[0]):
        got = numerics.dequantize(q.packed[e].T.contiguous(), q.scale[e].T.contiguous(), q.scale_2)
        want = weight[e].T.float()
        bad = (got != want) & exact[e].repeat_interleave(BLOCK, dim=-1)
        if bool(bad.any()):
            r, c = (int(i) for i in bad.nonzero()[0])
            return f"expert {e}, row {r}, column {c}: {float(want[r, c])!r} came back as {float(got[r, c])!r}"
    return "?"


def check_exact(cg: CastGroup, weights: list[torch.Tensor], results: list) -> None:
    """Refuse a group whose cast was not exact inside the window."""
    for m, w, q, ex in zip(cg.members, weights, results, cg.exact):
        if bool(mismatch(w, q, ex)):
            raise QuantizationError(f"{m.weight.path}: tensor {m.weight.name!r}: the lossless MXFP4 cast changed a "
                                    f"value ({first_mismatch(w, q, ex)}); nothing was written for it")
