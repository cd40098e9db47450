"""Verify, mixed precision (ModelOpt's MIXED_PRECISION): per-tensor FP8 modules beside NVFP4 ones,
and the ``quantized_layers`` map that tells engines which is which.

vLLM resolves a layer's format from ``quantized_layers`` (by name, or an ``...experts`` parent for a
MoE layer) and loads a layer it does not find there unquantized; so every quantized module must be
found with the quant_algo its tensors have, and no kept Linear may be found at all.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..numerics import BLOCK
from ..recipes import expert_parent
from ..safetensors_io import TensorInfo, read_into
from .exclusions import kept_linears
from .report import QModule, Report
from .values import first_not_finite

ALGOS = {"FP8", "NVFP4", "W4A16_NVFP4"}
_BITS = {"FP8": 8, "NVFP4": 4, "W4A16_NVFP4": 4}


def fp8_module(name: str, info: TensorInfo, tensors: dict[str, TensorInfo]) -> QModule | None:
    """The FP8 module whose ``weight_scale`` is ``name`` (an f32 scale beside an e4m3 weight and no
    ``weight_scale_2``), or None."""
    if not name.endswith(".weight_scale") or info.dtype != "F32":
        return None
    m = name[: -len(".weight_scale")]
    weight = tensors.get(f"{m}.weight")
    if weight is None or weight.dtype != "F8_E4M3" or f"{m}.weight_scale_2" in tensors:
        return None
    return QModule(m, weight, info, None, tensors.get(f"{m}.input_scale"), fp8=True)


def check_fp8_shapes(q: QModule, report: Report) -> bool:
    where = f"{q.packed.path}: FP8 module {q.module}"
    if len(q.packed.shape) != 2:
        report.fail(f"{where}: weight is {list(q.packed.shape)}, not a 2-D [out, in] matrix")
        return False
    for t in (q.scale, q.input_scale):
        if t is not None and (t.dtype != "F32" or math.prod(t.shape) != 1):
            report.fail(f"{where}: {t.name} is {t.dtype}{list(t.shape)}, expected a float32 scalar")
            return False
    return True


def check_fp8_values(q: QModule, report: Report) -> None:
    """Scales finite and positive, an input_scale present; no NaN code (e4m3fn has no Inf) in the weight."""
    if q.input_scale is None:  # ModelOpt writes FP8 weight-only layers so; vLLM then loads a placeholder
        report.fail(f"{q.packed.path}: FP8 module {q.module} has no input_scale (engines load ModelOpt FP8 layers "
                    "as W8A8 with a static input scale)")
    for t in (q.scale, q.input_scale):
        if t is None:
            continue
        v = read_into(t).reshape(()).item()
        if not (math.isfinite(v) and v > 0):
            report.fail(f"{t.path}: tensor {t.name!r} is {v} (FP8 scales must be finite and positive)")
    bad = first_not_finite(q.packed)
    if bad:
        report.fail(f"{q.packed.path}: tensor {q.packed.name!r} has {bad[0]} NaN FP8 codes (first at {bad[1]})")


def declared(config: dict, hf_quant: object) -> dict[str, dict]:
    """Each config file's quantization object that declares MIXED_PRECISION, by file name."""
    out = {}
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_algo") == "MIXED_PRECISION":
        out["config.json"] = qc
    hq = hf_quant.get("quantization") if isinstance(hf_quant, dict) else None
    if isinstance(hq, dict) and hq.get("quant_algo") == "MIXED_PRECISION":
        out["hf_quant_config.json"] = hq
    return out


def expected_algo(q: QModule) -> str:
    if q.fp8:
        return "FP8"
    return "NVFP4" if q.input_scale is not None else "W4A16_NVFP4"


def _lookup(layers: dict, module: str) -> tuple[str | None, dict | None]:
    """(key, entry) an engine resolves ``module`` to: its own name, else its ``...experts`` module."""
    for key in (module, expert_parent(module)):
        if key is not None and key in layers:
            return key, layers[key]
    return None, None


def check_mixed(config: dict, hf_quant: object, mods: dict[str, QModule], tensors: dict[str, TensorInfo],
                report: Report, dst: Path) -> int:
    """The MIXED_PRECISION declarations against the tensors; returns the number of kept Linears checked."""
    files = declared(config, hf_quant)
    qc = config.get("quantization_config") if isinstance(config.get("quantization_config"), dict) else {}
    hq = hf_quant.get("quantization") if isinstance(hf_quant, dict) else None
    for fname, q in (("config.json", qc), ("hf_quant_config.json", hq)):
        if isinstance(q, dict) and fname not in files:
            report.fail(f"{dst / fname}: quant_algo {q.get('quant_algo')!r}, but the other config declares "
                        "MIXED_PRECISION")
    kept = kept_linears(tensors, mods, stacked=False)
    maps = {}
    for fname, q in files.items():
        layers = q.get("quantized_layers")
        if not isinstance(layers, dict) or not layers or not all(isinstance(v, dict) for v in layers.values()):
            report.fail(f"{dst / fname}: MIXED_PRECISION without a quantized_layers object of per-layer configs")
            continue
        maps[fname] = layers
        for key, entry in layers.items():
            algo = entry.get("quant_algo")
            if algo not in ALGOS:
                report.fail(f"{dst / fname}: quantized_layers[{key!r}] quant_algo {algo!r} is not one of {sorted(ALGOS)}")
            elif algo != "FP8" and entry.get("group_size") != BLOCK:
                report.fail(f"{dst / fname}: quantized_layers[{key!r}] group_size {entry.get('group_size')!r}, not {BLOCK}")
        wrong, missing, used = [], [], set()
        for q in sorted(mods.values(), key=lambda q: q.module):
            key, entry = _lookup(layers, q.owner)
            if entry is None:
                missing.append(q.module)
                continue
            used.add(key)
            if entry.get("quant_algo") != expected_algo(q):
                wrong.append(f"{q.module} ({expected_algo(q)} tensors, {key!r} says {entry.get('quant_algo')!r})")
        if missing:
            report.fail(f"{dst / fname}: {len(missing)} quantized modules are not in quantized_layers (engines would "
                        f"load them unquantized), e.g. {', '.join(missing[:3])}")
        if wrong:
            report.fail(f"{dst / fname}: {len(wrong)} modules have another format in quantized_layers than in "
                        f"their tensors, e.g. {', '.join(wrong[:3])}")
        listed_kept = sorted(m for m in kept if _lookup(layers, m)[1] is not None)
        if listed_kept:
            report.fail(f"{dst / fname}: {len(listed_kept)} modules kept in source precision are in quantized_layers "
                        f"(engines would load them as quantized), e.g. {', '.join(listed_kept[:3])}")
        unused = sorted(set(layers) - used)
        if unused:
            report.fail(f"{dst / fname}: quantized_layers names {len(unused)} modules with no quantized tensors, "
                        f"e.g. {', '.join(unused[:3])}")
    if len(maps) == 2 and maps["config.json"] != maps["hf_quant_config.json"]:
        report.fail(f"{dst}: config.json and hf_quant_config.json have different quantized_layers")
    _check_groups(qc, maps.get("config.json"), report, dst / "config.json")
    return len(kept)


def _check_groups(qc: dict, layers: dict | None, report: Report, where: Path) -> None:
    """config.json's config_groups: each target's bits (and activation quantization) as quantized_layers says."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or layers is None:
        return
    for gname, group in groups.items():
        if not isinstance(group, dict):
            report.fail(f"{where}: quantization_config.config_groups.{gname} is not an object")
            continue
        weights = group.get("weights") if isinstance(group.get("weights"), dict) else {}
        for target in group.get("targets") or []:
            algo = (layers.get(target) or {}).get("quant_algo")
            if algo in _BITS and weights.get("num_bits") != _BITS[algo]:
                report.fail(f"{where}: config_groups.{gname} gives {target} {weights.get('num_bits')!r}-bit weights "
                            f"but quantized_layers says {algo}")
            elif algo in _BITS and (group.get("input_activations") is None) != (algo == "W4A16_NVFP4"):
                report.fail(f"{where}: config_groups.{gname}: input_activations do not match {target}'s {algo}")


def fp8_rel_error(source_w: torch.Tensor, q: QModule) -> float:
    """``||W - deq(Q)|| / ||W||`` of an FP8 module, in float64 sums, a row chunk at a time."""
    from ..fp8_numerics import dequantize

    codes, scale = read_into(q.packed), read_into(q.scale).reshape(())
    step = max(1, (1 << 22) // max(1, source_w.shape[-1]))
    err = ref = 0.0
    for i in range(0, codes.shape[0], step):
        w = source_w[i:i + step].float()
        d = dequantize(codes[i:i + step], scale)
        err += float((w - d).double().square().sum())
        ref += float(w.double().square().sum())
    if ref == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return math.sqrt(err / ref)
