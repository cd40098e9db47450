"""The GPU path's stages between the readers and the writers (pipeline.py runs them): a group's upload on
a copy stream, its quantization on a compute stream (alone, or a batch of same-structure groups,
batch.py), the download of the results into pinned output buffers on a third stream, and the writers'
side of each download. Nothing here waits for the device except the writers, on a download's event.

Split from pipeline.py (past 400 lines): the stream and event hand-offs are the part of the pipeline that
only a GPU runs; CPU tests drive them with streams and events stubbed (tests/test_buffer_pool.py).
"""

from __future__ import annotations

import time

import torch

from .batch import MAX_BATCH, Stacked, quantize_stacked_weights, structure
from .errors import in_context, working_on
from .host_buffers import BufferPool
from .host_outputs import (copy_packed, copy_stacked, group_flags, group_of, groups_per_copy, stacked_bytes,
                           stacked_group_bytes)
from .planning import Plan, Unit
from .quantize import quantize_group


def output_pool(plan: Plan, out_bytes: dict[str, int], host_buffer: int, min_count: int, batch_bytes: int,
                device: torch.device) -> BufferPool:
    """The pinned buffers downloads land in. A batch (MoE experts) downloads up to MAX_BATCH groups into
    one buffer (host_outputs.copy_stacked): slabs that hold them, within a quarter of the host budget,
    and as many as fill it; without batches, slabs of the largest member's outputs, ``min_count`` or more.
    A slab holds one batched group's outputs at least, whatever the budget: a copy of one group is the
    smallest a stacked download takes."""
    max_members = max((len(u.members) for u in plan.units), default=1)
    out_size = max(out_bytes.values(), default=1)
    batched = max((stacked_group_bytes(u.members) for u in plan.units
                   if u.members and batch_bytes and structure(u.members) is not None), default=0)
    slab = max(out_size, batched, min(MAX_BATCH * batched, host_buffer // 4))
    count = max(max_members + 1, min_count if slab == out_size else 0, host_buffer // slab)
    return BufferPool(count, slab, pin=device.type == "cuda", device=device)


class DeviceStages:
    """The device stages, as methods the pipeline's Converter inherits: they use its pools (``inputs``,
    ``outputs``), streams (``h2d``, ``compute``, ``d2h``), ``uploads`` queue, CUDA ``graphs``, plan, format
    and clock."""

    def _upload(self, weights: list[torch.Tensor], in_bufs) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        """Copy a step's weights (a group's, or a batch's stacked per member position) to the device on
        the copy stream; the host buffers go back once the copy is done (:meth:`_release_uploads`),
        not once the group is written: holding them through the writers' disk time starves the
        readers. No wait here."""
        with torch.cuda.stream(self.h2d):
            on_dev = [w.to(self.opts.device, non_blocking=True) for w in weights]
            uploaded = torch.cuda.Event()
            uploaded.record(self.h2d)
        self.uploads.append((uploaded, in_bufs))
        return on_dev, uploaded

    def _release_uploads(self, wait: bool = False) -> None:
        """Give back the host buffers of finished uploads (all of them, waiting, with ``wait``)."""
        while self.uploads and (wait or self.uploads[0][0].query()):
            uploaded, bufs = self.uploads.popleft()
            if wait:
                t0 = time.perf_counter()
                uploaded.synchronize()
                self.clock.add("main-wait-upload", t0)
            self.inputs.give(bufs)

    def _quantize_step(self, step: list[Unit], weights: list[torch.Tensor], in_bufs):
        """Upload and quantize a step without waiting: replayed from a CUDA graph where one fits
        (graphs.py), else eagerly. Returns (results, oks, done) for :meth:`_downloads`, and the graph
        instance or None, for :meth:`_downloaded`."""
        with working_on(step[0].first.path, step[0].first.name):  # a failed upload names a tensor too
            inst = self.graphs.instance(step, weights) if self.graphs is not None and len(step) > 1 else None
            if inst is None:
                return self._quantize_cuda(step, *self._upload(weights, in_bufs)), None
            uploaded, *quantized = self.graphs.replay(inst, weights, self.h2d, self.compute)
        self.uploads.append((uploaded, in_bufs))
        return quantized, inst

    def _downloaded(self, inst) -> None:
        """After a replayed step's downloads were issued: its graph may replay once they are done."""
        if inst is not None:
            inst.downloaded = torch.cuda.Event()
            inst.downloaded.record(self.d2h)

    def _quantize_cuda(self, step: list[Unit], on_dev: list[torch.Tensor], uploaded):
        """Quantize an uploaded step on the compute stream, without waiting: one group, or a batch
        (batch.schedule) whose member position ``i`` is ``on_dev[i]``, ``[G, out, in]``. Returns each
        group's results, the groups' device ``ok`` flags ([G] bool: finite input, usable scales) and the
        event that ends the compute."""
        dev = self.opts.device
        with working_on(step[0].first.path, step[0].first.name), torch.cuda.stream(self.compute):
            self.compute.wait_event(uploaded)
            for t in on_dev:
                t.record_stream(self.compute)
            groups = [u.members for u in step]
            if len(step) > 1:
                results = quantize_stacked_weights(groups, on_dev, self.plan.scales, dev, chunk=self.chunk)
            else:
                results = Stacked([quantize_group(groups[0], on_dev, self.plan.scales, dev, to_cpu=False,
                                                  chunk=self.chunk, check=False)])
            oks = group_flags(results.groups)
            self.requantized += sum(q.requantized for r in results.groups for q in r)  # host ints: no sync
            done = torch.cuda.Event()
            done.record(self.compute)
        return results, oks, done

    def _downloads(self, step: list[Unit], results: Stacked, oks, done):
        """Download the groups' outputs into pinned output buffers on the third stream, without waiting;
        yields the writer jobs, ``(writer method, *its arguments)``: one per group, or one per copy of
        several groups where the batch's tensors are stacked (host_outputs.copy_stacked).

        A generator, so that the caller hands each job to a writer before the next takes output
        buffers: a batch may need more of them than the pool holds, and taking them all first waited
        for ever on buffers only the not-yet-started writers give back (DeepSeek-V3's shapes on the
        H200 machine, before the pool carved small buffers from its slabs).
        """
        self.d2h.wait_event(done)
        with torch.cuda.stream(self.d2h):  # the flags first: each group's event below follows them
            oks_host = torch.empty(oks.shape, dtype=torch.bool, pin_memory=True)
            oks.record_stream(self.d2h)
            oks_host.copy_(oks, non_blocking=True)
        if results.tensors is not None:
            yield from self._download_stacked(step, results, oks_host)
            return
        for g, (u, res) in enumerate(zip(step, results.groups)):
            with working_on(u.first.path, u.first.name):
                t0 = time.perf_counter()
                out_bufs = self.outputs.take([self.out_bytes[m.module] for m in u.members])
                self.clock.add("main-wait-output", t0)
                host: list[dict[str, torch.Tensor]] = []
                with torch.cuda.stream(self.d2h):
                    for m, q, buf in zip(u.members, res, out_bufs):
                        host.append(self._download_member(m, q, buf))
                    downloaded = torch.cuda.Event()
                    downloaded.record(self.d2h)
            yield self._write_cuda, u, host, (downloaded, oks_host, g, out_bufs)

    def _download_stacked(self, units: list[Unit], results: Stacked, oks_host: torch.Tensor):
        """:meth:`_downloads` of a batch whose tensors are stacked: as many groups per host buffer as a
        slab holds, three copies per member position, one event and one writer job per buffer."""
        k = groups_per_copy(results.tensors, self.outputs.size)
        for start in range(0, len(units), k):
            stop = min(start + k, len(units))
            with working_on(units[start].first.path, units[start].first.name):
                t0 = time.perf_counter()
                buf, = self.outputs.take([stacked_bytes(results.tensors, stop - start)])
                self.clock.add("main-wait-output", t0)
                with torch.cuda.stream(self.d2h):
                    for kinds in results.tensors:
                        for t in kinds:
                            t.record_stream(self.d2h)
                    host = copy_stacked(results.tensors, start, stop, buf)
                    downloaded = torch.cuda.Event()
                    downloaded.record(self.d2h)
            in_scales = [results.groups[g][0].input_scale for g in range(start, stop)]
            yield self._write_stacked, units[start:stop], host, (downloaded, oks_host, start, buf, in_scales)

    def _download_member(self, m, q, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """One member's output tensors, those on the device copied into ``buf`` (on the current stream)."""
        pos, mine = 0, {}
        for name, t in self.fmt.quantized_tensors(m.module, q).items():
            if t.device.type != "cuda":  # e.g. an input_scale built on the CPU
                mine[name] = t
                continue
            t.record_stream(self.d2h)
            mine[name], pos = copy_packed(t, buf, pos)
        return mine

    @in_context
    def _write_cuda(self, unit: Unit, host, state) -> None:
        downloaded, oks_host, g, out_bufs = state
        try:
            t0 = time.perf_counter()
            downloaded.synchronize()
            self.clock.add("gpu-wait", t0)
            self._write_group(unit, host, bool(oks_host[g]))
        finally:
            self.outputs.give(out_bufs)

    def _write_stacked(self, units: list[Unit], host, state) -> None:
        """Write the groups of one stacked copy (:meth:`_download_stacked`), each as :meth:`_write_cuda`."""
        downloaded, oks_host, start, buf, in_scales = state
        try:
            with working_on(units[0].first.path, units[0].first.name):  # the wait names the copy's first group
                t0 = time.perf_counter()
                downloaded.synchronize()
                self.clock.add("gpu-wait", t0)
                oks = oks_host[start:start + len(units)].tolist()
            for j, unit in enumerate(units):
                with working_on(unit.first.path, unit.first.name):
                    tensors = [self.fmt.quantized_tensors(m.module, q)
                               for m, q in zip(unit.members, group_of(host, j, in_scales[j]))]
                    self._write_group(unit, tensors, oks[j])
        finally:
            self.outputs.give([buf])

