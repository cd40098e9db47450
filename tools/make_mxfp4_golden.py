#!/usr/bin/env python3
"""Regenerate tests/golden/gpt_oss_mxfp4 with NVIDIA ModelOpt's own MXFP4 -> NVFP4 lossless cast.

ModelOpt is the oracle here (imported, never a dependency of shardconv). From a separate environment
(recipe as in tools/make_golden.py, torch constrained)::

    python3 -m venv /tmp/movenv-mx
    echo torch==2.13.0 > /tmp/cons.txt
    /tmp/movenv-mx/bin/pip install -c /tmp/cons.txt torch==2.13.0
    /tmp/movenv-mx/bin/pip install -c /tmp/cons.txt nvidia-modelopt==0.47.0 safetensors requests \
        transformers==5.14.1 accelerate
    PYTHONPATH=. /tmp/movenv-mx/bin/python tools/make_mxfp4_golden.py [--out tests/golden/gpt_oss_mxfp4]

It writes shardconv.synth_mxfp4's gpt-oss MXFP4 checkpoint (SYNTH below) to a temporary folder and,
for every expert stack, runs ModelOpt 0.47's ``quantize_mxfp4_to_nvfp4_lossless`` with the stack's
``mxfp4_kmax`` (one weight_scale_2 per stack, as ModelOpt's gpt-oss export has) on the CPU. Saved:
``expected.safetensors`` (``<stack>.packed`` u8 [E, out, in/2], ``<stack>.scale`` e4m3 [E, out, in/16],
``<stack>.scale_2`` f32 0-d, ``<stack>.lossless`` i64 [2]: blocks, lossless blocks) and ``meta.json``
(the synth arguments and a checksum of each stack's inputs, so a changed generator is noticed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from modelopt.torch.export.shard_cast_utils import mxfp4_kmax, quantize_mxfp4_to_nvfp4_lossless
from safetensors.torch import load_file, save_file

from shardconv.synth_mxfp4 import write_mxfp4_checkpoint

SYNTH = {"num_layers": 2, "shard_size": 10**9}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/golden/gpt_oss_mxfp4")
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = write_mxfp4_checkpoint(Path(tmp) / "src", **SYNTH)
        tensors = {}
        for f in sorted(src.glob("model*.safetensors")):
            tensors.update(load_file(str(f)))
    expected, inputs = {}, {}
    for name in sorted(tensors):
        if not name.endswith("_blocks"):
            continue
        base = name[: -len("_blocks")]
        blocks, scales = tensors[name], tensors[base + "_scales"]
        inputs[base] = int(torch.cat([blocks.reshape(-1), scales.reshape(-1)]).sum())
        flat = blocks.reshape(*blocks.shape[:2], -1)  # [E, out, in/2], what the function takes
        packed, scale, scale_2, n_blocks, n_lossless = quantize_mxfp4_to_nvfp4_lossless(
            flat, scales, mxfp4_kmax(scales), "cpu")
        expected[f"{base}.packed"] = packed.contiguous()
        expected[f"{base}.scale"] = scale.contiguous()
        expected[f"{base}.scale_2"] = scale_2.reshape(()).float()
        expected[f"{base}.lossless"] = torch.tensor([n_blocks, n_lossless])
        print(f"{base}: {n_lossless} of {n_blocks} blocks lossless, weight_scale_2 {float(scale_2)}")
    save_file(expected, str(out / "expected.safetensors"))
    import modelopt

    meta = {"synth": SYNTH, "inputs": inputs, "modelopt": modelopt.__version__, "torch": torch.__version__}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
