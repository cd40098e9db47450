#!/usr/bin/env python3
"""Each pipeline stage alone on one checkpoint, to see which one limits a conversion.

    python tools/stages.py SRC [--readers 1,2,4,8] [--whole-reads 4:64M,4:64M:direct] [--device cuda]

Prints GB/s, each from a cold cache, for: cat of every input file; reading every file front to back
in pieces on N threads (buffered or O_DIRECT); the same read while as many bytes as the output holds
are written beside it (the disk's floor for a conversion, which reads the input and writes the output
at once); reading the quantized weights a tensor per thread; copying the kept tensors with
``copy_file_range`` and as shardconv does (ShardWriter.copy_from: pread/pwrite through a buffer);
quantizing from host memory on the device; and writing the quantized bytes (into the page cache, as
the pipeline does without --fsync).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import drop_cache  # noqa: E402

from shardconv.formats import get_format
from shardconv.planning import build_plan
from shardconv.quantize import quantize_group
from shardconv.safetensors_io import read_into
from shardconv.shard_writer import PlannedTensor, ShardWriter
from shardconv.source import open_source


def read_files(files: list[Path], threads: int, chunk: int, direct: bool) -> int:
    """Read every file front to back in ``chunk``-byte pieces handed out in file order to ``threads``
    threads (so ``threads`` reads are in flight), with O_DIRECT when ``direct``; returns bytes read."""
    import mmap
    import threading

    pieces = [(f, off, min(chunk, f.stat().st_size - off)) for f in files for off in range(0, f.stat().st_size, chunk)]
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = {f: os.open(f, flags) for f in files}
    lock, nxt, total = threading.Lock(), [0], [0]

    def work() -> None:
        buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
        while True:
            with lock:
                if nxt[0] == len(pieces):
                    return
                f, off, n = pieces[nxt[0]]
                nxt[0] += 1
            want = (n + 4095) // 4096 * 4096 if direct else n
            got = os.preadv(fds[f], [memoryview(buf)[:want]], off)
            with lock:
                total[0] += min(got, n)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for fd in fds.values():
        os.close(fd)
    return total[0]


def write_zeros(path: Path, nbytes: int, piece: int = 64 << 20) -> int:
    """Write ``nbytes`` to a new file in ``piece``-byte writes, as the pipeline's writers do (no fsync)."""
    buf = memoryview(bytearray(piece))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < nbytes:
            done += os.pwrite(fd, buf[: min(piece, nbytes - done)], done)
    finally:
        os.close(fd)
    return done


class Rows(list):
    """Rows printed as they are measured, so a run cut off by a time limit still tells."""

    def append(self, row) -> None:
        super().append(row)
        name, nbytes, secs = row
        print(f"{name:50} {nbytes / 1e9:7.2f} {secs:7.2f} {nbytes / 1e9 / secs:7.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("--readers", default="1,2,4,8")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--whole-reads", default="1:16M,4:64M,4:64M:direct,8:16M:direct,16:8M:direct",
                    help="THREADS:CHUNK[:direct] runs reading every input file front to back")
    args = ap.parse_args()
    source = open_source(args.src)
    plan = build_plan(source, get_format("modelopt"))
    members = [m for u in plan.units for m in u.members]
    copies = [u.copy for u in plan.units if u.copy is not None]
    qbytes = sum(m.weight.nbytes for m in members)
    rows = Rows()
    files = [Path(p) for p in source.shards]
    allbytes = sum(f.stat().st_size for f in files)
    drop_cache(*files)
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    rows.append(("cat all input files", allbytes, time.perf_counter() - t0))
    for spec in filter(None, args.whole_reads.split(",")):
        n, chunk, *direct = spec.split(":")
        drop_cache(*files)
        t0 = time.perf_counter()
        got = read_files(files, int(n), int(chunk[:-1]) << 20, bool(direct))
        rows.append((f"read all, {n} threads, {chunk}B pieces{', O_DIRECT' if direct else ''}", got,
                     time.perf_counter() - t0))
    biggest = max(m.weight.nbytes for m in members)
    for n in [int(x) for x in args.readers.split(",")]:
        drop_cache(*source.shards)
        bufs = [torch.empty(biggest, dtype=torch.uint8) for _ in range(n)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            for i in range(0, len(members), n):
                list(pool.map(lambda j: read_into(members[j].weight, bufs[j - i]), range(i, min(i + n, len(members)))))
        rows.append((f"read quantized weights, {n} threads", qbytes, time.perf_counter() - t0))
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.src))) as tmp:
        drop_cache(*source.shards)
        t0 = time.perf_counter()
        with open(Path(tmp) / "copy-cfr", "wb") as out:
            for c in copies:
                with open(c.path, "rb") as f:
                    done = 0
                    while done < c.nbytes:
                        n = os.copy_file_range(f.fileno(), out.fileno(), c.nbytes - done, c.offset + done)
                        if n <= 0:
                            sys.exit(f"{c.path}: tensor {c.name!r}: file ended early")
                        done += n
        rows.append(("copy kept tensors (copy_file_range)", sum(c.nbytes for c in copies), time.perf_counter() - t0))
        drop_cache(*source.shards)
        planned = [PlannedTensor(c.name, c.dtype, c.shape) for c in copies]
        w = ShardWriter(Path(tmp) / "copy.safetensors", planned)
        t0 = time.perf_counter()
        for c in copies:
            w.copy_from(c.name, c)
        w.finish()
        rows.append(("copy kept tensors (shardconv: pread + pwrite)", sum(c.nbytes for c in copies),
                     time.perf_counter() - t0))
        drop_cache(*files)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(1) as pool:
            wrote = pool.submit(write_zeros, Path(tmp) / "out-sized", plan.out_bytes)
            got = read_files(files, 4, 64 << 20, False)
            wrote = wrote.result()
        rows.append((f"read all, 4 threads, + write {wrote / 1e9:.2f} GB beside", got, time.perf_counter() - t0))
        # quantize from host memory (warm), one group at a time, results back on the host
        dev = torch.device(args.device)
        sample = [u for u in plan.units if u.members][:24]
        weights = [[read_into(m.weight) for m in u.members] for u in sample]
        if dev.type == "cuda":
            weights = [[w.pin_memory() for w in ws] for ws in weights]
            quantize_group(sample[0].members, weights[0], "max", dev)
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = [quantize_group(u.members, ws, "max", dev) for u, ws in zip(sample, weights)]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        sbytes = sum(m.weight.nbytes for u in sample for m in u.members)
        rows.append((f"quantize on {dev} (host to host)", sbytes, time.perf_counter() - t0))
        flat = [q.packed for qs in outs for q in qs]
        planned = [PlannedTensor(f"t{i}", "U8", tuple(t.shape)) for i, t in enumerate(flat)]
        w = ShardWriter(Path(tmp) / "write.safetensors", planned)
        t0 = time.perf_counter()
        for i, t in enumerate(flat):
            w.write(f"t{i}", t)
        w.finish()
        rows.append(("write quantized bytes (pwrite, page cache)", sum(t.numel() for t in flat), time.perf_counter() - t0))
    print(f"\n{'stage':50} {'GB':>7} {'s':>7} {'GB/s':>7}")
    for name, nbytes, secs in rows:
        print(f"{name:50} {nbytes / 1e9:7.2f} {secs:7.2f} {nbytes / 1e9 / secs:7.2f}")


if __name__ == "__main__":
    main()
