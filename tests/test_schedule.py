"""A batch of same-structure groups is one pipeline step (batch.schedule): read into one host buffer
per member position and uploaded in one copy each. Here the GPU stages run on the CPU, with streams,
events and pinning stubbed, and must write the bytes the CPU path writes."""

import contextlib

import pytest
import torch

from conftest import load_checkpoint, same_bytes
from shardconv import api, device_stages, host_buffers, pipeline
from shardconv.batch import MAX_BATCH, schedule, stacked_view, structure
from shardconv.formats import get_format
from shardconv.host_buffers import aligned
from shardconv.planning import build_plan
from shardconv.safetensors_io import read_into, read_range
from shardconv.source import open_source
from shardconv.synth import write_checkpoint
from test_buffer_pool import _Event, _Stream


@pytest.fixture
def gpu_stages_on_cpu(monkeypatch):
    """Converters run their GPU stages (device_stages.py) with the tensors on the CPU; returns the
    number of groups of each batch quantized (device_stages.quantize_stacked_weights)."""
    empty = torch.empty
    monkeypatch.setattr(pipeline.Converter, "device_stages_on_cpu", True)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None, raising=False)
    monkeypatch.setattr(host_buffers.BufferPool, "_allocate", lambda self, size, pin: empty(size, dtype=torch.uint8))
    sizes = []
    real = device_stages.quantize_stacked_weights

    def recording(groups, stacked, *a, **k):
        sizes.append(len(groups))
        assert all(w.shape[0] == len(groups) for w in stacked)
        return real(groups, stacked, *a, **k)

    monkeypatch.setattr(device_stages, "quantize_stacked_weights", recording)
    return sizes


def _moe(root, family="qwen3_moe", experts=16):
    kw = dict(hidden_size=128, moe_intermediate_size=96) if family == "qwen3_moe" else dict(
        hidden_size=256, intermediate_size=1024, moe_intermediate_size=64)
    return write_checkpoint(root / "src", family=family, weights="structured", num_layers=2, num_experts=experts,
                            shard_size=400_000, **kw)


@pytest.mark.parametrize("family,scales,fmt,host_buffer", [
    ("qwen3_moe", "max", "modelopt", "8MiB"),
    ("qwen3_moe", "mse", "modelopt", "8MiB"),
    ("qwen3_moe", "four-over-six", "compressed-tensors", "8MiB"),
    ("qwen3_moe", "max", "modelopt", "1MiB"),  # slabs of ~128 KiB: batches of 5 groups
    ("deepseek_v3", "max", "modelopt", "8MiB"),
])
def test_batched_steps_on_the_gpu_stages_write_the_cpu_bytes(family, scales, fmt, host_buffer, tmp_path, monkeypatch,
                                                              request):
    src = _moe(tmp_path, family)
    api.convert(src, tmp_path / "cpu", scales=scales, format=fmt, device="cpu", host_buffer=host_buffer)
    sizes = request.getfixturevalue("gpu_stages_on_cpu")
    api.convert(src, tmp_path / "gpu", scales=scales, format=fmt, device="cpu", host_buffer=host_buffer)
    assert sizes and max(sizes) > 1  # experts went as batches
    if host_buffer == "1MiB":
        assert max(sizes) <= (2**20 // pipeline.BATCH_SLABS) // aligned(96 * 128 * 2)
    a, b = load_checkpoint(tmp_path / "cpu"), load_checkpoint(tmp_path / "gpu")
    assert a.keys() == b.keys()
    assert all(same_bytes(a[k], b[k]) for k in a)


def test_batched_steps_with_an_amax_file_write_the_cpu_bytes(tmp_path, gpu_stages_on_cpu, monkeypatch):
    """Each group of a batch keeps its own saved amax and input scale."""
    from test_amax import make_amax, weights

    src = _moe(tmp_path)
    torch.save(make_amax(weights(src), kv=False), tmp_path / "amax.pt")
    api.convert(src, tmp_path / "gpu", amax=tmp_path / "amax.pt", device="cpu", host_buffer="8MiB")
    assert max(gpu_stages_on_cpu) > 1
    monkeypatch.setattr(pipeline.Converter, "device_stages_on_cpu", False)
    api.convert(src, tmp_path / "cpu", amax=tmp_path / "amax.pt", device="cpu", host_buffer="8MiB")
    a, b = load_checkpoint(tmp_path / "cpu"), load_checkpoint(tmp_path / "gpu")
    assert a.keys() == b.keys() and all(same_bytes(a[k], b[k]) for k in a)


def _plan(tmp_path, family="qwen3_moe"):
    return build_plan(open_source(_moe(tmp_path, family)), get_format("modelopt"), scales="max")


def test_schedule_takes_every_unit_once_in_plan_order_and_batches_one_structure(tmp_path):
    plan = _plan(tmp_path)
    steps = schedule(plan.units, "max", slab=2**20, batch_bytes=2**30, window=2**30)
    flat = [u for step in steps for u in step]
    assert sorted(map(id, flat)) == sorted(map(id, plan.units))
    index = {id(u): i for i, u in enumerate(plan.units)}
    firsts = [index[id(step[0])] for step in steps]
    assert firsts == sorted(firsts)  # steps go in the order of their first unit
    for step in steps:
        assert [index[id(u)] for u in step] == sorted(index[id(u)] for u in step)
        if len(step) > 1:
            assert len({structure(u.members) for u in step}) == 1 and None not in {structure(u.members) for u in step}
            assert len(step) <= MAX_BATCH
            assert all(len(step) * m.weight.nbytes <= 2**20 for m in step[0].members)
    experts = [s for s in steps if s[0].members and ".experts." in s[0].members[0].module]
    assert experts and max(len(s) for s in experts) > 1


@pytest.mark.parametrize("limit", ["slab", "batch_bytes", "window"])
def test_schedule_keeps_each_batch_within_its_limits(tmp_path, limit):
    plan = _plan(tmp_path)
    group = max(u.members[0].weight.nbytes for u in plan.units if u.members)
    slab, gpu, window = 2**30, 2**30, 2**40
    if limit == "slab":
        slab = 3 * aligned(96 * 128 * 2)
    elif limit == "batch_bytes":
        gpu = 2 * 2 * 96 * 128 * 2  # two gate/up groups
    else:
        window = 4 * group
    steps = schedule(plan.units, "max", slab, gpu, window)
    batched = [s for s in steps if len(s) > 1]
    assert batched
    at = {}
    offset = 0
    for u in plan.units:
        at[id(u)] = offset
        offset += u.in_bytes
    for step in batched:
        if limit == "slab":
            assert len(step) <= 3
        elif limit == "batch_bytes":
            assert sum(m.weight.nbytes for u in step for m in u.members) <= gpu
        else:
            assert at[id(step[-1])] + step[-1].in_bytes - at[id(step[0])] <= window
    longest = max(len(s) for s in batched if len(s[0].members) == 2)  # gate/up groups
    unlimited = max(len(s) for s in schedule(plan.units, "max", 2**30, 2**30, 2**40))
    assert longest < unlimited  # the limit bound
    if limit != "window":  # (the window's own bound is checked step by step above)
        assert longest == (3 if limit == "slab" else 2)


def test_schedule_without_batches_is_one_unit_per_step(tmp_path):
    plan = _plan(tmp_path)
    for method, gpu in (("max", 0), ("cast", 2**30)):
        assert schedule(plan.units, method, 2**30, gpu, 2**30) == [[u] for u in plan.units]


def test_a_batch_read_into_one_buffer_is_each_groups_weights(tmp_path):
    """read_range's ``base`` and stacked_view: group g of a position at g weights into its buffer."""
    plan = _plan(tmp_path)
    step = max(schedule(plan.units, "max", 2**20, 2**30, 2**30), key=len)
    assert len(step) > 2
    for i, m in enumerate(step[0].members):
        buf = torch.zeros(len(step) * m.weight.nbytes + 7, dtype=torch.uint8)
        for g, u in enumerate(step):
            read_range(u.members[i].weight, buf, 0, u.members[i].weight.nbytes, g * m.weight.nbytes)
        view = stacked_view(m.weight, len(step), buf)
        for g, u in enumerate(step):
            assert same_bytes(view[g], read_into(u.members[i].weight))
        with pytest.raises(ValueError):  # a buffer too small is an error, not a short read
            read_range(m.weight, buf[:10], 0, m.weight.nbytes, 0)


def test_only_steps_whose_kernels_depend_on_shapes_alone_are_replayed_from_graphs(tmp_path, monkeypatch):
    """graphs.key_of: batches of max, mse and four-over-six, keyed by structure and size; never one
    group, another method, a group with an input scale (an amax file's, per group), or with
    SHARDCONV_GRAPHS=0. (The replays themselves run on a GPU: tests/test_gpu.py.)"""
    from test_amax import make_amax, weights

    from shardconv.amax import load_amax
    from shardconv.graphs import key_of

    plan = _plan(tmp_path)
    steps = [s for s in schedule(plan.units, "max", 2**20, 2**30, 2**30) if len(s) > 1]
    for method in ("max", "mse", "four-over-six"):
        assert key_of(steps[0], method) == (structure(steps[0][0].members), len(steps[0]))
    assert key_of(steps[0], "amax") is None and key_of(steps[0][:1], "max") is None
    monkeypatch.setenv("SHARDCONV_GRAPHS", "0")
    assert key_of(steps[0], "max") is None
    monkeypatch.delenv("SHARDCONV_GRAPHS")
    src = tmp_path / "src"
    torch.save(make_amax(weights(src), kv=False), tmp_path / "amax.pt")
    with_inputs = build_plan(open_source(src), get_format("modelopt"), scales="amax", amax=load_amax(tmp_path / "amax.pt"))
    steps = [s for s in schedule(with_inputs.units, "amax", 2**20, 2**30, 2**30) if len(s) > 1]
    assert steps and all(key_of(s, "max") is None for s in steps)  # each group has its own input scale


@pytest.fixture
def graphs_without_a_gpu(monkeypatch):
    """graphs.Graphs with captures stubbed (they need a GPU): returns the module."""
    from shardconv import graphs

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: None)
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: None)
    monkeypatch.setattr(graphs.Graphs, "_capture", lambda self, step, weights: object())
    return graphs


def test_graph_instances_alternate_within_their_memory_budget(tmp_path, graphs_without_a_gpu):
    """The first step of a key runs eagerly, the next two are captured (two instances that alternate);
    an instance counts COST times its inputs, and past the budget a key reuses what it has or runs eagerly."""
    graphs = graphs_without_a_gpu
    plan = _plan(tmp_path)
    steps = [s for s in schedule(plan.units, "max", 2**20, 2**30, 2**30) if len(s) > 1]
    step = next(s for s in steps if len(s[0].members) == 2)
    weights = [torch.empty(len(step) * m.weight.nbytes, dtype=torch.uint8) for m in step[0].members]
    cost = graphs.COST * sum(w.nbytes for w in weights)
    g = graphs.Graphs(torch.device("cuda"), "max", None, budget=2 * cost)
    got = [g.instance(step, weights) for _ in range(6)]
    assert got[0] is None and got[1] is not None and got[2] is not None and got[1] is not got[2]
    assert got[3:] == [got[1], got[2], got[1]] and g.held == 2 * cost
    one = graphs.Graphs(torch.device("cuda"), "max", None, budget=cost)  # room for one instance: reused
    got = [one.instance(step, weights) for _ in range(4)]
    assert got[0] is None and got[1] is not None and got[2] is got[1] is got[3] and one.held == cost
    none = graphs.Graphs(torch.device("cuda"), "max", None, budget=cost - 1)  # room for none: eager
    assert [none.instance(step, weights) for _ in range(3)] == [None] * 3 and none.held == 0


def test_graphs_only_on_the_current_device_and_off_after_a_failed_capture(tmp_path, graphs_without_a_gpu,
                                                                             monkeypatch):
    """A capture on another GPU than the current one recorded nothing (found by review; no machine of
    several GPUs to test a fix): such a device runs every batch eagerly. A capture that fails turns
    graphs off for the run, its bytes the eager batches'."""
    graphs = graphs_without_a_gpu
    plan = _plan(tmp_path)
    step = next(s for s in schedule(plan.units, "max", 2**20, 2**30, 2**30) if len(s) > 1)
    weights = [torch.empty(len(step) * m.weight.nbytes, dtype=torch.uint8) for m in step[0].members]
    other = graphs.Graphs(torch.device("cuda:1"), "max", None, budget=2**40)
    assert not other.enabled and [other.instance(step, weights) for _ in range(3)] == [None] * 3
    assert graphs.Graphs(torch.device("cuda:0"), "max", None, budget=2**40).enabled

    def fails(self, step, weights):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs.Graphs, "_capture", fails)
    g = graphs.Graphs(torch.device("cuda"), "max", None, budget=2**40)
    assert [g.instance(step, weights) for _ in range(4)] == [None] * 4 and not g.enabled and g.held == 0


def test_batches_do_not_make_the_start_up_read_ahead_skip_more(tmp_path, gpu_stages_on_cpu, monkeypatch):
    """The start-up read-ahead skips what the pipeline's readers were given (readahead.ReadAhead.reached:
    the furthest end reported). A batch spans units of another structure that a later step reads (a MoE
    layer's gate/up and down groups alternate): reporting a batch's furthest unit made the read-ahead
    skip those before any reader had them, to be read cold (found by review). Weights skipped before
    they were given out must be no more than one unit per step skips."""
    from shardconv import readahead

    src = _moe(tmp_path)

    def skipped_early(dst) -> set[str]:
        given: set[tuple[str, int]] = set()
        weights, early = [], set()

        class Recorder:
            def reached(self, ranges):
                path, end = max((str(r.path), r.offset + r.nbytes) for r in ranges)
                early.update(w.name for w in weights
                             if str(w.path) == path and w.offset + w.nbytes <= end and (path, w.offset) not in given)

            def summary(self):
                return ""

        real = pipeline.Converter._submit_reads

        def submit_reads(self, step, buffers):
            if not weights:
                weights.extend(m.weight for u in self.plan.units for m in u.members)
            given.update((str(m.weight.path), m.weight.offset) for u in step for m in u.members)
            return real(self, step, buffers)

        monkeypatch.setattr(pipeline.Converter, "_submit_reads", submit_reads)
        monkeypatch.setattr(readahead, "active", lambda: Recorder())
        api.convert(src, dst, scales="max", device="cpu", host_buffer="8MiB")
        return early

    monkeypatch.setenv("SHARDCONV_BATCH", "0")
    alone = skipped_early(tmp_path / "alone")
    assert not gpu_stages_on_cpu  # one unit per step
    monkeypatch.delenv("SHARDCONV_BATCH")
    batched = skipped_early(tmp_path / "batched")
    assert max(gpu_stages_on_cpu) > 2
    assert batched <= alone, sorted(batched - alone)[:3]
