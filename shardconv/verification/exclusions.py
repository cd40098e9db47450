"""Verify, exclusions: in config.json ``quantization_config.ignore`` and hf_quant_config.json
``exclude_modules`` alike, every Linear kept in source precision is listed and no quantized module is
(engines load an unlisted kept module as NVFP4, and a listed quantized one unquantized)."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from ..module_rules import EMBEDDING_NAME, STACKED_EXPERT_TENSOR
from ..safetensors_io import TensorInfo
from .report import QModule, Report


def exclusion_lists(config: dict, hf_quant: object, convention: str, dst: Path, report: Report) -> dict[str, list]:
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


def kept_linears(tensors: dict[str, TensorInfo], mods: dict[str, QModule], stacked: bool = True) -> set[str]:
    """Modules whose 2-D ``.weight`` DST keeps unquantized (embeddings are no Linear: llm-compressor
    does not list them); with ``stacked``, also stacked expert tensors kept in a float dtype."""
    kept: set[str] = set()
    for name, info in tensors.items():
        if name.endswith(".weight") and len(info.shape) == 2 and name[: -len(".weight")] not in mods:
            module = name[: -len(".weight")]
            if not EMBEDDING_NAME.search(module):
                kept.add(module)
        elif (stacked and len(info.shape) == 3 and STACKED_EXPERT_TENSOR.search(name) and name not in mods
              and info.dtype in ("BF16", "F16", "F32")):
            kept.add(name.rpartition(".")[0])
    return kept


def check_exclusions(lists: dict[str, list], convention: str, mods: dict[str, QModule],
                      tensors: dict[str, TensorInfo], report: Report, require_listed: bool = True) -> int:
    """``require_listed=False`` (MIXED_PRECISION, whose kept modules are those absent from
    quantized_layers): only that no quantized module is listed."""
    quantized = {q.owner for q in mods.values()} | set(mods)
    kept = kept_linears(tensors, mods)
    for where, entries in lists.items():
        matchers = []
        for e in entries:
            try:
                matchers.append((e, _matcher(e)))
            except re.error as err:
                report.fail(f"{where}: entry {e!r} is not a valid regex ({err})")
        unlisted = sorted(m for m in kept if not any(f(m) for _, f in matchers))
        if unlisted and require_listed:
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

