"""The processes of a run on several ranks (torchrun, Slurm, ``--rank/--world-size``): who this
process is, the gloo group they talk through (small Python objects only, never tensors), one step
that fails on every rank when it fails on any, and the assignment of work to ranks.

Used by distributed.py (one conversion's shards) and jobs.py (a batch's models).
"""

from __future__ import annotations

import os
from datetime import timedelta

from .errors import OptionError, ShardconvError, describe

DEFAULT_TIMEOUT = 7 * 24 * 3600.0  # seconds a rank waits for the others in one step
JOIN_TIMEOUT = 600.0  # seconds the ranks wait for each other to start


class RankError(ShardconvError):
    """A rank of a distributed run failed; every rank raises it with the same line."""


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise OptionError(f"{name}={value!r}: not an integer") from None


def world_from(rank: int | None = None, world_size: int | None = None, environ: bool = True) -> tuple[int, int]:
    """(rank, world size) from the arguments, else (``environ``: the command line) torchrun's or a Slurm
    user's ``RANK``/``WORLD_SIZE``; one process when neither says."""
    size = world_size if world_size is not None or not environ else _int_env("WORLD_SIZE")
    size = 1 if size is None else size
    r = rank if rank is not None or not environ else _int_env("RANK")
    r = 0 if r is None else r
    if size < 1:
        raise OptionError(f"--world-size {size}: must be at least 1")
    if not 0 <= r < size:
        raise OptionError(f"--rank {r}: must be in 0..{size - 1} for --world-size {size}")
    return r, size


def cause(error: BaseException) -> str:
    """One line for a failure, as the CLI would print it."""
    if isinstance(error, ShardconvError):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror or error}"
    return f"unexpected {describe(error)}"


class World:
    """This process's place in a distributed run, and the gloo group the ranks talk through."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size
        self.local_rank = _int_env("LOCAL_RANK") or 0
        self.local_size = _int_env("LOCAL_WORLD_SIZE") or 1
        self.group = None
        self.own_init = False

    def __enter__(self) -> "World":
        import torch.distributed as dist

        if dist.is_initialized():  # a caller's torchrun script that set up its own group
            if dist.get_world_size() != self.size or dist.get_rank() != self.rank:
                raise OptionError(f"rank {self.rank} of {self.size} asked, but torch.distributed is already "
                                  f"rank {dist.get_rank()} of {dist.get_world_size()}")
        else:
            missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
            if missing:
                raise OptionError(f"a run on {self.size} ranks needs {' and '.join(missing)} (rank 0's host and a "
                                  "free port; torchrun sets them)")
            try:
                dist.init_process_group("gloo", init_method="env://", rank=self.rank, world_size=self.size,
                                        timeout=timedelta(seconds=JOIN_TIMEOUT))
            except Exception as e:
                raise ShardconvError(f"rank {self.rank} of {self.size}: cannot join the other ranks at "
                                     f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: {describe(e)}") from e
            self.own_init = True
        # object collectives on the CPU, whatever the default group's backend, and patient: a rank may
        # convert for hours while another, done, waits
        try:
            seconds = float(os.environ.get("SHARDCONV_DIST_TIMEOUT") or DEFAULT_TIMEOUT)
        except ValueError:
            raise OptionError(f"SHARDCONV_DIST_TIMEOUT={os.environ['SHARDCONV_DIST_TIMEOUT']!r}: not a number of "
                              "seconds") from None
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=seconds))
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        if self.own_init and dist.is_initialized():
            dist.destroy_process_group()  # the default group and ours
        elif self.group is not None and dist.is_initialized():
            dist.destroy_process_group(self.group)  # the caller's group stays
        self.own_init, self.group = False, None

    def gather(self, status) -> list:
        """Every rank's ``status`` (any picklable object), on every rank."""
        import torch.distributed as dist

        out = [None] * self.size
        try:
            dist.all_gather_object(out, status, group=self.group)
        except Exception as e:  # a rank died (its connection closed) or the timeout passed
            raise RankError(f"rank {self.rank} of {self.size}: lost the other ranks ({describe(e)}); "
                            "finished shards were kept: run the same command again to resume") from e
        return out

    def agree(self, step: str, fn):
        """Run ``fn`` on every rank; if it fails on any, raise the same :class:`RankError` on all."""
        error, value = None, None
        try:
            value = fn()
        except BaseException as e:  # noqa: BLE001 - it is reported to every rank, then raised
            error = e
        self.check(self.gather(None if error is None else cause(error)), step, error)
        return value

    def check(self, statuses: list, step: str, mine: BaseException | None = None) -> None:
        """Raise :class:`RankError` naming the first rank whose status is an error (a string)."""
        failed = [(r, s) for r, s in enumerate(statuses) if isinstance(s, str)]
        if failed:
            r, text = failed[0]
            more = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
            raise RankError(f"rank {r} of {self.size} failed {step}{more}: {text}") from mine

    def device_choice(self, choice: str) -> str:
        """``--device`` of this rank: ``auto`` and ``cuda`` mean the GPU of ``LOCAL_RANK`` on its host."""
        import torch

        if choice in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return choice

    def cpu_threads(self, requested: int | None) -> int | None:
        """Ranks sharing a host share its cores (default torch threads: a share of the free ones)."""
        if requested is not None or self.local_size <= 1:
            return requested
        from .quantize import cpu_threads

        return max(1, cpu_threads(None) // self.local_size)


def assign(shard_bytes: list[int], size: int, skip=frozenset()) -> list[set[int]]:
    """The items (output shards, or a batch's models) of each rank, by their input bytes: largest
    first onto the least-loaded rank, ties by the lower index and the lower rank; ``skip``ped items
    (shards kept from an earlier run) go to nobody. A pure function of its arguments: every rank
    computes the same answer."""
    loads = [0] * size
    share: list[set[int]] = [set() for _ in range(size)]
    for s in sorted((s for s in range(len(shard_bytes)) if s not in skip), key=lambda s: (-shard_bytes[s], s)):
        r = min(range(size), key=lambda r: (loads[r], r))
        share[r].add(s)
        loads[r] += shard_bytes[s]
    return share
