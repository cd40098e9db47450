"""Uncalibrated experts: MoE experts the calibration routed no tokens to, so the amax file has no (or
a zero) amax for them. By default their amax is made up the way ModelOpt's export does it, and every
module so made is listed (the summary, ``DST/shardconv-report.json``); ``--strict-amax`` refuses.

- An *expert* is a Linear named ``<layer>.experts.<N>.<proj>`` (per-expert modules, and the
  transformers-5 fused quantizers amax.py splits into them). Stacked ``[E, in, out]`` tensors are not:
  one quantizer covers all their experts, so a missing entry means the layer saw no tokens at all.
- *Uncalibrated*, per part: no entry, or an entry without that part, or a zero amax (a static weight
  amax whose global amax is 0; a per-tensor or input amax of 0). NaN, Inf and negative values are a
  broken file, refused when it is read (amax.py), never synthesized.
- Weight amax: from the expert's own weights when it is quantized, as ``max`` calibration does:
  per-block (static) when a calibrated expert of the same layer has static amax, else per-tensor.
- Input amax: the max over the calibrated experts of the same layer and projection (``gate_proj``,
  ``up_proj``, ``down_proj``...), as ModelOpt's ``set_expert_quantizer_amax`` fills a missing expert
  input quantizer from the other experts of the same linear.
- A part is made up only when a calibrated sibling (same layer, and same projection for inputs)
  exists; otherwise the module stays what it is and planning refuses it as before. Dense modules
  without amax stay an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .amax import AmaxFile, ModuleAmax
from .errors import AmaxError

_EXPERT = re.compile(r"^(?P<layer>.+\.experts)\.(?P<index>\d+)\.(?P<proj>[^.]+)$")


@dataclass(frozen=True)
class Synthesized:
    """One expert module whose amax shardconv made up."""

    module: str
    weight: str | None  # "static" / "dynamic" (from its weights), or None: the file's
    input: float | None  # the input amax given it, or None: the file's (or no W4A4)
    why: str  # "no entry", "zero amax"...

    def to_json(self) -> dict:
        parts = {}
        if self.weight:
            parts["weight_amax"] = f"max of its weights ({'per block, static' if self.weight == 'static' else 'per tensor'})"
        if self.input is not None:
            parts["input_amax"] = self.input
            parts["input_amax_from"] = "max over the calibrated experts of the same layer and projection"
        return {"module": self.module, "reason": self.why, **parts}


def _zero(t: torch.Tensor | None) -> bool:
    return t is not None and not bool((t != 0).any())


def _weight_missing(a: ModuleAmax | None) -> str | None:
    if a is None:
        return "no entry"
    if a.weight is None and a.global_amax is None:
        return "no weight_quantizer._amax"
    if (a.global_amax is not None and _zero(a.global_amax)) or (a.global_amax is None and _zero(a.weight)):
        return "zero weight amax"
    return None


def _input_missing(a: ModuleAmax | None) -> str | None:
    if a is None:
        return "no entry"
    if a.input is None:
        return "no input_quantizer._amax"
    if _zero(a.input):
        return "zero input amax"
    return None


def synthesize(members: list, amax: AmaxFile, scales: str, w4a4: bool, strict: bool = False) -> list[Synthesized]:
    """Give every uncalibrated expert among ``members`` (planning.Member, ``amax`` attached) the amax
    the rule above makes; returns what was made, sorted by module. ``strict``: refuse instead, with
    one line naming the first such module."""
    experts = [(m, _EXPERT.match(m.module)) for m in members if not m.stacked]
    experts = [(m, e) for m, e in experts if e]
    need_weight, need_input = scales == "amax", w4a4
    static_layers: dict[str, bool] = {}  # layer -> any calibrated expert with static amax
    inputs: dict[tuple[str, str], torch.Tensor] = {}  # (layer, proj) -> max calibrated input amax
    for m, e in experts:
        a = m.amax
        if need_weight and _weight_missing(a) is None:
            static_layers[e["layer"]] = static_layers.get(e["layer"], False) or a.static
        if need_input and _input_missing(a) is None:
            key = (e["layer"], e["proj"])
            inputs[key] = a.input.reshape(()) if key not in inputs else torch.maximum(inputs[key], a.input.reshape(()))
    made = []
    for m, e in sorted(experts, key=lambda x: x[0].module):
        a = m.amax
        weight_why = _weight_missing(a) if need_weight and e["layer"] in static_layers else None
        input_why = _input_missing(a) if need_input and (e["layer"], e["proj"]) in inputs else None
        if not (weight_why or input_why):
            continue
        why = "no entry" if a is None else "; ".join(w for w in (weight_why, input_why) if w)
        if strict:
            n = sum(1 for x, y in experts if (need_weight and y["layer"] in static_layers and _weight_missing(x.amax))
                    or (need_input and (y["layer"], y["proj"]) in inputs and _input_missing(x.amax)))
            raise AmaxError(f"{amax.path}: module {m.module}: uncalibrated expert ({why}); --strict-amax refuses to "
                            f"synthesize its amax ({n} expert modules uncalibrated)")
        base = a or ModuleAmax()
        kind = ("static" if static_layers[e["layer"]] else "dynamic") if weight_why else None
        new_input = inputs[(e["layer"], e["proj"])].clone() if input_why else base.input
        m.amax = ModuleAmax(weight=None if kind else base.weight, global_amax=None if kind else base.global_amax,
                            input=new_input, from_weights=kind or base.from_weights)
        made.append(Synthesized(m.module, kind, float(new_input) if input_why else None, why))
    return made


def report(plan) -> dict | None:
    """``DST/shardconv-report.json``: what shardconv made up or left out (None: nothing), for people
    and for ``verify`` (every module listed must be quantized; recomputation makes the same amax)."""
    if not plan.synthesized and not plan.kv_partial:
        return None
    out: dict = {"synthesized_amax": [s.to_json() for s in plan.synthesized]}
    if plan.kv_partial:
        out["kv_cache_scales_for"] = sorted(plan.kv_attentions)
        out["kv_cache_scales_missing"] = list(plan.kv_missing)  # no usable k/v amax: not in kv_cache_quantized_layers
    return out
