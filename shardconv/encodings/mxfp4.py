"""MXFP4 sources (gpt-oss layout), dequantized on the fly.

gpt-oss stores its expert stacks as OCP MXFP4 (``quantization_config.quant_method: "mxfp4"``):
``<stack>_blocks`` uint8 ``[E, out, in/32, 16]`` (two e2m1 codes per byte, the even element in the
low nibble) and ``<stack>_scales`` uint8 ``[E, out, in/32]``, one E8M0 exponent per 32 elements
(value ``2**(e8m0 - 127)``; 0xFF is NaN). In a plain (bf16) gpt-oss checkpoint the same weight is
``<stack>`` ``[E, in, out]``: the dequantized ``[E, out, in]`` transposed, which is the view planning
and verification see. Everything else (attention, routers, embeddings: ``modules_to_not_convert``)
is stored plain. Dequantization is exact in bf16 (an e2m1 value times a power of two), the same bits
as transformers' ``convert_moe_packed_tensors`` on any device. The lossless cast to NVFP4 that uses
the E8M0 exponents is cast.py's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import SourceError
from .base import DEQUANT_DTYPE, EncodedWeight, Encoding

BLOCK = 32  # elements per E8M0 scale
BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# the layouts shardconv knows: gpt-oss's expert stacks (the only MXFP4 tensors of the released models)
_STACK = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
MODEL_TYPES = {"gpt_oss"}


@dataclass(frozen=True)
class Mxfp4(Encoding):
    """An MXFP4 (gpt-oss) source: expert stacks as e2m1 codes with E8M0 block exponents."""

    name = "mxfp4"
    label = "MXFP4"

    def weights(self, source) -> dict[str, EncodedWeight]:
        """Every ``*_blocks`` stack with its ``*_scales`` (checked); a stray ``*_scales`` is refused."""
        out = {}
        for name, info in source.tensors.items():
            if name.endswith(BLOCKS_SUFFIX):
                base = name[: -len(BLOCKS_SUFFIX)]
                scale = source.tensors.get(base + SCALES_SUFFIX)
                check_layout(info, scale)
                e, rows, groups, _ = info.shape
                out[name] = EncodedWeight(base, (e, groups * BLOCK, rows), info, (scale,), self)
        for name, info in source.tensors.items():
            if name.endswith(SCALES_SUFFIX) and info.dtype == "U8" \
                    and name[: -len(SCALES_SUFFIX)] + BLOCKS_SUFFIX not in source.tensors:
                raise SourceError(f"{info.path}: tensor {name!r} looks like MXFP4 scales but the checkpoint has no "
                                  f"{name[: -len(SCALES_SUFFIX)]}{BLOCKS_SUFFIX}")
        return out

    def dequantize(self, weight: EncodedWeight, codes: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        return dequantize(codes, parts[0]).transpose(1, 2).contiguous()

    def note(self) -> str:
        return ("MXFP4 source (gpt-oss): expert stacks are dequantized on the device; their quantization_config "
                "and *_blocks/*_scales tensors are replaced")

    def describe(self) -> str:
        return "MXFP4 source (gpt-oss expert stacks), E8M0 scales per 32 elements"


def check_layout(blocks, scales) -> None:
    """``blocks`` uint8 ``[E, out, G, 16]`` of a gpt-oss expert stack, ``scales`` uint8 ``[E, out, G]``."""
    base = blocks.name[: -len(BLOCKS_SUFFIX)]
    if blocks.dtype != "U8" or len(blocks.shape) != 4 or blocks.shape[-1] != BLOCK // 2:
        raise SourceError(f"{blocks.path}: tensor {blocks.name!r} is {blocks.dtype}{list(blocks.shape)}; MXFP4 "
                          f"blocks must be U8 [experts, out, in/{BLOCK}, {BLOCK // 2}]")
    if not _STACK.search(base):
        raise SourceError(f"{blocks.path}: tensor {blocks.name!r}: MXFP4 outside a gpt-oss expert stack "
                          "(experts.gate_up_proj / experts.down_proj) is not supported")
    if scales is None:
        raise SourceError(f"{blocks.path}: tensor {blocks.name!r} is MXFP4 but the checkpoint has no "
                          f"{base}{SCALES_SUFFIX}")
    if scales.dtype != "U8" or tuple(scales.shape) != tuple(blocks.shape[:3]):
        raise SourceError(f"{scales.path}: tensor {scales.name!r} is {scales.dtype}{list(scales.shape)}; expected "
                          f"U8 {list(blocks.shape[:3])} (one E8M0 exponent per {BLOCK} elements of {blocks.name})")


def pow2(e8m0: torch.Tensor) -> torch.Tensor:
    """``2**(e8m0 - 127)`` as float32, built from its bits (exact on any device; 255 gives NaN)."""
    e = e8m0.to(torch.int32)
    bits = torch.where(e == 0, torch.full_like(e, 1 << 22), e << 23)  # 2**-127 is an fp32 subnormal
    bits = torch.where(e == 255, torch.full_like(e, 0x7FC00000), bits)
    return bits.view(torch.float32)


def dequantize(blocks: torch.Tensor, e8m0: torch.Tensor, dtype: torch.dtype = DEQUANT_DTYPE) -> torch.Tensor:
    """``[E, out, G, 16]`` codes and ``[E, out, G]`` exponents -> ``[E, out, G*32]`` in ``dtype``, one expert
    at a time: ``e2m1(code) * 2**k`` in fp32 (exact: at most 2 significant bits), then cast (exact in bf16)."""
    e, rows, groups, half = blocks.shape
    table = torch.tensor(E2M1, dtype=torch.float32, device=blocks.device)
    out = torch.empty((e, rows, groups * half * 2), dtype=dtype, device=blocks.device)
    scale = pow2(e8m0.to(blocks.device))
    for i in range(e):
        b = blocks[i]
        vals = torch.stack((table[(b & 0x0F).long()], table[(b >> 4).long()]), dim=-1)  # [out, G, 16, 2]
        vals = vals.reshape(rows, groups, half * 2) * scale[i].unsqueeze(-1)
        out[i] = vals.reshape(rows, groups * half * 2).to(dtype)
    return out
