"""``shardconv convert --batch JOBS``: many models, in one process or across ranks.

A queue of models converted overnight should not stop at the first bad one, nor leave the user to
read a hundred summaries. JOBS is ``.jsonl`` (one JSON object per line) or ``.yaml``/``.yml`` (a
list of mappings); each job names ``src`` and optionally ``dst`` and any option of
:func:`shardconv.api.convert` (``scales``, ``max_shard_size``, ``recipe``, ...; dashes or underscores),
which override the command's own options. Paths are taken as the command line takes them (relative
to the working folder). The whole file is checked before anything is converted: an unknown option,
a flag that is not true/false, a format, scales, recipe or rounding that does not exist, a thread
count that is no positive whole number, a size that is none, a missing ``src`` or two jobs with one
DST refuse the batch.

Across ranks (torchrun, ``--rank/--world-size``) each rank converts whole models, assigned largest
input first onto the least-loaded rank (ranks.assign), each model on one process with the
ordinary single-process conversion (its own DST lock and journal, so a re-run resumes each model).
Every job is tried; rank 0 prints one summary once every rank is done, and every rank exits 1 if
any job failed (0 if none did).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .api import EXPORT_ROUNDINGS, FORMATS, SCALES, parse_size
from .errors import OptionError
from .recipes import RECIPES

# options a job may set: api.convert's keyword arguments (a test keeps them equal), the command's too;
# src and dst are the job's own. Those of planning first (api.plan takes them as well).
PLAN_OPTIONS = ("scales", "amax", "format", "exclude", "max_shard_size", "revision", "trust_remote_code", "strict",
                "strict_amax", "recipe", "format_for")
OPTIONS = (*PLAN_OPTIONS, "device", "export_rounding", "overwrite", "fsync", "readers", "writers", "host_buffer",
           "gpu_buffer", "prefetch", "threads", "max_extra_size")
_FLAGS = ("overwrite", "fsync", "trust_remote_code", "strict", "strict_amax")
_CHOICES = {"format": FORMATS, "export_rounding": EXPORT_ROUNDINGS, "recipe": tuple(RECIPES), "scales": SCALES}
_COUNTS = ("readers", "writers", "threads")  # positive whole numbers
_SIZES = {"max_shard_size": False, "host_buffer": False, "gpu_buffer": False, "prefetch": True,
          "max_extra_size": False}  # sizes (5GB, 512MiB or bytes); True: 0 allowed
_STRINGS = ("amax", "revision", "device")


def command_options(args) -> dict:
    """The api.convert options the command line gives (parsed ``args``): one place for the single
    conversion and each job's defaults, so an option added to one is not lost in the other."""
    return {k: getattr(args, k) for k in OPTIONS}


@dataclass
class JobResult:
    """One job's outcome, as rank 0 reports it."""

    index: int  # 1-based, the job's place in JOBS
    src: str
    dst: str
    rank: int
    ok: bool
    error: str | None = None
    seconds: float = 0.0
    out_bytes: int = 0
    resumed: int = 0
    already_complete: bool = False


def load(path: str | Path) -> list[dict]:
    """The jobs of ``path``, checked; each a dict of ``src``, ``dst`` (or None) and options."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise OptionError(f"{path}: cannot read the jobs file: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise OptionError(f"{path}: not a text file") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise OptionError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write the jobs as .jsonl") from None
        try:
            docs = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise OptionError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(docs, list):
            raise OptionError(f"{path}: a YAML jobs file is a list of jobs (- src: ...)")
        entries = [(f"job {i + 1}", doc) for i, doc in enumerate(docs)]
    else:
        entries = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                entries.append((f"line {n}", json.loads(line)))
            except ValueError as e:
                raise OptionError(f"{path}: line {n}: not a JSON object: {e}") from None
    jobs = [_check(path, where, doc) for where, doc in entries]
    if not jobs:
        raise OptionError(f"{path}: no jobs")
    seen: dict[Path, str] = {}
    for (where, _), job in zip(entries, jobs):
        try:
            Path(job["src"]).expanduser()
            dst = _dst_of(job)
        except (OSError, RuntimeError) as e:  # e.g. ~nosuchuser, a name too long for the file system
            raise OptionError(f"{path}: {where}: cannot resolve its paths: {e}") from None
        if dst in seen:
            raise OptionError(f"{path}: {where}: DST {dst} is also {seen[dst]}'s: each job needs its own")
        seen[dst] = where
    return jobs


def _check(path: Path, where: str, doc) -> dict:
    if not isinstance(doc, dict):
        raise OptionError(f"{path}: {where}: a job is an object with src (and dst, options)")
    job = {str(k).replace("-", "_"): v for k, v in doc.items()}
    unknown = sorted(set(job) - {"src", "dst", *OPTIONS})
    if unknown:
        raise OptionError(f"{path}: {where}: unknown option {unknown[0]!r} (options: src, dst, {', '.join(OPTIONS)})")
    if not isinstance(job.get("src"), str) or not job["src"]:
        raise OptionError(f"{path}: {where}: no src (a checkpoint folder or hub repo id)")
    if job.get("dst") is not None and not isinstance(job["dst"], str):
        raise OptionError(f"{path}: {where}: dst must be a path")
    for key in ("exclude", "format_for"):
        if isinstance(job.get(key), str):
            job[key] = [job[key]]
        if key in job and not (isinstance(job[key], list) and all(isinstance(p, str) for p in job[key])):
            raise OptionError(f"{path}: {where}: {key} must be a pattern or a list of patterns")
    for key in _FLAGS:  # "false" is a true string: refused, not taken as true
        if key in job and not isinstance(job[key], bool):
            raise OptionError(f"{path}: {where}: {key} must be true or false, not {job[key]!r}")
    for key, choices in _CHOICES.items():
        if job.get(key) is not None and job[key] not in choices:
            raise OptionError(f"{path}: {where}: {key} must be one of {', '.join(choices)}, not {job[key]!r}")
    for key in _COUNTS:  # "4" or -1 failed later as "a shardconv bug", or was taken silently
        if job.get(key) is not None and not (type(job[key]) is int and job[key] > 0):
            raise OptionError(f"{path}: {where}: {key} must be a positive whole number, not {job[key]!r}")
    for key, zero in _SIZES.items():
        if job.get(key) is not None:
            if isinstance(job[key], bool) or not isinstance(job[key], (int, str)):
                raise OptionError(f"{path}: {where}: {key} must be a size (e.g. 5GB), not {job[key]!r}")
            try:
                parse_size(job[key], key, zero=zero)
            except OptionError as e:
                raise OptionError(f"{path}: {where}: {e}") from None
    for key in _STRINGS:
        if job.get(key) is not None and not (isinstance(job[key], str) and job[key]):
            raise OptionError(f"{path}: {where}: {key} must be a string, not {job[key]!r}")
    return job


def _dst_of(job: dict) -> Path:
    from .api import default_dst

    if job.get("dst"):  # resolved: a link or a/../a is the same DST
        return Path(os.path.realpath(Path(job["dst"]).expanduser()))
    src = Path(job["src"]).expanduser()
    name = src.resolve().name if src.exists() else job["src"].rstrip("/").split("/")[-1]
    return Path(os.path.realpath(default_dst(name)))


def input_bytes(src: str) -> int:
    """A model's safetensors bytes on disk (0 for a hub id not downloaded): the assignment's weight."""
    root = Path(src).expanduser()
    try:
        return sum(p.stat().st_size for p in root.glob("*.safetensors")) if root.is_dir() else 0
    except OSError:
        return 0


def run(jobs: list[dict], defaults: dict, rank: int = 0, size: int = 1) -> list[JobResult]:
    """Convert this rank's jobs (all of them for one process); never raises for a failed job."""
    from . import api
    from .ranks import assign, cause

    mine = sorted(assign([input_bytes(j["src"]) for j in jobs], size)[rank])
    results = []
    for i in mine:
        job = jobs[i]
        options = {**defaults, **{k: v for k, v in job.items() if k in OPTIONS}}
        dst = job.get("dst")
        start = time.perf_counter()
        try:
            r = api.convert(job["src"], dst, rank=0, world_size=1, **options)
            results.append(JobResult(i + 1, job["src"], str(r.dst), rank, True, seconds=r.seconds,
                                     out_bytes=r.out_bytes, resumed=r.resumed, already_complete=r.already_complete))
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - one job's failure, the others still run
            results.append(JobResult(i + 1, job["src"], str(_dst_of(job)), rank, False, cause(e),
                                     seconds=time.perf_counter() - start))
    return results


def summary(results: list[JobResult], jobs_file: str) -> list[str]:
    failed = [r for r in results if not r.ok]
    lines = [f"batch {jobs_file}: {len(results)} jobs, {len(results) - len(failed)} finished, {len(failed)} failed"]
    for r in sorted(results, key=lambda r: r.index):
        if r.ok:
            what = "already complete" if r.already_complete else (
                f"{r.out_bytes / 1e9:.3f} GB, {r.seconds:.1f} s" + (f", {r.resumed} shards resumed" if r.resumed else ""))
            lines.append(f"  ok      job {r.index}: {r.dst}  ({what}, rank {r.rank})")
        else:
            lines.append(f"  FAILED  job {r.index}: {r.src}: {r.error}")
    return lines


def run_cli(args, say, stderr) -> int:
    """``shardconv convert --batch JOBS``: 0 when every job finished, 1 when any failed, 2 for a bad
    JOBS file or options."""
    import sys

    from .ranks import World, world_from

    if args.src is not None or args.dst is not None:
        raise OptionError("--batch JOBS takes no SRC or DST: the jobs name them")
    if args.dry_run:
        raise OptionError("--dry-run does not take --batch: run it per model")
    jobs = load(args.batch)
    progress = not (args.no_progress or args.quiet or args.json) and sys.stderr.isatty()
    defaults = dict(command_options(args), progress=progress)
    rank, size = world_from(args.rank, args.world_size)
    if size == 1:
        results = run(jobs, defaults)
    else:
        with World(rank, size) as world:
            defaults["threads"] = world.cpu_threads(defaults["threads"])
            defaults["device"] = world.device_choice(defaults["device"])  # this rank's GPU
            mine = run(jobs, defaults, rank, size)
            results = [r for theirs in world.gather(mine) for r in theirs]
    failed = [r for r in results if not r.ok]
    if rank == 0:
        for r in sorted(failed, key=lambda r: r.index):
            stderr(f"shardconv: error: job {r.index} ({r.src}): {r.error}")
        if args.json:
            say(json.dumps({"ok": not failed, "jobs": [asdict(r) for r in sorted(results, key=lambda r: r.index)]}))
        elif not args.quiet:
            say(*summary(results, args.batch))
    return 1 if failed else 0
