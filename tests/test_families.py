"""Every model family users convert: MoE layouts, MLA, MTP layers, stacked experts, unknown architectures.

Each family is a generated checkpoint with the real names and config fields (shardconv.synth), split
over several shards, checked tensor by tensor against an independent reference; Mixtral and GPT-OSS
are also checked byte for byte against ModelOpt 0.47's own export (tests/golden, tools/make_golden.py).
"""

import fnmatch
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import load_checkpoint, run_cli, same_bytes
from shardconv import numerics as nx
from shardconv.module_rules import fusion_key
from shardconv.synth import write_checkpoint

GOLDEN = Path(__file__).parent / "golden"


def source_tensors(src):
    out = {}
    for p in sorted(Path(src).glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


def reference(src, modules):
    """--scales max by hand: 2-D Linears grouped by name; stacked [E, in, out] experts transposed."""
    groups = {}
    for m in modules:
        groups.setdefault(fusion_key(m) or m, []).append(m)
    want = {}
    for members in groups.values():
        ws = {m: src[m] if m in src else src[m + ".weight"] for m in members}
        s2 = nx.global_scale(torch.stack([w.abs().max().float() for w in ws.values()]).max())
        for m, w in ws.items():
            if w.dim() == 3:  # quantize each expert's transpose, store transposed back
                wt = w.transpose(1, 2)
                s = nx.block_scales_dynamic(wt, s2)
                want[m] = (nx.quantize(wt, s, s2).transpose(1, 2), s.transpose(1, 2), s2)
            else:
                s = nx.block_scales_dynamic(w, s2)
                want[m] = (nx.quantize(w, s, s2), s, s2)
    return want


def convert(src, dst, *args):
    if "--scales" not in args and "--amax" not in args:  # these tests check max scales (the default is mse)
        args = ("--scales", "max", *args)
    rc, err = run_cli("convert", src, dst, "--device", "cpu", "--no-progress", *args)
    assert rc == 0, err
    return load_checkpoint(dst), json.loads((Path(dst) / "hf_quant_config.json").read_text())


def names_of(out, stacked=False):
    if stacked:
        return sorted(n[: -len("_weight_scale_2")] for n in out if n.endswith("_weight_scale_2") and "." in n
                      and not n.endswith(".weight_scale_2"))
    return sorted(n[: -len(".weight_scale_2")] for n in out if n.endswith(".weight_scale_2"))


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family, kw in {
        "mixtral": {},
        "qwen2_moe": {},
        "deepseek_v3": {"num_layers": 3},  # layer 0 dense, 1-2 MoE, layer 3 = MTP
        "gpt_oss": {},
    }.items():
        kw.setdefault("num_layers", 2)
        out[family] = write_checkpoint(root / family, family=family, weights="structured", shard_size=120_000, **kw)
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_moe_family(families, family, tmp_path):
    src_dir = families[family]
    assert len(list(src_dir.glob("model-*.safetensors"))) > 1
    out, hq = convert(src_dir, tmp_path / "out")
    src = source_tensors(src_dir)
    excluded = hq["quantization"]["exclude_modules"]
    mods = names_of(out) + names_of(out, stacked=True)
    want = reference(src, mods)
    for m, (packed, scale, s2) in want.items():
        w, s, t = (m, m + "_weight_scale", m + "_weight_scale_2") if m in src else (
            m + ".weight", m + ".weight_scale", m + ".weight_scale_2")
        assert same_bytes(out[w], packed) and same_bytes(out[s], scale) and same_bytes(out[t], s2.reshape(())), m
    produced = {n for m in want for n in (m, m + ".weight", m + ".weight_scale", m + ".weight_scale_2",
                                          m + "_weight_scale", m + "_weight_scale_2")}
    for name, t in src.items():  # everything else: byte for byte
        if name not in produced:
            assert same_bytes(out[name], t), name
    # routers stay in source precision and are listed
    routers = [n[: -len(".weight")] for n in src if n.endswith((".gate.weight", ".router.weight", "shared_expert_gate.weight"))]
    assert routers and all(out[r + ".weight"].dtype == torch.bfloat16 for r in routers)
    assert all(any(fnmatch.fnmatchcase(r, e) for e in excluded) for r in routers), (routers, excluded)
    # per-expert (and shared-expert) gate/up pairs share weight_scale_2
    pairs = [(m, m[: -len("gate_proj")] + "up_proj") for m in mods if m.endswith("gate_proj")]
    pairs += [(m, m[:-2] + "w3") for m in mods if m.endswith(".w1")]
    assert pairs or family == "gpt_oss"
    for a, b in pairs:
        assert same_bytes(out[a + ".weight_scale_2"], out[b + ".weight_scale_2"]), (a, b)
    if family == "mixtral":
        assert any(".block_sparse_moe.experts.3.w2" in m for m in mods)
    if family == "qwen2_moe":
        assert any(m.endswith("mlp.shared_expert.gate_proj") for m in mods)
        assert any(n.endswith("q_proj.bias") for n in out)
    if family == "deepseek_v3":
        mla = [m for m in mods if m.endswith("q_a_proj")]
        assert mla and all(same_bytes(out[m + ".weight_scale_2"],
                                      out[m[: -len("q_a_proj")] + "kv_a_proj_with_mqa.weight_scale_2"]) for m in mla)
        assert any(m.endswith("mlp.shared_experts.gate_proj") for m in mods)
        assert out["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
        # the MTP layer (index num_hidden_layers) is kept whole and listed as one subtree pattern
        mtp = [n for n in src if n.startswith("model.layers.3.")]
        assert mtp and all(same_bytes(out[n], src[n]) for n in mtp)
        assert "model.layers.3.*" in excluded
        assert not [e for e in excluded if e.startswith("model.layers.3.") and e != "model.layers.3.*"]
    if family == "gpt_oss":
        stacked = names_of(out, stacked=True)
        assert sorted(stacked) == sorted(f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                         for p in ("gate_up_proj", "down_proj"))
        e, h, i2 = src["model.layers.0.mlp.experts.gate_up_proj"].shape
        assert out["model.layers.0.mlp.experts.gate_up_proj"].shape == (e, h // 2, i2)
        assert out["model.layers.0.mlp.experts.gate_up_proj_weight_scale"].shape == (e, h // 16, i2)
        assert out["model.layers.0.mlp.experts.gate_up_proj_weight_scale_2"].shape == ()
        assert same_bytes(out["model.layers.0.mlp.experts.gate_up_proj_bias"], src["model.layers.0.mlp.experts.gate_up_proj_bias"])
    check_exclusion_list(excluded, src)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_dense_family(family, tmp_path):
    """Mistral and Qwen2 (q/k/v with biases, o_proj without): every projection quantized, q/k/v and
    gate/up sharing a weight_scale_2, everything else byte for byte."""
    src_dir = write_checkpoint(tmp_path / "src", family=family, weights="structured", num_layers=2, shard_size=60_000)
    assert len(list(src_dir.glob("model-*.safetensors"))) > 1
    out, hq = convert(src_dir, tmp_path / "out")
    src = source_tensors(src_dir)
    mods = names_of(out)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert sorted(mods) == sorted(f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}"
                                  for i in (0, 1) for p in projections)
    want = reference(src, mods)
    for m, (packed, scale, s2) in want.items():
        assert same_bytes(out[m + ".weight"], packed) and same_bytes(out[m + ".weight_scale"], scale), m
        assert same_bytes(out[m + ".weight_scale_2"], s2.reshape(())), m
    for i in (0, 1):
        a = f"model.layers.{i}.self_attn."
        assert same_bytes(out[a + "q_proj.weight_scale_2"], out[a + "v_proj.weight_scale_2"])
    produced = {m + suffix for m in want for suffix in (".weight", ".weight_scale", ".weight_scale_2")}
    kept = [n for n in src if n not in produced]
    assert all(same_bytes(out[n], src[n]) for n in kept)
    biases = [n for n in src if n.endswith("_proj.bias")]
    if family == "qwen2":
        assert sorted(biases) == sorted(f"model.layers.{i}.self_attn.{p}_proj.bias" for i in (0, 1) for p in "qkv")
    else:
        assert not biases
    check_exclusion_list(hq["quantization"]["exclude_modules"], src)


def check_exclusion_list(excluded, src):
    """FORMAT.md §4: exact module names or ``root.*``, never a bare prefix; a pattern covers only kept modules."""
    modules = {n[: -len(".weight")] for n in src if n.endswith(".weight")}
    modules |= {n.rpartition(".")[0] for n in src if n.endswith(("gate_up_proj", "down_proj"))}
    for e in excluded:
        if e.endswith(".*"):
            hit = [m for m in modules if fnmatch.fnmatchcase(m, e)]
            assert hit, e
        else:
            assert e in modules, f"{e} is neither an exact module name nor a subtree pattern"
            assert not any(m.startswith(e + ".") for m in modules if m not in excluded) or e.endswith("experts"), e


@pytest.mark.parametrize("case", ["max_w4a16", "static"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_matches_modelopt_export(family, case, tmp_path):
    """Byte parity with ModelOpt 0.47 for per-expert w1/w2/w3 (Mixtral) and stacked BMM experts (GPT-OSS)."""
    gold = GOLDEN / family / case
    args = [] if case == "max_w4a16" else ["--amax", gold / "amax.pt"]
    got, _ = convert(GOLDEN / family / "source", tmp_path / "out", *args)
    want = load_file(str(gold / "model.safetensors"))
    assert sorted(got) == sorted(want)
    differ = [n for n in want if not same_bytes(got[n], want[n])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:5]}"
    for name in ("config.json", "hf_quant_config.json"):
        mine, theirs = (json.loads(p.read_text()) for p in (tmp_path / "out" / name, gold / name))
        for d in (mine, theirs):
            d.pop("producer", None)
            d.get("quantization_config", {}).pop("producer", None)
        assert mine == theirs, name


def test_excluding_one_stacked_projection_keeps_the_experts_module_whole(families, tmp_path):
    out, hq = convert(families["gpt_oss"], tmp_path / "out", "--exclude", "model.layers.1.mlp.experts.down_proj")
    for p in ("gate_up_proj", "down_proj"):
        assert out[f"model.layers.1.mlp.experts.{p}"].dtype == torch.bfloat16
        assert out[f"model.layers.0.mlp.experts.{p}"].dtype == torch.uint8
    assert "model.layers.1.mlp.experts" in hq["quantization"]["exclude_modules"]


def rename_checkpoint(src, dst, rename, **config):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    from safetensors.torch import save_file

    for shard in sorted(set(index["weight_map"].values())):
        save_file({rename(k): v for k, v in load_file(str(src / shard)).items()}, str(dst / shard), {"format": "pt"})
    index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_unknown_architecture_groups_by_name(tmp_path, capsys):
    base = write_checkpoint(tmp_path / "llama", family="llama", weights="structured", num_layers=2, shard_size=150_000)

    def rename(n):
        return n.replace("model.layers.", "backbone.blocks.").replace(".self_attn.", ".attn.").replace(".mlp.", ".ffn.")

    src = rename_checkpoint(base, tmp_path / "src", rename, model_type="acme_lm", architectures=["AcmeForCausalLM"])
    out, hq = convert(src, tmp_path / "out")
    for i in (0, 1):
        p = f"backbone.blocks.{i}"
        qkv = [out[f"{p}.attn.{x}_proj.weight_scale_2"] for x in "qkv"]
        assert all(same_bytes(t, qkv[0]) for t in qkv)
        assert same_bytes(out[f"{p}.ffn.gate_proj.weight_scale_2"], out[f"{p}.ffn.up_proj.weight_scale_2"])
        assert out[f"{p}.ffn.down_proj.weight"].dtype == torch.uint8
    want = reference(source_tensors(src), names_of(out))
    assert all(same_bytes(out[m + ".weight"], w[0]) for m, w in want.items())
    assert hq["quantization"]["exclude_modules"] == ["lm_head", "model.embed_tokens"]
    from shardconv.cli import main

    assert main(["convert", str(src), str(tmp_path / "dry"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "not a tested family" in text and "backbone.blocks.*.attn.{q_proj,k_proj,v_proj}" in text
    assert "backbone.blocks.*.ffn.{gate_proj,up_proj}" in text


def test_vision_tower_is_one_subtree_pattern(tmp_path):
    base = write_checkpoint(tmp_path / "llama", family="llama", num_layers=2, shard_size=150_000)
    src = rename_checkpoint(base, tmp_path / "src", lambda n: n)
    extra = {f"model.visual.blocks.{i}.attn.{p}.weight": torch.randn(64, 64).bfloat16() for i in range(11) for p in ("qkv", "proj")}
    extra["model.visual.merger.mlp.0.weight"] = torch.randn(128, 64).bfloat16()
    from safetensors.torch import save_file

    save_file(extra, str(src / "vision.safetensors"), {"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "vision.safetensors" for k in extra})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    out, hq = convert(src, tmp_path / "out")
    excluded = hq["quantization"]["exclude_modules"]
    assert "model.visual.*" in excluded and not [e for e in excluded if e.startswith("model.visual.") and e != "model.visual.*"]
    assert all(same_bytes(out[k], v) for k, v in extra.items())
    check_exclusion_list(excluded, source_tensors(src))


def test_dry_run_reports_family_layout(families, capsys):
    from shardconv.cli import main

    assert main(["convert", str(families["deepseek_v3"]), "/nonexistent/dst", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "family      deepseek_v3: MoE" in text and "shared experts" in text and "MLA" in text
    assert "model.layers.3.*  (MTP layer, kept whole)" in text
    assert "self_attn.{q_a_proj,kv_a_proj_with_mqa}" in text and "mlp.experts.*.{gate_proj,up_proj}" in text
    assert main(["convert", str(families["gpt_oss"]), "/nonexistent/dst", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "stacked [E, in, out] expert tensors" in text and "model.layers.*.mlp.router  (router)" in text
    assert main(["convert", str(families["mixtral"]), "/nonexistent/dst", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "block_sparse_moe.experts.*.{w1,w3}" in text and "block_sparse_moe.gate  (router)" in text


@pytest.mark.gpu
@pytest.mark.parametrize("scales", ["max", "mse"])
@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3", "mixtral"])
def test_family_cuda_equals_cpu(families, family, scales, tmp_path):
    a, _ = convert(families[family], tmp_path / "cpu", "--scales", scales)
    rc, err = run_cli("convert", families[family], tmp_path / "gpu", "--device", "cuda", "--no-progress",
                      "--scales", scales)
    assert rc == 0, err
    b = load_checkpoint(tmp_path / "gpu")
    assert a.keys() == b.keys() and all(same_bytes(a[k], b[k]) for k in a)


def test_default_exclusions_name_their_reason():
    """module_rules.default_exclusion: each kept-by-default kind with its reason; towers and MTP layers
    are the subtrees excluded_subtree finds (one rule for both)."""
    from shardconv.module_rules import default_exclusion, excluded_subtree

    config = {"num_hidden_layers": 2, "num_nextn_predict_layers": 1}
    cases = {
        "lm_head": "lm_head", "model.embed_tokens": "embedding", "model.layers.0.mlp.gate": "router",
        "model.visual.blocks.0.attn.qkv": "vision/audio tower", "model.mtp.0.eh_proj": "MTP layer",
        "model.layers.2.self_attn.o_proj": "MTP layer", "model.layers.1.self_attn.o_proj": None,
    }
    for module, reason in cases.items():
        assert default_exclusion(module, config) == reason, module
        assert (excluded_subtree(module, config) is not None) == (reason in ("vision/audio tower", "MTP layer"))
    assert default_exclusion("model.layers.2.self_attn.o_proj", {"num_hidden_layers": 2}) is None  # no MTP
