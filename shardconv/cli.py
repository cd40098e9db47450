"""``shardconv`` command line: ``shardconv convert SRC DST [options]``.

Every failure the user can cause ends in one line on stderr and a non-zero exit.

The entry point and what each subcommand does; what the command line accepts is in cli_args.py, what
it prints (and how a broken stdout is survived) in cli_output.py.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
from pathlib import Path

from . import linears_helper, readahead
from .cli_args import build_parser
from .cli_output import error_line, note, route_logging, say, stderr_line
from .errors import OptionError, ShardconvError

SAMPLE_DST = "shardconv-sample-NVFP4"


def _verify(args) -> int:
    from . import api
    from .verification import DEFAULT_MAX_ERROR, MAX_REPORTED, error_table

    max_error = DEFAULT_MAX_ERROR if args.max_error is None else args.max_error
    if args.source is None and (args.scales or args.amax or args.export_rounding or args.no_recompute):
        raise OptionError("--scales, --amax, --export-rounding and --no-recompute need --source SRC")
    report = api.verify(args.dst, args.source, max_error=max_error, scales=args.scales, amax=args.amax,
                        export_rounding=args.export_rounding, recompute=not args.no_recompute)
    if args.json:
        say(json.dumps({"ok": report.ok, "problems": report.problems, "warnings": report.warnings,
                        "info": report.info, "errors": [{"module": m, "shape": list(shape), "rel_error": e}
                                                        for m, shape, e in report.errors]}))
    elif not args.quiet:
        say(*report.info, *error_table(report, args.top))
        say(*(f"warning: {w}" for w in report.warnings))
    for problem in report.problems[:MAX_REPORTED]:
        stderr_line(f"shardconv: verify: {problem}")
    if len(report.problems) > MAX_REPORTED:
        stderr_line(f"shardconv: verify: ... and {len(report.problems) - MAX_REPORTED} more problems")
    if not args.json:
        say(f"verify: {'PASS' if report.ok else f'FAIL ({len(report.problems)} problems)'}")
    return 0 if report.ok else 1


def _start_cuda(device: str) -> None:
    import torch

    try:
        if torch.cuda.is_available():
            torch.zeros(1, device="cuda" if device == "auto" else device)
    except Exception:  # pick_device reports a bad --device later, in the main thread
        pass


def _convert(args) -> int:
    from . import api

    if args.batch is not None:
        from .jobs import run_cli as run_batch

        return run_batch(args, say, stderr_line)
    src, dst, overwrite = args.src, args.dst, args.overwrite
    if not args.dry_run and args.device != "cpu":  # CUDA's start-up (a second or more) overlaps planning
        threading.Thread(target=_start_cuda, args=(args.device,), daemon=True).start()
    tmp = None
    if src is None:
        from .synth import sample_checkpoint

        tmp = tempfile.TemporaryDirectory(prefix="shardconv-sample-")
        src = str(sample_checkpoint(Path(tmp.name) / "sample"))
        note(f"no model given: converting the built-in sample checkpoint ({src})")
        if dst is None:
            dst, overwrite = SAMPLE_DST, True
    from .jobs import PLAN_OPTIONS, command_options

    options = dict(command_options(args), overwrite=overwrite)
    common = {k: options[k] for k in PLAN_OPTIONS}
    try:
        if args.dry_run or args.verbose:
            plan = api.plan(src, **common)
            if args.dry_run:
                if args.json:
                    say(json.dumps(_plan_json(plan)))
                else:
                    say(*api.describe(plan))
                return 0
            say(*api.describe(plan))
        # a bar only where someone watches it: stderr a terminal, and no machine-read output
        progress = not (args.no_progress or args.quiet or args.json) and sys.stderr.isatty()
        from .ranks import world_from

        rank, world_size = world_from(args.rank, args.world_size)  # the flags, else torchrun's RANK, WORLD_SIZE
        result = api.convert(src, dst, progress=progress, rank=rank, world_size=world_size, **options)
        if result.rank > 0:  # rank 0 says what the whole run did
            if not (args.quiet or args.json):
                say(f"rank {result.rank} of {result.world_size}: its shards of {result.dst} written "
                    f"({result.converted_bytes / 1e9:.3f} GB of input, {result.seconds:.1f} s); rank 0 prints the summary")
            return 0
        if args.json:
            say(json.dumps(result.to_dict()))
        elif not args.quiet:
            say(f"wrote {result.dst}", *result.lines())
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()


def _plan_json(plan) -> dict:
    return {"source": str(plan.source.root), "revision": plan.source.revision, "scales": plan.scales,
            "quant_algo": plan.quant_algo, "format": plan.format_name, "kv_cache": plan.kv_cache,
            "quantized": [m.module for m in plan.quantized], "excluded": dict(plan.excluded),
            "exclude_list": plan.exclude_list(), "shards": list(plan.shard_names), "in_bytes": plan.in_bytes,
            "out_bytes": plan.out_bytes, "notes": list(plan.notes), "describe": _describe_lines(plan),
            "synthesized_amax": [s.to_json() for s in plan.synthesized]}


def _describe_lines(plan) -> list[str]:
    from .report import describe

    return describe(plan)


def _start_linears_helper(args):
    """Find the Linear layers in a helper process while this one imports torch (linears_helper.py)."""
    helper = linears_helper.start(args.src, args.trust_remote_code)
    if helper is not None:
        linears_helper.use(helper)
    return helper


def _start_readahead(args) -> None:
    """Read the input from now on, a window ahead of the pipeline's readers (readahead.py); not on a
    resume, whose first shards may already be done, nor where DST is refused anyway."""
    from .destination import is_empty

    if args.dry_run or not args.src or args.batch is not None:
        return
    if args.world_size is not None and args.world_size > 1 or os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        return  # each rank reads only its share
    from .api import default_dst

    dst = Path(args.dst) if args.dst else default_dst(Path(args.src).expanduser().resolve().name)
    try:
        if dst.is_dir() and not is_empty(dst) and not args.overwrite:
            return
    except OSError:  # DST unreadable: refused later, with its own message
        return
    readahead.start(args.src, args.readahead)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    route_logging(args)
    helper = None
    try:
        if args.command == "convert":
            _start_readahead(args)
            helper = _start_linears_helper(args)
            return _convert(args)
        if args.command == "verify":
            return _verify(args)
    except ShardconvError as e:
        error_line(str(e), e)
        return 2
    except OSError as e:  # the disk, not the input: e.g. DST filled up while config files were written
        where = f"{e.filename}: " if e.filename else ""
        error_line(f"{where}{e.strerror or e}", e)
        return 2
    except KeyboardInterrupt:
        try:
            print("shardconv: interrupted; finished shards were kept: run the same command again to resume",
                  file=sys.stderr)
        except (OSError, ValueError):
            pass
        return 130
    except Exception as e:  # a bug: still one line, and the traceback on request
        from .errors import unexpected

        error_line(unexpected(e), e)
        return 2
    finally:
        readahead.stop()  # a failed or finished run reads no further
        if helper is not None:
            linears_helper.stop(helper)
    return 1


def run() -> None:
    """The command line entry point: :func:`main`, then exit without the interpreter's teardown.

    Every file is closed by then; tearing down CUDA, the pinned buffers and torch's modules took over
    a second on the H200 machine and writes nothing.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: the conversion's result stands
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
