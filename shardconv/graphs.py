"""A batch step's quantization replayed from a captured CUDA graph: one call on the main thread where
the eager batch makes ~150 (batch.quantize_stacked_weights).

Why: with the readers, writers and copiers busy, each torch call on the pipeline's main thread gives
the GIL up and waits to get it back, ~150 us. After batched steps (batch.schedule) the H200 machine's
Qwen3-MoE run still spent ~1.4 s of a ~2.6 s span issuing the batches' kernels (stop 22, sampled).

Only steps whose operations depend on nothing but shapes are captured: methods ``max``, ``mse`` and
``four-over-six`` with no input scale (an amax file's values differ per group), a batch of one
structure and size seen before (the first runs eagerly: Triton compiles there, not while capturing).
Each key has two instances that alternate, so one's inputs are filled while the other computes; an
instance's inputs are overwritten only once its last replay read them, and its outputs only once
they were downloaded (stream waits on events; only a capture waits for the device, once). The bytes are the eager batch's: the
graph replays its kernels (tests/test_gpu.py compares them with the CPU's). ``SHARDCONV_GRAPHS=0``
turns it off; a capture that fails turns it off for the rest of the run.

Memory: each capture keeps its own pool (its outputs and the batch's temporaries, which another
graph's replay must not reuse), counted as :data:`COST` times its inputs within ``budget``
(``--gpu-buffer``): on the H200 machine qwen3moe's four instances raised the peak GPU memory by 3.6 GB
(4.8 GB against 1.2 GB eager), 4.5 times their 0.79 GB of inputs.

Only on the process's current CUDA device: a capture on another (``cuda:1``, a rank's local GPU) was
found by review to record nothing, leaving replays to return stale outputs; the capture now runs in
its device's context, but no machine of several GPUs was at hand to test that, so there the batches
run eagerly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from .batch import Stacked, quantize_stacked_weights, structure
from .host_outputs import group_flags
from .planning import Unit
from .scales import input_scale

log = logging.getLogger("shardconv")
METHODS = ("max", "mse", "four-over-six")
INSTANCES = 2
COST = 5  # GPU bytes a captured instance holds, in multiples of its inputs' (module docstring)


@dataclass
class Captured:
    """One instance: its graph, static inputs (``[G, out, in]`` per member position) and outputs."""

    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    results: Stacked
    oks: torch.Tensor
    read: torch.cuda.Event | None = None  # its last replay ended: the inputs may be overwritten
    downloaded: torch.cuda.Event | None = None  # its outputs were copied out: it may replay again


def key_of(step: list[Unit], method: str) -> tuple | None:
    """What a graph is reused for, or None where a step cannot be replayed (see the module docstring)."""
    if method not in METHODS or len(step) < 2 or os.environ.get("SHARDCONV_GRAPHS") == "0":
        return None
    if any(input_scale(u.members) is not None for u in step):
        return None
    return structure(step[0].members), len(step)


class Graphs:
    """Captured instances by key, within ``budget`` bytes (:data:`COST` times their inputs)."""

    def __init__(self, device: torch.device, method: str, chunk: int | None, budget: int):
        self.device, self.method, self.chunk, self.budget = device, method, chunk, budget
        self.seen: dict[tuple, int] = {}
        self.instances: dict[tuple, list[Captured]] = {}
        # the current device only (module docstring); off for good once a capture failed
        self.enabled = device.type == "cuda" and device.index in (None, torch.cuda.current_device())
        self.held = 0  # bytes counted for the captured instances
        self.replays = 0

    def instance(self, step: list[Unit], weights: list[torch.Tensor]) -> Captured | None:
        """The instance to replay for ``step`` (capturing it the first times), or None: run it eagerly."""
        key = key_of(step, self.method) if self.enabled else None
        if key is None:
            return None
        self.seen[key] = self.seen.get(key, 0) + 1
        have = self.instances.setdefault(key, [])
        if self.seen[key] == 1:
            return None  # eager: compiles the Triton kernels outside a capture
        if len(have) < INSTANCES:
            cost = COST * sum(w.nbytes for w in weights)
            if self.held + cost > self.budget:
                return have[self.seen[key] % len(have)] if have else None
            try:
                have.append(self._capture(step, weights))
            except Exception as e:  # never fatal: the eager batch gives the same bytes
                log.info("a CUDA graph of %s could not be captured (%s): batches run eagerly", step[0].first.name, e)
                self.enabled = False
                torch.cuda.set_stream(torch.cuda.default_stream(self.device))  # a failed capture may leave its own
                return None
            self.held += cost
            return have[-1]
        return have[self.seen[key] % len(have)]

    def _capture(self, step: list[Unit], weights: list[torch.Tensor]) -> Captured:
        inputs = [torch.empty(w.shape, dtype=w.dtype, device=self.device) for w in weights]
        graph = torch.cuda.CUDAGraph()
        groups = [u.members for u in step]
        # thread_local: the writer threads wait on events and the pinning thread registers memory meanwhile
        with torch.cuda.device(self.device), torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device),
                                                                capture_error_mode="thread_local"):
            results = quantize_stacked_weights(groups, inputs, self.method, self.device, chunk=self.chunk)
            oks = group_flags(results.groups)
        return Captured(graph, inputs, results, oks)

    def replay(self, inst: Captured, weights: list[torch.Tensor], h2d, compute):
        """Upload ``weights`` into the instance's inputs on ``h2d`` and replay it on ``compute``, without
        waiting; returns (upload event, results, oks, compute event) as the eager path does."""
        with torch.cuda.stream(h2d):
            if inst.read is not None:
                h2d.wait_event(inst.read)
            for dst, w in zip(inst.inputs, weights):
                dst.copy_(w, non_blocking=True)
            uploaded = torch.cuda.Event()
            uploaded.record(h2d)
        with torch.cuda.stream(compute):
            compute.wait_event(uploaded)
            if inst.downloaded is not None:
                compute.wait_event(inst.downloaded)
            inst.graph.replay()
            done = torch.cuda.Event()
            done.record(compute)
        inst.read = done
        self.replays += 1
        return uploaded, inst.results, inst.oks, done
