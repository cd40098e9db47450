"""Which checkpoint tensors are ``nn.Linear`` weights, and which tensors the config's model expects.

Why: names alone quantized BERT's ``embeddings.position_embeddings``. When transformers is importable,
the model is built from config.json on the meta device (no weights, no memory, no remote code unless
asked), and each 2-D ``.weight`` tensor is classified by the class of the module that holds it: an
``nn.Linear`` may be quantized, an embedding or any other module is kept. Tensors the model does not
name (transformers 5 merges per-expert MoE weights into fused 3-D parameters at load time) are left to
the name rules (module_rules.py, applied by planning.py) and counted. Anything that goes wrong here falls back to the name rules, with
the reason recorded for ``--dry-run``. A checkpoint that is exactly its family's layout (layouts.py)
needs no model: the test suite proves the name rules plan it as the model does.

The model also says what a complete checkpoint holds: a tensor it expects that no shard holds is a
broken download, refused before anything is written (see :func:`_check_missing` for when that is
trusted).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field

from . import layouts, profile
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
# Counts beyond any real model (the largest have ~100 layers, ~500 experts): a meta model that size
# would take minutes to build, so such a config gets the name rules.
_MAX_COUNTS = {"num_hidden_layers": 1024, "num_layers": 1024, "n_layer": 1024, "num_experts": 8192,
               "n_routed_experts": 8192, "num_local_experts": 8192}


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
        layout, name = _layout(source, trust_remote_code)
    except _Fallback as e:
        return by_names(source, str(e))
    except Exception as e:  # transformers raises anything from a model's __init__: never fatal here
        return by_names(source, f"the model could not be built: {_one_line(e)}")
    try:
        found, covered = _classify(tensors, layout)
    except Exception as e:
        return by_names(source, f"the model's modules could not be read: {_one_line(e)}")
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


# One meta model per config and process (tests and the fuzzer plan the same config thousands of times).
_LAYOUTS: dict = {}
_LAYOUTS_KEPT = 8


def _layout(source: Source, trust_remote_code: bool):
    """The cached _Layout of the config's meta model and its class name; _Fallback says why there is none."""
    _import_transformers()  # every time: a cached model is not used once transformers cannot be imported
    remote = trust_remote_code and "auto_map" in source.config  # the folder's own code decides the model
    key = (json.dumps(source.config, sort_keys=True, default=str), str(source.root) if remote else None)
    if key not in _LAYOUTS:
        model, name = _meta_model(source, trust_remote_code)
        while len(_LAYOUTS) >= _LAYOUTS_KEPT:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        _LAYOUTS[key] = (_Layout(model), name)
    return _LAYOUTS[key]


def _import_transformers():
    with _quiet():
        try:
            import transformers
        except ImportError:
            raise _Fallback("transformers not installed") from None
        except Exception as e:
            raise _Fallback(f"transformers failed to import: {_one_line(e)}") from None
    return transformers


class _Fallback(Exception):
    """Why the name rules are used (transformers missing, unknown model_type, remote code)."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


@contextlib.contextmanager
def _quiet():
    """No transformers log lines or warnings while the meta model is built."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging = None
        try:
            from transformers.utils import logging
            level = logging.get_verbosity()
            logging.set_verbosity_error()
        except Exception:
            logging = None
        try:
            yield
        finally:
            if logging is not None:
                logging.set_verbosity(level)


def _config_kwargs(config: dict) -> dict:
    """config.json without quantization settings: a meta model needs none, and a quantizer must not run."""
    # a deep copy: transformers' config classes write into nested dicts (rope_scaling gains rope_theta),
    # which would change the source config this run writes into DST
    out = copy.deepcopy({k: v for k, v in config.items() if k != "quantization_config"})
    for key in ("text_config", "language_config", "llm_config"):
        if isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items() if k != "quantization_config"}
    return out


def _meta_model(source: Source, trust_remote_code: bool):
    """The config's model on the meta device and its class name; _Fallback says why there is none."""
    config = source.config
    model_type = config.get("model_type")
    for part in [config] + [config[k] for k in ("text_config", "language_config", "llm_config") if isinstance(config.get(k), dict)]:
        for key, limit in _MAX_COUNTS.items():
            if isinstance(part.get(key), int) and part[key] > limit:
                raise _Fallback(f"{key} {part[key]} is too large to build its model")
    transformers = _import_transformers()
    with _quiet():
        import torch
        from transformers import AutoConfig

        version = getattr(transformers, "__version__", "?")
        remote = "auto_map" in config
        if trust_remote_code and remote:
            try:
                cfg = AutoConfig.from_pretrained(str(source.root), trust_remote_code=True)
            except Exception as e:
                raise _Fallback(f"its remote config could not be loaded: {_one_line(e)}") from None
        else:
            if not isinstance(model_type, str) or not model_type:
                raise _Fallback("config.json has no model_type")
            try:
                cfg = AutoConfig.for_model(**_config_kwargs(config))
            except Exception as e:
                why = f"model_type {model_type!r} unknown to transformers {version}"
                if remote:
                    why += " (its remote code runs only with --trust-remote-code)"
                elif not isinstance(e, (ValueError, KeyError)):
                    why = f"its config could not be built: {_one_line(e)}"
                raise _Fallback(why) from None
        with torch.device("meta"):
            if trust_remote_code and remote:
                model = _from_auto(transformers, cfg, trust_remote_code=True)
            else:
                model = _from_architectures(transformers, cfg, config.get("architectures") or [])
                if model is None:
                    model = _from_auto(transformers, cfg, trust_remote_code=False)
    return model, type(model).__name__


def _from_architectures(transformers, cfg, architectures: list):
    """The class config.json names, when transformers has it (BertForMaskedLM, not the Auto default)."""
    from transformers import PreTrainedModel

    for arch in architectures:
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            try:
                return cls(cfg)
            except Exception:  # e.g. a class that does not fit this config: the Auto classes decide
                return None
    return None


def _from_auto(transformers, cfg, trust_remote_code: bool):
    last: Exception | None = None
    for auto in ("AutoModelForCausalLM", "AutoModel"):
        try:
            return getattr(transformers, auto).from_config(cfg, trust_remote_code=trust_remote_code)
        except Exception as e:
            last = e
    raise _Fallback(f"no model class for it: {_one_line(last)}")


class _Layout:
    """The meta model's tensors: what it expects on disk, the module class of each, ties and renames."""

    def __init__(self, model):
        import torch.nn as nn

        self.model = model
        self.classes: dict[str, str] = {}  # parameter / persistent buffer -> module class category
        for mod_name, mod in model.named_modules(remove_duplicate=False):
            persistent = [n for n, _ in mod.named_buffers(recurse=False)
                          if n not in getattr(mod, "_non_persistent_buffers_set", set())]
            names = [n for n, _ in mod.named_parameters(recurse=False, remove_duplicate=False)] + persistent
            for n in names:
                self.classes[f"{mod_name}.{n}" if mod_name else n] = _category(mod, nn)
        self.expected = set(model.state_dict().keys())  # parameters and persistent buffers, ties included
        self.tied = _ties(model)
        ignore = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
        self.optional = {n for n in self.expected if n in self.tied or any(re.search(p, n) for p in ignore)}
        self.renamer = _renamer(model, self.expected)  # None: transformers' load-time mapping unusable


def _category(mod, nn) -> str:
    """``Linear`` for nn.Linear and subclasses, ``Embedding`` for embeddings, else the class name."""
    if isinstance(mod, nn.Linear):
        return "Linear"
    name = type(mod).__name__
    if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) or "Embedding" in name:
        return "Embedding"
    return name


def _ties(model) -> dict[str, str]:
    ties = getattr(model, "all_tied_weights_keys", None)
    if not isinstance(ties, dict):
        ties = getattr(model, "_tied_weights_keys", None) if getattr(model.config, "tie_word_embeddings", False) else None
    if not isinstance(ties, dict):
        return {}
    return {str(k): str(v) for k, v in ties.items()}


def _renamer(model, expected: set):
    """checkpoint name -> (model name, merged) through transformers' load-time mapping, or None.

    transformers 5 renames some checkpoint keys (Mixtral's ``block_sparse_moe`` -> ``mlp``) and merges
    others (per-expert ``w1``/``w3`` -> ``experts.gate_up_proj``) when it loads; ``merged`` is True
    for the latter. Its API is not a stable one: any failure gives None (exact names only).
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        prefix = getattr(model, "base_model_prefix", None) or None
        meta = dict.fromkeys(expected, True)

        def rename(name: str) -> tuple[str, bool]:
            try:
                new, pattern = rename_source_key(name, renamings, converters, prefix, meta)
            except Exception:  # a name its regexes trip over: taken as it is
                return name, False
            return str(new), pattern is not None

        rename("model.layers.0.self_attn.q_proj.weight")  # fails here, not halfway through a checkpoint
        return rename
    except Exception:
        return None


def _classify(tensors: dict[str, TensorInfo], layout: _Layout) -> tuple[Linears, set[str]]:
    """Each 2-D weight's module class; and the model tensors the checkpoint supplies (``covered``)."""
    found = Linears("model", "")
    covered: set[str] = set()
    for info in tensors.values():
        name = info.name  # the plain name (an encoded weight's codes tensor has another)
        target, merged = name, False
        if name not in layout.classes and layout.renamer is not None:
            target, merged = layout.renamer(name)
        if target in layout.expected or target in layout.classes:
            covered.add(target)
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


def _check_missing(source: Source, tensors: dict[str, TensorInfo], layout: _Layout, covered: set[str],
                   model_name: str) -> None:
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
    missing = sorted(layout.expected - covered - layout.optional)
    if missing:
        index = source.root / INDEX_NAME
        where = index if index.is_file() else source.root
        more = f" ({len(missing)} tensors of the model are missing)" if len(missing) > 1 else ""
        raise SourceError(
            f"{where}: tensor {_short(missing[0])} of {model_name} is in no shard{more}: an incomplete "
            "download or index? (transformers would initialise it randomly)"
        )
