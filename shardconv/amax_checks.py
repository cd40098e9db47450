"""Checks of a saved amax file against the checkpoint and the plan, before any tensor is read.

Why a module of its own: an amax file from another model, of other shapes, or with unusable
entries must be refused with one line naming the file and entry; these are the rules for that,
apart from the plan they guard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .amax import AmaxFile
from .errors import AmaxError
from .module_rules import attention_modules, module_names
from .numerics import BLOCK, FP8_MAX
from .source import Source

if TYPE_CHECKING:
    from .planning import Member


def check_amax(m: Member, amax: AmaxFile | None, scales: str, w4a4: bool) -> None:
    """A quantized member has the amax that ``scales`` and ``w4a4`` read, of the shape its weight
    needs, with static block amax within the global amax: else one line naming file and module."""
    where = f"{amax.path}: module {m.module}" if amax else m.module
    a = m.amax
    if w4a4 and (a is None or a.input is None):
        raise AmaxError(f"{where}: no input_quantizer._amax (the file has activation amax for other modules)")
    if scales != "amax":
        return
    if a is not None and a.from_weights:  # an uncalibrated expert's, made from its weights (uncalibrated.py)
        return
    if a is None or a.weight is None:
        raise AmaxError(f"{where}: no weight_quantizer._amax")
    n_blocks = m.out_features * (m.in_features // BLOCK) * (m.experts or 1)
    if a.static:
        if a.weight.numel() != n_blocks:
            raise AmaxError(
                f"{where}: weight_quantizer._amax has {a.weight.numel()} values, expected {n_blocks} "
                f"(one per 16-element block of {m.weight.name} {list(m.weight.shape)})"
            )
        # ModelOpt's static block amax never exceed the global amax (beyond fp32 rounding); one that does
        # would be clamped to the e4m3 maximum and its block written with the wrong scale
        if bool(a.weight.max() > a.global_amax * (1 + 2.0**-16)):
            raise AmaxError(f"{amax.path}: entry {amax.key(m.module)!r}: a static block amax "
                                 f"({float(a.weight.max()):.6g}) is above the module's global amax "
                                 f"({float(a.global_amax):.6g})")
    elif a.weight.numel() != 1:
        if a.weight.numel() == n_blocks:
            raise AmaxError(f"{where}: per-block weight_quantizer._amax without _global_amax")
        raise AmaxError(f"{where}: weight_quantizer._amax has shape {list(a.weight.shape)}, expected a scalar")


def check_amax_modules(source: Source, amax: AmaxFile) -> None:
    """Every module the amax file names must be in the checkpoint (under the names checkpoints or
    transformers-5 models give it): a file of another model, or of more layers, is refused."""
    unknown = amax.unknown(module_names(source.tensors))
    if unknown is not None:
        raise AmaxError(f"{amax.path}: entry {amax.key(unknown)!r} is for module {unknown}, which "
                             f"{source.root} does not have (an amax file of another model?)")


def check_kv_amax(source: Source, amax: AmaxFile) -> tuple[list[str], set[str]]:
    """KV-cache scales only for attention modules that exist, and usable: returns the attention
    modules whose k and v amax give FP8 scales, sorted, and every attention module of the model. A
    zero k or v amax (an attention the calibration never ran) gives none: that module is left out."""
    attentions = attention_modules(source.tensors, source.config)
    usable = []
    for attention, kv in sorted(amax.kv.items()):
        key = amax.key(attention)
        if set(kv) != {"k", "v"}:
            raise AmaxError(f"{amax.path}: {attention}: has only {sorted(kv)} bmm amax, needs k and v")
        if attention not in attentions:
            raise AmaxError(f"{amax.path}: entry {key!r}: {attention} is not an attention module of "
                                 f"{source.root} (no {attention}.k_proj weight)")
        # a zero amax (an attention that saw no tokens) would divide by zero: no scale for it
        if all(float(value) / FP8_MAX >= 2.0**-126 for value in kv.values()):
            usable.append(attention)
    return usable, attentions
