"""A user's first hour: the Python API, hub ids, and the command line's conventions."""

import json
import os
import subprocess
import sys

import pytest

import shardconv
from conftest import load_checkpoint, run_cli, same_bytes
from shardconv.synth import write_checkpoint


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("api") / "model", family="llama", weights="structured",
                            num_layers=3, shard_size=150_000)


# -- the Python API ------------------------------------------------------------------------------


def test_import_needs_no_torch_until_a_call():
    code = "import sys, shardconv; assert 'torch' not in sys.modules; print(shardconv.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert out.returncode == 0 and out.stdout.strip() == shardconv.__version__, out.stderr


def test_convert_returns_a_result_and_equals_the_cli(src, tmp_path):
    r = shardconv.convert(src, tmp_path / "api", scales="max", device="cpu")
    assert isinstance(r, shardconv.ConvertResult)
    assert r.dst == tmp_path / "api" and r.source == src.resolve() and r.revision is None
    assert r.quantized == 21 and r.shards == ["model.safetensors"] and not r.already_complete
    assert r.converted_bytes == r.in_bytes > r.out_bytes > 0 and r.seconds > 0
    assert json.loads(json.dumps(r.to_dict()))["quantized"] == 21
    assert run_cli("convert", src, tmp_path / "cli", "--scales", "max", "--device", "cpu")[0] == 0
    a, b = load_checkpoint(tmp_path / "api"), load_checkpoint(tmp_path / "cli")
    assert a.keys() == b.keys() and all(same_bytes(a[k], b[k]) for k in a)
    report = shardconv.verify(tmp_path / "api", source=src)
    assert report.ok, report.problems


def test_plan_and_describe_write_nothing(src, tmp_path):
    p = shardconv.plan(src, scales="max", exclude=["model.layers.1.*"])
    assert p.quant_algo == "W4A16_NVFP4" and len(p.quantized) == 14
    text = "\n".join(shardconv.describe(p))
    assert "model.layers.1.mlp.down_proj  (--exclude)" in text
    assert shardconv.default_dst(p).name == "model-NVFP4"
    assert not (tmp_path / "model-NVFP4").exists()


@pytest.mark.parametrize("call,error", [
    (lambda t: shardconv.convert(t / "nope", t / "out"), shardconv.SourceError),
    (lambda t: shardconv.plan(SRC[0], scales="best"), shardconv.OptionError),
    (lambda t: shardconv.plan(SRC[0], max_shard_size="lots"), shardconv.OptionError),
    (lambda t: shardconv.convert(SRC[0], t / "out", amax=t / "missing.pt"), shardconv.AmaxError),
    (lambda t: shardconv.convert(SRC[0], SRC[0] / "inside"), shardconv.DestinationError),
    (lambda t: shardconv.plan(SRC[0], exclude=["typo.*"], strict=True), shardconv.OptionError),
])
def test_failures_raise_typed_errors(src, tmp_path, call, error):
    SRC[:] = [src]
    with pytest.raises(error) as e:
        call(tmp_path)
    assert isinstance(e.value, shardconv.ShardconvError) and "\n" not in str(e.value)


SRC: list = []


def test_unmatched_exclude_is_a_warning_in_the_result(src, tmp_path):
    r = shardconv.convert(src, tmp_path / "out", scales="max", device="cpu", exclude=["model.layers.9.*"])
    assert r.warnings == [f"--exclude 'model.layers.9.*' matches no module of {src.resolve()}"]


# -- re-running a finished conversion --------------------------------------------------------------


def test_rerun_of_a_finished_conversion_says_already_complete(src, tmp_path):
    dst = tmp_path / "out"
    assert run_cli("convert", src, dst, "--scales", "max")[0] == 0
    shard = dst / "model.safetensors"
    before = (shard.stat().st_ino, shard.stat().st_mtime_ns)
    out = _cli("convert", src, dst, "--scales", "max")
    assert out.returncode == 0, out.stderr
    assert "already complete" in out.stdout and "interrupted" not in out.stdout and "GB/s" not in out.stdout
    assert (shard.stat().st_ino, shard.stat().st_mtime_ns) == before
    r = shardconv.convert(src, dst, scales="max")
    assert r.already_complete and r.resumed == len(r.shards)


# -- hub ids ---------------------------------------------------------------------------------------


def _hub_cache(tmp_path, src, commit="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face cache holding org/tiny-llama at ``commit`` (what snapshot_download finds offline)."""
    repo = tmp_path / "hub" / "models--org--tiny-llama"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return tmp_path / "hub", commit


def test_hub_id_names_dst_after_the_repo_and_reports_the_revision(src, tmp_path):
    cache, commit = _hub_cache(tmp_path, src)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}  # read by huggingface_hub at import: a subprocess
    out = _cli("convert", "org/tiny-llama", "--scales", "max", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "tiny-llama-NVFP4" / "model.safetensors").exists()  # not the snapshot's hash
    assert not (tmp_path / f"{commit}-NVFP4").exists()
    assert f"(revision {commit})" in out.stdout
    out = _cli("convert", "org/tiny-llama", tmp_path / "pinned", "--revision", commit, "--scales", "max", "--json",
               env=env)
    assert out.returncode == 0 and json.loads(out.stdout)["revision"] == commit, out.stderr
    out = _cli("convert", "org/tiny-llama", tmp_path / "other", "--revision", "f" * 40, env=env)
    assert out.returncode == 2 and "org/tiny-llama" in out.stderr and out.stderr.count("\n") == 1


def test_revision_of_a_local_folder_is_refused(src):
    with pytest.raises(shardconv.SourceError, match="--revision"):
        shardconv.plan(src, revision="main")


# -- command-line conventions ---------------------------------------------------------------------


def _env(extra=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    env.update(extra or {})
    return env


def _cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "shardconv", *map(str, args)], capture_output=True, text=True,
                          env=_env(env), cwd=cwd, timeout=600)


def test_json_is_the_only_thing_on_stdout(src, tmp_path):
    out = _cli("convert", src, tmp_path / "out", "--scales", "max", "--json", "--exclude", "typo")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)  # one object, nothing else
    assert d["dst"] == str(tmp_path / "out") and d["quantized"] == 21 and d["warnings"]
    assert "shardconv: warning: --exclude 'typo'" in out.stderr
    v = _cli("verify", tmp_path / "out", "--json")
    assert v.returncode == 0 and json.loads(v.stdout)["ok"] is True
    p = _cli("convert", src, "--dry-run", "--json")
    assert json.loads(p.stdout)["quant_algo"] == "W4A16_NVFP4"


def test_quiet_prints_nothing_and_progress_is_off_without_a_terminal(src, tmp_path):
    out = _cli("convert", src, tmp_path / "out", "--scales", "max", "-q")
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "", (out.stdout, out.stderr)
    out = _cli("convert", src, tmp_path / "out2", "--scales", "max")
    assert "converting" not in out.stderr and "it/s" not in out.stderr and "B/s" not in out.stderr


def test_verbose_prints_the_plan_first(src, tmp_path):
    out = _cli("convert", src, tmp_path / "out", "--scales", "max", "-v")
    assert out.returncode == 0
    assert out.stdout.index("fusion groups (one weight_scale_2 each)") < out.stdout.index("wrote ")


def test_version_on_every_command():
    for args in (["--version"], ["convert", "--version"], ["verify", "--version"]):
        out = _cli(*args)
        assert out.returncode == 0 and out.stdout.strip() == f"shardconv {shardconv.__version__}"


def test_help_has_examples_and_says_how_to_set_threads():
    out = _cli("convert", "--help")
    assert "examples:" in out.stdout and "shardconv convert Qwen/Qwen3-8B" in out.stdout
    assert "--threads" in out.stdout and "--readers" in out.stdout


def test_strict_makes_an_unmatched_exclude_an_error(src, tmp_path):
    rc, err = run_cli("convert", src, tmp_path / "out", "--exclude", "model.layer.0.*", "--strict")
    assert rc == 2 and "matches no module" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_dry_run_shows_the_real_layer_numbers_of_a_partial_exclusion(src, capsys):
    rc, _ = run_cli("convert", src, "--dry-run", "--exclude", "model.layers.0.mlp.down_proj",
                    "--exclude", "model.layers.2.mlp.down_proj")
    from shardconv.report import describe

    text = "\n".join(describe(shardconv.plan(src, exclude=["model.layers.0.mlp.down_proj",
                                                           "model.layers.2.mlp.down_proj"])))
    assert rc == 0 and "2 x model.layers.{0,2}.mlp.down_proj  (--exclude)" in text
    all_layers = "\n".join(describe(shardconv.plan(src, exclude=["*.down_proj"])))
    assert "3 x model.layers.*.mlp.down_proj  (--exclude)" in all_layers


def test_a_long_cpu_run_says_what_it_will_cost_first(src, tmp_path, monkeypatch):
    from shardconv import api

    monkeypatch.setattr(api, "LONG_CPU_RUN", 0.0)
    r = shardconv.convert(src, tmp_path / "out", device="cpu", threads=1)
    assert any("on the CPU, --scales mse should take about" in n and "--scales max about" in n for n in r.notes)
    p = shardconv.plan(src, scales="mse")
    assert shardconv.cpu_estimate(p, 1) > shardconv.cpu_estimate(p, 2) > 0


def test_convert_leaves_the_callers_torch_threads_as_they_were(src, tmp_path):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shardconv.convert(src, tmp_path / "out", scales="max", device="cpu", threads=2)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cpu_threads_follow_the_request_and_the_load(monkeypatch):
    from shardconv import quantize

    assert quantize.cpu_threads(3) == 3
    with pytest.raises(shardconv.OptionError):
        quantize.cpu_threads(0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 0, 0))
    assert quantize.cpu_threads() == 1  # three cores busy already: torch gets the fourth
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0, 0))
    assert quantize.cpu_threads() == 4


def test_the_readme_api_example_runs(tmp_path):
    """README.md's Python API example, as it is written there."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=_env(),
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert "no-such-folder: no such folder" in out.stdout and (tmp_path / "sample-NVFP4" / "config.json").exists()
