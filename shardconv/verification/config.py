"""Verify, the quantization declared in config.json and hf_quant_config.json against the tensors:
NVFP4 and nothing else (4-bit floats in blocks of 16), W4A4 or W4A16 as the tensors are, no quant_algo
without quantized tensors, and FP8 KV-cache scales declared, finite, positive and on attention
modules that exist."""

from __future__ import annotations

import math
from pathlib import Path

from ..numerics import BLOCK
from ..safetensors_io import TensorInfo
from .mixed import declared as declared_mixed
from .modules import scalar
from .report import NVFP4_ALGOS, QModule, Report

_KV_SUFFIXES = (".k_scale", ".v_scale")


def _check_groups_config(qc: dict, convention: str, report: Report, where: Path) -> bool:
    """config_groups: weights (and input_activations) are 4-bit floats in blocks of 16. Returns whether
    any group quantizes input activations."""
    groups = qc.get("config_groups")
    if groups is None:
        return False
    if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
        report.fail(f"{where}: quantization_config.config_groups is not an object of groups")
        return False
    w4a4 = False
    for gname, group in groups.items():
        for part in ("weights", "input_activations"):
            spec = group.get(part)
            if spec is None:
                continue
            at = f"{where}: quantization_config.config_groups.{gname}.{part}"
            if not isinstance(spec, dict):
                report.fail(f"{at} is not an object")
                continue
            w4a4 |= part == "input_activations"
            if spec.get("num_bits") != 4:
                report.fail(f"{at}.num_bits is {spec.get('num_bits')!r}, not 4 (NVFP4 is 4-bit)")
            if spec.get("group_size") != BLOCK:
                report.fail(f"{at}.group_size is {spec.get('group_size')!r}, not {BLOCK} (NVFP4 blocks are 16)")
            if spec.get("type", "float") != "float":
                report.fail(f"{at}.type is {spec.get('type')!r}, not 'float'")
            if convention == "compressed-tensors" and spec.get("strategy", "tensor_group") != "tensor_group":
                report.fail(f"{at}.strategy is {spec.get('strategy')!r}, not 'tensor_group'")
        if group.get("weights") is None:
            report.fail(f"{where}: quantization_config.config_groups.{gname} has no weights")
    return w4a4


def check_algo(config: dict, hf_quant: object, convention: str, mods: dict[str, QModule],
               report: Report, dst: Path) -> None:
    if declared_mixed(config, hf_quant):
        return  # mixed.check_mixed checks MIXED_PRECISION
    fp8 = sorted(m for m, q in mods.items() if q.fp8)
    if fp8:
        report.fail(f"{dst}: {len(fp8)} modules are FP8 (e.g. {fp8[0]}) but the config does not declare "
                    "MIXED_PRECISION (engines would load them as NVFP4)")
        mods = {m: q for m, q in mods.items() if not q.fp8}
    qc = config.get("quantization_config") if isinstance(config.get("quantization_config"), dict) else {}
    with_input = sum(1 for q in mods.values() if q.input_scale is not None)
    w4a4 = _check_groups_config(qc, convention, report, dst / "config.json") if qc else False
    if convention == "modelopt":
        hq = hf_quant.get("quantization") if isinstance(hf_quant, dict) else None
        algos = {}
        if qc:
            algos["config.json"] = qc.get("quant_algo")
        if isinstance(hq, dict):
            algos["hf_quant_config.json"] = hq.get("quant_algo")
            if "group_size" in hq and hq["group_size"] != BLOCK:
                report.fail(f"{dst / 'hf_quant_config.json'}: group_size {hq['group_size']!r}, not {BLOCK} "
                            "(NVFP4 blocks are 16)")
        elif hf_quant is not None:
            report.fail(f"{dst / 'hf_quant_config.json'}: no 'quantization' object")
        for fname, algo in algos.items():
            if algo not in NVFP4_ALGOS:
                report.fail(f"{dst / fname}: quant_algo {algo!r} is not NVFP4 or W4A16_NVFP4")
            elif not mods:
                report.fail(f"{dst / fname}: quant_algo {algo} but no tensor is quantized")
            elif algo == "NVFP4" and with_input != len(mods):
                report.fail(f"{dst / fname}: quant_algo NVFP4 (W4A4) but {len(mods) - with_input} of {len(mods)} "
                            "quantized modules have no input_scale")
            elif algo == "W4A16_NVFP4" and with_input:
                report.fail(f"{dst / fname}: quant_algo W4A16_NVFP4 but {with_input} modules carry input_scale")
        if w4a4 and algos.get("config.json") == "W4A16_NVFP4":
            report.fail(f"{dst / 'config.json'}: quant_algo W4A16_NVFP4 but config_groups quantize input_activations")
    else:
        if qc and not mods:
            report.fail(f"{dst / 'config.json'}: declares compressed-tensors quantization but no tensor is quantized")
        elif mods and w4a4 and with_input != len(mods):
            report.fail(f"{dst / 'config.json'}: input_activations are quantized but {len(mods) - with_input} of "
                        f"{len(mods)} quantized modules have no input_global_scale")
        elif not w4a4 and with_input:
            report.fail(f"{dst / 'config.json'}: no input_activations in config_groups but {with_input} modules "
                        "carry input_global_scale")


def kv_attention(name: str) -> str:
    """The attention module a k_scale / v_scale tensor belongs to (``<attn>.k_proj.k_scale``)."""
    base = name.rpartition(".")[0]
    parent, _, leaf = base.rpartition(".")
    return parent if leaf in ("k_proj", "v_proj") else base


def check_kv(config: dict, hf_quant: object, convention: str, tensors: dict[str, TensorInfo],
             report: Report, dst: Path) -> None:
    qc = config.get("quantization_config") if isinstance(config.get("quantization_config"), dict) else {}
    kv_names = [n for n in tensors if n.endswith(_KV_SUFFIXES)]
    declared = {}
    if qc:
        declared["config.json"] = qc.get("kv_cache_scheme") is not None
    hq = hf_quant.get("quantization") if isinstance(hf_quant, dict) else None
    if convention == "modelopt" and isinstance(hq, dict):
        declared["hf_quant_config.json"] = hq.get("kv_cache_quant_algo") is not None
    for fname, yes in declared.items():
        if yes and not kv_names:
            report.fail(f"{dst / fname}: declares an FP8 KV cache but DST has no k_scale / v_scale tensors")
        elif kv_names and not yes:
            report.warnings.append(f"{dst / fname}: k_scale / v_scale tensors present but no FP8 KV cache declared")
    modules = set()  # every module holding a tensor other than a KV scale, and its parents
    for n in tensors:
        if not n.endswith(_KV_SUFFIXES):
            parts = n.split(".")
            modules.update(".".join(parts[:i]) for i in range(1, len(parts)))
    for n in kv_names:
        t = tensors[n]
        v = scalar(t).item() if t.dtype == "F32" and math.prod(t.shape) == 1 else float("nan")
        if not (math.isfinite(v) and v > 0):
            report.fail(f"{t.path}: tensor {n!r} is not a finite positive float32 scalar")
        attn = kv_attention(n)
        if attn not in modules:
            report.fail(f"{t.path}: tensor {n!r} is for attention module {attn}, which DST does not have "
                        "(no weights under it)")
