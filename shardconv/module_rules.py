"""Module rules: which Linear modules are kept in source precision by default, how ``--exclude``
patterns match module names, and which modules form fusion groups (FORMAT.md §3, §4).

Why a module of its own: planning applies these rules, and verify applies the same ones to a
finished output (its exclusion, KV-layer and fusion-group checks), so both read them from here.
"""

from __future__ import annotations

import fnmatch
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .source import Source

# weight dtypes that can be quantized; a Linear weight of another dtype is refused unless excluded
QUANTIZABLE_DTYPES = ("BF16", "F16", "F32")
FUSION_SETS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
)
# embeddings by name (the fallback when no meta model says so): BERT's position/token_type_embeddings too
EMBEDDING_NAME = re.compile(r"(^|\.)(embed_tokens|\w*embeddings?|embed_positions|tok_embeddings|wte|wpe)$")
_ROUTER_LEAVES = {"gate", "router", "shared_expert_gate"}
_TOWERS = {"visual", "vision_tower", "vision_model", "vision_encoder", "multi_modal_projector", "mm_projector",
           "audio_tower", "audio_model"}
# Stacked ("BMM-style") experts ModelOpt exports transposed (FORMAT.md §5): [E, in, out] on disk.
STACKED_EXPERT_MODEL_TYPES = {"gpt_oss", "llama4", "llama4_text"}
STACKED_EXPERT_TENSOR = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


def model_types(config: dict) -> set:
    """The config's ``model_type`` and its text/language model's (multimodal configs nest it)."""
    types = {config.get("model_type")}
    for key in ("text_config", "language_config", "llm_config"):
        if isinstance(config.get(key), dict):
            types.add(config[key].get("model_type"))
    return types


def excluded_subtree(module: str, config: dict) -> str | None:
    """The root of the MTP layer or vision/audio tower holding ``module``: a subtree kept whole.

    Exclusion lists name such a subtree as ``root.*`` (FORMAT.md §4): engines rename modules inside
    it (vLLM's DeepSeek MTP adds ``mtp_block``), so exact names would miss, and a bare prefix would
    also hit ``model.layers.10`` when excluding ``model.layers.1``.
    """
    parts = module.split(".")
    for i, p in enumerate(parts):
        if p in _TOWERS or p == "mtp":
            return ".".join(parts[: i + 1])
    num_layers = config.get("num_hidden_layers")
    if (config.get("num_nextn_predict_layers") or 0) and num_layers is not None:
        for i, p in enumerate(parts[:-1]):
            if p == "layers" and parts[i + 1].isdigit() and int(parts[i + 1]) >= num_layers:
                return ".".join(parts[: i + 2])
    return None


def default_exclusion(module: str, config: dict) -> str | None:
    """Why a Linear module is kept in source precision by default (FORMAT.md §4), or None."""
    parts = module.split(".")
    if parts[-1] == "lm_head" or module == "lm_head":
        return "lm_head"
    if EMBEDDING_NAME.search(module):
        return "embedding"
    if parts[-1] in _ROUTER_LEAVES:
        return "router"
    if excluded_subtree(module, config) is not None:  # a tower or an MTP layer, kept whole
        return "vision/audio tower" if _TOWERS.intersection(parts) else "MTP layer"
    return None


def matches(module: str, patterns: list[str]) -> bool:
    """``--exclude`` patterns: globs over module names; a plain name also covers its subtree."""
    return any(fnmatch.fnmatchcase(module, p) or fnmatch.fnmatchcase(module, p + ".*") for p in patterns)


def fusion_rank(module: str) -> tuple[str, int]:
    """Sort key putting group members in their conventional order (q, k, v; gate, up)."""
    parent, _, leaf = module.rpartition(".")
    for members in FUSION_SETS:
        if leaf in members:
            return (parent, members.index(leaf))
    return (module, 0)


def fusion_key(module: str) -> str | None:
    """The fusion group ``module`` belongs to, as ``parent.{q_proj,k_proj,v_proj}``; None for a lone Linear."""
    parent, _, leaf = module.rpartition(".")
    for members in FUSION_SETS:
        if leaf in members:
            return f"{parent}.{{{','.join(members)}}}"
    return None


def module_names(tensor_names) -> set[str]:
    """Every module a checkpoint's tensor names imply: each dotted prefix, and each name itself (a
    stacked expert tensor is a module of its own)."""
    modules: set[str] = set()
    for name in tensor_names:
        parts = name.split(".")
        modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return modules


def unmatched_excludes(source: Source, patterns: list[str]) -> list[str]:
    """The ``--exclude`` patterns that match no module of the checkpoint (a typo keeps nothing)."""
    modules = module_names(source.tensors)
    return [p for p in patterns if not any(matches(m, [p]) for m in modules)]


# a k_proj weight as a checkpoint stores it: plain (bf16, FP8, NVFP4) or packed INT4 (compressed-tensors)
_K_PROJ_WEIGHTS = (".k_proj.weight", ".k_proj.weight_packed")


def attention_modules(names, config: dict) -> set[str]:
    """Attention modules that hold a KV cache: parents of a ``k_proj`` weight among ``names`` (tensor
    names, of a source or an output), outside kept subtrees (MTP layers, towers)."""
    return {n[: -len(suffix)] for n in names for suffix in _K_PROJ_WEIGHTS
            if n.endswith(suffix) and excluded_subtree(n, config) is None}

