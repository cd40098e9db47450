"""The dry-run report: what a plan quantizes, keeps, groups and writes, in a few dozen lines.

Shared by ``shardconv convert --dry-run`` and :func:`shardconv.describe`.
"""

from __future__ import annotations

import re
from collections import Counter


def _first_number(name: str) -> tuple[str | None, int | None]:
    """``model.layers.7.mlp.x`` -> (``model.layers.{}.mlp.x`` with later numbers as ``*``, 7)."""
    m = re.search(r"\.(\d+)\.", name)
    if not m:
        return None, None
    rest = re.sub(r"\.\d+\.", ".*.", name[m.end() - 1:])
    return name[: m.start()] + ".{}" + rest, int(m.group(1))


def _layer_numbers(modules: list[str]) -> dict[str, set[int]]:
    """Per name pattern, the numbers its modules take at their first ``.N.`` (every layer of the model)."""
    out: dict[str, set[int]] = {}
    for name in modules:
        key, n = _first_number(name)
        if key is not None:
            out.setdefault(key, set()).add(n)
    return out


def _numbers(ns: set[int]) -> str:
    """{0,1,2,5} -> ``{0-2,5}``."""
    runs, out = sorted(ns), []
    start = prev = runs[0]
    for n in runs[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return out[0] if len(out) == 1 and "-" not in out[0] else "{" + ",".join(out) + "}"


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


_TESTED_MODEL_TYPES = {"llama", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss"}


def _family(plan) -> str:
    """What the plan found in this model family: MoE layout, shared experts, MLA, kept subtrees, FP8."""
    model_type = plan.source.config.get("model_type") or "?"
    names = [m.module for m in plan.quantized] + list(plan.excluded)
    found = []
    per_expert = {m.group(1) for n in names if (m := re.search(r"^(.*\.experts\.\d+)\.", n))}
    if per_expert:
        layers = {re.sub(r"\.\d+$", "", e) for e in per_expert}
        found.append(f"MoE, {len(per_expert)} per-expert MLPs in {len(layers)} layers")
    stacked = [m for m in plan.quantized if m.stacked]
    if stacked:
        found.append(f"{len(stacked)} stacked [E, in, out] expert tensors (ModelOpt's transposed layout)")
    if any(re.search(r"\.shared_experts?\.", n) for n in names):
        found.append("shared experts")
    if any(n.endswith("q_a_proj") or n.endswith("kv_a_proj_with_mqa") for n in names):
        found.append("MLA (q_a_proj + kv_a_proj_with_mqa grouped)")
    subtrees = [p for p in plan.exclude_list() if p.endswith(".*")]
    if subtrees:
        found.append("kept whole: " + ", ".join(subtrees))
    if plan.encoding.describe():
        found.append(plan.encoding.describe())
    if model_type not in _TESTED_MODEL_TYPES:
        found.append("not a tested family: fusion groups found by name")
    return model_type + (": " + "; ".join(found) if found else "")


def describe(plan) -> list[str]:
    """The --dry-run report: counts, bytes, fusion groups and exclusions, grouped by name pattern."""
    src = plan.source
    arch = ",".join(src.config.get("architectures") or ["?"])
    n_dequant = sum(1 for u in plan.units if getattr(u, "dequant", None) is not None)
    lines = [
        f"source      {src.root}  ({len(src.shards)} shards, {src.total_bytes / 1e9:.3f} GB, {arch})",
        f"family      {_family(plan)}",
    ]
    if getattr(plan, "linears", None) is not None:
        lines.append(f"linears     {plan.linears.describe()}")
    lines += [
        f"scales      {plan.scales}  -> quant_algo {plan.quant_algo}" + ("  + FP8 KV cache" if plan.kv_cache else ""),
        f"quantize    {len(plan.quantized)} Linear weights in {sum(1 for u in plan.units if u.members)} units "
        f"({len(plan.groups)} fusion groups)",
        f"keep        {sum(1 for u in plan.units if u.copy is not None)} tensors as they are "
        f"({len(plan.excluded)} excluded Linear modules)"
        + (f", {n_dequant} excluded {plan.encoding.label} weights dequantized to bf16" if n_dequant else ""),
        f"output      {len(plan.shard_names)} shards, {plan.out_bytes / 1e9:.3f} GB "
        f"({src.total_bytes / max(plan.out_bytes, 1):.2f}x smaller), format {plan.format_name}",
    ]
    if getattr(plan, "recipe", None) is not None:  # mixed precision: how many modules get each format
        n_fp8 = sum(1 for m in plan.quantized if m.target == "fp8")
        lines.insert(3, f"recipe      {plan.recipe.describe()}: {len(plan.quantized) - n_fp8} NVFP4, {n_fp8} FP8 "
                        "Linear weights")
    groups = Counter(_pattern("{" + ", ".join(m.module for m in u.members) + "}") for u in plan.groups)
    universe = _layer_numbers([m.module for m in plan.quantized] + list(plan.excluded))
    if groups:
        lines.append("fusion groups (one weight_scale_2 each):")
        for pattern, n in sorted(groups.items()):
            parts = pattern[1:-1].split(", ")
            common = parts[0].rsplit(".", 1)[0]
            leaves = ",".join(p.rsplit(".", 1)[1] for p in parts)
            lines.append(f"  {n:5d} x {common}.{{{leaves}}}")
    if plan.excluded:
        lines.append("excluded (kept in source precision):")
        from .module_rules import excluded_subtree

        rows: Counter = Counter()
        numbers: dict[tuple[str, str], set[int]] = {}
        for m, r in plan.excluded.items():
            root = excluded_subtree(m, src.config)
            if root:  # an MTP layer or tower is listed whole, as it is in the config
                r = "MTP layer" if "MTP" in r or root.rsplit(".", 1)[-1].isdigit() else "vision/audio tower"
                rows[(f"{root}.*", f"{r}, kept whole")] += 1
            else:
                rows[(_pattern(m), r)] += 1
                key, n = _first_number(m)
                if key is not None:
                    numbers.setdefault((_pattern(m), r), set()).add(n)
        for (pattern, reason), n in sorted(rows.items()):
            seen = numbers.get((pattern, reason))
            key = _first_number(pattern.replace("*", "0", 1))[0] if seen else None
            if seen and seen != universe.get(key, seen):  # only some layers: say which
                pattern = pattern.replace(".*.", "." + _numbers(seen) + ".", 1)
            lines.append(f"  {n:5d} x {pattern}  ({reason})")
        ignore = plan.exclude_list()
        lines.append(f"exclusion list ({len(ignore)} entries in the config): " + ", ".join(ignore[:6])
                     + (", ..." if len(ignore) > 6 else ""))
    lines += [f"note        {n}" for n in plan.notes]
    return lines
