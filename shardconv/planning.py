"""Planning: from tensor headers alone, decide what is quantized, the fusion groups, what is excluded
and the exact output shard layout, before any tensor data is read.

Fusion groups (FORMAT.md §3) are formed by module name, so members may sit in different input
shards; a group is quantized whole or excluded whole. Units are ordered by where their first member
sits in the input, so reads stay close to sequential, and output shards are filled in that order.
The rules it applies per module are in module_rules.py; a saved amax file is checked by amax_checks.py.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from . import encodings, mixed, uncalibrated
from .amax import AmaxFile, ModuleAmax
from .amax_checks import check_amax, check_amax_modules, check_kv_amax
from .errors import OptionError, SourceError
from .linears import Linears
from .linears import find as find_linears
from .module_rules import (QUANTIZABLE_DTYPES, STACKED_EXPERT_MODEL_TYPES, STACKED_EXPERT_TENSOR, default_exclusion,
                           excluded_subtree, fusion_key, fusion_rank, matches, model_types)
from .numerics import BLOCK
from .recipes import Recipe
from .safetensors_io import TensorInfo
from .shard_writer import PlannedTensor
from .source import Source

@dataclass
class Member:
    """One quantized Linear: its module name, weight tensor and saved amax (if any)."""

    module: str  # stacked experts: the tensor name (``...experts.gate_up_proj``), which outputs extend
    weight: TensorInfo
    amax: ModuleAmax | None = None
    encoded: encodings.EncodedWeight | None = None  # a quantized source encoding: ``weight`` holds its codes
    stacked: bool = False  # [E, in, out] expert stack, quantized per expert along `in`
    target: str = "nvfp4"  # "nvfp4" or "fp8" (a mixed-precision recipe, recipes.py)

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape as a plain checkpoint stores it (encoded weights: once dequantized)."""
        return tuple(self.encoded.shape) if self.encoded is not None else tuple(self.weight.shape)

    @property
    def out_features(self) -> int:
        return self.shape[-1] if self.stacked else self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[-2] if self.stacked else self.shape[1]

    @property
    def experts(self) -> int | None:
        return self.shape[0] if self.stacked else None


@dataclass
class Unit:
    """One pipeline step: a fusion group (or lone Linear) to quantize, or one tensor to copy."""

    members: list[Member] = field(default_factory=list)
    copy: TensorInfo | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # small tensors known at plan time
    outputs: list[PlannedTensor] = field(default_factory=list)
    shard: int = 0
    dequant: encodings.EncodedWeight | None = None  # an excluded encoded weight, written dequantized (bf16)

    @property
    def inputs(self) -> list[TensorInfo]:
        """Every input tensor the unit reads (encoded weights' scales included)."""
        out = [m.weight for m in self.members] + [p for m in self.members if m.encoded for p in m.encoded.parts]
        if self.copy is not None:
            out.append(self.copy)
        if self.dequant is not None:
            out += [self.dequant.data, *self.dequant.parts]
        return out

    @property
    def in_bytes(self) -> int:
        return sum(t.nbytes for t in self.inputs)

    @property
    def out_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)

    @property
    def first(self) -> TensorInfo:
        """The unit's first input tensor (units are processed in input order)."""
        return self.copy or (self.dequant.data if self.dequant else self.members[0].weight)


@dataclass
class Plan:
    source: Source
    units: list[Unit]
    shard_names: list[str]
    shard_tensors: list[list[PlannedTensor]]
    excluded: dict[str, str]  # module -> reason, every 2-D weight kept in source precision
    scales: str  # "max", "amax", "mse", "four-over-six" or "cast" (scales.METHODS)
    w4a4: bool
    kv_cache: bool
    format_name: str
    notes: list[str] = field(default_factory=list)  # things the user should know (printed by the CLI)
    encoding: encodings.Encoding = field(default_factory=encodings.Plain)  # how the source stores weights
    linears: Linears | None = None  # how Linear weights were told from embeddings and others
    synthesized: list[uncalibrated.Synthesized] = field(default_factory=list)  # uncalibrated experts' amax
    kv_attentions: list[str] = field(default_factory=list)  # attention modules given FP8 KV-cache scales
    kv_missing: list[str] = field(default_factory=list)  # attention modules without (no usable k/v amax)

    @property
    def kv_partial(self) -> bool:
        """Only some attention modules carry FP8 KV-cache scales: the config declares them per layer."""
        return self.kv_cache and bool(self.kv_missing)
    recipe: Recipe | None = None  # a mixed-precision recipe (None: everything NVFP4)

    @property
    def quantized(self) -> list[Member]:
        return [m for u in self.units for m in u.members]

    @property
    def groups(self) -> list[Unit]:
        return [u for u in self.units if len(u.members) > 1]

    @property
    def in_bytes(self) -> int:
        return self.source.total_bytes

    @property
    def out_bytes(self) -> int:
        return sum(u.out_bytes for u in self.units)

    @property
    def nvfp4_algo(self) -> str:
        return "NVFP4" if self.w4a4 else "W4A16_NVFP4"

    @property
    def mixed(self) -> bool:
        """Some modules FP8, the others NVFP4: ModelOpt's MIXED_PRECISION."""
        return any(m.target == "fp8" for m in self.quantized)

    @property
    def quant_algo(self) -> str:
        return "MIXED_PRECISION" if self.mixed else self.nvfp4_algo

    def exclude_list(self) -> list[str]:
        """Excluded modules for the config files, sorted: exact module names, and ``root.*`` for a
        whole MTP layer or vision/audio tower (never a bare prefix, FORMAT.md §4)."""
        out = set()
        for module in self.excluded:
            root = excluded_subtree(module, self.source.config)
            out.add(f"{root}.*" if root else module)
        return sorted(out)


def _is_linear_weight(info: TensorInfo) -> bool:
    return info.name.endswith(".weight") and len(info.shape) == 2


def build_plan(
    source: Source,
    fmt,
    *,
    excludes: list[str] | None = None,
    amax: AmaxFile | None = None,
    scales: str | None = None,
    max_shard_size: int = 5 * 10**9,
    trust_remote_code: bool = False,
    strict_amax: bool = False,
    recipe: Recipe | None = None,
    linears: Linears | None = None,
    build_model: bool = True,
) -> Plan:
    """Decide everything about the output from headers (and the amax file), reading no tensor data.

    ``linears``: how the Linear weights were found (default: linears.find, which may wait for the
    helper process; ``build_model=False``: only its answer, else linears.NoAnswer); speculation.py
    plans with the name rules' answer first."""
    excludes = list(excludes or [])
    if recipe is not None and recipe.is_default:
        recipe = None
    if recipe is not None and not getattr(fmt, "supports_mixed_precision", False):
        raise OptionError(f"--recipe / --format-for: mixed precision is written in the modelopt format only, "
                          f"not {fmt.name}")
    encoding = encodings.detect(source)  # refuses formats shardconv cannot read
    if scales is None:  # README: Scale methods (MXFP4 sources: the lossless cast, cast.py)
        scales = ("amax" if amax is not None and amax.has_weight_amax else
                  "cast" if encoding.name == "mxfp4" else "mse")
    if scales == "amax" and (amax is None or not amax.has_weight_amax):
        raise OptionError("--scales amax needs an --amax file with weight_quantizer amax entries")
    if scales == "cast" and encoding.name != "mxfp4":
        raise OptionError(f"--scales cast needs an MXFP4 source; {source.root} holds {encoding.label} weights")
    encoded = encoding.weights(source)  # codes tensor name -> encoded weight (its parts checked)
    dropped = encoding.dropped(source, encoded)  # scales of the replaced quantization: not in the output
    # what a plain checkpoint would hold: Linear detection and the rules below see names and shapes there
    plain = encodings.plain_tensors(source, encoding, encoded)
    if linears is None:
        linears = find_linears(source, trust_remote_code, plain, build_model)  # refuses a checkpoint missing a tensor of its model
    found = linears
    notes: list[str] = []
    stack_types = model_types(source.config) & STACKED_EXPERT_MODEL_TYPES
    fmt_stacked = getattr(fmt, "supports_stacked_experts", True)

    excluded: dict[str, str] = {}
    candidates: list[Member] = []
    for name, info in plain.items():
        stacked = len(info.shape) == 3 and bool(STACKED_EXPERT_TENSOR.search(info.name))
        if not (_is_linear_weight(info) or stacked):
            if info.name.endswith(".weight") and fusion_key(info.name[: -len(".weight")]):
                # a fusion-group member that is no 2-D Linear weight: its partners stay unquantized too
                excluded[info.name[: -len(".weight")]] = f"{len(info.shape)}-D weight, not a Linear"
            continue
        # A stacked tensor's outputs extend its own name; exclusion lists name its experts module.
        module = info.name if stacked else info.name[: -len(".weight")]
        owner = module.rpartition(".")[0] if stacked else module
        reason = default_exclusion(owner, source.config) or found.reason(info.name)
        if reason is None and (matches(owner, excludes) or matches(module, excludes)):
            reason = "--exclude"
        coded = encoded.get(name)
        if reason is None and stacked and not stack_types:
            reason = "3-D expert stack of unknown layout (only GPT-OSS / Llama-4 [E, in, out] stacks are quantized)"
        if reason is None and stacked and not fmt_stacked:
            reason = f"stacked experts have no {fmt.name} layout"
        if reason is None and info.dtype not in QUANTIZABLE_DTYPES:
            raise SourceError(
                f"{info.path}: tensor {info.name!r} has dtype {info.dtype}; only BF16, F16 and F32 weights "
                "(or FP8 with weight_scale_inv blocks) can be quantized (use --exclude to keep it)"
            )
        in_features = info.shape[1]
        if reason is None and in_features % BLOCK:
            reason = f"in_features {in_features} is not a multiple of {BLOCK}"
        if reason is None and 0 in info.shape:
            reason = "empty"
        if reason:
            excluded[owner] = reason
        else:
            candidates.append(Member(module, source.tensors[name], encoded=coded, stacked=stacked))
    # A stack's gate_up_proj and down_proj are listed under one experts module: both or neither.
    candidates = [m for m in candidates if not (m.stacked and m.module.rpartition(".")[0] in excluded)]

    # Fusion groups: all members quantized, or none.
    groups: dict[str, list[Member]] = {}
    for m in candidates:
        groups.setdefault(fusion_key(m.module) or m.module, []).append(m)
    for module, reason in list(excluded.items()):
        key = fusion_key(module)
        if key and key in groups:
            for m in groups.pop(key):
                excluded[m.module] = f"fusion group member {module} is excluded ({reason})"

    w4a4 = bool(amax and amax.has_input_amax)
    if recipe is not None:
        mixed.apply(recipe, groups, excluded, w4a4, amax is not None)

    if not groups:
        notes.append("nothing to quantize: a conversion is refused (its output would be no NVFP4 checkpoint)")
    if amax is not None:
        check_amax_modules(source, amax)

    # Saved amax: every quantized module needs what the chosen method reads from the file.
    for members in groups.values():
        for m in members:
            m.amax = amax.get(m.module) if amax else None
    synthesized = []
    if amax is not None:
        synthesized = uncalibrated.synthesize([m for ms in groups.values() for m in ms], amax, scales, w4a4,
                                              strict=strict_amax)
        if synthesized:
            notes.append(f"synthesized amax for {len(synthesized)} uncalibrated expert modules (no or zero amax "
                         f"in the file), e.g. {synthesized[0].module}; --strict-amax refuses instead")
    for members in groups.values():
        for m in members:
            check_amax(m, amax, scales, w4a4)

    quantized_names = {m.weight.name for ms in groups.values() for m in ms}
    by_codes = {w.data.name: w for w in encoded.values()}
    units: list[Unit] = []
    for members in groups.values():
        units.append(Unit(members=sorted(members, key=lambda m: fusion_rank(m.module))))
    for info in source.tensors.values():
        if info.name in quantized_names or info.name in dropped:
            continue
        if info.name in by_codes:  # an excluded encoded weight: written dequantized, as bf16
            units.append(Unit(dequant=by_codes[info.name]))
        else:
            units.append(Unit(copy=info))
    order = {p: i for i, p in enumerate(source.shards)}
    units.sort(key=lambda u: (order[u.first.path], u.first.offset))

    # KV-cache scales ride with the unit holding the attention's k_proj.
    kv_cache = False
    kv_attentions: list[str] = []
    kv_missing: list[str] = []
    if amax is not None and amax.kv and not getattr(fmt, "supports_kv_cache", True):
        notes.append(f"the amax file's k/v cache amax are not used: the {fmt.name} output has no FP8 KV-cache scales")
    elif amax is not None and amax.kv:
        by_module = {m.module: u for u in units for m in u.members}
        kv_attentions, attentions = check_kv_amax(source, amax)
        kv_cache = bool(kv_attentions)
        kv_missing = sorted(attentions - set(kv_attentions))
        if kv_missing:
            notes.append(f"FP8 KV-cache scales for {len(kv_attentions)} of {len(attentions)} attention modules "
                         f"(no usable k/v amax for {len(kv_missing)}, e.g. {kv_missing[0]})"
                         + ("; declared per layer (kv_cache_quantized_layers)" if kv_cache else
                            "; no FP8 KV cache declared"))
        for attention in kv_attentions:
            kv = amax.kv[attention]
            unit = by_module.get(f"{attention}.k_proj")
            if unit is None:
                unit = Unit(copy=None)
                units.append(unit)
            unit.extra.update(fmt.kv_scales(attention, kv["k"], kv["v"]))

    for u in units:
        if u.copy is not None:
            u.outputs = [PlannedTensor(u.copy.name, u.copy.dtype, u.copy.shape)]
        if u.dequant is not None:
            u.outputs = [PlannedTensor(u.dequant.name, encodings.DEQUANT_DTYPE_NAME, u.dequant.shape)]
        for m in u.members:
            u.outputs += mixed.member_outputs(fmt, m, w4a4)
        for name, t in u.extra.items():
            u.outputs.append(PlannedTensor(name, fmt.dtype_name(t), tuple(t.shape)))

    _check_output_names(units)
    # Output shards, filled in processing order.
    shard_tensors: list[list[PlannedTensor]] = [[]]
    size = 0
    for u in units:
        if size and size + u.out_bytes > max_shard_size:
            shard_tensors.append([])
            size = 0
        u.shard = len(shard_tensors) - 1
        shard_tensors[-1].extend(u.outputs)
        size += u.out_bytes
    n = len(shard_tensors)
    if n == 1:
        shard_names = ["model.safetensors"]  # as save_pretrained (and ModelOpt) name a single shard
    else:
        shard_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    if encoding.note():
        notes.append(encoding.note())
    return Plan(source, units, shard_names, shard_tensors, excluded, scales, w4a4, kv_cache, fmt.name,
                notes=notes, encoding=encoding, linears=found, synthesized=synthesized, kv_attentions=kv_attentions,
                kv_missing=kv_missing, recipe=recipe)


def _check_output_names(units: list[Unit]) -> None:
    """Two planned output tensors of one name (a stray ``q_proj.weight_scale`` kept beside the
    ``q_proj`` that writes one) would make a checkpoint an engine loads either way: refused."""
    seen: dict[str, Unit] = {}
    for u in units:
        for t in u.outputs:
            other = seen.setdefault(t.name, u)
            if other is not u:
                src = next((x for x in (u.copy, other.copy) if x is not None), u.first)
                raise SourceError(f"{src.path}: tensor {t.name!r} would be written twice: the source holds it and "
                                  "shardconv also writes it for a quantized module (a stray tensor of an earlier "
                                  "quantization?)")


def check_quantizes(plan: Plan) -> None:
    """Refuse a plan that quantizes nothing (``--exclude '*'``, GPT-2's Conv1D projections): its output
    would carry an NVFP4 quant_algo over no NVFP4 tensor."""
    if plan.quantized:
        return
    reasons = Counter(plan.excluded.values())
    why = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3)) or "no 2-D Linear weights"
    raise SourceError(f"{plan.source.root}: nothing to quantize, so no NVFP4 checkpoint would result "
                      f"(every Linear weight is kept: {why})")
