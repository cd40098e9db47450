"""Which encoding a source's weights are in, from its config and tensor names; and the refusal of
everything shardconv cannot read (already NVFP4, other 4-bit formats, per-tensor FP8, int8, ...).
"""

from __future__ import annotations

import json

from ..errors import SourceError
from .base import Encoding
from . import int4
from .fp8_blocks import Fp8Blocks
from .mxfp4 import MODEL_TYPES as MXFP4_MODEL_TYPES
from .mxfp4 import Mxfp4
from .plain import Plain

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
_NEEDS = ("shardconv reads bf16, fp16 or fp32 weights, FP8 blocks (quant_method 'fp8' with weight_block_size), "
          "gpt-oss MXFP4 experts and symmetric compressed-tensors pack-quantized INT4")


def _already_4bit(where, what: str) -> SourceError:
    return SourceError(f"{where}: the checkpoint is already quantized to 4 bits ({what}); {_NEEDS}")


def detect(source) -> Encoding:
    """How the source stores its weights: :class:`Plain` floating point, :class:`Fp8Blocks`, gpt-oss's
    :class:`Mxfp4` or compressed-tensors' :class:`Int4Packed`.

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
        return Plain()

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
    if method == "mxfp4":
        return _mxfp4(source, where)
    if method == "modelopt":
        algo = str(qc.get("quant_algo") or qc.get("quantization", {}).get("quant_algo") or "?")
        if "FP4" in algo.upper() or "W4" in algo.upper() or "INT4" in algo.upper():
            raise _already_4bit(where, f"ModelOpt {algo}")
        raise SourceError(f"{where}: the checkpoint is already quantized (ModelOpt {algo}); {_NEEDS}")
    if method == "compressed-tensors":
        if qc.get("format") == int4.FORMAT:  # INT4 (Kimi-K2-Thinking); int4.py refuses the rest
            return int4.from_config(qc, where)
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


def _mxfp4(source, where: str) -> Mxfp4:
    """gpt-oss's MXFP4 expert stacks; MXFP4 of any other model (DeepSeek-V4's experts among them) is refused."""
    types = {source.config.get("model_type")}
    if isinstance(source.config.get("text_config"), dict):
        types.add(source.config["text_config"].get("model_type"))
    if not types & MXFP4_MODEL_TYPES:
        kind = next((t for t in types if t), "?")
        raise SourceError(f"{where}: the checkpoint is already quantized to 4 bits (MXFP4) for model type {kind!r}; "
                          "shardconv reads only gpt-oss's MXFP4 experts")
    skip = source.config["quantization_config"].get("modules_to_not_convert")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(s, str) for s in skip)):
        raise SourceError(f"{where}: modules_to_not_convert is not a list of module names")
    return Mxfp4()
