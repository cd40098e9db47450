"""``shardconv verify DST [--source SRC]``: check a finished NVFP4 checkpoint without a GPU and without
loading it whole.

Accepts both on-disk conventions (FORMAT.md §5, §6): ModelOpt's unified HF checkpoint (``weight``,
``weight_scale``, ``weight_scale_2``, ``input_scale``; also ModelOpt's own exports: one
``model.safetensors`` and no index) and compressed-tensors ``nvfp4-pack-quantized`` as written by
llm-compressor (``weight_packed``, ``weight_scale``, ``weight_global_scale = 1 / weight_scale_2``,
``input_global_scale``).

Checks, in order (every problem is collected, then reported one line each):

1. files: config.json with a quantization_config, the index (or a single shard), every index entry
   present in the shard it names, no tensor in two shards, valid headers (safetensors_io);
2. the journal ``DST/.shardconv-journal.json`` (``{"shards": {name: digest}}``), when present: every
   shard's digest (digest.py);
3. quantized modules: dtypes and shapes of weight / block scales / global scales agree; global scales
   finite and positive; block scales finite and non-negative (read one tensor at a time); fusion
   groups (plan.FUSION_SETS) quantized whole, with bit-identical ``weight_scale_2`` and ``input_scale``;
   ``quant_algo`` (W4A4 or W4A16) and the FP8 KV-cache declaration match the tensors;
4. exclusions: in config.json ``quantization_config.ignore`` and hf_quant_config.json
   ``exclude_modules`` alike, every non-quantized Linear weight is listed and no quantized module is;
5. with a source checkpoint: every source tensor is in DST, kept tensors are byte-identical, and each
   quantized weight's relative reconstruction error ``||W - deq(Q)|| / ||W||`` is reported (worst
   first) and must stay under ``max_error``.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import numerics
from .errors import ShardconvError
from .plan import _EMBEDDING, _STACKED, FUSION_SETS, fusion_key
from .digest import DESCRIPTION as DIGEST_SCHEME
from .digest import shard_digest
from .files import INDEX_NAME, indexed_shard_names, stays_inside, unindexed_shards
from .journal import NAME as JOURNAL_NAME
from .safetensors_io import TensorInfo, read_header, read_into

DEFAULT_MAX_ERROR = 0.5
MAX_REPORTED = 50  # problem lines printed; the count covers all of them
_COMPARE_PIECE = 16 << 20  # bytes compared at a time by _same_bytes
_NVFP4_ALGOS = {"NVFP4", "W4A16_NVFP4"}


@dataclass
class QModule:
    """One quantized Linear (or stacked expert tensor) found in DST, in either convention."""

    module: str  # module name; stacked experts: the tensor name (``...experts.gate_up_proj``)
    packed: TensorInfo
    scale: TensorInfo | None
    scale_2: TensorInfo | None  # ModelOpt weight_scale_2, or compressed-tensors weight_global_scale
    input_scale: TensorInfo | None
    stacked: bool = False

    @property
    def owner(self) -> str:
        """The name exclusion lists use: the experts module for a stacked tensor."""
        return self.module.rpartition(".")[0] if self.stacked else self.module


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    errors: list[tuple[str, tuple[int, ...], float]] = field(default_factory=list)  # (module, shape, rel error)

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, message: str) -> None:
        self.problems.append(" ".join(str(message).split()))


def _load_json(path: Path, report: Report) -> object | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        report.fail(f"{path}: not valid JSON ({type(e).__name__}: {e})")
        return None


# -- 1. files --------------------------------------------------------------------------------------


def _read_files(dst: Path, report: Report) -> tuple[dict[str, TensorInfo], list[Path]]:
    index_path = dst / INDEX_NAME
    weight_map: dict[str, str] | None = None
    if index_path.exists():
        index = _load_json(index_path, report)
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
    for shard in shards:
        try:
            infos, _ = read_header(shard)
        except ShardconvError as e:
            report.fail(str(e))
            continue
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
        readable = {str(s.relative_to(dst)) for s in shards}
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


# -- 2. journal ------------------------------------------------------------------------------------


def _check_journal(dst: Path, shards: list[Path], report: Report, workers: int = 4) -> None:
    path = dst / JOURNAL_NAME
    if not path.exists():
        return
    journal = _load_json(path, report)
    if journal is None:
        return
    recorded = journal.get("shards") if isinstance(journal, dict) else None
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        report.fail(f"{path}: no 'shards' object of digest strings")
        return
    scheme = journal.get("digest")
    if scheme != DIGEST_SCHEME:
        report.warnings.append(f"{path}: digests of another scheme ({scheme!r}, not {DIGEST_SCHEME!r}): not checked")
        return
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


# -- 3. quantized modules --------------------------------------------------------------------------


def _convention(config: dict | None, hf_quant: object, tensors: dict[str, TensorInfo], report: Report,
                dst: Path) -> str | None:
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    has_ct = any(n.endswith(".weight_packed") for n in tensors)
    has_mo = any(n.endswith("weight_scale_2") for n in tensors)
    if has_ct and has_mo:
        report.fail(f"{dst}: mixes ModelOpt (weight_scale_2) and compressed-tensors (weight_packed) tensors")
    if method == "compressed-tensors":
        fmt = qc.get("format")
        if fmt != "nvfp4-pack-quantized":
            report.warnings.append(f"{dst / 'config.json'}: compressed-tensors format {fmt!r}, "
                                   "not 'nvfp4-pack-quantized': only its NVFP4 modules are checked")
        return "compressed-tensors"
    if method == "modelopt" or (method is None and isinstance(hf_quant, dict)):
        if method is None:
            report.warnings.append(f"{dst / 'config.json'}: no quantization_config (vLLM and SGLang read it "
                                   "first); using hf_quant_config.json")
        return "modelopt"
    if method is None:
        report.fail(f"{dst / 'config.json'}: no quantization_config (not a quantized checkpoint?)")
    else:
        report.fail(f"{dst / 'config.json'}: quant_method {method!r} is neither 'modelopt' nor 'compressed-tensors'")
    return "compressed-tensors" if has_ct else "modelopt" if has_mo else None


def _find_modules(tensors: dict[str, TensorInfo], convention: str, report: Report) -> dict[str, QModule]:
    mods: dict[str, QModule] = {}
    if convention == "compressed-tensors":
        for name, info in tensors.items():
            if name.endswith(".weight_packed"):
                m = name[: -len(".weight_packed")]
                mods[m] = QModule(m, info, tensors.get(f"{m}.weight_scale"), tensors.get(f"{m}.weight_global_scale"),
                                  tensors.get(f"{m}.input_global_scale"))
        orphans = (".weight_global_scale", ".input_global_scale")
    else:
        for name, info in tensors.items():
            if name.endswith(".weight_scale_2"):
                m = name[: -len(".weight_scale_2")]
                mods[m] = QModule(m, tensors.get(f"{m}.weight"), tensors.get(f"{m}.weight_scale"), info,
                                  tensors.get(f"{m}.input_scale"))
            elif name.endswith("_weight_scale_2"):  # stacked experts: gate_up_proj_weight_scale_2
                m = name[: -len("_weight_scale_2")]
                mods[m] = QModule(m, tensors.get(m), tensors.get(f"{m}_weight_scale"), info,
                                  tensors.get(f"{m}_input_scale"), stacked=True)
        orphans = (".input_scale",)
    for name, info in tensors.items():
        for suffix in orphans:
            if name.endswith(suffix) and name[: -len(suffix)] not in mods:
                report.fail(f"{info.path}: tensor {name!r} belongs to no quantized module")
        if name.endswith(".weight_scale") and info.dtype == "F8_E4M3" and name[: -len(".weight_scale")] not in mods:
            report.fail(f"{info.path}: block scales {name!r} without the module's global scale")
    return mods


def _check_shapes(q: QModule, convention: str, report: Report) -> bool:
    scale2_name = "weight_global_scale" if convention == "compressed-tensors" else "weight_scale_2"
    missing = [what for what, t in (("packed weight", q.packed), ("weight_scale", q.scale), (scale2_name, q.scale_2))
               if t is None]
    if missing:
        report.fail(f"quantized module {q.module}: missing {', '.join(missing)}")
        return False
    w, s = q.packed, q.scale
    where = f"{w.path}: quantized module {q.module}"
    bad = None
    if w.dtype != "U8" or s.dtype != "F8_E4M3":
        bad = f"packed weight is {w.dtype}, block scales {s.dtype} (expected U8 and F8_E4M3)"
    elif q.stacked:  # [E, in/2, out] and [E, in/16, out]
        if len(w.shape) != 3 or len(s.shape) != 3 or (s.shape[0], s.shape[2]) != (w.shape[0], w.shape[2]) \
                or s.shape[1] * 8 != w.shape[1]:
            bad = f"stacked weight {list(w.shape)} and block scales {list(s.shape)} do not match ([E, in/2, out], [E, in/16, out])"
    elif len(w.shape) != 2 or len(s.shape) != 2 or s.shape[0] != w.shape[0] or s.shape[1] * 8 != w.shape[1]:
        bad = f"weight {list(w.shape)} and block scales {list(s.shape)} do not match ([out, in/2], [out, in/16])"
    for t in (q.scale_2, q.input_scale):
        if bad is None and t is not None and (t.dtype != "F32" or math.prod(t.shape) != 1):
            bad = f"{t.name} is {t.dtype}{list(t.shape)}, expected a float32 scalar"
    if bad:
        report.fail(f"{where}: {bad}")
        return False
    return True


def _scalar(info: TensorInfo) -> torch.Tensor:
    return read_into(info).reshape(()).clone()


def _weight_scale_2(q: QModule, convention: str) -> torch.Tensor:
    """ModelOpt's weight_scale_2 (a multiplier) whichever convention the file uses."""
    s = _scalar(q.scale_2)
    return (torch.ones((), dtype=torch.float32) / s) if convention == "compressed-tensors" else s


def _check_module_values(q: QModule, report: Report) -> None:
    for t in (q.scale_2, q.input_scale):
        if t is None:
            continue
        v = _scalar(t).item()
        if not (math.isfinite(v) and v > 0):
            report.fail(f"{t.path}: tensor {t.name!r} is {v} (global scales must be finite and positive)")
    codes = read_into(q.scale).view(torch.uint8)
    nan = (codes & 0x7F) == 0x7F
    neg = (codes > 0x80) & ~nan
    for what, mask in (("NaN", nan), ("negative", neg)):
        n = int(mask.sum())
        if n:
            first = [int(i) for i in mask.nonzero()[0]]
            report.fail(f"{q.scale.path}: tensor {q.scale.name!r} has {n} {what} block scales (first at {first})")


def _check_groups(mods: dict[str, QModule], tensors: dict[str, TensorInfo], report: Report,
                  found: dict[str, QModule] | None = None) -> int:
    """``mods``: the well-formed modules (their scales are compared); ``found``: every quantized module,
    malformed ones included (those are reported already, not as unquantized)."""
    found = mods if found is None else found
    groups: dict[str, list[QModule]] = {}
    for q in mods.values():
        key = fusion_key(q.module)
        if key:
            groups.setdefault(key, []).append(q)
    n = 0
    for key, members in sorted(groups.items()):
        parent = key.partition("{")[0]
        leaves = next(s for s in FUSION_SETS if key.endswith("{" + ",".join(s) + "}"))
        for leaf in leaves:
            other = f"{parent}{leaf}"
            if other not in found and f"{other}.weight" in tensors:
                report.fail(f"fusion group {key}: {members[0].module} is quantized but {other} is not "
                            "(engines fuse them into one GEMM)")
        if len(members) < 2:
            continue
        n += 1
        for what in ("scale_2", "input_scale"):
            infos = [getattr(q, what) for q in members]
            present = [t for t in infos if t is not None]
            if not present:
                continue
            if len(present) != len(infos):
                report.fail(f"fusion group {key}: only some members have {present[0].name.rpartition('.')[2]}")
                continue
            raw = [bytes(read_into(t).reshape(-1).view(torch.uint8).tolist()) for t in present]
            if len(set(raw)) > 1:
                vals = ", ".join(f"{t.name.rpartition('.')[0].rpartition('.')[2]}={_scalar(t).item()!r}" for t in present)
                report.fail(f"fusion group {key}: {present[0].name.rpartition('.')[2]} differs between members "
                            f"({vals}); engines need one shared value")
    return n


def _check_algo(config: dict, hf_quant: object, convention: str, mods: dict[str, QModule],
                tensors: dict[str, TensorInfo], report: Report, dst: Path) -> None:
    qc = config.get("quantization_config") if isinstance(config.get("quantization_config"), dict) else {}
    with_input = sum(1 for q in mods.values() if q.input_scale is not None)
    if convention == "modelopt":
        hq = hf_quant.get("quantization") if isinstance(hf_quant, dict) else None
        algos = {}
        if qc:
            algos["config.json"] = qc.get("quant_algo")
        if isinstance(hq, dict):
            algos["hf_quant_config.json"] = hq.get("quant_algo")
        elif hf_quant is not None:
            report.fail(f"{dst / 'hf_quant_config.json'}: no 'quantization' object")
        for fname, algo in algos.items():
            if algo not in _NVFP4_ALGOS:
                report.fail(f"{dst / fname}: quant_algo {algo!r} is not NVFP4 or W4A16_NVFP4")
            elif mods and algo == "NVFP4" and with_input != len(mods):
                report.fail(f"{dst / fname}: quant_algo NVFP4 (W4A4) but {len(mods) - with_input} of {len(mods)} "
                            "quantized modules have no input_scale")
            elif algo == "W4A16_NVFP4" and with_input:
                report.fail(f"{dst / fname}: quant_algo W4A16_NVFP4 but {with_input} modules carry input_scale")
        kv_names = [n for n in tensors if n.endswith((".k_scale", ".v_scale"))]
        declared = {}
        if qc:
            declared["config.json"] = qc.get("kv_cache_scheme") is not None
        if isinstance(hq, dict):
            declared["hf_quant_config.json"] = hq.get("kv_cache_quant_algo") is not None
        for fname, yes in declared.items():
            if yes and not kv_names:
                report.fail(f"{dst / fname}: declares an FP8 KV cache but DST has no k_scale / v_scale tensors")
            elif kv_names and not yes:
                report.warnings.append(f"{dst / fname}: k_scale / v_scale tensors present but no FP8 KV cache declared")
        for n in kv_names:
            t = tensors[n]
            v = _scalar(t).item() if t.dtype == "F32" and math.prod(t.shape) == 1 else float("nan")
            if not (math.isfinite(v) and v > 0):
                report.fail(f"{t.path}: tensor {n!r} is not a finite positive float32 scalar")
    else:
        groups = qc.get("config_groups") if isinstance(qc.get("config_groups"), dict) else {}
        w4a4 = any(isinstance(g, dict) and g.get("input_activations") for g in groups.values())
        if mods and w4a4 and with_input != len(mods):
            report.fail(f"{dst / 'config.json'}: input_activations are quantized but {len(mods) - with_input} of "
                        f"{len(mods)} quantized modules have no input_global_scale")
        elif not w4a4 and with_input:
            report.fail(f"{dst / 'config.json'}: no input_activations in config_groups but {with_input} modules "
                        "carry input_global_scale")


# -- 4. exclusions ---------------------------------------------------------------------------------


def _exclusion_lists(config: dict, hf_quant: object, convention: str, dst: Path, report: Report) -> dict[str, list]:
    lists: dict[str, list] = {}
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        ignore = qc.get("ignore", [])
        lists[f"{dst / 'config.json'} quantization_config.ignore"] = ignore
    if convention == "modelopt" and isinstance(hf_quant, dict) and isinstance(hf_quant.get("quantization"), dict):
        lists[f"{dst / 'hf_quant_config.json'} exclude_modules"] = hf_quant["quantization"].get("exclude_modules", [])
    for where, entries in list(lists.items()):
        if entries is None:
            lists[where] = []
        elif not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            report.fail(f"{where}: not a list of module names")
            lists[where] = []
    return lists


def _matcher(entry: str):
    """A predicate over module names: ``re:`` regex (re.match, as compressed-tensors), glob, or exact."""
    if entry.startswith("re:"):
        rx = re.compile(entry[3:])
        return lambda m: rx.match(m) is not None
    if any(c in entry for c in "*?["):
        return lambda m: fnmatch.fnmatchcase(m, entry)
    return lambda m: m == entry


def _check_exclusions(lists: dict[str, list], convention: str, mods: dict[str, QModule],
                      tensors: dict[str, TensorInfo], report: Report) -> int:
    quantized = {q.owner for q in mods.values()} | set(mods)
    kept: set[str] = set()
    for name, info in tensors.items():
        if name.endswith(".weight") and len(info.shape) == 2 and name[: -len(".weight")] not in mods:
            module = name[: -len(".weight")]
            if not _EMBEDDING.search(module):  # embeddings are not Linear (llm-compressor does not list them)
                kept.add(module)
        elif len(info.shape) == 3 and _STACKED.search(name) and name not in mods and info.dtype in ("BF16", "F16", "F32"):
            kept.add(name.rpartition(".")[0])
    for where, entries in lists.items():
        matchers = []
        for e in entries:
            try:
                matchers.append((e, _matcher(e)))
            except re.error as err:
                report.fail(f"{where}: entry {e!r} is not a valid regex ({err})")
        unlisted = sorted(m for m in kept if not any(f(m) for _, f in matchers))
        if unlisted:
            report.fail(f"{where}: {len(unlisted)} modules kept in source precision are not listed "
                        f"(engines would load them as NVFP4), e.g. {', '.join(unlisted[:3])}")
        hit = []
        for m in sorted(quantized):
            for e, f in matchers:
                # vLLM matches ModelOpt exclusions by substring too (FORMAT.md §4)
                sub = convention == "modelopt" and not e.startswith("re:") and "*" not in e and e in m
                if f(m) or sub:
                    hit.append(f"{m} (by {e!r})")
                    break
        if hit:
            report.fail(f"{where}: {len(hit)} quantized modules are listed as excluded "
                        f"(engines would load them unquantized), e.g. {', '.join(hit[:3])}")
    return len(kept)


# -- 5. against the source -------------------------------------------------------------------------


def _same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    if a.nbytes != b.nbytes:
        return False
    with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
        done = 0
        while done < a.nbytes:
            n = min(_COMPARE_PIECE, a.nbytes - done)
            if os.pread(fa.fileno(), n, a.offset + done) != os.pread(fb.fileno(), n, b.offset + done):
                return False
            done += n
    return True


def _rel_error(source_w: torch.Tensor, q: QModule, s2: torch.Tensor) -> float:
    """``||W - deq|| / ||W||`` in float64 sums, a row chunk (or one expert) at a time."""
    packed, scale = read_into(q.packed), read_into(q.scale)
    if q.stacked:  # [E, in/2, out] -> per expert [out, in/2]
        pieces = ((source_w[e].T, packed[e].T, scale[e].T) for e in range(packed.shape[0]))
    else:
        step = max(1, (1 << 22) // max(1, source_w.shape[-1]))
        pieces = ((source_w[i:i + step], packed[i:i + step], scale[i:i + step]) for i in range(0, packed.shape[0], step))
    err = ref = 0.0
    for w, p, s in pieces:
        w = w.float()
        d = numerics.dequantize(p.contiguous(), s.contiguous(), s2)
        err += float((w - d).double().square().sum())
        ref += float(w.double().square().sum())
    if ref == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return math.sqrt(err / ref)


def _compare_source(src: str, mods: dict[str, QModule], convention: str, tensors: dict[str, TensorInfo],
                    report: Report, max_error: float, found: dict[str, QModule] | None = None) -> None:
    from . import fp8
    from .source import open_source

    source = open_source(src)  # a ShardconvError here is the user's (usage, exit 2)
    fp8_blocks = fp8.input_quantization(source)
    # every quantized module, malformed ones too: their packed ``.weight`` is no kept tensor
    by_weight = {(q.module if q.stacked else f"{q.module}.weight"): q for q in (found or mods).values()}
    dropped = set()
    if fp8_blocks is not None:
        for name in source.tensors:
            if name.endswith(fp8.SCALE_SUFFIX):
                dropped.update((name, name[: -len(fp8.SCALE_SUFFIX)] + ".input_scale"))
    missing, differ = [], []
    for name, info in source.tensors.items():
        if name in dropped:
            continue
        q = by_weight.get(name)
        if q is None:
            out = tensors.get(name)
            if out is None:
                missing.append(name)
            elif fp8_blocks is not None and info.dtype == "F8_E4M3" and out.dtype == fp8.DEQUANT_DTYPE_NAME:
                scale = source.tensors.get(name[: -len(".weight")] + fp8.SCALE_SUFFIX)
                want = fp8.dequantize_tensor(info, scale, fp8_blocks.block) if scale is not None else None
                if want is None or not torch.equal(want.view(torch.int16), read_into(out).view(torch.int16)):
                    differ.append(name)
            elif (out.dtype, out.shape) != (info.dtype, info.shape) or not _same_bytes(info, out):
                differ.append(name)
            continue
        if q.module not in mods or q.packed is None or q.scale is None or q.scale_2 is None:
            continue  # already reported
        in_features = q.packed.shape[-2 if q.stacked else -1] * 2
        want_shape = ((q.packed.shape[0], in_features, q.packed.shape[2]) if q.stacked
                      else (q.packed.shape[0], in_features))
        if tuple(info.shape) != want_shape:
            report.fail(f"{q.packed.path}: quantized module {q.module} holds {list(want_shape)} but the source "
                        f"weight {name} is {list(info.shape)}")
            continue
        w = read_into(info)
        if info.dtype == "F8_E4M3" and fp8_blocks is not None:
            scale = source.tensors.get(name[: -len(".weight")] + fp8.SCALE_SUFFIX)
            if scale is None:
                continue
            w = fp8.dequantize(w, read_into(scale), fp8_blocks.block)
        if not w.dtype.is_floating_point:
            report.fail(f"{info.path}: source weight {name} is {info.dtype}, not a float")
            continue
        report.errors.append((q.module, tuple(info.shape), _rel_error(w, q, _weight_scale_2(q, convention))))
        del w
    if missing:
        report.fail(f"{len(missing)} source tensors are missing from DST, e.g. {', '.join(missing[:3])}")
    if differ:
        report.fail(f"{len(differ)} kept tensors differ from the source, e.g. {', '.join(differ[:3])}")
    bad = [(m, e) for m, _, e in report.errors if not (e <= max_error)]
    if bad:
        worst = max(bad, key=lambda x: x[1] if math.isfinite(x[1]) else math.inf)
        report.fail(f"{len(bad)} quantized weights reconstruct with relative error above {max_error} "
                    f"(worst {worst[0]}: {worst[1]:.4g}); wrong scales or a mixed-up convention")


# -- entry point -----------------------------------------------------------------------------------


def verify(dst, source: str | None = None, *, max_error: float = DEFAULT_MAX_ERROR, workers: int = 4) -> Report:
    """Check ``dst``; problems in it go into the report. A missing ``dst`` or an unreadable ``source``
    raises ShardconvError (a usage error)."""
    dst = Path(dst)
    if not dst.is_dir():
        raise ShardconvError(f"{dst}: not a folder (verify needs a converted checkpoint folder)")
    report = Report()
    config = _load_json(dst / "config.json", report)
    if config is None and not (dst / "config.json").exists():
        report.fail(f"{dst / 'config.json'}: not found")
    if not isinstance(config, dict):
        if config is not None:
            report.fail(f"{dst / 'config.json'}: not a JSON object")
        config = {}
    hf_quant = _load_json(dst / "hf_quant_config.json", report)

    tensors, shards = _read_files(dst, report)
    _check_journal(dst, shards, report, workers)
    convention = _convention(config, hf_quant, tensors, report, dst) or "modelopt"
    mods = _find_modules(tensors, convention, report)
    good = {m: q for m, q in mods.items() if _check_shapes(q, convention, report)}
    for q in good.values():
        _check_module_values(q, report)
    n_groups = _check_groups(good, tensors, report, mods)
    _check_algo(config, hf_quant, convention, mods, tensors, report, dst)
    lists = _exclusion_lists(config, hf_quant, convention, dst, report)
    n_kept = _check_exclusions(lists, convention, mods, tensors, report)
    report.info[:0] = [
        f"checkpoint  {dst}  ({len(shards)} shards, {len(tensors)} tensors, {convention} convention)",
        f"quantized   {len(mods)} modules, {n_groups} fusion groups checked",
        f"kept        {n_kept} Linear weights in source precision, {len(lists)} exclusion lists checked",
    ]
    if source is not None:
        _compare_source(source, good, convention, tensors, report, max_error, mods)
    if not mods and not report.problems:
        report.fail(f"{dst}: no NVFP4-quantized modules found")
    return report


def error_table(report: Report, top: int = 20) -> list[str]:
    """The reconstruction errors, worst first."""
    if not report.errors:
        return []
    rows = sorted(report.errors, key=lambda r: (-(r[2] if math.isfinite(r[2]) else math.inf), r[0]))
    finite = [e for _, _, e in report.errors if math.isfinite(e)]
    mean = sum(finite) / len(finite) if finite else float("nan")
    width = max(len(m) for m, _, _ in rows[:top])
    lines = [f"reconstruction error ||W - deq(Q)|| / ||W||: {len(rows)} weights, mean {mean:.4f}, "
             f"worst {rows[0][2]:.4f}",
             f"  {'module':<{width}}  {'shape':<18}  rel. error"]
    for module, shape, e in rows[:top]:
        lines.append(f"  {module:<{width}}  {str(list(shape)):<18}  {e:.4f}")
    if len(rows) > top:
        lines.append(f"  ... {len(rows) - top} more (best {rows[-1][2]:.4f})")
    return lines
