#!/usr/bin/env python3
"""The page cache's write ceiling on this machine: GB/s of buffered ``pwrite`` (16 MiB pieces, 4 GiB in
all, nothing synced) with 1, 4 or 8 threads, into one file or one file per thread. What the pipeline's
writers and copiers can reach at most; on the H200 machine one file stopped at ~3.5 GB/s whatever the
threads (README, Performance, stop 21).

    python tools/write_ceiling.py --dir /tmp
"""

from __future__ import annotations

import argparse
import os
import threading
import time

PIECE = 16 * 2**20


def run(folder: str, size: int, threads: int, files: int) -> float:
    """GB/s of ``threads`` threads writing ``size`` bytes in PIECE pieces into ``files`` new files."""
    paths = [os.path.join(folder, f"shardconv-write-ceiling-{os.getpid()}-{i}") for i in range(files)]
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL) for p in paths]
    data = os.urandom(PIECE)
    pieces = size // PIECE

    def work(first: int) -> None:
        for i in range(first, pieces, threads):
            os.pwrite(fds[i % files], data, (i // files) * PIECE)

    try:
        t0 = time.perf_counter()
        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return size / (time.perf_counter() - t0) / 1e9
    finally:
        for fd, path in zip(fds, paths):
            os.close(fd)
            os.unlink(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp", help="a folder on the file system to measure")
    ap.add_argument("--gib", type=int, default=4, help="GiB written per step")
    args = ap.parse_args()
    for threads, files in ((1, 1), (4, 1), (4, 4), (8, 1), (8, 8), (1, 1)):
        rate = run(args.dir, args.gib * 2**30, threads, files)
        print(f"write ceiling: {threads} threads, {files} file(s): {rate:.2f} GB/s", flush=True)


if __name__ == "__main__":
    main()
