"""Synthetic checkpoints' layouts: the config.json of each model family, and each tensor's dtype.

Why a module of its own: configs and sizes are read without writing anything (benchmarks' own
writers); the tensor names and shapes are layouts.py's, which planning trusts too; synth.py
generates the values and writes the files.
"""

from __future__ import annotations

import math

import torch

from .layouts import ARCHITECTURES as _ARCH
from .layouts import FAMILIES, tensor_specs  # noqa: F401  (FAMILIES: its users import it from here too)

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
    ``intermediate_size`` for Mixtral and GPT-OSS, whose configs call it that). Qwen2 and Qwen2-MoE have no
    ``head_dim`` field (it is ``hidden_size // num_heads``); DeepSeek-V3 uses ``head_dim`` for
    ``qk_nope_head_dim``/``v_head_dim`` (rope half of it) and ``num_kv_heads`` is ignored. ``overrides`` are
    set last, verbatim, as top-level config keys (e.g. ``mlp_only_layers=[0]``, ``q_lora_rank=96``).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if hidden_size % num_heads and family in ("qwen2_moe", "qwen2"):
        raise ValueError(f"{family} derives head_dim = hidden_size // num_heads; they must divide")
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
    elif family == "mistral":
        c.update(sliding_window=None, rope_theta=1000000.0, rms_norm_eps=1e-5)
    elif family == "qwen2":
        del c["head_dim"]  # Qwen2Config has no head_dim: it is hidden_size // num_attention_heads
        c.update(use_sliding_window=False, sliding_window=None, max_window_layers=num_layers, rope_theta=1000000.0)
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
