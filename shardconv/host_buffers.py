"""Host staging for the pipeline: how many I/O threads, and the fixed pool of (pinned) buffers they fill.

Split from pipeline.py: sizing and pinning host memory is its own concern, tested alone
(tests/test_buffer_pool.py), and the pipeline only takes and gives buffers.
"""

from __future__ import annotations

import os
import threading

import torch


def io_threads(cores: int | None = None) -> tuple[int, int]:
    """Default (readers, writers): half and a quarter of the cores, 4-8 and 2-4.

    Measured on the H200 machine (16 cores, 70B slice in the page cache, README Performance): 4/2
    finished in 6.3 s, 8/4 in 4.3 s, 12/6 in 4.5 s, 16/8 in 4.4 s; more threads only contend for memory
    bandwidth. A small machine keeps 4/2: readers and writers mostly wait for the disk there.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, max(4, cores // 2)), min(4, max(2, cores // 4))


class BufferPool:
    """A fixed set of equal host buffers, taken several at a time (atomically, so no deadlock).

    With a GPU the buffers are page-locked, which costs ~0.1 s per 448 MiB buffer (1.1 s for a
    70B model's pools on the H200 machine, before the first group could be read); a thread pins
    them one by one while the first ones are already in use.
    """

    def __init__(self, count: int, size: int, pin: bool, device: torch.device | None = None):
        self.size = size
        self.error: BaseException | None = None  # the pinning thread's failure, raised by take()
        self.registered: list[torch.Tensor] = []
        self.count = count
        self.cond = threading.Condition()
        self.free: list[torch.Tensor] = []
        self.filler = None
        if pin and count > 1:
            self.free.append(self._allocate(size, pin))
            self.filler = threading.Thread(target=self._fill, args=(count - 1, size, device), daemon=True,
                                           name="shardconv-pin")
            self.filler.start()
        else:
            self.free = [self._allocate(size, pin) for _ in range(count)]

    def _fill(self, n: int, size: int, device: torch.device | None) -> None:
        try:
            if device is not None and device.index is not None:
                torch.cuda.set_device(device)  # register in the pipeline's device context
            for _ in range(n):
                self.give([self._allocate(size, True)])
        except BaseException as e:  # e.g. out of host memory: take() must not wait for ever
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def _allocate(self, size: int, pin: bool) -> torch.Tensor:
        """Plain memory, page-locked in place with cudaHostRegister when a GPU is used.

        ``pin_memory=True`` would round every buffer up to a power of two (PyTorch's caching host
        allocator), up to doubling the resident set.
        """
        t = torch.empty(size, dtype=torch.uint8)
        if pin:
            if torch.cuda.cudart().cudaHostRegister(t.data_ptr(), size, 0) == 0:
                with self.cond:
                    self.registered.append(t)
            else:
                t = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return t

    def close(self) -> None:
        if self.filler is not None:
            self.filler.join()
        for t in self.registered:
            torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
        self.registered.clear()

    def take(self, n: int, block: bool = True) -> list[torch.Tensor] | None:
        if n > self.count:
            raise RuntimeError(f"a unit needs {n} buffers but the pool has {self.count}")
        with self.cond:
            while len(self.free) < n:
                if self.error is not None:
                    raise self.error
                if not block:
                    return None
                self.cond.wait()
            taken, self.free = self.free[:n], self.free[n:]
            return taken

    def give(self, buffers: list[torch.Tensor]) -> None:
        with self.cond:
            self.free.extend(buffers)
            self.cond.notify_all()
