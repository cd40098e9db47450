"""One conversion run: DST checked and locked, the journal read (resume) or started, the streaming
pipeline (pipeline.py) over the shards still to write, then SRC's other files, the config files and,
last, the index. A failed run keeps its finished shards, recorded with their digests in the journal,
so that the same command resumes it; it removes everything else it wrote. A run on the name rules'
plan (speculation.py) that fails before the model's plan confirmed it keeps nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import destination, identity, journal, kernels, numerics, profile, readahead, sweep, uncalibrated
from .errors import DestinationError
from .files import INDEX_NAME, REPORT_NAME, write_json
from .pipeline import Converter, Options
from .planning import Plan, check_quantizes
from .shard_writer import file_size


@dataclass
class Summary:
    """What a run did (api.ConvertResult adds the source, notes and warnings and says it in lines)."""

    quantized: int
    kept: int
    in_bytes: int
    out_bytes: int
    seconds: float
    shards: int
    device: str
    gpu_peak: int | None = None  # bytes
    resumed: int = 0  # output shards kept from an interrupted run
    changed_sources: tuple[str, ...] = ()  # source shards changed since the interrupted run (their output rewritten)
    converted_bytes: int = 0  # input bytes this run converted (less than in_bytes on a resume)
    already_complete: bool = False  # DST held this finished conversion: no shard was written
    requantized: int | None = 0  # scales "cast": MXFP4 blocks outside the lossless window, in the shards this run wrote (None: several ranks)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _convert_locked(plan: Plan, dst: Path, fmt, opts: Options, overwrite: bool, run: str,
                    extras: list[tuple[Path, int]], configs: dict[str, dict], created_dir: bool,
                    sources: list, fingerprint_extra: dict | None,
                    team=None, speculation=None) -> tuple[set[int], dict[str, str], bool, int | None]:
    """The run, with DST locked; returns the indices of the shards kept from an interrupted run, the
    source shards changed since it (identity.py), whether DST already held this finished run, and the
    MXFP4 blocks the cast requantized (pipeline.Converter.requantized; None with several ranks, whose
    converters run in other processes). ``team`` (distributed.Team, rank 0 of several) shares the
    shards out and collects the others'. ``speculation`` (speculation.py): ``plan`` is the name rules'
    plan, checked against the model's before anything but shards is written."""
    src = plan.source.root
    destination.no_rank_still_writing(dst)  # before anything here is pruned, by any run
    destination.check_contents(dst, overwrite)  # again: it may have changed before the lock was taken
    old = journal.fold_ranks(dst, journal.Journal.read(dst))  # shards a failed distributed run's ranks finished
    if speculation is not None and (old is not None or overwrite and not destination.is_empty(dst)):
        speculation.confirm()  # DST gained a run before the lock: nothing there is touched on an unconfirmed plan
    if old is not None and old.get("fingerprint") != run and not overwrite:
        amax = (fingerprint_extra or {}).get("amax")
        what = ("the amax file's content differs" if amax and old.get("extra", {}).get("amax") not in (None, amax)
                else "other source, options or version")
        raise DestinationError(f"{dst}: holds a run of a different conversion ({what}); use --overwrite to replace it")
    resume = old is not None and old.get("fingerprint") == run and not overwrite
    # Order matters for a kill at any point: the index (the "finished" mark) goes first, so it never
    # stands beside missing shards (clear removes it first); then this run's journal, before anything
    # else is written, so a DST that is not empty always says what it holds and the same command
    # resumes it.
    if overwrite:
        destination.clear(dst, src)  # the previous output goes whole: no stale file of another model
    elif resume:
        destination.prune(dst, {journal.NAME, INDEX_NAME, *plan.shard_names, *configs,
                                *(rel.as_posix() for rel, _ in extras)}, src)
    log = journal.Journal(dst, run, synced=opts.fsync, sources=[f.to_json() for f in sources],
                          method={"scales": plan.scales, "export_rounding": numerics.EXPORT_ROUNDING},
                          extra=fingerprint_extra)
    changed: dict[str, str] = {}
    if resume:
        changed = identity.changed_since(old.get("sources"), sources)
        kept = log.adopt(old, plan, dst, stale=identity.dependent_shards(plan, set(changed)))
    else:
        try:
            log.save()
        except OSError as e:
            if destination.disk_full(e) is None:
                raise
            needed = plan.out_bytes + sum(size for _, size in extras)
            raise DestinationError(destination.disk_full_message(e, e, dst, needed)) from None
        kept = set()
    keep = {plan.shard_names[i] for i in kept}
    if len(kept) < len(plan.shard_names):
        (dst / INDEX_NAME).unlink(missing_ok=True)
    for path in [*dst.glob("*.safetensors"), *dst.glob("*.partial")]:
        if path.name not in keep:
            path.unlink(missing_ok=True)
    written: list[Path] = []
    # a finished run of the same conversion, every shard still verified: nothing to convert again
    done = bool(resume and old.get("complete")) and len(kept) == len(plan.shard_names)
    if team is not None:
        team.share(kept, done)  # the other ranks start on their shards now
    converter = None if done or team is not None else Converter(
        plan, dst, fmt, opts, log, kept, check=speculation.check if speculation is not None else None)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if team is not None:
            # rank 0's own shards, then every rank's recorded in the journal
            team.run(lambda: None if done else Converter(plan, dst, fmt, opts, log, team.not_mine(kept)), log)
        elif converter is not None:
            profile.python_profile(converter.run)
        if speculation is not None:
            speculation.confirm()  # the model's plan is this one, or nothing but shards was written
        for rel, _ in extras:
            destination.make_dirs(dst, rel.parent)
            written.append(dst / rel)
            destination.copy_regular(src / rel, dst / rel)
        for name, content in configs.items():
            written.append(dst / name)
            write_json(dst / name, content)
        identity.check_unchanged(plan.source, sources)  # a source written meanwhile: no index
        weight_map = {t.name: plan.shard_names[s] for s, ts in enumerate(plan.shard_tensors) for t in ts}
        index = {"metadata": {"total_size": plan.out_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(dst / INDEX_NAME, index)  # last: its presence marks a finished checkpoint
        log.finish()
    except BaseException as e:
        if converter is not None:
            converter.shards.abort()
        for path in written:
            path.unlink(missing_ok=True)
        if speculation is not None and speculation.confirmed is None:
            # shards of a plan the model refuted, or had not confirmed yet: none is kept for a resume,
            # whose plan could differ (shards kept from an earlier run imply a confirmed plan: above)
            for name in set(log.shards) - keep:
                (dst / name).unlink(missing_ok=True)
                log.shards.pop(name, None)
        # nothing worth resuming: leave DST as we found it; not with several ranks, which may still be
        # writing there (the journal then lets the next run, or --overwrite, take DST over)
        if not log.shards and team is None:
            (dst / journal.NAME).unlink(missing_ok=True)
            if created_dir:
                shutil.rmtree(dst, ignore_errors=True)
        full = destination.disk_full(e)
        if full is not None:
            done = sum(file_size(plan.shard_tensors[i]) for i, name in enumerate(plan.shard_names) if name in log.shards)
            needed = plan.out_bytes - done + sum(size for _, size in extras)
            raise DestinationError(destination.disk_full_message(e, full, dst, needed)) from None
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return kept, changed, done, (None if team is not None else converter.requantized if converter is not None else 0)


def convert(plan: Plan, dst: Path, *, fmt, opts: Options | None = None, overwrite: bool = False,
            device: torch.device | None = None, progress: bool | None = None,
            fingerprint_extra: dict | None = None, max_extra_size: int = destination.DEFAULT_MAX_EXTRA,
            team=None, speculation=None) -> Summary:
    """Write the planned checkpoint into ``dst``, resuming an interrupted run of the same plan.

    Everything that can be refused (DST's identity and contents, SRC's other files) is checked
    before DST is touched; then DST is locked (destination.py) for the rest of the run.
    ``speculation``: see :func:`_convert_locked` (raises its Mismatch or the helper's refusal)."""
    opts = opts or Options()
    if device is not None:
        opts.device = device
    if progress is not None:
        opts.progress = progress
    check_quantizes(plan)
    if opts.device.type == "cuda" and plan.scales in sweep.METHODS + ("cast",) and plan.quantized:
        first = plan.quantized[0]  # the dtype the kernels will see first (an encoded weight's: bf16)
        kernels.warm_up(plan.scales, opts.device, first.weight.torch_dtype if first.encoded is None else torch.bfloat16)
    if profile.ENABLED:
        if opts.device.type == "cuda":
            torch.zeros(1, device=opts.device)
        profile.say(f"ready to convert {profile.process_age():.1f} s after process start (imports, CUDA, plan)")
        profile.say(readahead.describe())
    src = plan.source.root
    dst = Path(dst)
    destination.check_destination(src, dst, overwrite)
    extras = destination.extra_files(src, max_extra_size)
    configs = fmt.config_files(plan, plan.source.config)
    made_up = uncalibrated.report(plan)
    if made_up is not None:  # written with the configs: resume keeps it, --overwrite replaces it
        configs[REPORT_NAME] = made_up
    sources = identity.identify_source(plan.source)  # before anything is read for the conversion
    run = journal.fingerprint(plan, fingerprint_extra)
    created_dir = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    lock = destination.DstLock(dst)
    try:
        lock.acquire()
        start = time.perf_counter()
        kept, changed, done, requantized = _convert_locked(plan, dst, fmt, opts, overwrite, run, extras, configs,
                                                           created_dir, sources, fingerprint_extra, team,
                                                           speculation)
    finally:
        lock.release()
        if created_dir:  # a run that failed before writing anything leaves no empty folder behind
            try:
                os.rmdir(dst)
            except OSError:  # not empty (finished, or finished shards kept), or already removed
                pass
    profile.say(f"done {profile.process_age():.1f} s after process start")
    return Summary(
        quantized=len(plan.quantized),
        kept=sum(1 for u in plan.units if u.copy is not None),
        in_bytes=plan.in_bytes,
        out_bytes=plan.out_bytes,
        seconds=time.perf_counter() - start,
        shards=len(plan.shard_names),
        device=str(opts.device),
        resumed=len(kept),
        changed_sources=tuple(sorted(changed)),
        converted_bytes=sum(u.in_bytes for u in plan.units if u.shard not in kept),
        already_complete=done,
        requantized=requantized,
        gpu_peak=torch.cuda.max_memory_reserved(opts.device) if opts.device.type == "cuda" else None,
    )
