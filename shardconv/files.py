"""A checkpoint folder's safetensors files: their names, and the order shardconv reads them in.

Torch-free, so the start-up read-ahead (readahead.py) can use it before torch is imported; the
source (source.py) and ``verify`` list shards with the same rules.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def indexed_shard_names(index_names: Iterable[str]) -> list[str]:
    """The shard names an index's ``weight_map`` values name, each once, in reading order (sorted;
    ``a.safetensors`` and ``./a.safetensors`` are one shard)."""
    return sorted({os.path.normpath(n) for n in index_names})


def unindexed_shards(root: Path) -> list[Path]:
    """The shards of a folder without an index: ``model.safetensors``, else every ``*.safetensors``."""
    if (root / SINGLE_NAME).is_file():
        return [root / SINGLE_NAME]
    return sorted(p for p in root.glob("*.safetensors") if p.is_file())
