"""The pipeline's host buffer pool: pinned buffers are registered on a thread while the first is in use."""

import threading

import pytest
import torch

from shardconv import host_buffers


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
    pool = host_buffers.BufferPool(4, 64, pin=True)
    (first,) = pool.take(1, block=False)  # available at once, while the thread waits at the gate
    assert first.numel() == 64 and pool.take(1, block=False) is None
    gate.set()
    rest = pool.take(3)
    assert len(rest) == 3 and len(made) == 4
    pool.give([first, *rest])
    pool.close()
    assert len(pool.free) == 4


def test_a_failed_pinning_is_raised_not_waited_for(monkeypatch):
    fake_pinning(monkeypatch, fail_at=2)
    pool = host_buffers.BufferPool(4, 64, pin=True)
    with pytest.raises(MemoryError, match="pinned buffer"):
        pool.take(4)  # two buffers exist; without the error this would wait for ever
    pool.close()


def test_without_pinning_every_buffer_exists_at_once():
    pool = host_buffers.BufferPool(3, 32, pin=False)
    assert pool.filler is None and len(pool.take(3, block=False)) == 3
