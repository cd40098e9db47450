"""Synthetic Hugging Face checkpoints with the tensor names, shapes and file layout of real ones.

Why: tests, the CLI's built-in sample and benchmarks all need checkpoints that look exactly like
what users download (sharded safetensors + index, per-expert or stacked MoE weights, MLA, MTP layers,
tied embeddings, unaligned layers) without downloading anything. Tensors are generated one at a
time from a per-tensor seed, so a multi-GB checkpoint is written with at most one shard in memory and
the bytes of a tensor never depend on sharding or generation order. The configs and tensor names
and shapes come from synth_layout.py; this module makes the values and writes the files.
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

from .synth_layout import (CONFIG_DTYPE_NAMES, TRANSFORMERS_VERSION, check_dtype, checkpoint_size_for,
                           make_config, tensor_dtype, tensor_specs)

_STD = 0.02
SHARD_RE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


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
           "do_sample": False, "transformers_version": TRANSFORMERS_VERSION}
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
    check_dtype(dtype)
    if config is None:
        config = make_config(family, **config_kwargs)
    elif config_kwargs:
        raise ValueError("pass either config or make_config keyword arguments, not both")
    config = dict(config)
    config["torch_dtype"] = config["dtype"] = CONFIG_DTYPE_NAMES[dtype]
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
