"""kernels.warm_up / ready: the first Triton launch waits for a warm-up in progress, so Triton's JIT is
never used from two threads at once (the warm-up itself runs on the GPU machine only)."""

import threading
import time

from shardconv import kernels, sweep


def test_the_kernels_are_not_handed_out_while_a_warm_up_runs(monkeypatch):
    done = threading.Event()

    def warming():
        time.sleep(0.2)
        done.set()

    thread = threading.Thread(target=warming)
    monkeypatch.setattr(kernels, "_warming", thread)
    thread.start()

    class CudaWeight:
        is_cuda = True

    monkeypatch.delenv("SHARDCONV_SWEEP", raising=False)
    sweep._kernel(CudaWeight())  # None here (no Triton on the CPU machine), after the warm-up
    assert done.is_set()


def test_a_second_warm_up_starts_nothing(monkeypatch):
    sentinel = threading.Thread(target=lambda: None)
    monkeypatch.setattr(kernels, "_warming", sentinel)
    kernels.warm_up("mse", "cuda", None)
    assert kernels._warming is sentinel
