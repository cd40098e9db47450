"""FP8 block-quantized sources (DeepSeek-V3 style), dequantized on the fly.

DeepSeek-V3-style FP8 (``quantization_config.quant_method: "fp8"`` with ``weight_block_size
[b0, b1]``): every such Linear stores ``M.weight`` as float8_e4m3fn ``[out, in]`` and
``M.weight_scale_inv`` (float32) ``[ceil(out/b0), ceil(in/b1)]``, one multiplier per block. A weight
is dequantized exactly as DeepSeek's ``fp8_cast_bf16.py`` and ModelOpt's ``weight_dequant`` do:
``bf16(fp32(w) * fp32(scale_inv))`` (one correctly rounded fp32 multiply, then a round-to-nearest-even
cast), so CPU and CUDA give the same bytes, and converting the FP8 checkpoint gives the same NVFP4
bytes as converting its bf16 dequantization. Quantized members are dequantized on the quantization
device; FP8 weights that stay in source precision (excluded) are written dequantized as bf16, since
the FP8 ``quantization_config`` they belonged to is replaced. ``weight_scale_inv`` (and FP8
activation ``input_scale``) tensors are dropped from the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SourceError
from ..numerics import CHUNK_ELEMENTS
from .base import DEQUANT_DTYPE, EncodedWeight, Encoding

SCALE_SUFFIX = ".weight_scale_inv"

@dataclass(frozen=True)
class Fp8Blocks(Encoding):
    """An FP8 block-quantized source: the block shape ``(rows, cols)`` of ``weight_scale_inv``."""

    block: tuple[int, int]
    name = "fp8-blocks"
    label = "FP8"

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (math.ceil(shape[0] / self.block[0]), math.ceil(shape[1] / self.block[1]))

    def weights(self, source) -> dict[str, EncodedWeight]:
        """Every 2-D float8_e4m3fn ``.weight`` with its ``weight_scale_inv`` (checked)."""
        out = {}
        for name, info in source.tensors.items():
            if info.dtype == "F8_E4M3" and name.endswith(".weight") and len(info.shape) == 2:
                scale = source.tensors.get(name[: -len(".weight")] + SCALE_SUFFIX)
                check_scale(info, scale, self)
                out[name] = EncodedWeight(name, tuple(info.shape), info, (scale,), self)
        return out

    def dropped(self, source, weights: dict[str, EncodedWeight]) -> set[str]:
        """The block scales, and the FP8 activation ``input_scale`` of each FP8 Linear."""
        return super().dropped(source, weights) | {n[: -len(".weight")] + ".input_scale" for n in weights}

    def dequantize(self, weight: EncodedWeight, codes: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        return dequantize(codes, parts[0], self.block)

    def note(self) -> str:
        return (f"FP8 source ({self.block[0]}x{self.block[1]} blocks): weights are dequantized to bf16 first; "
                "its quantization_config and weight_scale_inv tensors are replaced")

    def describe(self) -> str:
        return f"FP8 source, {self.block[0]}x{self.block[1]} blocks, dequantized to bf16"


def check_scale(weight, scale, spec: Fp8Blocks) -> None:
    """A FP8 weight's ``weight_scale_inv``: present, float, and one value per block."""
    if scale is None:
        raise SourceError(
            f"{weight.path}: tensor {weight.name!r} is float8_e4m3fn but the checkpoint has no "
            f"{weight.name[: -len('.weight')]}{SCALE_SUFFIX}"
        )
    want = spec.scale_shape(weight.shape)
    if scale.dtype not in ("F32", "BF16", "F16") or tuple(scale.shape) != want:
        raise SourceError(
            f"{scale.path}: tensor {scale.name!r} is {scale.dtype}{list(scale.shape)}; expected a float "
            f"{list(want)} (one per {spec.block[0]}x{spec.block[1]} block of {weight.name} {list(weight.shape)})"
        )


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype = DEQUANT_DTYPE, chunk: int | None = None) -> torch.Tensor:
    """``dtype(fp32(weight) * fp32(scale_inv[block]))`` for an FP8 ``[out, in]`` weight, in row chunks.

    Runs on the tensors' device; the bytes do not depend on it (one IEEE multiply per element).
    """
    rows, cols = weight.shape
    b0, b1 = block
    out = torch.empty((rows, cols), dtype=dtype, device=weight.device)
    scale = scale_inv.to(weight.device).float()
    step = max(1, (chunk or CHUNK_ELEMENTS) // max(cols, 1) // b0) * b0  # whole row blocks per chunk
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        s = scale[start // b0 : math.ceil(stop / b0)].repeat_interleave(b0, dim=0)[: stop - start]
        s = s.repeat_interleave(b1, dim=1)[:, :cols]
        out[start:stop] = (weight[start:stop].float() * s).to(dtype)
    return out


