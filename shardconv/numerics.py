"""NVFP4 numerics: the plain torch reference, following ModelOpt's export arithmetic operation by operation.

Every function works on any device with the same bytes: only IEEE fp32 operations with a single
rounding each (max, multiply, divide, compare) and torch's round-to-nearest-even casts are used, so
CPU and CUDA agree bit for bit. See ../shared/FORMAT.md §1.

Shapes: a weight is ``[..., in]`` with ``in % 16 == 0``; block tensors are ``[..., in/16]``.
"""

from __future__ import annotations

import torch

# Elements per step of the row-chunked passes (quantizing, dequantizing an encoded source): rows per
# step are chosen so that fp32 temporaries stay around 64 MB.
CHUNK_ELEMENTS = 1 << 24

BLOCK = 16
FP4_MAX = 6.0
FP8_MAX = 448.0
FP8_MIN = 2.0**-9  # smallest positive e4m3 subnormal: no block scale may underflow to 0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# (bound, inclusive): |x| above the bound (or equal to it when inclusive) moves up one code.
# Ties go to the even mantissa: 0.25->0, 0.75->1.0, 1.25->1.0, 1.75->2.0, 2.5->2.0, 3.5->4.0, 5->4.0.
_E2M1_STEPS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


# How a tensor is divided by a Python number. ModelOpt writes ``amax / 2688.0``, ``amax / 6.0``,
# ``amax / 448.0``: on the CPU torch divides (one rounding); on CUDA it multiplies by the fp32
# reciprocal (``a * fp32(1/d)``, ATen's div_true_kernel_cuda), which is one ulp off for some values.
# So ModelOpt's own bytes depend on where its export ran. We compute either rule on any device:
# "cpu" (the default, checked against ModelOpt exports in tests/golden) or "cuda".
EXPORT_ROUNDING = "cpu"


def set_export_rounding(kind: str) -> None:
    """Reproduce a ModelOpt export that ran on ``"cpu"`` or on ``"cuda"``."""
    global EXPORT_ROUNDING
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"export rounding must be 'cpu' or 'cuda', not {kind!r}")
    EXPORT_ROUNDING = kind


def fp32_scalar(value: float, device) -> torch.Tensor:
    """A 0-d fp32 tensor made on ``device`` by a fill, not copied from the host: ``torch.tensor(v,
    device="cuda")`` is a blocking copy that waits for everything queued on the stream."""
    return torch.full((), value, dtype=torch.float32, device=device)


def true_div(x: torch.Tensor, d: float) -> torch.Tensor:
    """``x / d`` with one rounding on any device (a Python divisor makes CUDA multiply by 1/d)."""
    return x / fp32_scalar(d, x.device)


def div_scalar(x: torch.Tensor, d: float) -> torch.Tensor:
    """``x / d`` for a Python number ``d``, rounded as ModelOpt's export on EXPORT_ROUNDING's device."""
    if EXPORT_ROUNDING == "cuda":  # CUDA multiplies by the fp32 reciprocal, itself rounded once
        inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(d, dtype=torch.float32)
        return x * fp32_scalar(inv.item(), x.device)
    return true_div(x, d)


def _per_tensor(amax: torch.Tensor) -> torch.Tensor:
    """A global amax as fp32: 0-d for one tensor; a batch of groups keeps its shape (``[G, 1, 1]``),
    which broadcasts over the batch's ``[G, rows, in]`` weights element by element, same bytes."""
    return amax.float().reshape(()) if amax.numel() == 1 else amax.float()


def global_scale(global_amax: torch.Tensor, fp8_max: float = FP8_MAX) -> torch.Tensor:
    """``weight_scale_2`` (and ``input_scale``): amax / (6 * 448) in fp32, a 0-d tensor (or one per
    group of a batch).

    ``fp8_max``: the e4m3 value that ``amax / 6`` maps to (256 for four-over-six weights)."""
    return div_scalar(_per_tensor(global_amax), FP4_MAX * fp8_max)


def block_amax(weight: torch.Tensor) -> torch.Tensor:
    """Exact per-block max of |w| in fp32, ``[..., in/16]``."""
    blocks = weight.reshape(*weight.shape[:-1], weight.shape[-1] // BLOCK, BLOCK)
    return blocks.abs().amax(dim=-1).float()


def block_scales_dynamic(weight: torch.Tensor, weight_scale_2: torch.Tensor) -> torch.Tensor:
    """e4m3 block scales computed from the weight (ModelOpt's dynamic/max export path)."""
    scale = block_amax(weight) / (FP4_MAX * weight_scale_2.to(weight.device))
    scale.masked_fill_(scale == 0, 1.0)  # not scale[mask] = 1: that may synchronise
    # ModelOpt clamps only below; amax_b <= g keeps the ratio <= 448 up to one fp32 ulp, which
    # the e4m3 cast rounds to 448 anyway, so the upper clamp changes no byte and guards bad scales.
    return scale.clamp_(min=FP8_MIN, max=FP8_MAX).to(torch.float8_e4m3fn)


def block_scales_static(block_amax_: torch.Tensor, global_amax: torch.Tensor, fp8_max: float = FP8_MAX) -> torch.Tensor:
    """e4m3 block scales from saved per-block amax and the (group's) global amax (static path).

    ``fp8_max`` normalises as in :func:`global_scale` (four-over-six: 256); the clamp stays 448."""
    scale = div_scalar(block_amax_.float(), FP4_MAX)
    scale.masked_fill_(scale == 0, 1.0)  # not scale[mask] = 1: that may synchronise
    scale_max = div_scalar(_per_tensor(global_amax).to(scale.device), FP4_MAX)
    return (scale * fp8_max / scale_max).clamp_(min=FP8_MIN, max=FP8_MAX).to(torch.float8_e4m3fn)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """4-bit codes (sign << 3 | magnitude index) of already-scaled fp32 values."""
    mag = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for bound, inclusive in _E2M1_STEPS:
        code += (mag >= bound) if inclusive else (mag > bound)
    code |= (x < 0).to(torch.uint8) << 3  # sign from the unrounded value: tiny negatives give 0x8
    return code


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, even element in the low nibble: ``[..., n] -> [..., n/2]`` uint8."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`."""
    out = torch.stack((packed & 0x0F, packed >> 4), dim=-1)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize(weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 weight ``[..., in/2]`` uint8 for given e4m3 block scales and fp32 global scale.

    One fp32 division per element by (block scale * global scale), the product formed first.
    """
    shape = weight.shape
    blocks = weight.reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK)
    denom = weight_scale.float() * weight_scale_2.to(weight_scale.device)
    scaled = blocks.float() / denom.unsqueeze(-1)
    return pack_nibbles(e2m1_codes(scaled).reshape(shape))


def dequantize(
    packed: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor, dtype=torch.float32
) -> torch.Tensor:
    """``e2m1(code) * fp32(weight_scale) * weight_scale_2``, the way engines read the checkpoint back."""
    codes = unpack_nibbles(packed).long()
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), device=packed.device)
    vals = table[codes]
    vals = vals.reshape(*vals.shape[:-1], vals.shape[-1] // BLOCK, BLOCK)
    scale = weight_scale.float() * weight_scale_2.to(weight_scale.device)
    return (vals * scale.unsqueeze(-1)).reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(dtype)
