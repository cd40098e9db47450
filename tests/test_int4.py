"""INT4 sources (compressed-tensors ``pack-quantized``, Kimi-K2-Thinking style).

The INT4 checkpoint is shardconv.synth_int4's: a generated DeepSeek-V3 whose routed experts are
encoded as the released model stores them, written beside its bf16 dequantization. compressed-tensors
itself (its packing and its compressor's decompression) is the oracle for the bytes; converting the
INT4 checkpoint must give exactly what converting its bf16 dequantization gives.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load_checkpoint, quantize_on_cuda_without_sync, run_cli, same_bytes
from shardconv import numerics, synth_int4
from shardconv.encodings import int4
from test_errors import check_fails


SIZES = dict(weights="structured", num_layers=2, hidden_size=256, intermediate_size=320, num_experts=4,
             vocab_size=256, shard_size=300_000)
EXPERT = "model.layers.1.mlp.experts.1"
MTP_EXPERT = "model.layers.2.mlp.experts.0"  # DeepSeek-V3's MTP layer: excluded, so written dequantized


def compressor():
    """compressed-tensors' pack-quantized compressor: the oracle (in the test extras; the tests that need
    it skip without it, as test_compressed_tensors.py's do; the others run)."""
    return pytest.importorskip("compressed_tensors.compressors.pack_quantized.base").PackedQuantizationCompressor


def scheme(group):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group" if group else "channel",
                            group_size=group)
    return QuantizationScheme(targets=["Linear"], weights=args)


def oracle(packed, scale, shape, group):
    """compressed-tensors' own decompression of one Linear, cast to bf16 (a no-op for bf16 scales)."""
    sd = {"weight_packed": packed, "weight_scale": scale, "weight_shape": torch.as_tensor(shape)}
    return compressor().decompress(sd, scheme(group))["weight"].to(torch.bfloat16)


def random_int4(rows, cols, group, scale_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (rows, cols), generator=gen, dtype=torch.int8)
    q[0, :16] = torch.arange(-8, 8, dtype=torch.int8)  # every code
    groups = cols // (group or cols)
    # scales over many binades (products that round in bf16), a zero and a tiny one
    scale = torch.rand(rows, groups, generator=gen) * 2.0 ** torch.randint(-40, 20, (rows, groups), generator=gen)
    scale[1, 0], scale[2, 0] = 0.0, 2.0**-126
    return q, scale.to(scale_dtype)


@pytest.mark.parametrize("group,scale_dtype", [(32, torch.bfloat16), (128, torch.bfloat16), (32, torch.float32),
                                               (None, torch.bfloat16)])
def test_dequantize_equals_compressed_tensors_bit_for_bit(group, scale_dtype):
    rows, cols = 37, 256
    q, scale = random_int4(rows, cols, group, scale_dtype, seed=cols + (group or 0))
    compressor()
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    packed = pack_to_int32(q, 4)
    assert torch.equal(synth_int4.pack(q), packed)  # the synthetic checkpoints pack as compressed-tensors does
    assert torch.equal(int4.unpack(packed, cols), q.to(torch.int32))
    want = oracle(packed, scale, [rows, cols], group)
    for chunk in (None, 1, 3 * cols):
        assert same_bytes(int4.dequantize(packed, scale, cols, group, chunk=chunk), want)


def test_dequantize_matches_compressed_tensors_compressor_output():
    """Weights compressed by compressed-tensors' own compressor (its quantize and pack)."""
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(3)) * 0.02
    _, scale = synth_int4.quantize(w, 32)
    sd = compressor().compress({"weight": w, "weight_scale": scale}, scheme(32))
    got = int4.dequantize(sd["weight_packed"], sd["weight_scale"], 128, 32)
    assert same_bytes(got, oracle(sd["weight_packed"], sd["weight_scale"], [48, 128], 32))
    assert (got.float() - w).abs().max() <= scale.float().max() / 2 + 1e-6


def write_int4(root, group=32, family="deepseek_v3"):
    sizes = dict(SIZES, moe_intermediate_size=128 if group == 128 else 64)
    if group == 128:
        sizes["intermediate_size"] = 384
    src = synth_int4.write_int4_checkpoint(root / "int4", group_size=group, dequantized=root / "bf16",
                                           family=family, **sizes)
    return src, root / "bf16"


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    return write_int4(tmp_path_factory.mktemp("int4"))


def test_synthetic_checkpoint_is_what_compressed_tensors_reads(kimi):
    src, deq = kimi
    cfg = json.loads((src / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert cfg["model_type"] == "kimi_k2" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 32 and "re:.*self_attn.*" in qc["ignore"]
    a, b = load_checkpoint(src), load_checkpoint(deq)
    modules = [n[: -len(".weight_packed")] for n in a if n.endswith(".weight_packed")]
    assert len(modules) == 4 * 3 * 2 and not [n for n in a if n.endswith(".weight") and "experts." in n
                                              and "shared" not in n]
    for m in modules:
        got = oracle(a[f"{m}.weight_packed"], a[f"{m}.weight_scale"], a[f"{m}.weight_shape"], 32)
        assert same_bytes(got, b[f"{m}.weight"]), m


@pytest.mark.parametrize("family,group,args", [
    ("deepseek_v3", 32, ("--scales", "mse")),
    ("deepseek_v3", 128, ("--scales", "max", "--format", "compressed-tensors")),
    ("deepseek_v3", None, ("--scales", "four-over-six")),
    # llm-compressor W4A16 style, every Linear INT4; model types transformers knows (Linears from its model)
    ("qwen3_moe", 128, ("--scales", "max")),
    ("llama", 32, ("--scales", "mse", "--format", "compressed-tensors")),
])
def test_int4_source_equals_converting_its_bf16_dequantization(tmp_path, family, group, args):
    src, deq = write_int4(tmp_path, group, family)
    assert len(list(src.glob("model-*.safetensors"))) > 1
    for s, out in ((src, "a"), (deq, "b")):
        rc, err = run_cli("convert", s, tmp_path / out, "--device", "cpu", "--no-progress", *args)
        assert rc == 0, err
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert sorted(a) == sorted(b) and not [n for n in a if n.endswith(("weight_shape", "weight_scale_inv"))]
    differ = [n for n in a if not same_bytes(a[n], b[n])]
    assert not differ, differ[:5]
    packed = "weight_packed" if "compressed-tensors" in args else "weight"
    if family == "deepseek_v3":
        assert a[f"{MTP_EXPERT}.down_proj.weight"].dtype == torch.bfloat16  # excluded INT4: dequantized
        assert a[f"{EXPERT}.gate_proj.{packed}"].dtype == torch.uint8
    else:
        assert a[f"model.layers.1.self_attn.q_proj.{packed}"].dtype == torch.uint8
        linears = [n for n in load_checkpoint(src) if n.endswith(".weight_packed")]
        assert len(linears) == (2 * (4 + 4 * 3) if family == "qwen3_moe" else 2 * 7), len(linears)
    for name in ("config.json", "model.safetensors.index.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()


def test_int4_round_trip_within_the_nvfp4_error_bound(kimi, tmp_path):
    """NVFP4 of the INT4 weights, dequantized, is within one block scale of the INT4 dequantization
    (|x| <= 6 rounds to the e2m1 grid, spacing at most 2; block scales from the max: |w| / S <= 6 / (1 -
    2**-4)), and close overall."""
    src, deq = kimi
    rc, err = run_cli("convert", src, tmp_path / "o", "--device", "cpu", "--no-progress", "--scales", "max")
    assert rc == 0, err
    out, ref = load_checkpoint(tmp_path / "o"), load_checkpoint(deq)
    experts = [n[: -len(".weight_scale_2")] for n in out if n.endswith("weight_scale_2") and ".experts." in n
               and ".shared_" not in n]
    assert len(experts) == 12
    for m in experts:
        w = ref[f"{m}.weight"].float()
        s = out[f"{m}.weight_scale"].float() * out[f"{m}.weight_scale_2"]
        back = numerics.dequantize(out[f"{m}.weight"], out[f"{m}.weight_scale"], out[f"{m}.weight_scale_2"])
        bound = s.repeat_interleave(numerics.BLOCK, dim=1)
        assert ((w - back).abs() <= bound).all(), m
        assert ((w - back).norm() / w.norm()) < 0.12, m


def test_excluded_int4_modules_are_written_in_bf16_equal_to_the_dequantization(kimi, tmp_path):
    src, deq = kimi
    rc, err = run_cli("convert", src, tmp_path / "o", "--device", "cpu", "--no-progress", "--scales", "max",
                      "--exclude", f"{EXPERT}.*")
    assert rc == 0, err
    out, ref = load_checkpoint(tmp_path / "o"), load_checkpoint(deq)
    for leaf in ("gate_proj", "up_proj", "down_proj"):
        for m in (f"{EXPERT}.{leaf}", f"{MTP_EXPERT}.{leaf}"):
            assert same_bytes(out[f"{m}.weight"], ref[f"{m}.weight"]), m
            assert not [n for n in out if n.startswith(f"{m}.") and n != f"{m}.weight"], m
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert f"{EXPERT}.gate_proj" in cfg["quantization_config"]["ignore"]


def test_dry_run_names_the_int4_source(kimi, capsys):
    from shardconv.cli import main

    assert main(["convert", str(kimi[0]), "/nonexistent/x", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "INT4 source (pack-quantized, group size 32), dequantized to bf16" in text
    assert "12 excluded INT4 weights dequantized to bf16" in text


def test_verify_passes_int4_outputs_and_fails_damaged_ones(kimi, tmp_path):
    src, _ = kimi
    for fmt in ("modelopt", "compressed-tensors"):
        rc, err = run_cli("convert", src, tmp_path / fmt, "--device", "cpu", "--no-progress", "--scales", "max",
                          "--format", fmt)
        assert rc == 0, err
        assert run_cli("verify", tmp_path / fmt, "--source", src)[0] == 0
    # a quantized expert's codes, and an excluded INT4 expert written dequantized, each damaged once
    packed = f"{EXPERT}.gate_proj.weight"
    for name, needle in ((packed, EXPERT), (f"{MTP_EXPERT}.up_proj.weight", "differ from the source")):
        bad = tmp_path / ("bad-" + name)
        shutil.copytree(tmp_path / "modelopt", bad)
        index = json.loads((bad / "model.safetensors.index.json").read_text())
        shard = bad / index["weight_map"][name]
        tensors = load_file(str(shard))
        t = tensors[name].clone()
        t.view(-1).view(torch.uint8)[7] ^= 0x11
        tensors[name] = t
        save_file(tensors, str(shard), {"format": "pt"})
        (bad / ".shardconv-journal.json").unlink(missing_ok=True)  # the value checks must catch it, not the digest
        rc, err = run_cli("verify", bad, "--source", src)
        assert rc == 1 and needle in err, err


# ------------------------------------------------------------------------------------------------
# bad inputs: one line naming the file and the tensor (or config key), exit status 2, nothing written


@pytest.fixture()
def small(tmp_path):
    return synth_int4.write_int4_checkpoint(tmp_path / "src", num_layers=2, num_experts=2, shard_size=10**9)


def edit(src, fn):
    """Apply ``fn`` to the tensors of the single shard."""
    path = src / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), {"format": "pt"})
    return path


M = "model.layers.1.mlp.experts.0.down_proj"


def test_missing_weight_scale(small, tmp_path):
    path = edit(small, lambda t: t.pop(f"{M}.weight_scale"))
    check_fails(small, tmp_path / "o", path, f"{M}.weight_packed", f"no {M}.weight_scale")


def test_missing_weight_packed(small, tmp_path):
    path = edit(small, lambda t: t.pop(f"{M}.weight_packed"))
    check_fails(small, tmp_path / "o", path, f"{M}.weight_", f"no {M}.weight_packed")


def test_missing_weight_shape(small, tmp_path):
    path = edit(small, lambda t: t.pop(f"{M}.weight_shape"))
    check_fails(small, tmp_path / "o", path, f"no {M}.weight_shape")


def test_scale_of_the_wrong_shape(small, tmp_path):
    def cut(t):
        t[f"{M}.weight_scale"] = t[f"{M}.weight_scale"][:, :1].contiguous()

    path = edit(small, cut)
    check_fails(small, tmp_path / "o", path, f"{M}.weight_scale", "does not fit", "group size 32")


def test_packed_of_the_wrong_dtype(small, tmp_path):
    def to_u8(t):
        t[f"{M}.weight_packed"] = t[f"{M}.weight_packed"].view(torch.uint8)

    path = edit(small, to_u8)
    check_fails(small, tmp_path / "o", path, f"{M}.weight_packed", "int32")


def test_weight_shape_of_the_wrong_size(small, tmp_path):
    def wrong(t):
        t[f"{M}.weight_shape"] = torch.zeros(3, dtype=torch.int64)

    path = edit(small, wrong)
    check_fails(small, tmp_path / "o", path, f"{M}.weight_shape", "I64[3]")


def test_weight_shape_that_disagrees(small, tmp_path):
    def wrong(t):
        t[f"{M}.weight_shape"] = torch.tensor([64, 64])

    path = edit(small, wrong)
    check_fails(small, tmp_path / "o", path, f"{M}.weight_shape", "[64, 64]")


@pytest.mark.parametrize("module", [M, "model.layers.2.mlp.experts.1.up_proj"])  # quantized; excluded (MTP)
def test_nan_scale(small, tmp_path, module):
    def nan(t):
        t[f"{module}.weight_scale"][3, 1] = float("nan")

    path = edit(small, nan)
    check_fails(small, tmp_path / "o", path, f"tensor '{module}.weight_scale' has NaN/Inf scales")


def test_zero_point_beside_symmetric_weights(small, tmp_path):
    path = edit(small, lambda t: t.update({f"{M}.weight_zero_point": torch.zeros(2, dtype=torch.int32)}))
    check_fails(small, tmp_path / "o", path, f"{M}.weight_zero_point")


def set_qc(src, fn):
    cfg = json.loads((src / "config.json").read_text())
    fn(cfg["quantization_config"])
    (src / "config.json").write_text(json.dumps(cfg))


def weights(qc):
    return qc["config_groups"]["group_0"]["weights"]


@pytest.mark.parametrize("change,needle", [
    (lambda qc: weights(qc).update(symmetric=False), "group_0.weights.symmetric is False: asymmetric"),
    (lambda qc: weights(qc).update(actorder="group"), "group_0.weights.actorder is 'group'"),
    (lambda qc: weights(qc).update(num_bits=8), "group_0.weights.num_bits is 8"),
    (lambda qc: weights(qc).update(type="float"), "group_0.weights.type is 'float'"),
    (lambda qc: weights(qc).update(strategy="tensor"), "group_0.weights.strategy is 'tensor'"),
    (lambda qc: qc["config_groups"]["group_0"].update(input_activations={"num_bits": 8, "type": "int"}),
     "group_0.input_activations is set"),
    (lambda qc: qc.update(kv_cache_scheme={"num_bits": 8}), "quantization_config.kv_cache_scheme is set"),
    (lambda qc: qc.update(quantization_status="frozen"), "quantization_status is 'frozen'"),
    (lambda qc: qc["config_groups"].update(group_1={"weights": dict(weights(qc), group_size=128)}),
     "group_0, group_1 differ in group size"),
    (lambda qc: weights(qc).update(group_size=64), "group size 64"),  # config and scale shapes disagree
])
def test_int4_configs_that_are_refused(small, tmp_path, change, needle):
    set_qc(small, change)
    check_fails(small, tmp_path / "o", "config.json" if "group size 64" not in needle else "weight_scale", needle)


# ------------------------------------------------------------------------------------------------
# the GPU path: same bytes as the CPU


@pytest.mark.gpu
@pytest.mark.parametrize("group,scale_dtype", [(32, torch.bfloat16), (128, torch.float32), (None, torch.bfloat16)])
def test_dequantize_cuda_equals_cpu(group, scale_dtype):
    q, scale = random_int4(1000, 1024, group, scale_dtype, seed=5)
    packed = synth_int4.pack(q)
    cpu = int4.dequantize(packed, scale, 1024, group)
    assert same_bytes(int4.dequantize(packed.cuda(), scale.cuda(), 1024, group).cpu(), cpu)
    assert same_bytes(int4.dequantize(packed.cuda(), scale.cuda(), 1024, group, chunk=4096).cpu(), cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("scales", ["max", "mse"])
def test_int4_conversion_cuda_equals_cpu(kimi, tmp_path, scales):
    src, _ = kimi
    for device in ("cpu", "cuda"):
        rc, err = run_cli("convert", src, tmp_path / device, "--device", device, "--no-progress", "--scales", scales)
        assert rc == 0, err
    a, b = load_checkpoint(tmp_path / "cpu"), load_checkpoint(tmp_path / "cuda")
    assert a.keys() == b.keys() and all(same_bytes(a[k], b[k]) for k in a)
    assert run_cli("verify", tmp_path / "cuda", "--source", src)[0] == 0


# ------------------------------------------------------------------------------------------------
# hostile headers: test_fuzz's shard mutations on an INT4 source (its weight_packed, weight_scale and
# weight_shape entries among them): a clean one-line refusal, or an output that verifies


@pytest.mark.heavy
def test_fuzz_int4_headers(tmp_path):
    import random

    from test_fuzz import _make_case, time_limit

    from shardconv.errors import ShardconvError
    from shardconv.formats import get_format
    from shardconv.planning import build_plan
    from shardconv.report import describe
    from shardconv.source import open_source

    base = synth_int4.write_int4_checkpoint(tmp_path / "base", num_layers=2, num_experts=2, hidden_size=64,
                                            intermediate_size=64, moe_intermediate_size=32, vocab_size=64,
                                            num_heads=2, head_dim=32, shard_size=6_000)
    assert len(list(base.glob("model-*.safetensors"))) >= 3
    rng = random.Random(1204)
    outcomes = {"ok": 0, "error": 0, "converted": 0}
    for case in range(400):
        work = tmp_path / "work"
        desc, _ = _make_case(rng, base, work)
        try:
            with time_limit(30):
                try:
                    plan = build_plan(open_source(str(work)), get_format("modelopt"))
                    assert describe(plan) and plan.units
                    outcomes["ok"] += 1
                except ShardconvError as e:
                    assert str(e) and "\n" not in str(e)
                    outcomes["error"] += 1
                    continue
                if outcomes["ok"] % 8 == 1:  # whole conversions of some of the plannable cases
                    dst = tmp_path / f"out{case}"
                    rc, err = run_cli("convert", work, dst, "--device", "cpu", "--no-progress", "--scales", "max")
                    if rc == 0:
                        outcomes["converted"] += 1
                        assert run_cli("verify", dst, "--source", work)[0] == 0
                    else:
                        assert rc == 2 and err.count("\n") == 1, err
                        assert not (dst / "model.safetensors.index.json").exists()
                    shutil.rmtree(dst, ignore_errors=True)
        except BaseException as e:
            raise AssertionError(f"case {case} ({desc}): {type(e).__name__}: {e}") from e
    assert outcomes["ok"] > 8 and outcomes["error"] > 200 and outcomes["converted"] >= 2, outcomes


@pytest.mark.gpu
def test_int4_group_on_cuda_never_waits_for_the_gpu(kimi):
    """The pipeline's call for an INT4 expert group (dequantize on the device, then quantize): no host
    sync (parts are checked on the host before their non-blocking upload), same bytes as the CPU."""
    from shardconv.formats import get_format
    from shardconv.planning import build_plan
    from shardconv.safetensors_io import read_into
    from shardconv.source import open_source

    plan = build_plan(open_source(kimi[0]), get_format("modelopt"), scales="max")
    unit = next(u for u in plan.units if len(u.members) == 2 and all(m.encoded for m in u.members))
    want, got = quantize_on_cuda_without_sync(unit.members, [read_into(m.weight) for m in unit.members])
    for a, b in zip(want, got):
        assert same_bytes(a.packed, b.packed.cpu()) and same_bytes(a.scale, b.scale.cpu()) and bool(b.ok.cpu())


def test_int4_attention_with_kv_amax_equals_its_bf16_dequantization(tmp_path):
    """An amax file with k/v amax over an INT4 source whose attention is INT4 (llm-compressor W4A16,
    k_proj stored as weight_packed): the attention modules are found, and the output (KV scales
    included) is what the bf16 dequantization gives."""
    from test_amax import make_amax, weights

    src, deq = write_int4(tmp_path, 32, "llama")
    amax = make_amax(weights(deq))
    assert any(k.endswith("k_bmm_quantizer._amax") for k in amax)
    torch.save(amax, tmp_path / "amax.pt")
    for s, out in ((src, "a"), (deq, "b")):
        rc, err = run_cli("convert", s, tmp_path / out, "--device", "cpu", "--no-progress", "--amax", tmp_path / "amax.pt")
        assert rc == 0, err
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert "model.layers.0.self_attn.k_proj.k_scale" in a and sorted(a) == sorted(b)
    assert all(same_bytes(a[n], b[n]) for n in a)
