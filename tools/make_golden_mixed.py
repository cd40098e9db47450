#!/usr/bin/env python3
"""Golden mixed-precision outputs (MoE experts NVFP4, every other quantized Linear FP8) from ModelOpt.

Same environment and source checkpoint as tools/make_golden.py (run that first, or let this reuse
``tests/golden/qwen3_moe/source``)::

    /tmp/movenv/bin/python tools/make_golden_mixed.py [--out tests/golden]

Writes ``<out>/qwen3_moe/<case>/`` for:

- ``mixed_w4a4``: ModelOpt's FP8_DEFAULT_CFG (per-tensor e4m3 weights and inputs) with the
  ``*.experts.*`` entries of NVFP4_EXPERTS_ONLY_CFG appended (later entries win), max calibration:
  attention FP8 with ``input_scale``, experts NVFP4 W4A4; ModelOpt infers ``MIXED_PRECISION``.
- ``mixed_w4a16``: the same with every ``*input_quantizer`` disabled (FP8 and NVFP4 weight-only).

Each case keeps model.safetensors, config.json, hf_quant_config.json and amax.pt, as make_golden does.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_golden as mg  # noqa: E402  (imports ModelOpt)
import torch  # noqa: E402

CASES = ("mixed_w4a4", "mixed_w4a16")
FAMILY = "qwen3_moe"


def mixed_config(case: str) -> dict:
    base = copy.deepcopy(mg.mtq.FP8_DEFAULT_CFG)
    experts = [copy.deepcopy(e) for e in mg.mtq.NVFP4_EXPERTS_ONLY_CFG["quant_cfg"]
               if ".experts." in str(e.get("quantizer_name", ""))]
    assert experts, "NVFP4_EXPERTS_ONLY_CFG has no *.experts.* entries"
    qc = list(base["quant_cfg"]) + experts
    if case == "mixed_w4a16":
        qc.append({"quantizer_name": "*input_quantizer", "enable": False})
    base["quant_cfg"] = qc
    base["algorithm"] = "max"
    return base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" / "golden"))
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    args = ap.parse_args(argv)
    out = Path(args.out)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    mg.install_cpu_fake_quant()
    src_dir = out / FAMILY / "source"
    if not src_dir.exists():
        mg.write_source(mg.build_model(FAMILY), FAMILY, src_dir)
    digest = mg.dir_digest(src_dir)
    original = mg.quant_config
    try:
        mg.quant_config = mixed_config  # run_case asks quant_config(case) for the ModelOpt config
        for case in args.cases:
            info = mg.run_case(FAMILY, case, src_dir, out / FAMILY / case)
            assert mg.dir_digest(src_dir) == digest, "export mutated the source checkpoint"
            print(f"{FAMILY} {case}: {info}")
    finally:
        mg.quant_config = original
    return 0


if __name__ == "__main__":
    sys.exit(main())
