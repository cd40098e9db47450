"""Optional fused GPU kernels (Triton). Imported lazily: the CPU install has no Triton, and every
kernel has a plain torch reference that gives the same result (``shardconv/sweep.py``)."""

from __future__ import annotations

import functools
import threading

_warming: threading.Thread | None = None


@functools.cache
def sweep_kernels():
    """The Triton scale-sweep kernels module, or None when Triton cannot be imported."""
    try:
        from . import sweep_triton
    except ImportError:
        return None
    return sweep_triton


def warm_up(method: str, device, dtype) -> None:
    """Import Triton and load the sweep kernels for ``method`` in a background thread, while the
    pipeline starts reading. Why: the first launch in a process costs Triton's own start-up, ~0.7 s on
    the H200 machine (most of it hashing Triton's sources for its cache key), which otherwise fell on
    the pipeline's main thread while the reads waited (issue 11). :func:`ready` waits for it."""
    global _warming
    if _warming is not None:
        return

    def run():
        try:
            import torch

            kernels = sweep_kernels()
            if kernels is None:
                return
            with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
                blocks = torch.ones(4096, 16, dtype=dtype, device=device)
                g = torch.ones(1, dtype=torch.float32, device=device)
                if method == "four-over-six":
                    kernels.four_over_six_amax(blocks, g)
                else:
                    kernels.mse_choice_groups(blocks, g)
        except Exception:  # only a warm-up: the pipeline's own launch meets any real problem and reports it
            pass

    _warming = threading.Thread(target=run, daemon=True, name="shardconv-triton-warm-up")
    _warming.start()


def ready() -> None:
    """Wait for a :func:`warm_up` in progress (Triton's JIT is not used from two threads at once)."""
    if _warming is not None:
        _warming.join()
