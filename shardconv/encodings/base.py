"""The interface every input encoding implements, and what the pipeline asks of it.

An encoding says which source tensors hold a Linear weight in a quantized form (the *codes*, read
through the pipeline's buffers like any weight, plus small parts such as block scales, read
directly), what that weight's name and shape would be in a plain bf16 checkpoint, and how to
dequantize it on a device. Planning, Linear detection and verification see only the plain view, so
the pipeline never asks which encoding it has.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import SourceError
from ..safetensors_io import TensorInfo, read_into

DEQUANT_DTYPE = torch.bfloat16
DEQUANT_DTYPE_NAME = "BF16"


@dataclass(frozen=True)
class EncodedWeight:
    """One weight stored in a quantized encoding."""

    name: str  # its name in a plain checkpoint: ``M.weight``, or a stacked ``...experts.gate_up_proj``
    shape: tuple[int, ...]  # its shape there
    data: TensorInfo  # the codes: the big tensor, read like a plain weight
    parts: tuple[TensorInfo, ...]  # scales and the like: small, read when dequantizing
    encoding: "Encoding"

    def plain_view(self) -> TensorInfo:
        """A TensorInfo with the plain name, shape and dtype, for classification only (never read it)."""
        return replace(self.data, name=self.name, shape=tuple(self.shape), dtype=DEQUANT_DTYPE_NAME)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """The weight in bf16 on ``codes``' device; the bytes do not depend on the device."""
        parts = [read_into(p) for p in self.parts]
        self.encoding.check_parts(self, parts)  # on the host: no device sync
        parts = [p.to(codes.device, non_blocking=True) for p in parts]
        return self.encoding.dequantize(self, codes, parts)


class Encoding:
    """A source's weight encoding. Subclasses override :meth:`weights` and :meth:`dequantize`."""

    name = "plain"
    label = "plain"  # for messages: "after FP8 dequantization"

    def weights(self, source) -> dict[str, EncodedWeight]:
        """Encoded weights by the name of their codes tensor (checked: every part present, right shape)."""
        return {}

    def dropped(self, source, weights: dict[str, EncodedWeight]) -> set[str]:
        """Source tensors that belong to no output tensor: the encoded weights' parts (and, for FP8, the
        activation scales of the replaced quantization)."""
        return {p.name for w in weights.values() for p in w.parts}

    def check_parts(self, weight: EncodedWeight, parts: list[torch.Tensor]) -> None:
        """Checks of the parts' values (CPU tensors) that headers cannot make; raises SourceError."""

    def dequantize(self, weight: EncodedWeight, codes: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def note(self) -> str | None:
        """What the plan should tell the user about this source (None for plain weights)."""
        return None

    def describe(self) -> str | None:
        """A few words for the dry-run report."""
        return None


def isfinite(t: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite`` that also takes float8_e4m3fn (whose only non-finite codes are 0x7F and 0xFF)
    and integer codes (always finite)."""
    if t.dtype == torch.float8_e4m3fn:
        return (t.view(torch.uint8) & 0x7F) != 0x7F
    if not t.dtype.is_floating_point:
        return torch.ones(t.shape, dtype=torch.bool, device=t.device)
    return torch.isfinite(t)


def source_weight(member, weight: torch.Tensor) -> torch.Tensor:
    """The weight a member is quantized from: encoded members are dequantized on the weight's device."""
    encoded = getattr(member, "encoded", None)
    return weight if encoded is None else encoded.dequantize(weight)


def dequantize_excluded(weight: EncodedWeight, device="cpu") -> torch.Tensor:
    """An excluded encoded weight, dequantized on ``device`` and returned on the CPU, checked finite
    (its quantization_config is replaced, so it is written as plain bf16)."""
    out = weight.dequantize(read_into(weight.data).to(device)).cpu()
    bad = ~torch.isfinite(out)
    if bool(bad.any()):  # e.g. an Inf or NaN scale, or one that overflows bf16
        where = ", ".join(str(int(i)) for i in bad.nonzero()[0])
        parts = ", ".join(p.name for p in weight.parts)
        raise SourceError(f"{weight.data.path}: tensor {weight.data.name!r} dequantizes to NaN/Inf (first at "
                          f"[{where}]; check {parts})")
    return out


def plain_tensors(source, encoding: Encoding, weights: dict[str, EncodedWeight]) -> dict:
    """The source's tensors as a plain checkpoint would hold them: each encoded weight under its plain
    name and shape, its encoding's parts left out. Linear detection (linears.py) and the plan's rules
    see these; the Linear-detection helper computes the same view (linears_helper.py)."""
    dropped = encoding.dropped(source, weights)
    return {name: (weights[name].plain_view() if name in weights else info)
            for name, info in source.tensors.items() if name not in dropped}
