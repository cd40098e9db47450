"""compressed-tensors ``nvfp4-pack-quantized`` (FORMAT.md §6): what vLLM and transformers load as
``quant_method: compressed-tensors``.

Same numbers as the ModelOpt layout, other names and one other convention: the global scales are
divisors. Per quantized Linear ``M``: ``M.weight_packed`` (the ModelOpt ``weight`` bytes),
``M.weight_scale`` (e4m3), ``M.weight_global_scale = 1 / weight_scale_2`` and, W4A4 only,
``M.input_global_scale = 1 / input_scale``, both float32 ``[1]`` (as compressed-tensors' own
``modelopt_nvfp4`` converter computes them: one IEEE fp32 division). Stacked 3-D experts have no
layout here and stay in source precision; FP8 KV-cache scales are not written.
"""

from __future__ import annotations

import re

import torch

from ..numerics import BLOCK
from ..safetensors_io import DTYPE_NAMES
from ..shard_writer import PlannedTensor

FORMAT = "nvfp4-pack-quantized"


def _divisor(scale: torch.Tensor) -> torch.Tensor:
    """``1 / scale`` as float32 ``[1]``, on the scale's device (a correctly rounded division anywhere)."""
    s = scale.float().reshape(1)
    return torch.ones_like(s).div_(s)


def ignore_entry(pattern: str) -> str:
    """A ModelOpt exclusion (exact name or ``root.*``) as a compressed-tensors ``ignore`` entry
    (exact name or ``re:`` regex, matched with ``re.match``)."""
    if pattern.endswith(".*"):
        return "re:" + re.escape(pattern[:-2]) + r"\."
    return pattern


class CompressedTensorsFormat:
    name = "compressed-tensors"
    supports_stacked_experts = False
    supports_kv_cache = False

    @staticmethod
    def dtype_name(t: torch.Tensor) -> str:
        return DTYPE_NAMES[t.dtype]

    def quantized_outputs(self, module: str, out: int, in_: int, w4a4: bool,
                          experts: int | None = None) -> list[PlannedTensor]:
        if experts is not None:
            raise ValueError(f"{module}: stacked experts have no compressed-tensors layout")
        tensors = [
            PlannedTensor(f"{module}.weight_packed", "U8", (out, in_ // 2)),
            PlannedTensor(f"{module}.weight_scale", "F8_E4M3", (out, in_ // BLOCK)),
            PlannedTensor(f"{module}.weight_global_scale", "F32", (1,)),
        ]
        if w4a4:
            tensors.append(PlannedTensor(f"{module}.input_global_scale", "F32", (1,)))
        return tensors

    def quantized_tensors(self, module: str, q) -> dict[str, torch.Tensor]:
        out = {
            f"{module}.weight_packed": q.packed,
            f"{module}.weight_scale": q.scale,
            f"{module}.weight_global_scale": _divisor(q.scale_2),
        }
        if q.input_scale is not None:
            out[f"{module}.input_global_scale"] = _divisor(q.input_scale)
        return out

    def kv_scales(self, attention: str, k_amax: torch.Tensor, v_amax: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError("the compressed-tensors output carries no FP8 KV-cache scales")

    def config_files(self, plan, config: dict) -> dict[str, dict]:
        """``config.json`` with a ``quantization_config`` that compressed-tensors 0.12+ parses."""
        fp4 = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": BLOCK,
               "strategy": "tensor_group", "dynamic": False}
        group = {
            "targets": ["Linear"],
            "weights": dict(fp4),
            # compressed-tensors' NVFP4 preset: a static global scale, block scales computed per
            # token group at run time ("local"); `false` would make it expect a static input_scale.
            "input_activations": dict(fp4, dynamic="local") if plan.w4a4 else None,
            "output_activations": None,
        }
        qc = {
            "config_groups": {"group_0": group},
            "format": FORMAT,
            "ignore": [ignore_entry(p) for p in plan.exclude_list()],
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
        }
        new_config = dict(config)
        new_config["quantization_config"] = qc
        return {"config.json": new_config}
