"""The streaming pipeline, overlapped: reading, host-to-device copies, quantizing, device-to-host
copies and writing all proceed at once, with bounded memory (conversion.py runs it for one DST).

Stages:
- reader threads fill reusable host buffers (pinned when a GPU is used) with ``pread``; tensors that
  are kept are copied by copier threads of their own, queued ahead of the readers, through a small buffer per
  thread, and never touch the GPU;
- the main thread takes the plan a step at a time: one group, or with a GPU a batch of same-structure
  groups (a MoE layer's experts, batch.schedule) whose weights the readers put back to back, one buffer
  per member position; it uploads a step on a copy stream and quantizes it on a compute stream (a batch
  of a size seen before replayed from a CUDA graph, graphs.py); results download into pinned output
  buffers on a third stream, without waiting (device_stages.py);
- writer threads wait for a download, write its tensors at their planned offsets, and hand the
  buffers back.
Host memory is the two buffer pools (``--host-buffer``), a copy buffer per copier thread, the
read-ahead's scratch buffers and a few small tensors, whatever the model size; the GPU holds the
steps in flight plus row-chunked temporaries and the CUDA graphs' static tensors (``--gpu-buffer``).
Output shards are written under ``.partial`` names and renamed when complete, each recorded in the
journal with its digest.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from . import journal, profile, readahead
from .batch import schedule, stacked_view, structure
from .device_stages import DeviceStages, output_pool
from .encodings import dequantize_excluded
from .errors import in_context, working_on
from .graphs import Graphs
from .host_buffers import BufferPool
from .host_outputs import output_bytes
from .output_shards import Shards
from .planning import Plan, Unit
from .quantize import QuantizedWeight, quantize_group, redo_on_cpu
from .safetensors_io import TensorInfo, read_into, read_range, tensor_view
from .shard_writer import COPY_PIECE
from .threads import io_threads, switch_interval

log = logging.getLogger("shardconv")
DEFAULT_HOST_BUFFER = 1 * 2**30
DEFAULT_GPU_BUFFER = 4 * 2**30
DEFAULT_PREFETCH = 0  # off: not measured to gain yet (README, Command line)
LOOKAHEAD_UNITS = 64  # how far reads may run ahead of quantization, in units
READ_PIECE = 64 * 2**20  # a weight is read in pieces of this size, by all reader threads at once
COPY_SPLIT = 256 * 2**20  # a kept tensor is copied in jobs of this size, by the copier threads at once
# Kept tensors are copied by threads of their own, queued ahead of the readers, not by the readers in
# plan order: on the H200 machine a 70B slice's embedding and lm_head (4.2 GB) held all 8 readers for
# 16-22 thread-seconds, their writes queued on the output file's lock (buffered writes into one file:
# 3.2-3.7 GB/s with 1, 4 or 8 threads), while the weights waited to be read (the first group 1.0-1.7 s
# after the start), and the lm_head copy, gated behind the weights' buffers, was a tail.
COPIERS = 2
BATCH_SLABS = 8  # with batches (batch.schedule), the host budget is cut into this many slabs
COPY_AHEAD_SHARDS = 2  # kept tensors are queued up to this many output shards past the readers' one


@dataclass
class Options:
    """Pipeline knobs; the defaults suit one GPU and a fast local disk."""

    device: torch.device = torch.device("cpu")
    readers: int | None = None  # None: io_threads()
    writers: int | None = None
    host_buffer: int = DEFAULT_HOST_BUFFER  # bytes of host staging buffers (pinned with a GPU)
    gpu_buffer: int = DEFAULT_GPU_BUFFER  # bytes of GPU temporaries per quantize step
    progress: bool = True
    prefetch: int = DEFAULT_PREFETCH  # bytes of input read ahead of the readers (readahead.Prefetcher; 0: none)
    fsync: bool = False  # flush each shard to disk before recording it (power-loss safe resume)


def _largest_member(plan: Plan) -> int:
    return max((m.weight.nbytes for m in plan.quantized), default=0)


class Converter(DeviceStages):
    """Runs one plan through the stages described in the module docstring."""

    # Tests run the GPU stages on the CPU, with streams, events and pinning stubbed (tests/test_schedule.py).
    device_stages_on_cpu = False

    def __init__(self, plan: Plan, dst: Path, fmt, opts: Options, log: journal.Journal | None = None,
                 skip_shards: set[int] = frozenset(), check=None):
        self.plan, self.dst, self.fmt, self.opts = plan, dst, fmt, opts
        self.check = check  # called between groups; raises to stop the run (speculation.Speculation.check)
        self.skip_shards = skip_shards
        self.cuda = opts.device.type == "cuda" or self.device_stages_on_cpu
        auto = io_threads()
        readers, writers = opts.readers or auto[0], opts.writers or auto[1]
        max_members = max((len(u.members) for u in plan.units), default=1)
        # bytes of same-structure groups quantized as one batch (batch.py); SHARDCONV_BATCH=0: one at a time
        self.batch_bytes = (min(2**30, opts.gpu_buffer // 4)
                            if self.cuda and os.environ.get("SHARDCONV_BATCH") != "0" else 0)
        slab = max(_largest_member(plan), 1)
        if self.batch_bytes and any(u.members and structure(u.members) is not None for u in plan.units):
            slab = max(slab, opts.host_buffer // BATCH_SLABS)  # a batch's weights of one position in one slab
        # Enough slabs to keep every reader busy while a group is on the device, within the budget.
        count = max(max_members + 1, min(opts.host_buffer // slab, 2 * max(1, readers) + max_members))
        self.inputs = BufferPool(count, slab, pin=self.cuda, device=opts.device)
        self.out_bytes = output_bytes(plan, fmt)
        self.outputs = (output_pool(plan, self.out_bytes, opts.host_buffer, count, self.batch_bytes, opts.device)
                        if self.cuda else None)
        self.shards = Shards(plan, dst, log, sync=opts.fsync)
        self.readers = ThreadPoolExecutor(max(1, readers), thread_name_prefix="shardconv-read")
        self.copiers = ThreadPoolExecutor(COPIERS, thread_name_prefix="shardconv-copy")
        self.writers = ThreadPoolExecutor(max(1, writers), thread_name_prefix="shardconv-write")
        self.chunk = max(1 << 20, opts.gpu_buffer // 32) if self.cuda else None
        self.uploads: collections.deque = collections.deque()  # (upload event, host buffers) in flight
        if self.cuda:
            self.h2d = torch.cuda.Stream(opts.device)
            self.compute = torch.cuda.Stream(opts.device)
            self.d2h = torch.cuda.Stream(opts.device)
        # batches replayed from CUDA graphs (graphs.py), their memory within the GPU budget
        self.graphs = (Graphs(opts.device, plan.scales, self.chunk, opts.gpu_buffer)
                       if self.batch_bytes and opts.device.type == "cuda" else None)
        self.bar = None
        self.requantized = 0  # scales "cast": MXFP4 blocks outside the lossless window (cast.py), counted here
        self.clock = profile.StageClock()
        self.local = threading.local()

    # -- stage 1: readers -------------------------------------------------------------------------
    def _submit_reads(self, step: list[Unit], buffers: list[torch.Tensor]) -> list[Future]:
        """Every reader reads a piece of the step's weights into its buffers: reading is not limited to
        one thread per tensor (a 70B MLP weight is 470 MB), nor by how many buffers are free. A batch's
        group ``g`` lands at ``g`` weights into its member position's buffer (batch.schedule)."""
        return [self.readers.submit(self._read_piece, m.weight, buf, start, min(start + READ_PIECE, m.weight.nbytes),
                                    g * m.weight.nbytes)
                for g, unit in enumerate(step) for m, buf in zip(unit.members, buffers)
                for start in range(0, m.weight.nbytes, READ_PIECE)]

    @in_context
    def _read_piece(self, info: TensorInfo, buf: torch.Tensor, start: int, stop: int, base: int) -> None:
        t0 = time.perf_counter()
        read_range(info, buf, start, stop, base)
        self.clock.add("read", t0)

    def _submit_copies(self, units: list[Unit]) -> list[Future]:
        """The units' kept tensors, copied in pieces by the copier threads (:data:`COPIERS`)."""
        return [self.copiers.submit(self._copy_piece, unit, start, min(start + COPY_SPLIT, unit.copy.nbytes))
                for unit in units if unit.copy is not None
                for start in range(0, max(unit.copy.nbytes, 1), COPY_SPLIT)]

    @in_context
    def _copy_piece(self, unit: Unit, start: int, stop: int) -> None:
        t0 = time.perf_counter()
        if not hasattr(self.local, "copy_buffer"):  # one per copier thread, allocated on first use
            self.local.copy_buffer = memoryview(bytearray(COPY_PIECE))
        self.shards.copy(unit.shard, unit, self.local.copy_buffer, start, stop)
        self.clock.add("copy", t0)
        self._advance(stop - start)

    @in_context
    def _write_small(self, unit: Unit) -> None:
        if unit.dequant is not None:  # an excluded encoded weight, written dequantized as bf16 (encodings/)
            self.shards.write(unit.shard, {unit.dequant.name: dequantize_excluded(unit.dequant)})
            self._advance(sum(t.nbytes for t in unit.inputs))
        if unit.extra:
            self.shards.write(unit.shard, dict(unit.extra))

    def _write_group(self, unit: Unit, host: list[dict[str, torch.Tensor]], ok: bool) -> None:
        """Write a group's downloaded tensors, or, where the device flagged it, the CPU reference's."""
        t0 = time.perf_counter()
        if not ok:  # the input buffers are reused by now: read the weights again
            redone = redo_on_cpu(unit.members, [read_into(m.weight) for m in unit.members], self.plan.scales)
            log.info("%s: redone on the CPU (the device flagged it)", unit.first.name)
            host = [self.fmt.quantized_tensors(m.module, q) for m, q in zip(unit.members, redone)]
        for tensors in host:
            self.shards.write(unit.shard, tensors)
        if unit.extra:
            self.shards.write(unit.shard, dict(unit.extra))
        self.clock.add("write", t0)
        self._advance(unit.in_bytes)

    @in_context
    def _write_cpu(self, unit: Unit, results: list[QuantizedWeight]) -> None:
        t0 = time.perf_counter()
        for m, q in zip(unit.members, results):
            self.shards.write(unit.shard, self.fmt.quantized_tensors(m.module, q))
        if unit.extra:
            self.shards.write(unit.shard, dict(unit.extra))
        self.clock.add("write", t0)
        self._advance(unit.in_bytes)

    def _advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        # process-wide: converters run one after another in a process (jobs, ranks are processes)
        interval, before = switch_interval() if self.cuda else None, sys.getswitchinterval()
        if interval is not None:
            sys.setswitchinterval(interval)
        try:
            self._run()
        finally:
            sys.setswitchinterval(before)

    def _run(self) -> None:
        from tqdm.auto import tqdm

        units = [u for u in self.plan.units if u.shard not in self.skip_shards]
        # each step one unit, or a batch of same-structure groups (batch.schedule; GPU only)
        steps = schedule(units, self.plan.scales, self.inputs.size, self.batch_bytes, self.opts.host_buffer)
        pending: collections.deque[tuple[list[Unit], list[Future] | None, list | None]] = collections.deque()
        jobs: collections.deque[Future] = collections.deque()
        self.bar = tqdm(total=sum(u.in_bytes for u in units), unit="B", unit_scale=True, unit_divisor=1000,
                        desc="converting", disable=not self.opts.progress, dynamic_ncols=True)
        nxt = 0
        prefetcher = readahead.Prefetcher([[t for u in step for t in u.inputs] for step in steps], self.opts.prefetch)
        startup = readahead.active()  # the command line's start-up read-ahead: moved on as units are read
        timeline = profile.DiskTimeline() if profile.ENABLED else None

        def submit(block: bool) -> None:
            nonlocal nxt
            while nxt < len(steps) and len(pending) < LOOKAHEAD_UNITS:
                step = steps[nxt]
                u = step[0]
                if not u.members:  # its kept tensor is queued for the copiers already (feed_copies)
                    if u.dequant is not None or u.extra:  # an excluded encoded weight (dequantized), or extras
                        jobs.append(self.readers.submit(self._write_small, u))
                    pending.append((step, None, None))
                else:
                    sizes = [len(step) * m.weight.nbytes for m in u.members]
                    bufs = self.inputs.take(sizes, block=False)
                    if bufs is None and self.cuda:
                        self._release_uploads()
                        bufs = self.inputs.take(sizes, block=False)
                    if bufs is None:
                        if pending or not block:
                            return
                        if self.cuda:  # only uploads in flight hold buffers now
                            self._release_uploads(wait=True)
                        bufs = self.inputs.take(sizes, block=True)
                    pending.append((step, self._submit_reads(step, bufs), bufs))
                if startup is not None:  # steps go in their first units' order: every unit before this
                    startup.reached(u.inputs)  # one is given to the readers; a batch's later ones may not be
                nxt += 1

        copies: collections.deque[Future] = collections.deque()
        copied = 0  # units whose kept tensor is queued for the copiers

        def feed_copies() -> None:
            """Queue the kept tensors of the units up to COPY_AHEAD_SHARDS output shards past the readers':
            copies need no host buffers, so they do not wait behind the weights' (the 70B slice's lm_head
            copy, the last unit, was a tail of its own), and the output shards open at once stay few
            (every copy queued at the start opened 98 of a 96-layer model's 195 shards at once)."""
            nonlocal copied
            if not units:
                return
            limit = steps[min(nxt, len(steps) - 1)][0].shard + COPY_AHEAD_SHARDS
            end = copied
            while end < len(units) and units[end].shard <= limit:
                end += 1
            if end > copied:
                copies.extend(self._submit_copies(units[copied:end]))
                copied = end

        try:
            while pending or nxt < len(steps):
                if self.check is not None:
                    self.check()
                feed_copies()
                submit(block=True)
                prefetcher.ahead_of(nxt)  # the units after those the readers have
                step, reads, bufs = pending.popleft()
                if reads is None:
                    continue
                unit = step[0]
                t0 = time.perf_counter()
                for piece in reads:
                    piece.result()
                weights = ([tensor_view(m.weight, buf) for m, buf in zip(unit.members, bufs)] if len(step) == 1 else
                           [stacked_view(m.weight, len(step), buf) for m, buf in zip(unit.members, bufs)])
                self.clock.add("main-wait-read", t0)
                if timeline is not None and not timeline.events:
                    timeline.mark("first group read")
                t0 = time.perf_counter()
                if self.cuda:
                    quantized, graph = self._quantize_step(step, weights, bufs)
                    for job in self._downloads(step, *quantized):
                        jobs.append(self.writers.submit(*job))
                    self._downloaded(graph)
                    self._release_uploads()
                else:
                    try:
                        with working_on(unit.first.path, unit.first.name):
                            results = quantize_group(unit.members, weights, self.plan.scales, "cpu")
                        self.requantized += sum(q.requantized for q in results)
                    finally:
                        self.inputs.give(bufs)
                    jobs.append(self.writers.submit(self._write_cpu, unit, results))
                self.clock.add("main-quantize", t0)
                # surface a failed job early rather than after the whole model
                while jobs and jobs[0].done():
                    jobs.popleft().result()
                while copies and copies[0].done():
                    copies.popleft().result()
            copies.extend(self._submit_copies(units[copied:]))  # those after the loop's last feed_copies
            t0 = time.perf_counter()
            if timeline is not None:
                timeline.mark("all groups issued")
            for job in [*jobs, *copies]:
                job.result()
            self.clock.add("main-drain", t0)
            if timeline is not None:
                timeline.mark("all written")
        finally:
            t0 = time.perf_counter()
            prefetcher.close()
            if startup is not None:
                profile.say(startup.summary())
            readahead.stop()
            self.readers.shutdown(wait=True, cancel_futures=True)
            self.copiers.shutdown(wait=True, cancel_futures=True)
            self.writers.shutdown(wait=True, cancel_futures=True)
            if self.cuda:
                torch.cuda.synchronize(self.opts.device)
                self._release_uploads(wait=True)
                self.inputs.close()
                self.outputs.close()
            self.bar.close()
            self.clock.add("close", t0)
            if timeline is not None:
                replays = f"  graph replays {self.graphs.replays}" if self.graphs is not None else ""
                profile.say(f"{self.clock.report()}  peak RSS {profile.peak_rss_mb():.0f} MB  "
                            f"buffers {self.inputs.count} x {self.inputs.size / 2**20:.0f} MiB{replays}")
                profile.say(timeline.report())
