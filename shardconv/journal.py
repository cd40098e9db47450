"""The run journal in DST: what plan is being written and which shards are finished.

A conversion of hundreds of GB will be interrupted. The journal (``DST/.shardconv-journal.json``,
replaced atomically) holds a fingerprint of the run (source file sizes and mtimes, the amax file,
the planned output layout and options, the shardconv version) and the digest of every finished
shard (digest.py: a SHA-256 over the SHA-256s of its 64 MiB pieces). A new run
with the same fingerprint keeps the finished shards and writes only the rest; a different fingerprint
is refused unless ``--overwrite``. Shards appear under their final names only once complete
(``.partial`` before), and the index is written last, so an unfinished DST never looks like a
checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path

from . import __version__
from . import digest as shard_digests
from .files import write_json
from .safetensors_io import file_size

NAME = ".shardconv-journal.json"


def fingerprint(plan, extra: dict | None = None) -> str:
    """A digest of everything that decides the output bytes."""
    from . import numerics

    src = plan.source
    files = []
    for p in [src.root / "config.json", *src.shards]:
        st = p.stat()
        files.append([str(p.relative_to(src.root)) if p.is_relative_to(src.root) else str(p), st.st_size, st.st_mtime_ns])
    shards = [[name, [[t.name, t.dtype, list(t.shape)] for t in ts]] for name, ts in zip(plan.shard_names, plan.shard_tensors)]
    doc = {
        "shardconv": __version__,
        "files": files,
        "shards": shards,
        "scales": plan.scales,
        "format": plan.format_name,
        "export_rounding": numerics.EXPORT_ROUNDING,
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class Journal:
    """Reads and updates DST's journal; safe to call from writer threads."""

    def __init__(self, dst: Path, fingerprint: str, synced: bool = False):
        self.path = Path(dst) / NAME
        self.fingerprint = fingerprint
        self.synced = synced  # shards were fsync'ed before being recorded
        self.shards: dict[str, str] = {}
        self.complete = False
        self.lock = threading.Lock()

    @staticmethod
    def read(dst: Path) -> dict | None:
        try:
            if not stat.S_ISREG(os.lstat(Path(dst) / NAME).st_mode):  # a link or a FIFO is no journal (never opened)
                return None
            data = json.loads((Path(dst) / NAME).read_text())
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def adopt(self, old: dict, plan, dst: Path) -> set[int]:
        """Shards of ``old`` (same fingerprint) still present with their planned size: kept.

        Shards that were not fsync'ed when recorded are also re-hashed: a kill never loses written
        data (it is in the page cache), but a power loss can leave a renamed shard incomplete. A
        journal whose digests follow another scheme keeps nothing: every shard is written again.
        """
        kept = set()
        # digests of another scheme (an older shardconv hashed whole files) cannot vouch for a shard
        recorded = (old.get("shards") or {}) if old.get("digest") == shard_digests.DESCRIPTION else {}
        trust = bool(old.get("synced"))
        for i, (name, tensors) in enumerate(zip(plan.shard_names, plan.shard_tensors)):
            path = Path(dst) / name
            if name in recorded and path.is_file() and path.stat().st_size == file_size(tensors) and (
                    trust or shard_digests.shard_digest(path) == recorded[name]):
                kept.add(i)
                self.shards[name] = recorded[name]
                if self.synced and not trust:  # this run promises flushed shards: these too
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        self.save()
        return kept

    def record(self, name: str, digest: str) -> None:
        with self.lock:
            self.shards[name] = digest
            self.save()

    def finish(self) -> None:
        with self.lock:
            self.complete = True
            self.save()

    def save(self) -> None:
        doc = {"shardconv": __version__, "fingerprint": self.fingerprint, "complete": self.complete,
               "digest": shard_digests.DESCRIPTION, "synced": self.synced, "shards": dict(sorted(self.shards.items()))}
        write_json(self.path, doc, indent=1)
