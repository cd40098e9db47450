"""Hostile inputs, class 1: no non-finite or degenerate number in a finished output.

Every tensor written (quantized, kept, or dequantized from FP8) is finite; weight_scale_2 and
input_scale are finite and usable (normal fp32 with a finite reciprocal); an all-zero fusion group
gives a valid checkpoint (global amax 6.0, zero codes) where ModelOpt would write 0/0 = NaN scales.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load_checkpoint, run_cli, tree_digest
from shardconv import numerics as nx
from shardconv.quantize import ZERO_GROUP_AMAX, quantize_group, redo_on_cpu
from shardconv.errors import ShardconvError
from shardconv.synth import write_checkpoint
from test_fp8 import make_fp8

QKV = ("q_proj", "k_proj", "v_proj")


def edit(src, changes: dict):
    """Replace tensors of a checkpoint in place (name -> function of the old tensor)."""
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted({index[n] for n in changes}):
        tensors = load_file(str(src / shard))
        for name, fn in changes.items():
            if index[name] == shard:
                tensors[name] = fn(tensors[name])
        save_file(tensors, str(src / shard), metadata={"format": "pt"})


@pytest.fixture()
def llama(tmp_path):
    return write_checkpoint(tmp_path / "src", family="llama", weights="structured", num_layers=2, shard_size=100_000)


def all_finite(out: dict) -> list[str]:
    bad = []
    for name, t in out.items():
        if t.dtype == torch.float8_e4m3fn:
            if ((t.view(torch.uint8) & 0x7F) == 0x7F).any():
                bad.append(name)
        elif t.is_floating_point() and not torch.isfinite(t).all():
            bad.append(name)
    return bad


@pytest.mark.parametrize("method,block_byte,norm", [("max", 0x38, 448.0), ("mse", 0x01, 448.0),
                                                    ("four-over-six", 0x78, 256.0)])
def test_all_zero_weights_give_a_valid_checkpoint(llama, tmp_path, method, block_byte, norm):
    """(block bytes: max 1.0 as ModelOpt's [==0]=1 rule; mse 0x01, FORMAT.md §2; four-over-six: 1.0 * 256 / (6 / 6))"""
    """A lone zero Linear and a whole zero q/k/v group: finite scales, zero codes, exact zeros back."""
    zeros = {"model.layers.0.mlp.down_proj.weight": torch.zeros_like}
    zeros.update({f"model.layers.1.self_attn.{p}.weight": torch.zeros_like for p in QKV})
    zeros["model.layers.0.self_attn.v_proj.weight"] = torch.zeros_like  # one zero member of a live group
    edit(llama, zeros)
    dst = tmp_path / "out"
    rc, err = run_cli("convert", llama, dst, "--device", "cpu", "--scales", method, "--no-progress")
    assert rc == 0, err
    out = load_checkpoint(dst)
    assert not all_finite(out)
    want_s2 = nx.global_scale(torch.tensor(ZERO_GROUP_AMAX), norm)
    for m in ["model.layers.0.mlp.down_proj"] + [f"model.layers.1.self_attn.{p}" for p in QKV]:
        assert torch.equal(out[f"{m}.weight_scale_2"], want_s2), m
        assert float(out[f"{m}.weight_scale_2"]) > 0 and torch.isfinite(1 / out[f"{m}.weight_scale_2"])
        assert not out[f"{m}.weight"].any(), m  # every code is +0
        assert (out[f"{m}.weight_scale"].view(torch.uint8) == block_byte).all(), m
        deq = nx.dequantize(out[f"{m}.weight"], out[f"{m}.weight_scale"], out[f"{m}.weight_scale_2"])
        assert not deq.any()
    # the zero v_proj shares its live group's scale, not the fallback
    s2 = out["model.layers.0.self_attn.v_proj.weight_scale_2"]
    assert torch.equal(s2, out["model.layers.0.self_attn.q_proj.weight_scale_2"]) and not torch.equal(s2, want_s2)
    rc, err = run_cli("verify", dst, "--source", llama)
    assert rc == 0, err


def test_all_zero_group_compressed_tensors_has_finite_global_scales(llama, tmp_path):
    edit(llama, {f"model.layers.1.self_attn.{p}.weight": torch.zeros_like for p in QKV})
    rc, err = run_cli("convert", llama, tmp_path / "ct", "--format", "compressed-tensors", "--scales", "max",
                      "--no-progress")
    assert rc == 0, err
    out = load_checkpoint(tmp_path / "ct")
    assert not all_finite(out)
    g = out["model.layers.1.self_attn.q_proj.weight_global_scale"]
    assert torch.isfinite(g).all() and (g > 0).all()


def fails(src, dst, *needles, args=()):
    before = tree_digest(src)
    rc, err = run_cli("convert", src, dst, "--no-progress", *args)
    assert rc == 2 and err.startswith("shardconv: error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, (n, err)
    assert tree_digest(src) == before
    assert not (dst / "model.safetensors.index.json").exists()
    return err


@pytest.mark.parametrize("method", ["max", "mse"])
def test_a_weight_too_small_for_nvfp4_scales_is_refused(llama, tmp_path, method):
    """max |w| = 1e-37: weight_scale_2 would be subnormal and 1/weight_scale_2 infinite."""
    name = "model.layers.0.mlp.down_proj.weight"
    edit(llama, {name: lambda t: torch.full_like(t, 1e-37)})
    fails(llama, tmp_path / "out", name, "weight_scale_2", "--exclude", args=("--scales", method))


@pytest.mark.parametrize("method", ["max", "mse"])
def test_a_member_quantized_to_all_zeros_is_refused(llama, tmp_path, method):
    """k_proj 1e-9 of its q_proj and v_proj: under the group's one weight_scale_2 every FP4 code of it is 0.
    Written, the layer would serve a dead projection; it converted with exit 0 before stop 21."""
    name = "model.layers.1.self_attn.k_proj.weight"
    edit(llama, {name: lambda t: t * 1e-9})
    fails(llama, tmp_path / "out", name, "every value quantizes to 0", "--exclude", args=("--scales", method))


def test_the_fp8_scale_that_zeroes_its_fusion_group_is_refused(fp8_src, tmp_path):
    """The case behind the rule: one FP8 block scale of 1e30 in k_proj makes the group's max so large
    that q_proj and v_proj quantize to zeros (verify --source saw it, convert exited 0 before stop 21)."""
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    if name not in load_checkpoint(fp8_src):
        name = next(n for n in load_checkpoint(fp8_src) if n.endswith("q_a_proj.weight_scale_inv"))

    def huge(t):
        t = t.clone()
        t.view(-1)[0] = 1e30
        return t
    edit(fp8_src, {name: huge})
    fails(fp8_src, tmp_path / "out", "every value quantizes to 0")


def test_nan_in_a_kept_tensor_is_refused(llama, tmp_path):
    name = "model.layers.1.input_layernorm.weight"

    def poison(t):
        t = t.clone()
        t[5] = float("nan")
        return t
    edit(llama, {name: poison})
    err = fails(llama, tmp_path / "out", name, "NaN/Inf", "flat index 5")
    assert "model.norm" not in err


def test_inf_in_a_kept_f32_tensor_is_refused(tmp_path):
    src = write_checkpoint(tmp_path / "src", family="llama", num_layers=2, shard_size=100_000, dtype=torch.float32)
    edit(src, {"model.norm.weight": lambda t: torch.cat([t[:-1], torch.tensor([float("inf")])])})
    fails(src, tmp_path / "out", "model.norm.weight", "NaN/Inf")


@pytest.fixture()
def fp8_src(tmp_path):
    bf16 = write_checkpoint(tmp_path / "bf16", family="deepseek_v3", weights="structured", num_layers=2,
                            hidden_size=256, intermediate_size=320, moe_intermediate_size=64, num_experts=4,
                            vocab_size=256, shard_size=300_000)
    src, _ = make_fp8(bf16, tmp_path / "fp8")
    return src


def test_fp8_scale_that_overflows_bf16_in_an_excluded_weight_is_refused(fp8_src, tmp_path):
    """Excluded FP8 weights are written dequantized (bf16): an Inf there would ship."""
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    edit(fp8_src, {name: lambda t: torch.full_like(t, float("inf"))})
    fails(fp8_src, tmp_path / "out", "model.layers.0.self_attn.o_proj.weight", "dequantizes to NaN/Inf",
          args=("--exclude", "model.layers.0.self_attn.o_proj"))


def test_fp8_scale_that_overflows_bf16_in_a_quantized_weight_is_refused(fp8_src, tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    edit(fp8_src, {name: lambda t: torch.full_like(t, 3e38)})  # fp32 * e4m3 up to 448 overflows
    fails(fp8_src, tmp_path / "out", "model.layers.0.self_attn.o_proj.weight", "after FP8 dequantization")


def members_of(src, names):
    from shardconv.formats import get_format
    from shardconv.planning import build_plan
    from shardconv.source import open_source

    plan = build_plan(open_source(str(src)), get_format("modelopt"), scales="max")
    by = {m.module: m for m in plan.quantized}
    return [by[n] for n in names]


@pytest.mark.parametrize("fill,ok", [(0.0, True), (0.5, True), (1e-37, False), (float("nan"), False),
                                     (float("inf"), False)])
def test_device_flag_matches_the_cpu_checks(llama, fill, ok):
    """The device path's one bool per member (check=False, no sync) says False exactly when the CPU
    path (check=True) raises, and redo_on_cpu() then gives the CPU's message."""
    (m,) = members_of(llama, ["model.layers.0.mlp.down_proj"])
    w = torch.full(m.weight.shape, fill, dtype=torch.bfloat16)
    (q,) = quantize_group([m], [w], "max", "cpu", check=False)
    assert bool(q.ok) is ok
    if ok:
        quantize_group([m], [w], "max", "cpu", check=True)
    else:
        with pytest.raises(ShardconvError, match="down_proj"):
            redo_on_cpu([m], [w], "max")


@pytest.mark.gpu
@pytest.mark.parametrize("fill,ok", [(0.0, True), (1e-37, False), (float("nan"), False)])
def test_device_flag_on_cuda(llama, fill, ok):
    (m,) = members_of(llama, ["model.layers.0.mlp.down_proj"])
    w = torch.full(m.weight.shape, fill, dtype=torch.bfloat16)
    (q,) = quantize_group([m], [w.cuda()], "max", "cuda", check=False, to_cpu=False)
    assert bool(q.ok.cpu()) is ok
    if ok:
        (ref,) = quantize_group([m], [w], "max", "cpu")
        assert torch.equal(q.scale_2.cpu(), ref.scale_2) and torch.equal(q.packed.cpu(), ref.packed)


@pytest.mark.parametrize("method,fill,spot,ok", [
    ("max", 0.0, None, True), ("max", 0.5, None, True), ("max", 1e-37, None, False),
    ("max", 0.5, float("nan"), False), ("max", 0.5, float("inf"), False),
    # scales from the amax file: the weights' own max is not taken, so only the finite check sees these
    ("amax", 0.5, None, True), ("amax", 0.5, float("nan"), False), ("amax", 0.5, float("-inf"), False),
    # weights far below the file's amax: every FP8 code 0, written as zeros with exit 0 before (found by review)
    ("amax", 1e-12, None, False), ("max", 1e-12, None, True),
])
def test_device_flag_matches_the_cpu_checks_for_fp8_layers(method, fill, spot, ok):
    """The same for a mixed recipe's FP8 layer (quantize_fp8.py): check=False flags exactly what
    check=True refuses, and redo_on_cpu() gives the CPU's message (the GPU path relies on the flag)."""
    from pathlib import Path

    from shardconv import api

    golden = Path(__file__).parent / "golden" / "qwen3_moe"
    p = api.plan(golden / "source", scales=method, amax=golden / "mixed_w4a4" / "amax.pt",
                 recipe="nvfp4-experts-fp8")
    (m,) = [m for m in p.quantized if m.module == "model.layers.0.self_attn.o_proj"]
    assert m.target == "fp8" and m.amax is not None and m.amax.input is not None
    w = torch.full(m.weight.shape, fill, dtype=torch.bfloat16)
    if spot is not None:
        w[3, 5] = spot  # one bad value in otherwise usable weights
    (q,) = quantize_group([m], [w], method, "cpu", check=False)
    assert getattr(q, "fp8", False) and bool(q.ok) is ok
    if ok:
        quantize_group([m], [w], method, "cpu", check=True)
    else:
        with pytest.raises(ShardconvError, match="o_proj"):
            redo_on_cpu([m], [w], method)


@pytest.mark.parametrize("method", ["max", "cast"])
def test_an_expert_of_a_stack_quantized_to_all_zeros_is_refused(tmp_path, method):
    """GPT-OSS's experts are one stacked tensor under one weight_scale_2: an MXFP4 scale 2^40 too large in
    expert 0 zeroed experts 1-3, and the stack as a whole had nonzero codes (exit 0 before; found by
    review). Each expert of a stack is held to the rule on its own."""
    from shardconv.synth_mxfp4 import write_mxfp4_checkpoint

    src = write_mxfp4_checkpoint(tmp_path / "src", num_layers=2, shard_size=100_000)
    name = next(n for n in load_checkpoint(src) if n.endswith("layers.0.mlp.experts.gate_up_proj_scales"))

    def inflate(t):
        t = t.clone()
        t.view(-1)[0] += 40  # E8M0 exponent byte
        return t
    edit(src, {name: inflate})
    fails(src, tmp_path / "out", "gate_up_proj", "(expert 1)", "every value quantizes to 0", args=("--scales", method))
