"""A checkpoint that is exactly its family's layout (layouts.py) is planned without building the model,
and that plan is the model's plan, file for file: the same output tensors in the same shards, the
same config files, report and exclusions, for every family, its variants and encoded sources. One
tensor more, less or of another shape, remote code, another architecture or a config value left out,
and the model decides again (a tensor of the model in no shard is still refused)."""

import json
from collections import namedtuple

import pytest

from conftest import run_cli
from shardconv import api, layouts, linears, speculation, synth_layout
from shardconv.formats import get_format
from shardconv.linears_helper import plain_view
from shardconv.planning import build_plan
from shardconv.source import open_source
from shardconv.synth import write_checkpoint
from shardconv.synth_int4 import write_int4_checkpoint
from shardconv.synth_mxfp4 import write_mxfp4_checkpoint
from test_hostile_linears import drop_tensor

Info = namedtuple("Info", "name shape")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    out = {f: write_checkpoint(root / f, family=f, num_layers=3 if f == "deepseek_v3" else 2, shard_size=120_000)
           for f in layouts.FAMILIES}
    out["llama_tied"] = write_checkpoint(root / "llama_tied", family="llama", tie_word_embeddings=True)
    out["llama_bias"] = write_checkpoint(root / "llama_bias", family="llama", attention_bias=True)
    out["qwen3_moe_dense0"] = write_checkpoint(root / "qwen3_moe_dense0", family="qwen3_moe", mlp_only_layers=[0])
    out["qwen3_moe_step2"] = write_checkpoint(root / "qwen3_moe_step2", family="qwen3_moe", num_layers=4,
                                              decoder_sparse_step=2)
    out["deepseek_no_q_lora"] = write_checkpoint(root / "deepseek_no_q_lora", family="deepseek_v3", num_layers=2,
                                                 q_lora_rank=None)
    no_head_dim = synth_layout.make_config("llama", num_layers=2)  # Llama-3's config.json names none
    del no_head_dim["head_dim"]
    out["llama_no_head_dim"] = write_checkpoint(root / "llama_no_head_dim", no_head_dim)
    remote = synth_layout.make_config("deepseek_v3", num_layers=2)  # DeepSeek-V3's own config.json names its code
    remote["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                          "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    out["deepseek_auto_map"] = write_checkpoint(root / "deepseek_auto_map", remote)
    out["gpt_oss_mxfp4"] = write_mxfp4_checkpoint(root / "gpt_oss_mxfp4", num_layers=2)
    out["llama_int4"] = write_int4_checkpoint(root / "llama_int4", family="llama", num_layers=2)
    from test_fp8 import make_fp8

    bf16 = write_checkpoint(root / "deepseek_bf16", family="deepseek_v3", num_layers=2, hidden_size=256,
                            intermediate_size=320, moe_intermediate_size=64, vocab_size=256, shard_size=300_000)
    out["deepseek_fp8"], _ = make_fp8(bf16, root / "deepseek_fp8")
    return out


def plans(src, monkeypatch, fmt="modelopt", excludes=(), errors=False):
    """(the plan from the layout, the plan from the model) of ``src``; with ``errors``, a refusal in
    place of a plan (ShardconvError) rather than raised."""
    from shardconv.errors import ShardconvError

    got = []
    for layouts_on in ("1", "0"):
        monkeypatch.setenv("SHARDCONV_LAYOUTS", layouts_on)
        try:
            got.append(build_plan(open_source(str(src)), get_format(fmt), scales="max", excludes=list(excludes)))
        except ShardconvError as e:
            if not errors:
                raise
            got.append(e)
    return got


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_every_layout_plans_exactly_as_the_model(sources, monkeypatch, fmt):
    pytest.importorskip("transformers")
    for name, src in sources.items():
        if fmt == "compressed-tensors" and name == "gpt_oss_mxfp4":
            continue  # stacked MXFP4 experts are written in the modelopt format only
        by_layout, by_model = plans(src, monkeypatch, fmt)
        assert by_layout.linears.method == "layout", name
        assert by_model.linears.method == "model", name
        assert by_layout.quantized, name
        assert speculation.difference(by_layout, by_model, get_format(fmt), None) is None, name


def test_an_excluding_plan_is_the_models_too(sources, monkeypatch):
    pytest.importorskip("transformers")
    for name in ("llama", "qwen3_moe", "deepseek_v3"):
        by_layout, by_model = plans(sources[name], monkeypatch, "modelopt", excludes=["*self_attn*", "*.1.mlp*"])
        assert by_layout.linears.method == "layout" and by_model.linears.method == "model", name
        assert speculation.difference(by_layout, by_model, get_format("modelopt"), None) is None, name


def exact_specs(family="llama", **overrides):
    config = synth_layout.make_config(family, num_layers=2)
    config.update(overrides)
    return config, {n: Info(n, s) for n, s in layouts.tensor_specs(config)}


def test_anything_but_the_exact_layout_is_left_to_the_model():
    config, tensors = exact_specs()
    assert layouts.exact(config, tensors) == "llama"
    inv_freq = "model.layers.0.self_attn.rotary_emb.inv_freq"
    more = dict(tensors, **{inv_freq: Info(inv_freq, (64,))})
    assert layouts.exact(config, more) is None
    less = dict(tensors)
    del less["model.layers.1.mlp.down_proj.weight"]
    assert layouts.exact(config, less) is None
    down = "model.layers.1.mlp.down_proj.weight"
    other = dict(tensors, **{down: Info(down, (7, 7))})
    assert layouts.exact(config, other) is None
    remote = dict(config, auto_map={"AutoModelForCausalLM": "x.Y"})
    assert layouts.exact(remote, tensors) == "llama"  # transformers' own class is the model then too
    assert layouts.exact(remote, tensors, trust_remote_code=True) is None  # its own code decides
    assert layouts.exact(dict(config, architectures=["MistralForCausalLM"]), tensors) is None
    assert layouts.exact(dict(config, architectures=["LlamaForCausalLM", "Other"]), tensors) is None
    assert layouts.exact(dict(config, model_type="mistral"), tensors) is None
    assert layouts.exact({k: v for k, v in config.items() if k != "tie_word_embeddings"}, tensors) is None
    assert layouts.exact(dict(config, num_hidden_layers=10**9), tensors) is None
    assert layouts.exact(dict(config, num_hidden_layers="2"), tensors) is None
    assert layouts.exact(dict(config, hidden_size=None), tensors) is None
    assert layouts.exact(dict(config, hidden_size=float(config["hidden_size"])), tensors) is None
    assert layouts.exact(dict(config, num_attention_heads="4", head_dim=10**10), tensors) is None  # no 10 GB string
    assert layouts.exact(dict(config, num_attention_heads=True), tensors) is None
    assert layouts.exact(dict(config, mlp_only_layers="0"), tensors) is None
    ds, ds_tensors = exact_specs("deepseek_v3")
    assert layouts.exact(ds, ds_tensors) == "deepseek_v3"
    assert layouts.exact(dict(ds, moe_layer_freq=2), ds_tensors) is None  # transformers' model has no such key
    q3, q3_tensors = exact_specs("qwen3")
    assert layouts.exact({k: v for k, v in q3.items() if k != "head_dim"}, q3_tensors) is None


# Config values that add tensors to transformers' model which tensor_specs leaves out (or that its
# model reads otherwise): a checkpoint written by tensor_specs for them lacks tensors the model expects.
THE_MODEL_WANTS_MORE = [
    ("llama", {"mlp_bias": True}), ("deepseek_v3", {"attention_bias": True}), ("deepseek_v3", {"q_lora_rank": 0}),
    ("deepseek_v3", {"n_shared_experts": 0}), ("qwen2_moe", {"shared_expert_intermediate_size": 0}),
    ("mixtral", {"num_local_experts": 0}), ("qwen3_moe", {"num_experts": 0}), ("deepseek_v3", {"moe_layer_freq": 2}),
    ("qwen3", {"head_dim": None}), ("gpt_oss", {"head_dim": None}), ("qwen3_moe", {"decoder_sparse_step": 0}),
]
# A second expert-count key, which transformers reads in place of the one the layout reads: the
# model would have another number of experts than the shards hold (found by review); the model path
# refuses them by shape since stop 21 (test_a_second_expert_count_is_refused_by_the_model).
ANOTHER_EXPERT_COUNT = [("qwen3_moe", {"num_local_experts": 2}), ("mixtral", {"num_experts": 2}),
                        ("gpt_oss", {"num_experts": 2}), ("deepseek_v3", {"num_local_experts": 2})]
# Variants the layout may answer for; where it does, the model must plan the same and refuse nothing.
VARIANTS = [
    ("llama", {"attention_bias": True}), ("llama", {"head_dim": None}), ("mistral", {"tie_word_embeddings": True}),
    ("qwen2", {"tie_word_embeddings": True}), ("qwen3", {"attention_bias": True}),
    ("qwen3_moe", {"num_layers": 4, "decoder_sparse_step": 2}), ("qwen3_moe", {"mlp_only_layers": [0, 7]}),
    ("qwen2_moe", {"qkv_bias": False}), ("mixtral", {"head_dim": None}), ("mixtral", {"attention_bias": True}),
    ("deepseek_v3", {"first_k_dense_replace": 5}), ("deepseek_v3", {"num_nextn_predict_layers": 2}),
    ("deepseek_v3", {"num_nextn_predict_layers": 0}), ("deepseek_v3", {"n_shared_experts": 2}),
    ("gpt_oss", {"tie_word_embeddings": True}),
]


def layout_and_model(src, monkeypatch):
    """(layouts.exact's family, the plan from the layout or its refusal, the model's plan or its refusal)."""
    source = open_source(str(src))
    return (layouts.exact(source.config, plain_view(source)), *plans(src, monkeypatch, errors=True))


@pytest.mark.parametrize("family,overrides", THE_MODEL_WANTS_MORE)
def test_a_value_that_adds_tensors_to_the_model_leaves_the_decision_to_it(family, overrides, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    config = synth_layout.make_config(family, num_layers=2)
    config.update(overrides)
    src = write_checkpoint(tmp_path / "src", config)  # the tensors tensor_specs says: fewer than the model's
    found, by_layout, by_model = layout_and_model(src, monkeypatch)
    assert found is None, (family, overrides)
    if isinstance(by_layout, Exception):
        assert str(by_layout) == str(by_model)
    else:
        assert by_layout.linears.method != "layout"


@pytest.mark.parametrize("family,overrides", ANOTHER_EXPERT_COUNT)
def test_a_second_expert_count_leaves_the_decision_to_the_model(family, overrides):
    config, tensors = exact_specs(family)
    assert layouts.exact(config, tensors) == family
    assert layouts.exact(dict(config, **overrides), tensors) is None


@pytest.mark.parametrize("family,overrides", ANOTHER_EXPERT_COUNT)
def test_a_second_expert_count_is_refused_by_the_model(family, overrides, tmp_path):
    """The same configs, converted: transformers' model has another number of experts than the shards
    hold (a shape or merged-size mismatch), so the run is refused with one line and writes nothing (it
    exited 0 before stop 21: the model path compared names only)."""
    pytest.importorskip("transformers")
    config = synth_layout.make_config(family, num_layers=3 if family == "deepseek_v3" else 2)
    src = write_checkpoint(tmp_path / "src", config)
    (src / "config.json").write_text(json.dumps(dict(json.loads((src / "config.json").read_text()), **overrides)))
    rc, err = run_cli("convert", src, tmp_path / "out", "--device", "cpu", "--no-progress", "--scales", "max")
    assert rc == 2 and err.count("\n") == 1 and "expects" in err and "transformers would refuse" in err, err
    assert not (tmp_path / "out").exists()


def test_a_bias_the_layout_does_not_know_is_refused_as_the_model_refuses_it(tmp_path):
    """Llama with ``mlp_bias`` but no MLP biases in its shards: a broken checkpoint, refused with one line
    (with layouts taken as they were before this was fixed, it converted and exited 0)."""
    pytest.importorskip("transformers")
    src = write_checkpoint(tmp_path / "src", synth_layout.make_config("llama", num_layers=2, mlp_bias=True))
    rc, err = run_cli("convert", src, tmp_path / "out", "--device", "cpu", "--no-progress", "--scales", "max")
    assert rc != 0 and "mlp.down_proj.bias" in err and "no shard" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family,overrides", VARIANTS)
def test_where_the_layout_answers_the_model_agrees(family, overrides, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    overrides = {"num_layers": 3 if family == "deepseek_v3" else 2, **overrides}
    src = write_checkpoint(tmp_path / "src", synth_layout.make_config(family, **overrides))
    found, by_layout, by_model = layout_and_model(src, monkeypatch)
    assert found == family, (family, overrides)
    assert not isinstance(by_model, Exception), by_model  # the model refuses nothing the layout accepts
    assert by_layout.linears.method == "layout"
    assert speculation.difference(by_layout, by_model, get_format("modelopt"), None) is None
    assert by_layout.excluded == by_model.excluded  # the reasons too


def test_a_huge_claimed_model_is_not_expanded(monkeypatch):
    """1024 layers of 8192 experts claimed over a 2-layer tensor set: the layout stops at the first
    layer that differs instead of listing 25 million tensors."""
    config, tensors = exact_specs("deepseek_v3")
    config.update(num_hidden_layers=1024, n_routed_experts=8192)
    calls = []
    real = layouts._decoder_layer
    monkeypatch.setattr(layouts, "_decoder_layer", lambda *a: calls.append(a[2]) or real(*a))
    assert layouts.exact(config, tensors) is None
    assert len(calls) <= 2


def test_a_run_planned_by_the_model_is_the_same_conversion_for_the_layout(sources, monkeypatch, tmp_path):
    """A second run into the same DST, one with the model deciding (an older shardconv, or
    SHARDCONV_LAYOUTS=0) and one with the layout: the same journal fingerprint, so DST holds this
    conversion already, and an interrupted one resumes rather than being refused as another plan."""
    monkeypatch.setenv("SHARDCONV_LAYOUTS", "0")
    first = api.convert(sources["qwen3_moe"], tmp_path / "out", device="cpu", scales="max")
    assert not first.already_complete
    monkeypatch.setenv("SHARDCONV_LAYOUTS", "1")
    assert api.plan(sources["qwen3_moe"], scales="max").linears.method == "layout"
    second = api.convert(sources["qwen3_moe"], tmp_path / "out", device="cpu", scales="max")
    assert second.already_complete


def test_a_missing_tensor_is_still_refused_with_layouts_on(tmp_path):
    pytest.importorskip("transformers")
    src = write_checkpoint(tmp_path / "src", family="llama", num_layers=2, shard_size=100_000)
    drop_tensor(src, "model.layers.1.mlp.down_proj.weight")
    assert linears.by_layout(open_source(str(src))) is None
    rc, err = run_cli("convert", src, tmp_path / "out", "--device", "cpu", "--no-progress", "--scales", "max")
    assert rc != 0 and "model.layers.1.mlp.down_proj.weight" in err and "no shard" in err
    assert not (tmp_path / "out").exists()


def test_the_switch_turns_layouts_off(sources, monkeypatch):
    source = open_source(str(sources["llama"]))
    assert linears.by_layout(source).method == "layout"
    monkeypatch.setenv("SHARDCONV_LAYOUTS", "0")
    assert linears.by_layout(source) is None


class Helper:
    trust_remote_code = False

    def __init__(self):
        self.closed = self.asked = 0

    def pending(self, trust_remote_code):
        return not self.closed

    def answer(self, source, trust_remote_code, tensors=None):
        self.asked += 1
        return None

    def close(self):
        self.closed += 1


def test_a_known_layout_ends_the_helper_and_converts_without_speculating(sources, monkeypatch, tmp_path):
    helper = Helper()
    monkeypatch.setattr(linears, "HELPERS", [helper])
    made = []
    monkeypatch.setattr(speculation, "Speculation", lambda *a, **k: made.append(a) or pytest.fail("speculated"))
    api.convert(sources["qwen3_moe"], tmp_path / "out", device="cpu", scales="max")
    assert helper.closed and not helper.asked and not made
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]


def test_an_encoded_source_is_matched_on_its_plain_view(sources):
    source = open_source(str(sources["deepseek_fp8"]))
    assert any(n.endswith("weight_scale_inv") for n in source.tensors)
    assert linears.by_layout(source) is None  # its own tensors: scales beside the weights
    assert linears.by_layout(source, plain_view(source)).method == "layout"


def test_dry_run_says_the_layout_decided(sources, capsys):
    from shardconv.cli import main

    assert main(["convert", str(sources["mixtral"]), "/nonexistent/dst", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "by name rules: every tensor is where MixtralForCausalLM puts it" in out
