"""ModelOpt's unified Hugging Face checkpoint (FORMAT.md §5): what vLLM, SGLang and TensorRT-LLM load
as ``quant_method: modelopt``.
"""

from __future__ import annotations

import torch

from ..mixed import quantized_layers
from ..numerics import BLOCK, FP8_MAX, div_scalar
from ..safetensors_io import DTYPE_NAMES
from ..shard_writer import PlannedTensor

PRODUCER = {"name": "modelopt", "version": "0.47.0"}
KV_SCHEMA_VERSION = 1


def kv_layers(plan) -> dict | None:
    """The per-layer KV-cache declaration newer ModelOpt writes when only some attention modules carry
    FP8 KV-cache scales (``kv_cache_quantized_layers``, schema 1), or None when all (or none) do: the
    output then stays as ModelOpt 0.47 writes it."""
    if not (plan.kv_cache and plan.kv_partial):
        return None
    return {"kv_cache_quantized_layers": {a: {"quant_algo": "FP8"} for a in sorted(plan.kv_attentions)},
            "kv_cache_schema_version": KV_SCHEMA_VERSION}


class ModelOptFormat:
    name = "modelopt"
    supports_mixed_precision = True  # FP8 layers beside NVFP4 ones (ModelOpt's MIXED_PRECISION)

    @staticmethod
    def dtype_name(t: torch.Tensor) -> str:
        return DTYPE_NAMES[t.dtype]

    def quantized_outputs(self, module: str, out: int, in_: int, w4a4: bool,
                          experts: int | None = None) -> list[PlannedTensor]:
        if experts is not None:  # stacked experts: ModelOpt's transposed BMM layout, names extend the tensor's
            tensors = [
                PlannedTensor(module, "U8", (experts, in_ // 2, out)),
                PlannedTensor(f"{module}_weight_scale", "F8_E4M3", (experts, in_ // BLOCK, out)),
                PlannedTensor(f"{module}_weight_scale_2", "F32", ()),
            ]
            if w4a4:
                tensors.append(PlannedTensor(f"{module}_input_scale", "F32", ()))
            return tensors
        tensors = [
            PlannedTensor(f"{module}.weight", "U8", (out, in_ // 2)),
            PlannedTensor(f"{module}.weight_scale", "F8_E4M3", (out, in_ // BLOCK)),
            PlannedTensor(f"{module}.weight_scale_2", "F32", ()),
        ]
        if w4a4:
            tensors.append(PlannedTensor(f"{module}.input_scale", "F32", ()))
        return tensors

    def fp8_outputs(self, module: str, out: int, in_: int, w4a4: bool) -> list[PlannedTensor]:
        """A per-tensor FP8 Linear: ``weight`` e4m3 ``[out, in]``, ``weight_scale`` and ``input_scale`` f32 0-d."""
        tensors = [
            PlannedTensor(f"{module}.weight", "F8_E4M3", (out, in_)),
            PlannedTensor(f"{module}.weight_scale", "F32", ()),
        ]
        if w4a4:
            tensors.append(PlannedTensor(f"{module}.input_scale", "F32", ()))
        return tensors

    def quantized_tensors(self, module: str, q) -> dict[str, torch.Tensor]:
        if getattr(q, "fp8", False):  # quantize.Fp8Weight
            out = {f"{module}.weight": q.packed, f"{module}.weight_scale": q.scale.reshape(())}
            if q.input_scale is not None:
                out[f"{module}.input_scale"] = q.input_scale.reshape(())
            return out
        if q.packed.dim() == 3:  # stacked experts: ``gate_up_proj``, ``gate_up_proj_weight_scale``, ...
            out = {module: q.packed, f"{module}_weight_scale": q.scale, f"{module}_weight_scale_2": q.scale_2.reshape(())}
            if q.input_scale is not None:
                out[f"{module}_input_scale"] = q.input_scale.reshape(())
            return out
        out = {
            f"{module}.weight": q.packed,
            f"{module}.weight_scale": q.scale,
            f"{module}.weight_scale_2": q.scale_2.reshape(()),
        }
        if q.input_scale is not None:
            out[f"{module}.input_scale"] = q.input_scale.reshape(())
        return out

    def kv_scales(self, attention: str, k_amax: torch.Tensor, v_amax: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            f"{attention}.k_proj.k_scale": div_scalar(k_amax.float(), FP8_MAX).reshape(()),
            f"{attention}.v_proj.v_scale": div_scalar(v_amax.float(), FP8_MAX).reshape(()),
        }

    def config_files(self, plan, config: dict) -> dict[str, dict]:
        """``config.json`` (with ``quantization_config``) and ``hf_quant_config.json`` contents."""
        if plan.mixed:
            return mixed_config_files(plan, config)
        exclude = plan.exclude_list()
        kv_algo = "FP8" if plan.kv_cache else None
        hf_quant = {
            "producer": dict(PRODUCER),
            "quantization": {
                "quant_algo": plan.quant_algo,
                "kv_cache_quant_algo": kv_algo,
                "group_size": BLOCK,
                "exclude_modules": exclude,
            },
        }
        fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": BLOCK}
        group: dict[str, object] = {}
        if plan.w4a4:
            group["input_activations"] = dict(fp4)
        group["weights"] = dict(fp4)
        group["targets"] = ["Linear"]
        qc: dict[str, object] = {
            "config_groups": {"group_0": group},
            "ignore": exclude,
            "quant_algo": plan.quant_algo,
        }
        return _config_files(plan, config, hf_quant, qc)


def _config_files(plan, config: dict, hf_quant: dict, qc: dict) -> dict[str, dict]:
    """What every ModelOpt quantization config ends with, NVFP4 or mixed: the KV cache scheme and, when
    only some attention layers have k/v scales, their list (verification/kv_layers.py; without it a
    global FP8 KV claim would cover layers that have none), then the producer and ``quant_method``."""
    layers = kv_layers(plan)
    if layers is not None:
        hf_quant["quantization"].update(layers)
    if plan.kv_cache:
        qc["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
        if layers is not None:
            qc.update(layers)
    qc["producer"] = dict(PRODUCER)
    qc["quant_method"] = "modelopt"
    new_config = dict(config)
    new_config["quantization_config"] = qc
    return {"config.json": new_config, "hf_quant_config.json": hf_quant}


def _group_config(algo: str) -> dict:
    """A config_groups entry for one per-layer quant_algo (the keys vLLM and compressed-tensors read)."""
    if algo == "FP8":
        fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
        return {"input_activations": dict(fp8), "weights": dict(fp8)}
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": BLOCK}
    group = {"input_activations": dict(fp4)} if algo == "NVFP4" else {}
    group["weights"] = dict(fp4)
    return group


def mixed_config_files(plan, config: dict) -> dict[str, dict]:
    """MIXED_PRECISION as ModelOpt 0.47 writes it (README, Mixed precision): ``quantized_layers`` maps
    each quantized module (experts: their ``...experts`` module) to its quant_algo; modules absent from
    it are unquantized, so no exclusion list is written (ModelOpt writes none; ``ignore`` is empty)."""
    layers = quantized_layers(plan)
    kv_algo = "FP8" if plan.kv_cache else None
    hf_quant = {
        "producer": dict(PRODUCER),
        "quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": kv_algo,
                         "quantized_layers": layers},
    }
    by_algo: dict[tuple, list[str]] = {}
    for name, algo in layers.items():
        by_algo.setdefault(tuple(sorted(algo.items())), []).append(name)
    groups = {}
    for i, (key, names) in enumerate(by_algo.items()):
        group = _group_config(dict(key)["quant_algo"])
        group["targets"] = sorted(names)
        groups[f"group_{i}"] = group
    qc: dict[str, object] = {"config_groups": groups, "quantized_layers": layers, "ignore": [],
                             "quant_algo": "MIXED_PRECISION"}
    return _config_files(plan, config, hf_quant, qc)
