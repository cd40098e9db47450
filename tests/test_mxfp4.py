"""MXFP4 sources (gpt-oss): exact dequantization, the lossless cast to NVFP4 (scales "cast"), its
fallback count, --scales max/mse from the dequantized weights, verify, refusals."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load_checkpoint, run_cli, same_bytes, tree_digest
from shardconv import api, cast, numerics
from shardconv.encodings.mxfp4 import dequantize, pow2
from shardconv.synth_mxfp4 import FAR_BINADES, QUANTIZATION_CONFIG, dequantize_reference, encode, write_mxfp4_checkpoint
from test_verify import fails, passes, rewrite

STACKS = ("gate_up_proj", "down_proj")
GOLDEN = Path(__file__).parent / "golden" / "gpt_oss_mxfp4"
SYNTH = dict(num_layers=2, shard_size=200_000)  # 5 shards: stacks and their scales in different files


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_mxfp4_checkpoint(tmp_path_factory.mktemp("mx") / "src", **SYNTH)


@pytest.fixture(scope="module")
def out(src, tmp_path_factory) -> tuple[Path, api.ConvertResult]:
    dst = tmp_path_factory.mktemp("mxout") / "out"
    return dst, api.convert(src, dst, device="cpu", progress=False)


def source_tensors(src: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(src.glob("model*.safetensors")):
        out.update(load_file(str(f)))
    return out


def stacks(tensors):
    for name in sorted(tensors):
        if name.endswith("_blocks"):
            base = name[: -len("_blocks")]
            yield base, tensors[name], tensors[base + "_scales"]


def window(e8m0: torch.Tensor, kmax: int) -> torch.Tensor:
    """Blocks the cast must keep exactly, by the rule stated in cast.py (independently written)."""
    return (e8m0.long() - 127) >= kmax - 17


# -- dequantization --------------------------------------------------------------------------------

def test_dequantize_equals_transformers_bit_for_bit():
    """Every code and every E8M0 exponent but NaN (0xFF), against transformers' gpt-oss loader."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 255, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.arange(255, dtype=torch.uint8).reshape(1, 255, 1).repeat(3, 1, 4)
    scales[1] = torch.randint(0, 255, (255, 4), dtype=torch.uint8, generator=gen)
    want = convert_moe_packed_tensors(blocks, scales)  # [E, in, out] bf16
    got = dequantize(blocks, scales).transpose(1, 2)
    assert torch.equal(got.contiguous().view(torch.int16), want.view(torch.int16))
    assert torch.equal(dequantize_reference(blocks, scales).view(torch.int16), want.view(torch.int16))


def test_pow2_is_exact_and_nan_for_ff():
    e = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    p = pow2(e)
    assert torch.equal(p[:255].double(), torch.pow(2.0, torch.arange(255, dtype=torch.float64) - 127))
    assert torch.isnan(p[255])


# -- the lossless cast ----------------------------------------------------------------------------

def test_cast_is_exact_element_by_element_and_counts_the_fallback(src, out):
    """Dequantized output equals dequantized input bit for bit in every block inside the window
    (zeros compared as values: -0 is written +0); the blocks outside it are exactly those counted."""
    dst, result = out
    got = load_checkpoint(dst)
    source = source_tensors(src)
    expected_far = 0
    checked = 0
    for base, blocks, scales in stacks(source):
        w = dequantize_reference(blocks, scales)  # [E, in, out]
        packed, scale, s2 = got[base], got[f"{base}_weight_scale"], got[f"{base}_weight_scale_2"]
        nonzero = scales[scales > 0]
        kmax = int(nonzero.max()) - 127
        assert float(s2) == 2.0 ** (kmax - 8)  # ModelOpt's cast: weight_scale_2 = 2**(k_max - 8)
        inside = window(scales, kmax)
        far = (scales > 0) & ~inside
        expected_far += int(far.sum())
        for e in range(blocks.shape[0]):
            deq = numerics.dequantize(packed[e].T.contiguous(), scale[e].T.contiguous(), s2)  # [out, in]
            mask = inside[e].repeat_interleave(32, dim=-1)
            assert torch.equal(deq[mask], w[e].T.float()[mask]), (base, e)
            checked += int(mask.sum())
    assert expected_far == 2 * (2 + 1) * len(STACKS)  # per stack: far_blocks=2 and the block 18 binades down
    assert result.requantized_blocks == expected_far
    assert result.mxfp4_blocks == sum(b.numel() // 16 for _, b, _ in stacks(source))
    assert checked > 0
    assert any(f"{expected_far} of {result.mxfp4_blocks} blocks requantized" in line for line in result.lines())


def test_far_blocks_take_the_smallest_scale(src, out):
    """A block below the window gets block scale 2**-9 (ModelOpt's clamp), the whole 16-block pair."""
    dst, _ = out
    got = load_checkpoint(dst)
    for base, blocks, scales in stacks(source_tensors(src)):
        kmax = int(scales[scales > 0].max()) - 127
        far = ((scales > 0) & ~window(scales, kmax)).repeat_interleave(2, dim=-1)  # [E, out, in/16]
        s = got[f"{base}_weight_scale"].transpose(1, 2).view(torch.uint8)  # [E, out, in/16]
        assert far.any() and bool((s[far] == 0x01).all())


def test_cast_default_only_for_mxfp4_and_refused_elsewhere(tmp_path):
    from shardconv.synth import write_checkpoint

    plain = write_checkpoint(tmp_path / "bf16", family="gpt_oss", num_layers=1)
    rc, err = run_cli("convert", plain, tmp_path / "o", "--scales", "cast", "--no-progress")
    assert rc == 2 and err.count("\n") == 1 and "--scales cast needs an MXFP4 source" in err, err
    assert api.plan(plain).scales == "mse"


def test_broken_cast_is_refused_not_written(src, tmp_path, monkeypatch):
    """The element-by-element check is live: a cast that loses a value inside the window is refused."""
    real = cast.prepare

    def off_by_one_binade(members, device):
        cg = real(members, device)
        for m in cg.members:
            m.amax.weight = m.amax.weight * 2  # every block scale one binade too big: codes halve
        return cg

    monkeypatch.setattr(cast, "prepare", off_by_one_binade)
    rc, err = run_cli("convert", src, tmp_path / "o", "--device", "cpu", "--no-progress")
    assert rc != 0 and "lossless MXFP4 cast changed a value" in err, err
    assert not (tmp_path / "o" / "model.safetensors.index.json").exists()


def test_cast_bytes_equal_modelopt(tmp_path):
    """Bytes equal ModelOpt 0.47's quantize_mxfp4_to_nvfp4_lossless (tools/make_mxfp4_golden.py)."""
    meta = json.loads((GOLDEN / "meta.json").read_text())
    src = write_mxfp4_checkpoint(tmp_path / "src", **meta["synth"])
    source = source_tensors(src)
    for base, blocks, scales in stacks(source):
        assert meta["inputs"][base] == torch.cat([blocks.reshape(-1), scales.reshape(-1)]).sum().item(), \
            "synth_mxfp4 changed: run tools/make_mxfp4_golden.py again"
    result = api.convert(src, tmp_path / "out", device="cpu", progress=False)
    got = load_checkpoint(tmp_path / "out")
    want = load_file(str(GOLDEN / "expected.safetensors"))
    # ModelOpt's count of blocks it could not cast losslessly is the summary's count
    assert result.requantized_blocks == sum(int(v[0] - v[1]) for k, v in want.items() if k.endswith(".lossless")) > 0
    n = 0
    for base, _, _ in stacks(source):
        assert torch.equal(got[base].transpose(1, 2), want[f"{base}.packed"]), base
        assert torch.equal(got[f"{base}_weight_scale"].transpose(1, 2).view(torch.uint8),
                           want[f"{base}.scale"].view(torch.uint8)), base
        assert torch.equal(got[f"{base}_weight_scale_2"], want[f"{base}.scale_2"]), base
        n += 1
    assert n == 2 * len(STACKS)


# -- other scale methods, exclusion ---------------------------------------------------------------

def dequantized_copy(src: Path, dst: Path) -> Path:
    """The same model as a bf16 checkpoint (gpt-oss's bf16 layout), no quantization_config."""
    shutil.copytree(src, dst)
    for f in dst.glob("model*.safetensors"):
        t = load_file(str(f))
        for base, blocks, scales in list(stacks(t)):
            t[base] = dequantize_reference(blocks, scales)
            del t[base + "_blocks"], t[base + "_scales"]
        save_file(t, str(f), metadata={"format": "pt"})
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    wm = {}
    for k, v in index["weight_map"].items():
        wm[k[: -len("_blocks")] if k.endswith("_blocks") else k] = v
    index["weight_map"] = {k: v for k, v in wm.items() if not k.endswith("_scales")}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("method", ["max", "mse"])
def test_scales_from_dequantized_weights_equal_bf16_source(src, tmp_path, method):
    """--scales max|mse on MXFP4 give the bytes (and configs) of the same model converted from bf16."""
    bf16 = dequantized_copy(src, tmp_path / "bf16")
    api.convert(src, tmp_path / "a", scales=method, device="cpu", progress=False)
    api.convert(bf16, tmp_path / "b", scales=method, device="cpu", progress=False)
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert same_bytes(a[k], b[k]), k
    read = lambda d, name: json.loads((tmp_path / d / name).read_text())
    assert read("a", "hf_quant_config.json") == read("b", "hf_quant_config.json")
    assert read("a", "config.json")["quantization_config"] == read("b", "config.json")["quantization_config"]


def test_excluded_stack_is_written_dequantized(src, tmp_path):
    dst = tmp_path / "o"
    rc, err = run_cli("convert", src, dst, "--exclude", "model.layers.0.mlp.experts", "--device", "cpu",
                      "--no-progress")
    assert rc == 0, err
    got = load_checkpoint(dst)
    for base, blocks, scales in stacks(source_tensors(src)):
        if base.startswith("model.layers.0."):
            assert got[base].dtype == torch.bfloat16
            assert torch.equal(got[base].view(torch.int16), dequantize_reference(blocks, scales).view(torch.int16))
        assert base + "_blocks" not in got and base + "_scales" not in got
    assert "model.layers.0.mlp.experts" in json.loads((dst / "hf_quant_config.json").read_text())["quantization"][
        "exclude_modules"]
    passes(dst, "--source", src)


def test_compressed_tensors_writes_stacks_dequantized(src, tmp_path):
    """compressed-tensors has no stacked-expert layout: the MXFP4 stacks are kept, as bf16."""
    dst = tmp_path / "o"
    r = api.convert(src, dst, format="compressed-tensors", device="cpu", progress=False)
    got = load_checkpoint(dst)
    for base, blocks, scales in stacks(source_tensors(src)):
        assert torch.equal(got[base].view(torch.int16), dequantize_reference(blocks, scales).view(torch.int16))
    assert r.requantized_blocks is None and r.mxfp4_blocks == 0  # nothing cast: no summary line
    assert not any("MXFP4 cast" in line for line in r.lines())
    passes(dst, "--source", src)


# -- verify ---------------------------------------------------------------------------------------

def test_verify_passes_the_cast(src, out):
    text = passes(out[0], "--source", src)
    assert "scales: cast" in text
    passes(out[0])


def test_verify_without_journal_finds_the_cast(src, out, tmp_path):
    dst = Path(shutil.copytree(out[0], tmp_path / "copy"))
    (dst / ".shardconv-journal.json").unlink(missing_ok=True)
    for j in dst.glob(".shardconv*"):
        j.unlink()
    text = passes(dst, "--source", src)
    assert "scales: cast" in text


def test_verify_cast_against_a_bf16_source_says_why(src, out, tmp_path):
    bf16 = dequantized_copy(src, tmp_path / "bf16")
    rc, err = run_cli("verify", out[0], "--source", bf16)
    assert rc == 2 and err.count("\n") == 1 and "scales cast (from the journal of DST)" in err \
        and "needs the MXFP4 source" in err, err


@pytest.mark.parametrize("what", ["scale", "codes"])
def test_verify_fails_a_damaged_cast(src, out, tmp_path, what):
    dst = Path(shutil.copytree(out[0], tmp_path / "copy"))
    base = "model.layers.1.mlp.experts.down_proj"
    if what == "scale":  # one block scale one e4m3 step up: finite, plausible, only recomputation sees it
        name = f"{base}_weight_scale"
        fn = lambda t: t.__setitem__(name, (t[name].view(torch.uint8) + (torch.arange(t[name].numel()) == 7)
                                            .reshape(t[name].shape).to(torch.uint8)).view(torch.float8_e4m3fn))
    else:
        name = base
        fn = lambda t: t.__setitem__(name, t[name] ^ (torch.arange(t[name].numel()) == 5)
                                     .reshape(t[name].shape).to(torch.uint8))
    rewrite(dst, name, fn)
    fails(dst, base, "recomputed from the source", args=("--source", src))


# -- refusals -------------------------------------------------------------------------------------

def edit_config(src: Path, fn) -> None:
    cfg = json.loads((src / "config.json").read_text())
    fn(cfg)
    (src / "config.json").write_text(json.dumps(cfg))


def small_src(tmp_path) -> Path:
    return write_mxfp4_checkpoint(tmp_path / "src", num_layers=1, shard_size=10**9)


def drop_tensor(src: Path, name: str) -> None:
    t = load_file(str(src / "model.safetensors"))
    del t[name]
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("case,needle", [
    ("no scales", "has no model.layers.0.mlp.experts.down_proj_scales"),
    ("stray scales", "looks like MXFP4 scales"),
    ("scale shape", "one E8M0 exponent per 32 elements"),
    ("deepseek_v4", "(MXFP4) for model type 'deepseek_v4'"),
    ("modules_to_not_convert", "modules_to_not_convert is not a list"),
])
def test_refused_with_one_line(tmp_path, case, needle):
    src = small_src(tmp_path)
    before = tree_digest(src)
    if case == "no scales":
        drop_tensor(src, "model.layers.0.mlp.experts.down_proj_scales")
    elif case == "stray scales":
        drop_tensor(src, "model.layers.0.mlp.experts.down_proj_blocks")
    elif case == "scale shape":
        t = load_file(str(src / "model.safetensors"))
        t["model.layers.0.mlp.experts.down_proj_scales"] = t["model.layers.0.mlp.experts.down_proj_scales"][:, :-1].contiguous()
        save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    elif case == "deepseek_v4":
        edit_config(src, lambda c: c.update(model_type="deepseek_v4"))
    else:
        edit_config(src, lambda c: c["quantization_config"].update(modules_to_not_convert="lm_head"))
    before = tree_digest(src)
    rc, err = run_cli("convert", src, tmp_path / "o", "--no-progress")
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "o").exists() and tree_digest(src) == before


def test_nan_exponent_is_refused(tmp_path):
    src = small_src(tmp_path)
    t = load_file(str(src / "model.safetensors"))
    t["model.layers.0.mlp.experts.down_proj_scales"][1, 3, 0] = 255  # E8M0 NaN
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    rc, err = run_cli("convert", src, tmp_path / "o", "--device", "cpu", "--no-progress")
    assert rc == 2 and err.count("\n") == 1 and "NaN/Inf" in err and "down_proj_blocks" in err, err


def test_synth_config_is_gpt_oss_s(src):
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["model_type"] == "gpt_oss" and cfg["quantization_config"] == QUANTIZATION_CONFIG
    e8 = torch.cat([s.reshape(-1) for _, _, s in stacks(source_tensors(src))])
    assert (e8 == 0).any()  # all-zero blocks
    assert int(e8.max()) - int(e8[e8 > 0].min()) > 17  # beyond the window: the fallback is exercised
    blocks, scales = encode(torch.tensor([[0.0] * 32, [3.0] + [0.0] * 31]))
    assert scales.tolist() == [[0], [127 - 1]] and FAR_BINADES > 17


# -- GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("method", ["cast", "mse"])
def test_gpu_equals_cpu(src, tmp_path, method):
    a = api.convert(src, tmp_path / "cpu", scales=method, device="cpu", progress=False)
    b = api.convert(src, tmp_path / "gpu", scales=method, device="cuda", progress=False)
    shards = lambda d: {k: v for k, v in tree_digest(d).items() if k.endswith(".safetensors")}
    assert shards(tmp_path / "cpu") == shards(tmp_path / "gpu")
    assert a.requantized_blocks == b.requantized_blocks
    passes(tmp_path / "gpu", "--source", src)


@pytest.mark.gpu
def test_gpu_cast_check_is_live(src, tmp_path, monkeypatch):
    real = cast.prepare

    def broken(members, device):
        cg = real(members, device)
        for m in cg.members:
            m.amax.weight = m.amax.weight * 2
        return cg

    monkeypatch.setattr(cast, "prepare", broken)
    rc, err = run_cli("convert", src, tmp_path / "o", "--device", "cuda", "--no-progress")
    assert rc != 0 and "lossless MXFP4 cast changed a value" in err, err
