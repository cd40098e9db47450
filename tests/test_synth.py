import json
import math

import pytest
import torch
from safetensors import safe_open

from shardconv import synth, synth_layout

SMALL_SHARD = 100_000

KEY_FIELDS = {
    "llama": ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"],
    "mistral": ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"],
    "qwen2": ["num_key_value_heads", "max_window_layers", "use_sliding_window"],
    "qwen3": ["head_dim", "rms_norm_eps", "max_window_layers"],
    "qwen3_moe": ["num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
                  "mlp_only_layers", "norm_topk_prob"],
    "qwen2_moe": ["num_experts", "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step",
                  "mlp_only_layers"],
    "mixtral": ["num_local_experts", "num_experts_per_tok", "intermediate_size"],
    "deepseek_v3": ["q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                    "n_routed_experts", "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers",
                    "n_group", "topk_group", "moe_intermediate_size"],
    "gpt_oss": ["num_local_experts", "num_experts_per_tok", "layer_types", "sliding_window", "head_dim"],
}


def shard_files(path):
    return sorted(p for p in path.iterdir() if synth.SHARD_RE.match(p.name))


def read_all(path):
    """name -> (tensor, shard file name), failing if a tensor is in two shards."""
    out = {}
    for f in shard_files(path):
        with safe_open(str(f), "pt") as h:
            assert h.metadata() == {"format": "pt"}
            for name in h.keys():
                assert name not in out, f"{name} in two shards"
                out[name] = (h.get_tensor(name), f.name)
    return out


@pytest.fixture(scope="module", params=synth_layout.FAMILIES)
def family_ckpt(request, tmp_path_factory):
    family = request.param
    path = tmp_path_factory.mktemp(family) / "ckpt"
    synth.write_checkpoint(path, family=family, weights="structured", shard_size=SMALL_SHARD, seed=3)
    return family, path


def test_index_shards_and_tensors_match_specs(family_ckpt):
    family, path = family_ckpt
    config = json.loads((path / "config.json").read_text())
    specs = synth_layout.tensor_specs(config)
    assert len({n for n, _ in specs}) == len(specs), "duplicate names in specs"
    files = shard_files(path)
    assert len(files) >= 2
    n = len(files)
    assert [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]

    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = read_all(path)
    assert set(index["weight_map"]) == {name for name, _ in specs} == set(tensors)
    assert all(index["weight_map"][k] == f for k, (_, f) in tensors.items())
    assert set(index["weight_map"].values()) == {f.name for f in files}

    total = 0
    for name, shape in specs:
        t = tensors[name][0]
        assert tuple(t.shape) == shape, name
        assert t.dtype == synth_layout.tensor_dtype(name, torch.bfloat16), name
        total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total == synth_layout.checkpoint_size_for(config)
    # every shard except one holding a single oversized tensor respects shard_size
    per_shard = {}
    for t, f in tensors.values():
        per_shard.setdefault(f, []).append(t.numel() * t.element_size())
    assert all(sum(v) <= SMALL_SHARD or len(v) == 1 for v in per_shard.values())
    for f in (path / "tokenizer_config.json", path / "generation_config.json"):
        json.loads(f.read_text())


def test_config_has_key_fields(family_ckpt):
    family, path = family_ckpt
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == family
    assert config["architectures"] == [synth_layout._ARCH[family]]
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    for key in ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps",
                "tie_word_embeddings", "rope_theta", *KEY_FIELDS[family]]:
        assert key in config, key
    if family == "gpt_oss":
        assert len(config["layer_types"]) == config["num_hidden_layers"]


def test_transformers_accepts_config(family_ckpt):
    transformers = pytest.importorskip("transformers")
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    family, path = family_ckpt
    if family not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    cfg = AutoConfig.from_pretrained(str(path))
    raw = json.loads((path / "config.json").read_text())
    assert type(cfg).__name__ == type(CONFIG_MAPPING[family]()).__name__
    for key in ["hidden_size", "num_hidden_layers", "vocab_size", *KEY_FIELDS[family]]:
        assert getattr(cfg, key) == raw[key], key


def test_family_specific_names():
    def names(family, **kw):
        return dict(synth_layout.tensor_specs(synth_layout.make_config(family, **kw)))

    m = names("mixtral")
    assert m["model.layers.0.block_sparse_moe.gate.weight"] == (4, 128)
    assert m["model.layers.1.block_sparse_moe.experts.3.w1.weight"] == (64, 128)
    assert m["model.layers.1.block_sparse_moe.experts.3.w2.weight"] == (128, 64)
    assert m["model.layers.1.block_sparse_moe.experts.3.w3.weight"] == (64, 128)

    q = names("qwen2_moe")
    assert q["model.layers.0.self_attn.q_proj.bias"] == (128,) and "model.layers.0.self_attn.o_proj.bias" not in q
    assert q["model.layers.0.mlp.shared_expert_gate.weight"] == (1, 128)
    assert q["model.layers.0.mlp.shared_expert.down_proj.weight"] == (128, 256)

    q3 = names("qwen3_moe", mlp_only_layers=[1])
    assert q3["model.layers.0.self_attn.q_norm.weight"] == (32,)
    assert q3["model.layers.0.mlp.experts.0.gate_proj.weight"] == (64, 128)
    assert q3["model.layers.1.mlp.gate_proj.weight"] == (256, 128)  # dense layer
    assert not any(k.startswith("model.layers.1.mlp.experts") for k in q3)
    assert "model.layers.0.self_attn.q_proj.bias" not in q3

    d = names("deepseek_v3")
    assert d["model.layers.0.mlp.gate_proj.weight"] == (256, 128)  # first_k_dense_replace=1
    assert d["model.layers.1.mlp.gate.e_score_correction_bias"] == (4,)
    assert d["model.layers.1.mlp.shared_experts.up_proj.weight"] == (64, 128)
    assert d["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"] == (32 + 16, 128)
    assert d["model.layers.1.self_attn.kv_b_proj.weight"] == (4 * (32 + 32), 32)
    assert d["model.layers.1.self_attn.q_b_proj.weight"] == (4 * (32 + 16), 64)
    assert d["model.layers.2.eh_proj.weight"] == (128, 256)  # MTP layer at num_hidden_layers
    for k in ["embed_tokens.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight",
              "shared_head.head.weight", "mlp.experts.0.down_proj.weight"]:
        assert f"model.layers.2.{k}" in d
    assert not any(k.startswith("model.layers.3.") for k in d)

    g = names("gpt_oss", moe_intermediate_size=48)
    assert g["model.layers.0.mlp.experts.gate_up_proj"] == (4, 128, 96)
    assert g["model.layers.0.mlp.experts.gate_up_proj_bias"] == (4, 96)
    assert g["model.layers.0.mlp.experts.down_proj"] == (4, 48, 128)
    assert g["model.layers.0.mlp.experts.down_proj_bias"] == (4, 128)
    assert g["model.layers.0.mlp.router.weight"] == (4, 128) and g["model.layers.0.mlp.router.bias"] == (4,)
    assert g["model.layers.0.self_attn.sinks"] == (4,) and g["model.layers.0.self_attn.o_proj.bias"] == (128,)

    for fam in synth_layout.FAMILIES:
        tied = names(fam, tie_word_embeddings=True)
        assert "lm_head.weight" not in tied and "model.embed_tokens.weight" in tied
        assert "lm_head.weight" in names(fam)
    with pytest.raises(ValueError):
        synth_layout.make_config("gpt2")


def test_deterministic_and_independent_of_sharding(tmp_path):
    kw = dict(family="qwen3_moe", weights="structured", num_layers=1, seed=7)
    a = synth.write_checkpoint(tmp_path / "a", shard_size=60_000, **kw)
    b = synth.write_checkpoint(tmp_path / "b", shard_size=60_000, **kw)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)

    c = synth.write_checkpoint(tmp_path / "c", shard_size=10**9, **kw)  # one file, no index
    assert (c / "model.safetensors").exists() and not (c / "model.safetensors.index.json").exists()
    ta, tc = read_all(a), read_all(c)
    assert ta.keys() == tc.keys()
    assert all(torch.equal(ta[k][0].view(-1).view(torch.int16), tc[k][0].view(-1).view(torch.int16)) for k in ta)

    d = synth.write_checkpoint(tmp_path / "d", shard_size=60_000, **{**kw, "seed": 8})
    td = read_all(d)
    assert not torch.equal(td["model.embed_tokens.weight"][0], ta["model.embed_tokens.weight"][0])

    # rewriting into the same folder with other sharding leaves no stale shards behind
    synth.write_checkpoint(tmp_path / "a", shard_size=10**9, **kw)
    assert [p.name for p in shard_files(tmp_path / "a")] == ["model.safetensors"]
    assert not (tmp_path / "a" / "model.safetensors.index.json").exists()


def test_put_last_is_a_sequential_write():
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 50, (400,), generator=gen)  # every position drawn many times
    values = torch.randn(400, generator=gen)
    want = torch.zeros(60)
    for i, v in zip(idx.tolist(), values.tolist()):
        want[i] = v
    got = torch.zeros(60)
    synth.put_last(got, idx, values)
    assert torch.equal(got, want)


def test_structured_values_do_not_depend_on_threads():
    """Large enough that outlier positions repeat and writes run on several threads: every generation
    equals a single-threaded one (a repeated position keeps its last value)."""
    name, shape = "model.layers.0.mlp.gate_proj.weight", (2048, 4096)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = synth.make_tensor(name, shape, weights="structured")
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(max(2, threads))
    try:
        for _ in range(6):
            assert torch.equal(synth.make_tensor(name, shape, weights="structured").view(torch.int16),
                               one.view(torch.int16))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes(tmp_path, dtype):
    path = synth.write_checkpoint(tmp_path / "x", family="deepseek_v3", dtype=dtype, shard_size=200_000,
                                  extra_files=False)
    config = json.loads((path / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == str(dtype).removeprefix("torch.")
    assert not (path / "tokenizer_config.json").exists()
    tensors = read_all(path)
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"][0].dtype == torch.float32
    assert tensors["model.embed_tokens.weight"][0].dtype == dtype
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == synth_layout.checkpoint_size_for(config, dtype)
    with pytest.raises(ValueError):
        synth.write_checkpoint(tmp_path / "y", dtype=torch.int8)


def test_weight_statistics():
    rnd = synth.make_tensor("model.layers.0.mlp.up_proj.weight", (256, 512), weights="random", dtype=torch.float32)
    assert abs(rnd.std().item() - 0.02) < 0.001 and abs(rnd.mean().item()) < 0.001

    w = synth.make_tensor("model.layers.0.mlp.up_proj.weight", (256, 512), weights="structured", dtype=torch.float32)
    blocks = w.view(256, 32, 16)
    zero_blocks = (blocks == 0).all(-1)
    assert 0 < zero_blocks.sum().item() < 0.05 * zero_blocks.numel()
    big = (w.abs() > 10 * 0.02).sum().item()
    assert 0.3e-3 * w.numel() <= big <= 3e-3 * w.numel()
    row_std = w.std(dim=1)
    assert row_std.max() / row_std.min() > 2  # per-output-channel scale variation

    norm = synth.make_tensor("model.layers.0.input_layernorm.weight", (512,), weights="structured")
    assert abs(norm.float().mean().item() - 1.0) < 0.05

    # stacked experts: zero blocks run along the input dim (dim 1)
    s = synth.make_tensor("model.layers.0.mlp.experts.gate_up_proj", (4, 128, 96), weights="structured",
                          dtype=torch.float32)
    assert (s.view(4, 8, 16, 96) == 0).all(2).any()

    # unaligned input dim: still outliers, no crash
    u = synth.make_tensor("model.layers.0.mlp.down_proj.weight", (64, 40), weights="structured")
    assert u.shape == (64, 40) and u.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        synth.make_tensor("x.weight", (4, 4), weights="gaussian")


def test_streaming_holds_one_shard(tmp_path, monkeypatch):
    seen = []
    real = synth.save_file

    def spy(tensors, filename, metadata=None):
        seen.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(synth, "save_file", spy)
    synth.write_checkpoint(tmp_path / "s", family="llama", num_layers=3, shard_size=150_000)
    assert len(seen) >= 5 and max(seen) <= 150_000


def test_size_helpers():
    target = 5 * 2**20
    n = synth_layout.layers_for_size("qwen3_moe", target, hidden_size=256)

    def size_of(layers):
        return synth_layout.checkpoint_size_for(synth_layout.make_config("qwen3_moe", num_layers=layers,
                                                                         hidden_size=256))

    size = size_of(n)
    per_layer = size_of(2) - size_of(1)
    assert abs(size - target) <= per_layer / 2 + 1
    assert synth_layout.layers_for_size("llama", 1) == 1
    assert synth.plan_shards([5, 5, 20, 1, 1], 10) == [0, 0, 1, 2, 2]


def test_sample_checkpoint(tmp_path):
    path = synth.sample_checkpoint(tmp_path / "sample")
    assert len(shard_files(path)) == 2
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama"
    total = json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert 1 * 2**20 < total < 8 * 2**20
    w = read_all(path)["model.layers.0.self_attn.q_proj.weight"][0]
    assert (w.view(w.shape[0], -1, 16) == 0).all(-1).any()  # structured: has zero blocks
    assert math.isclose(total, synth_layout.checkpoint_size_for(config))


def test_names_match_transformers_models(tmp_path):
    """When transformers is importable: its own save_pretrained writes exactly our names and shapes
    (DeepSeek-V3's MTP layer aside: transformers does not build it, released checkpoints ship it)."""
    pytest.importorskip("transformers")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    # every family, and the variants that change which tensors there are (layouts.exact trusts these)
    cases = [(family, {}) for family in synth_layout.FAMILIES] + [
        ("llama", {"attention_bias": True}), ("qwen3", {"attention_bias": True}), ("qwen2", {"tie_word_embeddings": True}),
        ("mistral", {"head_dim": None}), ("mixtral", {"head_dim": None}),
        ("qwen3_moe", {"num_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [0]}),
        ("qwen2_moe", {"qkv_bias": False}), ("deepseek_v3", {"q_lora_rank": None, "first_k_dense_replace": 0}),
        ("deepseek_v3", {"n_shared_experts": 2, "first_k_dense_replace": 2})]
    for n, (family, overrides) in enumerate(cases):
        if family not in CONFIG_MAPPING:
            continue
        overrides = {"num_layers": 2, "vocab_size": 64, "num_experts": 2, **overrides}
        config = synth_layout.make_config(family, **overrides)
        if family == "deepseek_v3":
            config["num_nextn_predict_layers"] = 0
        src = synth.write_checkpoint(tmp_path / f"{n}", config, shard_size=50_000, extra_files=False)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(src)), dtype=torch.bfloat16)
        model.save_pretrained(str(tmp_path / f"{n}-hf"))
        got = {n: tuple(t.shape) for n, (t, _) in read_all(tmp_path / f"{n}-hf").items()}
        assert got == dict(synth_layout.tensor_specs(config)), (family, overrides)
