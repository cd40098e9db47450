"""Re-export from saved amax files (static per-block, per-tensor, activation and KV amax)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load_checkpoint, run_cli, same_bytes
from shardconv import numerics as nx
from shardconv.amax import load_amax
from shardconv.module_rules import fusion_key
from shardconv.synth import write_checkpoint


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    src = tmp_path_factory.mktemp("llama") / "src"
    write_checkpoint(src, family="llama", weights="structured", num_layers=2, shard_size=150_000)
    return src


def weights(src):
    out = {}
    for p in sorted(src.glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


def linear_modules(w):
    skip = ("lm_head", "embed_tokens")
    return [n[:-7] for n, t in w.items() if n.endswith(".weight") and t.ndim == 2 and not n.startswith(skip) and "embed" not in n and "lm_head" not in n]


def make_amax(w, static=True, inputs=True, kv=True, scale=0.9):
    """An amax dict as ModelOpt's state_dict holds it, with block amax below the true max."""
    g = torch.Generator().manual_seed(3)
    amax = {}
    for m in linear_modules(w):
        t = w[m + ".weight"]
        if static:
            blocks = nx.block_amax(t) * scale
            amax[f"{m}.weight_quantizer._amax"] = blocks.reshape(-1, 1)
            amax[f"{m}.weight_quantizer._global_amax"] = blocks.max() * 1.01
        else:
            amax[f"{m}.weight_quantizer._amax"] = t.abs().max().float()
        if inputs:
            amax[f"{m}.input_quantizer._amax"] = torch.rand((), generator=g) * 10 + 1
    if kv:
        for m in linear_modules(w):
            if m.endswith("self_attn.q_proj"):
                attn = m.rsplit(".", 1)[0]
                amax[f"{attn}.k_bmm_quantizer._amax"] = torch.tensor(12.5)
                amax[f"{attn}.v_bmm_quantizer._amax"] = torch.tensor(3.25)
    return amax


def expected(w, amax, modules):
    groups = {}
    for m in modules:
        groups.setdefault(fusion_key(m) or m, []).append(m)
    want = {}
    for members in groups.values():
        static = f"{members[0]}.weight_quantizer._global_amax" in amax
        key = "_global_amax" if static else "_amax"
        g = torch.stack([amax[f"{m}.weight_quantizer.{key}"].reshape(()) for m in members]).max()
        s2 = nx.global_scale(g)
        ins = torch.stack([amax[f"{m}.input_quantizer._amax"] for m in members]).max() if f"{members[0]}.input_quantizer._amax" in amax else None
        for m in members:
            t = w[m + ".weight"]
            if static:
                s = nx.block_scales_static(amax[f"{m}.weight_quantizer._amax"].reshape(t.shape[0], -1), g)
            else:
                s = nx.block_scales_dynamic(t, s2)
            want[m] = (nx.quantize(t, s, s2), s, s2, None if ins is None else nx.global_scale(ins))
    return want


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("static", [True, False])
def test_reexport_from_amax(llama, tmp_path, suffix, static):
    w = weights(llama)
    amax = make_amax(w, static=static)
    path = tmp_path / f"amax{suffix}"
    if suffix == ".pt":
        torch.save(amax, path)
    else:
        save_file({k: v.contiguous() for k, v in amax.items()}, str(path))
    dst = tmp_path / "out"
    rc, err = run_cli("convert", llama, dst, "--amax", path, "--device", "cpu", "--no-progress")
    assert rc == 0, err
    out = load_checkpoint(dst)
    mods = sorted(n[:-15] for n in out if n.endswith(".weight_scale_2"))
    assert set(mods) == set(linear_modules(w))
    for m, (packed, s, s2, ins) in expected(w, amax, mods).items():
        assert same_bytes(out[m + ".weight"], packed), m
        assert same_bytes(out[m + ".weight_scale"], s), m
        assert same_bytes(out[m + ".weight_scale_2"], s2.reshape(())), m
        assert same_bytes(out[m + ".input_scale"], ins.reshape(())), m
    assert out["model.layers.0.self_attn.k_proj.k_scale"].item() == pytest.approx(12.5 / 448)
    assert out["model.layers.0.self_attn.v_proj.v_scale"].item() == pytest.approx(3.25 / 448)
    hq = json.loads((dst / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "NVFP4" and hq["kv_cache_quant_algo"] == "FP8"
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["input_activations"]["num_bits"] == 4
    assert qc["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    if static:  # zero blocks get 448 on the static path
        zero = nx.block_amax(w["model.layers.0.mlp.up_proj.weight"]) == 0
        if zero.any():
            assert (out["model.layers.0.mlp.up_proj.weight_scale"].view(torch.uint8)[zero] == 0x7E).all()


def test_scales_max_overrides_file_weights_but_keeps_activations(llama, tmp_path):
    w = weights(llama)
    amax = make_amax(w, kv=False)
    torch.save(amax, tmp_path / "a.pt")
    rc, err = run_cli("convert", llama, tmp_path / "out", "--amax", tmp_path / "a.pt", "--scales", "max", "--no-progress")
    assert rc == 0, err
    out = load_checkpoint(tmp_path / "out")
    m = "model.layers.1.mlp.down_proj"
    t = w[m + ".weight"]
    s2 = nx.global_scale(t.abs().max().float())
    assert same_bytes(out[m + ".weight_scale"], nx.block_scales_dynamic(t, s2))
    assert m + ".input_scale" in out


def test_fused_expert_keys_are_split_per_expert(tmp_path):
    # transformers-5 fused experts: one quantizer per expert over [2I, H], gate rows first.
    I, H, n = 4, 32, 2
    raw = {}
    for e in range(n):
        raw[f"model.layers.0.mlp.experts.gate_up_proj_weight_quantizers.{e}._amax"] = torch.arange(2 * I * H // 16).float() + e
        raw[f"model.layers.0.mlp.experts.gate_up_proj_weight_quantizers.{e}._global_amax"] = torch.tensor(100.0 + e)
        raw[f"model.layers.0.mlp.experts.down_proj_weight_quantizers.{e}._amax"] = torch.tensor(7.0)
    raw["model.layers.0.mlp.experts.gate_up_proj_input_quantizer._amax"] = torch.tensor(5.0)
    torch.save(raw, tmp_path / "a.pt")
    a = load_amax(tmp_path / "a.pt")
    gate, up = a.get("model.layers.0.mlp.experts.1.gate_proj"), a.get("model.layers.0.mlp.experts.1.up_proj")
    assert torch.equal(gate.weight, torch.arange(I * H // 16).float() + 1)
    assert torch.equal(up.weight, torch.arange(I * H // 16, 2 * I * H // 16).float() + 1)
    assert gate.global_amax.item() == up.global_amax.item() == 101.0
    assert gate.input.item() == 5.0 and a.get("model.layers.0.mlp.experts.0.down_proj").weight.item() == 7.0
    # Mixtral's on-disk names find the same entries
    assert a.get("model.layers.0.block_sparse_moe.experts.1.w1") is gate


def test_amax_errors(llama, tmp_path):
    w = weights(llama)
    amax = make_amax(w, kv=False)
    del amax["model.layers.1.mlp.gate_proj.weight_quantizer._amax"]
    torch.save(amax, tmp_path / "missing.pt")
    rc, err = run_cli("convert", llama, tmp_path / "o1", "--amax", tmp_path / "missing.pt")
    assert rc == 2 and "missing.pt" in err and "model.layers.1.mlp.gate_proj" in err and err.count("\n") == 1
    assert not (tmp_path / "o1").exists()

    amax = make_amax(w, kv=False)
    amax["model.layers.0.self_attn.o_proj.weight_quantizer._amax"] = torch.ones(7, 1)
    torch.save(amax, tmp_path / "shape.pt")
    rc, err = run_cli("convert", llama, tmp_path / "o2", "--amax", tmp_path / "shape.pt")
    assert rc == 2 and "model.layers.0.self_attn.o_proj" in err and "expected" in err

    amax = make_amax(w, kv=False)
    del amax["model.layers.0.mlp.down_proj.input_quantizer._amax"]
    torch.save(amax, tmp_path / "noinput.pt")
    rc, err = run_cli("convert", llama, tmp_path / "o3", "--amax", tmp_path / "noinput.pt")
    assert rc == 2 and "model.layers.0.mlp.down_proj" in err and "input_quantizer" in err


def test_pickle_with_code_is_refused(tmp_path, llama):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x.weight_quantizer._amax": Evil()}, f)
    rc, err = run_cli("convert", llama, tmp_path / "o", "--amax", tmp_path / "evil.pt")
    assert rc == 2 and "evil.pt" in err and "weights_only" in err
    assert not marker.exists()
