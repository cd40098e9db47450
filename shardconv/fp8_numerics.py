"""FP8 per-tensor numerics (the FP8 layers of a mixed-precision output), as ModelOpt 0.47 exports them.

- ``weight_scale = amax / 448`` as float32 0-d, ``amax`` the module's own max |W| (ModelOpt does not
  share FP8 weight scales across q/k/v or gate/up: its export skips linear fusion for FP8; engines
  requantize to the largest scale at load). ModelOpt divides on the host (a Python float, rounded
  once to fp32), so the result is the correctly rounded fp32 quotient whatever the device.
- ``weight = e4m3(dtype(fp32(W) / weight_scale))``: ModelOpt divides the weight tensor by the 0-d fp32
  scale, and a 0-d tensor does not promote: the fp32 quotient is rounded to the weight's own dtype
  (bf16, fp16) first, then cast to e4m3 (round to nearest even; beyond ±448 saturates to ±448). The
  scale is a CPU tensor there, so an export on CUDA multiplies by its fp32 reciprocal instead
  (``numerics.EXPORT_ROUNDING == "cuda"``, as for the NVFP4 scalars).
- ``input_scale = export_amax / 448`` (ModelOpt's export_amax: a zero amax becomes 448), divided as
  tensor / Python number, so it follows ``numerics.div_scalar`` (the export device's rounding).

A zero weight has no amax to scale by: its weight_scale is 1.0 (amax 448, ModelOpt's bound for an
unused quantizer), every code 0, so it still dequantizes to exact zeros.
"""

from __future__ import annotations

import torch

from . import numerics
from .numerics import FP8_MAX, div_scalar, true_div


def weight_amax(weight: torch.Tensor, rows_list) -> torch.Tensor:
    """max |W| in fp32 (0-d, on the weight's device), row chunk by row chunk."""
    return torch.stack([weight[rows].abs().amax().float() for rows in rows_list]).amax()


def weight_scale(amax: torch.Tensor) -> torch.Tensor:
    """``amax / 448`` (fp32 0-d); a zero amax gives 1.0."""
    a = amax.float().reshape(())
    a = torch.where(a == 0, torch.full_like(a, FP8_MAX), a)
    return true_div(a, FP8_MAX)


def input_scale(amax: torch.Tensor) -> torch.Tensor:
    """``amax / 448`` as ModelOpt's export rounds it (fp32 0-d); a zero amax gives 1.0."""
    a = amax.float().reshape(())
    a = torch.where(a == 0, torch.full_like(a, FP8_MAX), a)
    return div_scalar(a, FP8_MAX)


def quantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 codes of ``fp32(weight) / scale`` rounded to the weight's dtype first (saturating at ±448)."""
    s = scale.to(weight.device).float()
    if numerics.EXPORT_ROUNDING == "cuda":  # ATen on CUDA: x * fp32(1 / s) for a CPU 0-d divisor
        x = weight.float() * (torch.ones_like(s) / s)
    else:
        x = weight.float() / s
    x = x.to(weight.dtype)
    return x.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``fp32(codes) * weight_scale``, as engines read an FP8 weight back."""
    return (codes.float() * scale.to(codes.device).float()).to(dtype)
