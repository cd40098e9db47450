"""The CPU cores this process may run on: the one count behind reader and writer threads
(host_buffers.py), torch's CPU threads (quantize.py) and whether a helper process is started
(linears_helper.py). Torch-free, so the command line can ask before importing torch."""

from __future__ import annotations

import os


def usable() -> int:
    """Cores in this process's affinity mask (a container's or ``taskset``'s limit), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
