"""Verify, which attention modules an FP8 KV-cache declaration covers: a per-layer declaration
(``kv_cache_quantized_layers``, newer ModelOpt, schema 1) lists exactly the attention modules that
carry ``k_scale`` and ``v_scale``; a global one (no list) covers every attention module, so each
must carry both. Engines that ignore the list (vLLM reads only ``kv_cache_quant_algo``) run an
unlisted layer's FP8 cache with scale 1.0; a listed layer without scales would run the same way while
the checkpoint claims calibrated scales for it."""

from __future__ import annotations

from pathlib import Path

from ..module_rules import attention_modules
from ..safetensors_io import TensorInfo
from .config import kv_attention
from .report import Report

_KV_SUFFIXES = (".k_scale", ".v_scale")
_KEY = "kv_cache_quantized_layers"


def _declarations(config: dict, hf_quant: object, dst: Path) -> dict[Path, tuple[bool, object]]:
    """Per file: (FP8 KV cache declared, its per-layer list or None)."""
    out = {}
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        out[dst / "config.json"] = (qc.get("kv_cache_scheme") is not None, qc.get(_KEY))
    hq = hf_quant.get("quantization") if isinstance(hf_quant, dict) else None
    if isinstance(hq, dict):
        out[dst / "hf_quant_config.json"] = (hq.get("kv_cache_quant_algo") is not None, hq.get(_KEY))
    return out


def kv_scales(tensors) -> dict[str, set[str]]:
    """Attention module -> which of ``k_scale`` / ``v_scale`` DST holds for it."""
    scaled: dict[str, set[str]] = {}
    for n in tensors:
        if n.endswith(_KV_SUFFIXES):
            scaled.setdefault(kv_attention(n), set()).add(n.rpartition(".")[2])
    return scaled


def check_kv_layers(config: dict, hf_quant: object, tensors: dict[str, TensorInfo], report: Report,
                    dst: Path) -> None:
    scaled = kv_scales(tensors)
    lists = {}
    for where, (declared, layers) in _declarations(config, hf_quant, dst).items():
        if layers is None:
            if declared:  # a global claim: every attention module carries both scales
                bare = sorted(a for a in attention_modules(tensors, config) if scaled.get(a) != {"k_scale", "v_scale"})
                if bare:
                    report.fail(f"{where}: declares an FP8 KV cache for every layer but {len(bare)} attention modules "
                                f"have no k_scale / v_scale (first {bare[0]}); engines would use scale 1.0 there")
            continue
        if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
            report.fail(f"{where}: {_KEY} is not an object of per-layer objects")
            continue
        if not declared:
            report.fail(f"{where}: {_KEY} without an FP8 KV-cache declaration (kv_cache_quant_algo / kv_cache_scheme)")
        for layer, spec in sorted(layers.items()):
            if spec.get("quant_algo") != "FP8":
                report.fail(f"{where}: {_KEY}[{layer!r}].quant_algo is {spec.get('quant_algo')!r}, not 'FP8'")
            elif scaled.get(layer) != {"k_scale", "v_scale"}:
                have = sorted(scaled.get(layer, ())) or "no scale"
                report.fail(f"{where}: {_KEY} lists {layer} but DST has {have} for it (needs k_scale and v_scale)")
        for layer in sorted(set(scaled) - set(layers)):
            first = min(n for n in tensors if n.endswith(_KV_SUFFIXES) and kv_attention(n) == layer)
            report.fail(f"{tensors[first].path}: tensor {first!r} is for {layer}, which {where.name} {_KEY} "
                        "does not list")
        lists[where] = set(layers)
    if len(lists) == 2 and len({frozenset(v) for v in lists.values()}) == 2:
        report.fail(f"{dst}: config.json and hf_quant_config.json list different {_KEY}")
