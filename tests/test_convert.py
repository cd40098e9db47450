"""End-to-end conversions of generated multi-shard checkpoints, checked tensor by tensor."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import load_checkpoint, run_cli, same_bytes, tree_digest
from shardconv import numerics as nx
from shardconv import quantize as qmod
from shardconv.module_rules import FUSION_SETS, fusion_key
from shardconv.synth import write_checkpoint


def source_tensors(src):
    out = {}
    for p in sorted(src.glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


def expected_max(src_tensors, quantized_modules):
    """Independent reference for --scales max: whole tensors, groups formed here by name."""
    groups = {}
    for m in quantized_modules:
        groups.setdefault(fusion_key(m) or m, []).append(m)
    want = {}
    for members in groups.values():
        g = torch.stack([src_tensors[m + ".weight"].abs().max().float() for m in members]).max()
        s2 = nx.global_scale(g)
        for m in members:
            w = src_tensors[m + ".weight"]
            s = nx.block_scales_dynamic(w, s2)
            want[m] = (nx.quantize(w, s, s2), s, s2)
    return want


def quantized_modules(out):
    return sorted(n[: -len(".weight_scale_2")] for n in out if n.endswith(".weight_scale_2"))


def split_groups(src):
    """Fusion groups whose members sit in different input shards."""
    wm = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    by_key = {}
    for name, shard in wm.items():
        if name.endswith(".weight"):
            key = fusion_key(name[:-7])
            if key:
                by_key.setdefault(key, set()).add(shard)
    return [k for k, shards in by_key.items() if len(shards) > 1]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    src = tmp_path_factory.mktemp("llama") / "src"
    write_checkpoint(src, family="llama", weights="structured", num_layers=3, shard_size=150_000)
    return src


def test_llama_max_matches_reference_and_copies_the_rest(llama, tmp_path):
    before = tree_digest(llama)
    dst = tmp_path / "out"
    rc, err = run_cli("convert", llama, dst, "--device", "cpu", "--max-shard-size", "200KB", "--scales", "max",
                      "--no-progress")
    assert rc == 0, err
    assert tree_digest(llama) == before  # SRC is only read
    assert split_groups(llama), "the fixture must split a fusion group across input shards"
    src = source_tensors(llama)
    out = load_checkpoint(dst)
    mods = quantized_modules(out)
    assert any(m.endswith("q_proj") for m in mods) and any(m.endswith("down_proj") for m in mods)
    want = expected_max(src, mods)
    for m, (packed, scale, s2) in want.items():
        assert same_bytes(out[m + ".weight"], packed), m
        assert same_bytes(out[m + ".weight_scale"], scale), m
        assert same_bytes(out[m + ".weight_scale_2"], s2.reshape(())), m
        assert m + ".input_scale" not in out
    # fusion groups share one weight_scale_2, bit for bit
    for parent in {m.rsplit(".", 1)[0] for m in mods}:
        for members in FUSION_SETS:
            vals = [out[f"{parent}.{leaf}.weight_scale_2"] for leaf in members if f"{parent}.{leaf}.weight_scale_2" in out]
            assert all(same_bytes(v, vals[0]) for v in vals)
    # everything not quantized is byte-identical
    for name, t in src.items():
        if name[: -len(".weight")] not in want:
            assert same_bytes(out[name], t), name
    assert len(json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]) == len(out)
    assert len(list(dst.glob("model-*.safetensors"))) > 1
    assert not list(dst.glob("*.partial"))
    hq = json.loads((dst / "hf_quant_config.json").read_text())
    assert hq["quantization"]["quant_algo"] == "W4A16_NVFP4"
    assert "lm_head" in hq["quantization"]["exclude_modules"]
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "modelopt"
    assert "input_activations" not in cfg["quantization_config"]["config_groups"]["group_0"]
    for f in llama.iterdir():
        if f.suffix == ".json" and f.name not in ("config.json", "model.safetensors.index.json"):
            assert (dst / f.name).read_bytes() == f.read_bytes()


@pytest.mark.heavy
def test_small_chunks_give_the_same_bytes(llama, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("convert", llama, a, "--device", "cpu", "--no-progress")[0] == 0
    monkeypatch.setattr(qmod, "CHUNK_ELEMENTS", 100)
    assert run_cli("convert", llama, b, "--device", "cpu", "--no-progress")[0] == 0
    ta, tb = load_checkpoint(a), load_checkpoint(b)
    assert ta.keys() == tb.keys() and all(same_bytes(ta[k], tb[k]) for k in ta)


def test_reads_and_copies_in_small_pieces_give_the_same_files(llama, tmp_path, monkeypatch):
    """Weights read and kept tensors copied in many pieces, on several threads, in any interleaving."""
    from conftest import tree_digest
    from shardconv import digest, pipeline, shard_writer

    a, b = tmp_path / "a", tmp_path / "b"
    args = ("--device", "cpu", "--scales", "max", "--no-progress", "--readers", "3")
    assert run_cli("convert", llama, a, *args)[0] == 0
    monkeypatch.setattr(pipeline, "READ_PIECE", 4096)
    monkeypatch.setattr(pipeline, "COPY_SPLIT", 3000)  # not a multiple of anything: ragged pieces
    monkeypatch.setattr(pipeline, "COPY_PIECE", 1000)  # each piece in several reads
    monkeypatch.setattr(shard_writer.ShardWriter, "piece", 5000)  # digest pieces across tensors
    assert run_cli("convert", llama, b, *args)[0] == 0
    journal = lambda d: {k: v for k, v in json.loads((d / ".shardconv-journal.json").read_text()).items()
                         if k != "shards"}  # noqa: E731 (digests differ with the piece size)
    assert journal(a) == journal(b)
    files = lambda d: {k: v for k, v in tree_digest(d).items() if k != ".shardconv-journal.json"}  # noqa: E731
    assert files(a) == files(b)
    for name, recorded in json.loads((b / ".shardconv-journal.json").read_text())["shards"].items():
        assert digest.shard_digest(b / name, piece=5000) == recorded


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_families_with_unaligned_layer_and_tied_embeddings(family, tmp_path):
    src = tmp_path / "src"
    kwargs = dict(num_layers=2, tie_word_embeddings=True)
    if family == "qwen3":
        kwargs["intermediate_size"] = 200  # down_proj in_features % 16 != 0
    else:
        kwargs["moe_intermediate_size"] = 40
    write_checkpoint(src, family=family, weights="structured", shard_size=100_000, **kwargs)
    dst = tmp_path / "out"
    rc, err = run_cli("convert", src, dst, "--device", "cpu", "--scales", "max", "--no-progress")
    assert rc == 0, err
    srct, out = source_tensors(src), load_checkpoint(dst)
    mods = quantized_modules(out)
    want = expected_max(srct, mods)
    for m, (packed, scale, s2) in want.items():
        assert same_bytes(out[m + ".weight"], packed) and same_bytes(out[m + ".weight_scale"], scale), m
    excluded = json.loads((dst / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    down = [n[:-7] for n in srct if n.endswith("down_proj.weight")]
    assert down and all(d in excluded and same_bytes(out[d + ".weight"], srct[d + ".weight"]) for d in down)
    assert "lm_head.weight" not in out and same_bytes(out["model.embed_tokens.weight"], srct["model.embed_tokens.weight"])
    if family == "qwen3_moe":
        routers = [n[:-7] for n in srct if n.endswith("mlp.gate.weight")]
        assert routers and all(r in excluded and out[r + ".weight"].dtype == torch.bfloat16 for r in routers)
        experts = [m for m in mods if ".experts." in m]
        assert experts
        for m in experts:
            if m.endswith("gate_proj"):
                up = m[: -len("gate_proj")] + "up_proj"
                assert same_bytes(out[m + ".weight_scale_2"], out[up + ".weight_scale_2"])
    for n in srct:
        if n.endswith(("q_norm.weight", "k_norm.weight")):
            assert same_bytes(out[n], srct[n])


def test_dry_run_writes_nothing(llama, tmp_path, capsys):
    from shardconv.cli import main

    dst = tmp_path / "out"
    assert main(["convert", str(llama), str(dst), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not dst.exists()
    assert "fusion groups" in text and "self_attn.{q_proj,k_proj,v_proj}" in text
    assert "lm_head" in text and "W4A16_NVFP4" in text


def test_cli_defaults_are_the_pipeline_defaults():
    from shardconv import readahead
    from shardconv.cli_args import build_parser, parse_size
    from shardconv.pipeline import Options

    args, opts = build_parser().parse_args(["convert", "SRC"]), Options()
    assert (args.readers, args.writers, args.host_buffer, args.gpu_buffer, args.prefetch, args.fsync) == (
        opts.readers, opts.writers, opts.host_buffer, opts.gpu_buffer, opts.prefetch, opts.fsync)
    assert readahead.MAX_AUTO == parse_size("32GiB")  # the --readahead help says "at most 32GiB"


def test_io_threads_follow_the_cores():
    """Readers and writers default to half and a quarter of the cores, within 4-8 and 2-4 (the H200
    machine's sweep, README Performance); the pipeline uses them unless given."""
    from shardconv.threads import io_threads

    assert [io_threads(n) for n in (1, 2, 8, 10, 16, 64)] == [(4, 2), (4, 2), (4, 2), (5, 2), (8, 4), (8, 4)]
    assert io_threads() == io_threads(len(os.sched_getaffinity(0)))


def test_default_scales_are_mse(llama, tmp_path, capsys):
    """No --scales and no --amax: the FP8 scale sweep (README, Scale methods), not max."""
    from shardconv.cli import main

    assert main(["convert", str(llama), str(tmp_path / "d"), "--dry-run"]) == 0
    assert "scales      mse " in capsys.readouterr().out
    for name, extra in (("default", ()), ("mse", ("--scales", "mse")), ("max", ("--scales", "max"))):
        rc, err = run_cli("convert", llama, tmp_path / name, "--device", "cpu", "--no-progress", *extra)
        assert rc == 0, err
    assert tree_digest(tmp_path / "default") == tree_digest(tmp_path / "mse")
    assert tree_digest(tmp_path / "default") != tree_digest(tmp_path / "max")


def test_exclude_pattern_takes_whole_group(llama, tmp_path):
    dst = tmp_path / "out"
    rc, err = run_cli("convert", llama, dst, "--exclude", "model.layers.0.self_attn.k_proj", "--exclude", "*.o_proj",
                      "--no-progress")
    assert rc == 0, err
    out = load_checkpoint(dst)
    for leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert out[f"model.layers.0.self_attn.{leaf}.weight"].dtype == torch.bfloat16
    assert out["model.layers.1.self_attn.q_proj.weight"].dtype == torch.uint8
    assert out["model.layers.1.self_attn.o_proj.weight"].dtype == torch.bfloat16
    excluded = json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.0.self_attn.q_proj" in excluded and "model.layers.1.self_attn.o_proj" in excluded


def test_overwrite_and_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli("convert", "--no-progress")[0] == 0
    out = load_checkpoint(tmp_path / "shardconv-sample-NVFP4")
    assert any(t.dtype == torch.uint8 for t in out.values())
    assert run_cli("convert", "--no-progress")[0] == 0  # the sample output is replaced


def test_kept_tensor_copies_open_a_bounded_number_of_output_shards(tmp_path, monkeypatch):
    """Kept tensors are queued for the copier threads up to two output shards ahead of the readers, not all
    at the start: with every copy queued at once, each output shard holding a norm was created at the
    start (98 of a 96-layer model's 195 open at once, found by review; 26 here); the window keeps it near
    what the readers' own look-ahead opens. The output is complete and verifies."""
    from shardconv import output_shards, pipeline

    src = write_checkpoint(tmp_path / "src", family="llama", num_layers=24, shard_size=60_000)
    monkeypatch.setattr(pipeline, "LOOKAHEAD_UNITS", 6)
    open_now, most = set(), [0]
    real_writer, real_done = output_shards.Shards._writer, output_shards.Shards._done

    def writer(self, shard):
        open_now.add(shard)
        most[0] = max(most[0], len(open_now))
        return real_writer(self, shard)

    def done(self, shard, n):
        real_done(self, shard, n)
        if self.remaining[shard] == 0:
            open_now.discard(shard)
    monkeypatch.setattr(output_shards.Shards, "_writer", writer)
    monkeypatch.setattr(output_shards.Shards, "_done", done)
    dst = tmp_path / "dst"
    rc, err = run_cli("convert", src, dst, "--device", "cpu", "--no-progress", "--max-shard-size", "40KB")
    assert rc == 0, err
    shards = len(list(dst.glob("*.safetensors")))
    assert shards > 40 and most[0] <= 12, (shards, most[0])
    assert run_cli("verify", dst)[0] == 0
