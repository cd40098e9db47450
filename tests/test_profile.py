"""SHARDCONV_PROFILE: the stage clock, the Python profile of the pipeline loop, and the profile lines a
conversion prints (README, Performance, reads them)."""

import contextlib
import io
import os
import time

from conftest import run_cli
from shardconv import api, profile
from shardconv.synth import write_checkpoint


def test_stage_clock_sums_each_stage():
    clock = profile.StageClock()
    t0 = time.perf_counter() - 2.0  # as if the stage had started 2 s ago
    clock.add("read", t0)
    clock.add("read", time.perf_counter() - 1.0)
    clock.add("write", time.perf_counter() - 0.5)
    assert 2.9 < clock.seconds["read"] < 3.5 and 0.4 < clock.seconds["write"] < 1.0
    assert clock.report().startswith("read 3.") and " write 0." in clock.report()


def test_python_profile_runs_the_call_and_prints_its_costliest_calls(monkeypatch):
    def pipeline_loop_under_test():
        return sum(range(1000))

    monkeypatch.setattr(profile, "PYTHON", False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert profile.python_profile(pipeline_loop_under_test) == 499500
    assert out.getvalue() == ""  # off: nothing printed, nothing profiled
    monkeypatch.setattr(profile, "PYTHON", True)
    with contextlib.redirect_stdout(out):
        assert profile.python_profile(pipeline_loop_under_test) == 499500
    assert "profile: pipeline loop (cProfile)" in out.getvalue()
    assert "pipeline_loop_under_test" in out.getvalue()


def test_a_profiled_conversion_prints_its_stage_sums_and_events(tmp_path, monkeypatch, capsys):
    src = write_checkpoint(tmp_path / "src", family="llama", num_layers=1)
    monkeypatch.setattr(profile, "ENABLED", True)
    monkeypatch.setattr(profile, "PYTHON", True)
    lines = []
    monkeypatch.setattr(profile, "say", lambda message: lines.append(message))
    api.convert(src, tmp_path / "dst", scales="max", device="cpu")
    text = "\n".join(lines)
    assert "ready to convert" in text and "events: first group read" in text and "all written" in text
    assert "read " in text and "write " in text and "peak RSS" in text  # the stage clock's line
    assert "profile: pipeline loop (cProfile)" in capsys.readouterr().out
    assert run_cli("verify", tmp_path / "dst")[0] == 0  # profiling changed nothing written


def test_the_sampler_finds_the_line_a_thread_waits_on():
    """MainThreadSampler, on a thread that waits 0.3 s on one line and then spins on another: both are
    found, the wait with about its time and the call it waits in."""
    import threading

    def waits_then_spins(done):
        time.sleep(0.3)  # the line the sampler should find first
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.1:
            pass
        done.set()

    done = threading.Event()
    worker = threading.Thread(target=waits_then_spins, args=(done,))
    worker.start()
    here = os.path.dirname(os.path.abspath(__file__))
    with profile.MainThreadSampler(worker.ident, interval=0.002, code_root=here) as sampler:
        done.wait(5)
    worker.join()
    report = sampler.report()
    assert sampler.samples > 20
    top_line, top_samples = sampler.lines.most_common(1)[0]
    assert top_line.startswith("test_profile.py:") and top_line.endswith("waits_then_spins"), report
    assert top_samples * sampler.seconds / sampler.samples > 0.15, report  # most of the 0.3 s
    assert "main thread," in report and "~" in report
    assert sampler.leaves.most_common(1)[0][0] == "test_profile.py waits_then_spins", report  # sleep is C
    assert "innermost calls (samples, ~s): test_profile.py waits_then_spins" in report


def test_a_sampled_conversion_prints_where_its_main_thread_was(tmp_path, monkeypatch, capsys):
    src = write_checkpoint(tmp_path / "src", family="llama", num_layers=2)
    monkeypatch.setattr(profile, "SAMPLE", True)
    made = []
    real = profile.MainThreadSampler
    monkeypatch.setattr(profile, "MainThreadSampler", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    api.convert(src, tmp_path / "dst", scales="mse", device="cpu")
    out = capsys.readouterr().out
    assert "profile: main thread, " in out and len(made) == 1
    lines = made[0].lines  # every line sampled, not only the 20 printed
    assert any(line.startswith("pipeline.py:") for line in lines), out  # the pipeline's own thread
    assert run_cli("verify", tmp_path / "dst")[0] == 0
