"""The output shards of one plan, written by the pipeline's threads and recorded in the journal when done.

Split from pipeline.py: which shard is finished (every planned tensor written), and recording it with
its digest, is bookkeeping the pipeline's stages share; the bytes are shard_writer.ShardWriter's.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from . import journal
from .planning import Plan, Unit
from .shard_writer import SHARD_METADATA, ShardWriter


class Shards:
    """Output shard writers, opened on first use and finished when their last tensor is written."""

    def __init__(self, plan: Plan, dst: Path, log: journal.Journal | None = None, sync: bool = False):
        self.plan, self.dst, self.log, self.sync = plan, dst, log, sync
        self.writers: dict[int, ShardWriter] = {}
        self.remaining = [len(ts) for ts in plan.shard_tensors]
        self.lock = threading.Lock()

    def _writer(self, shard: int) -> ShardWriter:
        with self.lock:
            if shard not in self.writers:
                path = self.dst / self.plan.shard_names[shard]
                self.writers[shard] = ShardWriter(path, self.plan.shard_tensors[shard], SHARD_METADATA)
            return self.writers[shard]

    def _done(self, shard: int, n: int) -> None:
        with self.lock:
            self.remaining[shard] -= n
            last = self.remaining[shard] == 0
        if last:
            w = self.writers[shard]
            w.finish(sync=self.sync)
            if self.log is not None:
                self.log.record(w.path.name, w.digest)

    def write(self, shard: int, tensors: dict[str, torch.Tensor]) -> None:
        w = self._writer(shard)
        for name, t in tensors.items():
            w.write(name, t)
        self._done(shard, len(tensors))

    def copy(self, shard: int, unit: Unit, buffer: memoryview | None = None, start: int = 0,
             stop: int | None = None) -> None:
        w = self._writer(shard)
        if w.copy_from(unit.copy.name, unit.copy, buffer, start, stop):
            self._done(shard, 1)

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
