#!/usr/bin/env python3
"""Peak host memory of a CPU conversion at two model sizes, measured with /usr/bin/time -v.

Writes synthetic Llama-style checkpoints of about 2 GB and 4 GB (512 MB shards), converts each
with ``shardconv convert --device cpu`` and reports the peak resident set size (which counts mapped
file pages too). The point: the peak must not grow with the model.

    python tools/memcheck.py [--sizes 2,4] [--work /tmp/shardconv-mem] [--keep] [--extra '--scales max']
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from shardconv.synth import write_checkpoint
from shardconv.synth_layout import layers_for_size

SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_heads=16, num_kv_heads=4, head_dim=128, vocab_size=32000)


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of a command run under /usr/bin/time -v."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return kb / 1024, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2,4", help="checkpoint sizes in GB (comma separated)")
    ap.add_argument("--work", default="/tmp/shardconv-mem")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--extra", default="", help="more arguments for shardconv convert, e.g. '--scales max'")
    args = ap.parse_args()
    work = Path(args.work)
    rows = []
    for gb in [float(s) for s in args.sizes.split(",")]:
        src, dst = work / f"src-{gb:g}GB", work / f"dst-{gb:g}GB"
        shutil.rmtree(dst, ignore_errors=True)
        if not (src / "model.safetensors.index.json").exists():
            layers = layers_for_size("llama", int(gb * 1e9), **SHAPE)
            write_checkpoint(src, family="llama", num_layers=layers, shard_size=512 * 2**20, weights="random", **SHAPE)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        cmd = [sys.executable, "-m", "shardconv", "convert", str(src), str(dst), "--device", "cpu", "--no-progress",
               *args.extra.split()]
        rss, wall = peak_rss(cmd)
        baseline, _ = peak_rss([sys.executable, "-c", "import torch, shardconv.pipeline"])
        rows.append((gb, size / 1e9, len(list(src.glob('*.safetensors'))), rss, baseline, wall))
        shutil.rmtree(dst, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
    print(f"{'target':>7} {'input GB':>9} {'shards':>6} {'peak RSS MB':>12} {'import-only MB':>15} {'wall s':>7}")
    for gb, real, n, rss, base, wall in rows:
        print(f"{gb:>6g}G {real:>9.2f} {n:>6} {rss:>12.0f} {base:>15.0f} {wall:>7.1f}")


if __name__ == "__main__":
    main()
