"""Verify, quantized modules: which convention DST uses, its quantized modules, their dtypes and shapes,
their scale values, and fusion groups quantized whole with bit-identical shared scales."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..module_rules import FUSION_SETS, fusion_key
from ..safetensors_io import TensorInfo, read_into
from .mixed import check_fp8_shapes, check_fp8_values, fp8_module
from .report import QModule, Report


def convention_of(config: dict | None, hf_quant: object, tensors: dict[str, TensorInfo], report: Report,
                dst: Path) -> str | None:
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    has_ct = any(n.endswith(".weight_packed") for n in tensors)
    has_mo = any(n.endswith("weight_scale_2") for n in tensors)
    if has_ct and has_mo:
        report.fail(f"{dst}: mixes ModelOpt (weight_scale_2) and compressed-tensors (weight_packed) tensors")
    if method == "compressed-tensors":
        fmt = qc.get("format")
        if fmt != "nvfp4-pack-quantized":
            report.warnings.append(f"{dst / 'config.json'}: compressed-tensors format {fmt!r}, "
                                   "not 'nvfp4-pack-quantized': only its NVFP4 modules are checked")
        return "compressed-tensors"
    if method == "modelopt" or (method is None and isinstance(hf_quant, dict)):
        if method is None:
            report.warnings.append(f"{dst / 'config.json'}: no quantization_config (vLLM and SGLang read it "
                                   "first); using hf_quant_config.json")
        return "modelopt"
    if method is None:
        report.fail(f"{dst / 'config.json'}: no quantization_config (not a quantized checkpoint?)")
    else:
        report.fail(f"{dst / 'config.json'}: quant_method {method!r} is neither 'modelopt' nor 'compressed-tensors'")
    return "compressed-tensors" if has_ct else "modelopt" if has_mo else None


def find_modules(tensors: dict[str, TensorInfo], convention: str, report: Report) -> dict[str, QModule]:
    mods: dict[str, QModule] = {}
    if convention == "compressed-tensors":
        for name, info in tensors.items():
            if name.endswith(".weight_packed"):
                m = name[: -len(".weight_packed")]
                mods[m] = QModule(m, info, tensors.get(f"{m}.weight_scale"), tensors.get(f"{m}.weight_global_scale"),
                                  tensors.get(f"{m}.input_global_scale"))
        orphans = (".weight_global_scale", ".input_global_scale")
    else:
        for name, info in tensors.items():
            if name.endswith(".weight_scale_2"):
                m = name[: -len(".weight_scale_2")]
                mods[m] = QModule(m, tensors.get(f"{m}.weight"), tensors.get(f"{m}.weight_scale"), info,
                                  tensors.get(f"{m}.input_scale"))
            elif name.endswith("_weight_scale_2"):  # stacked experts: gate_up_proj_weight_scale_2
                m = name[: -len("_weight_scale_2")]
                mods[m] = QModule(m, tensors.get(m), tensors.get(f"{m}_weight_scale"), info,
                                  tensors.get(f"{m}_input_scale"), stacked=True)
            elif (q := fp8_module(name, info, tensors)) is not None:  # mixed precision's FP8 layers
                mods[q.module] = q
        orphans = (".input_scale",)
    for name, info in tensors.items():
        for suffix in orphans:
            if name.endswith(suffix) and name[: -len(suffix)] not in mods:
                report.fail(f"{info.path}: tensor {name!r} belongs to no quantized module")
        if name.endswith(".weight_scale") and info.dtype == "F8_E4M3" and name[: -len(".weight_scale")] not in mods:
            report.fail(f"{info.path}: block scales {name!r} without the module's global scale")
    return mods


def check_shapes(q: QModule, convention: str, report: Report) -> bool:
    if q.fp8:
        return check_fp8_shapes(q, report)
    scale2_name = "weight_global_scale" if convention == "compressed-tensors" else "weight_scale_2"
    missing = [what for what, t in (("packed weight", q.packed), ("weight_scale", q.scale), (scale2_name, q.scale_2))
               if t is None]
    if missing:
        report.fail(f"quantized module {q.module}: missing {', '.join(missing)}")
        return False
    w, s = q.packed, q.scale
    where = f"{w.path}: quantized module {q.module}"
    bad = None
    if w.dtype != "U8" or s.dtype != "F8_E4M3":
        bad = f"packed weight is {w.dtype}, block scales {s.dtype} (expected U8 and F8_E4M3)"
    elif q.stacked:  # [E, in/2, out] and [E, in/16, out]
        if len(w.shape) != 3 or len(s.shape) != 3 or (s.shape[0], s.shape[2]) != (w.shape[0], w.shape[2]) \
                or s.shape[1] * 8 != w.shape[1]:
            bad = f"stacked weight {list(w.shape)} and block scales {list(s.shape)} do not match ([E, in/2, out], [E, in/16, out])"
    elif len(w.shape) != 2 or len(s.shape) != 2 or s.shape[0] != w.shape[0] or s.shape[1] * 8 != w.shape[1]:
        bad = f"weight {list(w.shape)} and block scales {list(s.shape)} do not match ([out, in/2], [out, in/16])"
    for t in (q.scale_2, q.input_scale):
        if bad is None and t is not None and (t.dtype != "F32" or math.prod(t.shape) != 1):
            bad = f"{t.name} is {t.dtype}{list(t.shape)}, expected a float32 scalar"
    if bad:
        report.fail(f"{where}: {bad}")
        return False
    return True


def scalar(info: TensorInfo) -> torch.Tensor:
    return read_into(info).reshape(()).clone()


def weight_scale_2(q: QModule, convention: str) -> torch.Tensor:
    """ModelOpt's weight_scale_2 (a multiplier) whichever convention the file uses."""
    s = scalar(q.scale_2)
    return (torch.ones((), dtype=torch.float32) / s) if convention == "compressed-tensors" else s


def check_module_values(q: QModule, report: Report) -> None:
    if q.fp8:
        return check_fp8_values(q, report)
    for t in (q.scale_2, q.input_scale):
        if t is None:
            continue
        v = scalar(t).item()
        if not (math.isfinite(v) and v > 0):
            report.fail(f"{t.path}: tensor {t.name!r} is {v} (global scales must be finite and positive)")
    codes = read_into(q.scale).view(torch.uint8)
    nan = (codes & 0x7F) == 0x7F
    neg = (codes > 0x80) & ~nan
    for what, mask in (("NaN", nan), ("negative", neg)):
        n = int(mask.sum())
        if n:
            first = [int(i) for i in mask.nonzero()[0]]
            report.fail(f"{q.scale.path}: tensor {q.scale.name!r} has {n} {what} block scales (first at {first})")


def check_groups(mods: dict[str, QModule], tensors: dict[str, TensorInfo], report: Report,
                  found: dict[str, QModule] | None = None) -> int:
    """``mods``: the well-formed modules (their scales are compared); ``found``: every quantized module,
    malformed ones included (those are reported already, not as unquantized)."""
    found = mods if found is None else found
    groups: dict[str, list[QModule]] = {}
    for q in mods.values():
        key = fusion_key(q.module)
        if key:
            groups.setdefault(key, []).append(q)
    n = 0
    for key, members in sorted(groups.items()):
        parent = key.partition("{")[0]
        leaves = next(s for s in FUSION_SETS if key.endswith("{" + ",".join(s) + "}"))
        for leaf in leaves:
            other = f"{parent}{leaf}"
            if other not in found and f"{other}.weight" in tensors:
                report.fail(f"fusion group {key}: {members[0].module} is quantized but {other} is not "
                            "(engines fuse them into one GEMM)")
        if len(members) < 2:
            continue
        n += 1
        if len({q.fp8 for q in members}) > 1:
            report.fail(f"fusion group {key}: mixes FP8 and NVFP4 members (engines run it as one GEMM)")
            continue
        if members[0].fp8:  # FP8 members keep their own scales (engines requantize to the largest)
            continue
        for what in ("scale_2", "input_scale"):
            infos = [getattr(q, what) for q in members]
            present = [t for t in infos if t is not None]
            if not present:
                continue
            if len(present) != len(infos):
                report.fail(f"fusion group {key}: only some members have {present[0].name.rpartition('.')[2]}")
                continue
            raw = [bytes(read_into(t).reshape(-1).view(torch.uint8).tolist()) for t in present]
            if len(set(raw)) > 1:
                vals = ", ".join(f"{t.name.rpartition('.')[0].rpartition('.')[2]}={scalar(t).item()!r}" for t in present)
                report.fail(f"fusion group {key}: {present[0].name.rpartition('.')[2]} differs between members "
                            f"({vals}); engines need one shared value")
    return n

