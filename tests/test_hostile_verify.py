"""``shardconv verify`` against outputs damaged in ways no other check sees: each case is a checkpoint
converted by shardconv, damaged in exactly one way (the journal re-signed, so only the damage is left
to find), which must FAIL with one line naming file and tensor; the undamaged one PASSES. Many cases
pass every check but the bit-exact recomputation from the source."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import lazy_outputs, private_copy, run_cli, tree_digest
from shardconv.digest import shard_digest
from shardconv.synth import write_checkpoint
from test_verify import INDEX, JOURNAL, edit_json, fails, passes, rewrite, set_codes, shard_of, verify

GOLDEN = Path(__file__).parent / "golden"
ATTN = "model.layers.0.self_attn"
Q, K, V = (f"{ATTN}.{p}_proj" for p in "qkv")
ARGS = ("--device", "cpu", "--no-progress", "--max-shard-size", "200KB")
# name -> (extra convert arguments, extra verify arguments with --source); "amax": the amax file
OUTPUTS = {
    "mse": ((), ()),  # the default scales
    "w4a4_kv": (("--scales", "max", "--amax", "amax"), ("--amax", "amax")),
    "ct": (("--scales", "max", "--format", "compressed-tensors"), ()),
}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-src")
    path = write_checkpoint(root / "llama", family="llama", weights="structured", num_layers=2, shard_size=150_000)
    w = {}
    for p in sorted(path.glob("*.safetensors")):
        w.update(load_file(str(p)))
    linears = sorted(n[: -len(".weight")] for n, t in w.items() if n.endswith(".weight") and t.ndim == 2
                     and "embed" not in n and not n.startswith("lm_head"))
    amax = {f"{m}.input_quantizer._amax": torch.tensor(1.0 + i / 4) for i, m in enumerate(linears)}
    for layer in range(2):
        amax[f"model.layers.{layer}.self_attn.k_bmm_quantizer._amax"] = torch.tensor(3.0 + layer)
        amax[f"model.layers.{layer}.self_attn.v_bmm_quantizer._amax"] = torch.tensor(2.5 + layer)
    torch.save(amax, root / "amax.pt")
    return {"path": path, "amax": root / "amax.pt"}


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    return lazy_outputs(tmp_path_factory.mktemp("hostile-dst"), lambda name: (
        src["path"], [*ARGS, *(src["amax"] if a == "amax" else a for a in OUTPUTS[name][0])]))


@pytest.fixture()
def good(converted, tmp_path):
    return private_copy(converted, tmp_path)


@pytest.fixture()
def with_source(src):
    """verify's --source arguments for an output (with the amax file it was converted with)."""
    return lambda name, *more: ("--source", src["path"],
                                *[src["amax"] if a == "amax" else a for a in OUTPUTS[name][1]], *more)


def resign(dst, shard) -> None:
    """Record the shard's current digest in the journal: the journal check then finds nothing."""
    edit_json(dst / JOURNAL, lambda j: j["shards"].__setitem__(shard.name, shard_digest(shard)))


def edit_header(dst, shard, fn) -> None:
    """Rewrite a shard's JSON header with ``fn(header, body)`` -> body, and re-sign it."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    body = fn(header, body)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + body)
    resign(dst, shard)


# -- the undamaged outputs -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OUTPUTS))
def test_undamaged_passes_and_says_what_it_did_not_check(converted, with_source, name):
    dst = converted(name)
    before = tree_digest(dst)
    out = passes(dst)
    assert "source      none given: kept tensors not compared, scales not recomputed" in out, out
    out = passes(dst, *with_source(name))
    method = "mse" if name == "mse" else "max"
    assert f"bit for bit (scales: {method} " in out and "export rounding cpu" in out, out
    n = int(out.split("recomputed  ")[1].split()[0])
    assert n == 14, out
    assert tree_digest(dst) == before
    (dst_copy := dst.parent / f"{name}-nojournal").exists() or shutil.copytree(dst, dst_copy)
    (dst_copy / JOURNAL).unlink(missing_ok=True)
    assert "journal     none (.shardconv-journal.json): shard digests not checked" in passes(dst_copy)


def test_the_wrong_method_fails(converted, with_source):
    """--scales names the method: a max recomputation of an mse output differs in every group."""
    rc, out, err = verify(converted("mse"), *with_source("mse", "--scales", "max"))
    assert rc == 1 and "(recomputed from the source: scales max)" in err, err


def test_journal_scales_key_is_the_method(good, with_source):
    """convert may record its scale method in the journal (key "scales"): verify then tries only it."""
    dst = good("mse")
    passes(dst, *with_source("mse"))
    edit_json(dst / JOURNAL, lambda j: j.__setitem__("scales", "max"))
    rc, out, err = verify(dst, *with_source("mse"))
    assert rc == 1 and "(recomputed from the source: scales max)" in err, err


# -- damage only the recomputation finds -----------------------------------------------------------


def test_block_scale_changed_to_another_finite_value(good, with_source):
    dst = good("mse")
    name = f"{K}.weight_scale"
    code = int(load_file(str(shard_of(dst, name)))[name].view(torch.uint8)[4, 2])
    assert 0 < code < 0x7E
    rewrite(dst, name, lambda t: set_codes(t, name, (4, 2), code + 1))
    passes(dst)
    passes(dst, *with_source("mse", "--no-recompute"))  # the reconstruction error hardly moves
    # the journal says how DST was made (convert records its method there) ...
    fails(dst, f"quantized module {K}: tensor '{name}' first at [4, 2]", "(recomputed from the source: scales mse)",
          args=with_source("mse"))
    # ... and without that key (an older journal) every method is tried
    edit_json(dst / JOURNAL, lambda j: j.pop("scales"))
    fails(dst, f"quantized module {K}: tensor '{name}' first at [4, 2]", "no scale method reproduces it; mse shown",
          args=with_source("mse"))
    fails(dst, f"quantized module {K}: tensor '{name}' first at [4, 2]", "scales mse",
          args=with_source("mse", "--scales", "mse"))


def test_weight_scale_2_changed_consistently_in_a_group(good, with_source):
    dst = good("mse")
    for m in (Q, K, V):
        name = f"{m}.weight_scale_2"
        rewrite(dst, name, lambda t, n=name: t.__setitem__(n, torch.nextafter(t[n], torch.tensor(1.0))))
    passes(dst)  # the members still agree, every value is fine
    err = fails(dst, problems=3, args=with_source("mse", "--scales", "mse"))
    for m in (Q, K, V):
        assert f"quantized module {m}: tensor '{m}.weight_scale_2' first at []" in err, err


def test_packed_byte_flipped(good, with_source):
    dst = good("w4a4_kv")
    name = f"{K}.weight"
    rewrite(dst, name, lambda t: t[name].__setitem__((3, 5), t[name][3, 5] ^ 0x11))
    passes(dst)
    passes(dst, *with_source("w4a4_kv", "--no-recompute"))
    fails(dst, f"quantized module {K}: tensor '{name}' first at [3, 5]: byte", args=with_source("w4a4_kv"))


def test_compressed_tensors_block_scale_changed(good, with_source):
    dst = good("ct")
    name = "model.layers.1.mlp.down_proj.weight_scale"
    code = int(load_file(str(shard_of(dst, name)))[name].view(torch.uint8)[0, 1])
    rewrite(dst, name, lambda t: set_codes(t, name, (0, 1), code - 1))
    passes(dst)
    fails(dst, f"quantized module model.layers.1.mlp.down_proj: tensor '{name}' first at [0, 1]",
          args=with_source("ct"))


def test_input_scale_changed_in_a_whole_group(good, with_source):
    """Activation scales come only from the amax file: without it they are not recomputed (and the
    output says so), with it the change is found."""
    dst = good("w4a4_kv")
    for m in (Q, K, V):
        name = f"{m}.input_scale"
        rewrite(dst, name, lambda t, n=name: t.__setitem__(n, t[n] * 1.25))
    out = passes(dst, "--source", with_source("w4a4_kv")[1])
    assert "14 input scales not recomputed (they come from calibration: give --amax FILE)" in out, out
    err = fails(dst, problems=3, args=with_source("w4a4_kv"))
    assert f"quantized module {K}: tensor '{K}.input_scale' first at []" in err, err


def test_kv_scale_changed(good, with_source):
    dst = good("w4a4_kv")
    name = "model.layers.1.self_attn.k_proj.k_scale"
    shard = rewrite(dst, name, lambda t: t.__setitem__(name, t[name] * 1.5))
    passes(dst)
    fails(dst, f"{shard}: tensor '{name}' first at []", "amax file's model.layers.1.self_attn k/v amax",
          args=with_source("w4a4_kv"))


# -- files -----------------------------------------------------------------------------------------


def test_trailing_bytes(good):
    dst = good("mse")
    shard = shard_of(dst, f"{K}.weight")
    with open(shard, "ab") as f:
        f.write(bytes(16))
    resign(dst, shard)
    fails(dst, f"{shard}: corrupt safetensors file: 16 bytes after the last tensor's data belong to no tensor")


def test_bytes_between_tensors(good):
    dst = good("mse")
    shard = shard_of(dst, f"{K}.weight")

    def gap(header, body):
        last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
        start, end = header[last]["data_offsets"]
        header[last]["data_offsets"] = [start + 8, end + 8]
        return body[:start] + bytes(8) + body[start:]

    edit_header(dst, shard, gap)
    err = fails(dst, f"{shard}: corrupt header: data bytes ", "belong to no tensor")
    # the safetensors library refuses it too: an engine would not load it
    with pytest.raises(Exception, match="not fully covered|invalid offset|InvalidOffset"):
        load_file(str(shard))
    assert err


def test_header_byte_length_does_not_match_dtype(good):
    """A shard whose header gives a tensor more elements than its bytes: reported as a problem (exit 1)."""
    dst = good("mse")
    name = "model.norm.weight"
    shard = shard_of(dst, name)
    edit_header(dst, shard, lambda h, body: (h[name].__setitem__("shape", [h[name]["shape"][0] + 1]), body)[1])
    fails(dst, f"{shard}: tensor '{name}': data_offsets", "hold 256 bytes, but BF16[129] needs 258")


# -- declared quantization -------------------------------------------------------------------------


def _group(j):
    return j["quantization_config"]["config_groups"]["group_0"]


@pytest.mark.parametrize("name, edit, needle", [
    ("mse", lambda j: _group(j)["weights"].__setitem__("group_size", 32),
     "config_groups.group_0.weights.group_size is 32, not 16"),
    ("w4a4_kv", lambda j: _group(j)["input_activations"].__setitem__("group_size", 32),
     "config_groups.group_0.input_activations.group_size is 32, not 16"),
    ("mse", lambda j: _group(j)["weights"].__setitem__("num_bits", 8),
     "config_groups.group_0.weights.num_bits is 8, not 4"),
    ("ct", lambda j: _group(j)["weights"].__setitem__("num_bits", 8),
     "config_groups.group_0.weights.num_bits is 8, not 4"),
    ("ct", lambda j: _group(j)["weights"].__setitem__("group_size", 32),
     "config_groups.group_0.weights.group_size is 32, not 16"),
], ids=["weights-group_size", "input-group_size", "num_bits", "ct-num_bits", "ct-group_size"])
def test_config_group_not_nvfp4(good, name, edit, needle):
    dst = good(name)
    edit_json(dst / "config.json", edit)
    fails(dst, f"{dst / 'config.json'}: quantization_config.{needle}")


def test_hf_quant_config_group_size(good):
    dst = good("mse")
    edit_json(dst / "hf_quant_config.json", lambda j: j["quantization"].__setitem__("group_size", 32))
    fails(dst, f"{dst / 'hf_quant_config.json'}: group_size 32, not 16")


def test_quant_algo_not_nvfp4(good):
    dst = good("mse")
    edit_json(dst / "config.json", lambda j: j["quantization_config"].__setitem__("quant_algo", "FP8"))
    fails(dst, f"{dst / 'config.json'}: quant_algo 'FP8' is not NVFP4 or W4A16_NVFP4")


def test_quant_algo_without_quantized_tensors(converted, src, tmp_path):
    """The source's own bf16 shards under a converted output's config files."""
    dst = Path(shutil.copytree(src["path"], tmp_path / "plain"))
    for name in ("config.json", "hf_quant_config.json"):
        shutil.copy(converted("mse") / name, dst / name)
    rc, out, err = verify(dst)
    assert rc == 1, (out, err)
    for fname in ("config.json", "hf_quant_config.json"):
        assert f"{dst / fname}: quant_algo W4A16_NVFP4 but no tensor is quantized" in err, err


# -- values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, where, value", [("model.norm.weight", (5,), float("nan")),
                                                ("lm_head.weight", (2, 3), float("-inf"))])
def test_kept_tensor_not_finite(good, name, where, value):
    dst = good("mse")
    shard = rewrite(dst, name, lambda t: t[name].__setitem__(where, value))
    fails(dst, f"{shard}: tensor '{name}' has 1 NaN/Inf values (first at {list(where)})")


def test_kv_scale_for_an_attention_module_that_does_not_exist(good):
    dst = good("w4a4_kv")
    name = "model.layers.7.self_attn.k_proj.k_scale"
    shard = shard_of(dst, "model.layers.1.self_attn.k_proj.k_scale")
    rewrite(dst, "model.layers.1.self_attn.k_proj.k_scale", lambda t: t.__setitem__(name, torch.tensor(0.01)))
    edit_json(dst / INDEX, lambda j: j["weight_map"].__setitem__(name, shard.name))
    fails(dst, f"{shard}: tensor '{name}' is for attention module model.layers.7.self_attn, which DST does not have")


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_kv_scale_not_finite(good, value):
    dst = good("w4a4_kv")
    name = "model.layers.0.self_attn.v_proj.v_scale"
    shard = rewrite(dst, name, lambda t: t.__setitem__(name, torch.tensor(value)))
    fails(dst, f"{shard}: tensor '{name}' is not a finite positive float32 scalar")


# -- ModelOpt's own exports, recomputed ------------------------------------------------------------


@pytest.mark.parametrize("family, case, args, method", [
    ("llama", "max_w4a16", ("--scales", "max"), "max"),
    ("qwen3", "max_w4a4", ("--scales", "max", "--amax", "AMAX"), "max"),
    ("llama", "static", ("--scales", "amax", "--amax", "AMAX"), "amax"),
    ("llama", "static_kv", ("--scales", "amax", "--amax", "AMAX"), "amax"),
    ("qwen3_moe", "static", ("--amax", "AMAX"), "amax"),  # inferred: the file's weight amax first
    ("llama", "static", (), "max-static"),  # without the file: ModelOpt's static max from the weights
    # ModelOpt's CPU sweep picks another candidate at rare fp32 near-ties (test_sweep): its own chosen
    # per-block amax reproduce it exactly
    ("qwen3", "mse", ("--scales", "amax", "--amax", "AMAX"), "amax"),
    ("llama", "four_over_six", ("--scales", "four-over-six", "--amax", "AMAX"), "four-over-six"),
    ("mixtral", "static", ("--scales", "amax", "--amax", "AMAX"), "amax"),
    ("gpt_oss", "static", ("--scales", "amax", "--amax", "AMAX"), "amax"),
])
def test_modelopt_exports_recompute(family, case, args, method):
    gold = GOLDEN / family / case
    args = [gold / "amax.pt" if a == "AMAX" else a for a in args]
    out = passes(gold, "--source", GOLDEN / family / "source", *args)
    assert f"bit for bit (scales: {method} " in out, out


def test_modelopt_export_with_a_block_scale_changed(tmp_path):
    dst = Path(shutil.copytree(GOLDEN / "llama" / "static", tmp_path / "static"))
    t = load_file(str(dst / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight_scale"
    set_codes(t, name, (7, 3), int(t[name].view(torch.uint8)[7, 3]) - 1)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    passes(dst)
    fails(dst, f"quantized module model.layers.1.mlp.up_proj: tensor '{name}' first at [7, 3]",
          args=("--source", GOLDEN / "llama" / "source", "--scales", "amax", "--amax", dst / "amax.pt"))


def test_recompute_options_need_a_source(converted):
    rc, out, err = verify(converted("mse"), "--scales", "max")
    assert rc == 2 and err.startswith("shardconv: error: --scales, --amax") and err.count("\n") == 1, err


def test_fp8_source_recomputed_and_a_dequantized_kept_weight_not_finite(tmp_path):
    """An FP8 block-quantized source: groups are recomputed from its dequantization; the MTP layer's
    FP8 weights are written dequantized (bf16), and a NaN there fails."""
    from test_fp8 import make_fp8

    bf16 = write_checkpoint(tmp_path / "bf16", family="deepseek_v3", weights="structured", num_layers=2,
                            hidden_size=256, intermediate_size=320, moe_intermediate_size=64, num_experts=4,
                            vocab_size=256, shard_size=300_000)
    fp8_src, _ = make_fp8(bf16, tmp_path / "fp8")
    dst = tmp_path / "out"
    rc, err = run_cli("convert", fp8_src, dst, "--device", "cpu", "--no-progress", "--scales", "max")
    assert rc == 0, err
    out = passes(dst, "--source", fp8_src)
    assert "bit for bit (scales: max " in out, out
    name = "model.layers.2.self_attn.o_proj.weight"  # the MTP layer: kept, dequantized from FP8
    shard = rewrite(dst, name, lambda t: t[name].__setitem__((130, 1), float("nan")))
    assert load_file(str(shard))[name].dtype == torch.bfloat16
    fails(dst, f"{shard}: tensor '{name}' has 1 NaN/Inf values (first at [130, 1])")
    # and the source says the dequantization differs
    fails(dst, f"{shard}: tensor '{name}' has 1 NaN/Inf", f"kept tensors differ from the source, e.g. {name}",
          problems=2, args=("--source", fp8_src))
