#!/usr/bin/env python3
"""Where CUDA and CPU conversions differ, and what the process's resident memory is made of.

    python tools/gpu_diag.py [--family qwen3_moe]
"""

import argparse
import resource
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from shardconv.cli import main as cli
from shardconv.synth import write_checkpoint


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_parts() -> dict[str, float]:
    parts = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            parts[key] = int(line.split()[1]) / 1024
    return parts


def sample_memory(stop, peaks: dict) -> None:
    import time

    while not stop.is_set():
        for k, v in rss_parts().items():
            peaks[k] = max(peaks.get(k, 0.0), v)
        time.sleep(0.05)


def memory_run(layers: int) -> None:
    """Convert a Llama-70B slice in-process while sampling the resident set by kind."""
    import sys
    import threading

    sys.path.insert(0, str(Path(__file__).parent))
    from bench import MODELS, write_model

    family, kw, _ = MODELS["llama70b"]
    tmp = Path(tempfile.mkdtemp())
    write_model(tmp / "src", family, layers, kw, 5 * 10**9)
    peaks: dict[str, float] = {}
    stop = threading.Event()
    t = threading.Thread(target=sample_memory, args=(stop, peaks), daemon=True)
    t.start()
    print(f"before convert: {rss_parts()}")
    assert cli(["convert", str(tmp / "src"), str(tmp / "out"), "--device", "cuda", "--no-progress"]) == 0
    stop.set()
    t.join()
    print(f"llama70b:{layers} peak by kind (MB): {peaks}")


def tensors(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        with safe_open(str(p), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen3_moe")
    ap.add_argument("--mem-layers", type=int, default=0, help="also sample RSS over a llama70b slice")
    args = ap.parse_args()
    print(f"RSS after import torch: {rss_mb():.0f} MB")
    torch.zeros(1, device="cuda")
    print(f"RSS after CUDA init: {rss_mb():.0f} MB")
    torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    print(f"RSS after 1 GiB pinned (freed to cache): {rss_mb():.0f} MB")
    tmp = Path(tempfile.mkdtemp())
    write_checkpoint(tmp / "src", family=args.family, weights="structured", num_layers=2, shard_size=200_000)
    for dev in ("cpu", "cuda"):
        assert cli(["convert", str(tmp / "src"), str(tmp / dev), "--device", dev, "--no-progress"]) == 0
    a, b = tensors(tmp / "cpu"), tensors(tmp / "cuda")
    bad = [k for k in a if not torch.equal(a[k].view(torch.uint8) if a[k].dim() else a[k].reshape(1).view(torch.uint8),
                                           b[k].view(torch.uint8) if b[k].dim() else b[k].reshape(1).view(torch.uint8))]
    print(f"{len(bad)} of {len(a)} tensors differ")
    for k in bad[:12]:
        x, y = a[k], b[k]
        if x.dtype == torch.float8_e4m3fn:
            x, y = x.float(), y.float()
        if x.dtype == torch.uint8:
            n = (x != y).sum().item()
            print(f"  {k} {tuple(x.shape)} {x.dtype}: {n} bytes differ")
        else:
            d = (x.float() != y.float())
            idx = d.nonzero()[:3].tolist()
            print(f"  {k} {tuple(x.shape)}: {d.sum().item()} differ, e.g. at {idx}: "
                  f"{[x.float()[tuple(i)].item() for i in idx]} vs {[y.float()[tuple(i)].item() for i in idx]}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.mem_layers:
        memory_run(args.mem_layers)


if __name__ == "__main__":
    main()
