"""Mixed precision (--recipe nvfp4-experts-fp8, --format-for): MoE experts NVFP4, the rest per-tensor FP8,
written as ModelOpt 0.47's MIXED_PRECISION checkpoint (golden files from tools/make_golden_mixed.py)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load_checkpoint, run_cli, same_bytes, tree_digest
from shardconv import fp8_numerics, numerics
from shardconv.synth import write_checkpoint
from shardconv.verification import verify
from test_amax import make_amax
from test_errors import check_fails
from test_golden import without_producer

GOLDEN = Path(__file__).parent / "golden" / "qwen3_moe"
MIXED = GOLDEN / "mixed_w4a4"
RECIPE = ("--recipe", "nvfp4-experts-fp8")


def _convert_golden(dst: Path, *extra) -> None:
    rc, err = run_cli("convert", GOLDEN / "source", dst, "--amax", MIXED / "amax.pt", *RECIPE, "--device", "cpu",
                      "--no-progress", *extra)
    assert rc == 0, err


@pytest.fixture(scope="module")
def mixed_out(tmp_path_factory):
    dst = tmp_path_factory.mktemp("mixed") / "out"
    _convert_golden(dst)
    return dst


def test_matches_modelopt_mixed_precision_export(mixed_out):
    """Every tensor byte-identical to ModelOpt's own MIXED_PRECISION export, both config files equal."""
    want = load_file(str(MIXED / "model.safetensors"))
    got = load_checkpoint(mixed_out)
    assert sorted(got) == sorted(want)
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert got["model.layers.0.mlp.experts.0.gate_proj.weight"].dtype == torch.uint8
    differ = [name for name in want if not same_bytes(got[name], want[name])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:5]}"
    for name in ("config.json", "hf_quant_config.json"):
        mine = json.loads((mixed_out / name).read_text())
        theirs = json.loads((MIXED / name).read_text())
        assert without_producer(mine) == without_producer(theirs), name


def test_scales_max_gives_modelopt_bytes_too(tmp_path):
    """FP8 weight scales from the weights (max) equal the amax file's: ModelOpt's weight amax is max |W|."""
    _convert_golden(tmp_path / "out", "--scales", "max")
    want, got = load_file(str(MIXED / "model.safetensors")), load_checkpoint(tmp_path / "out")
    assert all(same_bytes(got[n], want[n]) for n in want)


def test_config_names_experts_nvfp4_and_the_rest_fp8(mixed_out):
    hq = json.loads((mixed_out / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "MIXED_PRECISION"
    layers = hq["quantized_layers"]
    assert layers["model.layers.0.mlp.experts"] == {"quant_algo": "NVFP4", "group_size": 16}
    assert layers["model.layers.1.self_attn.o_proj"] == {"quant_algo": "FP8"}
    assert not any("mlp.gate" in k or "lm_head" in k for k in layers)
    qc = json.loads((mixed_out / "config.json").read_text())["quantization_config"]
    assert qc["quantized_layers"] == layers and qc["quant_method"] == "modelopt"


def test_fp8_numbers_follow_the_written_rules(mixed_out):
    """weight_scale = max|W| / 448 per module (not shared across q/k/v), codes e4m3(bf16(W / scale))."""
    src = load_checkpoint(GOLDEN / "source")
    out = load_checkpoint(mixed_out)
    scales = set()
    for leaf in ("q_proj", "k_proj", "v_proj"):
        m = f"model.layers.0.self_attn.{leaf}"
        w = src[f"{m}.weight"]
        scale = torch.tensor(w.abs().max().float().item() / 448.0, dtype=torch.float32)
        assert same_bytes(out[f"{m}.weight_scale"], scale)
        codes = (w.float() / scale).to(torch.bfloat16).to(torch.float8_e4m3fn)
        assert same_bytes(out[f"{m}.weight"], codes)
        scales.add(float(scale))
    assert len(scales) == 3  # each member its own scale, as ModelOpt exports FP8


def test_fp8_export_rounding_cuda_multiplies_by_the_reciprocal(tmp_path):
    """--export-rounding cuda: ModelOpt on CUDA divides by a CPU 0-d scale, which ATen does as a product
    with its fp32 reciprocal; the NVFP4 experts stay as the cpu run wrote them where no scalar rounds apart."""
    _convert_golden(tmp_path / "out", "--export-rounding", "cuda")
    src, out = load_checkpoint(GOLDEN / "source"), load_checkpoint(tmp_path / "out")
    for layer in (0, 1):
        for leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m = f"model.layers.{layer}.self_attn.{leaf}"
            w, scale = src[f"{m}.weight"], out[f"{m}.weight_scale"]
            want = (w.float() * (torch.ones_like(scale) / scale)).to(torch.bfloat16).to(torch.float8_e4m3fn)
            assert same_bytes(out[f"{m}.weight"], want), m
    assert verify(tmp_path / "out", str(GOLDEN / "source"), amax=str(MIXED / "amax.pt")).ok


def test_fp8_rounding_rules_differ_where_they_should():
    """An fp32 weight whose quotient sits on an e4m3 tie: W / s and W * fp32(1/s) round apart (for bf16
    weights the intermediate bf16 rounding makes the two rules agree in practice)."""
    s = torch.tensor(1006340506, dtype=torch.int32).view(torch.float32)
    w = torch.tensor([1008032179], dtype=torch.int32).view(torch.float32)
    try:
        numerics.set_export_rounding("cuda")
        cuda = fp8_numerics.quantize(w, s).view(torch.uint8)
    finally:
        numerics.set_export_rounding("cpu")
    cpu = fp8_numerics.quantize(w, s).view(torch.uint8)
    assert (int(cpu), int(cuda)) == (58, 57)


def test_fp8_zero_weight_gets_scale_one():
    w = torch.zeros(4, 32, dtype=torch.bfloat16)
    s = fp8_numerics.weight_scale(w.abs().amax().float())
    assert float(s) == 1.0
    assert (fp8_numerics.quantize(w, s).view(torch.uint8) == 0).all()


def test_verify_passes_mixed_output_and_modelopt_export(mixed_out):
    for d in (mixed_out, MIXED):
        r = verify(d, str(GOLDEN / "source"), amax=str(MIXED / "amax.pt"))
        assert r.ok, r.problems
        assert any("recomputed  32 modules" in line for line in r.info), r.info


def _damaged(mixed_out, tmp_path) -> Path:
    d = tmp_path / "bad"
    shutil.copytree(mixed_out, d)
    return d


def _rewrite(d: Path, change) -> None:
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    change(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})
    (d / ".shardconv-journal.json").unlink(missing_ok=True)


def test_verify_fails_a_changed_fp8_weight_scale(mixed_out, tmp_path):
    d = _damaged(mixed_out, tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight_scale"
    _rewrite(d, lambda t: t.__setitem__(name, torch.nextafter(t[name], torch.tensor(1.0))))
    assert verify(d).ok  # one ulp off, finite and positive: only recomputation from the source finds it
    r = verify(d, str(GOLDEN / "source"), amax=str(MIXED / "amax.pt"))
    assert any(f"tensor {name!r}" in p and "recomputed" in p for p in r.problems), r.problems


@pytest.mark.parametrize("value", [0.0, float("nan"), -1.0])
def test_verify_fails_an_unusable_fp8_scale(mixed_out, tmp_path, value):
    d = _damaged(mixed_out, tmp_path)
    name = "model.layers.1.self_attn.v_proj.input_scale"
    _rewrite(d, lambda t: t.__setitem__(name, torch.tensor(value)))
    r = verify(d)
    assert any(name in p and "finite and positive" in p for p in r.problems), r.problems


def test_verify_fails_fp8_without_input_scale(mixed_out, tmp_path):
    d = _damaged(mixed_out, tmp_path)
    _rewrite(d, lambda t: t.pop("model.layers.1.self_attn.o_proj.input_scale"))
    (d / "model.safetensors.index.json").unlink(missing_ok=True)
    r = verify(d)
    assert any("model.layers.1.self_attn.o_proj has no input_scale" in p for p in r.problems), r.problems


def test_verify_fails_nan_fp8_codes(mixed_out, tmp_path):
    d = _damaged(mixed_out, tmp_path)
    name = "model.layers.0.self_attn.o_proj.weight"

    def poison(t):
        raw = t[name].view(torch.uint8).clone()
        raw[3, 5] = 0x7F
        t[name] = raw.view(torch.float8_e4m3fn)
    _rewrite(d, poison)
    r = verify(d)
    assert any(name in p and "NaN" in p for p in r.problems), r.problems


def _edit_configs(d: Path, change) -> None:
    for fname, key in (("config.json", "quantization_config"), ("hf_quant_config.json", "quantization")):
        doc = json.loads((d / fname).read_text())
        change(doc[key])
        (d / fname).write_text(json.dumps(doc))


@pytest.mark.parametrize("damage, needle", [
    (lambda q: q["quantized_layers"].pop("model.layers.1.self_attn.k_proj"), "not in quantized_layers"),
    (lambda q: q["quantized_layers"].__setitem__("model.layers.0.self_attn.q_proj", {"quant_algo": "NVFP4",
                                                                                     "group_size": 16}),
     "another format"),
    (lambda q: q["quantized_layers"].__setitem__("model.layers.0.mlp.experts", {"quant_algo": "FP8"}),
     "another format"),
    (lambda q: q["quantized_layers"].__setitem__("lm_head", {"quant_algo": "FP8"}), "kept in source precision"),
    (lambda q: q.__setitem__("quant_algo", "NVFP4"), "MIXED_PRECISION"),
])
def test_verify_fails_a_wrong_quantized_layers(mixed_out, tmp_path, damage, needle):
    d = _damaged(mixed_out, tmp_path)
    _edit_configs(d, damage)
    r = verify(d)
    assert any(needle in p for p in r.problems), r.problems


def test_verify_fails_fp8_tensors_under_a_plain_nvfp4_config(mixed_out, tmp_path):
    d = _damaged(mixed_out, tmp_path)

    def plain(q):
        q.pop("quantized_layers")
        q["quant_algo"] = "NVFP4"
    _edit_configs(d, plain)
    r = verify(d)
    assert any("FP8" in p and "MIXED_PRECISION" in p for p in r.problems), r.problems


def test_format_for_overrides_the_recipe_last_match_wins(tmp_path):
    _convert_golden(tmp_path / "out", "--format-for", "model.layers.1.self_attn.*=keep",
                    "--format-for", "model.layers.1.self_attn.o_proj=fp8")
    out = load_checkpoint(tmp_path / "out")
    assert out["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert out["model.layers.1.self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn
    layers = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())["quantization"]["quantized_layers"]
    assert "model.layers.1.self_attn.q_proj" not in layers
    assert layers["model.layers.1.self_attn.o_proj"] == {"quant_algo": "FP8"}
    assert verify(tmp_path / "out", str(GOLDEN / "source"), amax=str(MIXED / "amax.pt")).ok


def test_format_for_alone_works_without_a_recipe(tmp_path):
    _convert_golden(tmp_path / "out", "--recipe", "nvfp4", "--format-for", "*.self_attn.o_proj=fp8")
    out = load_checkpoint(tmp_path / "out")
    assert out["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn
    assert out["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert verify(tmp_path / "out").ok


@pytest.fixture
def moe_src(tmp_path):
    return write_checkpoint(tmp_path / "src", family="qwen3_moe", num_layers=1, shard_size=200_000)


def test_refuses_fp8_without_activation_amax(moe_src, tmp_path):
    """vLLM loads ModelOpt FP8 layers as W8A8 with a static input_scale; without one it uses a placeholder."""
    check_fails(moe_src, tmp_path / "out", "FP8 layers", "input", args=RECIPE)


def test_refuses_a_fusion_group_of_two_formats(tmp_path):
    check_fails(GOLDEN / "source", tmp_path / "out", "fusion group", "model.layers.0.self_attn",
                args=(*RECIPE, "--amax", MIXED / "amax.pt", "--format-for", "model.layers.0.self_attn.q_proj=nvfp4"))


def test_refuses_experts_of_one_layer_in_two_formats(tmp_path):
    check_fails(GOLDEN / "source", tmp_path / "out", "model.layers.0.mlp.experts", "one format",
                args=(*RECIPE, "--amax", MIXED / "amax.pt", "--format-for", "model.layers.0.mlp.experts.1.*=keep"))


def test_refuses_compressed_tensors(tmp_path):
    check_fails(GOLDEN / "source", tmp_path / "out", "modelopt format only",
                args=(*RECIPE, "--amax", MIXED / "amax.pt", "--format", "compressed-tensors"))


def test_refuses_a_recipe_without_nvfp4(tmp_path):
    src = write_checkpoint(tmp_path / "src", family="llama", num_layers=1)
    check_fails(src, tmp_path / "out", "no module would be NVFP4", args=RECIPE)


def test_refuses_a_bad_format_for(tmp_path):
    check_fails(GOLDEN / "source", tmp_path / "out", "--format-for", "PATTERN=FORMAT",
                args=("--format-for", "model.layers.0.self_attn.q_proj=int4"))


def test_a_format_for_pattern_that_matches_nothing_is_an_error_with_strict(tmp_path):
    check_fails(GOLDEN / "source", tmp_path / "out", "--format-for", "model.layer.*.o_proj=fp8", "matches no module",
                args=(*RECIPE, "--amax", MIXED / "amax.pt", "--strict", "--format-for", "model.layer.*.o_proj=fp8"))


def test_dry_run_names_the_recipe():
    import shardconv

    p = shardconv.plan(GOLDEN / "source", amax=MIXED / "amax.pt", recipe="nvfp4-experts-fp8")
    assert p.quant_algo == "MIXED_PRECISION"
    assert any(line.startswith("recipe      nvfp4-experts-fp8: 24 NVFP4, 8 FP8") for line in shardconv.describe(p))


def test_resume_with_another_recipe_is_refused(mixed_out, tmp_path):
    """Another recipe changes the planned tensors' dtypes, so the run's fingerprint (journal.py) differs."""
    d = tmp_path / "out"
    shutil.copytree(mixed_out, d)
    before = tree_digest(d)
    rc, err = run_cli("convert", GOLDEN / "source", d, "--amax", MIXED / "amax.pt", *RECIPE, "--device", "cpu",
                      "--no-progress", "--format-for", "*.o_proj=keep")
    assert rc == 2 and "different conversion" in err, err
    assert tree_digest(d) == before


def _synth_with_amax(tmp_path, family, **kw):
    src = write_checkpoint(tmp_path / "src", family=family, num_layers=2, shard_size=300_000, **kw)
    amax = tmp_path / "amax.pt"
    torch.save(make_amax(load_checkpoint(src), static=False, inputs=True, kv=True), amax)
    return src, amax


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "deepseek_v3"])
def test_recipe_on_moe_families_verifies(family, tmp_path):
    """Experts NVFP4; attention (MLA too), dense and shared-expert MLPs FP8; routers kept; FP8 KV scales."""
    src, amax = _synth_with_amax(tmp_path, family)
    dst = tmp_path / "out"
    rc, err = run_cli("convert", src, dst, "--amax", amax, *RECIPE, "--device", "cpu", "--no-progress")
    assert rc == 0, err
    out = load_checkpoint(dst)
    hq = json.loads((dst / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "MIXED_PRECISION"
    assert hq["kv_cache_quant_algo"] == (None if family == "deepseek_v3" else "FP8")  # MLA: no k_proj amax here
    layers = hq["quantized_layers"]
    n_fp8 = 0
    for name, t in out.items():
        if not name.endswith(".weight_scale") or t.dim():
            continue
        module = name[: -len(".weight_scale")]
        assert ".experts." not in module and out[f"{module}.weight"].dtype == torch.float8_e4m3fn
        assert layers[module] == {"quant_algo": "FP8"}
        n_fp8 += 1
    assert n_fp8 > 0  # the loop above checked some FP8 layer
    experts = [k for k in layers if k.endswith(".experts")]
    assert experts and all(layers[k] == {"quant_algo": "NVFP4", "group_size": 16} for k in experts)
    assert not any(k.endswith((".gate", "shared_expert_gate")) for k in layers)
    r = verify(dst, str(src), amax=str(amax))
    assert r.ok, r.problems


@pytest.mark.gpu
def test_mixed_on_cuda_equals_cpu(tmp_path):
    """The pipeline's CUDA path (FP8 groups unbatched, experts batched) writes the CPU's bytes."""
    _convert_golden(tmp_path / "cpu")
    rc, err = run_cli("convert", GOLDEN / "source", tmp_path / "gpu", "--amax", MIXED / "amax.pt", *RECIPE,
                      "--device", "cuda", "--no-progress")
    assert rc == 0, err
    a, b = load_checkpoint(tmp_path / "cpu"), load_checkpoint(tmp_path / "gpu")
    assert a.keys() == b.keys()
    assert all(same_bytes(a[k], b[k]) for k in a)
    for name in ("config.json", "hf_quant_config.json"):
        assert (tmp_path / "cpu" / name).read_text() == (tmp_path / "gpu" / name).read_text()


def test_a_nan_in_an_fp8_layer_is_refused(tmp_path):
    """An FP8 layer's weight with a NaN: one line naming the tensor and no index, never an FP8 scale of NaN."""
    import shutil

    from test_hostile_numbers import edit

    src = tmp_path / "src"
    shutil.copytree(GOLDEN / "source", src)
    name = "model.layers.0.self_attn.o_proj.weight"

    def poison(t):
        t = t.clone()
        t[1, 2] = float("nan")
        return t
    edit(src, {name: poison})
    dst = tmp_path / "out"
    rc, err = run_cli("convert", src, dst, "--amax", MIXED / "amax.pt", *RECIPE, "--device", "cpu", "--no-progress")
    assert rc == 2 and name in err and "NaN" in err and err.count("\n") == 1, err
    assert not (dst / "model.safetensors.index.json").exists()


def test_refuses_an_expert_excluded_from_a_quantized_mixed_layer(tmp_path):
    """--exclude of one expert: MIXED_PRECISION's quantized_layers names the layer's ...experts module as
    a whole, so its kept bf16 weights would be loaded as NVFP4. Refused (with --recipe nvfp4 the
    exclusion list carries it and it is fine)."""
    check_fails(GOLDEN / "source", tmp_path / "out", "model.layers.0.mlp.experts.1", "keep all of its experts",
                args=(*RECIPE, "--amax", MIXED / "amax.pt", "--exclude", "model.layers.0.mlp.experts.1"))


def test_partial_kv_amax_in_a_mixed_output_is_declared_per_layer(tmp_path):
    """k/v amax for only some attention layers: the MIXED_PRECISION configs list the layers with scales
    (kv_cache_quantized_layers) as the NVFP4 configs do, never a global FP8 claim; verify passes it."""
    amax = torch.load(MIXED / "amax.pt", weights_only=True)
    config = json.loads((GOLDEN / "source" / "config.json").read_text())
    assert config["num_hidden_layers"] >= 2 and not any("bmm" in k for k in amax)
    amax["model.layers.0.self_attn.k_bmm_quantizer._amax"] = torch.tensor(3.0)  # layer 0 only
    amax["model.layers.0.self_attn.v_bmm_quantizer._amax"] = torch.tensor(2.0)
    torch.save(amax, tmp_path / "amax.pt")
    dst = tmp_path / "out"
    rc, err = run_cli("convert", GOLDEN / "source", dst, "--amax", tmp_path / "amax.pt", *RECIPE, "--device", "cpu",
                      "--no-progress")
    assert rc == 0, err
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    hq = json.loads((dst / "hf_quant_config.json").read_text())["quantization"]
    assert qc["quant_algo"] == hq["quant_algo"] == "MIXED_PRECISION"
    for doc in (qc, hq):
        assert "model.layers.0.self_attn" in json.dumps(doc["kv_cache_quantized_layers"])
        assert "model.layers.1.self_attn" not in json.dumps(doc["kv_cache_quantized_layers"])
    assert run_cli("verify", dst, "--source", GOLDEN / "source", "--amax", tmp_path / "amax.pt")[0] == 0


@pytest.mark.parametrize("factor", [1.3, 0.75])
def test_verify_holds_fp8_layers_to_their_own_error_bound(mixed_out, tmp_path, factor):
    """An FP8 weight_scale 30% off reconstructs with relative error ~0.3: under the NVFP4 bound (0.5), which
    FP8 layers were held to before, so verify without recomputation passed it. An FP8 layer rounds within
    ~2^-4 (0.027 here), and is held to 0.125."""
    name = "model.layers.0.self_attn.q_proj.weight_scale"
    clean = verify(mixed_out, str(GOLDEN / "source"), recompute=False)
    assert clean.ok, clean.problems
    assert max(e for m, _, e in clean.errors if m.endswith("self_attn.q_proj")) < 0.05
    d = _damaged(mixed_out, tmp_path)
    _rewrite(d, lambda t: t.__setitem__(name, t[name] * factor))
    r = verify(d, str(GOLDEN / "source"), recompute=False)
    err = dict((m, e) for m, _, e in r.errors)["model.layers.0.self_attn.q_proj"]
    assert 0.125 < err < 0.5  # passed the one bound for every layer
    assert any("relative error above 0.5 (FP8 layers 0.125)" in p and "self_attn.q_proj" in p for p in r.problems), \
        r.problems
