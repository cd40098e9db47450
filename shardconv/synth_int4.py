"""Synthetic INT4 sources: a Kimi-K2-Thinking-style checkpoint (compressed-tensors ``pack-quantized``).

Kimi-K2-Thinking is DeepSeek-V3's architecture (``model_type: kimi_k2``, ``DeepseekV3ForCausalLM``)
whose routed experts ship as symmetric INT4, one bf16 scale per 32 input columns; attention, shared
experts, the dense MLP and ``lm_head`` stay bf16 (its ``ignore`` list). This module writes that
layout from a generated DeepSeek-V3 checkpoint (shardconv.synth), so tests convert what the released
model holds: ``M.weight_packed`` int32 ``[out, in/8]`` (eight ``value + 8`` nibbles a word, lowest
first), ``M.weight_scale`` bf16 ``[out, in/group]``, ``M.weight_shape`` int64 ``[2]``, and config.json's
real ``quantization_config`` keys. The synthetic config keeps DeepSeek-V3's one MTP layer (Kimi ships
none) so that excluded INT4 experts are exercised; it has no ``auto_map`` (no remote code is written).
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

from .synth import write_checkpoint

KIMI_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]
LLM_COMPRESSOR_IGNORE = ["lm_head", r"re:.*\.gate$", "re:.*shared_expert_gate$", r"re:.*\.router$"]
ROUTED_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
INDEX = "model.safetensors.index.json"


def quantization_config(group_size: int | None = 32, ignore: list[str] | None = None) -> dict:
    """config.json's ``quantization_config`` as Kimi-K2-Thinking's (``group_size`` None: per channel)."""
    weights = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": group_size,
               "num_bits": 4, "observer": "minmax", "observer_kwargs": {},
               "strategy": "group" if group_size else "channel", "symmetric": True, "type": "int"}
    return {"config_groups": {"group_0": {"input_activations": None, "output_activations": None,
                                          "targets": ["Linear"], "weights": weights}},
            "format": "pack-quantized", "ignore": list(KIMI_IGNORE if ignore is None else ignore),
            "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"}


def quantize(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT4 of a 2-D weight: (int8 values in [-8, 7], bf16 scale ``[out, in/group]``), the
    scale ``group amax / 7`` (1 for an all-zero group)."""
    out, cols = w.shape
    group = group_size or cols
    if cols % group:
        raise ValueError(f"in_features {cols} is not a multiple of the INT4 group size {group}")
    g = w.float().view(out, cols // group, group)
    scale = (g.abs().amax(-1) / 7).to(torch.bfloat16)
    scale[scale == 0] = 1
    q = torch.round(g / scale.float().unsqueeze(-1)).clamp(-8, 7).to(torch.int8)
    return q.view(out, cols), scale


def pack(q: torch.Tensor) -> torch.Tensor:
    """int32 words of eight ``value + 8`` nibbles, lowest column in the lowest bits (padded with 0)."""
    out, cols = q.shape
    nib = torch.zeros(out, -(-cols // 8) * 8, dtype=torch.int64)
    nib[:, :cols] = q.to(torch.int64) + 8
    words = (nib.view(out, -1, 8) << torch.arange(0, 32, 4)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The bf16 weight a reader computes: ``bf16(fp32(q) * fp32(scale))``, per group."""
    out, cols = q.shape
    group = cols // scale.shape[1]
    return (q.float().view(out, -1, group) * scale.float().unsqueeze(-1)).view(out, cols).to(torch.bfloat16)


def every_linear(name: str) -> bool:
    """What llm-compressor's W4A16 recipes quantize: every Linear but ``lm_head`` and the MoE routers."""
    return not re.search(r"(^lm_head|embed_tokens|\.gate|shared_expert_gate|\.router)\.weight$", name)


def write_int4_checkpoint(path, *, group_size: int | None = 32, dequantized=None, family: str = "deepseek_v3",
                          model_type: str | None = None, encode=None, ignore: list[str] | None = None,
                          **kwargs) -> pathlib.Path:
    """Write an INT4 pack-quantized checkpoint to ``path`` from ``synth.write_checkpoint(family=family,
    **kwargs)`` (same shards), encoding every 2-D ``.weight`` whose name ``encode`` accepts. Defaults:
    Kimi-K2-Thinking (DeepSeek-V3 with ``model_type: kimi_k2``, the routed experts encoded, Kimi's ignore
    list); for another family, its own model_type, :func:`every_linear` and llm-compressor's usual ignore list.
    ``dequantized``: a folder that gets the bf16 checkpoint those INT4 weights dequantize to (same names,
    shards and config without ``quantization_config``). Returns ``path``."""
    kimi = family == "deepseek_v3"
    model_type = model_type or ("kimi_k2" if kimi else family)
    encode = encode or (ROUTED_EXPERT.search if kimi else every_linear)
    ignore = ignore if ignore is not None else (KIMI_IGNORE if kimi else LLM_COMPRESSOR_IGNORE)
    path = pathlib.Path(path)
    outs = [path] + ([pathlib.Path(dequantized)] if dequantized is not None else [])
    for d in outs:
        d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="synth-int4-") as tmp:
        src = write_checkpoint(pathlib.Path(tmp) / "bf16", family=family, **kwargs)
        shards = sorted(p.name for p in src.glob("model*.safetensors"))
        weight_map: dict[str, str] = {}
        total = 0
        for shard in shards:
            encoded, plain = {}, {}
            for name, t in load_file(str(src / shard)).items():
                if name.endswith(".weight") and t.dim() == 2 and encode(name):
                    q, scale = quantize(t, group_size)
                    module = name[: -len(".weight")]
                    encoded.update({f"{module}.weight_packed": pack(q), f"{module}.weight_scale": scale,
                                    f"{module}.weight_shape": torch.tensor(list(t.shape), dtype=torch.int64)})
                    plain[name] = dequantize(q, scale)
                else:
                    encoded[name] = plain[name] = t
            save_file(encoded, str(path / shard), {"format": "pt"})
            if dequantized is not None:
                save_file(plain, str(outs[1] / shard), {"format": "pt"})
            weight_map.update({n: shard for n in encoded})
            total += sum(t.numel() * t.element_size() for t in encoded.values())
        config = json.loads((src / "config.json").read_text())
        config["model_type"] = model_type
        for other in src.iterdir():
            if other.name not in shards and other.name not in ("config.json", INDEX):
                for d in outs:
                    shutil.copy(other, d / other.name)
        if (src / INDEX).exists():
            (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2, sort_keys=True) + "\n")
            if dequantized is not None:
                shutil.copy(src / INDEX, outs[1] / INDEX)
        if dequantized is not None:
            (outs[1] / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        config["quantization_config"] = quantization_config(group_size, ignore)
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path
