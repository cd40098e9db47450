"""Where each known family's checkpoint holds its tensors: every name and shape, from config.json alone.

Why: finding the Linear layers by building the config's model (linears.py) imports transformers,
which took 7-11 s after start with everything cached and 16-26 s cold on the H200 machine, longer
than converting a 21 GB checkpoint from the page cache (README Performance). For the families here,
the test suite checks these layouts against transformers' own ``save_pretrained`` and checks that
planning with the name rules gives exactly the model's plan (tests/test_layouts.py). A checkpoint
whose tensor set is exactly its family's layout, name for name and shape for shape, is planned
without the model (:func:`exact`); one tensor more, less or of another shape, remote code that would
run, another architecture or a config that leaves out a value whose default transformers might read otherwise,
and the model decides as before. Torch-free: the Linear-detection helper imports it before torch.
"""

from __future__ import annotations

from collections.abc import Iterator

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss")

ARCHITECTURES = {  # the class each family's config.json names
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}


def _head_dim(c: dict) -> int:
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def _mlp(prefix: str, hidden: int, inter: int, names=("gate_proj", "up_proj", "down_proj")):
    g, u, d = names
    return [(f"{prefix}.{g}.weight", (inter, hidden)), (f"{prefix}.{u}.weight", (inter, hidden)),
            (f"{prefix}.{d}.weight", (hidden, inter))]


def _attention(p: str, c: dict, family: str) -> list[tuple[str, tuple[int, ...]]]:
    h, nh, nkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = _head_dim(c)
    if family == "deepseek_v3":
        qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
        out = []
        if c.get("q_lora_rank"):
            out += [(f"{p}.q_a_proj.weight", (c["q_lora_rank"], h)), (f"{p}.q_a_layernorm.weight", (c["q_lora_rank"],)),
                    (f"{p}.q_b_proj.weight", (nh * qk, c["q_lora_rank"]))]
        else:  # DeepSeek-V2-Lite style: no query compression
            out += [(f"{p}.q_proj.weight", (nh * qk, h))]
        out += [(f"{p}.kv_a_proj_with_mqa.weight", (c["kv_lora_rank"] + c["qk_rope_head_dim"], h)),
                (f"{p}.kv_a_layernorm.weight", (c["kv_lora_rank"],)),
                (f"{p}.kv_b_proj.weight", (nh * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"])),
                (f"{p}.o_proj.weight", (h, nh * c["v_head_dim"]))]
        return out
    # Qwen2's q/k/v always have a bias, its o_proj none; Qwen2-MoE's follow qkv_bias
    qkv_bias = (family in ("gpt_oss", "qwen2") or (family == "qwen2_moe" and c.get("qkv_bias", True))
                or c.get("attention_bias"))
    o_bias = family == "gpt_oss" or (family not in ("qwen2_moe", "qwen2") and c.get("attention_bias"))
    out = []
    for proj, rows in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
        out.append((f"{p}.{proj}.weight", (rows, h)))
        if qkv_bias:
            out.append((f"{p}.{proj}.bias", (rows,)))
    out.append((f"{p}.o_proj.weight", (h, nh * hd)))
    if o_bias:
        out.append((f"{p}.o_proj.bias", (h,)))
    if family in ("qwen3", "qwen3_moe"):
        out += [(f"{p}.q_norm.weight", (hd,)), (f"{p}.k_norm.weight", (hd,))]
    if family == "gpt_oss":
        out.append((f"{p}.sinks", (nh,)))
    return out


def _is_sparse(c: dict, family: str, i: int) -> bool:
    if family in ("qwen3_moe", "qwen2_moe"):
        step = c.get("decoder_sparse_step", 1) or 1
        return i not in c.get("mlp_only_layers", []) and c["num_experts"] > 0 and (i + 1) % step == 0
    if family == "deepseek_v3":
        return c["n_routed_experts"] > 0 and i >= c["first_k_dense_replace"] and i % c.get("moe_layer_freq", 1) == 0
    return family in ("mixtral", "gpt_oss")


def _feed_forward(p: str, c: dict, family: str, i: int) -> list[tuple[str, tuple[int, ...]]]:
    h = c["hidden_size"]
    if not _is_sparse(c, family, i):
        return _mlp(f"{p}.mlp", h, c["intermediate_size"])
    if family == "mixtral":
        e, inter = c["num_local_experts"], c["intermediate_size"]
        out = [(f"{p}.block_sparse_moe.gate.weight", (e, h))]
        for j in range(e):  # w1 = gate, w2 = down, w3 = up (MixtralBlockSparseTop2MLP)
            x = f"{p}.block_sparse_moe.experts.{j}"
            out += [(f"{x}.w1.weight", (inter, h)), (f"{x}.w2.weight", (h, inter)), (f"{x}.w3.weight", (inter, h))]
        return out
    if family == "gpt_oss":
        e, inter = c["num_local_experts"], c["intermediate_size"]
        return [(f"{p}.mlp.router.weight", (e, h)), (f"{p}.mlp.router.bias", (e,)),
                (f"{p}.mlp.experts.gate_up_proj", (e, h, 2 * inter)),
                (f"{p}.mlp.experts.gate_up_proj_bias", (e, 2 * inter)),
                (f"{p}.mlp.experts.down_proj", (e, inter, h)),
                (f"{p}.mlp.experts.down_proj_bias", (e, h))]
    inter = c["moe_intermediate_size"]
    if family == "deepseek_v3":
        e = c["n_routed_experts"]
        out = [(f"{p}.mlp.gate.weight", (e, h)), (f"{p}.mlp.gate.e_score_correction_bias", (e,))]
        for j in range(e):
            out += _mlp(f"{p}.mlp.experts.{j}", h, inter)
        if c.get("n_shared_experts"):
            out += _mlp(f"{p}.mlp.shared_experts", h, inter * c["n_shared_experts"])
        return out
    e = c["num_experts"]  # qwen3_moe / qwen2_moe
    out = [(f"{p}.mlp.gate.weight", (e, h))]
    for j in range(e):
        out += _mlp(f"{p}.mlp.experts.{j}", h, inter)
    if family == "qwen2_moe" and c.get("shared_expert_intermediate_size"):
        out += _mlp(f"{p}.mlp.shared_expert", h, c["shared_expert_intermediate_size"])
        out.append((f"{p}.mlp.shared_expert_gate.weight", (1, h)))
    return out


def _decoder_layer(c: dict, family: str, i: int) -> list[tuple[str, tuple[int, ...]]]:
    p, h = f"model.layers.{i}", c["hidden_size"]
    return ([(f"{p}.input_layernorm.weight", (h,))] + _attention(f"{p}.self_attn", c, family)
            + [(f"{p}.post_attention_layernorm.weight", (h,))] + _feed_forward(p, c, family, i))


def family_of(config: dict) -> str:
    """The family of a config (its ``model_type``), checked (ValueError)."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"unsupported model_type {family!r}; expected one of {FAMILIES}")
    return family


def tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor a real checkpoint of this config has: HF on-disk names and shapes, in model order.

    Why: the synthetic checkpoints every test converts hold exactly these (fusion groups, routers, MTP
    layers, stacked experts), and planning trusts a checkpoint that holds exactly these (:func:`exact`);
    they follow transformers' modeling files and the released checkpoints (tests/test_synth.py checks
    them against transformers' own ``save_pretrained``).
    """
    return list(_specs(config))


def _specs(config: dict) -> Iterator[tuple[str, tuple[int, ...]]]:
    """:func:`tensor_specs` one layer at a time, so that :func:`exact` stops at the first difference."""
    family = family_of(config)
    c, h, v = config, config["hidden_size"], config["vocab_size"]
    yield "model.embed_tokens.weight", (v, h)
    n = c["num_hidden_layers"]
    for i in range(n):
        yield from _decoder_layer(c, family, i)
    if family == "deepseek_v3":
        for i in range(n, n + c.get("num_nextn_predict_layers", 0)):
            p = f"model.layers.{i}"
            yield from [(f"{p}.embed_tokens.weight", (v, h)), (f"{p}.enorm.weight", (h,)),
                        (f"{p}.hnorm.weight", (h,)), (f"{p}.eh_proj.weight", (h, 2 * h))]
            yield from _decoder_layer(c, family, i)
            yield from [(f"{p}.shared_head.norm.weight", (h,)), (f"{p}.shared_head.head.weight", (v, h))]
    yield "model.norm.weight", (h,)
    if not c.get("tie_word_embeddings", False):
        yield "lm_head.weight", (v, h)


# Counts beyond any real model (the largest have ~100 layers, ~500 experts), for every config key that
# names one: such a config is not expanded here, nor built as a meta model by linears.py (minutes).
MAX_COUNTS = {**dict.fromkeys(("num_hidden_layers", "num_layers", "n_layer"), 1024),
              **dict.fromkeys(("num_experts", "n_routed_experts", "num_local_experts"), 8192)}
# ... and the counts this layout reads, with the few MTP layers and dense layers a real model has
_LAYOUT_COUNTS = {**{k: MAX_COUNTS[k] for k in ("num_hidden_layers", "num_experts", "n_routed_experts",
                                               "num_local_experts")},
                  "num_nextn_predict_layers": 16, "first_k_dense_replace": MAX_COUNTS["num_hidden_layers"]}
# Sizes the layout multiplies: whole numbers of at least 1 wherever the config gives them. A string
# would be repeated, not multiplied; a 0 gives transformers' model empty tensors that no layout writes.
_SIZES = ("hidden_size", "vocab_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
          "moe_intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
          "shared_expert_intermediate_size", "n_shared_experts", "num_experts", "n_routed_experts",
          "num_local_experts", "decoder_sparse_step", "moe_layer_freq", "q_lora_rank")
# ... or None, where transformers reads None as "derived" (head_dim) or "absent" (q_lora_rank: no query
# compression); Qwen3's, Qwen3-MoE's and GPT-OSS's head_dim are stated below, and must be numbers.
_MAY_BE_NONE = ("head_dim", "q_lora_rank")
# Values tensor_specs reads with a default of its own: the layout answers only where the config states
# them, so no transformers version's default can read the same config.json another way.
_STATED = {
    "llama": ("tie_word_embeddings",),
    "mistral": ("tie_word_embeddings",),
    "qwen2": ("tie_word_embeddings",),
    "qwen3": ("tie_word_embeddings", "head_dim"),
    "qwen3_moe": ("tie_word_embeddings", "head_dim", "decoder_sparse_step", "mlp_only_layers"),
    "qwen2_moe": ("tie_word_embeddings", "decoder_sparse_step", "mlp_only_layers", "qkv_bias",
                  "shared_expert_intermediate_size"),
    "mixtral": ("tie_word_embeddings",),
    "deepseek_v3": ("tie_word_embeddings", "first_k_dense_replace", "n_shared_experts", "q_lora_rank"),
    "gpt_oss": ("tie_word_embeddings", "head_dim"),
}


def _readable(config: dict, family: str) -> bool:
    """Every value the layout reads has a type and range transformers' model reads the same way."""
    if any(key not in config for key in _STATED[family]):
        return False
    for key, limit in _LAYOUT_COUNTS.items():
        value = config.get(key, 0)
        if type(value) is not int or not 0 <= value <= limit:
            return False
    for key in _SIZES:
        if key not in config:
            continue
        value = config[key]
        stated_number = key == "head_dim" and family in ("qwen3", "qwen3_moe", "gpt_oss")
        if value is None and key in _MAY_BE_NONE and not stated_number:
            continue
        if type(value) is not int or value < 1:
            return False
    layers = config.get("mlp_only_layers", [])
    return isinstance(layers, list) and all(type(i) is int for i in layers)


# The key each MoE family's layout reads its expert count from. transformers maps the others onto it
# (Qwen3-MoE's config reads ``num_local_experts`` as ``num_experts``, DeepSeek-V3's reads it as
# ``n_routed_experts``), so a config that also gives another could mean another count.
_EXPERT_COUNT = {"qwen3_moe": "num_experts", "qwen2_moe": "num_experts", "mixtral": "num_local_experts",
                 "gpt_oss": "num_local_experts", "deepseek_v3": "n_routed_experts"}


def _agrees(config: dict, family: str) -> bool:
    """No value adds tensors to transformers' model that tensor_specs leaves out, or reads otherwise:
    an MLP bias (Llama's ``mlp_bias``), DeepSeek-V3's attention biases (its MLA projections take
    ``attention_bias``), DeepSeek-V3's ``moe_layer_freq`` (its model has none: every layer past
    ``first_k_dense_replace`` is MoE there), and a second expert-count key (_EXPERT_COUNT)."""
    if config.get("mlp_bias"):
        return False
    counted = _EXPERT_COUNT.get(family)
    if counted is not None and any(k in config for k in set(_EXPERT_COUNT.values()) - {counted}):
        return False
    return family != "deepseek_v3" or (not config.get("attention_bias") and config.get("moe_layer_freq", 1) == 1)


def exact(config: dict, tensors: dict, trust_remote_code: bool = False) -> str | None:
    """The family whose layout ``tensors`` (TensorInfo-like: ``.name``, ``.shape``) is exactly, or None.

    None also for remote code that would run (``auto_map`` with ``trust_remote_code``; without it the
    model is transformers' own class, as here), an architecture other than the family's own, a count
    beyond any real model, a size that is no whole number of at least 1, a config value in _STATED left
    out, or one that adds tensors to the model (:func:`_agrees`). Never raises; stops at the first
    tensor that differs (a config may claim 1024 layers of 8192 experts).
    """
    family = config.get("model_type")
    if family not in FAMILIES or config.get("architectures") != [ARCHITECTURES[family]]:
        return None
    if trust_remote_code and "auto_map" in config:
        return None
    if not _readable(config, family) or not _agrees(config, family):
        return None
    plain = {info.name: info for info in tensors.values()}  # keyed by an encoded weight's codes tensor
    if len(plain) != len(tensors):
        return None
    seen = 0
    try:
        for name, shape in _specs(config):
            info = plain.get(name)
            if info is None or tuple(info.shape) != shape or any(type(d) is not int for d in shape):
                return None  # (4096.0 would equal 4096)
            seen += 1
    except Exception:  # a config this layout cannot read: the model decides
        return None
    return family if seen == len(plain) else None
