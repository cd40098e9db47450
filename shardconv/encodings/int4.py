"""INT4 sources: compressed-tensors ``pack-quantized`` (Kimi-K2-Thinking style), dequantized on the fly.

A quantized Linear ``M`` stores ``M.weight_packed`` int32 ``[out, ceil(in/8)]`` (eight signed 4-bit
values per word, each stored as ``value + 8``, the lowest nibble holding the lowest column),
``M.weight_scale`` ``[out, in/group]`` (one multiplier per group of ``group`` columns; ``[out, 1]``
per channel) and ``M.weight_shape`` (``[out, in]``, two integers). Only symmetric weights are read
(no zero point, no activation reordering).

Dequantization: ``bf16(fp32(q) * fp32(scale))``. For a bf16 or fp16 scale the fp32 product is exact
(at most 4 + 11 significant bits), so this is the correctly rounded product, what compressed-tensors
computes in bf16; an fp32 scale gives one fp32 rounding and then the bf16 cast, as compressed-tensors'
fp32 dequantization followed by a cast. Integer unpacking and one IEEE multiply per element: CPU and
CUDA give the same bytes.

Shapes come from the headers (``in`` = groups x group size, or packed columns x 8 per channel);
``weight_shape`` is data, so it is read only when the weight is dequantized (with the scale, before
either goes to the device) and must agree: reading some 70,000 tiny tensors scattered over a 600 GB
checkpoint at plan time would cost a cold disk minutes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SourceError
from ..numerics import CHUNK_ELEMENTS
from .base import DEQUANT_DTYPE, EncodedWeight, Encoding

PACKED, SCALE, SHAPE = ".weight_packed", ".weight_scale", ".weight_shape"
FORMAT = "pack-quantized"


@dataclass(frozen=True)
class Int4Packed(Encoding):
    """A symmetric INT4 source: ``group`` columns per scale, or None for one scale per row (channel)."""

    group: int | None
    name = "int4-packed"
    label = "INT4"

    def _what(self) -> str:
        return f"group size {self.group}" if self.group else "per channel"

    def weights(self, source) -> dict[str, EncodedWeight]:
        """Every ``.weight_packed`` with its ``weight_scale`` and ``weight_shape`` (checked from headers)."""
        out = {}
        for name, info in source.tensors.items():
            if not name.endswith(PACKED):
                continue
            module = name[: -len(PACKED)]
            for extra in (".weight", ".weight_zero_point", ".weight_g_idx"):
                if module + extra in source.tensors:
                    other = source.tensors[module + extra]
                    raise SourceError(f"{other.path}: tensor {other.name!r} beside {name}: a symmetric "
                                      f"pack-quantized INT4 Linear has only weight_packed, weight_scale, weight_shape")
            if info.dtype != "I32" or len(info.shape) != 2:
                raise SourceError(f"{info.path}: tensor {name!r} is {info.dtype}{list(info.shape)}; expected a 2-D "
                                  "int32 [out, in/8] (8 INT4 values per word)")
            scale, shape = source.tensors.get(module + SCALE), source.tensors.get(module + SHAPE)
            for part, suffix in ((scale, SCALE), (shape, SHAPE)):
                if part is None:
                    raise SourceError(f"{info.path}: tensor {name!r} is INT4 pack-quantized but the checkpoint has "
                                      f"no {module}{suffix}")
            if shape.dtype not in ("I64", "I32") or list(shape.shape) != [2]:
                raise SourceError(f"{shape.path}: tensor {shape.name!r} is {shape.dtype}{list(shape.shape)}; expected "
                                  f"two integers [out, in] (the shape of {module}.weight)")
            plain = (info.shape[0], self._in_features(info, scale))
            out[name] = EncodedWeight(module + ".weight", plain, info, (scale, shape), self)
        for name, info in source.tensors.items():  # a part whose codes are gone: the module would vanish
            for suffix in (SCALE, SHAPE):
                if name.endswith(suffix) and name[: -len(suffix)] + PACKED not in source.tensors:
                    raise SourceError(f"{info.path}: tensor {name!r} has no {name[: -len(suffix)]}{PACKED} beside "
                                      "it (an INT4 Linear without its packed weights)")
        return out

    def _in_features(self, packed, scale) -> int:
        rows, words = packed.shape
        if scale.dtype not in ("BF16", "F16", "F32") or len(scale.shape) != 2 or scale.shape[0] != rows:
            raise SourceError(f"{scale.path}: tensor {scale.name!r} is {scale.dtype}{list(scale.shape)}; expected a "
                              f"float [{rows}, groups] ({self._what()} of {packed.name} {list(packed.shape)})")
        in_features = scale.shape[1] * self.group if self.group else words * 8
        want = [rows, math.ceil(in_features / 8)] if self.group else [rows, 1]
        got = list(packed.shape) if self.group else list(scale.shape)
        if got != want or in_features == 0:
            raise SourceError(f"{scale.path}: tensor {scale.name!r} {list(scale.shape)} does not fit {packed.name} "
                              f"{list(packed.shape)} ({self._what()}: {scale.shape[1]} scales per row give "
                              f"{in_features} columns, {math.ceil(in_features / 8)} int32 words)")
        return in_features

    def check_parts(self, weight: EncodedWeight, parts: list[torch.Tensor]) -> None:
        """``weight_shape`` equals the planned shape; every scale is finite (read on the host)."""
        scale, shape = parts
        scale_info, shape_info = weight.parts
        if [int(v) for v in shape.reshape(-1).tolist()] != list(weight.shape):  # dtype and size checked at plan
            raise SourceError(f"{shape_info.path}: tensor {shape_info.name!r} holds {shape.reshape(-1).tolist()}; its "
                              f"{weight.data.name} {list(weight.data.shape)} and {scale_info.name} "
                              f"{list(scale_info.shape)} give {list(weight.shape)}")
        bad = ~torch.isfinite(scale)
        if bool(bad.any()):
            where = ", ".join(str(int(i)) for i in bad.nonzero()[0])
            raise SourceError(f"{scale_info.path}: tensor {scale_info.name!r} has NaN/Inf scales (first at [{where}]); "
                              f"cannot dequantize {weight.data.name}")

    def dequantize(self, weight: EncodedWeight, codes: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        return dequantize(codes, parts[0], weight.shape[1], self.group)

    def note(self) -> str:
        return (f"INT4 source (compressed-tensors {FORMAT}, symmetric, {self._what()}): weights are dequantized to "
                "bf16 first (fp32 int4 x scale, cast to bf16); its quantization_config and weight_scale / weight_shape "
                "tensors are replaced")

    def describe(self) -> str:
        return f"INT4 source ({FORMAT}, {self._what()}), dequantized to bf16"


def unpack(codes: torch.Tensor, in_features: int) -> torch.Tensor:
    """Signed INT4 values (int32, ``[rows, in_features]``) of int32 words holding eight ``value + 8``
    nibbles each, lowest first. Shifts and masks only: no byte order, no device dependence."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=codes.device)  # made on the device: no copy, no sync
    nibbles = (codes.unsqueeze(-1) >> shifts) & 0xF
    return (nibbles.reshape(codes.shape[0], -1)[:, :in_features] - 8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, in_features: int, group: int | None,
               dtype: torch.dtype = DEQUANT_DTYPE, chunk: int | None = None) -> torch.Tensor:
    """``dtype(fp32(int4) * fp32(scale[group]))`` of packed INT4 ``codes``, in row chunks, on their device."""
    rows = codes.shape[0]
    group = group or in_features
    out = torch.empty((rows, in_features), dtype=dtype, device=codes.device)
    scale = scale.to(codes.device)
    step = max(1, (chunk or CHUNK_ELEMENTS) // max(in_features, 1))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        q = unpack(codes[start:stop], in_features).float().view(stop - start, -1, group)
        s = scale[start:stop].float().unsqueeze(-1)
        out[start:stop] = (q * s).view(stop - start, in_features).to(dtype)
    return out


def from_config(qc: dict, where: str) -> Int4Packed:
    """The encoding of a compressed-tensors ``pack-quantized`` config, or one line naming the config key
    shardconv cannot read (asymmetric, activation reordering, other bit widths, activation or KV-cache
    quantization, differing groups)."""
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if qc.get(key):
            raise SourceError(f"{where}.{key} is set: INT4 sources with {key} are not supported")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise SourceError(f"{where}.quantization_status is {status!r}: only 'compressed' (packed) INT4 is read")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise SourceError(f"{where}.config_groups is missing: cannot tell the INT4 group size")
    found: dict[int | None, str] = {}
    for gname, g in groups.items():
        at = f"{where}.config_groups.{gname}"
        w = g.get("weights") if isinstance(g, dict) else None
        if not isinstance(w, dict):
            raise SourceError(f"{at}.weights is missing or not an object")
        if g.get("format", FORMAT) != FORMAT:
            raise SourceError(f"{at}.format is {g.get('format')!r}: only {FORMAT!r} INT4 groups are supported")
        for key in ("input_activations", "output_activations"):
            if g.get(key):
                raise SourceError(f"{at}.{key} is set: only weight-only INT4 (W4A16) sources are supported")
        checks = (("num_bits", w.get("num_bits") == 4, "only 4-bit"), ("type", w.get("type") == "int", "only int"),
                  ("symmetric", w.get("symmetric", True) is True, "asymmetric INT4 (zero points) is not supported"),
                  ("actorder", not w.get("actorder"), "activation reordering (g_idx) is not supported"),
                  ("dynamic", not w.get("dynamic"), "dynamic weights are not supported"),
                  ("block_structure", not w.get("block_structure"), "block strategies are not supported"))
        for key, ok, why in checks:
            if not ok:
                raise SourceError(f"{at}.weights.{key} is {w.get(key)!r}: {why}")
        strategy, size = w.get("strategy"), w.get("group_size")
        if strategy == "group" and type(size) is int and size > 0:
            found[size] = gname
        elif strategy == "channel":
            found[None] = gname
        else:
            raise SourceError(f"{at}.weights.strategy is {strategy!r} with group_size {size!r}: only 'group' (a "
                              "positive group_size) or 'channel' INT4 is supported")
    if len(found) > 1:
        raise SourceError(f"{where}.config_groups {', '.join(found.values())} differ in group size: one INT4 scheme "
                          "per checkpoint is supported")
    return Int4Packed(next(iter(found)))
