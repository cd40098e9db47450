"""Issue 12.5: FP8 KV-cache scales for only the attention modules with usable k/v amax, declared per
layer (``kv_cache_quantized_layers``, schema 1, as newer ModelOpt writes it), never a global FP8 claim
over layers without scales; verify passes such outputs and fails damaged declarations."""

import json
import shutil

import pytest
import torch

from conftest import load_checkpoint, run_cli
from shardconv.api import verify
from shardconv.synth import write_checkpoint
from test_amax import make_amax, weights

ATTN = [f"model.layers.{i}.self_attn" for i in range(3)]
KEY = "kv_cache_quantized_layers"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("kvl") / "src", family="llama", weights="structured",
                            num_layers=3, shard_size=150_000)


@pytest.fixture(scope="module")
def partial(llama, tmp_path_factory):
    """Layer 1 has no k/v amax, layer 2 a zero v amax: scales and the declaration for layer 0 only."""
    root = tmp_path_factory.mktemp("kvl_out")
    amax = make_amax(weights(llama))
    for k in [k for k in amax if k.startswith(f"{ATTN[1]}.") and "bmm" in k]:
        del amax[k]
    amax[f"{ATTN[2]}.v_bmm_quantizer._amax"] = torch.tensor(0.0)
    torch.save(amax, root / "amax.pt")
    rc, err = run_cli("convert", llama, root / "out", "--amax", root / "amax.pt", "--no-progress")
    assert rc == 0, err
    return root / "out", root / "amax.pt"


def configs(dst):
    return (json.loads((dst / "hf_quant_config.json").read_text()),
            json.loads((dst / "config.json").read_text()))


def test_partial_kv_writes_only_those_scales_and_the_per_layer_declaration(partial):
    dst, _ = partial
    out = load_checkpoint(dst)
    assert {n for n in out if n.endswith(("k_scale", "v_scale"))} == {
        f"{ATTN[0]}.k_proj.k_scale", f"{ATTN[0]}.v_proj.v_scale"}
    assert out[f"{ATTN[0]}.k_proj.k_scale"].item() == pytest.approx(12.5 / 448)
    hf, cfg = configs(dst)
    hq, qc = hf["quantization"], cfg["quantization_config"]
    assert hq["kv_cache_quant_algo"] == "FP8"
    assert hq[KEY] == qc[KEY] == {ATTN[0]: {"quant_algo": "FP8"}}
    assert hq["kv_cache_schema_version"] == qc["kv_cache_schema_version"] == 1
    assert qc["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    report = json.loads((dst / "shardconv-report.json").read_text())
    assert report["kv_cache_scales_for"] == [ATTN[0]] and report["kv_cache_scales_missing"] == ATTN[1:]
    assert report["synthesized_amax"] == []


def test_verify_passes_the_partial_output(partial, llama):
    dst, amax = partial
    assert verify(dst).ok, verify(dst).problems
    full = verify(dst, llama, amax=amax)
    assert full.ok, full.problems


def damaged(partial, tmp_path, change):
    dst = tmp_path / "bad"
    shutil.copytree(partial[0], dst)
    hf, cfg = configs(dst)
    change(hf["quantization"], cfg["quantization_config"])
    (dst / "hf_quant_config.json").write_text(json.dumps(hf))
    (dst / "config.json").write_text(json.dumps(cfg))
    return verify(dst)


def test_verify_fails_a_declared_layer_without_scales(partial, tmp_path):
    def add(hq, qc):
        for c in (hq, qc):
            c[KEY][ATTN[1]] = {"quant_algo": "FP8"}
    r = damaged(partial, tmp_path, add)
    assert not r.ok and any(f"lists {ATTN[1]}" in p and "no scale" in p for p in r.problems), r.problems


def test_verify_fails_a_scale_for_a_layer_the_declaration_does_not_list(partial, tmp_path):
    def drop(hq, qc):
        for c in (hq, qc):
            c[KEY] = {ATTN[2]: {"quant_algo": "FP8"}}
    r = damaged(partial, tmp_path, drop)
    assert not r.ok and any(f"{ATTN[0]}.k_proj.k_scale" in p and "does not list" in p for p in r.problems)


def test_verify_fails_a_global_claim_over_layers_without_scales(partial, tmp_path):
    def drop(hq, qc):
        for c in (hq, qc):
            del c[KEY], c["kv_cache_schema_version"]
    r = damaged(partial, tmp_path, drop)
    assert not r.ok and any("every layer" in p and ATTN[1] in p for p in r.problems), r.problems


def test_verify_fails_configs_listing_different_layers(partial, tmp_path):
    def other(hq, qc):
        qc[KEY] = {}
    r = damaged(partial, tmp_path, other)
    assert not r.ok and any("list different" in p for p in r.problems), r.problems


def test_full_kv_output_has_no_per_layer_keys(llama, tmp_path):
    torch.save(make_amax(weights(llama)), tmp_path / "amax.pt")
    rc, err = run_cli("convert", llama, tmp_path / "out", "--amax", tmp_path / "amax.pt", "--no-progress")
    assert rc == 0, err
    hf, cfg = configs(tmp_path / "out")
    assert KEY not in hf["quantization"] and KEY not in cfg["quantization_config"]
    assert "kv_cache_schema_version" not in hf["quantization"]
    assert verify(tmp_path / "out").ok


def test_verify_with_the_amax_file_fails_scales_it_does_not_give(llama, partial, tmp_path):
    """A full-KV output checked against the partial amax file: layers 1 and 2 carry scales the file
    cannot make (recompute.py), though their declaration is consistent."""
    torch.save(make_amax(weights(llama)), tmp_path / "amax.pt")
    rc, err = run_cli("convert", llama, tmp_path / "out", "--amax", tmp_path / "amax.pt", "--no-progress")
    assert rc == 0, err
    r = verify(tmp_path / "out", llama, amax=partial[1])
    assert not r.ok and any(f"{ATTN[1]}.k_proj.k_scale" in p and "no usable" in p for p in r.problems), r.problems


@pytest.mark.parametrize("change, words", [
    (lambda r: r.update(kv_cache_scales_for=ATTN[:2]), f"first {ATTN[1]}: listed without"),
    (lambda r: r.update(kv_cache_scales_for=[]), f"first {ATTN[0]}: has them, not listed"),
    (lambda r: r.update(kv_cache_scales_missing=ATTN), f"kv_cache_scales_missing lists {ATTN[0]}"),
    (lambda r: r.update(kv_cache_scales_missing="all"), "must both be lists"),
])
def test_verify_fails_a_report_whose_kv_lists_dst_does_not_bear_out(partial, tmp_path, change, words):
    dst = tmp_path / "bad"
    shutil.copytree(partial[0], dst)
    report = json.loads((dst / "shardconv-report.json").read_text())
    change(report)
    (dst / "shardconv-report.json").write_text(json.dumps(report))
    r = verify(dst)
    assert not r.ok and any("shardconv-report.json" in p and words in p for p in r.problems), r.problems
