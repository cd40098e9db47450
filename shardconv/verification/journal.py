"""Verify, journal: ``DST/.shardconv-journal.json`` (``{"shards": {name: digest}}``) holds the digest of
every shard shardconv finished; a shard that changed since fails. Without a journal, the verdict says
that no shard digest was checked."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..digest import DESCRIPTION as DIGEST_SCHEME
from ..digest import shard_digest
from ..files import stays_inside
from ..journal import NAME as JOURNAL_NAME
from .report import Report, load_json


def check_journal(dst: Path, shards: list[Path], report: Report, workers: int = 4) -> dict | None:
    """Check the recorded digests; returns the journal (a dict) when there is a readable one."""
    path = dst / JOURNAL_NAME
    if not path.exists():
        report.info.append(f"journal     none ({JOURNAL_NAME}): shard digests not checked")
        return None
    journal = load_json(path, report)
    if journal is None:
        return None
    recorded = journal.get("shards") if isinstance(journal, dict) else None
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        report.fail(f"{path}: no 'shards' object of digest strings")
        return None
    scheme = journal.get("digest")
    if scheme != DIGEST_SCHEME:
        report.warnings.append(f"{path}: digests of another scheme ({scheme!r}, not {DIGEST_SCHEME!r}): not checked")
        return journal
    todo = []
    for name, digest in sorted(recorded.items()):
        if not stays_inside(name):
            report.fail(f"{path}: shard name {name!r} points outside DST")
        elif not (dst / name).is_file():
            report.fail(f"{path}: shard {name} is recorded but does not exist")
        else:
            todo.append((name, digest.lower()))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        digests = list(pool.map(lambda item: shard_digest(dst / item[0], threads=1), todo))
    for (name, want), got in zip(todo, digests):
        if got != want:
            report.fail(f"{dst / name}: digest {got[:16]}... does not match the journal's {want[:16]}... "
                        "(the shard changed after it was written)")
    unrecorded = sorted(p.name for p in shards if p.name not in recorded)
    if unrecorded:
        report.warnings.append(f"{path}: shards not recorded (not hash-checked): {', '.join(unrecorded[:5])}")
    report.info.append(f"journal     {len(todo)} shard hashes checked")
    return journal
