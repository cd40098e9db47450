"""Verify, scale recomputation: with the source checkpoint, every quantized fusion group is quantized
again on the CPU with shardconv's own quantizer (quantize.quantize_group, the code convert runs), one
group at a time, and DST's ``weight_scale_2``, block scales, packed codes and (with an amax file)
``input_scale`` and KV-cache scales must be bit-identical. A block scale changed to another finite
value, or a global scale changed consistently in all members, passes every other check; only this
one finds it.

The scale method is ``--scales`` when given, else the journal's optional ``"scales"`` key, else each
candidate is tried per group (``max``, ModelOpt's static max calibration ``max-static``, ``mse``,
``four-over-six``; ``amax`` first when the amax file has weight amax, ``cast`` first for an MXFP4
source: the lossless cast from the E8M0 exponents, cast.py) and the group passes when one
reproduces all its members exactly. The export rounding (numerics.set_export_rounding) is likewise
``--export-rounding``, the journal's ``"export_rounding"``, or cpu then cuda.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch

from .. import encodings, numerics, uncalibrated
from ..amax import AmaxFile, ModuleAmax
from ..errors import OptionError
from ..formats import get_format
from ..module_rules import default_exclusion
from ..planning import Member, Unit, build_plan
from ..quantize import CHUNK_ELEMENTS, quantize_group
from ..safetensors_io import DTYPE_NAMES, TensorInfo, read_into
from .config import kv_attention
from .report import QModule, Report

METHODS = ("max", "amax", "mse", "four-over-six", "cast")  # --scales choices (scales.METHODS)
CANDIDATES = ("max", "max-static", "mse", "four-over-six")  # tried in this order when the method is unknown
ROUNDINGS = ("cpu", "cuda")


def _rank(name: str) -> int:
    """Compare the global scale first, then block scales, codes, input scale: the first difference
    then says which number went wrong, not what followed from it."""
    for i, suffixes in enumerate((("weight_scale_2", "weight_global_scale"), ("weight_scale",),
                                  ("input_scale", "input_global_scale"))):
        if name.endswith(suffixes):
            return (0, 1, 3)[i]
    return 2  # the packed codes


def _static_max(m: Member, w: torch.Tensor) -> Member:
    """``m`` with the amax ModelOpt's static max calibration saves: per-block max |w| (over the
    transpose for a stacked [E, in, out] tensor) and the weight's max as its global amax."""
    src = w.transpose(1, 2) if m.stacked else w
    rows = src.reshape(-1, src.shape[-1])
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[-1]))
    blocks = torch.cat([numerics.block_amax(rows[i:i + step]) for i in range(0, rows.shape[0], step)])
    a = ModuleAmax(weight=blocks.reshape(-1), global_amax=blocks.amax() if blocks.numel() else torch.zeros(()),
                   input=m.amax.input if m.amax is not None else None)
    return replace(m, amax=a)


def _expected(unit: Unit, weights: list[torch.Tensor], method: str, fmt,
              encoded: tuple[list[Member], list[torch.Tensor]] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors convert would write for each member, by module, under ``method``. ``encoded``: the
    members as planned and their codes, for ``cast`` (which reads the encoding's exponents)."""
    members = unit.members
    if method == "cast" and encoded is not None:
        members, weights = encoded
    if method == "max-static":
        members, method = [_static_max(m, w) for m, w in zip(members, weights)], "amax"
    results = quantize_group(members, weights, method, "cpu", check=False)
    return {m.module: fmt.quantized_tensors(m.module, q) for m, q in zip(unit.members, results)}


def _first_difference(got: TensorInfo, want: torch.Tensor) -> str | None:
    """Where ``got`` (in DST) and ``want`` first differ, in words, or None when bit-identical."""
    want = want.contiguous()
    if (got.dtype, tuple(got.shape)) != (DTYPE_NAMES[want.dtype], tuple(want.shape)):
        return f"is {got.dtype}{list(got.shape)}, recomputed {DTYPE_NAMES[want.dtype]}{list(want.shape)}"
    a = read_into(got).reshape(-1).view(torch.uint8)
    b = want.reshape(-1).view(torch.uint8)
    if torch.equal(a, b):
        return None
    size = want.element_size()
    flat = int((a != b).nonzero()[0, 0]) // size
    pos, rest = [], flat
    for d in reversed(want.shape):
        pos.append(rest % d)
        rest //= d
    got_v = read_into(got).reshape(-1)[flat]
    want_v = want.reshape(-1)[flat]
    if want.dtype == torch.uint8:
        return f"first at {pos[::-1]}: byte 0x{int(got_v):02x}, recomputed 0x{int(want_v):02x}"
    return f"first at {pos[::-1]}: {float(got_v)!r}, recomputed {float(want_v)!r}"


def _compare(expected: dict[str, dict[str, torch.Tensor]], checked: list[str],
             tensors: dict[str, TensorInfo]) -> list[tuple[str, str, str]]:
    """Each member of ``checked`` that differs from ``expected``: (module, first differing tensor, how)."""
    out = []
    for module in checked:
        for name, t in sorted(expected[module].items(), key=lambda item: _rank(item[0])):
            got = tensors.get(name)
            diff = "is missing from DST" if got is None else _first_difference(got, t)
            if diff:
                out.append((module, name, diff))
                break
    return out


class Recomputer:
    """Recomputes groups and compares them with DST, trying the candidate methods and roundings."""

    def __init__(self, fmt, tensors: dict[str, TensorInfo], methods: list[str], roundings: list[str]):
        self.fmt, self.tensors = fmt, tensors
        self.methods, self.roundings = methods, roundings
        self.matched: Counter = Counter()  # (method, rounding) -> groups reproduced

    def _order(self, items: list[str], i: int) -> list[str]:
        """Candidates, the one that matched most often first (the groups of a model share it)."""
        counts = Counter()
        for key, n in self.matched.items():
            counts[key[i]] += n
        return sorted(items, key=lambda x: (-counts[x], items.index(x)))

    def group(self, unit: Unit, checked: list[str]) -> tuple[list[tuple[str, str, str]], str]:
        """([], method) when one (method, rounding) reproduces every checked member bit for bit; else
        the members that differ under the first candidate tried, and that method."""
        codes = [read_into(m.weight) for m in unit.members]
        encoded = (unit.members, codes) if any(m.encoded is not None for m in unit.members) else None
        weights = [encodings.source_weight(m, c) for m, c in zip(unit.members, codes)]  # encoded -> bf16 here
        unit = replace(unit, members=[replace(m, encoded=None, weight=m.encoded.plain_view() if m.encoded else m.weight)
                                      for m in unit.members])
        first = None
        for rounding in self._order(self.roundings, 1):
            numerics.set_export_rounding(rounding)
            for method in self._order(self.methods, 0):
                diffs = _compare(_expected(unit, weights, method, self.fmt, encoded), checked, self.tensors)
                if not diffs:
                    self.matched[(method, rounding)] += 1
                    return [], method
                first = first or (diffs, method)
        return first


def _check_kv(fmt, amax: AmaxFile, attentions: list[str], tensors: dict[str, TensorInfo], roundings: list[str],
              report: Report) -> None:
    """FP8 KV-cache scales (``k_amax / 448``, ``v_amax / 448``) recomputed from the amax file, for the
    attention modules convert gives them (those with usable k/v amax)."""
    for attention in attentions:
        kv = amax.kv[attention]
        diffs = []
        for rounding in roundings:
            numerics.set_export_rounding(rounding)
            want = fmt.kv_scales(attention, kv["k"], kv["v"])
            diffs = [(n, "is missing from DST" if n not in tensors else _first_difference(tensors[n], t))
                     for n, t in want.items()]
            diffs = [(n, d) for n, d in diffs if d]
            if not diffs:
                break
        for name, what in diffs:
            where = f"{tensors[name].path}: tensor" if name in tensors else "tensor"
            report.fail(f"{where} {name!r} {what} (recomputed from the amax file's {attention} k/v amax)")
    for name in sorted(n for n in tensors if n.endswith((".k_scale", ".v_scale"))):
        if kv_attention(name) not in attentions:
            report.fail(f"{tensors[name].path}: tensor {name!r}: the amax file gives {kv_attention(name)} no usable "
                        "k/v amax, so convert writes no KV-cache scale for it")


def recompute(source, tensors: dict[str, TensorInfo], good: dict[str, QModule], found: dict[str, QModule],
              convention: str, report: Report, *, scales: str | None = None, amax: AmaxFile | None = None,
              rounding: str | None = None, journal: dict | None = None, skip: frozenset[str] | set[str] = frozenset()) -> None:
    """Recompute every quantized group of DST from ``source`` (an opened source.Source); each module
    that differs fails with one line naming it and its first differing tensor. ``skip``: modules
    already failed (their reconstruction error), not reported twice."""
    fmt = get_format(convention)
    journal = journal if isinstance(journal, dict) else {}
    recorded = journal.get("scales") if journal.get("scales") in METHODS else None
    given = scales
    scales = scales or recorded
    if scales == "amax" and amax is None:
        raise OptionError("--scales amax needs --amax FILE (the amax file the checkpoint was converted with)")
    mxfp4 = encodings.detect(source).name == "mxfp4"
    if scales == "cast" and not mxfp4:
        raise OptionError(f"{'--scales cast' if given else 'scales cast (from the journal of DST)'}: recomputing "
                          f"the cast needs the MXFP4 source, and {source.root} is not MXFP4")
    if scales:
        methods = [scales]
    else:
        methods = ((["amax"] if amax is not None and amax.has_weight_amax else []) + (["cast"] if mxfp4 else [])
                   + list(CANDIDATES))
    rounding = rounding or (journal.get("export_rounding") if journal.get("export_rounding") in ROUNDINGS else None)
    roundings = [rounding] if rounding else list(ROUNDINGS)

    # the plan convert makes, with every source Linear DST keeps unquantized excluded as DST did
    kept = []
    for name, info in source.tensors.items():
        module = name[: -len(".weight")] if name.endswith(".weight") and len(info.shape) == 2 else name
        owner = module.rpartition(".")[0] if module == name else module
        if len(info.shape) in (2, 3) and module not in found and (module != name or len(info.shape) == 3) \
                and default_exclusion(owner, source.config) is None:  # (few: a long list is slow to match)
            kept.append(module)
    plan = build_plan(source, fmt, excludes=kept, amax=amax, scales="amax" if scales == "amax" else "max",
                      max_shard_size=2**62)
    if amax is not None and amax.has_weight_amax and plan.scales != "amax":  # for the "amax" candidate
        uncalibrated.synthesize(plan.quantized, amax, "amax", plan.w4a4)
    for m in plan.quantized:  # a mixed-precision DST: its FP8 modules are recomputed as FP8
        if m.module in found and found[m.module].fp8:
            m.target = "fp8"
    planned = {m.module for m in plan.quantized}
    not_planned = sorted(m for m in good if m not in planned)
    if not_planned:
        reasons = {m: plan.excluded.get(good[m].owner) or plan.excluded.get(m) or "not in the source" for m in not_planned}
        report.warnings.append(f"{len(not_planned)} quantized modules not recomputed (shardconv would not quantize "
                               f"them), e.g. {not_planned[0]} ({reasons[not_planned[0]]})")

    rec = Recomputer(fmt, tensors, methods, roundings)
    before = numerics.EXPORT_ROUNDING
    n_groups = n_modules = 0
    try:
        for unit in plan.units:
            checked = [m.module for m in unit.members if m.module in good and m.module not in skip]
            if checked:
                n_groups += 1
                n_modules += len(checked)
                diffs, method = rec.group(unit, checked)
                how = f"scales {method}" if len(methods) == 1 else f"no scale method reproduces it; {method} shown"
                for module, name, what in diffs:
                    where = (tensors[name] if name in tensors else good[module].packed).path
                    report.fail(f"{where}: quantized module {module}: tensor {name!r} {what} "
                                f"(recomputed from the source: {how})")
        if amax is not None:
            _check_kv(fmt, amax, plan.kv_attentions, tensors, roundings, report)
    finally:
        numerics.set_export_rounding(before)
    used = ", ".join(f"{m} {n}" for m, n in Counter(k[0] for k in rec.matched.elements()).most_common())
    rounds = sorted({k[1] for k in rec.matched})
    report.info.append(f"recomputed  {n_modules} modules in {n_groups} groups from the source, bit for bit "
                       f"(scales: {used or 'none matched'}; export rounding {', '.join(rounds) or '-'})")
    with_input = sum(1 for m in good.values() if m.input_scale is not None)
    if with_input and (amax is None or not amax.has_input_amax):
        report.info.append(f"input scale {with_input} input scales not recomputed (they come from calibration: "
                           "give --amax FILE)")
