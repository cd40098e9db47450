"""Synthetic MXFP4 checkpoints in gpt-oss's released layout, for tests and examples.

A bf16 gpt-oss checkpoint from :func:`shardconv.synth.write_checkpoint` with every expert stack
``experts.{gate_up_proj,down_proj}`` ``[E, in, out]`` MXFP4-encoded the way gpt-oss ships it:
``<stack>_blocks`` uint8 ``[E, out, in/32, 16]`` (even element in the low nibble) and
``<stack>_scales`` uint8 E8M0 ``[E, out, in/32]``, with gpt-oss's ``quantization_config``
(``quant_method: mxfp4``, ``modules_to_not_convert``). Some blocks are scaled far down (``far_blocks``
per stack: an exponent more than 17 binades below the stack's largest, so the lossless cast has to
requantize them), one sits on the window's lower edge and one just below it (17 and 18 binades down),
and some are all zero (E8M0 byte 0, as MXFP4 quantizers write them).
"""

from __future__ import annotations

import json
import math
import pathlib

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import numerics
from .synth import write_checkpoint

# what gpt-oss-20b/120b's config.json carries
QUANTIZATION_CONFIG = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
    "quant_method": "mxfp4",
}
BLOCK = 32
FAR_BINADES = 24  # how far below its neighbours a "far" block is scaled


def encode(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 of ``weight`` ``[..., out, in]``: (blocks uint8 ``[..., out, in/32, 16]``, scales uint8
    ``[..., out, in/32]``); the exponent is the smallest with ``max|w| <= 6 * 2**k``, codes round to nearest
    (ties to even); an all-zero block gets E8M0 byte 0."""
    *lead, rows, cols = weight.shape
    w = weight.float().reshape(*lead, rows, cols // BLOCK, BLOCK)
    amax = w.abs().amax(dim=-1)
    k = torch.ceil(torch.log2(amax.clamp(min=2.0**-126) / numerics.FP4_MAX)).clamp(-126, 127)
    e8m0 = torch.where(amax > 0, (k + 127).to(torch.int32), torch.zeros_like(k, dtype=torch.int32))
    codes = numerics.e2m1_codes(w / torch.exp2(k).unsqueeze(-1))
    codes = torch.where((amax > 0).unsqueeze(-1), codes, torch.zeros_like(codes))
    return numerics.pack_nibbles(codes), e8m0.to(torch.uint8)


def _stack_to_mxfp4(t: torch.Tensor, far_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = t.float().transpose(1, 2).contiguous()  # [E, in, out] -> [E, out, in]
    w[0, 1, :BLOCK] = 0  # an all-zero block
    for i in range(far_blocks):  # blocks far below the rest: outside the lossless window
        w[-1, 2 + i, :BLOCK] *= 2.0**-FAR_BINADES
    blocks, scales = encode(w)
    # the window's edges: exactly 17 binades below the stack's largest exponent (still exact), and 18
    top = int(scales.max())
    scales[-1, 0, 0] = top - 17
    scales[-1, 0, 1] = top - 18
    return blocks, scales


def write_mxfp4_checkpoint(path, *, far_blocks: int = 2, **kwargs) -> pathlib.Path:
    """A gpt-oss MXFP4 checkpoint folder; ``kwargs`` go to :func:`synth.write_checkpoint` (family gpt_oss)."""
    kwargs.setdefault("family", "gpt_oss")
    if kwargs["family"] != "gpt_oss":
        raise ValueError("MXFP4 checkpoints are written in gpt-oss's layout only")
    path = write_checkpoint(path, **kwargs)
    index_path = path / "model.safetensors.index.json"
    shards = sorted(p.name for p in path.glob("model*.safetensors"))
    weight_map, total = {}, 0
    for shard in shards:
        out = {}
        with safe_open(str(path / shard), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                    out[name + "_blocks"], out[name + "_scales"] = _stack_to_mxfp4(t, far_blocks)
                else:
                    out[name] = t
        save_file(out, str(path / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in out})
        total += sum(math.prod(t.shape) * t.element_size() for t in out.values())
    if index_path.exists():
        index_path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                         indent=2, sort_keys=True) + "\n")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def dequantize_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The plain ``[E, in, out]`` bf16 weight, computed the simplest way (for tests)."""
    values = torch.tensor(numerics.E2M1_VALUES + tuple(-v for v in numerics.E2M1_VALUES), dtype=torch.float64)
    codes = numerics.unpack_nibbles(blocks).long()  # [E, out, G, 32]
    w = values[codes] * torch.pow(2.0, scales.double() - 127).unsqueeze(-1)
    return w.reshape(*blocks.shape[:2], -1).to(torch.bfloat16).transpose(1, 2).contiguous()
