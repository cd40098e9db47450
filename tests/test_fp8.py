"""FP8 block-quantized sources (DeepSeek-V3 style) and the refusal of already-quantized inputs.

The FP8 checkpoint is made here from a generated bf16 DeepSeek-V3: every Linear weight the released
model stores in FP8 gets ``weight`` float8_e4m3fn and a float32 ``weight_scale_inv`` per 128x128
block (ragged edges included), and config.json the released ``quantization_config``. Converting it
must give exactly what converting its bf16 dequantization gives.
"""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load_checkpoint, run_cli, same_bytes
from shardconv.encodings import fp8_blocks as fp8
from shardconv.synth import write_checkpoint

BLOCK = (128, 128)
QC = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(BLOCK)}


def is_fp8_linear(name, shape):
    """What DeepSeek-V3's FP8 release keeps in FP8: decoder Linears, not embeddings, heads or routers."""
    skip = ("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight", "mlp.gate.weight")
    return name.endswith(".weight") and len(shape) == 2 and not name.endswith(skip)


def to_fp8_blocks(w, block=BLOCK):
    """Reference FP8 block quantization: scale_inv = block amax / 448, w8 = e4m3(w / scale_inv)."""
    w = w.float()
    rows, cols = w.shape
    b0, b1 = block
    nr, nc = math.ceil(rows / b0), math.ceil(cols / b1)
    scale = torch.empty(nr, nc)
    for i in range(nr):
        for j in range(nc):
            scale[i, j] = w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1].abs().max().clamp(min=1e-12) / 448.0
    full = scale.repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
    return (w / full).to(torch.float8_e4m3fn), scale


def reference_dequant(w8, scale, block=BLOCK):
    rows, cols = w8.shape
    full = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (w8.float() * full).to(torch.bfloat16)


def make_fp8(src, dst, *, input_scales=False):
    """FP8 copy of ``src`` (same shards) and, beside it, the bf16 dequantization of that copy."""
    deq = dst.with_name(dst.name + "-bf16")
    for d in (dst, deq):
        d.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    new_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors, plain = {}, {}
        for name, t in load_file(str(src / shard)).items():
            if is_fp8_linear(name, t.shape):
                w8, s = to_fp8_blocks(t)
                tensors[name], tensors[name[: -len("weight")] + "weight_scale_inv"] = w8, s
                if input_scales:
                    tensors[name[: -len("weight")] + "input_scale"] = torch.tensor(1.0)
                plain[name] = reference_dequant(w8, s)
            else:
                tensors[name] = plain[name] = t
        save_file(tensors, str(dst / shard), {"format": "pt"})
        save_file(plain, str(deq / shard), {"format": "pt"})
        new_map.update({k: shard for k in tensors})
    cfg = json.loads((src / "config.json").read_text())
    (deq / "config.json").write_text(json.dumps(cfg))
    (deq / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg["quantization_config"] = QC
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": new_map}))
    return dst, deq


@pytest.fixture(scope="module")
def deepseek_fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    # hidden 256 and intermediate 320 give several and ragged 128x128 blocks (kv_a_proj_with_mqa: 96 rows)
    src = write_checkpoint(root / "bf16", family="deepseek_v3", weights="structured", num_layers=2,
                           hidden_size=256, intermediate_size=320, moe_intermediate_size=64, num_experts=4,
                           vocab_size=256, shard_size=300_000)
    return make_fp8(src, root / "fp8")


def test_fp8_source_equals_converting_its_bf16_dequantization(deepseek_fp8, tmp_path):
    fp8_src, bf16_src = deepseek_fp8
    assert len(list(fp8_src.glob("model-*.safetensors"))) > 1
    rc, err = run_cli("convert", fp8_src, tmp_path / "a", "--device", "cpu", "--no-progress")
    assert rc == 0, err
    rc, err = run_cli("convert", bf16_src, tmp_path / "b", "--device", "cpu", "--no-progress")
    assert rc == 0, err
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert sorted(a) == sorted(b) and not [n for n in a if n.endswith("weight_scale_inv")]
    differ = [n for n in a if not same_bytes(a[n], b[n])]
    assert not differ, differ[:5]
    # the excluded MTP layer's FP8 Linears came out dequantized, as bf16
    assert a["model.layers.2.self_attn.o_proj.weight"].dtype == torch.bfloat16
    assert a["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.uint8
    ca, cb = (json.loads((tmp_path / d / "config.json").read_text()) for d in "ab")
    assert ca == cb and ca["quantization_config"]["quant_method"] == "modelopt"
    ia, ib = (json.loads((tmp_path / d / "model.safetensors.index.json").read_text()) for d in "ab")
    assert ia == ib


def test_fp8_input_scales_are_dropped_in_w4a4(deepseek_fp8, tmp_path):
    """FP8 activation scales (static FP8 checkpoints) are not NVFP4 input scales: dropped, not clashing."""
    src, _ = deepseek_fp8
    with_scales, _ = make_fp8(write_checkpoint(tmp_path / "bf16", family="deepseek_v3", num_layers=2,
                                               shard_size=300_000), tmp_path / "fp8", input_scales=True)
    rc, err = run_cli("convert", with_scales, tmp_path / "out", "--no-progress")
    assert rc == 0, err
    out = load_checkpoint(tmp_path / "out")
    assert not [n for n in out if n.endswith(("input_scale", "weight_scale_inv"))]


def test_fp8_dry_run_and_bad_scale(deepseek_fp8, tmp_path, capsys):
    from shardconv.cli import main

    src, _ = deepseek_fp8
    assert main(["convert", str(src), str(tmp_path / "x"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "FP8 source, 128x128 blocks, dequantized to bf16" in text
    assert "excluded FP8 weights dequantized to bf16" in text
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [64, 64]
    (bad / "config.json").write_text(json.dumps(cfg))
    rc, err = run_cli("convert", bad, tmp_path / "o", "--no-progress")
    assert rc == 2 and "weight_scale_inv" in err and "64x64" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("shape,block", [((300, 200), (128, 128)), ((96, 256), (128, 128)), ((64, 48), (32, 16))])
def test_dequantize_matches_reference_in_small_chunks(shape, block):
    w = torch.randn(shape) * 0.1
    w8, s = to_fp8_blocks(w, block)
    want = reference_dequant(w8, s, block)
    for chunk in (None, 1, 5000):
        assert same_bytes(fp8.dequantize(w8, s, block, chunk=chunk), want)


@pytest.mark.gpu
def test_dequantize_cuda_equals_cpu():
    w = torch.randn(1000, 777) * 3
    w8, s = to_fp8_blocks(w)
    assert same_bytes(fp8.dequantize(w8.cuda(), s.cuda(), BLOCK).cpu(), fp8.dequantize(w8, s, BLOCK))


@pytest.mark.gpu
def test_fp8_conversion_cuda_equals_cpu(deepseek_fp8, tmp_path):
    src, _ = deepseek_fp8
    assert run_cli("convert", src, tmp_path / "cpu", "--device", "cpu", "--no-progress")[0] == 0
    assert run_cli("convert", src, tmp_path / "gpu", "--device", "cuda", "--no-progress")[0] == 0
    a, b = load_checkpoint(tmp_path / "cpu"), load_checkpoint(tmp_path / "gpu")
    assert a.keys() == b.keys() and all(same_bytes(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# inputs that are refused: one line, exit status 2


@pytest.fixture()
def llama(tmp_path):
    return write_checkpoint(tmp_path / "src", family="llama", num_layers=1, shard_size=10**9)


def with_config(src, **qc):
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = qc
    (src / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("qc,needle", [
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "already quantized to 4 bits (ModelOpt NVFP4)"),
    ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
      "config_groups": {"g": {"weights": {"num_bits": 4, "type": "float"}}}}, "4 bits (compressed-tensors"),
    ({"quant_method": "gptq", "bits": 4}, "4 bits (GPTQ int4)"),
    ({"quant_method": "awq", "bits": 4}, "4 bits (AWQ int4)"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "4 bits (bitsandbytes 4-bit)"),
    ({"quant_method": "mxfp4"}, "4 bits (MXFP4)"),
    ({"quant_method": "fp8", "activation_scheme": "static"}, "without a [rows, cols] weight_block_size"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "already quantized (bitsandbytes 8-bit)"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float"}}}}, "already quantized (compressed-tensors"),
])
def test_quantized_inputs_are_refused(llama, tmp_path, qc, needle):
    with_config(llama, **qc)
    rc, err = run_cli("convert", llama, tmp_path / "out", "--no-progress")
    assert rc == 2 and err.count("\n") == 1 and needle in err and "config.json" in err, err
    assert not (tmp_path / "out").exists()


def test_nvfp4_without_config_is_refused(llama, tmp_path):
    """An older ModelOpt export (hf_quant_config.json only) or stray packed tensors."""
    (llama / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))
    rc, err = run_cli("convert", llama, tmp_path / "out", "--no-progress")
    assert rc == 2 and "hf_quant_config.json" in err and "4 bits" in err, err
    (llama / "hf_quant_config.json").unlink()
    t = load_file(str(llama / "model.safetensors"))
    t["model.layers.0.mlp.down_proj.weight_packed"] = torch.zeros(4, 4, dtype=torch.uint8)
    save_file(t, str(llama / "model.safetensors"))
    rc, err = run_cli("convert", llama, tmp_path / "out", "--no-progress")
    assert rc == 2 and "weight_packed" in err and "4 bits" in err, err
