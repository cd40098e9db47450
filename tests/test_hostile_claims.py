"""Hostile inputs, class 2: a config never claims what the tensors do not hold.

No quant_algo when nothing is quantized; no KV-cache declaration or k/v scales for attention modules
that do not exist, and a per-layer declaration when only some have k/v amax; no scales taken from an amax file whose keys, shapes or
values do not fit the model. Each is refused with one line naming the key, SRC untouched, no index.
"""

import json

import pytest
import torch

from conftest import load_checkpoint, run_cli, tree_digest
from shardconv.synth import write_checkpoint
from test_amax import make_amax, weights


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("claims") / "src", family="llama", weights="structured",
                            num_layers=2, shard_size=150_000)


def refused(src, dst, *needles, args=()):
    before = tree_digest(src)
    rc, err = run_cli("convert", src, dst, "--no-progress", "--device", "cpu", *args)
    assert rc == 2 and err.startswith("shardconv: error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, (n, err)
    assert tree_digest(src) == before
    assert not (dst / "model.safetensors.index.json").exists()
    assert not (dst / "config.json").exists()
    return err


def with_amax(llama, tmp_path, change, name="amax.pt", **kw):
    amax = make_amax(weights(llama), **kw)
    change(amax)
    torch.save(amax, tmp_path / name)
    return ("--amax", tmp_path / name)


# -- nothing quantized ----------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["*", "model.*"])
def test_excluding_everything_is_refused(llama, tmp_path, pattern):
    refused(llama, tmp_path / "out", "nothing to quantize", "--exclude", args=("--exclude", pattern))


def test_a_model_without_linear_layers_is_refused(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    # a model type transformers does not know (so no missing-tensor check applies): name rules find no Linear
    (src / "config.json").write_text(json.dumps({"model_type": "norm_only", "architectures": ["NormOnly"]}))
    save_file({"model.norm.weight": torch.ones(64, dtype=torch.bfloat16)}, str(src / "model.safetensors"))
    refused(src, tmp_path / "out", "nothing to quantize")


# -- KV cache ---------------------------------------------------------------------------------------


def test_kv_amax_for_an_attention_module_that_does_not_exist(llama, tmp_path):
    def add(a):
        a["model.layers.7.self_attn.k_bmm_quantizer._amax"] = torch.tensor(3.0)
        a["model.layers.7.self_attn.v_bmm_quantizer._amax"] = torch.tensor(3.0)
    refused(llama, tmp_path / "out", "model.layers.7.self_attn", "amax.pt", args=with_amax(llama, tmp_path, add))


def test_kv_amax_on_a_module_that_is_no_attention(llama, tmp_path):
    def add(a):
        a["model.layers.0.mlp.k_bmm_quantizer._amax"] = torch.tensor(3.0)
        a["model.layers.0.mlp.v_bmm_quantizer._amax"] = torch.tensor(3.0)
    refused(llama, tmp_path / "out", "model.layers.0.mlp", "not an attention module",
            args=with_amax(llama, tmp_path, add))


def _kv_of(dst):
    out = load_checkpoint(dst)
    hq = json.loads((dst / "hf_quant_config.json").read_text())["quantization"]
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    return {n for n in out if n.endswith(("k_scale", "v_scale"))}, hq, qc


def test_kv_amax_for_only_some_layers_is_declared_per_layer(llama, tmp_path):
    """Issue 12.5 (was refused): scales for the layers that have k/v amax, listed per layer; no bare claim."""
    def drop(a):
        for k in [k for k in a if k.startswith("model.layers.1.") and "bmm" in k]:
            del a[k]
    rc, err = run_cli("convert", llama, tmp_path / "out", "--no-progress", *with_amax(llama, tmp_path, drop))
    assert rc == 0, err
    names, hq, qc = _kv_of(tmp_path / "out")
    assert names == {"model.layers.0.self_attn.k_proj.k_scale", "model.layers.0.self_attn.v_proj.v_scale"}
    layers = {"model.layers.0.self_attn": {"quant_algo": "FP8"}}
    assert hq["kv_cache_quant_algo"] == "FP8" and hq["kv_cache_quantized_layers"] == layers
    assert qc["kv_cache_quantized_layers"] == layers and qc["kv_cache_schema_version"] == 1
    assert hq["kv_cache_schema_version"] == 1


def test_zero_kv_amax_leaves_that_layer_out(llama, tmp_path):
    """Issue 12.5 (was refused): a zero k or v amax (an attention that never ran) gets no scale."""
    def zero(a):
        a["model.layers.0.self_attn.v_bmm_quantizer._amax"] = torch.tensor(0.0)
    rc, err = run_cli("convert", llama, tmp_path / "out", "--no-progress", *with_amax(llama, tmp_path, zero))
    assert rc == 0, err
    names, hq, qc = _kv_of(tmp_path / "out")
    assert names == {"model.layers.1.self_attn.k_proj.k_scale", "model.layers.1.self_attn.v_proj.v_scale"}
    assert set(hq["kv_cache_quantized_layers"]) == set(qc["kv_cache_quantized_layers"]) == {"model.layers.1.self_attn"}


def test_zero_kv_amax_everywhere_declares_no_kv_cache(llama, tmp_path):
    def zero(a):
        for k in [k for k in a if "bmm" in k]:
            a[k] = torch.tensor(0.0)
    rc, err = run_cli("convert", llama, tmp_path / "out", "--no-progress", *with_amax(llama, tmp_path, zero))
    assert rc == 0, err
    names, hq, qc = _kv_of(tmp_path / "out")
    assert not names and hq["kv_cache_quant_algo"] is None and "kv_cache_quantized_layers" not in hq
    assert "kv_cache_scheme" not in qc and "kv_cache_quantized_layers" not in qc


def test_full_kv_amax_is_declared_and_shipped(llama, tmp_path):
    """The control: every attention module has k/v amax -> FP8 KV declared and every scale written."""
    rc, err = run_cli("convert", llama, tmp_path / "out", "--no-progress", *with_amax(llama, tmp_path, lambda a: a))
    assert rc == 0, err
    out = load_checkpoint(tmp_path / "out")
    hf = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())
    assert hf["quantization"]["kv_cache_quant_algo"] == "FP8"
    assert "kv_cache_quantized_layers" not in hf["quantization"]  # all layers: ModelOpt 0.47's global claim
    assert not (tmp_path / "out" / "shardconv-report.json").exists()
    assert {n for n in out if n.endswith(("k_scale", "v_scale"))} == {
        f"model.layers.{i}.self_attn.{p}_proj.{p}_scale" for i in range(2) for p in "kv"}


# -- amax files that do not fit the model ----------------------------------------------------------


def test_amax_for_an_unknown_module_is_refused(llama, tmp_path):
    def add(a):
        a["model.layers.9.mlp.down_proj.weight_quantizer._amax"] = torch.ones(4, 1)
    refused(llama, tmp_path / "out", "'model.layers.9.mlp.down_proj.weight_quantizer._amax'", "does not have",
            args=with_amax(llama, tmp_path, add))


def test_static_block_amax_above_the_global_amax_is_refused(llama, tmp_path):
    key = "model.layers.1.mlp.up_proj.weight_quantizer._amax"

    def raise_one(a):
        a[key] = a[key].clone()
        a[key][3] = a[key.replace("_amax", "_global_amax")] * 2
    refused(llama, tmp_path / "out", key, "above the module's global amax", args=with_amax(llama, tmp_path, raise_one))


@pytest.mark.parametrize("kind", ["empty", "meta", "sparse", "int8", "vector input"])
def test_degenerate_amax_tensors_are_refused(llama, tmp_path, kind):
    key = "model.layers.0.self_attn.o_proj.input_quantizer._amax"
    value = {"empty": torch.empty(0), "meta": torch.empty((), device="meta"),
             "sparse": torch.tensor([[0.0, 2.0]]).to_sparse(), "int8": torch.tensor(3, dtype=torch.int8),
             "vector input": torch.tensor([1.0, 2.0])}[kind]

    def put(a):
        a[key] = value
    refused(llama, tmp_path / "out", key, args=with_amax(llama, tmp_path, put))


def test_zero_global_amax_over_nonzero_weights_is_refused(llama, tmp_path):
    key = "model.layers.0.mlp.down_proj.weight_quantizer"

    def zero(a):
        a[f"{key}._global_amax"] = torch.tensor(0.0)
        a[f"{key}._amax"] = torch.zeros_like(a[f"{key}._amax"])
    refused(llama, tmp_path / "out", "model.layers.0.mlp.down_proj.weight", "global amax of 0",
            args=with_amax(llama, tmp_path, zero))


def test_zero_dynamic_amax_over_nonzero_weights_is_refused(llama, tmp_path):
    def zero(a):
        a["model.layers.1.self_attn.o_proj.weight_quantizer._amax"] = torch.tensor(0.0)
    refused(llama, tmp_path / "out", "model.layers.1.self_attn.o_proj.weight", "global amax of 0",
            args=with_amax(llama, tmp_path, zero, static=False, kv=False))


def test_input_amax_too_small_for_an_input_scale_is_refused(llama, tmp_path):
    def tiny(a):
        a["model.layers.0.mlp.down_proj.input_quantizer._amax"] = torch.tensor(1e-44)
    refused(llama, tmp_path / "out", "model.layers.0.mlp.down_proj.weight", "input_scale",
            args=with_amax(llama, tmp_path, tiny, kv=False))


def test_zero_input_amax_exports_the_fp4_bound_as_modelopt_does(llama, tmp_path):
    """An input quantizer that saw no data (amax 0) gets ModelOpt's export value, 6.0: a usable scale."""
    def zero(a):
        a["model.layers.0.mlp.down_proj.input_quantizer._amax"] = torch.tensor(0.0)
    rc, err = run_cli("convert", llama, tmp_path / "out", "--no-progress", *with_amax(llama, tmp_path, zero, kv=False))
    assert rc == 0, err
    s = load_checkpoint(tmp_path / "out")["model.layers.0.mlp.down_proj.input_scale"]
    assert float(s) == pytest.approx(6.0 / 2688) and float(s) > 0
