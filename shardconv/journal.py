"""The run journal in DST: what plan is being written and which shards are finished.

A conversion of hundreds of GB will be interrupted. The journal (``DST/.shardconv-journal.json``,
replaced atomically) holds a fingerprint of the run (the source's config and shard names, the amax
file's content, the planned output layout and options, the shardconv version), the identity of every
source shard when the run started (identity.py: header and sampled content digests, inode, ctime)
and the digest of every finished shard (digest.py: a SHA-256 over the SHA-256s of its 64 MiB
pieces). A new run with the same fingerprint keeps the finished shards made only from source shards
whose identity is unchanged and writes the rest; a different fingerprint is refused unless
``--overwrite``. No mtime is trusted: ``cp -p`` and ``rsync -a`` keep it. Shards appear under their
final names only once complete (``.partial`` before), and the index is written last, so an unfinished DST never looks like a
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
from .shard_writer import file_size

NAME = ".shardconv-journal.json"


def fingerprint(plan, extra: dict | None = None) -> str:
    """A digest of everything that decides the output bytes."""
    from . import numerics

    src = plan.source
    # the shards' content is compared file by file (identity.py), so that a changed one costs only
    # the output shards made from it; the config, as parsed for the plan (not the file as it is now)
    files = [str(p.relative_to(src.root)) if p.is_relative_to(src.root) else str(p) for p in src.shards]
    config = hashlib.sha256(json.dumps(src.config, sort_keys=True).encode()).hexdigest()
    shards = [[name, [[t.name, t.dtype, list(t.shape)] for t in ts]] for name, ts in zip(plan.shard_names, plan.shard_tensors)]
    doc = {
        "shardconv": __version__,
        "files": files,
        "config": config,
        "shards": shards,
        "scales": plan.scales,
        "format": plan.format_name,
        "export_rounding": numerics.EXPORT_ROUNDING,
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class Journal:
    """Reads and updates DST's journal; safe to call from writer threads."""

    def __init__(self, dst: Path, fingerprint: str, synced: bool = False, sources: list[dict] | None = None,
                 extra: dict | None = None, method: dict | None = None):
        self.path = Path(dst) / NAME
        self.fingerprint = fingerprint
        # how the scales were made ({"scales": ..., "export_rounding": ...}): verify --source recomputes with it
        self.method = method or {}
        self.extra = extra or {}  # the fingerprint's inputs besides the plan (the amax file's digest), to say what differs
        self.sources = sources or []  # identity.FileIdentity of each source shard, as this run found them
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

    def adopt(self, old: dict, plan, dst: Path, stale: set[int] = frozenset()) -> set[int]:
        """Shards of ``old`` (same fingerprint) still present with their planned size: kept, except
        ``stale`` ones (made from a source shard that changed since: identity.py).

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
            if i not in stale and name in recorded and path.is_file() and path.stat().st_size == file_size(tensors) and (
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
        doc = {"shardconv": __version__, "fingerprint": self.fingerprint, "complete": self.complete, **self.method,
               "digest": shard_digests.DESCRIPTION, "synced": self.synced,
               "extra": self.extra, "sources": self.sources, "shards": dict(sorted(self.shards.items()))}
        write_json(self.path, doc, indent=1)


# -- ranks of a distributed run (distributed.py) ----------------------------------------------------
# Rank 0 alone writes the journal above. Every other rank records the shards it finishes in its own
# file beside it, so that a rank killed mid-run keeps its finished shards for the resume; rank 0 folds
# them into the journal once every rank is done, and any run (of any world size) folds what a failed
# run left before it decides what to keep.
RANK_PREFIX = ".shardconv-journal.rank-"


def rank_name(rank: int) -> str:
    return f"{RANK_PREFIX}{rank}.json"


def rank_journals(dst: Path) -> list[Path]:
    """The rank journals in DST (regular files only: a planted link is never read)."""
    out = []
    for p in sorted(Path(dst).glob(f"{RANK_PREFIX}*.json")):
        try:
            if stat.S_ISREG(os.lstat(p).st_mode):
                out.append(p)
        except OSError:
            pass
    return out


def fold_ranks(dst: Path, old: dict | None) -> dict | None:
    """``old`` (DST's journal) with the finished shards of every rank journal of the same run added.

    A rank journal of another fingerprint or digest scheme adds nothing; a shard recorded without
    fsync makes the whole fold untrusted, so :meth:`Journal.adopt` re-hashes it."""
    if old is None:
        return None
    old = dict(old, shards=dict(old.get("shards") or {}))
    for path in rank_journals(dst):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (not isinstance(data, dict) or data.get("fingerprint") != old.get("fingerprint")
                or data.get("digest") != old.get("digest") or not isinstance(data.get("shards"), dict)):
            continue
        if data["shards"]:
            old["shards"].update(data["shards"])
            old["synced"] = bool(old.get("synced")) and bool(data.get("synced"))
    return old
