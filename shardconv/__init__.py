"""shardconv: stream Hugging Face safetensors checkpoints into NVFP4 checkpoints, one shard at a time."""

__version__ = "0.1.0"
