"""Plain floating-point sources (bf16, fp16, fp32): every weight is quantized as it is stored."""

from __future__ import annotations

from .base import Encoding


class Plain(Encoding):
    name = "plain"
