"""Hostile inputs, class 7: no traceback, ever, and every message true.

An unexpected exception becomes one line naming the file and tensor being worked on, exit status 2
(``SHARDCONV_DEBUG=1`` adds the traceback); an OS error without a file name names the tensor too; a
closed or broken stdout does not turn a finished conversion into a failure.
"""

import errno
import os
import re
import subprocess
import sys

import pytest

from conftest import run_cli
from shardconv.synth import write_checkpoint


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cli") / "src", family="llama", num_layers=2, shard_size=100_000)


def one_line(rc, err):
    assert rc == 2, err
    assert err.startswith("shardconv: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_a_bug_while_quantizing_is_one_line_naming_the_tensor(src, tmp_path, monkeypatch):
    from shardconv import numerics

    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug\nwith a second line")
    monkeypatch.setattr(numerics, "quantize", boom)
    rc, err = run_cli("convert", src, tmp_path / "out", "--device", "cpu", "--scales", "max", "--no-progress")
    one_line(rc, err)
    assert re.search(r"\.safetensors: tensor 'model\.layers\.0\.\w+\.\w+_proj\.weight'", err), err
    assert "RuntimeError: simulated bug with a second line" in err
    assert "SHARDCONV_DEBUG=1" in err and str(src) in err
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_a_bug_while_copying_a_kept_tensor_names_it(src, tmp_path, monkeypatch):
    from shardconv import shard_writer

    def boom(info, data, start):
        if info.name == "model.norm.weight":
            raise ValueError("simulated")
    monkeypatch.setattr(shard_writer, "check_finite_bytes", boom)  # the writer's copy of a kept tensor
    rc, err = run_cli("convert", src, tmp_path / "out", "--device", "cpu", "--scales", "max", "--no-progress")
    one_line(rc, err)
    assert "'model.norm.weight'" in err and "ValueError: simulated" in err


def test_an_io_error_without_a_file_name_names_the_tensor(src, tmp_path, monkeypatch):
    """pread's EIO carries no file name: the message must still say which file and tensor."""
    from shardconv import safetensors_io

    real = safetensors_io.read_range

    def failing(info, out, start=0, stop=None, base=0):
        if info.name.endswith("mlp.up_proj.weight"):
            raise OSError(errno.EIO, "Input/output error")
        return real(info, out, start, stop, base)
    monkeypatch.setattr("shardconv.pipeline.read_range", failing)
    rc, err = run_cli("convert", src, tmp_path / "out", "--device", "cpu", "--scales", "max", "--no-progress")
    one_line(rc, err)
    assert "mlp.up_proj.weight" in err and "Input/output error" in err and str(src) in err


def test_debug_prints_the_traceback(src, tmp_path, monkeypatch):
    from shardconv import numerics

    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug")
    monkeypatch.setattr(numerics, "quantize", boom)
    monkeypatch.setenv("SHARDCONV_DEBUG", "1")
    rc, err = run_cli("convert", src, tmp_path / "out", "--device", "cpu", "--scales", "max", "--no-progress")
    assert rc == 2 and "Traceback" in err and "in boom" in err
    assert err.strip().splitlines()[-1].startswith("shardconv: error: ")


def test_a_bug_outside_the_pipeline_is_one_line(src, tmp_path, monkeypatch):
    import shardconv.planning

    def boom(*args, **kwargs):
        raise KeyError("simulated")
    monkeypatch.setattr(shardconv.planning, "build_plan", boom)
    rc, err = run_cli("convert", src, tmp_path / "out", "--device", "cpu", "--no-progress")
    one_line(rc, err)
    assert "KeyError" in err and "SHARDCONV_DEBUG=1" in err


def test_amax_fifo_is_not_opened(src, tmp_path):
    """A FIFO would block forever if opened; it is refused by what it is."""
    fifo = tmp_path / "amax.pt"
    os.mkfifo(fifo)
    rc, err = run_cli("convert", src, tmp_path / "out", "--amax", fifo, "--no-progress")
    one_line(rc, err)
    assert "amax.pt" in err and "not a regular file" in err and "not found" not in err


def _cli(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "shardconv", *map(str, args)], env=env, timeout=600, **kwargs)


def test_broken_stdout_pipe_does_not_fail_a_finished_conversion(src, tmp_path):
    r, w = os.pipe()
    os.close(r)  # every write to stdout now fails with EPIPE
    try:
        proc = _cli("convert", src, tmp_path / "out", "--device", "cpu", "--scales", "max", "--no-progress",
                    stdout=w, stderr=subprocess.PIPE)
    finally:
        os.close(w)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr and b"BrokenPipe" not in proc.stderr
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_closed_stdout_does_not_fail_a_finished_conversion(src, tmp_path):
    proc = _cli("convert", src, tmp_path / "out", "--device", "cpu", "--scales", "max", "--no-progress",
                stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1))
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    proc = _cli("verify", tmp_path / "out", stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1))
    assert proc.returncode == 0, proc.stderr.decode()
