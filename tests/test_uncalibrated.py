"""Issue 12.4: experts the calibration routed no tokens to (no, or a zero, amax in the file) get amax made
up as ModelOpt's export does (weight amax from their weights, input amax the max over the calibrated
experts of the same layer and projection), listed in the summary and DST/shardconv-report.json;
--strict-amax refuses. Expected values are computed here from the weights and the file, not by
shardconv.uncalibrated."""

import json
import shutil

import pytest
import torch

from conftest import load_checkpoint, run_cli, same_bytes, tree_digest
from shardconv.api import verify
from shardconv.synth import write_checkpoint
from test_amax import expected, make_amax, weights

MISSING = "model.layers.0.mlp.experts.2"  # no entry at all: gate, up and down
ZERO_W = "model.layers.1.mlp.experts.3.up_proj"  # a zero weight amax (its input amax is calibrated)
ZERO_IN = "model.layers.1.mlp.experts.1.down_proj"  # a zero input amax (its weight amax is calibrated)
def run(*args) -> tuple[int, str, str]:
    """``shardconv`` in-process: (exit status, stdout, stderr)."""
    import contextlib
    import io

    from shardconv.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


SYNTH = sorted([f"{MISSING}.{p}" for p in ("down_proj", "gate_proj", "up_proj")] + [ZERO_W, ZERO_IN])


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("uncal") / "src", family="qwen3_moe", weights="structured",
                            num_layers=2, num_experts=4, hidden_size=128, moe_intermediate_size=64,
                            vocab_size=256, shard_size=200_000)


def uncalibrated_amax(w, static):
    amax = make_amax(w, static=static, kv=False)
    for k in [k for k in amax if k.startswith(MISSING + ".")]:
        del amax[k]
    if static:
        amax[f"{ZERO_W}.weight_quantizer._amax"] = torch.zeros_like(amax[f"{ZERO_W}.weight_quantizer._amax"])
        amax[f"{ZERO_W}.weight_quantizer._global_amax"] = torch.tensor(0.0)
    else:
        amax[f"{ZERO_W}.weight_quantizer._amax"] = torch.tensor(0.0)
    amax[f"{ZERO_IN}.input_quantizer._amax"] = torch.tensor(0.0)
    return amax


def filled_in(w, amax, static):
    """The amax file as the rule completes it, computed here: max calibration from the weights for the
    weight amax, the max over the other calibrated experts of the layer's same projection for inputs."""
    full = dict(amax)
    for m in SYNTH:
        layer, proj = m.rsplit(".experts.", 1)[0], m.rsplit(".", 1)[1]
        t = w[m + ".weight"].float()
        if f"{m}.weight_quantizer._global_amax" not in amax or m == ZERO_W:
            if static:
                blocks = t.abs().reshape(t.shape[0], -1, 16).amax(dim=-1)
                full[f"{m}.weight_quantizer._amax"] = blocks.reshape(-1, 1)
                full[f"{m}.weight_quantizer._global_amax"] = blocks.max()
            else:
                full[f"{m}.weight_quantizer._amax"] = t.abs().max()
        if m != ZERO_W:
            siblings = [v for k, v in amax.items() if k.startswith(f"{layer}.experts.")
                        and k.endswith(f".{proj}.input_quantizer._amax") and float(v) > 0]
            full[f"{m}.input_quantizer._amax"] = torch.stack(siblings).max()
    return full


@pytest.mark.parametrize("static", [True, False])
def test_uncalibrated_experts_are_synthesized_and_reported(moe, tmp_path, static):
    w = weights(moe)
    amax = uncalibrated_amax(w, static)
    torch.save(amax, tmp_path / "amax.pt")
    dst = tmp_path / "out"
    rc, said, err = run("convert", moe, dst, "--amax", tmp_path / "amax.pt", "--device", "cpu", "--no-progress")
    assert rc == 0, err
    out = load_checkpoint(dst)
    mods = sorted(n[: -len(".weight_scale_2")] for n in out if n.endswith(".weight_scale_2"))
    assert set(SYNTH) <= set(mods)
    for m, (packed, s, s2, ins) in expected(w, filled_in(w, amax, static), mods).items():
        assert same_bytes(out[m + ".weight"], packed), m
        assert same_bytes(out[m + ".weight_scale"], s), m
        assert same_bytes(out[m + ".weight_scale_2"], s2.reshape(())), m
        assert same_bytes(out[m + ".input_scale"], ins.reshape(())), m
    report = json.loads((dst / "shardconv-report.json").read_text())
    assert [e["module"] for e in report["synthesized_amax"]] == SYNTH
    by = {e["module"]: e for e in report["synthesized_amax"]}
    assert "input_amax" not in by[ZERO_W] and "weight_amax" not in by[ZERO_IN]
    assert by[f"{MISSING}.up_proj"]["input_amax"] == pytest.approx(
        float(filled_in(w, amax, static)[f"{MISSING}.up_proj.input_quantizer._amax"]))
    assert f"synthesized amax for {len(SYNTH)} expert modules (see {dst / 'shardconv-report.json'})" in said
    # verify passes it, also recomputing every module (the synthesized ones too) from the source
    assert verify(dst).ok
    full = verify(dst, moe, amax=tmp_path / "amax.pt")
    assert full.ok, full.problems


def test_strict_amax_refuses_naming_the_first_module(moe, tmp_path):
    torch.save(uncalibrated_amax(weights(moe), True), tmp_path / "amax.pt")
    before = tree_digest(moe)
    dst = tmp_path / "out"
    rc, err = run_cli("convert", moe, dst, "--amax", tmp_path / "amax.pt", "--strict-amax", "--no-progress")
    assert rc == 2 and err.startswith("shardconv: error: ") and err.count("\n") == 1, err
    assert f"module {SYNTH[0]}:" in err and "--strict-amax" in err and f"{len(SYNTH)} expert modules" in err
    assert tree_digest(moe) == before and not dst.exists()


def test_json_summary_and_dry_run_list_synthesized_modules(moe, tmp_path):
    torch.save(uncalibrated_amax(weights(moe), True), tmp_path / "amax.pt")
    rc, out, err = run("convert", moe, tmp_path / "out", "--amax", tmp_path / "amax.pt", "--json", "-q")
    assert rc == 0, err
    assert json.loads(out)["synthesized_amax"] == SYNTH
    rc, out, err = run("convert", moe, tmp_path / "dry", "--amax", tmp_path / "amax.pt", "--json", "--dry-run")
    assert rc == 0, err
    assert [e["module"] for e in json.loads(out)["synthesized_amax"]] == SYNTH


def test_fully_calibrated_file_writes_no_report(moe, tmp_path):
    torch.save(make_amax(weights(moe), kv=False), tmp_path / "amax.pt")
    rc, out, err = run("convert", moe, tmp_path / "out", "--amax", tmp_path / "amax.pt", "--no-progress")
    assert rc == 0, err
    assert not (tmp_path / "out" / "shardconv-report.json").exists() and "synthesized" not in out + err


def test_a_dense_module_without_amax_is_still_refused(moe, tmp_path):
    amax = make_amax(weights(moe), kv=False)
    for k in [k for k in amax if k.startswith("model.layers.1.self_attn.o_proj.")]:
        del amax[k]
    torch.save(amax, tmp_path / "amax.pt")
    rc, err = run_cli("convert", moe, tmp_path / "out", "--amax", tmp_path / "amax.pt", "--no-progress")
    assert rc == 2 and "model.layers.1.self_attn.o_proj" in err, err


def test_a_layer_with_no_calibrated_expert_is_refused(moe, tmp_path):
    """Nothing to take an input amax from: not an uncalibrated expert but an uncalibrated layer."""
    amax = make_amax(weights(moe), kv=False)
    for k in [k for k in amax if k.startswith("model.layers.0.mlp.experts.") and k.endswith("input_quantizer._amax")]:
        del amax[k]
    torch.save(amax, tmp_path / "amax.pt")
    rc, err = run_cli("convert", moe, tmp_path / "out", "--amax", tmp_path / "amax.pt", "--no-progress")
    assert rc == 2 and "model.layers.0.mlp.experts." in err and "input_quantizer._amax" in err, err


def test_verify_fails_a_report_naming_a_module_that_is_not_quantized(moe, tmp_path):
    torch.save(uncalibrated_amax(weights(moe), True), tmp_path / "amax.pt")
    dst = tmp_path / "out"
    rc, err = run_cli("convert", moe, dst, "--amax", tmp_path / "amax.pt", "--no-progress")
    assert rc == 0, err
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    doc = json.loads((bad / "shardconv-report.json").read_text())
    doc["synthesized_amax"].append({"module": "model.layers.0.mlp.gate", "reason": "no entry"})
    (bad / "shardconv-report.json").write_text(json.dumps(doc))
    r = verify(bad)
    assert not r.ok and any("model.layers.0.mlp.gate" in p and "shardconv-report.json" in p for p in r.problems)


def test_verify_recompute_fails_a_damaged_synthesized_scale(moe, tmp_path):
    """A synthesized expert's input_scale changed to another positive value passes every other check."""
    from safetensors.torch import load_file, save_file

    torch.save(uncalibrated_amax(weights(moe), True), tmp_path / "amax.pt")
    dst = tmp_path / "out"
    rc, err = run_cli("convert", moe, dst, "--amax", tmp_path / "amax.pt", "--no-progress")
    assert rc == 0, err
    (dst / ".shardconv-journal.json").unlink()  # no shard digests: the recomputation must find it
    name = f"{ZERO_IN}.input_scale"
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = dst / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = tensors[name] * 2
    save_file(tensors, str(shard), metadata={"format": "pt"})
    r = verify(dst, moe, amax=tmp_path / "amax.pt")
    assert not r.ok and any(ZERO_IN in p and "input_scale" in p for p in r.problems), r.problems


def test_synthesized_members_are_never_batched():
    """batch.quantize_batch reads saved amax; a member whose amax is made from its weights goes alone."""
    from shardconv.amax import ModuleAmax
    from shardconv.batch import structure
    from shardconv.planning import Member
    from shardconv.safetensors_io import TensorInfo

    info = TensorInfo(name="x.weight", dtype="BF16", shape=(32, 32), path=None, offset=0, nbytes=2048)
    m = Member("x", info, amax=ModuleAmax(from_weights="static", input=torch.tensor(1.0)))
    assert structure([m]) is None
    m.amax = ModuleAmax(weight=torch.tensor(1.0), input=torch.tensor(1.0))
    assert structure([m]) is not None


def test_report_survives_a_rerun_and_goes_with_overwrite(moe, tmp_path):
    """The report is written with the configs: a finished run found again keeps it, and --overwrite
    with a fully calibrated file leaves none behind."""
    torch.save(uncalibrated_amax(weights(moe), True), tmp_path / "amax.pt")
    dst = tmp_path / "out"
    rc, _, err = run("convert", moe, dst, "--amax", tmp_path / "amax.pt", "--no-progress")
    assert rc == 0, err
    first = (dst / "shardconv-report.json").read_bytes()
    rc, said, err = run("convert", moe, dst, "--amax", tmp_path / "amax.pt", "--no-progress")
    assert rc == 0 and "already complete" in said, said + err
    assert (dst / "shardconv-report.json").read_bytes() == first and verify(dst).ok
    torch.save(make_amax(weights(moe), kv=False), tmp_path / "full.pt")
    rc, _, err = run("convert", moe, dst, "--amax", tmp_path / "full.pt", "--overwrite", "--no-progress")
    assert rc == 0, err
    assert not (dst / "shardconv-report.json").exists()


def test_compressed_tensors_output_synthesizes_the_same_way(moe, tmp_path):
    torch.save(uncalibrated_amax(weights(moe), True), tmp_path / "amax.pt")
    dst = tmp_path / "out"
    rc, _, err = run("convert", moe, dst, "--amax", tmp_path / "amax.pt", "--format", "compressed-tensors",
                     "--no-progress")
    assert rc == 0, err
    assert [e["module"] for e in json.loads((dst / "shardconv-report.json").read_text())["synthesized_amax"]] == SYNTH
    r = verify(dst, moe, amax=tmp_path / "amax.pt")
    assert r.ok, r.problems
