"""shardconv: stream Hugging Face safetensors checkpoints into NVFP4 checkpoints, one shard at a time.

The Python API (api.py), importable without torch until a function is called::

    import shardconv
    result = shardconv.convert("Qwen/Qwen3-8B", "qwen3-8b-nvfp4", scales="mse")
    report = shardconv.verify("qwen3-8b-nvfp4", source="Qwen/Qwen3-8B")
"""

from .api import ConvertResult, convert, cpu_estimate, default_dst, describe, plan, verify
from .errors import (AmaxError, DestinationError, OptionError, QuantizationError, ShardconvError,
                     SourceError)

__version__ = "0.2.0"
__all__ = [
    "convert", "plan", "describe", "verify", "default_dst", "cpu_estimate", "ConvertResult",
    "ShardconvError", "SourceError", "AmaxError", "DestinationError", "OptionError", "QuantizationError",
    "__version__",
]
