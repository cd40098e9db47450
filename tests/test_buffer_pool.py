"""The pipeline's host buffer pool: pinned buffers are registered on a thread while the first is in use."""

import threading

import pytest
import torch

from conftest import same_bytes
from shardconv import host_buffers, host_outputs, threads


def fake_pinning(monkeypatch, fail_at=None, gate=None):
    """Pretend to page-lock (no GPU here): plain buffers, optionally slow (``gate``) or failing."""
    made = []

    def allocate(self, size, pin):
        if gate is not None and made:
            gate.wait(5)
        if fail_at is not None and len(made) == fail_at:
            raise MemoryError("no host memory left for a pinned buffer")
        made.append(size)
        return torch.empty(size, dtype=torch.uint8)

    monkeypatch.setattr(host_buffers.BufferPool, "_allocate", allocate)
    return made


def test_the_first_buffer_is_ready_before_the_others_are_pinned(monkeypatch):
    gate = threading.Event()
    made = fake_pinning(monkeypatch, gate=gate)
    size = host_buffers.ALIGN
    pool = host_buffers.BufferPool(4, size, pin=True)
    (first,) = pool.take([size], block=False)  # available at once, while the thread waits at the gate
    assert first.numel() == size and pool.take([size], block=False) is None
    gate.set()
    rest = pool.take([size] * 3)
    assert len(rest) == 3 and len(made) == 4
    pool.give([first, *rest])
    pool.close()
    assert pool.idle and len(pool.free) + (pool._open is not None) == 4


def test_a_failed_pinning_is_raised_not_waited_for(monkeypatch):
    fake_pinning(monkeypatch, fail_at=2)
    pool = host_buffers.BufferPool(4, 64, pin=True)
    with pytest.raises(MemoryError, match="pinned buffer"):
        pool.take([64] * 4)  # two slabs exist; without the error this would wait for ever
    pool.close()


def test_without_pinning_every_buffer_exists_at_once():
    pool = host_buffers.BufferPool(3, 32, pin=False)
    assert pool.filler is None and len(pool.take([32] * 3, block=False)) == 3


def test_small_buffers_are_cut_from_one_slab_and_slabs_come_back():
    """DeepSeek-V3's case: slabs sized for a big weight hold many expert-sized buffers at once."""
    a = host_buffers.ALIGN
    pool = host_buffers.BufferPool(2, 8 * a, pin=False)
    small = [pool.take([a, a]) for _ in range(8)]  # 16 buffers from 2 slabs
    assert pool.take([a], block=False) is None  # full
    ptrs = [b.data_ptr() for pair in small for b in pair]
    assert len(set(ptrs)) == 16 and all(b.numel() == a for pair in small for b in pair)
    for pair in small[:4]:  # the first slab's buffers come back: it is whole again
        pool.give(pair)
    big = pool.take([8 * a])
    assert big[0].data_ptr() == ptrs[0]  # the first slab, whole
    with pytest.raises(RuntimeError, match="needs buffers"):
        pool.take([9 * a])  # larger than a slab: never served, so refused rather than waited for
    with pytest.raises(RuntimeError, match="needs buffers"):
        pool.take([a] * 3)  # more buffers than slabs
    for pair in small[4:]:
        pool.give(pair)
    pool.give(big)
    assert pool.idle
    odd = pool.take([1, 3 * a + 1])  # sizes as asked; each starts on an ALIGN boundary
    assert [b.numel() for b in odd] == [1, 3 * a + 1] and (odd[1].data_ptr() - odd[0].data_ptr()) % a == 0


def test_buffers_in_use_are_never_handed_out_twice():
    """Random takes and gives: the bytes of live buffers never overlap, and everything comes back."""
    import random

    rng = random.Random(0)
    a = host_buffers.ALIGN
    pool = host_buffers.BufferPool(4, 10 * a, pin=False)
    live = []
    for _ in range(2000):
        if live and (rng.random() < 0.5 or len(live) > 12):
            pool.give(live.pop(rng.randrange(len(live))))
        else:
            got = pool.take([rng.randint(0, 10 * a) for _ in range(rng.randint(1, 3))], block=False)
            if got is not None:
                live.append(got)
        spans = sorted((b.data_ptr(), b.data_ptr() + max(b.numel(), 1)) for bufs in live for b in bufs)
        assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:]))
    for bufs in live:
        pool.give(bufs)
    assert pool.idle and len(pool.take([10 * a] * 4, block=False)) == 4


class _Event:
    """A CUDA event that is always complete (the simulation below has no GPU)."""

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _Stream:
    def __init__(self, device=None):
        pass

    def wait_event(self, event):
        pass


def simulated_batch(tmp_path, monkeypatch, slabs=7, stacked=False, scales="max", fmt_name="modelopt"):
    """The GPU path's hand-off, simulated on the CPU (CUDA streams and events stubbed): a Converter
    whose output pool is ``slabs`` slabs of one expert's outputs each (``stacked``: of 4 groups' stacked
    outputs), and its largest batch of 32 DeepSeek-V3-shaped expert groups quantized: (converter, batch,
    results, a batch.Stacked whose tensors are None unless ``stacked``). ``scales="amax"``: from an amax
    file with an input amax per module (W4A4: each group its own input_scale)."""
    import contextlib

    from shardconv import pipeline
    from shardconv.batch import quantize_stacked, structure
    from shardconv.formats import get_format
    from shardconv.planning import build_plan
    from shardconv.safetensors_io import read_into
    from shardconv.source import open_source
    from shardconv.synth import write_checkpoint

    empty = torch.empty
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None, raising=False)

    src = write_checkpoint(tmp_path / "src", family="deepseek_v3", weights="structured", num_layers=2, num_experts=32,
                           hidden_size=256, intermediate_size=4096, moe_intermediate_size=64, shard_size=2_000_000)
    fmt = get_format(fmt_name)
    amax = None
    if scales == "amax":
        from shardconv.amax import load_amax
        from test_amax import make_amax, weights

        torch.save(make_amax(weights(src), kv=False), tmp_path / "amax.pt")
        amax = load_amax(tmp_path / "amax.pt")
    plan = build_plan(open_source(src), fmt, scales=scales, amax=amax)
    (tmp_path / "dst").mkdir()
    conv = pipeline.Converter(plan, tmp_path / "dst", fmt, pipeline.Options(host_buffer=4 * 2**20, progress=False))
    conv.d2h = _Stream()
    same: dict = {}
    for u in plan.units:
        if u.members and ".experts." in u.members[0].module:
            same.setdefault(structure(u.members), []).append(u)
    units = max(same.values(), key=len)
    # slabs that hold one expert's outputs each (the pool carves several from a larger slab)
    batch = [(u, [read_into(m.weight) for m in u.members], _Event()) for u in units]
    results = quantize_stacked([u.members for u in units], [w for _, w, _ in batch], scales, "cpu")
    size = (host_outputs.stacked_bytes(results.tensors, 4) if stacked
            else max(conv.out_bytes[m.module] for u in units for m in u.members))
    conv.outputs = host_buffers.BufferPool(slabs, size, pin=False)
    return conv, batch, results if stacked else type(results)(results.groups)


@pytest.mark.parametrize("order", ["pipeline", "take-all-first"])
@pytest.mark.parametrize("stacked", [False, True])
def test_a_batch_larger_than_the_output_pool_is_written_without_waiting_for_ever(order, stacked, tmp_path, monkeypatch):
    """A batch of 32 expert groups and 7 output slabs (simulated_batch), downloaded a group at a time or
    4 groups per stacked copy. The pipeline hands each download to a writer before the next takes
    buffers, so the batch is written and every buffer comes back; taking every download's buffers first
    (the code before effa587, which the H200's DeepSeek-V3 run never finished) waits for ever."""
    conv, batch, results = simulated_batch(tmp_path, monkeypatch, stacked=stacked)
    units = [u for u, _, _ in batch]
    copies = -(-len(units) // 4) if stacked else sum(len(u.members) for u in units)
    assert copies > conv.outputs.count  # more than the pool holds
    oks = host_outputs.group_flags(results.groups)
    jobs = []

    def run():
        downloads = conv._downloads([u for u, _, _ in batch], results, oks, _Event())
        for job in (list(downloads) if order == "take-all-first" else downloads):
            jobs.append(conv.writers.submit(*job))
        for job in jobs:
            job.result()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(3 if order == "take-all-first" else 120)
    try:
        if order == "take-all-first":
            assert worker.is_alive() and not jobs  # the old order: stuck taking buffers
        else:
            assert not worker.is_alive() and len(jobs) == (copies if stacked else len(units))
            assert conv.outputs.idle  # every buffer given back
    finally:
        with conv.outputs.cond:  # release a stuck taker, if any
            conv.outputs.free += [torch.empty(conv.outputs.size, dtype=torch.uint8) for _ in range(conv.outputs.count)]
            conv.outputs.cond.notify_all()
        worker.join(10)
        conv.readers.shutdown()
        conv.writers.shutdown()


@pytest.mark.parametrize("stacked,scales,fmt_name", [(False, "max", "modelopt"), (True, "max", "modelopt"),
                                                     (True, "amax", "modelopt"), (True, "amax", "compressed-tensors")])
def test_the_group_the_device_flagged_is_the_one_redone_on_the_cpu(stacked, scales, fmt_name, tmp_path, monkeypatch):
    """The batch's [G] flags travel to the writers as one host tensor and an index per group
    (pipeline._downloads): a group flagged on the device, here the fifth, is redone on the CPU
    (quantize.redo_on_cpu) and no other; every group is written, with the bytes of its own results
    (stacked: the right group of the right copy, host_outputs.group_of, with its own input_scale)."""
    from shardconv import pipeline

    conv, batch, results = simulated_batch(tmp_path, monkeypatch, slabs=64, stacked=stacked, scales=scales,
                                           fmt_name=fmt_name)
    if scales == "amax":  # each group has its own input scale, so one handed to the wrong group shows
        assert len({float(r[0].input_scale) for r in results.groups}) == len(results.groups)
    oks = host_outputs.group_flags(results.groups)
    assert bool(oks.all())
    oks[4] = False
    redone, written = [], {}
    real = pipeline.redo_on_cpu
    monkeypatch.setattr(pipeline, "redo_on_cpu", lambda members, *a: redone.append(members) or real(members, *a))
    monkeypatch.setattr(conv.shards, "write", lambda shard, tensors: written.update(
        {k: v.clone() for k, v in tensors.items()}))
    jobs = [conv.writers.submit(*job) for job in conv._downloads([u for u, _, _ in batch], results, oks, _Event())]
    try:
        for job in jobs:
            job.result()
    finally:
        conv.readers.shutdown()
        conv.writers.shutdown()
    assert redone == [batch[4][0].members]
    assert len(jobs) == (-(-len(batch) // 4) if stacked else len(batch)) and conv.outputs.idle
    for (u, _, _), res in zip(batch, results.groups):
        for m, q in zip(u.members, res):
            want = conv.fmt.quantized_tensors(m.module, q)
            assert want.keys() <= written.keys()
            for name, t in want.items():
                got = written[name]
                assert got.dtype == t.dtype and got.shape == t.shape, name
                assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_the_gpu_pipeline_sets_the_switch_interval_and_restores_it(monkeypatch):
    """SHARDCONV_SWITCH_INTERVAL: unset the measured default, 0 Python's own, else the value."""
    import sys

    from shardconv import pipeline

    monkeypatch.delenv("SHARDCONV_SWITCH_INTERVAL", raising=False)
    assert threads.switch_interval() == threads.SWITCH_INTERVAL
    monkeypatch.setenv("SHARDCONV_SWITCH_INTERVAL", "0")
    assert threads.switch_interval() is None
    monkeypatch.setenv("SHARDCONV_SWITCH_INTERVAL", "0.003")
    assert threads.switch_interval() == 0.003
    seen = []
    conv = pipeline.Converter.__new__(pipeline.Converter)
    conv.cuda = True
    conv._run = lambda: seen.append(sys.getswitchinterval())
    before = sys.getswitchinterval()
    conv.run()
    assert abs(seen[0] - 0.003) < 1e-9 and sys.getswitchinterval() == before
    conv.cuda = False  # the CPU path keeps Python's own
    conv.run()
    assert seen[1] == before


def test_empty_buffers_are_told_apart():
    """An empty slice's data_ptr() is 0: two empty buffers out at once must not share a key."""
    a = host_buffers.ALIGN
    pool = host_buffers.BufferPool(2, 2 * a, pin=False)
    one, two = pool.take([0]), pool.take([0, a])
    pool.give(one)
    pool.give(two)
    assert pool.idle and len(pool.take([2 * a, 2 * a], block=False)) == 2


def test_a_blocking_take_of_every_slab_returns_once_the_rest_is_back():
    """The pipeline's progress rests on this: with the open slab partly cut, a take of ``count``
    buffers waits, and gets them once everything else is given back."""
    a = host_buffers.ALIGN
    pool = host_buffers.BufferPool(3, 4 * a, pin=False)
    held = [pool.take([a]), pool.take([3 * a, 2 * a])]  # the open slab is partly cut
    got = []
    taker = threading.Thread(target=lambda: got.append(pool.take([4 * a, a, 3 * a])), daemon=True)
    taker.start()
    taker.join(0.3)
    assert taker.is_alive() and not got
    for bufs in held:
        pool.give(bufs)
    taker.join(5)
    assert not taker.is_alive() and [b.numel() for b in got[0]] == [4 * a, a, 3 * a]


def test_group_flags_are_each_groups_members_flags():
    from shardconv.quantize import QuantizedWeight

    def q(ok):
        return QuantizedWeight(torch.zeros(1), torch.zeros(1), torch.zeros(()), None, ok=torch.tensor(ok))

    results = [[q(True), q(True)], [q(True), q(False)], [q(False), q(True)], [q(True), q(True)]]
    assert host_outputs.group_flags(results).tolist() == [True, False, False, True]
    assert host_outputs.group_flags([[q(False)]]).tolist() == [False]


@pytest.mark.parametrize("fmt_name", ["modelopt", "compressed-tensors"])
def test_outputs_packed_into_a_host_buffer_keep_their_bytes(fmt_name):
    """host_outputs.copy_packed, as the device-to-host copy of a member's outputs uses it: every tensor a
    format writes (uint8, fp8, fp32, 0-d, views of a batch) lands in one buffer, aligned, byte for byte."""
    from shardconv.formats import get_format
    from shardconv.quantize import QuantizedWeight

    g = torch.Generator().manual_seed(5)
    batch_packed = torch.randint(0, 256, (3, 8, 16), dtype=torch.uint8, generator=g)
    batch_scale = torch.randn(3, 8, 2, generator=g).to(torch.float8_e4m3fn)
    batch_s2 = torch.rand(3, generator=g) + 0.5
    weight = QuantizedWeight(batch_packed[1], batch_scale[1], batch_s2[1], torch.tensor(0.25))
    want = get_format(fmt_name).quantized_tensors("model.layers.0.mlp.down_proj", weight)
    size = sum(host_outputs.packed_size(t.numel() * t.element_size()) for t in want.values())
    buf = torch.full((size,), 0xAA, dtype=torch.uint8)
    pos, got = 0, {}
    for name, t in want.items():
        assert pos % host_outputs.OUTPUT_ALIGN == 0
        got[name], pos = host_outputs.copy_packed(t, buf, pos)
    assert pos == size
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert same_bytes(got[name], t), name
        assert got[name].untyped_storage().data_ptr() == buf.untyped_storage().data_ptr(), name


def test_a_stacked_copy_of_one_group_fits_the_output_pool_whatever_the_budget(tmp_path):
    """device_stages.output_pool: a slab holds one batched group's stacked outputs at least. With a small
    --host-buffer a quarter of the budget was below one gate/up group's outputs (the sum of its members',
    more than the largest member's), and the download's take raised (found by review: 'a unit needs
    buffers of [1179776] bytes but the pool has 4 slabs of 593920 bytes')."""
    from shardconv.batch import MAX_BATCH, quantize_stacked, structure
    from shardconv.device_stages import output_pool
    from shardconv.formats import get_format
    from shardconv.planning import build_plan
    from shardconv.safetensors_io import read_into
    from shardconv.source import open_source
    from shardconv.synth import write_checkpoint

    src = write_checkpoint(tmp_path / "src", family="llama", num_layers=2, hidden_size=256, intermediate_size=4096)
    fmt = get_format("modelopt")
    plan = build_plan(open_source(src), fmt, scales="max")
    same: dict = {}
    for u in plan.units:
        if u.members and structure(u.members) is not None:
            same.setdefault(structure(u.members), []).append(u)
    units = next(us for us in same.values() if len(us) > 1 and len(us[0].members) == 2)  # the gate/up groups
    stacked = quantize_stacked([u.members for u in units], [[read_into(m.weight) for m in u.members] for u in units],
                               "max", "cpu")
    one = host_outputs.stacked_bytes(stacked.tensors, 1)
    out_bytes = host_outputs.output_bytes(plan, fmt)
    budget = 2 * 2**20
    assert max(max(out_bytes.values()), min(MAX_BATCH * host_outputs.stacked_group_bytes(units[0].members),
                                            budget // 4)) < one  # the sizing before the fix
    pool = output_pool(plan, out_bytes, budget, 4, 2**30, torch.device("cpu"))
    k = host_outputs.groups_per_copy(stacked.tensors, pool.size)
    (buf,) = pool.take([host_outputs.stacked_bytes(stacked.tensors, k)])  # raised before the fix
    host = host_outputs.copy_stacked(stacked.tensors, 0, k, buf)
    for j in range(k):
        for got, want in zip(host_outputs.group_of(host, j, None), stacked.groups[j]):
            assert torch.equal(got.packed, want.packed) and torch.equal(got.scale.view(torch.uint8),
                                                                         want.scale.view(torch.uint8))
    pool.give([buf])


@pytest.mark.parametrize("stacked", [False, True])
def test_a_failed_download_names_a_tensor_and_gives_its_buffer_back(stacked, tmp_path, monkeypatch):
    """A device error surfacing in a writer's wait for a download (e.g. an illegal memory access reported
    late) becomes one line naming a tensor of the download, stacked or not (the stacked writer's wait
    was outside any tensor's context, found by review), and the output buffer still goes back."""
    from shardconv.errors import ShardconvError

    conv, batch, results = simulated_batch(tmp_path, monkeypatch, slabs=64, stacked=stacked)

    def fails():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(_Event, "synchronize", lambda self: fails())
    oks = host_outputs.group_flags(results.groups)
    job = next(iter(conv._downloads([u for u, _, _ in batch], results, oks, _Event())))
    try:
        with pytest.raises(ShardconvError, match=r"tensor 'model\.layers\.\d+\.mlp\.experts\.\d+\..*illegal memory"):
            job[0](*job[1:])
    finally:
        conv.readers.shutdown()
        conv.writers.shutdown()
    assert conv.outputs.idle
