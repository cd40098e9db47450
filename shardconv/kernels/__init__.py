"""Optional fused GPU kernels (Triton). Imported lazily: the CPU install has no Triton, and every
kernel has a plain torch reference that gives the same result (``shardconv/sweep.py``)."""

from __future__ import annotations

import functools


@functools.cache
def sweep_kernels():
    """The Triton scale-sweep kernels module, or None when Triton cannot be imported."""
    try:
        from . import sweep_triton
    except ImportError:
        return None
    return sweep_triton
