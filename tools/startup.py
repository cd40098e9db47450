#!/usr/bin/env python3
"""Start-up of ``shardconv convert`` from a cold input: process start -> first input byte, -> ready
to convert, -> done (SHARDCONV_PROFILE's lines), each variant run in turn.

    python tools/startup.py SRC [--runs 2] [--variants "helper=1 helper=0"] [--cold-bytecode] [-- ARGS]

Before every run SRC's pages are evicted (drop_caches as root, else posix_fadvise DONTNEED: bench.py).
``--cold-bytecode`` gives each run an empty PYTHONPYCACHEPREFIX, so every library module is compiled
again, as on a fresh machine. A variant is ``helper=0|1`` (SHARDCONV_LINEARS_HELPER) or
``tree=PATH`` (another shardconv checkout on PYTHONPATH, e.g. an older commit's), joined with ``,``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import drop_cache  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = {"first byte": r"first input byte read ([0-9.]+) s", "helper": r"linears helper answered ([0-9.]+) s",
            "ready": r"ready to convert ([0-9.]+) s", "done": r"done ([0-9.]+) s after"}


def run(src: str, variant: str, cold: bool, extra: list[str]) -> dict[str, str]:
    env = dict(os.environ, SHARDCONV_PROFILE="1")
    tree = str(ROOT)
    for part in filter(None, variant.split(",")):
        key, _, value = part.partition("=")
        if key == "helper":
            env["SHARDCONV_LINEARS_HELPER"] = value
        elif key == "tree":
            tree = value
    env["PYTHONPATH"] = tree
    with tempfile.TemporaryDirectory() as tmp:
        if cold:
            env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        drop_cache(Path(src))
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "shardconv", "convert", src, str(Path(tmp) / "out"), "-q",
                              "--no-progress", *extra], env=env, capture_output=True, text=True, cwd=tmp)
        wall = time.perf_counter() - t0
    if out.returncode:
        return {"error": out.stderr.strip()[-300:]}
    row = {k: (m.group(1) if (m := re.search(p, out.stdout)) else "-") for k, p in PATTERNS.items()}
    row["wall"] = f"{wall:.1f}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--variants", default="helper=1 helper=0")
    ap.add_argument("--cold-bytecode", action="store_true")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # more convert options
    args = ap.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    for i in range(args.runs):
        for variant in args.variants.split():
            row = run(args.src, variant, args.cold_bytecode, extra)
            print(f"run {i} {variant:<24} " + "  ".join(f"{k} {v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
