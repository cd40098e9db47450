"""Verify, files: config.json's neighbours, the index and every shard's header; read_header also
requires each shard's data section to be exactly covered by its tensors (the safetensors library
refuses a shard with trailing bytes or a gap between tensors: "incomplete metadata, file not fully
covered")."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ShardconvError
from ..files import INDEX_NAME, indexed_shard_names, stays_inside, unindexed_shards
from ..safetensors_io import TensorInfo, read_header
from .report import Report, load_json


def read_files(dst: Path, report: Report) -> tuple[dict[str, TensorInfo], list[Path]]:
    """Every tensor of DST by name (from the headers), and the shards read."""
    index_path = dst / INDEX_NAME
    weight_map: dict[str, str] | None = None
    index: dict = {}
    if index_path.exists():
        index = load_json(index_path, report)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            report.fail(f"{index_path}: not a valid index (needs a 'weight_map' object of shard names)")
            return {}, []
        weight_map = wm
        names = indexed_shard_names(wm.values())
        shards = []
        for name in names:
            if not stays_inside(name):
                report.fail(f"{index_path}: shard name {name!r} points outside DST")
            elif not (dst / name).is_file():
                n = sum(1 for s in wm.values() if os.path.normpath(s) == name)
                report.fail(f"{index_path}: shard {name} ({n} tensors) does not exist")
            else:
                shards.append(dst / name)
    else:
        shards = unindexed_shards(dst)
        if len(shards) > 1:
            report.fail(f"{dst}: {len(shards)} shards but no {INDEX_NAME} (loaders cannot find the tensors)")
    if not shards and weight_map is None:
        report.fail(f"{dst}: no .safetensors files")
    tensors: dict[str, TensorInfo] = {}
    readable = set()
    for shard in shards:
        try:
            infos, _ = read_header(shard)
        except ShardconvError as e:
            report.fail(str(e))  # its index entries are not reported again, one by one
            continue
        readable.add(str(shard.relative_to(dst)))
        for name, info in infos.items():
            if name in tensors:
                report.fail(f"{shard}: tensor {name!r} is also in {tensors[name].path.name}")
                continue
            tensors[name] = info
            if weight_map is not None:
                listed = weight_map.get(name)
                if listed is None:
                    report.fail(f"{shard}: tensor {name!r} is not in {INDEX_NAME} (loaders will not see it)")
                elif listed != shard.name and os.path.normpath(listed) != str(shard.relative_to(dst)):
                    report.fail(f"{index_path}: tensor {name!r} is listed in {listed} but stored in {shard.name}")
    if weight_map is not None:
        for name, shard_name in weight_map.items():
            if name not in tensors and os.path.normpath(shard_name) in readable:
                report.fail(f"{index_path}: tensor {name!r} is listed in {shard_name} but not stored there")
        total = index.get("metadata", {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
        actual = sum(t.nbytes for t in tensors.values())
        if isinstance(total, int) and total != actual and not report.problems:
            report.warnings.append(f"{index_path}: metadata.total_size {total} but the tensors hold {actual} bytes")
    leftovers = sorted(p.name for p in dst.glob("*.partial"))
    if leftovers:
        report.warnings.append(f"{dst}: unfinished files left over: {', '.join(leftovers[:5])}")
    return tensors, shards
