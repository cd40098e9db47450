"""Read-ahead hints: the pipeline asks the kernel for the next units' bytes, in input order, never
more than --prefetch ahead, and the output does not depend on them."""

import os

import pytest

from conftest import run_cli, tree_digest
from shardconv import pipeline, safetensors_io
from shardconv.formats import get_format
from shardconv.plan import build_plan
from shardconv.source import open_source
from shardconv.synth import write_checkpoint


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefetch") / "src"
    write_checkpoint(path, family="llama", num_layers=3, shard_size=150_000)
    return path


def test_hints_cover_the_window_in_input_order(src, monkeypatch):
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this OS")
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: (calls.append((off, n, advice)), real(fd, off, n, advice)))
    plan = build_plan(open_source(src), get_format("modelopt"), scales="max")
    units = plan.units
    window = 3 * max(u.in_bytes for u in units)
    p = pipeline.Prefetcher(units, window)
    p.ahead_of(0)
    p.pool.shutdown(wait=True)
    ranges = [(t.offset, t.nbytes) for u in units[: p.hinted] for t in pipeline.unit_inputs(u)]
    assert [(o, n) for o, n, a in calls if a == os.POSIX_FADV_WILLNEED] == [r for r in ranges if r[1] > 0]
    hinted = sum(u.in_bytes for u in units[: p.hinted])
    assert window <= hinted < window + max(u.in_bytes for u in units)  # just enough, never a unit more
    p.close()


def test_later_calls_only_add_units_past_the_window(src):
    plan = build_plan(open_source(src), get_format("modelopt"), scales="max")
    units = plan.units
    p = pipeline.Prefetcher(units, 1)
    p.ahead_of(0)
    assert p.hinted == 1
    p.ahead_of(0)
    assert p.hinted == 1  # already a unit ahead: nothing new
    p.ahead_of(len(units) - 1)
    assert p.hinted == len(units)
    p.close()
    off = pipeline.Prefetcher(units, 0)
    off.ahead_of(0)
    assert off.hinted == 0 and off.pool is None


def test_output_is_the_same_with_and_without_hints(src, tmp_path):
    for name, extra in (("on", ("--prefetch", "2GiB")), ("off", ()), ("tiny", ("--prefetch", "1KB"))):
        rc, err = run_cli("convert", src, tmp_path / name, "--device", "cpu", "--scales", "max", "--no-progress", *extra)
        assert rc == 0, err
    assert tree_digest(tmp_path / "on") == tree_digest(tmp_path / "off") == tree_digest(tmp_path / "tiny")


def test_read_into_asks_for_sequential_read_ahead(src, monkeypatch):
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this OS")
    seen = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: seen.append(advice))
    info = next(iter(open_source(src).tensors.values()))
    safetensors_io.read_into(info)
    assert seen == [os.POSIX_FADV_SEQUENTIAL]
