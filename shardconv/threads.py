"""How shardconv's threads use the CPU: the cores this process may run on, the default reader and
writer thread counts, and the GIL switch interval while the GPU pipeline runs. One place for the
policy behind reader and writer threads (pipeline.py), torch's CPU threads (quantize.py) and whether
the Linear-detection helper is started (linears_helper.py). Torch-free, so the command line can ask
before importing torch.
"""

from __future__ import annotations

import os


def usable() -> int:
    """Cores in this process's affinity mask (a container's or ``taskset``'s limit), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def io_threads(cores: int | None = None) -> tuple[int, int]:
    """Default (readers, writers): half and a quarter of the cores, 4-8 and 2-4.

    Measured on the H200 machine (16 cores, 70B slice in the page cache, README Performance): 4/2
    finished in 6.3 s, 8/4 in 4.3 s, 12/6 in 4.5 s, 16/8 in 4.4 s; more threads only contend for memory
    bandwidth. A small machine keeps 4/2: readers and writers mostly wait for the disk there.
    """
    if cores is None:
        cores = usable()
    return min(8, max(4, cores // 2)), min(4, max(2, cores // 4))


# The GIL switch interval while the GPU pipeline runs (Python's own: 5 ms). H200 machine, qwen3moe:8 in
# the page cache, pipeline span (one run each, same call): mse 9.0 s with 5 ms against 5.8 s with
# 0.2 ms; max 4.8 s with 5 ms, 4.2 s with 1 ms, 5.2 s with 0.2 ms (README Performance).
SWITCH_INTERVAL = 0.0002


def switch_interval() -> float | None:
    """Seconds between the interpreter's forced hand-overs of the GIL while the GPU pipeline runs:
    ``SHARDCONV_SWITCH_INTERVAL`` (``0``: Python's own, None here), else :data:`SWITCH_INTERVAL`.

    Why: the main thread issues many small CUDA calls per group (and ``mse`` waits per row chunk),
    giving the GIL up in each; with 12 reader and writer threads busy, taking it back waited up to a
    whole interval every time.
    """
    value = os.environ.get("SHARDCONV_SWITCH_INTERVAL", "")
    try:
        seconds = float(value) if value else SWITCH_INTERVAL
    except ValueError:
        seconds = SWITCH_INTERVAL
    return seconds if seconds > 0 else None
