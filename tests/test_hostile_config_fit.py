"""A config that does not describe its shards is refused, as transformers refuses to load it: a tensor of
another shape than the model's, per-expert weights whose sizes do not add up to what transformers
merges them into (one expert missing or extra). Load-time converters that reshape (Qwen3-VL-MoE) or
split into several targets (ERNIE-4.5-VL-MoE, Sarvam-MoE) are followed, not refused (linears.py).

Split from test_hostile_linears.py (past 400 lines)."""

import json

import pytest
import torch

from shardconv import linears
from shardconv.source import open_source
from shardconv.synth import write_checkpoint
from test_errors import check_fails
from test_hostile_linears import drop_tensor, dry_run

pytestmark = pytest.mark.usefixtures("models_decide")  # the model's path, not layouts.py's


def test_a_config_size_the_shards_do_not_have_is_refused(tmp_path):
    """config.json's intermediate_size edited after the shards were written: every MLP weight has another
    shape than the model's. transformers refuses to load such a checkpoint; shardconv converted it with
    exit 0 before stop 21 (names alone were compared)."""
    pytest.importorskip("transformers")
    src = write_checkpoint(tmp_path / "src", family="llama", num_layers=2, shard_size=100_000)
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] *= 2
    (src / "config.json").write_text(json.dumps(config))
    check_fails(src, tmp_path / "out", "mlp.", "has shape", "LlamaForCausalLM", "expects")


@pytest.mark.parametrize("family,expert", [("qwen3_moe", "model.layers.1.mlp.experts.3.up_proj.weight"),
                                           ("mixtral", "model.layers.0.block_sparse_moe.experts.2.w3.weight")])
def test_a_missing_expert_is_refused(family, expert, tmp_path):
    """One expert's weight gone: transformers merges the experts into one parameter at load, whose name the
    other experts still cover, so the missing-name check passed it (exit 0 before stop 21); their sizes
    no longer add up to the merged parameter's."""
    pytest.importorskip("transformers")
    src = write_checkpoint(tmp_path / "src", family=family, num_layers=2, shard_size=100_000)
    drop_tensor(src, expert)
    check_fails(src, tmp_path / "out", "experts merged into", "one expert more or fewer")


def test_a_tensor_a_load_time_converter_reshapes_is_not_compared_by_shape(tmp_path):
    """A tensor transformers converts at load under its own name (Qwen3-VL-MoE's expert stacks, stored
    [E, H, 2I] and transposed to the model's [E, 2I, H]) is not a shape mismatch: only a plain rename is
    compared shape for shape (found by review: such a checkpoint, which transformers loads, was refused)."""
    from types import SimpleNamespace

    from shardconv.safetensors_io import TensorInfo

    stack = "model.layers.0.mlp.experts.down_proj"
    plain = "model.layers.0.self_attn.o_proj.weight"
    layout = SimpleNamespace(shapes={stack: (4, 128, 32), plain: (8, 8)},
                             renamer=lambda n: (n, n == stack))  # the stack goes through a converter
    source = SimpleNamespace(config={})

    def info(name, shape):
        return TensorInfo(name=name, dtype="BF16", shape=shape, path=tmp_path / "model.safetensors", offset=0,
                          nbytes=2 * int(torch.tensor(shape).prod()))
    linears._check_shapes(source, {stack: info(stack, (4, 32, 128)), plain: info(plain, (8, 8))}, layout, "M")
    with pytest.raises(Exception, match="has shape"):
        linears._check_shapes(source, {plain: info(plain, (8, 16))}, layout, "M")


def write_ernie_vl(path):
    """A tiny ERNIE-4.5-VL-MoE as transformers' save_pretrained writes it: the Hub's per-expert layout (text
    experts 0-3, vision experts 4-7 of a smaller size, ``gate.weight`` and ``gate.weight_1``, one bias for
    both), which its load-time converter fuses and splits into a text and a vision stack per layer."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "Ernie4_5_VLMoeForConditionalGeneration", None)
    if cls is None:
        pytest.skip("this transformers has no ERNIE-4.5-VL-MoE")
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 256, "moe_intermediate_size": [32, 16], "moe_num_experts": 4,
            "moe_k": 2, "moe_num_shared_experts": 1, "max_position_embeddings": 128,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [2, 2, 4]}}
    vision = {"depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64}
    config = transformers.Ernie4_5_VLMoeConfig(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    cls(config).to(torch.bfloat16).save_pretrained(str(path), max_shard_size="100KB")
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in open_source(str(path)).tensors  # per expert
    return path, cls


def test_ernie_vl_split_experts_are_not_refused(tmp_path, capsys):
    """ERNIE-4.5-VL-MoE's converter sends experts 0-3 to ``text_moe`` and 4-7 to ``vision_moe``: all were
    summed into the first target (refused: "12288 values but ... expects 8192") and the second was
    missing. transformers loads the checkpoint whole, so shardconv plans it."""
    src, cls = write_ernie_vl(tmp_path / "src")
    _, info = cls.from_pretrained(str(src), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    text = dry_run(src, capsys)
    assert "linears     from the transformers model (Ernie4_5_VLMoeForConditionalGeneration" in text, text


@pytest.mark.parametrize("expert", ["model.layers.1.mlp.experts.2.down_proj.weight",  # a text expert
                                    "model.layers.1.mlp.experts.5.up_proj.weight"])  # a vision expert
def test_ernie_vl_missing_expert_is_refused(expert, tmp_path):
    """One expert gone: transformers fails its conversion; the sizes no longer add up to the two stacks'."""
    src, _ = write_ernie_vl(tmp_path / "src")
    drop_tensor(src, expert)
    check_fails(src, tmp_path / "out", ".safetensors: tensor 'model.layers.1.mlp.experts.", "experts merged into",
                "text_moe.experts.", "and 'model.language_model.layers.1.mlp.vision_moe.experts.",
                "one expert more or fewer")


def test_a_split_converters_other_targets_are_not_missing(tmp_path, capsys):
    """Sarvam-MoE's ``query_key_value`` is split into q, k and v at load: k and v were "in no shard"."""
    transformers = pytest.importorskip("transformers")
    try:
        config = transformers.AutoConfig.for_model(
            "sarvam_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256, num_experts=4,
            num_experts_per_tok=2)
    except (ValueError, KeyError):
        pytest.skip("this transformers has no Sarvam-MoE")
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "src"))
    assert "model.layers.0.attention.query_key_value.weight" in open_source(str(tmp_path / "src")).tensors
    _, info = type(model).from_pretrained(str(tmp_path / "src"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert "linears     from the transformers model (" in dry_run(tmp_path / "src", capsys)
