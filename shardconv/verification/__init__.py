"""``shardconv verify DST [--source SRC]``: check a finished NVFP4 checkpoint without a GPU and without
loading it whole.

Accepts both on-disk conventions (FORMAT.md §5, §6): ModelOpt's unified HF checkpoint (``weight``,
``weight_scale``, ``weight_scale_2``, ``input_scale``; also ModelOpt's own exports: one
``model.safetensors`` and no index) and compressed-tensors ``nvfp4-pack-quantized`` as written by
llm-compressor (``weight_packed``, ``weight_scale``, ``weight_global_scale = 1 / weight_scale_2``,
``input_global_scale``).

Checks, one module per family (every problem is collected, then reported one line each):

1. files.py: config.json, the index (or a single shard), every index entry in the shard it names, no
   tensor in two shards, valid headers whose byte ranges match their dtype and shape and cover each
   shard's data exactly (no gap, no trailing bytes);
2. journal.py: each shard's digest against ``DST/.shardconv-journal.json``; without one, says so;
3. modules.py: dtypes and shapes of packed weight / block scales / global scales, finite positive global
   scales, finite non-negative block scales, fusion groups (module_rules.FUSION_SETS) quantized whole with
   bit-identical ``weight_scale_2`` and ``input_scale``;
4. config.py: NVFP4 declared (quant_algo, num_bits 4, group_size 16), W4A4 / W4A16 as the tensors are,
   no quant_algo without quantized tensors, FP8 KV-cache scales declared, finite, positive, on
   attention modules that exist; kv_layers.py: a per-layer KV declaration lists exactly the modules
   with scales, a global one has them on every attention module; report_file.py: the modules
   ``shardconv-report.json`` says got made-up amax are quantized, and its KV-cache lists match DST;
5. values.py: every other floating-point tensor is finite;
6. exclusions.py: every kept Linear is listed as excluded and no quantized module is;
7. with a source, source.py: every source tensor is in DST, kept tensors are byte-identical, the
   reconstruction error of each quantized weight is under ``max_error``; and recompute.py: every
   quantized group is recomputed from the source and must be bit-identical.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import OptionError
from .config import check_algo, check_kv
from .exclusions import check_exclusions, exclusion_lists
from .files import read_files
from .journal import check_journal
from .kv_layers import check_kv_layers
from .report_file import check_report_file
from .mixed import check_mixed
from .mixed import declared as declared_mixed
from .modules import check_groups, check_module_values, check_shapes, convention_of, find_modules
from .report import DEFAULT_MAX_ERROR, MAX_REPORTED, QModule, Report, load_json
from .values import check_finite

__all__ = ["DEFAULT_MAX_ERROR", "MAX_REPORTED", "QModule", "Report", "error_table", "verify"]


def verify(dst, source: str | None = None, *, max_error: float = DEFAULT_MAX_ERROR, workers: int = 4,
           scales: str | None = None, amax: str | None = None, export_rounding: str | None = None,
           recompute: bool = True) -> Report:
    """Check ``dst``; problems in it go into the report. A missing ``dst``, an unreadable ``source`` or
    amax file raise ShardconvError (a usage error).

    With ``source``, ``recompute`` (the default) quantizes every group again from it: ``scales`` (a
    scales.METHODS name) and ``export_rounding`` ("cpu" or "cuda") say how DST was made when known,
    ``amax`` is the amax file it was converted with (input and KV-cache scales come only from it)."""
    dst = Path(dst)
    if not dst.is_dir():
        raise OptionError(f"{dst}: not a folder (verify needs a converted checkpoint folder)")
    amax_file = None
    if amax is not None:
        from ..amax import load_amax

        amax_file = load_amax(amax)
    report = Report()
    config = load_json(dst / "config.json", report)
    if config is None and not (dst / "config.json").exists():
        report.fail(f"{dst / 'config.json'}: not found")
    if not isinstance(config, dict):
        if config is not None:
            report.fail(f"{dst / 'config.json'}: not a JSON object")
        config = {}
    hf_quant = load_json(dst / "hf_quant_config.json", report)

    tensors, shards = read_files(dst, report)
    journal = check_journal(dst, shards, report, workers)
    convention = convention_of(config, hf_quant, tensors, report, dst) or "modelopt"
    mods = find_modules(tensors, convention, report)
    good = {m: q for m, q in mods.items() if check_shapes(q, convention, report)}
    for q in good.values():
        check_module_values(q, report)
    n_groups = check_groups(good, tensors, report, mods)
    check_algo(config, hf_quant, convention, mods, report, dst)
    check_kv(config, hf_quant, convention, tensors, report, dst)
    check_kv_layers(config, hf_quant, tensors, report, dst)
    check_report_file(dst, mods, report, tensors)
    n_finite = check_finite(tensors, mods, {n for n in tensors if n.endswith((".k_scale", ".v_scale"))}, report)
    lists = exclusion_lists(config, hf_quant, convention, dst, report)
    if declared_mixed(config, hf_quant):  # MIXED_PRECISION: quantized_layers says what is quantized
        n_kept = check_mixed(config, hf_quant, mods, tensors, report, dst)
        check_exclusions(lists, convention, mods, tensors, report, require_listed=False)
    else:
        n_kept = check_exclusions(lists, convention, mods, tensors, report)
    report.info[:0] = [
        f"checkpoint  {dst}  ({len(shards)} shards, {len(tensors)} tensors, {convention} convention)",
        f"quantized   {len(mods)} modules, {n_groups} fusion groups checked",
        f"kept        {n_kept} Linear weights in source precision, {len(lists)} exclusion lists checked",
        f"values      {n_finite} floating-point tensors outside the quantized modules are finite",
    ]
    if source is None:
        report.info.append("source      none given: kept tensors not compared, scales not recomputed "
                           "(verify --source SRC does both)")
    else:
        from ..source import open_source
        from .recompute import recompute as recompute_groups
        from .source import compare_source

        src = open_source(source)  # an error here is the user's (usage, exit 2)
        failed = compare_source(src, good, convention, tensors, report, max_error, mods)
        if recompute:
            recompute_groups(src, tensors, good, mods, convention, report, scales=scales, amax=amax_file,
                             rounding=export_rounding, journal=journal, skip=failed)
        else:
            report.info.append("recomputed  nothing (--no-recompute): scales not checked bit for bit")
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
