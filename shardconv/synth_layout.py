"""Synthetic checkpoints' layouts: the config.json of each model family and every tensor name,
shape and dtype a real checkpoint of that config holds, in model order.

Why a module of its own: these layouts follow transformers' modeling files and the released
checkpoints and are read without writing anything (checkpoint sizes, benchmarks' own writers);
synth.py generates the values and writes the files.
"""

from __future__ import annotations

import math

import torch

FAMILIES = ("llama", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss")

_ARCH = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}
# the config.json spelling of each weight dtype synthetic checkpoints are written in
CONFIG_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
TRANSFORMERS_VERSION = "4.57.1"  # what the config claims to be written by; informational only


# --------------------------------------------------------------------------------------------------
# config.json


def make_config(
    family: str,
    *,
    num_layers: int = 2,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_experts: int = 4,
    moe_intermediate_size: int = 64,
    vocab_size: int = 512,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    tie_word_embeddings: bool = False,
    **overrides,
) -> dict:
    """A real HF ``config.json`` dict for ``family`` (what transformers' config class and vLLM read).

    ``intermediate_size`` is the dense MLP width (and Qwen2-MoE's shared expert width);
    ``moe_intermediate_size`` is the routed-expert width for every MoE family (written as
    ``intermediate_size`` for Mixtral and GPT-OSS, whose configs call it that). Qwen2-MoE has no
    ``head_dim`` field (it is ``hidden_size // num_heads``); DeepSeek-V3 uses ``head_dim`` for
    ``qk_nope_head_dim``/``v_head_dim`` (rope half of it) and ``num_kv_heads`` is ignored. ``overrides`` are
    set last, verbatim, as top-level config keys (e.g. ``mlp_only_layers=[0]``, ``q_lora_rank=96``).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if hidden_size % num_heads and family in ("qwen2_moe",):
        raise ValueError("qwen2_moe derives head_dim = hidden_size // num_heads; they must divide")
    top_k = min(2, num_experts)
    c: dict = {
        "architectures": [_ARCH[family]],
        "model_type": family,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "tie_word_embeddings": tie_word_embeddings,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if family == "llama":
        c.update(attention_bias=False, mlp_bias=False, pretraining_tp=1, rms_norm_eps=1e-5, rope_theta=500000.0)
    elif family == "qwen3":
        c.update(attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=num_layers,
                 rope_theta=1000000.0)
    elif family == "qwen3_moe":
        c.update(attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=num_layers,
                 rope_theta=1000000.0, decoder_sparse_step=1, moe_intermediate_size=moe_intermediate_size,
                 num_experts_per_tok=top_k, num_experts=num_experts, norm_topk_prob=True,
                 output_router_logits=False, router_aux_loss_coef=0.001, mlp_only_layers=[])
    elif family == "qwen2_moe":
        del c["head_dim"]  # Qwen2MoeConfig has no head_dim: it is hidden_size // num_attention_heads
        c.update(use_sliding_window=False, sliding_window=None, max_window_layers=num_layers, rope_theta=1000000.0,
                 decoder_sparse_step=1, moe_intermediate_size=moe_intermediate_size,
                 shared_expert_intermediate_size=intermediate_size, num_experts_per_tok=top_k,
                 num_experts=num_experts, norm_topk_prob=False, output_router_logits=False,
                 router_aux_loss_coef=0.001, mlp_only_layers=[], qkv_bias=True)
    elif family == "mixtral":
        c.update(intermediate_size=moe_intermediate_size, num_local_experts=num_experts, num_experts_per_tok=top_k,
                 sliding_window=None, output_router_logits=False, router_aux_loss_coef=0.02,
                 router_jitter_noise=0.0, rms_norm_eps=1e-5, rope_theta=1000000.0)
    elif family == "deepseek_v3":
        n_group = 2 if num_experts % 2 == 0 and num_experts >= 4 else 1
        del c["head_dim"]  # MLA: the per-head dims below replace head_dim
        c.update(
            num_key_value_heads=num_heads,  # MLA has no GQA; real configs repeat num_attention_heads
            moe_intermediate_size=moe_intermediate_size,
            n_routed_experts=num_experts, n_shared_experts=1, num_experts_per_tok=top_k,
            routed_scaling_factor=2.5, n_group=n_group, topk_group=1, topk_method="noaux_tc",
            scoring_func="sigmoid", norm_topk_prob=True, first_k_dense_replace=1, moe_layer_freq=1,
            ep_size=1, aux_loss_alpha=0.001, seq_aux=True,
            q_lora_rank=2 * hidden_size // 4 if hidden_size >= 64 else 32,
            kv_lora_rank=hidden_size // 4 if hidden_size >= 64 else 16,
            qk_nope_head_dim=head_dim, qk_rope_head_dim=max(head_dim // 2, 2), v_head_dim=head_dim,
            num_nextn_predict_layers=1, attention_bias=False, pretraining_tp=1, rope_interleave=True,
            bos_token_id=0, eos_token_id=1,
        )
    elif family == "gpt_oss":
        c.update(intermediate_size=moe_intermediate_size, num_local_experts=num_experts,
                 num_experts_per_tok=top_k, experts_per_token=top_k, attention_bias=True, sliding_window=128,
                 layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
                 swiglu_limit=7.0, router_aux_loss_coef=0.9, output_router_logits=False, rms_norm_eps=1e-5,
                 rope_theta=150000.0, initial_context_length=4096,
                 rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                               "truncate": False, "original_max_position_embeddings": 4096},
                 # the released ids (200002 / 199999) when the vocabulary is real-sized; inside it otherwise
                 eos_token_id=200002 if vocab_size > 200002 else vocab_size - 2,
                 pad_token_id=199999 if vocab_size > 200002 else vocab_size - 1, bos_token_id=None)
    c.update(torch_dtype="bfloat16", dtype="bfloat16", transformers_version=TRANSFORMERS_VERSION)
    c.update(overrides)
    return c


# --------------------------------------------------------------------------------------------------
# tensor names and shapes


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
    qkv_bias = family == "gpt_oss" or (family == "qwen2_moe" and c.get("qkv_bias", True)) or c.get("attention_bias")
    o_bias = family == "gpt_oss" or (family != "qwen2_moe" and c.get("attention_bias"))
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
    """The synth family of a config (its ``model_type``), checked."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"unsupported model_type {family!r}; expected one of {FAMILIES}")
    return family


def tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor a real checkpoint of this config has: HF on-disk names and shapes, in model order.

    Why: converters are tested against exactly these names (fusion groups, routers, MTP layers,
    stacked experts), so they follow transformers' modeling files and the released checkpoints.
    """
    family = family_of(config)
    c, h, v = config, config["hidden_size"], config["vocab_size"]
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    n = c["num_hidden_layers"]
    for i in range(n):
        specs += _decoder_layer(c, family, i)
    if family == "deepseek_v3":
        for i in range(n, n + c.get("num_nextn_predict_layers", 0)):
            p = f"model.layers.{i}"
            layer = _decoder_layer(c, family, i)
            specs += [(f"{p}.embed_tokens.weight", (v, h)), (f"{p}.enorm.weight", (h,)), (f"{p}.hnorm.weight", (h,)),
                      (f"{p}.eh_proj.weight", (h, 2 * h))]
            specs += layer
            specs += [(f"{p}.shared_head.norm.weight", (h,)), (f"{p}.shared_head.head.weight", (v, h))]
    specs.append(("model.norm.weight", (h,)))
    if not c.get("tie_word_embeddings", False):
        specs.append(("lm_head.weight", (v, h)))
    return specs


def tensor_dtype(name: str, dtype: torch.dtype = torch.bfloat16) -> torch.dtype:
    """On-disk dtype of ``name`` in a checkpoint whose weights are ``dtype``.

    DeepSeek-V3's ``e_score_correction_bias`` is float32 in the released (and bf16-cast) checkpoints,
    which is a useful mixed-dtype case for byte-exact copying.
    """
    return torch.float32 if name.endswith("e_score_correction_bias") else dtype


def check_dtype(dtype: torch.dtype) -> None:
    """Refuse a weight dtype synthetic checkpoints are not written in (ValueError)."""
    if dtype not in CONFIG_DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(CONFIG_DTYPE_NAMES)}, got {dtype}")


def checkpoint_size_for(config: dict, dtype: torch.dtype = torch.bfloat16) -> int:
    """Total tensor bytes of the checkpoint (``metadata.total_size`` of its index)."""
    check_dtype(dtype)
    return sum(math.prod(s) * tensor_dtype(n, dtype).itemsize for n, s in tensor_specs(config))


def layers_for_size(family: str, target_bytes: int, dtype: torch.dtype = torch.bfloat16, **kwargs) -> int:
    """``num_layers`` whose checkpoint size is closest to ``target_bytes`` (at least 1).

    Why: benchmarks ask for "a ~N GB checkpoint of family X with these widths".
    """
    kwargs.pop("num_layers", None)

    def size(n: int) -> int:
        return checkpoint_size_for(make_config(family, num_layers=n, **kwargs), dtype)

    lo, hi = 1, 1
    while size(hi) < target_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # size is increasing in n: find the bracket size(lo) < target <= size(hi)
        mid = (lo + hi) // 2
        if size(mid) < target_bytes:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda n: (abs(size(n) - target_bytes), n))
