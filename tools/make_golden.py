#!/usr/bin/env python3
"""Regenerate the golden reference outputs in tests/golden/ with NVIDIA ModelOpt itself.

ModelOpt is the oracle here: this script only *imports* it (it is not a dependency of
shardconv). Run it from a separate environment, e.g.::

    python3 -m venv /tmp/movenv
    echo torch==2.13.0 > /tmp/cons.txt
    /tmp/movenv/bin/pip install -c /tmp/cons.txt torch==2.13.0
    /tmp/movenv/bin/pip install -c /tmp/cons.txt nvidia-modelopt==0.47.0 \
        transformers==5.14.1 safetensors accelerate requests
    /tmp/movenv/bin/python tools/make_golden.py [--out tests/golden]

CPU only. For each family in {llama, qwen3, qwen3_moe, mixtral, gpt_oss} it writes::

    <out>/<family>/source/            config.json, model-0000{1,2}-of-00002.safetensors,
                                      model.safetensors.index.json  (bf16, HF on-disk names)
    <out>/<family>/<case>/            ModelOpt export: model*.safetensors (+ index if sharded),
                                      config.json, hf_quant_config.json, amax.pt

Cases: max_w4a16 (NVFP4 weight-only, max calib), max_w4a4 (mtq.NVFP4_DEFAULT_CFG with
calibration), static (NVFP4 static per-block weight amax, max calib, W4A4), static_kv
(static + FP8 KV cache k/v bmm quantizers), mse (mtq.NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG: the
126-value FP8 scale sweep) and four_over_six (mtq.NVFP4_FOUR_OVER_SIX_CFG). amax.pt is
``{k: v for k, v in model.state_dict().items() if "_amax" in k}`` of the quantized model,
taken right before export. Output is deterministic (fixed seeds, CPU).

mixtral (per-expert ``block_sparse_moe.experts.N.w1/w2/w3`` on disk) and gpt_oss (stacked
``experts.gate_up_proj [E, in, out]``, ModelOpt's transposed BMM export) only run the
max_w4a16 and static cases (MOE_CASES), with a smaller vocabulary, to keep tests/golden small.

mse and four_over_six calibrate with ModelOpt's static NVFP4 fake quantizer, which is a Triton
kernel (CUDA only). Without CUDA, that one call (``static_blockwise_fp4_fake_quant`` as imported by
ModelOpt's tensor_quantizer) is replaced by an equivalent torch function written here
(``_torch_static_fp4_fake_quant``: the block scale ``amax / 6`` fake-quantized to e4m3 by
ModelOpt's own eager ``scaled_e4m3_impl``, then per element ``|x| / scale`` rounded to e2m1 and
multiplied back, all in fp32). The sweep then runs ModelOpt's reference (non-Triton) path.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import modelopt  # noqa: E402
import modelopt.torch.quantization as mtq  # noqa: E402
import transformers  # noqa: E402
from modelopt.torch.export import export_hf_checkpoint  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

FAMILIES = ("llama", "qwen3", "qwen3_moe", "mixtral", "gpt_oss")
CASES = ("max_w4a16", "max_w4a4", "static", "static_kv", "mse", "four_over_six")
PRESETS = {"mse": "NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG", "four_over_six": "NVFP4_FOUR_OVER_SIX_CFG"}
MOE_CASES = ("max_w4a16", "static")  # the only cases generated for mixtral and gpt_oss
SMALL = ("mixtral", "gpt_oss")
SEED = 1234
CALIB_SEED = 4321
CALIB_BATCHES = 4
CALIB_SHAPE = (2, 16)

COMMON = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=192,  # small vocab keeps the bf16 embed/lm_head copies (and tests/golden) small
    tie_word_embeddings=False,
    max_position_embeddings=256,
    dtype="bfloat16",
)


# --------------------------------------------------------------------------------------
# model construction
# --------------------------------------------------------------------------------------
def make_config(family: str):
    if family == "llama":
        return transformers.LlamaConfig(**COMMON)
    if family == "qwen3":
        return transformers.Qwen3Config(**COMMON)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **COMMON,
            num_experts=4,
            moe_intermediate_size=64,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    small = dict(COMMON, vocab_size=64)
    small.pop("intermediate_size")  # the expert width below
    if family == "mixtral":
        small.pop("head_dim")
        return transformers.MixtralConfig(
            **small, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2
        )
    if family == "gpt_oss":
        return transformers.GptOssConfig(
            **small,
            intermediate_size=64,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=128,
            attention_bias=True,
        )
    raise ValueError(family)


def model_class(family: str):
    return {
        "llama": transformers.LlamaForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
        "qwen3_moe": transformers.Qwen3MoeForCausalLM,
        "mixtral": transformers.MixtralForCausalLM,
        "gpt_oss": transformers.GptOssForCausalLM,
    }[family]


def _interesting_matrix(shape, gen: torch.Generator, mat_id: int) -> torch.Tensor:
    """Random fp32 matrix [out, in]: N(0, 0.02) + a few outliers + special blocks.

    * 3 large outliers (|x| in [0.1, 0.5]) at random positions;
    * one all-zero 16-block (row 1, block 1): static vs dynamic paths differ there;
    * one tiny block (row 2, block 2, |x| ~ 2e-7): its block scale clamps at 2**-9;
    * one block of exact +-0 with a few tiny negatives (row 3, block 0) so that
      negative values rounding to zero produce the negative-zero code.
    """
    out_f, in_f = shape
    w = torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02
    for _ in range(3):
        r = int(torch.randint(0, out_f, (1,), generator=gen))
        c = int(torch.randint(0, in_f, (1,), generator=gen))
        mag = 0.1 + 0.4 * float(torch.rand((1,), generator=gen))
        sign = -1.0 if float(torch.rand((1,), generator=gen)) < 0.5 else 1.0
        w[r, c] = sign * mag
    if in_f >= 48 and out_f >= 4:
        w[1, 16:32] = 0.0
        w[2, 32:48] = torch.randn((16,), generator=gen) * 2e-7
        w[3, 0:16] = torch.randn((16,), generator=gen) * 1e-3
        w[3, 0] = 0.02 + 0.001 * (mat_id % 7)  # dominant value: the rest round to +-0
        w[3, 1] = -0.0
    return w


def build_model(family: str):
    cfg = make_config(family)
    torch.manual_seed(SEED)
    model = model_class(family)(cfg)
    model = model.to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(SEED)
    mat_id = 0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1:  # norms
                vals = 1.0 + 0.05 * torch.randn(p.shape, generator=gen)
            elif p.dim() == 2:
                vals = _interesting_matrix(tuple(p.shape), gen, mat_id)
                mat_id += 1
            elif p.dim() == 3 and family == "gpt_oss":  # BMM experts [E, in, out], blocks along in
                n_exp, in_f, out_f = p.shape
                vals = torch.stack(
                    [_interesting_matrix((out_f, in_f), gen, mat_id + e).T for e in range(n_exp)]
                )
                mat_id += n_exp
            elif p.dim() == 3:  # transformers-5 fused experts [E, out, in]
                n_exp, out_f, in_f = p.shape
                if name.endswith("gate_up_proj"):
                    # gate (first half of the rows) and up (second half) each get the special
                    # blocks; up is scaled by 0.5 so the shared global amax is owned by gate
                    half = out_f // 2
                    mats = []
                    for _ in range(n_exp):
                        gate = _interesting_matrix((half, in_f), gen, mat_id)
                        up = _interesting_matrix((half, in_f), gen, mat_id + 1) * 0.5
                        mats.append(torch.cat([gate, up]))
                        mat_id += 2
                    vals = torch.stack(mats)
                else:
                    vals = torch.stack(
                        [_interesting_matrix((out_f, in_f), gen, mat_id + e) for e in range(n_exp)]
                    )
                    mat_id += n_exp
            else:
                raise ValueError(name)
            p.copy_(vals.to(p.dtype))
    return model


# --------------------------------------------------------------------------------------
# source checkpoint
# --------------------------------------------------------------------------------------
def _in_shard1(name: str) -> bool:
    """Shard assignment: shard 1 = embeddings + most of layer 0, shard 2 = the rest.

    Layer 0's k_proj/v_proj (q_proj stays in shard 1), layer 0's up_proj (gate_proj in shard 1)
    and every layer-0 expert's up_proj (Mixtral: w3) go to shard 2, so fusion groups straddle the shards.
    """
    if name.startswith("model.embed_tokens"):
        return True
    if name.startswith("model.layers.0."):
        return not any(s in name for s in ("k_proj", "v_proj", "up_proj", ".w3."))
    return False


def write_source(model, family: str, src_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # transformers reverts fused experts to per-expert names
        tensors = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            with safe_open(str(f), "pt") as s:
                for k in s.keys():
                    tensors[k] = s.get_tensor(k)
        config_bytes = (Path(tmp) / "config.json").read_bytes()
    names = sorted(tensors)
    if family == "qwen3_moe":
        assert any(".mlp.experts.0.gate_proj.weight" in n for n in names), names
    shards = [
        [n for n in names if _in_shard1(n)],
        [n for n in names if not _in_shard1(n)],
    ]
    if src_dir.exists():
        shutil.rmtree(src_dir)
    src_dir.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in shard}, str(src_dir / fname), metadata={"format": "pt"})
        for n in shard:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    with open(src_dir / "model.safetensors.index.json", "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2, sort_keys=True)
        fh.write("\n")
    (src_dir / "config.json").write_bytes(config_bytes)  # verbatim from save_pretrained
    for f in src_dir.iterdir():
        f.chmod(0o644)


def dir_digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# quantization configs
# --------------------------------------------------------------------------------------
NVFP4_STATIC_WEIGHT = {
    "num_bits": (2, 1),
    "block_sizes": {-1: 16, "type": "static", "scale_bits": (4, 3)},
}


def quant_config(case: str) -> dict:
    if case in PRESETS:  # ModelOpt's own preset, its MSE algorithm included
        return copy.deepcopy(getattr(mtq, PRESETS[case]))
    base = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    qc = list(base["quant_cfg"])
    if case == "max_w4a16":
        # NVFP4_DEFAULT_CFG with the input quantizers disabled (entries apply in order)
        qc.append({"quantizer_name": "*input_quantizer", "enable": False})
    elif case == "max_w4a4":
        pass
    elif case in ("static", "static_kv"):
        # Same weight-quantizer config as ModelOpt's NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG
        # (block type "static"), but with plain max calibration.
        qc = [
            {"quantizer_name": e["quantizer_name"], "cfg": copy.deepcopy(NVFP4_STATIC_WEIGHT)}
            if e.get("quantizer_name") == "*weight_quantizer" and "cfg" in e
            else e
            for e in qc
        ]
        if case == "static_kv":
            qc += copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
    else:
        raise ValueError(case)
    base["quant_cfg"] = qc
    base["algorithm"] = "max"
    return base


# E2M1 rounding of |x| / scale: (bound, strict, value): the value once t passes the bound (ties to even)
_E2M1_ROUND = ((0.25, True, 0.5), (0.75, False, 1.0), (1.25, True, 1.5), (1.75, False, 2.0),
               (2.5, True, 3.0), (3.5, False, 4.0), (5.0, True, 6.0))


def _torch_static_fp4_fake_quant(x, amax, global_amax=None, quantize_block_scales=True,
                                 fp8_max_for_normalization=448.0, out_dtype=None, pass_through_bwd=False):
    """CPU stand-in for ModelOpt's Triton ``static_blockwise_fp4_fake_quant`` (same fp32 arithmetic)."""
    from modelopt.torch.quantization.tensor_quant import scaled_e4m3_impl

    n_blocks = amax.numel()
    blocks = x.float().reshape(n_blocks, x.numel() // n_blocks)
    scale = amax.float().reshape(n_blocks, 1) / 6.0
    if quantize_block_scales:
        g = amax.float().amax() if global_amax is None else global_amax.float()
        scale = scaled_e4m3_impl(scale, g * (448.0 / fp8_max_for_normalization) / 6.0)
    bad = (scale == 0) | ~torch.isfinite(scale)
    safe = torch.where(bad, torch.ones_like(scale), scale)
    t = blocks.abs() / safe
    q = torch.zeros_like(t)
    for bound, strict, value in _E2M1_ROUND:
        q = torch.where(t > bound if strict else t >= bound, torch.full_like(t, value), q)
    y = q * safe
    y = torch.where(blocks >= 0, y, -y)
    y = torch.where(scale == 0, torch.zeros_like(y), y)
    return y.reshape(x.shape).to(out_dtype or x.dtype)


def install_cpu_fake_quant() -> None:
    """Without CUDA, route ModelOpt's static NVFP4 fake quant (a Triton kernel) to the torch version."""
    if torch.cuda.is_available():
        return
    import modelopt.torch.quantization.nn.modules.tensor_quantizer as tq

    tq.static_blockwise_fp4_fake_quant = _torch_static_fp4_fake_quant


def calib_batches(vocab: int):
    g = torch.Generator().manual_seed(CALIB_SEED)
    return [torch.randint(0, vocab, CALIB_SHAPE, generator=g) for _ in range(CALIB_BATCHES)]


# --------------------------------------------------------------------------------------
# run one case
# --------------------------------------------------------------------------------------
KEEP = {"config.json", "hf_quant_config.json", "model.safetensors.index.json"}


def run_case(family: str, case: str, src_dir: Path, out_dir: Path) -> dict:
    torch.manual_seed(SEED)
    model = model_class(family).from_pretrained(str(src_dir), dtype=torch.bfloat16)
    model.eval()
    cfg = quant_config(case)
    batches = calib_batches(model.config.vocab_size)

    def forward_loop(m):
        with torch.no_grad():
            for ids in batches:
                m(input_ids=ids)

    model = mtq.quantize(model, cfg, forward_loop)
    amax = {k: v.detach().clone() for k, v in model.state_dict().items() if "_amax" in k}

    if out_dir.exists():
        shutil.rmtree(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        with torch.no_grad():
            export_hf_checkpoint(model, export_dir=tmp)
        out_dir.mkdir(parents=True)
        for f in sorted(Path(tmp).iterdir()):
            if f.name in KEEP or f.name.endswith(".safetensors"):
                shutil.copy2(f, out_dir / f.name)
    torch.save(amax, out_dir / "amax.pt")
    for f in out_dir.iterdir():
        f.chmod(0o644)

    with open(out_dir / "hf_quant_config.json") as fh:
        hq = json.load(fh)
    n_tensors = 0
    for f in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            n_tensors += len(list(s.keys()))
    return {
        "tensors": n_tensors,
        "amax_keys": len(amax),
        "quant_algo": hq["quantization"].get("quant_algo"),
        "kv_cache_quant_algo": hq["quantization"].get("kv_cache_quant_algo"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" / "golden"))
    ap.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    args = ap.parse_args(argv)
    out = Path(args.out)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    install_cpu_fake_quant()
    print(f"modelopt {modelopt.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")

    failures = []
    for family in args.families:
        src_dir = out / family / "source"
        model = build_model(family)
        write_source(model, family, src_dir)
        del model
        digest = dir_digest(src_dir)
        for case in args.cases:
            if family in SMALL and case not in MOE_CASES:
                continue
            try:
                info = run_case(family, case, src_dir, out / family / case)
            except Exception as exc:  # keep going: report which case failed
                failures.append((family, case, repr(exc)))
                print(f"{family:10s} {case:10s} FAILED: {exc!r}")
                continue
            assert dir_digest(src_dir) == digest, "export mutated the source checkpoint"
            print(
                f"{family:10s} {case:10s} tensors={info['tensors']:4d} amax_keys={info['amax_keys']:4d} "
                f"quant_algo={info['quant_algo']} kv_cache_quant_algo={info['kv_cache_quant_algo']}"
            )
    with open(out / "VERSIONS.json", "w") as fh:
        json.dump(
            {
                "modelopt": modelopt.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "generator": "tools/make_golden.py",
            },
            fh,
            indent=2,
            sort_keys=True,
        )
        fh.write("\n")
    if failures:
        print("FAILED cases:", failures)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
