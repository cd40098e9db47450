"""Verify, ``DST/shardconv-report.json`` (uncalibrated.py): the expert modules it says were given
made-up amax must be quantized modules of DST. Their bytes are checked like every other module's:
``verify --source SRC --amax FILE`` makes the same amax again (planning runs the same rule) and
recomputes them bit for bit. Its FP8 KV-cache lists, where present, must say what DST holds: the
attention modules with both ``k_scale`` and ``v_scale``, and those without."""

from __future__ import annotations

from pathlib import Path

from ..files import REPORT_NAME
from .kv_layers import kv_scales
from .report import QModule, Report, load_json

_KV_KEYS = ("kv_cache_scales_for", "kv_cache_scales_missing")


def _check_kv_lists(path: Path, doc: dict, tensors: dict, report: Report) -> None:
    """The report's KV-cache lists against the k/v scales DST holds (a hand-edited or stale report
    would tell people and tools a story DST does not bear out)."""
    if not any(k in doc for k in _KV_KEYS):
        return
    lists = [doc.get(k) for k in _KV_KEYS]
    if not all(isinstance(v, list) and all(isinstance(m, str) for m in v) for v in lists):
        report.fail(f"{path}: {' and '.join(_KV_KEYS)} must both be lists of module names")
        return
    scaled = kv_scales(tensors)
    full = {m for m, kinds in scaled.items() if kinds == {"k_scale", "v_scale"}}
    said, missing = set(lists[0]), set(lists[1])
    if said != full:
        odd = sorted(said ^ full)[0]
        report.fail(f"{path}: kv_cache_scales_for does not match DST's k/v scales ({len(said ^ full)} modules "
                    f"differ, first {odd}: {'listed without' if odd in said else 'has them, not listed'})")
    both = sorted(missing & scaled.keys())
    if both:
        report.fail(f"{path}: kv_cache_scales_missing lists {both[0]}, which has KV-cache scales in DST")


def check_report_file(dst: Path, mods: dict[str, QModule], report: Report, tensors: dict) -> None:
    path = dst / REPORT_NAME
    doc = load_json(path, report)
    if doc is None:
        return
    entries = doc.get("synthesized_amax") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("module"), str)
                                                for e in entries):
        report.fail(f"{path}: not a shardconv report (needs a 'synthesized_amax' list of {{'module': ...}})")
        return
    _check_kv_lists(path, doc, tensors, report)
    names = [e["module"] for e in entries]
    missing = [n for n in names if n not in mods]
    if missing:
        report.fail(f"{path}: lists {missing[0]} as given synthesized amax, but DST has no quantized module "
                    f"of that name ({len(missing)} such)")
    if names:
        report.info.append(f"synthesized {len(names)} uncalibrated expert modules' amax was made by shardconv "
                           f"(listed in {REPORT_NAME}; recomputed with --source and --amax)")
