#!/usr/bin/env python3
"""Throughput of the data-free scale searches on Llama-70B-shaped weights, measured in one run.

For each shape (default 8192x8192, 28672x8192, 8192x28672; bf16 with per-row scales, 1e-3 outliers
at 10-50x and 1% zero blocks, as shardconv.synth's "structured" weights) it times, in params/s:

  kernel     the fused Triton kernels (shardconv/kernels/sweep_triton.py): MSE = windowed pass +
             full search of the flagged blocks; four-over-six = one pass
  windowed   the torch windowed search (sweep.mse_choice_windowed) on the same device
  reference  the plain torch references (sweep.mse_choice_reference: all 126 candidates;
             sweep.four_over_six_choice), on the first --torch-rows rows (they are slow)
  modelopt   ModelOpt's own Triton sweep nvfp4_fp8_scale_sweep, when --modelopt names a folder
             holding the installed nvidia-modelopt package (only its kernel files are imported)
  export     the whole per-tensor GPU step: block scales by the method + packing (numerics.quantize)

and checks that the kernel's choices equal the reference's on the rows the reference ran on (and
how many blocks ModelOpt's kernel chooses differently: fp32 near-ties, its sums run in another
order). The table is printed last.

    python tools/bench_sweep.py
    python tools/bench_sweep.py --shapes 4096x4096 --modelopt /tmp/site
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shardconv import numerics as nx  # noqa: E402
from shardconv import scales, sweep  # noqa: E402
from shardconv.synth import put_last  # noqa: E402


def structured(rows: int, cols: int, device, seed: int = 0) -> torch.Tensor:
    """synth.make_tensor's "structured" recipe, generated on the device (fast for 235M params)."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, device=device).mul_(0.02)
    w.mul_(torch.randn(rows, 1, generator=g, device=device).mul_(0.5).exp_())
    flat = w.view(-1)
    k = max(1, flat.numel() // 1000)
    idx = torch.randint(flat.numel(), (k,), generator=g, device=device)
    sign = torch.randint(2, (k,), generator=g, device=device).mul_(2).sub_(1)
    put_last(flat, idx, torch.rand(k, generator=g, device=device).mul_(40).add_(10).mul_(0.02) * sign)
    w.view(rows, cols // 16, 16).mul_(torch.rand(rows, cols // 16, 1, generator=g, device=device) >= 0.01)
    return w.bfloat16()


def timed(fn, device, reps: int = 5) -> float:
    """Median seconds per call after one warm-up call (which also compiles the kernels)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def loss_gap(blocks: torch.Tensor, g: torch.Tensor, mine: torch.Tensor, theirs: torch.Tensor) -> tuple[float, int]:
    """For blocks where two sweeps chose differently: the largest relative gap of their float64
    squared errors, and in how many blocks our choice's error is lower or equal."""
    if blocks.numel() == 0:
        return 0.0, 0
    scales = sweep.candidate_scales(g).double()
    absw = blocks.double().abs()

    def loss(k):
        s = scales[k].reshape(-1, 1)
        return ((absw - sweep.e2m1_magnitude((absw / s).float()).double() * s) ** 2).sum(-1)

    a, b = loss(mine), loss(theirs)
    return float(((a - b).abs() / b.clamp(min=1e-300)).max()), int((a <= b).sum())


def load_modelopt_sweep(site: str):
    """ModelOpt's nvfp4_fp8_scale_sweep from an installed package folder, importing only the kernel
    files (the package's own __init__ chain needs dependencies the GPU machine lacks)."""
    root = Path(site) / "modelopt"
    for name, sub in [("modelopt", ""), ("modelopt.torch", "torch"), ("modelopt.torch.kernels", "torch/kernels"),
                      ("modelopt.torch.kernels.quantization", "torch/kernels/quantization"),
                      ("modelopt.torch.kernels.quantization.common", "torch/kernels/quantization/common"),
                      ("modelopt.torch.kernels.quantization.gemm", "torch/kernels/quantization/gemm"),
                      ("modelopt.torch.quantization", "torch/quantization"),
                      ("modelopt.torch.quantization.utils", "torch/quantization/utils")]:
        mod = types.ModuleType(name)
        mod.__path__ = [str(root / sub)]
        sys.modules[name] = mod
    numeric = types.ModuleType("modelopt.torch.quantization.utils.numeric_utils")
    numeric.E4M3_MAX = 448.0
    sys.modules[numeric.__name__] = numeric
    return importlib.import_module("modelopt.torch.kernels.quantization.gemm.nvfp4_fp8_sweep").nvfp4_fp8_scale_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8192x8192,28672x8192,8192x28672")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--torch-rows", type=int, default=512, help="rows the torch references run on")
    ap.add_argument("--modelopt", metavar="DIR", help="folder holding the installed modelopt package")
    ap.add_argument("--configs", action="store_true", help="also time other tile sizes of the MSE kernel")
    args = ap.parse_args()
    device = torch.device(args.device)
    from shardconv.kernels import sweep_kernels

    kt = sweep_kernels()
    if kt is None:
        sys.exit("triton is not importable: nothing to benchmark")
    mo_sweep = None
    if args.modelopt:
        try:
            mo_sweep = load_modelopt_sweep(args.modelopt)
        except Exception as e:  # optional comparison
            print(f"ModelOpt's sweep kernel not loaded: {e!r}")
    rows_out = []

    def row(shape, method, impl, seconds, numel, note=""):
        rows_out.append((shape, method, impl, seconds * 1e3, numel / seconds / 1e9, note))
        print(f"{shape:>12} {method:14} {impl:10} {seconds * 1e3:10.2f} ms {numel / seconds / 1e9:8.2f} G params/s {note}",
              flush=True)

    for spec in args.shapes.split(","):
        r, c = (int(x) for x in spec.split("x"))
        w = structured(r, c, device)
        g = w.abs().max().float()
        blocks = w.view(-1, 16)
        n = w.numel()
        flagged = kt.mse_flagged(blocks, g)
        row(spec, "mse", "kernel", timed(lambda: kt.mse_choice(blocks, g), device), n,
            f"(full search for {flagged} blocks, {100 * flagged / blocks.shape[0]:.3f}%)")
        if args.configs:
            for bpp, nw in ((64, 2), (128, 4), (256, 4), (256, 8)):
                row(spec, "mse", f"k{bpp}/{nw}", timed(lambda: kt.mse_choice(blocks, g, bpp=bpp, num_warps=nw), device), n)
        row(spec, "four-over-six", "kernel", timed(lambda: kt.four_over_six_amax(blocks, g), device), n)
        sub = w[: args.torch_rows].reshape(-1, 16)
        sub_abs = sub.float().abs()
        ref = sweep.mse_choice_reference(sub_abs, g)
        same = torch.equal(kt.mse_choice(sub, g), ref)
        row(spec, "mse", "reference", timed(lambda: sweep.mse_choice_reference(sub.float().abs(), g), device, 2),
            sub.numel(), f"(first {args.torch_rows} rows; kernel == reference: {same})")
        row(spec, "mse", "windowed", timed(lambda: sweep.mse_choice(sub.float().abs(), g), device, 2), sub.numel(),
            f"(first {args.torch_rows} rows)")
        m = sub_abs.amax(-1)
        fos = torch.where(sweep.four_over_six_choice(sub_abs, g), m * 1.5, m)
        same = torch.equal(kt.four_over_six_amax(sub, g), fos)
        row(spec, "four-over-six", "reference", timed(lambda: sweep.four_over_six_choice(sub.float().abs(), g), device, 2),
            sub.numel(), f"(first {args.torch_rows} rows; kernel == reference: {same})")
        if mo_sweep is not None:
            try:
                theirs = (mo_sweep(blocks, g) / g * nx.FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8).long() - 1
                ours = kt.mse_choice(blocks, g)
                where = (theirs != ours).nonzero().reshape(-1)
                rel, lower = loss_gap(blocks[where], g, ours[where], theirs[where])
                row(spec, "mse", "modelopt", timed(lambda: mo_sweep(blocks, g), device), n,
                    f"(chooses differently in {where.numel()} of {blocks.shape[0]} blocks; there, float64 losses "
                    f"within {rel:.1e} relative, ours lower or equal in {lower} of them)")
            except Exception as e:  # optional comparison
                print(f"ModelOpt's sweep kernel failed: {e!r}")
        for method in ("max", *sweep.METHODS):  # the conversion's own choice of scales (scales.py)
            s2m = scales.weight_scale_2(g, method)
            row(spec, method, "export", timed(lambda: nx.quantize(
                w, scales.block_scales(None, w, g, method, slice(None)), s2m), device), n,
                "(dynamic block scales + packing)" if method == "max" else "(search + static block scales + packing)")
        del w, blocks, sub, sub_abs
        if device.type == "cuda":
            torch.cuda.empty_cache()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"\nmachine: {platform.node()}, {name}; torch {torch.__version__}, triton "
          f"{importlib.import_module('triton').__version__}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    print("| shape | method | implementation | ms | G params/s | note |\n|---|---|---|---:|---:|---|")
    for shape, method, impl, ms, gps, note in rows_out:
        print(f"| {shape} | {method} | {impl} | {ms:.2f} | {gps:.2f} | {note.strip('()')} |")


if __name__ == "__main__":
    main()
