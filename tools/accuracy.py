#!/usr/bin/env python3
"""Weight reconstruction error of the scale methods (max, mse, four-over-six) on synthetic weights.

Each tensor is quantized exactly as a conversion writes it (its own max |W| as the global amax,
block scales by the method, then packing) and read back as engines do (numerics.dequantize). Per
method it prints the mean over tensors of the relative squared error sum((W - W')^2) / sum(W^2),
and how much lower mse and four-over-six are than max.

Weights come from shardconv.synth.make_tensor: "structured" (per-output-channel log-normal scales,
1e-3 outliers at 10-50x, 1% zero blocks) and "random" (normal), in Llama-3-8B layer shapes
(--scale divides both dimensions, for a quick CPU run).

    python tools/accuracy.py                       # GPU when present
    python tools/accuracy.py --device cpu --scale 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shardconv import numerics as nx  # noqa: E402
from shardconv import scales  # noqa: E402
from shardconv.synth import make_tensor  # noqa: E402

SHAPES = {  # Llama-3-8B: one layer's Linear shapes
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (1024, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (14336, 4096),
    "mlp.down_proj": (4096, 14336),
}
METHODS = ("max", "mse", "four-over-six")


def relative_error(w: torch.Tensor, method: str) -> float:
    """The error of the conversion's own scales (scales.py) for one tensor alone in its group."""
    g = w.abs().amax().float()
    s2 = scales.weight_scale_2(g, method)
    scale = scales.block_scales(None, w, g, method, slice(None))  # no member: only "amax" reads it
    back = nx.dequantize(nx.quantize(w, scale, s2), scale, s2)
    w32 = w.float()
    return float(((w32 - back) ** 2).sum() / (w32 * w32).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", type=int, default=1, help="divide both dimensions by this (CPU runs)")
    ap.add_argument("--layers", type=int, default=2, help="layers (seeds) per shape")
    args = ap.parse_args()
    results = {}
    for kind in ("structured", "random"):
        errs = {m: [] for m in METHODS}
        for layer in range(args.layers):
            for name, (r, c) in SHAPES.items():
                shape = (r // args.scale, c // args.scale)
                w = make_tensor(f"model.layers.{layer}.{name}.weight", shape, weights=kind).to(args.device)
                for m in METHODS:
                    errs[m].append(relative_error(w, m))
        results[kind] = {m: sum(v) / len(v) for m, v in errs.items()}
        print(f"{kind}: " + ", ".join(f"{m} {results[kind][m]:.5f}" for m in METHODS), flush=True)
    print(f"\nmean relative squared weight error (sum (W-W')^2 / sum W^2) over {args.layers} x {len(SHAPES)} "
          f"Llama-3-8B-shaped tensors / {args.scale}, {args.device}")
    print("| weights | max | mse | four-over-six | mse vs max | 4/6 vs max |\n|---|---:|---:|---:|---:|---:|")
    for kind, r in results.items():
        lower = {m: 100 * (1 - r[m] / r["max"]) for m in METHODS}
        print(f"| {kind} | {r['max']:.5f} | {r['mse']:.5f} | {r['four-over-six']:.5f} | "
              f"{lower['mse']:.1f}% lower | {lower['four-over-six']:.1f}% lower |")


if __name__ == "__main__":
    main()
