"""Quantized inputs: FP8 block-quantized checkpoints are dequantized on the fly; 4-bit ones are refused.

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

import json
import math
from dataclasses import dataclass

import torch

from .errors import SourceError

DEQUANT_DTYPE = torch.bfloat16
DEQUANT_DTYPE_NAME = "BF16"
SCALE_SUFFIX = ".weight_scale_inv"
CHUNK_ELEMENTS = 1 << 24

# quant_method -> what it is, for the refusal message; all of these store 4-bit (or lower) weights.
_FOUR_BIT = {
    "gptq": "GPTQ int4",
    "awq": "AWQ int4",
    "mxfp4": "MXFP4",
    "bitnet": "BitNet",
    "aqlm": "AQLM",
    "vptq": "VPTQ",
    "higgs": "HIGGS",
    "spqr": "SpQR",
    "hqq": "HQQ",
    "quark": "Quark",
    "auto-round": "AutoRound",
    "autoround": "AutoRound",
}
# tensor-name endings that only quantized checkpoints have (a config may have been stripped)
_QUANTIZED_TENSORS = (
    (".weight_packed", "compressed-tensors packed weights"),
    (".weight_scale_2", "ModelOpt NVFP4 weights"),
    (".qweight", "GPTQ/AWQ packed weights"),
    ("_blocks", "MXFP4 weights"),
    (".SCB", "bitsandbytes weights"),
    (".absmax", "bitsandbytes weights"),
    (".quant_state.bitsandbytes__nf4", "bitsandbytes NF4 weights"),
    (".quant_state.bitsandbytes__fp4", "bitsandbytes FP4 weights"),
)
_NEEDS = "shardconv needs bf16, fp16 or fp32 weights, or FP8 block-quantized ones (quant_method 'fp8' with weight_block_size)"


@dataclass(frozen=True)
class Fp8Blocks:
    """An FP8 block-quantized source: the block shape ``(rows, cols)`` of ``weight_scale_inv``."""

    block: tuple[int, int]

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (math.ceil(shape[0] / self.block[0]), math.ceil(shape[1] / self.block[1]))


def _already_4bit(where, what: str) -> SourceError:
    return SourceError(f"{where}: the checkpoint is already quantized to 4 bits ({what}); {_NEEDS}")


def input_quantization(source) -> Fp8Blocks | None:
    """What the source's weights are: ``None`` for plain floating point, :class:`Fp8Blocks` for FP8 blocks.

    Refuses, with one line, checkpoints that are already NVFP4 or another 4-bit format, and any other
    quantized input (per-tensor FP8, int8, ...).
    """
    cfg_path = source.root / "config.json"
    qc = source.config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise SourceError(f"{cfg_path}: quantization_config is not an object")
    if not qc:
        hf_quant = source.root / "hf_quant_config.json"
        if hf_quant.is_file():
            try:
                algo = str(json.loads(hf_quant.read_text())["quantization"]["quant_algo"])
            except Exception:
                algo = "?"
            if "FP8" in algo.upper() or "INT8" in algo.upper():
                raise SourceError(f"{hf_quant}: the checkpoint is already quantized (ModelOpt {algo}); {_NEEDS}")
            raise _already_4bit(hf_quant, f"ModelOpt export, quant_algo {algo}")
        for name, info in source.tensors.items():
            for suffix, what in _QUANTIZED_TENSORS:
                if name.endswith(suffix) and (suffix != "_blocks" or info.dtype == "U8"):
                    raise _already_4bit(info.path, f"{what}: tensor {name!r}")
        return None

    method = str(qc.get("quant_method", "?")).lower()
    where = f"{cfg_path}: quantization_config"
    if method == "fp8":
        block = qc.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
            raise SourceError(
                f"{where}: FP8 without a [rows, cols] weight_block_size (per-tensor or per-channel FP8) is not "
                f"supported; {_NEEDS}"
            )
        fmt = str(qc.get("fmt", "e4m3")).lower()
        if fmt != "e4m3":
            raise SourceError(f"{where}: FP8 fmt {fmt!r} is not supported (only e4m3)")
        return Fp8Blocks((int(block[0]), int(block[1])))
    if method == "modelopt":
        algo = str(qc.get("quant_algo") or qc.get("quantization", {}).get("quant_algo") or "?")
        if "FP4" in algo.upper() or "W4" in algo.upper() or "INT4" in algo.upper():
            raise _already_4bit(where, f"ModelOpt {algo}")
        raise SourceError(f"{where}: the checkpoint is already quantized (ModelOpt {algo}); {_NEEDS}")
    if method == "compressed-tensors":
        bits = set()
        for group in (qc.get("config_groups") or {}).values():
            if isinstance(group, dict) and isinstance(group.get("weights"), dict):
                bits.add(group["weights"].get("num_bits"))
        fmt = qc.get("format", "?")
        if bits & {2, 3, 4} or "fp4" in str(fmt) or "int4" in str(fmt):
            raise _already_4bit(where, f"compressed-tensors {fmt}")
        raise SourceError(f"{where}: the checkpoint is already quantized (compressed-tensors {fmt}); {_NEEDS}")
    if method == "bitsandbytes":
        what = "bitsandbytes 4-bit" if qc.get("load_in_4bit") or qc.get("_load_in_4bit") else None
        if what:
            raise _already_4bit(where, what)
        raise SourceError(f"{where}: the checkpoint is already quantized (bitsandbytes 8-bit); {_NEEDS}")
    if method in _FOUR_BIT:
        bits = qc.get("bits", qc.get("w_bit", 4))
        if bits in (None, 2, 3, 4) or method in ("mxfp4", "bitnet"):
            raise _already_4bit(where, _FOUR_BIT[method])
    raise SourceError(f"{where}: the checkpoint is already quantized (quant_method {method!r}); {_NEEDS}")


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


def isfinite(t: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite`` that also takes float8_e4m3fn (whose only non-finite codes are 0x7F and 0xFF)."""
    if t.dtype == torch.float8_e4m3fn:
        return (t.view(torch.uint8) & 0x7F) != 0x7F
    return torch.isfinite(t)


def source_weight(member, weight: torch.Tensor) -> torch.Tensor:
    """The weight a member is quantized from: FP8 members are dequantized (scale read here, it is small)."""
    if getattr(member, "scale_inv", None) is None:
        return weight
    from .safetensors_io import read_into

    return dequantize(weight, read_into(member.scale_inv), member.fp8_block)


def dequantize_tensor(weight_info, scale_info, block: tuple[int, int], device="cpu") -> torch.Tensor:
    """Read an excluded FP8 weight and its scale, dequantize on ``device``, return it on the CPU."""
    from .safetensors_io import read_into

    w = read_into(weight_info).to(device)
    out = dequantize(w, read_into(scale_info), block).cpu()
    bad = ~torch.isfinite(out)
    if bool(bad.any()):  # e.g. an Inf or NaN weight_scale_inv, or one that overflows bf16
        row, col = (int(i) for i in bad.nonzero()[0])
        raise SourceError(f"{weight_info.path}: tensor {weight_info.name!r} dequantizes to NaN/Inf (first at row "
                             f"{row}, column {col}; its {scale_info.name} holds {float(read_into(scale_info)[row // block[0], col // block[1]])})")
    return out
