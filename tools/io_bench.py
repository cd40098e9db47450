#!/usr/bin/env python3
"""The streaming pipeline's I/O alone, as if the quantizing device were infinitely fast, on any machine.

A GPU conversion is bound by the disk, not by the GPU; this measures that I/O side (readers, host
buffer pools, read-ahead, copies of kept tensors, writers, shard hashing) without a GPU: the real
CPU pipeline runs with ``quantize_group`` replaced by a lookup of results computed beforehand (one per
weight shape; the output bytes are therefore wrong, the amount and order of I/O are not). Each run
starts from a cold page cache (drop_caches as root, else posix_fadvise DONTNEED), after a
``cat > /dev/null`` baseline of the same input. The converter runs in this process, after torch is
imported, so the start-up read-ahead (``--readahead``) has no start-up to fill here: it only competes
with the readers. The default runs therefore turn it off and compare ``--prefetch`` off and on.

    python tools/io_bench.py SRC [--runs "--readahead 0" "--readahead 0 --prefetch 2GiB"] [--repeat 2]

Seen on the 2-core development VM (commit 19bf08b, whose default runs were "--readahead 0" and ""; cold
cache; its disk varies: cat of the same input took 2.2-4.7 s): a Llama-70B-shaped checkpoint of 2
layers with a 32k vocabulary (4.47 GB) ran at 1.16-2.32x cat.

SRC: a checkpoint folder (tools/bench.py can write one: see its write_model).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import drop_cache  # noqa: E402

from shardconv import pipeline  # noqa: E402
from shardconv.cli import main as cli_main  # noqa: E402
from shardconv.quantize import quantize_group  # noqa: E402
from shardconv.source import open_source  # noqa: E402


def fake_quantizer():
    """quantize_group that quantizes each weight shape once (on the first call) and then reuses it."""
    cache: dict[tuple, list] = {}

    def fake(members, weights, method, device="cpu", **kw):
        key = tuple((tuple(w.shape), w.dtype) for w in weights)
        if key not in cache:
            cache[key] = quantize_group(members, [w.clone() for w in weights], "max", "cpu")
        return cache[key]

    return fake


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("--runs", nargs="+", default=["--readahead 0", "--readahead 0 --prefetch 2GiB"],
                    help="extra convert arguments, one string per configuration")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    src = Path(args.src)
    shards = open_source(str(src)).shards
    gb = sum(p.stat().st_size for p in shards) / 1e9
    pipeline.quantize_group = fake_quantizer()
    work = Path(tempfile.mkdtemp(prefix="shardconv-io-"))
    base = ["convert", str(src), str(work / "out"), "--device", "cpu", "--scales", "max", "--no-progress"]
    # warm-up: fill the fake's cache (one real quantization per shape), not timed
    cli_main(base + ["--overwrite"])
    rows = []
    for rep in range(args.repeat):
        how = drop_cache(src)
        t0 = time.perf_counter()
        subprocess.run("cat " + " ".join(shlex.quote(str(p)) for p in shards) + " > /dev/null", shell=True, check=True)
        cat = time.perf_counter() - t0
        rows.append((rep, "cat > /dev/null", cat, cat))
        for extra in args.runs:
            shutil.rmtree(work / "out", ignore_errors=True)
            drop_cache(src)
            t0 = time.perf_counter()
            rc = cli_main(base + shlex.split(extra))
            wall = time.perf_counter() - t0
            if rc:
                sys.exit(f"convert {extra} failed ({rc})")
            rows.append((rep, f"pipeline {extra}", wall, cat))
        print(f"repeat {rep}: cache {how}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(f"\ninput {gb:.2f} GB, {len(shards)} shards")
    print("| repeat | step | wall s | GB/s | / cat |\n|---|---|---:|---:|---:|")
    for rep, step, wall, cat in rows:
        print(f"| {rep} | {step} | {wall:.2f} | {gb / wall:.2f} | {wall / cat:.2f} |")


if __name__ == "__main__":
    main()
