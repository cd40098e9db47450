"""Verify, ``DST/shardconv-report.json`` (uncalibrated.py): the expert modules it says were given
made-up amax must be quantized modules of DST. Their bytes are checked like every other module's:
``verify --source SRC --amax FILE`` makes the same amax again (planning runs the same rule) and
recomputes them bit for bit."""

from __future__ import annotations

from pathlib import Path

from ..files import REPORT_NAME
from .report import QModule, Report, load_json


def check_synthesized(dst: Path, mods: dict[str, QModule], report: Report) -> None:
    path = dst / REPORT_NAME
    doc = load_json(path, report)
    if doc is None:
        return
    entries = doc.get("synthesized_amax") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("module"), str)
                                                for e in entries):
        report.fail(f"{path}: not a shardconv report (needs a 'synthesized_amax' list of {{'module': ...}})")
        return
    names = [e["module"] for e in entries]
    missing = [n for n in names if n not in mods]
    if missing:
        report.fail(f"{path}: lists {missing[0]} as given synthesized amax, but DST has no quantized module "
                    f"of that name ({len(missing)} such)")
    if names:
        report.info.append(f"synthesized {len(names)} uncalibrated expert modules' amax was made by shardconv "
                           f"(listed in {REPORT_NAME}; recomputed with --source and --amax)")
