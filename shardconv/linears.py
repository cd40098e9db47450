"""Which checkpoint tensors are ``nn.Linear`` weights, and which tensors the config's model expects.

Why: names alone quantized BERT's ``embeddings.position_embeddings``. When transformers is importable,
the model is built from config.json on the meta device (meta_model.py: no weights, no memory, no remote
code unless asked), and each 2-D ``.weight`` tensor is classified by the class of the module that holds it: an
``nn.Linear`` may be quantized, an embedding or any other module is kept. Tensors the model does not
name (transformers 5 merges per-expert MoE weights into fused 3-D parameters at load time) are left to
the name rules (module_rules.py, applied by planning.py) and counted. Anything that goes wrong here falls back to the name rules, with
the reason recorded for ``--dry-run``. A checkpoint that is exactly its family's layout (layouts.py)
needs no model: the test suite proves the name rules plan it as the model does.

The model also says what a complete checkpoint holds: a tensor it expects that no shard holds, or one
of another shape, is a broken download or a config that does not describe the checkpoint, refused
before anything is written (see :func:`_check_missing` for when that is trusted).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field

from . import layouts, meta_model, profile
from .errors import SourceError
from .files import INDEX_NAME
from .safetensors_io import TensorInfo, _short
from .source import Source

# The missing-tensor check runs only when at least this share of the checkpoint's tensors are the
# model's own (directly, or through transformers' load-time renamings and merges).
MATCH_SHARE = 0.9
# Checkpoint tensors that are no model parameter even when the layout matches: FP8 block scales.
_SCALE_SUFFIXES = ("_scale_inv", ".input_scale")
# Without a model: transformers' Conv1D stores [in, out] (a Linear's transpose); these families use it
# for every projection, so their 2-D weights are kept by name too (quantizing them would be garbage).
_CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "decision_transformer", "imagegpt", "clvp"}
_CONV1D_LEAVES = {"c_attn", "q_attn", "c_fc", "c_proj"}


# Helper processes started by the command line (linears_helper.Helper), asked first by find().
HELPERS: list = []


@dataclass
class Linears:
    """How each checkpoint tensor's module was found, for planning.py and the --dry-run line."""

    method: str  # "model": from the meta-device model; "layout": exactly a known family's layout (layouts.py),
    # the name rules decide as the model would; "names": the name rules (module_rules.py, applied by planning.py) alone
    why: str  # the model class, or why the name rules are used
    classes: dict[str, str] = field(default_factory=dict)  # tensor -> class of the module holding it
    tied: dict[str, str] = field(default_factory=dict)  # tensor -> the tensor it is tied to at load
    merged: int = 0  # tensors transformers merges at load (fused experts): left to the name rules
    unnamed: int = 0  # 2-D .weight tensors the model does not name at all: left to the name rules
    conv1d: bool = False  # name rules for a Conv1D family (GPT-2): its projections are no Linear

    def reason(self, name: str) -> str | None:
        """Why the 2-D weight ``name`` is never quantized according to the model, or None (a Linear,
        or a tensor the model does not name: the name rules decide)."""
        parts = name.split(".")
        if self.conv1d and len(parts) > 1 and parts[-2] in _CONV1D_LEAVES:
            return "not a Linear (Conv1D, by name)"
        cls = self.classes.get(name)
        if cls is None or cls == "Linear":
            if cls is not None and name in self.tied:
                return f"tied to {self.tied[name]}"
            return None
        if cls == "Embedding":
            return "embedding"
        return f"not a Linear ({cls})"

    def describe(self) -> str:
        """One line: which way Linear layers were found, and what the model says the 2-D weights are."""
        if self.method == "layout":
            return (f"by name rules: every tensor is where {self.why} puts it (layouts.py), "
                    "for which they plan as the model does (the model not built)")
        if self.method != "model":
            return f"by name rules ({self.why})"
        counts = Counter(self.classes.values())
        parts = [f"{n} {cls}" for cls, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        if self.merged:
            parts.append(f"{self.merged} converted by transformers at load (e.g. fused experts): by name rules")
        if self.unnamed:
            parts.append(f"{self.unnamed} not in the model: by name rules")
        return f"from the transformers model ({self.why} on the meta device): " + ", ".join(parts or ["no 2-D weights"])


class NoAnswer(Exception):
    """:func:`find` was asked for a helper's answer only, and no helper gave one."""


def find(source: Source, trust_remote_code: bool = False, tensors: dict[str, TensorInfo] | None = None,
         build: bool = True) -> Linears:
    """Classify the source's 2-D weights from its config's model; name rules when that cannot be done.

    ``tensors``: the checkpoint as a plain one would hold it (encodings/: an encoded weight under its
    plain name and shape, its scales left out); the source's own tensors by default. ``build=False``:
    a helper's answer or :class:`NoAnswer`, never the model built here (transformers changes
    process-wide state while it builds one: the default dtype, warning filters, log levels).
    Raises SourceError only for a tensor the model expects that no shard holds.
    """
    tensors = source.tensors if tensors is None else tensors
    found = by_layout(source, tensors, trust_remote_code)
    if found is not None:
        return found
    for helper in HELPERS:  # the same answer, found in a helper process (linears_helper.py)
        found = helper.answer(source, trust_remote_code, tensors)  # None: it saw other headers
        if found is not None:
            return found
    if not build:
        raise NoAnswer()
    try:
        layout, name = meta_model.build(source, trust_remote_code)
    except meta_model.Fallback as e:
        return by_names(source, str(e))
    except Exception as e:  # transformers raises anything from a model's __init__: never fatal here
        return by_names(source, f"the model could not be built: {meta_model.one_line(e)}")
    try:
        found, covered = _classify(tensors, layout)
    except Exception as e:
        return by_names(source, f"the model's modules could not be read: {meta_model.one_line(e)}")
    found.why = name
    _check_missing(source, tensors, layout, covered, name)
    return found


def by_names(source: Source, why: str) -> Linears:
    """the name rules (module_rules.py, applied by planning.py) alone, ``why`` saying why the model is not asked."""
    return Linears("names", why, conv1d=source.config.get("model_type") in _CONV1D_MODEL_TYPES)


def by_layout(source: Source, tensors: dict[str, TensorInfo] | None = None,
              trust_remote_code: bool = False) -> Linears | None:
    """The answer for a checkpoint that is exactly its family's layout (layouts.py), or None; a helper
    process still working is ended then (its answer is not needed). ``SHARDCONV_LAYOUTS=0``: never,
    the model decides every checkpoint."""
    if os.environ.get("SHARDCONV_LAYOUTS") == "0":
        return None
    tensors = source.tensors if tensors is None else tensors
    family = layouts.exact(source.config, tensors, trust_remote_code)
    if family is None:
        return None
    for helper in HELPERS:
        helper.close()
    profile.say(f"linears from the {family} layout {profile.process_age():.1f} s after process start")
    return Linears("layout", layouts.ARCHITECTURES[family])


def pending(trust_remote_code: bool = False) -> bool:
    """A helper process asked first by :func:`find` is still working: find would wait for it."""
    return any(helper.pending(trust_remote_code) for helper in HELPERS)


def _classify(tensors: dict[str, TensorInfo], layout: meta_model.ModelTensors) -> tuple[Linears, set[str]]:
    """Each 2-D weight's module class; and the model tensors the checkpoint supplies (``covered``)."""
    found = Linears("model", "")
    covered: set[str] = set()
    for info in tensors.values():
        name = info.name  # the plain name (an encoded weight's codes tensor has another)
        target, merged = name, False
        if name not in layout.classes and layout.renamer is not None:
            target, merged = layout.renamer(name)
        for t in _targets(layout, name, target, merged):  # a split converter's every target (ERNIE-4.5-VL)
            if t in layout.expected or t in layout.classes:
                covered.add(t)
        if not (name.endswith(".weight") and len(info.shape) == 2):
            continue
        if merged:
            found.merged += 1
        elif target in layout.classes:
            found.classes[name] = layout.classes[target]
            if target in layout.tied:
                found.tied[name] = layout.tied[target]
        else:
            found.unnamed += 1
    return found, covered


def _extra_layer(name: str, config: dict) -> bool:
    """An MTP layer past ``num_hidden_layers`` (DeepSeek-V3): on disk, but no part of the HF model."""
    if re.search(r"(^|\.)mtp\.", name):
        return True
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    layers = config.get("num_hidden_layers")
    return bool(m and config.get("num_nextn_predict_layers") and isinstance(layers, int) and int(m.group(1)) >= layers)


def _check_missing(source: Source, tensors: dict[str, TensorInfo], layout: meta_model.ModelTensors,
                   covered: set[str], model_name: str) -> None:
    """Refuse a checkpoint that lacks a tensor its model expects, when the model surely describes it.

    Trusted only when transformers' load-time mapping could be applied and at least MATCH_SHARE of
    the checkpoint's tensors (FP8 scales and MTP layers aside) are the model's own, directly or
    through that mapping: then the model is this checkpoint's model. Tied weights, the model's
    ``_keys_to_ignore_on_load_missing`` and non-persistent buffers are never required.
    """
    if layout.renamer is None:
        return
    relevant = [t.name for t in tensors.values()
                if not t.name.endswith(_SCALE_SUFFIXES) and not _extra_layer(t.name, source.config)]
    if not relevant:
        return
    own = 0
    for n in relevant:
        target = n if n in layout.classes else layout.renamer(n)[0]
        own += target in layout.expected or target in layout.classes
    if own < MATCH_SHARE * len(relevant):
        return
    _check_shapes(source, tensors, layout, model_name)
    missing = sorted(layout.expected - covered - layout.optional)
    if missing:
        index = source.root / INDEX_NAME
        where = index if index.is_file() else source.root
        more = f" ({len(missing)} tensors of the model are missing)" if len(missing) > 1 else ""
        raise SourceError(
            f"{where}: tensor {_short(missing[0])} of {model_name} is in no shard{more}: an incomplete "
            "download or index? (transformers would initialise it randomly)"
        )


_EXPERT = re.compile(r"\.experts\.\d+\.")


def _targets(layout, name: str, target: str, converted: bool) -> tuple[str, ...]:
    """The model tensors checkpoint tensor ``name`` becomes: ``target``, and for a load-time converter
    with several targets, the others it writes too (meta_model._renamer), which are not missing."""
    split = getattr(layout, "targets", None)
    return split(name) if converted and split is not None else (target,)


def _check_shapes(source: Source, tensors: dict[str, TensorInfo], layout: meta_model.ModelTensors,
                  model_name: str) -> None:
    """Refuse a tensor whose shape is not the one its model gives it, as transformers' loader does (a size
    mismatch) and engines do: the config does not describe this checkpoint (a second expert-count key
    read in place of the first, sizes edited), and an output written from it would not load.

    A tensor transformers merges at load (per-expert weights into one fused parameter) is checked by
    size: the experts' sizes must add up to the merged parameters' (all the targets of their converter:
    ERNIE-4.5-VL-MoE's experts are split into a text and a vision stack), so one expert more or fewer
    than the config says is refused too (its name alone, covered by the other experts, passed). Only
    per-expert sources are summed: another load-time converter may split a tensor, where sums differ.
    """
    merged: dict[tuple[str, ...], int] = Counter()
    first: dict[tuple[str, ...], TensorInfo] = {}
    for info in tensors.values():
        name = info.name
        if name.endswith(_SCALE_SUFFIXES) or _extra_layer(name, source.config):
            continue
        target, converted = name, False
        if layout.renamer is not None:  # a converter wins even for a model key (Qwen3-VL-MoE transposes its
            renamed, by_converter = layout.renamer(name)  # expert stacks under the same name at load)
            if by_converter or name not in layout.shapes:
                target, converted = renamed, by_converter
        want = layout.shapes.get(target)
        if want is None:
            continue
        if not converted:
            if tuple(info.shape) != want:
                raise SourceError(f"{info.path}: tensor {_short(name)} has shape {_short(list(info.shape))} but "
                                  f"{model_name} (from config.json) expects {list(want)}: the config does not "
                                  "describe this checkpoint (transformers would refuse to load it)")
        elif _EXPERT.search(name):
            group = _targets(layout, name, target, True)
            merged[group] += math.prod(info.shape)
            first.setdefault(group, info)
    for group, size in sorted(merged.items()):
        if any(t not in layout.shapes for t in group):
            continue  # a target the model does not have: nothing to compare with
        want = sum(math.prod(layout.shapes[t]) for t in group)
        if size != want:
            info = first[group]
            shapes = " + ".join(str(list(layout.shapes[t])) for t in group)
            raise SourceError(f"{info.path}: tensor {_short(info.name)} and the other experts merged into "
                              f"{' and '.join(_short(t) for t in group)} hold {size} values but {model_name} "
                              f"(from config.json) expects {want} ({shapes}): one expert more or fewer than "
                              "the config says (transformers would refuse to load it)")
