"""Output formats: how quantized tensors are named and which config files describe them."""

from __future__ import annotations

from ..errors import OptionError
from .compressed_tensors import CompressedTensorsFormat
from .modelopt import ModelOptFormat

FORMATS = {"modelopt": ModelOptFormat, "compressed-tensors": CompressedTensorsFormat}


def get_format(name: str):
    try:
        return FORMATS[name]()
    except KeyError:
        raise OptionError(f"--format {name}: unknown (choose from {', '.join(FORMATS)})") from None
