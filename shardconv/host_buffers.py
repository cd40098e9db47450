"""Host staging for the pipeline: the fixed pool of (pinned) slabs, carved into the buffers the
readers fill and the downloads land in.

Split from pipeline.py: sizing and pinning host memory is its own concern, tested alone
(tests/test_buffer_pool.py), and the pipeline only takes and gives buffers.
"""

from __future__ import annotations

import threading

import torch


# Buffers carved from a slab start at multiples of this from the slab's start (the slab itself is as
# aligned as the allocator makes it, 64 bytes; host_outputs.OUTPUT_ALIGN packs outputs at 64).
ALIGN = 4096


def aligned(n: int) -> int:
    """The bytes a buffer of ``n`` bytes takes from a slab."""
    return max(ALIGN, (n + ALIGN - 1) // ALIGN * ALIGN)


def _address(buf: torch.Tensor) -> int:
    """Where a buffer starts, also for an empty one (whose ``data_ptr()`` is 0)."""
    return buf.untyped_storage().data_ptr() + buf.storage_offset()


class BufferPool:
    """A fixed set of equal host slabs, carved in order into buffers of the sizes asked for.

    Why carved: the slabs are sized for the largest tensor (DeepSeek-V3's dense layer-0 MLP weight,
    252 MiB), so a pool of whole slabs held only 4 of its 29 MB expert weights at a time and the readers
    waited for buffers (README Performance). Buffers are cut from the open slab one after the other;
    the next slab is opened when one does not fit, and a slab is reused once every buffer cut from it
    is given back. A take is atomic (all of its buffers, or none and it waits), and needs at most one
    slab per buffer: a pool of ``count`` slabs serves any take of up to ``count`` buffers once the
    others are given back.

    With a GPU the slabs are page-locked, which costs ~0.1 s per 448 MiB (1.1 s for a 70B model's
    pools on the H200 machine, before the first group could be read); a thread pins them one by one
    while the first ones are already in use.
    """

    def __init__(self, count: int, size: int, pin: bool, device: torch.device | None = None):
        self.size = size = aligned(size)
        self.error: BaseException | None = None  # the pinning thread's failure, raised by take()
        self.registered: list[torch.Tensor] = []
        self.count = count
        self.cond = threading.Condition()
        self.free: list[torch.Tensor] = []  # whole slabs, nothing cut from them in use
        self._open: torch.Tensor | None = None  # the slab buffers are being cut from
        self._used = 0  # bytes of the open slab cut so far
        self._live: dict[int, int] = {}  # slab data_ptr -> buffers cut from it not yet given back
        self._slab_of: dict[int, torch.Tensor] = {}  # buffer address (_address) -> its slab
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
                slab = self._allocate(size, True)
                with self.cond:
                    self.free.append(slab)
                    self.cond.notify_all()
        except BaseException as e:  # e.g. out of host memory: take() must not wait for ever
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def _allocate(self, size: int, pin: bool) -> torch.Tensor:
        """Plain memory, page-locked in place with cudaHostRegister when a GPU is used.

        ``pin_memory=True`` would round every slab up to a power of two (PyTorch's caching host
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

    @property
    def idle(self) -> bool:
        """Every buffer ever taken was given back."""
        with self.cond:
            return not any(self._live.values())

    def _places(self, sizes: list[int]) -> list[tuple[int, int]] | None:
        """Where each buffer would be cut: (slab: -1 the open one, else an index into ``free``, offset);
        None when the free slabs do not suffice now."""
        places, slab, used = [], -1, self._used
        room = self._open is not None
        for n in sizes:
            if not room or used + n > self.size:
                slab, used, room = slab + 1, 0, True
                if slab >= len(self.free):
                    return None
            places.append((slab, used))
            used += n
        return places

    def take(self, sizes: list[int], block: bool = True) -> list[torch.Tensor] | None:
        """Buffers of ``sizes`` bytes each (uint8), or None where ``block`` is False and they would wait."""
        wanted = [aligned(n) for n in sizes]
        if len(wanted) > self.count or any(n > self.size for n in wanted):
            raise RuntimeError(f"a unit needs buffers of {sizes} bytes but the pool has {self.count} slabs of "
                               f"{self.size} bytes")
        with self.cond:
            while (places := self._places(wanted)) is None:
                if self.error is not None:
                    raise self.error
                if not block:
                    return None
                self.cond.wait()
            opened = sorted({slab for slab, _ in places if slab >= 0})
            old, slabs = self._open, {-1: self._open, **{i: self.free[i] for i in opened}}
            self.free = [s for i, s in enumerate(self.free) if i not in set(opened)]
            out = []
            for (slab, offset), n, asked in zip(places, wanted, sizes):
                whole = slabs[slab]
                buf = whole[offset:offset + asked]
                key = whole.data_ptr()
                self._live[key] = self._live.get(key, 0) + 1
                self._slab_of[_address(buf)] = whole
                self._used = offset + n  # the last buffer is cut from the slab left open
                out.append(buf)
            if opened:  # the old open slab is closed: free again now if nothing cut from it is in use
                if old is not None and not self._live.get(old.data_ptr()):
                    self.free.append(old)
                self._open = slabs[opened[-1]]
            return out

    def give(self, buffers: list[torch.Tensor]) -> None:
        with self.cond:
            for buf in buffers:
                slab = self._slab_of.pop(_address(buf))
                key = slab.data_ptr()
                self._live[key] -= 1
                if self._live[key]:
                    continue
                if slab is self._open:
                    self._used = 0  # nothing cut from it is in use: cut again from its start
                else:
                    self.free.append(slab)
            self.cond.notify_all()
