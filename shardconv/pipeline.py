"""The streaming conversion: one unit (fusion group or passthrough tensor) at a time, in plan order.

Host memory holds one fusion group's weights and their quantized form; passthrough tensors go file
to file. Output shards are written under ``.partial`` names and renamed when complete; the config
files and, last, the index are written only after every shard is in place, so a DST without
``model.safetensors.index.json`` is never a finished checkpoint. A failed run removes what it wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ShardconvError
from .plan import Plan
from .quantize import quantize_group
from .safetensors_io import ShardWriter, read_into
from .source import INDEX_NAME

SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".partial")
REWRITTEN = {"config.json", "hf_quant_config.json", INDEX_NAME}
SKIP_DIRS = {"original"}  # Meta's consolidated weights in Llama repos


@dataclass
class Summary:
    quantized: int
    kept: int
    in_bytes: int
    out_bytes: int
    seconds: float
    shards: int
    device: str

    def lines(self) -> list[str]:
        gbps = self.in_bytes / max(self.seconds, 1e-9) / 1e9
        ratio = self.in_bytes / max(self.out_bytes, 1)
        return [
            f"tensors quantized  {self.quantized}",
            f"tensors kept       {self.kept}",
            f"bytes in           {self.in_bytes / 1e9:.3f} GB",
            f"bytes out          {self.out_bytes / 1e9:.3f} GB  ({self.shards} shards)",
            f"compression        {ratio:.2f}x",
            f"time               {self.seconds:.1f} s  ({gbps:.2f} GB/s of input, {self.device})",
        ]


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """DST must not be SRC or inside it, and must be empty unless ``overwrite``."""
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r or src_r in dst_r.parents:
        raise ShardconvError(f"{dst}: DST is inside SRC {src}; SRC is only ever read")
    if dst_r in src_r.parents:
        raise ShardconvError(f"{dst}: DST contains SRC {src}; choose an empty folder")
    if dst.exists() and not dst.is_dir():
        raise ShardconvError(f"{dst}: exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ShardconvError(f"{dst}: not empty (use --overwrite to replace a previous output)")


def other_files(src: Path) -> list[Path]:
    """Files of SRC that are copied as they are: tokenizer, generation config, templates, code."""
    found = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        rel_dir = Path(dirpath).relative_to(src)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (rel_dir == Path(".") and d in SKIP_DIRS))
        for name in sorted(filenames):
            rel = rel_dir / name
            if name.startswith(".") or name.endswith(SKIP_SUFFIXES) or name.endswith(".index.json"):
                continue
            if rel_dir == Path(".") and name in REWRITTEN:
                continue
            found.append(rel)
    return found


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def convert(plan: Plan, dst: Path, *, device: torch.device, fmt, overwrite: bool = False, progress: bool = True) -> Summary:
    """Write the planned checkpoint into ``dst``."""
    from tqdm.auto import tqdm

    src = plan.source.root
    dst = Path(dst)
    check_destination(src, dst, overwrite)
    created_dir = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for old in list(dst.glob("*.safetensors")) + list(dst.glob("*.partial")) + [dst / INDEX_NAME]:
            old.unlink(missing_ok=True)
    written: list[Path] = []
    writer: ShardWriter | None = None
    start = time.perf_counter()
    bar = tqdm(total=plan.in_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
               disable=not progress, dynamic_ncols=True)
    try:
        last_unit_of_shard = {u.shard: i for i, u in enumerate(plan.units)}
        for i, unit in enumerate(plan.units):
            if writer is None:
                path = dst / plan.shard_names[unit.shard]
                writer = ShardWriter(path, plan.shard_tensors[unit.shard], {"format": "pt"})
            if unit.copy is not None:
                writer.copy_from(unit.copy.name, unit.copy)
            if unit.members:
                weights = [read_into(m.weight) for m in unit.members]
                results = quantize_group(unit.members, weights, plan.scales, device)
                del weights
                for m, q in zip(unit.members, results):
                    for name, tensor in fmt.quantized_tensors(m.module, q).items():
                        writer.write(name, tensor)
            for name, tensor in unit.extra.items():
                writer.write(name, tensor)
            bar.update(unit.in_bytes)
            if last_unit_of_shard[unit.shard] == i:
                writer.finish()
                written.append(writer.path)
                writer = None
        for rel in other_files(src):
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, target)
            written.append(target)
        for name, content in fmt.config_files(plan, plan.source.config).items():
            _write_json(dst / name, content)
            written.append(dst / name)
        weight_map = {t.name: plan.shard_names[s] for s, ts in enumerate(plan.shard_tensors) for t in ts}
        index = {"metadata": {"total_size": plan.out_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(dst / INDEX_NAME, index)  # last: its presence marks a finished checkpoint
    except BaseException:
        if writer is not None:
            writer.abort()
        for path in written:
            path.unlink(missing_ok=True)
        if created_dir:
            shutil.rmtree(dst, ignore_errors=True)
        raise
    finally:
        bar.close()
    return Summary(
        quantized=len(plan.quantized),
        kept=sum(1 for u in plan.units if u.copy is not None),
        in_bytes=plan.in_bytes,
        out_bytes=plan.out_bytes,
        seconds=time.perf_counter() - start,
        shards=len(plan.shard_names),
        device=str(device),
    )
