"""``shardconv verify``: good outputs pass, and each check fails (exit 1, naming file and tensor) on one damage."""

import contextlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import lazy_outputs, private_copy, tree_digest
from shardconv.cli import main
from shardconv.digest import shard_digest
from shardconv.safetensors_io import read_header
from shardconv.synth import write_checkpoint

GOLDEN = Path(__file__).parent / "golden"
INDEX = "model.safetensors.index.json"
JOURNAL = ".shardconv-journal.json"
ARGS = ("--device", "cpu", "--scales", "max", "--no-progress", "--max-shard-size", "200KB")
# name -> (source, extra convert arguments); "amax" stands for the W4A4 activation amax file
OUTPUTS = {
    "llama": ("llama", ()),
    "moe": ("moe", ()),
    "llama_w4a4": ("llama", ("--amax", "amax")),
    "llama_ct": ("llama", ("--format", "compressed-tensors")),
    "llama_ct_w4a4": ("llama", ("--format", "compressed-tensors", "--amax", "amax")),
}
K = "model.layers.0.self_attn.k_proj"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify-src")
    out = {}
    for name, family in (("llama", "llama"), ("moe", "qwen3_moe")):
        out[name] = write_checkpoint(root / name, family=family, weights="structured", num_layers=2,
                                     shard_size=150_000)
    # W4A4 needs activation amax: ModelOpt's input_quantizer keys, one per Linear (weights scale by max)
    w = {}
    for p in sorted(out["llama"].glob("*.safetensors")):
        w.update(load_file(str(p)))
    linears = sorted(n[: -len(".weight")] for n, t in w.items() if n.endswith(".weight") and t.ndim == 2
                     and "embed" not in n and not n.startswith("lm_head"))
    amax = {f"{m}.input_quantizer._amax": torch.tensor(1.0 + i / 4) for i, m in enumerate(linears)}
    torch.save(amax, root / "amax.pt")
    out["amax"] = root / "amax.pt"
    return out


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """Each output of OUTPUTS converted once (on first use) into a module-wide folder."""
    return lazy_outputs(tmp_path_factory.mktemp("verify-dst"), lambda name: (
        sources[OUTPUTS[name][0]], [*ARGS, *(sources["amax"] if a == "amax" else a for a in OUTPUTS[name][1])]))


@pytest.fixture()
def good(converted, tmp_path):
    """A private copy of a converted output, to damage."""
    return private_copy(converted, tmp_path)


def verify(*args) -> tuple[int, str, str]:
    """``shardconv verify`` in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["verify", *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


def passes(dst, *args) -> str:
    rc, out, err = verify(dst, *args)
    assert rc == 0 and not err, err
    assert out.rstrip().endswith("verify: PASS"), out
    return out


def fails(dst, *needles, problems=1, args=()) -> str:
    """verify finds exactly ``problems`` problems, one stderr line each, and the text names every needle."""
    rc, out, err = verify(dst, *args)
    assert rc == 1, (out, err)
    lines = err.splitlines()
    assert len(lines) == problems and all(l.startswith("shardconv: verify: ") for l in lines), err
    assert f"verify: FAIL ({problems} problems)" in out, out
    for n in needles:
        assert str(n) in err, (n, err)
    return err


def shard_of(dst, tensor) -> Path:
    return dst / json.loads((dst / INDEX).read_text())["weight_map"][tensor]


def edit_json(path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2))


def rewrite(dst, tensor, fn) -> Path:
    """Rewrite the shard holding ``tensor`` with ``fn(tensors)`` applied, and record its new digest in
    the journal, so the journal check does not fire too: only the damage itself is left to find."""
    shard = shard_of(dst, tensor)
    tensors = load_file(str(shard))
    fn(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(shard), metadata={"format": "pt"})
    digest = shard_digest(shard)
    edit_json(dst / JOURNAL, lambda j: j["shards"].__setitem__(shard.name, digest))
    return shard


def set_codes(tensors, name, where, code) -> None:
    codes = tensors[name].view(torch.uint8).clone()
    codes[where] = code
    tensors[name] = codes.view(torch.float8_e4m3fn)


def table_rows(out) -> list[tuple[str, float]]:
    """(module, rel. error) rows of the printed reconstruction-error table, in print order."""
    return [(m.group(1), float(m.group(2)))
            for m in re.finditer(r"^  (\S+)\s+\[[\d, ]+\]\s+(\S+)$", out, re.MULTILINE)]


# -- 1. good outputs pass --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OUTPUTS))
def test_good_output_passes_with_and_without_source(converted, sources, name):
    dst = converted(name)
    before = tree_digest(dst)
    out = passes(dst)
    assert "warning:" not in out, out
    n_mods, n_groups = map(int, re.search(r"quantized\s+(\d+) modules, (\d+) fusion groups", out).groups())
    assert n_mods >= 14 and n_groups >= 4, out
    assert re.search(r"journal\s+\d+ shard hashes checked", out), out
    out = passes(dst, "--source", sources[OUTPUTS[name][0]], "--top", 1000)
    rows = table_rows(out)
    assert len(rows) == n_mods, out  # every quantized weight, once
    errors = [e for _, e in rows]
    assert all(0 < e < 0.5 for e in errors), out
    assert errors == sorted(errors, reverse=True), out  # worst layer first
    assert errors[0] > errors[-1]
    assert f"worst {errors[0]:.4f}" in out
    assert tree_digest(dst) == before  # verify writes nothing


def test_error_table_top_and_max_error(converted, sources):
    dst = converted("moe")
    out = passes(dst, "--source", sources["moe"], "--top", 5)
    rows = table_rows(out)
    assert len(rows) == 5 and [e for _, e in rows] == sorted((e for _, e in rows), reverse=True)
    assert re.search(r"\.\.\. 27 more \(best [0-9.]+\)", out), out
    # the same output fails a bound tighter than its errors
    fails(dst, "32 quantized weights reconstruct with relative error above 0.01", f"worst {rows[0][0]}",
          args=("--source", sources["moe"], "--max-error", 0.01))


# -- 2. files and index ----------------------------------------------------------------------------


def test_index_entry_names_a_tensor_not_in_its_shard(good):
    dst = good("llama")
    shard = shard_of(dst, f"{K}.weight").name
    edit_json(dst / INDEX, lambda j: j["weight_map"].__setitem__(f"{K}.bias", shard))
    fails(dst, INDEX, f"'{K}.bias' is listed in {shard} but not stored there")


def test_index_entry_names_a_shard_that_does_not_exist(good):
    dst = good("llama")
    real = shard_of(dst, "model.norm.weight").name
    missing = "model-00009-of-00009.safetensors"
    edit_json(dst / INDEX, lambda j: j["weight_map"].__setitem__("model.norm.weight", missing))
    err = fails(dst, problems=2)
    assert f"{INDEX}: shard {missing} (1 tensors) does not exist" in err
    assert f"'model.norm.weight' is listed in {missing} but stored in {real}" in err


def test_index_names_with_dot_slash_are_the_same_shards(good):
    """``./name`` and ``name`` are one shard: counts and the not-stored check see through the prefix."""
    dst = good("llama")
    shard = shard_of(dst, f"{K}.weight").name
    missing = "model-00009-of-00009.safetensors"

    def edit(j):
        wm = j["weight_map"]
        for t in wm:
            wm[t] = "./" + wm[t]
        wm[f"{K}.bias"] = "./" + shard  # not stored there
        wm["model.norm.weight"] = "./" + missing
        wm["model.embed_tokens.weight"] = missing

    edit_json(dst / INDEX, edit)
    err = fails(dst, problems=4)
    assert f"'{K}.bias' is listed in ./{shard} but not stored there" in err
    assert f"{INDEX}: shard {missing} (2 tensors) does not exist" in err


def test_tensor_missing_from_index(good):
    dst = good("moe")
    shard = shard_of(dst, "model.norm.weight").name
    edit_json(dst / INDEX, lambda j: j["weight_map"].pop("model.norm.weight"))
    fails(dst, f"{shard}: tensor 'model.norm.weight' is not in {INDEX}")


# -- 3. dtypes and shapes --------------------------------------------------------------------------


def _narrow_scale(t):
    t[f"{K}.weight_scale"] = t[f"{K}.weight_scale"][:, :-1]


def _bf16_scale_2(t):
    t[f"{K}.weight_scale_2"] = t[f"{K}.weight_scale_2"].to(torch.bfloat16)


def _int8_weight(t):
    t[f"{K}.weight"] = t[f"{K}.weight"].view(torch.int8)


@pytest.mark.parametrize("damage, needle", [
    (_narrow_scale, "weight [64, 64] and block scales [64, 7] do not match"),
    (_bf16_scale_2, f"{K}.weight_scale_2 is BF16[], expected a float32 scalar"),
    (_int8_weight, "packed weight is I8, block scales F8_E4M3 (expected U8 and F8_E4M3)"),
], ids=["block-scale-shape", "scale_2-dtype", "weight-dtype"])
def test_dtype_or_shape_disagrees(good, sources, damage, needle):
    dst = good("llama")
    shard = rewrite(dst, f"{K}.weight", damage)
    for args in ((), ("--source", sources["llama"])):
        # one problem: the malformed k_proj is neither "not quantized" (fusion) nor "a kept tensor" (source)
        fails(dst, f"{shard}: quantized module {K}: ", needle, args=args)


# -- 4. journal ------------------------------------------------------------------------------------


def test_shard_changed_after_it_was_written(good):
    dst = good("llama")
    name = "model.layers.1.mlp.down_proj.weight"  # packed FP4: any byte is a valid value
    shard = shard_of(dst, name)
    info = read_header(shard)[0][name]
    data = bytearray(shard.read_bytes())
    size = len(data)
    data[info.offset + 10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert shard.stat().st_size == size
    fails(dst, f"{shard}: digest ", "does not match the journal's", "changed after it was written")


def test_journal_of_another_digest_scheme_is_not_checked(good):
    """An older shardconv hashed whole files: its digests say nothing about these shards."""
    dst = good("llama")
    edit_json(dst / JOURNAL, lambda j: (j.__setitem__("digest", "sha256 of the file"),
                                        j["shards"].update({k: "0" * 64 for k in j["shards"]})))
    rc, out, err = verify(dst)
    assert rc == 0 and not err, err
    assert "digests of another scheme ('sha256 of the file'" in out and "not checked" in out


# -- 5. fusion groups ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, module, tensor, group", [
    ("llama", K, "weight_scale_2", "model.layers.0.self_attn.{q_proj,k_proj,v_proj}"),
    ("moe", "model.layers.1.mlp.experts.2.up_proj", "weight_scale_2",
     "model.layers.1.mlp.experts.2.{gate_proj,up_proj}"),
    ("llama_w4a4", "model.layers.1.self_attn.v_proj", "input_scale", "model.layers.1.self_attn.{q_proj,k_proj,v_proj}"),
    ("llama_w4a4", "model.layers.0.mlp.gate_proj", "input_scale", "model.layers.0.mlp.{gate_proj,up_proj}"),
])
def test_fusion_members_with_different_scales(good, name, module, tensor, group):
    dst = good(name)
    full = f"{module}.{tensor}"
    rewrite(dst, full, lambda t: t.__setitem__(full, t[full] * 2))
    leaf = module.rpartition(".")[2]
    fails(dst, f"fusion group {group}: {tensor} differs between members", f"{leaf}=", "engines need one shared value")


def test_fusion_member_left_unquantized(good):
    """k_proj's weight replaced by a plain bf16 weight (its scales dropped): q and v are fused with it."""
    dst = good("llama")

    def unquantize(t):
        t[f"{K}.weight"] = torch.ones(64, 128, dtype=torch.bfloat16)
        del t[f"{K}.weight_scale"], t[f"{K}.weight_scale_2"]

    rewrite(dst, f"{K}.weight", unquantize)
    edit_json(dst / INDEX, lambda j: [j["weight_map"].pop(f"{K}.{s}") for s in ("weight_scale", "weight_scale_2")])
    edit_json(dst / "config.json", lambda j: j["quantization_config"]["ignore"].append(K))
    edit_json(dst / "hf_quant_config.json", lambda j: j["quantization"]["exclude_modules"].append(K))
    fails(dst, f"fusion group model.layers.0.self_attn.{{q_proj,k_proj,v_proj}}: model.layers.0.self_attn.q_proj "
          f"is quantized but {K} is not")


# -- 6. scale values -------------------------------------------------------------------------------


@pytest.mark.parametrize("code, what", [(0x7F, "NaN"), (0xFF, "NaN"), (0xB8, "negative")])
def test_nan_or_negative_block_scale(good, code, what):
    dst = good("llama")
    name = "model.layers.1.mlp.down_proj.weight_scale"
    shard = rewrite(dst, name, lambda t: set_codes(t, name, (5, 3), code))
    fails(dst, f"{shard}: tensor '{name}' has 1 {what} block scales (first at [5, 3])")


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan])
def test_global_scale_not_finite_positive(good, value):
    dst = good("llama")
    name = "model.layers.0.self_attn.o_proj.weight_scale_2"  # in no fusion group: one problem
    shard = rewrite(dst, name, lambda t: t[name].fill_(value))
    fails(dst, f"{shard}: tensor '{name}' is {value} (global scales must be finite and positive)")


def test_quant_algo_disagrees_with_tensors(good):
    dst = good("llama_w4a4")
    edit_json(dst / "hf_quant_config.json", lambda j: j["quantization"].__setitem__("quant_algo", "W4A16_NVFP4"))
    fails(dst, "hf_quant_config.json: quant_algo W4A16_NVFP4 but 14 modules carry input_scale")


def test_fp8_kv_cache_scale_not_positive(tmp_path):
    """On ModelOpt's own single-file export (no index, no journal)."""
    dst = Path(shutil.copytree(GOLDEN / "llama" / "static_kv", tmp_path / "kv"))
    t = load_file(str(dst / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.k_scale"  # where ModelOpt puts it
    t[name] = -t[name]
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    fails(dst, f"{dst / 'model.safetensors'}: tensor '{name}' is not a finite positive float32 scalar")


# -- 7. exclusion lists ----------------------------------------------------------------------------


def _drop_ignore(entry):
    return ("config.json", "config.json quantization_config.ignore",
            lambda j: j["quantization_config"]["ignore"].remove(entry))


def _drop_exclude(entry):
    return ("hf_quant_config.json", "hf_quant_config.json exclude_modules",
            lambda j: j["quantization"]["exclude_modules"].remove(entry))


@pytest.mark.parametrize("name, edit, module", [
    ("llama", _drop_ignore("lm_head"), "lm_head"),
    ("llama", _drop_exclude("lm_head"), "lm_head"),
    ("moe", _drop_ignore("model.layers.1.mlp.gate"), "model.layers.1.mlp.gate"),
    ("moe", _drop_exclude("model.layers.0.mlp.gate"), "model.layers.0.mlp.gate"),
    ("llama_ct", _drop_ignore("lm_head"), "lm_head"),
], ids=["llama-ignore", "llama-exclude_modules", "moe-router-ignore", "moe-router-exclude_modules", "ct-ignore"])
def test_kept_module_not_listed_as_excluded(good, name, edit, module):
    dst = good(name)
    fname, where, fn = edit
    edit_json(dst / fname, fn)
    fails(dst, f"{dst / where}: 1 modules kept in source precision are not listed", f"e.g. {module}")


@pytest.mark.parametrize("name, fname, entry, n, example", [
    ("llama", "config.json", "model.layers.*.self_attn.o_proj", 2, "model.layers.0.self_attn.o_proj"),
    ("llama", "hf_quant_config.json", "model.layers.1.mlp.down_proj", 1, "model.layers.1.mlp.down_proj"),
    # vLLM matches ModelOpt's exclude_modules by substring too
    ("moe", "hf_quant_config.json", "experts.3.", 6, "model.layers.0.mlp.experts.3.down_proj"),
    ("llama_ct", "config.json", "re:.*mlp\\.up_proj$", 2, "model.layers.0.mlp.up_proj"),
])
def test_quantized_module_listed_as_excluded(good, name, fname, entry, n, example):
    dst = good(name)
    if fname == "config.json":
        edit_json(dst / fname, lambda j: j["quantization_config"]["ignore"].append(entry))
        where = "config.json quantization_config.ignore"
    else:
        edit_json(dst / fname, lambda j: j["quantization"]["exclude_modules"].append(entry))
        where = "hf_quant_config.json exclude_modules"
    fails(dst, f"{dst / where}: {n} quantized modules are listed as excluded", f"e.g. {example} (by {entry!r})")


# -- 8. against the source -------------------------------------------------------------------------


@pytest.mark.parametrize("name, tensor", [("llama", "model.norm.weight"), ("llama", "lm_head.weight"),
                                          ("moe", "model.layers.0.mlp.gate.weight")])
def test_kept_tensor_differs_from_source(good, sources, name, tensor):
    dst = good(name)
    rewrite(dst, tensor, lambda t: t.__setitem__(tensor, t[tensor] + 1))
    passes(dst)  # only the source can tell
    fails(dst, f"1 kept tensors differ from the source, e.g. {tensor}", args=("--source", sources[OUTPUTS[name][0]]))


def test_source_tensor_missing_from_dst(good, sources):
    dst = good("llama")
    rewrite(dst, "model.norm.weight", lambda t: t.pop("model.norm.weight"))
    edit_json(dst / INDEX, lambda j: j["weight_map"].pop("model.norm.weight"))
    passes(dst)
    fails(dst, "1 source tensors are missing from DST, e.g. model.norm.weight", args=("--source", sources["llama"]))


def test_swapped_packed_weights_fail_reconstruction(good, sources):
    """k_proj and v_proj (same shape, one shared weight_scale_2) with each other's FP4 codes: well formed,
    so only the reconstruction error against the source finds it."""
    dst = good("llama")
    v = "model.layers.0.self_attn.v_proj"

    def swap(t):
        t[f"{K}.weight"], t[f"{v}.weight"] = t[f"{v}.weight"], t[f"{K}.weight"]

    rewrite(dst, f"{K}.weight", swap)
    passes(dst)
    err = fails(dst, "2 quantized weights reconstruct with relative error above 0.5",
                args=("--source", sources["llama"]))
    assert re.search(rf"worst ({K}|{v}): ", err), err


# -- 9. ModelOpt's own exports ---------------------------------------------------------------------


@pytest.mark.parametrize("family, case", [("llama", "static"), ("qwen3_moe", "max_w4a16"), ("llama", "static_kv"),
                                          ("qwen3", "four_over_six"), ("gpt_oss", "static")])
def test_modelopt_golden_exports_pass(family, case):
    """Verified in place: verify needs no writable folder and writes nothing."""
    gold = GOLDEN / family / case
    before = tree_digest(GOLDEN / family)
    out = passes(gold)
    assert "(1 shards," in out and "modelopt convention" in out, out
    out = passes(gold, "--source", GOLDEN / family / "source", "--top", 1000)
    errors = [e for _, e in table_rows(out)]
    assert errors and errors == sorted(errors, reverse=True), out
    assert tree_digest(GOLDEN / family) == before


# -- 10. compressed-tensors ------------------------------------------------------------------------


@pytest.mark.parametrize("name, module, tensor, group", [
    ("llama_ct", K, "weight_global_scale", "model.layers.0.self_attn.{q_proj,k_proj,v_proj}"),
    ("llama_ct", "model.layers.1.mlp.up_proj", "weight_global_scale", "model.layers.1.mlp.{gate_proj,up_proj}"),
    ("llama_ct_w4a4", K, "input_global_scale", "model.layers.0.self_attn.{q_proj,k_proj,v_proj}"),
])
def test_compressed_tensors_fusion_scales_differ(good, sources, name, module, tensor, group):
    dst = good(name)
    full = f"{module}.{tensor}"
    rewrite(dst, full, lambda t: t.__setitem__(full, t[full] * 2))
    leaf = module.rpartition(".")[2]
    fails(dst, f"fusion group {group}: {tensor} differs between members", f"{leaf}=")


def test_compressed_tensors_bad_block_scales(good):
    dst = good("llama_ct")
    name = "model.layers.1.self_attn.q_proj.weight_scale"
    shard = rewrite(dst, name, lambda t: set_codes(t, name, (0, 0), 0x7F))
    fails(dst, f"{shard}: tensor '{name}' has 1 NaN block scales (first at [0, 0])")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_the_nan_inf_bit_test_is_torch_isfinite(dtype, tmp_path):
    """safetensors_io.nonfinite (the pipeline's and verify's one test of raw bytes) against torch.isfinite,
    over every finite and non-finite code of the 8-bit types and special values of the wider ones;
    verify's first_not_finite finds the first and counts them all."""
    from safetensors.torch import save_file

    from shardconv.safetensors_io import DTYPE_NAMES, nonfinite
    from shardconv.source import open_source
    from shardconv.verification.values import first_not_finite

    if dtype.itemsize == 1:
        t = torch.arange(256, dtype=torch.uint8).view(dtype)
        want = ~torch.isfinite(t.float())
    else:
        t = torch.tensor([0.0, -1.5, 3e-8, float("inf"), float("-inf"), float("nan"), 65504.0, -0.0], dtype=dtype)
        want = ~torch.isfinite(t)
    raw = t.contiguous().view(torch.uint8)
    assert torch.equal(nonfinite(raw, DTYPE_NAMES[dtype]), want)
    save_file({"x": t.reshape(-1, 2) if t.numel() % 2 == 0 else t}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    info = open_source(str(tmp_path)).tensors["x"]
    count, position = first_not_finite(info)
    first = int(want.nonzero()[0, 0])
    assert count == int(want.sum()) and position == [first // 2, first % 2]
