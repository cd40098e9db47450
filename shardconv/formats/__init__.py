"""Output formats: how quantized tensors are named and which config files describe them."""

from __future__ import annotations

from ..errors import ShardconvError
from .modelopt import ModelOptFormat

FORMATS = {"modelopt": ModelOptFormat}


def get_format(name: str):
    try:
        return FORMATS[name]()
    except KeyError:
        raise ShardconvError(f"--format {name}: unknown (choose from {', '.join(FORMATS)})") from None
