"""The Python API: what the ``shardconv`` command does, as functions that return results and raise
exceptions instead of printing lines and exit codes.

    import shardconv

    p = shardconv.plan("Qwen/Qwen3-8B", scales="max")          # the dry run: nothing is written
    print("\\n".join(shardconv.describe(p)))
    r = shardconv.convert("Qwen/Qwen3-8B", "qwen3-8b-nvfp4", scales="mse", device="cuda")
    print(r.out_bytes, r.seconds, r.warnings)
    report = shardconv.verify("qwen3-8b-nvfp4", source="Qwen/Qwen3-8B")
    assert report.ok, report.problems

Every failure the user can cause raises a :class:`~shardconv.errors.ShardconvError` subclass
(``SourceError``, ``AmaxError``, ``DestinationError``, ``OptionError``, ``QuantizationError``) whose
message is one line naming the file and tensor. Notes and warnings go to the ``shardconv`` logger
while the run goes (the CLI prints them) and into the result. torch is imported on the first call,
not with the package. The command line (cli.py) is a thin layer over these functions.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .errors import OptionError

if TYPE_CHECKING:
    from .planning import Plan
    from .verification import Report

log = logging.getLogger("shardconv")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
SCALES = ("max", "amax", "mse", "four-over-six", "cast")
FORMATS = ("modelopt", "compressed-tensors")
EXPORT_ROUNDINGS = ("cpu", "cuda")
# CPU quantizing rates, parameters per second per thread, measured on the 2-core development VM
# (README, Performance: 0.375 G parameters in 36.5 s with mse and 8.6 s with max, 2 threads); used
# only to say what a long CPU run will cost before it starts
CPU_PARAMS_PER_THREAD = {"mse": 5e6, "four-over-six": 10e6, "max": 22e6, "amax": 22e6, "cast": 22e6}
LONG_CPU_RUN = 60.0  # seconds: a CPU run expected to last longer gets its estimate printed first


def parse_size(value: int | str, what: str = "size", zero: bool = False) -> int:
    """Bytes from ``512MB``, ``5GB``, ``2GiB`` or an int (``0`` only where ``zero``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _UNITS:
            raise OptionError(f"{what}: not a size: {value!r} (e.g. 5GB, 500MB, 2GiB)")
        size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size < 0 or (size == 0 and not zero):
        raise OptionError(f"{what}: must be positive: {value!r}")
    return size


@dataclass
class ConvertResult:
    """What :func:`convert` wrote: counts, sizes, time and the things worth knowing."""

    dst: Path
    source: Path  # the folder read (a hub snapshot for a repo id)
    revision: str | None  # the hub commit converted, for a repo id
    shards: list[str]
    quantized: int
    kept: int
    in_bytes: int
    out_bytes: int
    seconds: float
    device: str
    resumed: int = 0  # output shards kept from an interrupted run
    converted_bytes: int = 0  # input bytes converted by this run (all of them unless resumed)
    already_complete: bool = False  # DST already held this finished conversion: no shard was written
    changed_sources: list[str] = field(default_factory=list)  # since the interrupted run (rewritten)
    gpu_peak: int | None = None  # bytes
    synthesized_amax: list[str] = field(default_factory=list)  # uncalibrated experts given made-up amax
    requantized_blocks: int | None = None  # scales "cast": MXFP4 blocks requantized (None: no cast)
    mxfp4_blocks: int = 0  # scales "cast": MXFP4 blocks of the quantized weights
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rank: int = 0  # of a run on several processes (distributed.py): rank 0's result is the whole run's
    world_size: int = 1

    def lines(self) -> list[str]:
        """The summary the command prints."""
        if self.already_complete:
            return [f"already complete: {self.dst} holds this conversion ({len(self.shards)} shards, "
                    f"{self.out_bytes / 1e9:.3f} GB, shard digests checked); no shard was written"]
        lines = [
            f"source             {self.source}" + (f"  (revision {self.revision})" if self.revision else ""),
            f"tensors quantized  {self.quantized}",
            f"tensors kept       {self.kept}",
            f"bytes in           {self.in_bytes / 1e9:.3f} GB",
            f"bytes out          {self.out_bytes / 1e9:.3f} GB  ({len(self.shards)} shards"
            + (f", {self.resumed} kept from an interrupted run)" if self.resumed else ")"),
            f"compression        {self.in_bytes / max(self.out_bytes, 1):.2f}x",
            # the rate of what this run read: on a resume, the rest of the model, not all of it
            f"time               {self.seconds:.1f} s  ({self.converted_bytes / max(self.seconds, 1e-9) / 1e9:.2f} "
            f"GB/s of input{' converted by this run' if self.resumed else ''}, {self.device})",
        ]
        if self.changed_sources:
            lines.append(f"source changed     {', '.join(self.changed_sources)} (since the interrupted run: "
                         "what was made from it was written again)")
        if self.gpu_peak is not None:
            lines.append(f"peak GPU memory    {self.gpu_peak / 1e9:.2f} GB")
        if self.synthesized_amax:
            lines.append(f"synthesized amax for {len(self.synthesized_amax)} expert modules "
                         f"(see {self.dst / 'shardconv-report.json'})")
        if self.requantized_blocks is not None:
            lines.append(f"MXFP4 cast         {self.requantized_blocks} of {self.mxfp4_blocks} blocks requantized "
                         "(exponent below NVFP4's scale range), the rest cast exactly"
                         + (" (in the shards this run wrote)" if self.resumed else ""))
        return lines

    def to_dict(self) -> dict:
        """JSON-ready (``shardconv convert --json``)."""
        d = asdict(self)
        d["dst"], d["source"] = str(self.dst), str(self.source)
        return d


def _check_choice(value: str | None, choices: Sequence[str], what: str) -> None:
    if value is not None and value not in choices:
        raise OptionError(f"{what} {value!r}: choose from {', '.join(choices)}")


def _plan(src, scales, amax, format, exclude, max_shard_size, revision, trust_remote_code, strict,
          warnings: list[str], strict_amax: bool = False, recipe: str | None = None,
          format_for: Sequence[str] = (), speculate: bool = False):
    """(plan, amax identity for the fingerprint, replan). ``speculate``: while the Linear-detection
    helper is still working, the plan is the name rules' and ``replan()`` makes the model's
    (speculation.py); else ``replan`` is None."""
    from . import identity, linears
    from .errors import ShardconvError
    from .linears_helper import plain_view
    from .amax import load_amax
    from .formats import get_format
    from .module_rules import unmatched_excludes
    from .planning import build_plan
    from .recipes import parse as parse_recipe
    from .source import open_source

    _check_choice(scales, SCALES, "scales")
    _check_choice(format, FORMATS, "format")
    exclude = list(exclude)
    mix = parse_recipe(recipe, list(format_for))
    source = open_source(str(src), revision=revision)
    # the amax file's content, not its mtime, goes into the run's fingerprint (identity.py)
    amax_file, amax_id = identity.read_whole(Path(amax), load_amax) if amax is not None else (None, None)

    def build(found=None, build_model=True):
        return build_plan(source, get_format(format), excludes=exclude, amax=amax_file, scales=scales,
                          max_shard_size=parse_size(max_shard_size, "max_shard_size"),
                          trust_remote_code=trust_remote_code, strict_amax=strict_amax, recipe=mix, linears=found,
                          build_model=build_model)

    p = replan = None
    if speculate and linears.pending(trust_remote_code):
        known = linears.by_layout(source, plain_view(source), trust_remote_code)  # ends the helper: not needed
        try:
            p = build(known or linears.by_names(source, "the model's answer was not in yet"))
            if known is None:
                replan = lambda build_model=True: build(build_model=build_model)  # noqa: E731
        except ShardconvError:  # refused by the name rules: the model's plan decides
            p = None
    if p is None:
        p = build()
    unmatched = [("--exclude", p) for p in unmatched_excludes(source, exclude)]
    unmatched += [("--format-for", f"{p}={f}") for (p, f) in mix.rules if unmatched_excludes(source, [p])]
    for option, pattern in unmatched:
        message = f"{option} {pattern!r} matches no module of {source.root}"
        if strict:
            raise OptionError(message + " (--strict makes this an error)")
        warnings.append(message)
        log.warning(message)
    return p, amax_id, replan


def plan(src: str | Path, *, scales: str | None = None, amax: str | Path | None = None, format: str = "modelopt",
         exclude: Sequence[str] = (), max_shard_size: int | str = "5GB", revision: str | None = None,
         trust_remote_code: bool = False, strict: bool = False, strict_amax: bool = False,
         recipe: str | None = None, format_for: Sequence[str] = ()) -> "Plan":
    """Decide everything about a conversion from headers alone and write nothing (the dry run).

    Args:
        src: a checkpoint folder or a Hugging Face hub repo id.
        scales: ``"max"``, ``"mse"``, ``"four-over-six"``, ``"amax"`` or ``"cast"`` (default: ``"amax"``
            when ``amax`` holds weight amax, else ``"cast"`` for an MXFP4 source, else ``"mse"``).
        amax: a saved ModelOpt amax file (``.pt`` or ``.safetensors``).
        format: ``"modelopt"`` or ``"compressed-tensors"``.
        exclude: module-name globs kept in source precision (one that matches nothing is a warning).
        max_shard_size: largest output shard, in bytes or as ``"5GB"``.
        revision: the hub revision (branch, tag or commit) of a repo id.
        trust_remote_code: let transformers run the checkpoint's own model code to find its Linears.
        strict: an ``exclude`` pattern that matches nothing raises OptionError.
        strict_amax: an expert the amax file has no (or a zero) amax for raises AmaxError instead of
            being given synthesized amax (uncalibrated.py; listed in ``DST/shardconv-report.json``).

    Returns:
        the :class:`~shardconv.planning.Plan` (``quantized``, ``excluded``, ``groups``, ``shard_names``,
        ``out_bytes``, ``quant_algo``, ``notes``); :func:`describe` turns it into the dry-run report.
    """
    return _plan(src, scales, amax, format, exclude, max_shard_size, revision, trust_remote_code, strict, [],
                 strict_amax, recipe, format_for)[0]


def describe(p: "Plan") -> list[str]:
    """The dry-run report of a plan, one string per line."""
    from .report import describe as lines

    return lines(p)


def default_dst(p: "Plan | str") -> Path:
    """Where a conversion goes when no DST is given: ``<name>-NVFP4`` in the working folder, ``name``
    being the folder's name, or the repo's for a hub id (not the snapshot's hash). Takes a plan, or
    the model's name (the CLI asks before planning, for the start-up read-ahead)."""
    return Path(f"{p if isinstance(p, str) else p.source.name}-NVFP4")


def cpu_estimate(p: "Plan", threads: int) -> float:
    """Seconds a CPU conversion of ``p`` should take at :data:`CPU_PARAMS_PER_THREAD` (compute only)."""
    params = sum(math.prod(m.shape) for m in p.quantized)  # encoded weights: their plain shape
    return params / (CPU_PARAMS_PER_THREAD.get(p.scales, 22e6) * max(1, threads))


def convert(src: str | Path, dst: str | Path | None = None, *, scales: str | None = None,
            amax: str | Path | None = None, format: str = "modelopt", exclude: Sequence[str] = (),
            device: str = "auto", max_shard_size: int | str = "5GB", export_rounding: str = "cpu",
            overwrite: bool = False, fsync: bool = False, progress: bool = False, readers: int | None = None,
            writers: int | None = None,
            host_buffer: int | str = "1GiB", gpu_buffer: int | str = "4GiB", prefetch: int | str = 0,
            threads: int | None = None, revision: str | None = None, trust_remote_code: bool = False,
            max_extra_size: int | str = "1GiB", strict: bool = False, strict_amax: bool = False,
            recipe: str | None = None, format_for: Sequence[str] = (), rank: int | None = None,
            world_size: int | None = None) -> ConvertResult:
    """Convert ``src`` into an NVFP4 checkpoint in ``dst``, resuming an interrupted run of the same
    conversion; return what was written.

    Args:
        src: a checkpoint folder or a Hugging Face hub repo id (never written to).
        dst: the output folder (empty or absent, or holding a run of the same conversion); default
            ``<name>-NVFP4`` in the working folder.
        scales, amax, format, exclude, max_shard_size, revision, trust_remote_code, strict, strict_amax:
            as for :func:`plan`.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        export_rounding: ``"cpu"`` or ``"cuda"``: the bytes of a ModelOpt export run on that device kind.
        overwrite: replace a previous output in ``dst`` whole.
        fsync: flush every shard before recording it (a resume after a power loss then trusts it).
        progress: a progress bar on stderr.
        readers, writers: I/O threads (default: threads.io_threads(), from the cores).
        host_buffer, gpu_buffer, prefetch: pipeline sizes (README, Command line).
        threads: torch's CPU threads when quantizing on the CPU (default: the cores this process may
            use less the load other processes put on them).
        max_extra_size: largest total of SRC's other files (tokenizer, code) copied to ``dst``.
        rank, world_size: this process's share of a run on several processes (distributed.py), every
            rank calling with the same arguments; default one process (the command line reads
            torchrun's ``RANK`` and ``WORLD_SIZE``; this function does not, so a training script under
            torchrun that converts on one rank does not wait for the others).

    Raises:
        ShardconvError: a subclass naming the file and tensor at fault; ``dst`` then holds no finished
            checkpoint (only finished shards and the journal, for a resume).
    """
    import contextlib

    from . import distributed, numerics, ranks
    from .destination import is_empty
    from .formats import get_format
    from .speculation import Mismatch, Speculation
    from .conversion import convert as run_conversion
    from .pipeline import Options
    from .quantize import pick_device, set_cpu_threads

    _check_choice(export_rounding, EXPORT_ROUNDINGS, "export_rounding")
    for name, n in (("readers", readers), ("writers", writers)):  # 0 meant "auto", -5 one thread: silently
        if n is not None and (type(n) is not int or n < 1):
            raise OptionError(f"{name}: must be a whole number of at least 1, not {n!r}")
    rank, world_size = ranks.world_from(rank, world_size, environ=False)
    world = ranks.World(rank, world_size) if world_size > 1 else None
    import torch

    warnings: list[str] = []
    previous = numerics.EXPORT_ROUNDING
    threads_before = torch.get_num_threads()  # a notebook's torch keeps its own setting after the call
    numerics.set_export_rounding(export_rounding)
    stack = contextlib.ExitStack()  # the ranks' gloo group, when several
    try:
        if world is not None:
            stack.enter_context(world)

        def prepare():  # on every rank of several, with one answer if any fails (no rank waits for it)
            p, amax_id, replan = _plan(src, scales, amax, format, exclude, max_shard_size, revision,
                                       trust_remote_code, strict, warnings, strict_amax, recipe, format_for,
                                       speculate=world is None)
            return p, amax_id, replan, pick_device(device if world is None else world.device_choice(device))

        p, amax_id, replan, dev = world.agree("to plan", prepare) if world else prepare()
        out = Path(dst) if dst is not None else default_dst(p)
        fmt = get_format(format)
        extra = {"amax": amax_id} if amax_id else {}
        speculation = None
        if replan is not None:
            if not out.exists() or out.is_dir() and is_empty(out):  # nothing there to resume or replace
                speculation = Speculation(p, replan, fmt, extra)
            else:
                p = replan()  # a resume or --overwrite plans once, with the model's answer
        for note in p.notes:
            log.info(note)
        if dev.type == "cpu":
            n = set_cpu_threads(threads if world is None else world.cpu_threads(threads))
            seconds = cpu_estimate(p, n)
            if seconds > LONG_CPU_RUN and p.quantized:
                note = (f"on the CPU, --scales {p.scales} should take about {seconds / 60:.0f} min here ({n} threads); "
                        f"--scales max about {cpu_estimate_as(p, 'max', n) / 60:.0f} min, a GPU (--device cuda) far less")
                p.notes.append(note)
                log.info(note)
        opts = Options(device=dev, readers=readers, writers=writers, host_buffer=parse_size(host_buffer, "host_buffer"),
                       gpu_buffer=parse_size(gpu_buffer, "gpu_buffer"), progress=progress, fsync=fsync,
                       prefetch=parse_size(prefetch, "prefetch", zero=True))
        how = dict(fmt=fmt, opts=opts, overwrite=overwrite, fingerprint_extra=extra,
                   max_extra_size=parse_size(max_extra_size, "max_extra_size"))
        if world is not None:
            summary = distributed.convert(world, p, out, **how)
        elif speculation is None:
            summary = run_conversion(p, out, **how)
        else:
            try:
                summary = run_conversion(p, out, speculation=speculation, **how)
                p.linears, p.excluded = speculation.confirmed.linears, speculation.confirmed.excluded
            except Mismatch as e:  # nothing of the first run is left in DST
                note = (f"the model's Linear layers gave another plan than the name rules ({e.what}): "
                        "converted again with it")
                log.info(note)
                for extra_note in (n for n in e.plan.notes if n not in p.notes):
                    log.info(extra_note)
                e.plan.notes += [n for n in p.notes if n not in e.plan.notes] + [note]  # e.g. the CPU estimate
                p = e.plan
                summary = run_conversion(p, out, **how)
    finally:
        stack.close()
        numerics.set_export_rounding(previous)
        torch.set_num_threads(threads_before)
    # MXFP4 blocks (16 bytes of codes each) the cast covers: none unless an MXFP4 weight is quantized
    cast_blocks = sum(m.encoded.data.nbytes // 16 for m in p.quantized if m.encoded is not None) \
        if p.scales == "cast" else 0
    return ConvertResult(
        dst=out, source=p.source.root, revision=p.source.revision, shards=list(p.shard_names),
        quantized=summary.quantized, kept=summary.kept, in_bytes=summary.in_bytes, out_bytes=summary.out_bytes,
        seconds=summary.seconds, device=summary.device, resumed=summary.resumed,
        converted_bytes=summary.converted_bytes, already_complete=summary.already_complete,
        changed_sources=list(summary.changed_sources), gpu_peak=summary.gpu_peak,
        synthesized_amax=[s.module for s in p.synthesized], notes=list(p.notes),
        requantized_blocks=summary.requantized if cast_blocks and summary.requantized is not None else None,
        mxfp4_blocks=cast_blocks, warnings=warnings, rank=rank, world_size=world_size)


def cpu_estimate_as(p: "Plan", scales: str, threads: int) -> float:
    """:func:`cpu_estimate` had ``p`` used ``scales``."""
    from dataclasses import replace

    return cpu_estimate(replace(p, scales=scales), threads)


def verify(dst: str | Path, source: str | Path | None = None, *, max_error: float = 0.5, scales: str | None = None,
           amax: str | Path | None = None, export_rounding: str | None = None, recompute: bool = True) -> "Report":
    """Check a converted checkpoint without a GPU and without loading it whole.

    With ``source``, kept tensors are compared, each weight's reconstruction error is bounded by
    ``max_error`` and (``recompute``) every fusion group is quantized again and must match bit for bit
    (``scales``, ``amax``, ``export_rounding``: how DST was made; default: the journal's, else tried).

    Returns a :class:`~shardconv.verification.Report` (``ok``, ``problems``, ``warnings``, ``info``,
    ``errors``). Raises ShardconvError only for usage errors (``dst`` is no folder, ``source`` or
    ``amax`` cannot be read).
    """
    from .verification import verify as run_verify

    if source is None and (scales or amax or export_rounding):
        raise OptionError("scales, amax and export_rounding need a source to recompute from")
    return run_verify(dst, None if source is None else str(source), max_error=max_error, scales=scales,
                      amax=None if amax is None else str(amax), export_rounding=export_rounding, recompute=recompute)
