"""Input encodings, one module each: plain floating point, FP8 blocks (and, beside them, the 4-bit
source formats). Each says which tensors hold a weight and dequantizes it on a device (base.py)."""

from .base import (DEQUANT_DTYPE, DEQUANT_DTYPE_NAME, EncodedWeight, Encoding, dequantize_excluded, isfinite,
                   plain_tensors, source_weight)
from .detect import detect
from .fp8_blocks import Fp8Blocks
from .plain import Plain

__all__ = ["DEQUANT_DTYPE", "DEQUANT_DTYPE_NAME", "EncodedWeight", "Encoding", "Fp8Blocks", "Plain", "detect",
           "dequantize_excluded", "isfinite", "plain_tensors",
           "source_weight"]
