"""Byte parity with NVIDIA ModelOpt 0.47's export_hf_checkpoint (golden files from tools/make_golden.py)."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import load_checkpoint, run_cli, same_bytes

GOLDEN = Path(__file__).parent / "golden"
FAMILIES = ["llama", "qwen3", "qwen3_moe"]
CASES = ["max_w4a16", "max_w4a4", "static", "static_kv"]


def without_producer(d: dict) -> dict:
    d = json.loads(json.dumps(d))
    d.pop("producer", None)
    if isinstance(d.get("quantization_config"), dict):
        d["quantization_config"].pop("producer", None)
    return d


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_modelopt_export(family, case, tmp_path):
    gold = GOLDEN / family / case
    args = ["convert", GOLDEN / family / "source", tmp_path / "out", "--device", "cpu", "--no-progress"]
    if case != "max_w4a16":  # max W4A16 needs no calibration data: computed from the weights alone
        args += ["--amax", gold / "amax.pt"]
    else:  # (the default without an amax file is mse)
        args += ["--scales", "max"]
    rc, err = run_cli(*args)
    assert rc == 0, err
    want = load_file(str(gold / "model.safetensors"))
    got = load_checkpoint(tmp_path / "out")
    assert sorted(got) == sorted(want)
    differ = [name for name in want if not same_bytes(got[name], want[name])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:5]}"
    for name in ("config.json", "hf_quant_config.json"):
        mine = json.loads((tmp_path / "out" / name).read_text())
        theirs = json.loads((gold / name).read_text())
        assert without_producer(mine) == without_producer(theirs), name


@pytest.mark.parametrize("family", FAMILIES)
def test_scales_max_with_w4a4_amax_matches_too(family, tmp_path):
    """Recomputing weight scales from the weights gives ModelOpt's max-calibrated bytes."""
    gold = GOLDEN / family / "max_w4a4"
    rc, err = run_cli("convert", GOLDEN / family / "source", tmp_path / "out", "--amax", gold / "amax.pt",
                      "--scales", "max", "--no-progress")
    assert rc == 0, err
    want, got = load_file(str(gold / "model.safetensors")), load_checkpoint(tmp_path / "out")
    assert all(same_bytes(got[n], want[n]) for n in want)
