"""Synthetic Hugging Face checkpoints with the tensor names, shapes and file layout of real ones.

Why: tests, the CLI's built-in sample and benchmarks all need checkpoints that look exactly like
what users download (sharded safetensors + index, per-expert or stacked MoE weights, MLA, MTP layers,
tied embeddings, unaligned layers) without downloading anything. Tensors are generated one at a
time from a per-tensor seed, so a multi-GB checkpoint is written with at most one shard in memory and
the bytes of a tensor never depend on sharding or generation order.
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import re
from collections.abc import Iterator

import torch
from safetensors.torch import save_file

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
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_TRANSFORMERS_VERSION = "4.57.1"  # what the config claims to be written by; informational only
_STD = 0.02
SHARD_RE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


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
    c.update(torch_dtype="bfloat16", dtype="bfloat16", transformers_version=_TRANSFORMERS_VERSION)
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


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype}")


def checkpoint_size_for(config: dict, dtype: torch.dtype = torch.bfloat16) -> int:
    """Total tensor bytes of the checkpoint (``metadata.total_size`` of its index)."""
    _check_dtype(dtype)
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


# --------------------------------------------------------------------------------------------------
# values


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _is_norm(name: str) -> bool:
    return name.endswith(("norm.weight", "layernorm.weight"))


def _is_vector(name: str, shape: tuple[int, ...]) -> bool:
    return name.endswith(("bias", "sinks")) or len(shape) == 1


def put_last(flat: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    """``flat[idx[i]] = values[i]`` in order, so a position drawn twice keeps its last value.
    (``flat[idx] = values`` with repeated indices is written by several threads in no fixed order
    on a multi-core CPU: the same name and seed then gave other bytes in another process.)"""
    uniq, inverse = torch.unique(idx, return_inverse=True)
    order = torch.arange(len(idx), device=idx.device)
    last = torch.zeros_like(uniq).scatter_reduce_(0, inverse, order, "amax", include_self=False)
    flat[uniq] = values[last]


def make_tensor(name: str, shape: tuple[int, ...], *, dtype: torch.dtype = torch.bfloat16,
                weights: str = "random", seed: int = 0) -> torch.Tensor:
    """The value of one tensor; depends only on (name, shape, weights, seed) and then ``dtype``.

    random: normal, std 0.02. structured: per-output-channel scales (log-normal), ~1e-3 of elements
    are outliers at 10-50x std, ~1% of 16-element blocks along the input dim are exactly zero (at
    least one per matrix), norms ~1, biases small.
    """
    out_dtype = tensor_dtype(name, dtype)
    g = _generator(seed, name)
    if weights == "random":
        return torch.randn(shape, generator=g).mul_(_STD).to(out_dtype)
    if weights != "structured":
        raise ValueError(f"weights must be 'random' or 'structured', got {weights!r}")
    if _is_norm(name):
        return torch.randn(shape, generator=g).mul_(0.05).add_(1.0).to(out_dtype)
    if _is_vector(name, shape):
        return torch.randn(shape, generator=g).mul_(_STD).to(out_dtype)
    w = torch.randn(shape, generator=g).mul_(_STD)
    # Matrices are [out, in]; stacked experts (GPT-OSS) are [E, in, out], quantized along `in`.
    stacked = w.dim() == 3
    if stacked:
        chan = torch.randn((shape[0], 1, shape[2]), generator=g).mul_(0.5).exp_()
    else:
        chan = torch.randn((*shape[:-1], 1), generator=g).mul_(0.5).exp_()
    w.mul_(chan)
    flat = w.view(-1)
    k = max(1, round(flat.numel() * 1e-3))
    idx = torch.randint(flat.numel(), (k,), generator=g)
    mag = torch.rand(k, generator=g).mul_(40.0).add_(10.0).mul_(_STD)
    sign = torch.randint(2, (k,), generator=g).mul_(2).sub_(1)
    put_last(flat, idx, mag * sign)
    in_dim = shape[1] if stacked else shape[-1]
    if in_dim % 16 == 0:
        if stacked:
            mshape = (shape[0], in_dim // 16, 1, shape[2])
            view = w.view(shape[0], in_dim // 16, 16, shape[2])
        else:
            mshape = (*shape[:-1], in_dim // 16, 1)
            view = w.view(*shape[:-1], in_dim // 16, 16)
        keep = torch.rand(mshape, generator=g) >= 0.01
        keep.view(-1)[torch.randint(keep.numel(), (1,), generator=g)] = False
        view.mul_(keep)
    return w.to(out_dtype)


# --------------------------------------------------------------------------------------------------
# files


def plan_shards(sizes: list[int], shard_size: int) -> list[int]:
    """Shard index of each tensor: greedy in order, a new shard when the next tensor would overflow
    (a tensor larger than ``shard_size`` gets a shard to itself), like transformers' sharding."""
    out, cur, idx = [], 0, 0
    for s in sizes:
        if cur and cur + s > shard_size:
            idx, cur = idx + 1, 0
        out.append(idx)
        cur += s
    return out


def _extra_files(path: pathlib.Path, config: dict) -> None:
    eos = config.get("eos_token_id")
    tok = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
           "pad_token": None, "unk_token": "<unk>", "clean_up_tokenization_spaces": False,
           "model_max_length": config.get("max_position_embeddings", 4096),
           "tokenizer_class": "PreTrainedTokenizerFast"}
    gen = {"_from_model_config": True, "bos_token_id": config.get("bos_token_id"), "eos_token_id": eos,
           "do_sample": False, "transformers_version": _TRANSFORMERS_VERSION}
    (path / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def write_checkpoint(
    path,
    config: dict | None = None,
    *,
    family: str = "llama",
    dtype: torch.dtype = torch.bfloat16,
    shard_size: int = 512 * 2**20,
    weights: str = "random",
    seed: int = 0,
    extra_files: bool = True,
    **config_kwargs,
) -> pathlib.Path:
    """Write a synthetic checkpoint folder the way ``save_pretrained`` does; returns its path.

    ``config`` wins over ``family``/``config_kwargs`` (which go to :func:`make_config`); its
    ``torch_dtype``/``dtype`` are set to ``dtype``. Shards are ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``, or one ``model.safetensors`` when everything fits in one shard.
    Streams: only the current shard's tensors are held in memory. Deterministic per ``seed``.
    Old shard/index files in ``path`` are removed first so a rewrite never leaves stale shards.
    """
    _check_dtype(dtype)
    if config is None:
        config = make_config(family, **config_kwargs)
    elif config_kwargs:
        raise ValueError("pass either config or make_config keyword arguments, not both")
    config = dict(config)
    config["torch_dtype"] = config["dtype"] = _DTYPE_NAMES[dtype]
    specs = tensor_specs(config)
    sizes = [math.prod(s) * tensor_dtype(n, dtype).itemsize for n, s in specs]
    shard_of = plan_shards(sizes, shard_size)
    n_shards = shard_of[-1] + 1 if shard_of else 1

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for old in path.iterdir():
        if old.is_file() and (SHARD_RE.match(old.name) or old.name == "model.safetensors.index.json"):
            old.unlink()
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if extra_files:
        _extra_files(path, config)

    def fname(i: int) -> str:
        return "model.safetensors" if n_shards == 1 else f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"

    weight_map: dict[str, str] = {}
    for i, group in enumerate(_grouped(specs, shard_of)):
        tensors = {name: make_tensor(name, shape, dtype=dtype, weights=weights, seed=seed) for name, shape in group}
        save_file(tensors, str(path / fname(i)), metadata={"format": "pt"})
        weight_map.update({name: fname(i) for name in tensors})
        del tensors
    if n_shards > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


def _grouped(specs, shard_of) -> Iterator[list[tuple[str, tuple[int, ...]]]]:
    group, cur = [], 0
    for spec, s in zip(specs, shard_of):
        if s != cur:
            yield group
            group, cur = [], s
        group.append(spec)
    yield group


def sample_checkpoint(path) -> pathlib.Path:
    """The built-in sample the CLI converts when no model is given: small llama, 2 shards, ~3 MB,
    structured weights (outliers and zero blocks, so the conversion report has something to show)."""
    config = make_config("llama", num_layers=2, hidden_size=256, intermediate_size=512, vocab_size=1024,
                         num_heads=4, num_kv_heads=2, head_dim=64)
    # 0.6 of the total: the first shard fills past 0.6 - (largest tensor) > 0.4, so exactly 2 shards.
    shard_size = int(checkpoint_size_for(config) * 0.6)
    return write_checkpoint(path, config, weights="structured", shard_size=shard_size)
