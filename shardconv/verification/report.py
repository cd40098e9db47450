"""What every verify check shares: the report, a quantized module as found in DST, reading JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..safetensors_io import TensorInfo

DEFAULT_MAX_ERROR = 0.5
# A per-tensor FP8 (e4m3) layer reconstructs within ~2^-4 relative error (3 mantissa bits; 0.027 on the
# golden Qwen3-MoE): held to 0.5 as NVFP4 is, a scale 1.5x too large passed verify (--no-recompute, or a
# checkpoint whose scales cannot be recomputed). It is held to this, or to max_error where that is lower.
FP8_MAX_ERROR = 0.125
MAX_REPORTED = 50  # problem lines printed; the count covers all of them
NVFP4_ALGOS = {"NVFP4", "W4A16_NVFP4"}


@dataclass
class QModule:
    """One quantized Linear (or stacked expert tensor) found in DST, in either convention."""

    module: str  # module name; stacked experts: the tensor name (``...experts.gate_up_proj``)
    packed: TensorInfo
    scale: TensorInfo | None
    scale_2: TensorInfo | None  # ModelOpt weight_scale_2, or compressed-tensors weight_global_scale
    input_scale: TensorInfo | None
    stacked: bool = False
    fp8: bool = False  # a per-tensor FP8 module of a mixed-precision checkpoint (scale: weight_scale, no scale_2)

    @property
    def owner(self) -> str:
        """The name exclusion lists use: the experts module for a stacked tensor."""
        return self.module.rpartition(".")[0] if self.stacked else self.module


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    errors: list[tuple[str, tuple[int, ...], float]] = field(default_factory=list)  # (module, shape, rel error)

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, message: str) -> None:
        self.problems.append(" ".join(str(message).split()))


def load_json(path: Path, report: Report) -> object | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        report.fail(f"{path}: not valid JSON ({type(e).__name__}: {e})")
        return None

