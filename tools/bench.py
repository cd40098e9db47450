#!/usr/bin/env python3
"""Conversion speed and memory against disk-speed baselines, measured in one run.

For each model it writes a synthetic checkpoint with real layer shapes and structured weights
(one generated tensor per distinct shape and role, reused across layers, so writing is I/O-bound),
then, with a cold page cache for every step (drop_caches as root when allowed, else
posix_fadvise(DONTNEED) on every file):
  (a) read every input shard to /dev/null with cat,
  (b) cp -r of the input folder,
  (c) shardconv convert with --scales max, and with the default scales,
  (d) llm-compressor model_free_ptq(scheme="NVFP4A16") when llmcompressor is importable.
It prints wall time, GB/s of input, the ratios (c)/(a), (c)/(b), (c)/(d), peak host RSS (of that
process, from wait4) and peak GPU memory (reported by shardconv).

    python tools/bench.py --models llama3-8b,llama70b:10,llama70b:20,qwen3moe:8 --work /tmp/bench
    python tools/bench.py --models tiny:4 --device cpu        # a CPU-sized run
    python tools/bench.py --models deepseekv3 --scales max,max@cached --no-cp-above 0 --lc-limit 0
    python tools/bench.py --models llama70b:10 --scales max --ranks 1,2 --no-cp-above 0 --lc-limit 0

``--ranks 1,2`` runs each (c) step once per world size: N > 1 under ``torchrun --nproc-per-node N``
(every rank on the host's GPUs by LOCAL_RANK, so on a one-GPU machine the ranks share it and its
disk; peak RSS is then the largest rank's).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from shardconv.safetensors_io import DTYPE_NAMES
from shardconv.shard_writer import PlannedTensor, ShardWriter
from shardconv.synth import make_tensor, plan_shards
from shardconv.synth_layout import make_config, tensor_dtype, tensor_specs

MODELS = {  # name -> (family, config kwargs, default layers)
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8,
                                head_dim=128, vocab_size=128256), 32),
    "llama70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_heads=64, num_kv_heads=8,
                               head_dim=128, vocab_size=128256), 10),
    "qwen3moe": ("qwen3_moe", dict(hidden_size=2048, num_experts=128, moe_intermediate_size=768, num_heads=32,
                                   num_kv_heads=4, head_dim=128, vocab_size=151936), 8),
    # DeepSeek-V3's shapes: MLA (q_lora_rank 1536, kv_lora_rank 512), hidden 7168, 256 routed experts of 2048
    # and a shared one; layer 0 dense, layer 1 MoE; no MTP layer (27.9 GB at 2 layers)
    "deepseekv3": ("deepseek_v3", dict(hidden_size=7168, intermediate_size=18432, num_experts=256,
                                       moe_intermediate_size=2048, num_heads=128, head_dim=128, vocab_size=129280,
                                       q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
                                       num_nextn_predict_layers=0), 2),
    "tiny": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_heads=16, num_kv_heads=4, head_dim=128,
                           vocab_size=32000), 4),
}


def role(name: str) -> str:
    """Tensors of the same role and shape share generated values (layer and expert indices dropped)."""
    return re.sub(r"\.\d+\.", ".N.", name)


def write_model(path: Path | str, family: str, layers: int, kw: dict, shard_size: int) -> int:
    """synth.write_checkpoint's layout and "structured" values, generated once per role and shape
    (:func:`role`) and streamed through ShardWriter, so multi-GB shards write at disk speed."""
    path = Path(path)
    config = make_config(family, num_layers=layers, **kw)
    specs = tensor_specs(config)
    sizes = [math.prod(s) * tensor_dtype(nm).itemsize for nm, s in specs]
    shard_of = plan_shards(sizes, shard_size)
    n = max(shard_of) + 1
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    cache: dict[tuple, torch.Tensor] = {}
    weight_map = {}
    for s in range(n):
        names = [(nm, sh) for (nm, sh), o in zip(specs, shard_of) if o == s]
        fname = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        planned = [PlannedTensor(nm, DTYPE_NAMES[tensor_dtype(nm)], tuple(sh)) for nm, sh in names]
        w = ShardWriter(path / fname, planned, {"format": "pt"})
        for nm, sh in names:
            key = (role(nm), tuple(sh))
            if key not in cache:
                cache[key] = make_tensor(key[0], tuple(sh), weights="structured")
            w.write(nm, cache[key])
            weight_map[nm] = fname
        w.finish()
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}))
    return sum(sizes)


def drop_cache(*paths: Path) -> str:
    """Empty the page cache (drop_caches as root), else evict ``paths`` (files, or folders' files) with
    posix_fadvise(DONTNEED); returns which was done."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for path in map(Path, paths):
            for p in ([path] if path.is_file() else path.rglob("*")):
                if p.is_file():
                    fd = os.open(p, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
        return "fadvise"


SAMPLED: dict[int, float] = {}
TIMED_PID = [0]


def _sample(pid: int, stop) -> None:
    """Largest VmRSS seen in /proc every 20 ms (cross-checks the kernel's ru_maxrss)."""
    peak = 0.0
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            break
        time.sleep(0.02)
    SAMPLED[pid] = peak


def timed(cmd: list[str] | str, shell: bool = False, limit: float | None = None) -> tuple[float, float, str]:
    """(wall s, peak RSS MB from wait4, stdout) of one command; SAMPLED[pid] gets the sampled peak.

    With ``limit``, a command still running after that many seconds is killed and its wall time is
    returned negated (a lower bound: "more than").
    """
    import threading

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, shell=shell, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(p.pid, stop), daemon=True)
    sampler.start()
    killer = threading.Timer(limit, p.kill) if limit else None
    if killer:
        killer.start()
    out = p.stdout.read()
    stop.set()
    sampler.join()
    TIMED_PID[0] = p.pid
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if killer:
        killer.cancel()
        if wall >= limit:
            return -wall, usage.ru_maxrss / 1024, out
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"failed: {cmd}\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 1024, out


PROFILED: dict[tuple[str, str], dict[str, float]] = {}  # (model, step) -> profile_marks, for the last table


def profile_marks(out: str) -> dict[str, float]:
    """Seconds read from SHARDCONV_PROFILE=1 lines: 'ready' and 'helper' (after process start), and
    'pipeline' (first group read to all written)."""
    marks = {}
    for key, pattern in (("ready", r"ready to convert ([0-9.]+) s"), ("helper", r"linears helper answered ([0-9.]+) s")):
        m = re.search(pattern, out)
        if m:
            marks[key] = float(m.group(1))
    m = re.search(r"events: first group read ([0-9.]+)s.*all written ([0-9.]+)s", out)
    if m:
        marks["pipeline"] = float(m.group(2)) - float(m.group(1))
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama3-8b,llama70b:10,llama70b:20,qwen3moe:8")
    ap.add_argument("--work", default="/tmp/shardconv-bench")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shard-size", type=int, default=5 * 10**9)
    ap.add_argument("--no-cp-above", type=float, default=25.0, help="skip cp -r for inputs above this many GB")
    ap.add_argument("--extra", default="", help="extra arguments for shardconv convert")
    ap.add_argument("--scales", default="max,default", help="--scales runs of (c), 'default' = no --scales; "
                    "a run ending in '@warm' reads the libraries back in after dropping caches (cold input only); "
                    "one ending in '@cached' reads the whole input into the page cache first (the pipeline's own "
                    "ceiling, as on a disk faster than the pipeline), and is compared with a warm cat; "
                    "'+NAME=VALUE' after a run sets an environment variable for it (max+SHARDCONV_BATCH=0)")
    ap.add_argument("--lc-limit", type=float, default=300, help="stop model_free_ptq after this many seconds (0: skip it)")
    ap.add_argument("--ranks", default="1", help="world sizes of each (c) step, e.g. 1,2: N > 1 runs shardconv "
                    "under torchrun --nproc-per-node N (distributed.py)")
    ap.add_argument("--keep", action="store_true", help="keep the last model's input in WORK/src")
    ap.add_argument("--json", metavar="FILE", help="also append every row to FILE as a JSON line")
    args = ap.parse_args()
    work = Path(args.work)
    rows = []

    def add(*row) -> None:  # (label, step, wall, gb, rss, gpu_gb): printed at once, so a cut-off run still tells
        rows.append(row)
        label, step, wall, gb, rss, gpu_gb = row
        print(f"[{label}] {step}: {wall if wall is None else round(wall, 2)} s, {gb:.2f} GB, RSS {rss} MB, "
              f"GPU {gpu_gb} GB", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(dict(zip(("model", "step", "wall_s", "gb", "rss_mb", "gpu_gb"), row)),) + "\n")
    for spec in args.models.split(","):
        name, _, layers = spec.partition(":")
        family, kw, default_layers = MODELS[name]
        layers = int(layers or default_layers)
        label = f"{name}:{layers}"
        src = work / "src"
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        # In a child process: a child's peak RSS (wait4's ru_maxrss) starts at its parent's peak, so
        # this process must never hold the generated tensors itself.
        code = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); from bench import write_model; "
                "print(write_model(*json.loads(sys.argv[2])))")
        size = int(subprocess.run(
            [sys.executable, "-c", code, json.dumps([str(Path(__file__).parent), os.getcwd()]),
             json.dumps([str(src), family, layers, kw, args.shard_size])],
            check=True, capture_output=True, text=True).stdout.split()[-1])
        print(f"[{label}] wrote {size / 1e9:.1f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
        gb = size / 1e9
        how = drop_cache(src)
        shards = sorted(str(p) for p in src.glob("*.safetensors"))
        read_s, _, _ = timed("cat " + " ".join(shards) + " > /dev/null", shell=True)
        add(label, "(a) cat > /dev/null", read_s, gb, None, None)
        cp_s = None
        if gb <= args.no_cp_above:
            drop_cache(src)
            cp_s, _, _ = timed(["cp", "-r", str(src), str(work / "copy")])
            add(label, "(b) cp -r", cp_s, gb, None, None)
            shutil.rmtree(work / "copy")
        for run, ranks in [(r, n) for r in args.scales.split(",") for n in map(int, args.ranks.split(","))]:
            run, *env = run.split("+")
            scales, _, warm = run.partition("@")
            scales = None if scales == "default" else scales
            step = f"(c) shardconv --scales {scales or 'default'}" + {
                "": "", "warm": ", libraries warm", "cached": ", input in page cache"}[warm] + (
                f", {ranks} ranks" if ranks > 1 else "") + "".join(f", {e}" for e in env)
            drop_cache(src)
            if warm == "cached":  # everything in the page cache: what limits is the pipeline, not the disk
                subprocess.run("cat " + " ".join(shards) + " > /dev/null", shell=True, check=True)
                if not any(r[0] == label and r[1] == "(a') cat, input in page cache" for r in rows):
                    warm_s, _, _ = timed("cat " + " ".join(shards) + " > /dev/null", shell=True)
                    add(label, "(a') cat, input in page cache", warm_s, gb, None, None)
            elif warm:  # the input stays cold; Python, torch and CUDA's libraries are read back in first
                subprocess.run([sys.executable, "-c", "import torch, shardconv.cli; torch.cuda.is_available() "
                                "and torch.zeros(1, device='cuda')"], check=True)
            dst = work / "out"
            launch = [sys.executable, "-m", "shardconv"] if ranks == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                "-m", "shardconv"]
            cmd = [*launch, "convert", str(src), str(dst), "--device", args.device, "--no-progress", *args.extra.split()]
            if scales:
                cmd += ["--scales", scales]
            saved = dict(os.environ)
            os.environ.update(e.split("=", 1) for e in env)
            try:
                wall, rss, out = timed(cmd)
            finally:
                os.environ.clear()
                os.environ.update(saved)
            for line in out.splitlines():
                if line.startswith("profile:"):
                    print(f"[{label}] {step} {line}", flush=True)
            marks = profile_marks(out)
            if marks:
                PROFILED[(label, step)] = marks
            m = re.search(r"peak GPU memory\s+([0-9.]+) GB", out)
            add(label, step, wall, gb, rss, float(m.group(1)) if m else None)
            print(f"[{label}] {step}: peak RSS {rss:.0f} MB (wait4), "
                  f"{SAMPLED.get(TIMED_PID[0], 0):.0f} MB (VmRSS sampled every 20 ms)", flush=True)
            shutil.rmtree(dst)
        try:
            if args.lc_limit <= 0:
                raise ImportError("skipped: --lc-limit 0")
            import llmcompressor  # noqa: F401  (only: is it installed?)

            drop_cache(src)
            # lm_head is kept, as shardconv keeps it; the rest are model_free_ptq's defaults
            code = ("from llmcompressor import model_free_ptq; import sys; model_free_ptq(sys.argv[1], sys.argv[2], "
                    "scheme='NVFP4A16', ignore=['lm_head'], device='cuda:0' if sys.argv[3] != 'cpu' else 'cpu')")
            wall, rss, out = timed([sys.executable, "-c", code, str(src), str(work / "lc"), args.device],
                                   limit=args.lc_limit)
            add(label, "(d) llm-compressor model_free_ptq", wall, gb, rss, None)
            shutil.rmtree(work / "lc", ignore_errors=True)
        except ImportError as e:
            add(label, f"(d) llm-compressor: not importable ({e})", None, gb, None, None)
        print(f"[{label}] cache: {how}", flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"\nmachine: {platform.node()} {os.cpu_count()} CPUs, {gpu}; torch {torch.__version__}")
    print(f"{'model':14} {'step':50} {'wall s':>8} {'GB/s':>6} {'/(a)':>6} {'/(b)':>6} {'/(d)':>6} {'RSS MB':>8} {'GPU GB':>7}")
    for label, step, wall, gb, rss, gpu_gb in rows:
        base = {s: w for lb, s, w, *_ in rows if lb == label}
        a = base.get("(a') cat, input in page cache" if "page cache" in step else "(a) cat > /dev/null")
        b = base.get("(b) cp -r")
        d = base.get("(d) llm-compressor model_free_ptq")
        r = lambda x: (f"{wall / abs(x):6.2f}" if x > 0 else f"<{wall / -x:5.2f}") if (  # noqa: E731
            x and wall and step.startswith("(c)")) else f"{'':6}"
        w = (f"{wall:8.1f}" if wall > 0 else f">{-wall:7.0f}") if wall else f"{'-':>8}"  # negative: stopped at the limit
        rate = f"{gb / abs(wall):6.2f}" if wall else f"{'':6}"
        print(f"{label:14} {step:50} {w} {rate} {r(a)} {r(b)} {r(d)} "
              f"{(f'{rss:8.0f}' if rss else ''):>8} {(f'{gpu_gb:7.2f}' if gpu_gb is not None else ''):>7}")
    if PROFILED:  # with SHARDCONV_PROFILE=1: where each run's time went
        print(f"\n{'model':14} {'step':50} {'pipeline s':>10} {'GB/s':>6} {'ready s':>8} {'helper s':>9}")
        sizes = {lb: gb for lb, _, _, gb, _, _ in rows}
        for (label, step), marks in PROFILED.items():
            pipe = marks.get("pipeline")
            rate = f"{sizes[label] / pipe:6.2f}" if pipe else f"{'':6}"
            cell = lambda k, w: f"{marks[k]:{w}.1f}" if k in marks else f"{'-':>{w}}"  # noqa: E731
            print(f"{label:14} {step:50} {cell('pipeline', 10)} {rate} {cell('ready', 8)} {cell('helper', 9)}")


if __name__ == "__main__":
    main()
