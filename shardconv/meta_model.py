"""The config's model built on the meta device, and what it says about its tensors.

Why a module of its own: linears.py decides which checkpoint tensors are Linear weights; building
the model transformers would load (its class, the config without quantization settings, no weights,
remote code only when asked), and reading from it each tensor's module class, ties, load-time renames
and what a complete checkpoint holds, is the part that imports transformers and can fail in any way
a model's ``__init__`` can (every failure is a :class:`Fallback` or an exception linears.find turns
into the name rules).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import warnings

from . import layouts
from .source import Source


# One meta model per config and process (tests and the fuzzer plan the same config thousands of times).
BUILT: dict = {}
BUILT_KEPT = 8


def build(source: Source, trust_remote_code: bool):
    """The config's meta model's ModelTensors and its class name, cached; Fallback says why there is none."""
    import_transformers()  # every time: a cached model is not used once transformers cannot be imported
    remote = trust_remote_code and "auto_map" in source.config  # the folder's own code decides the model
    key = (json.dumps(source.config, sort_keys=True, default=str), str(source.root) if remote else None)
    if key not in BUILT:
        model, name = _meta_model(source, trust_remote_code)
        while len(BUILT) >= BUILT_KEPT:
            BUILT.pop(next(iter(BUILT)))
        BUILT[key] = (ModelTensors(model), name)
    return BUILT[key]


def import_transformers():
    with _quiet():
        try:
            import transformers
        except ImportError:
            raise Fallback("transformers not installed") from None
        except Exception as e:
            raise Fallback(f"transformers failed to import: {one_line(e)}") from None
    return transformers


class Fallback(Exception):
    """Why the name rules are used (transformers missing, unknown model_type, remote code)."""


def one_line(e: BaseException) -> str:
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
    """The config's model on the meta device and its class name; Fallback says why there is none."""
    config = source.config
    model_type = config.get("model_type")
    for part in [config] + [config[k] for k in ("text_config", "language_config", "llm_config") if isinstance(config.get(k), dict)]:
        for key, limit in layouts.MAX_COUNTS.items():  # a meta model that size takes minutes: name rules
            if isinstance(part.get(key), int) and part[key] > limit:
                raise Fallback(f"{key} {part[key]} is too large to build its model")
    transformers = import_transformers()
    with _quiet():
        import torch
        from transformers import AutoConfig

        version = getattr(transformers, "__version__", "?")
        remote = "auto_map" in config
        if trust_remote_code and remote:
            try:
                cfg = AutoConfig.from_pretrained(str(source.root), trust_remote_code=True)
            except Exception as e:
                raise Fallback(f"its remote config could not be loaded: {one_line(e)}") from None
        else:
            if not isinstance(model_type, str) or not model_type:
                raise Fallback("config.json has no model_type")
            try:
                cfg = AutoConfig.for_model(**_config_kwargs(config))
            except Exception as e:
                why = f"model_type {model_type!r} unknown to transformers {version}"
                if remote:
                    why += " (its remote code runs only with --trust-remote-code)"
                elif not isinstance(e, (ValueError, KeyError)):
                    why = f"its config could not be built: {one_line(e)}"
                raise Fallback(why) from None
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
    raise Fallback(f"no model class for it: {one_line(last)}")


class ModelTensors:
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
        state = model.state_dict()
        self.expected = set(state.keys())  # parameters and persistent buffers, ties included
        self.shapes: dict[str, tuple[int, ...]] = {k: tuple(v.shape) for k, v in state.items()}
        self.tied = _ties(model)
        ignore = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
        self.optional = {n for n in self.expected if n in self.tied or any(re.search(p, n) for p in ignore)}
        # renamer None: transformers' load-time mapping unusable; targets None: no converter splits (_renamer)
        self.renamer, self.targets = _renamer(model, self.expected)


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
    """(rename, targets) through transformers' load-time mapping, or (None, None).

    ``rename``: checkpoint name -> (model name, merged). transformers 5 renames some checkpoint keys
    (Mixtral's ``block_sparse_moe`` -> ``mlp``) and merges others (per-expert ``w1``/``w3`` ->
    ``experts.gate_up_proj``) when it loads; ``merged`` is True for the latter. ``targets``: every
    model name a converted tensor feeds, None when no converter has several: one that has (ERNIE-4.5-VL-MoE
    splits its experts into ``text_moe`` and ``vision_moe`` stacks, Sarvam-MoE its ``query_key_value``)
    is named by its first target in ``rename``, as transformers does before the converter writes them
    all. Its API is not a stable one: any failure gives None (exact names only), or the renamed name
    alone for ``targets``.
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

        def targets(name: str) -> tuple[str, ...]:
            new, merged = rename(name)
            try:
                return _split_targets(name, new, renamings, converters) if merged else (new,)
            except Exception:
                return (new,)

        rename("model.layers.0.self_attn.q_proj.weight")  # fails here, not halfway through a checkpoint
        return rename, (targets if any(len(c.target_patterns) > 1 for c in converters) else None)
    except Exception:
        return None, None


def _split_targets(name: str, new: str, renamings: list, converters: list) -> tuple[str, ...]:
    """``new`` (``name`` renamed to its converter's first target) and the converter's other targets,
    named as transformers names a converter's outputs: its first target pattern in ``new`` replaced by
    each (``WeightConverter.convert``)."""
    from transformers.core_model_loading import apply_renamings

    key = apply_renamings(name, renamings)  # the converter apply_converters picks: the first that matches
    converter = next((c for c in converters if c.rename_source_key(key)[1] is not None), None)
    patterns = [str(p) for p in getattr(converter, "target_patterns", None) or []]
    if len(patterns) < 2 or patterns[0] not in new:
        return (new,)
    head, _, tail = new.partition(patterns[0])
    return tuple(head + p + tail for p in patterns)
