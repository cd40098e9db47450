"""Linear weights are found exactly: from the config's model on the meta device, else by name rules.

A BERT checkpoint's position and token-type embeddings are 2-D ``.weight`` tensors that names alone
took for Linear layers; here they stay byte-identical whether or not transformers is importable, and
the output passes ``verify``. A checkpoint missing a tensor its model expects is refused; every synth
family plans exactly as the name rules did.
"""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load_checkpoint, run_cli, same_bytes
from shardconv import linears, meta_model
from shardconv.formats import get_format
from shardconv.planning import build_plan
from shardconv.source import open_source
from shardconv.synth import write_checkpoint
from shardconv.synth_layout import FAMILIES
from test_errors import check_fails

pytestmark = pytest.mark.usefixtures("models_decide")  # the model's path, not layouts.py's

BERT_EMBEDDINGS = ("bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings",
                   "bert.embeddings.token_type_embeddings")


def bert_config(architecture="BertForMaskedLM"):
    """A real BERT config.json (bert-base-uncased's keys), small."""
    return {"architectures": [architecture], "attention_probs_dropout_prob": 0.1, "classifier_dropout": None,
            "gradient_checkpointing": False, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 64,
            "initializer_range": 0.02, "intermediate_size": 128, "layer_norm_eps": 1e-12,
            "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 4, "num_hidden_layers": 2,
            "pad_token_id": 0, "position_embedding_type": "absolute", "transformers_version": "4.57.1",
            "type_vocab_size": 2, "use_cache": True, "vocab_size": 512}


def bert_specs(c, prefix="bert.", head=True):
    """BERT's on-disk names and shapes, as save_pretrained writes them (the tied decoder left out)."""
    h, i = c["hidden_size"], c["intermediate_size"]
    p = prefix + "embeddings."
    specs = {p + "word_embeddings.weight": (c["vocab_size"], h),
             p + "position_embeddings.weight": (c["max_position_embeddings"], h),
             p + "token_type_embeddings.weight": (c["type_vocab_size"], h),
             p + "LayerNorm.weight": (h,), p + "LayerNorm.bias": (h,)}
    for n in range(c["num_hidden_layers"]):
        x = f"{prefix}encoder.layer.{n}."
        for lin, shape in (("attention.self.query", (h, h)), ("attention.self.key", (h, h)),
                           ("attention.self.value", (h, h)), ("attention.output.dense", (h, h)),
                           ("intermediate.dense", (i, h)), ("output.dense", (h, i))):
            specs[x + lin + ".weight"], specs[x + lin + ".bias"] = shape, shape[:1]
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            specs[x + norm + ".weight"], specs[x + norm + ".bias"] = (h,), (h,)
    if head:
        specs.update({"cls.predictions.bias": (c["vocab_size"],), "cls.predictions.transform.dense.weight": (h, h),
                      "cls.predictions.transform.dense.bias": (h,), "cls.predictions.transform.LayerNorm.weight": (h,),
                      "cls.predictions.transform.LayerNorm.bias": (h,)})
    else:  # BertModel: the pooler (BertForMaskedLM has none)
        specs.update({"pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)})
    return specs


def write_bert(path, config=None, extra=()):
    config = config or bert_config()
    head = config["architectures"][0] == "BertForMaskedLM"
    specs = bert_specs(config, prefix="bert." if head else "", head=head)
    specs.update(dict(extra))
    gen = torch.Generator().manual_seed(0)
    tensors = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in specs.items()}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def dry_run(src, capsys, *args):
    from shardconv.cli import main

    assert main(["convert", str(src), "/nonexistent/dst", "--dry-run", *map(str, args)]) == 0
    return capsys.readouterr().out


def convert(src, dst):
    rc, err = run_cli("convert", src, dst, "--device", "cpu", "--no-progress", "--scales", "max")
    assert rc == 0, err
    return load_checkpoint(dst), json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"]


def test_bert_specs_are_what_transformers_expects():
    """The hand-written BERT layout is the real one: transformers' BertForMaskedLM minus its tied decoder."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(**bert_config())
    with torch.device("meta"):
        model = transformers.BertForMaskedLM(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("cls.predictions.decoder.")}
    assert bert_specs(bert_config()) == want
    with torch.device("meta"):
        model = transformers.BertModel(cfg)
    assert bert_specs(bert_config(), prefix="", head=False) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_bert_output(src, out, ignore):
    source = load_file(str(src / "model.safetensors"))
    for module in BERT_EMBEDDINGS:
        assert same_bytes(out[module + ".weight"], source[module + ".weight"]), module
        assert module + ".weight_scale" not in out
        assert module in ignore  # listed like model.embed_tokens (FORMAT.md §4)
    quantized = sorted(n[: -len(".weight_scale_2")] for n in out if n.endswith(".weight_scale_2"))
    assert len(quantized) == 2 * 6 + 1  # 6 Linear per layer and the head's transform.dense
    assert "bert.encoder.layer.1.attention.self.query" in quantized and "cls.predictions.transform.dense" in quantized
    assert out["bert.encoder.layer.0.output.dense.weight"].dtype == torch.uint8


def test_bert_embeddings_are_kept_and_verify_passes(tmp_path, capsys):
    pytest.importorskip("transformers")
    src = write_bert(tmp_path / "bert")
    out, ignore = convert(src, tmp_path / "out")
    check_bert_output(src, out, ignore)
    rc, err = run_cli("verify", tmp_path / "out", "--source", src)
    assert rc == 0, err
    text = dry_run(src, capsys)
    assert "linears     from the transformers model (BertForMaskedLM on the meta device): 13 Linear, 3 Embedding" in text
    assert "bert.embeddings.position_embeddings  (embedding)" in text


def test_bert_without_transformers_uses_name_rules_and_same_output(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    src = write_bert(tmp_path / "bert")
    with_model, _ = convert(src, tmp_path / "model")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as on a machine without it
    out, ignore = convert(src, tmp_path / "names")
    check_bert_output(src, out, ignore)
    assert out.keys() == with_model.keys() and all(same_bytes(out[k], with_model[k]) for k in out)
    rc, err = run_cli("verify", tmp_path / "names", "--source", src)
    assert rc == 0, err
    assert "linears     by name rules (transformers not installed)" in dry_run(src, capsys)


def test_bert_model_checkpoint_without_prefix(tmp_path, capsys):
    pytest.importorskip("transformers")
    src = write_bert(tmp_path / "bert", bert_config("BertModel"))
    text = dry_run(src, capsys)
    assert "(BertModel on the meta device): 13 Linear, 3 Embedding" in text
    assert "embeddings.token_type_embeddings  (embedding)" in text


def test_tied_linear_stored_anyway_is_not_quantized(tmp_path, capsys):
    """BertForMaskedLM's decoder is tied to the word embeddings: a checkpoint holding a copy keeps it."""
    pytest.importorskip("transformers")
    src = write_bert(tmp_path / "bert", extra={"cls.predictions.decoder.weight": (512, 64)})
    text = dry_run(src, capsys)
    assert "cls.predictions.decoder  (tied to bert.embeddings.word_embeddings.weight)" in text


def test_unknown_model_type_falls_back_to_name_rules(tmp_path, capsys):
    pytest.importorskip("transformers")
    src = write_checkpoint(tmp_path / "x", family="llama", num_layers=1)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="shardconv_test_arch", architectures=["XForCausalLM"],
                  auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (src / "config.json").write_text(json.dumps(config))
    text = dry_run(src, capsys)
    assert "linears     by name rules (model_type 'shardconv_test_arch' unknown to transformers" in text
    assert "runs only with --trust-remote-code" in text
    # with the flag, transformers looks for the remote code (absent here): still the name rules, never a crash
    text = dry_run(src, capsys, "--trust-remote-code")
    assert "linears     by name rules (its remote config could not be loaded" in text


def drop_tensor(src, name):
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = src / index["weight_map"].pop(name)
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def test_missing_tensor_of_the_model_is_refused(tmp_path):
    pytest.importorskip("transformers")
    src = write_checkpoint(tmp_path / "src", family="llama", num_layers=2, shard_size=100_000)
    drop_tensor(src, "model.layers.1.mlp.down_proj.weight")
    check_fails(src, tmp_path / "out", "model.layers.1.mlp.down_proj.weight", "model.safetensors.index.json",
                "LlamaForCausalLM", "no shard")


def test_missing_tensor_of_an_moe_model_is_refused(tmp_path):
    """Mixtral's router is renamed at load (block_sparse_moe -> mlp): still found missing."""
    pytest.importorskip("transformers")
    src = write_checkpoint(tmp_path / "src", family="mixtral", num_layers=2, shard_size=100_000)
    drop_tensor(src, "model.layers.0.block_sparse_moe.gate.weight")
    check_fails(src, tmp_path / "out", "model.layers.0.mlp.gate.weight", "MixtralForCausalLM")


def test_missing_tied_lm_head_and_foreign_layout_are_not_refused(tmp_path, capsys):
    pytest.importorskip("transformers")
    tied = write_checkpoint(tmp_path / "tied", family="llama", num_layers=2, tie_word_embeddings=True)
    assert "lm_head.weight" not in open_source(str(tied)).tensors
    assert "from the transformers model (LlamaForCausalLM" in dry_run(tied, capsys)
    # names the model does not know (another layout under a llama config): no missing-tensor verdict
    src = write_checkpoint(tmp_path / "foreign", family="llama", num_layers=2)
    tensors = load_file(str(src / "model.safetensors"))
    save_file({"transformer." + k: v for k, v in tensors.items()}, str(src / "model.safetensors"), {"format": "pt"})
    assert "16 not in the model: by name rules" in dry_run(src, capsys)


def family_sources(root):
    out = {f: write_checkpoint(root / f, family=f, num_layers=3 if f == "deepseek_v3" else 2, shard_size=120_000)
           for f in FAMILIES}
    out["llama_tied"] = write_checkpoint(root / "llama_tied", family="llama", tie_word_embeddings=True)
    out["qwen3_moe_dense0"] = write_checkpoint(root / "qwen3_moe_dense0", family="qwen3_moe", mlp_only_layers=[0])
    out["deepseek_no_q_lora"] = write_checkpoint(root / "deepseek_no_q_lora", family="deepseek_v3", num_layers=2,
                                                 q_lora_rank=None)
    return out


def plan_summary(src):
    plan = build_plan(open_source(str(src)), get_format("modelopt"), scales="max")
    return plan, sorted(m.module for m in plan.quantized), dict(plan.excluded)


def test_every_family_plans_as_the_name_rules_did(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    sources = family_sources(tmp_path)
    with_model = {}
    for family, src in sources.items():
        text = dry_run(src, capsys)  # not refused, and the model was used
        assert "linears     from the transformers model (" in text, (family, text)
        plan, quantized, excluded = plan_summary(src)
        assert plan.linears.method == "model" and quantized, family
        with_model[family] = quantized, {m for m in excluded}
    monkeypatch.setitem(sys.modules, "transformers", None)
    for family, src in sources.items():
        plan, quantized, excluded = plan_summary(src)
        assert plan.linears.method == "names", family
        assert (quantized, set(excluded)) == with_model[family], family


def test_fp8_deepseek_source_is_not_refused(tmp_path, capsys):
    pytest.importorskip("transformers")
    from test_fp8 import make_fp8

    src = write_checkpoint(tmp_path / "bf16", family="deepseek_v3", num_layers=2, hidden_size=256,
                           intermediate_size=320, moe_intermediate_size=64, vocab_size=256, shard_size=300_000)
    fp8, _ = make_fp8(src, tmp_path / "fp8", input_scales=True)
    text = dry_run(fp8, capsys)
    assert "linears     from the transformers model (DeepseekV3ForCausalLM" in text


def test_find_never_raises_on_a_broken_model(monkeypatch, tmp_path):
    """An exception from a model's __init__ falls back to the name rules, with the reason."""
    transformers = pytest.importorskip("transformers")
    src = write_checkpoint(tmp_path / "src", family="llama", num_layers=1)

    def boom(self, *a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(meta_model, "BUILT", {})  # no meta model cached from an earlier test
    monkeypatch.setattr(transformers.LlamaForCausalLM, "__init__", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", classmethod(boom))
    monkeypatch.setattr(transformers.AutoModel, "from_config", classmethod(boom))
    found = linears.find(open_source(str(src)))
    assert found.method == "names" and "kaboom" in found.why


def write_gpt2(path):
    """GPT-2's layout: every projection is a Conv1D whose weight is [in, out], a Linear's transpose."""
    c = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "bos_token_id": 511,
         "eos_token_id": 511, "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 64, "n_embd": 64,
         "n_head": 4, "n_layer": 2, "n_positions": 64, "vocab_size": 512}
    h = c["n_embd"]
    specs = {"transformer.wte.weight": (512, h), "transformer.wpe.weight": (64, h),
             "transformer.ln_f.weight": (h,), "transformer.ln_f.bias": (h,)}
    for n in range(c["n_layer"]):
        x = f"transformer.h.{n}."
        for conv, shape in (("attn.c_attn", (h, 3 * h)), ("attn.c_proj", (h, h)), ("mlp.c_fc", (h, 4 * h)),
                            ("mlp.c_proj", (4 * h, h))):
            specs[x + conv + ".weight"], specs[x + conv + ".bias"] = shape, shape[1:]
        for norm in ("ln_1", "ln_2"):
            specs[x + norm + ".weight"], specs[x + norm + ".bias"] = (h,), (h,)
    gen = torch.Generator().manual_seed(0)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(c, indent=2))
    save_file({n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in specs.items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_gpt2_conv1d_is_never_quantized(tmp_path, capsys, monkeypatch):
    """Conv1D weights are [in, out]: quantizing them as [out, in] Linears would serve garbage."""
    pytest.importorskip("transformers")
    src = write_gpt2(tmp_path / "gpt2")
    text = dry_run(src, capsys)
    assert "(GPT2LMHeadModel on the meta device): 8 Conv1D, 2 Embedding" in text
    assert "transformer.h.*.attn.c_attn  (not a Linear (Conv1D))" in text
    monkeypatch.setitem(sys.modules, "transformers", None)
    text = dry_run(src, capsys)
    assert "linears     by name rules (transformers not installed)" in text
    assert "transformer.h.*.mlp.c_fc  (not a Linear (Conv1D, by name))" in text
    assert "quantize    0 Linear weights" in text
    check_fails(src, tmp_path / "out", "nothing to quantize", "not a Linear (Conv1D, by name)")


REMOTE_CONFIG = '''
from transformers import PretrainedConfig


class XConfig(PretrainedConfig):
    model_type = "shardconv_remote_x"

    def __init__(self, hidden_size=64, vocab_size=128, **kwargs):
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        super().__init__(**kwargs)
'''
REMOTE_MODEL = '''
import torch.nn as nn
from transformers import PreTrainedModel

from .configuration_x import XConfig


class XForCausalLM(PreTrainedModel):
    config_class = XConfig

    def __init__(self, config):
        super().__init__(config)
        self.tok = nn.Embedding(config.vocab_size, config.hidden_size)  # no name rule knows "tok"
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.post_init()
'''


def test_remote_code_runs_only_with_trust_remote_code(tmp_path, capsys, monkeypatch):
    """A model with its own code: name rules (which take its "tok" embedding for a Linear) unless the
    user passes --trust-remote-code; then its real modules decide."""
    pytest.importorskip("transformers")
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # transformers copies the code there
    src = tmp_path / "remote"
    src.mkdir()
    (src / "configuration_x.py").write_text(REMOTE_CONFIG)
    (src / "modeling_x.py").write_text(REMOTE_MODEL)
    config = {"architectures": ["XForCausalLM"], "model_type": "shardconv_remote_x", "hidden_size": 64,
              "vocab_size": 128, "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                              "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}
    (src / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    save_file({"tok.weight": torch.randn(128, 64, generator=gen).bfloat16(),
               "proj.weight": torch.randn(64, 64, generator=gen).bfloat16()}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    text = dry_run(src, capsys)
    assert "by name rules (model_type 'shardconv_remote_x' unknown" in text and "quantize    2 Linear" in text
    text = dry_run(src, capsys, "--trust-remote-code")
    assert "linears     from the transformers model (XForCausalLM on the meta device): 1 Embedding, 1 Linear" in text
    assert "quantize    1 Linear" in text and "tok  (embedding)" in text


def test_absurd_layer_count_is_not_built(tmp_path, capsys):
    """A config claiming a million layers would take minutes to build even on the meta device."""
    pytest.importorskip("transformers")
    src = write_checkpoint(tmp_path / "x", family="llama", num_layers=1)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = 10**6
    (src / "config.json").write_text(json.dumps(config))
    assert "by name rules (num_hidden_layers 1000000 is too large to build its model)" in dry_run(src, capsys)


def test_the_meta_model_leaves_the_source_config_as_it_is(tmp_path):
    """transformers' config classes write into nested dicts (llama3 rope_scaling gains rope_theta):
    DST's config.json must be SRC's, whatever the meta model did (it was, only when not cached)."""
    import json

    from shardconv import linears
    from shardconv.source import open_source
    from shardconv.synth import write_checkpoint

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    src = write_checkpoint(tmp_path / "src", family="llama", num_layers=1, rope_scaling=rope)
    source = open_source(str(src))
    before = json.dumps(source.config, sort_keys=True)
    meta_model.BUILT.clear()
    linears.find(source)
    assert json.dumps(source.config, sort_keys=True) == before
