"""A checkpoint folder's files: shard names and the order shardconv reads them in, shard names an
index may use, the other files a conversion copies, and atomic JSON writes.

Torch-free, so the start-up read-ahead (readahead.py) can use it before torch is imported; the
source (source.py), the pipeline and ``verify`` follow the same rules.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".partial")
REPORT_NAME = "shardconv-report.json"  # what a conversion made up (uncalibrated experts' amax), for people
REWRITTEN = {"config.json", "hf_quant_config.json", INDEX_NAME, REPORT_NAME}  # written anew by a conversion
SKIP_DIRS = {"original"}  # Meta's consolidated weights in Llama repos


def indexed_shard_names(index_names: Iterable[str]) -> list[str]:
    """The shard names an index's ``weight_map`` values name, each once, in reading order (sorted;
    ``a.safetensors`` and ``./a.safetensors`` are one shard)."""
    return sorted({os.path.normpath(n) for n in index_names})


def unindexed_shards(root: Path) -> list[Path]:
    """The shards of a folder without an index: ``model.safetensors``, else every ``*.safetensors``."""
    if (root / SINGLE_NAME).is_file():
        return [root / SINGLE_NAME]
    return sorted(p for p in root.glob("*.safetensors") if p.is_file())


def stays_inside(name: object) -> bool:
    """Whether an index's shard name stays in its folder: a relative path without ``..`` (a shard
    that is a symbolic link is fine)."""
    return (isinstance(name, str) and bool(name) and "\x00" not in name and not os.path.isabs(name)
            and ".." not in Path(name).parts)


def other_files(src: Path) -> list[Path]:
    """Files of SRC that are copied as they are: tokenizer, generation config, templates, code."""
    found = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        rel_dir = Path(dirpath).relative_to(src)
        top = rel_dir == Path(".")
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (top and d in SKIP_DIRS))
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith(SKIP_SUFFIXES) or name.endswith(".index.json"):
                continue
            if top and name in REWRITTEN:
                continue
            found.append(rel_dir / name)
    return found


def create_fresh(path: Path, flags: int = os.O_WRONLY, mode: int = 0o644) -> int:
    """A descriptor of a new, empty regular file at ``path``, never of what was there: whatever had
    that name (a stale temporary file, or a symbolic link planted in DST) is unlinked, not followed,
    and the file is created with ``O_EXCL | O_NOFOLLOW``."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` through a fresh ``.partial`` file and a rename: readers never see half a file,
    and a symbolic link at either name is replaced, never written through."""
    tmp = path.with_name(path.name + ".partial")
    fd = create_fresh(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file by itself
            e.filename = str(tmp)
        raise


def write_json(path: Path, obj: dict, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`write_bytes_atomic`)."""
    write_bytes_atomic(Path(path), (json.dumps(obj, indent=indent) + "\n").encode())
