"""``shardconv`` command line: ``shardconv convert SRC DST [options]``.

Every failure the user can cause ends in one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path

from . import __version__, linears_helper, readahead
from .destination import DEFAULT_MAX_EXTRA
from .errors import OptionError, ShardconvError

SAMPLE_DST = "shardconv-sample-NVFP4"


def parse_size(text: str) -> int:
    """``--max-shard-size`` and friends: api.parse_size, reported the way argparse reports a bad value."""
    from .api import parse_size as parse

    try:
        return parse(text, "size")
    except OptionError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("size: ")) from None


def positive_int(text: str) -> int:
    """``--readers``, ``--writers``, ``--threads``: a whole number of at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return n


def parse_size_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else parse_size(text)


CONVERT_EXAMPLES = """examples:
  shardconv convert                                   # the built-in sample, into ./shardconv-sample-NVFP4
  shardconv convert Qwen/Qwen3-8B                     # a hub repo into ./Qwen3-8B-NVFP4 (mse scales)
  shardconv convert ./Llama-3.1-70B out/llama70b --scales max --device cuda:1
  shardconv convert ./model out --amax amax.pt        # re-export from a ModelOpt calibration's amax
  shardconv convert ./model out --exclude 'model.layers.0.*' --format compressed-tensors
  shardconv convert ./model --dry-run                 # what would be quantized, kept and written
  shardconv convert ./model out --json -q             # one JSON summary on stdout, nothing else

CPU threads: torch's, for quantizing, with --threads N (default: free cores); reading and copying, with
--readers N; writing and hashing, with --writers N (defaults from the cores).
Environment: SHARDCONV_DEBUG=1 (tracebacks), SHARDCONV_PROFILE=1 (stage times)."""

VERIFY_EXAMPLES = """examples:
  shardconv verify out/llama70b                       # headers, digests, scales, configs
  shardconv verify out/llama70b --source ./Llama-3.1-70B   # + kept tensors, errors, scales recomputed
  shardconv verify out/llama70b --json                # the report as JSON"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardconv", description="Convert Hugging Face checkpoints to NVFP4, one shard "
                                     "at a time.", epilog=CONVERT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"shardconv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert a checkpoint to NVFP4", epilog=CONVERT_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Convert SRC (a checkpoint folder or hub repo id) into an NVFP4 checkpoint in DST. "
                       "Without SRC, converts a small built-in sample checkpoint.")
    c.add_argument("--version", action="version", version=f"shardconv {__version__}")
    c.add_argument("src", nargs="?", help="checkpoint folder or hub repo id (default: a built-in sample)")
    c.add_argument("dst", nargs="?", help="output folder (must be empty; default: <name>-NVFP4 here)")
    c.add_argument("--amax", metavar="FILE", help="saved ModelOpt amax file (.pt or .safetensors)")
    c.add_argument("--scales", choices=("max", "amax", "mse", "four-over-six", "cast"), default=None,
                   help="weight scales: 'max' from the weights, 'amax' from --amax, 'mse' the FP8 scale sweep "
                   "(least squared error per block), 'four-over-six' per-block 6 or 4, 'cast' MXFP4 cast losslessly "
                   "from its exponents (default: amax when the file has weight amax, else cast for an MXFP4 "
                   "source, else mse)")
    c.add_argument("--exclude", metavar="PATTERN", action="append", default=[],
                   help="keep matching modules in source precision (glob over module names; repeatable)")
    c.add_argument("--format", default="modelopt", choices=("modelopt", "compressed-tensors"),
                   help="output layout: modelopt (ModelOpt's unified HF checkpoint) or compressed-tensors "
                   "(nvfp4-pack-quantized) (default: modelopt)")
    c.add_argument("--recipe", default=None, choices=("nvfp4", "nvfp4-experts-fp8"),
                   help="mixed precision: 'nvfp4-experts-fp8' quantizes MoE experts to NVFP4 and every other Linear "
                   "to FP8 (per-tensor, needs --amax with activation amax; modelopt format) (default: nvfp4)")
    c.add_argument("--format-for", metavar="PATTERN=FORMAT", action="append", default=[],
                   help="format of the modules matching PATTERN (glob over module names): nvfp4, fp8 or keep; "
                   "overrides --recipe, the last match wins (repeatable)")
    c.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    c.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"), metavar="SIZE",
                   help="largest output shard (default: 5GB)")
    c.add_argument("--export-rounding", choices=("cpu", "cuda"), default="cpu",
                   help="reproduce the bytes of a ModelOpt export that ran on this device kind: its scalar "
                   "divisions round differently on CUDA (default: cpu)")
    # the defaults repeat pipeline.Options' (a test keeps them equal): pipeline imports torch, which the
    # start-up read-ahead must not wait for
    c.add_argument("--readers", type=positive_int, default=None, metavar="N",
                   help="reader threads: input read, kept tensors copied (default: half the cores, 4 to 8)")
    c.add_argument("--writers", type=positive_int, default=None, metavar="N",
                   help="writer threads: output shards written and hashed (default: a quarter of the cores, 2 to 4)")
    c.add_argument("--host-buffer", type=parse_size, default=parse_size("1GiB"), metavar="SIZE",
                   help="host staging budget, pinned with a GPU: buffers the size of the largest weight, at least the "
                   "largest fusion group plus one (default: 1GiB)")
    c.add_argument("--gpu-buffer", type=parse_size, default=parse_size("4GiB"), metavar="SIZE",
                   help="GPU temporaries per quantize step (default: 4GiB)")
    c.add_argument("--prefetch", type=parse_size_or_zero, default=0, metavar="SIZE",
                   help="read input this far ahead of the readers into the page cache, on one more thread "
                   "(page cache, not process memory; default: 0, off)")
    c.add_argument("--readahead", type=parse_size_or_zero, default=None, metavar="SIZE",
                   help="input read into the page cache from the moment shardconv starts (imports, CUDA, planning) "
                   "to the last byte, at most this far ahead of the readers, so the disk does not idle (default: "
                   "1/4 of available memory, at most 32GiB; 0: off)")
    c.add_argument("--fsync", action="store_true",
                   help="flush each output shard to disk before recording it as finished (a resume after a power "
                   "loss then trusts it without re-hashing; costs write-back time at each shard)")
    c.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run the checkpoint's own model code (auto_map) to build its model on the "
                   "meta device and find its Linear layers (default: off; without it such a model's Linear layers "
                   "are found by name)")
    c.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    c.add_argument("--overwrite", action="store_true",
                   help="replace a previous output in DST whole (refused for a folder that holds no checkpoint)")
    c.add_argument("--max-extra-size", type=parse_size, default=DEFAULT_MAX_EXTRA, metavar="SIZE",
                   help="largest total size of SRC's other files copied to DST: tokenizer, templates, code "
                   "(default: 1GiB)")
    c.add_argument("--revision", metavar="REV", help="hub revision of a repo id: branch, tag or commit (default: main)")
    c.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch threads for quantizing on the CPU (default: the cores not already busy)")
    c.add_argument("--strict", action="store_true", help="an --exclude pattern that matches nothing is an error")
    c.add_argument("--strict-amax", action="store_true", help="refuse an amax file with no (or zero) amax for some "
                   "MoE experts (default: synthesize them and list them in DST/shardconv-report.json)")
    c.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is shown only when stderr is a terminal anyway)")
    c.add_argument("--rank", type=int, default=None, metavar="R",
                   help="this process's rank in a run on several processes (default: $RANK, as torchrun sets it)")
    c.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="processes sharing the run, each writing its share of the shards (default: $WORLD_SIZE, "
                   "else 1); rank 0's host and port in MASTER_ADDR and MASTER_PORT")
    c.add_argument("--batch", metavar="JOBS",
                   help="convert every model of JOBS (.jsonl: one JSON object per line with src, dst and options; "
                   "or .yaml: a list of them); the command's options are the defaults; across ranks, each rank "
                   "takes whole models")
    _output_options(c)
    v = sub.add_parser("verify", help="check a converted checkpoint (no GPU, never loaded whole)",
                       epilog=VERIFY_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Check DST (ModelOpt or compressed-tensors NVFP4): index and headers, journal "
                       "hashes, fusion-group scales, block scales, declared quantization, finite values, exclusion lists; "
                       "with --source, kept tensors, per-layer reconstruction error and every group recomputed bit "
                       "for bit. Exit status 0: pass, 1: problems found, 2: usage error.")
    v.add_argument("--version", action="version", version=f"shardconv {__version__}")
    v.add_argument("dst", help="converted checkpoint folder")
    v.add_argument("--source", metavar="SRC", help="the source checkpoint (folder or hub repo id) to compare against")
    v.add_argument("--max-error", type=float, default=None, metavar="X",
                   help="largest relative reconstruction error accepted with --source (default: 0.5)")
    v.add_argument("--top", type=int, default=20, metavar="N", help="rows of the error table (default: 20)")
    v.add_argument("--scales", choices=("max", "amax", "mse", "four-over-six", "cast"), default=None,
                   help="with --source: the scale method DST was converted with, for the bit-exact recomputation "
                   "(default: the journal's, else every method is tried per fusion group)")
    v.add_argument("--amax", metavar="FILE", help="with --source: the amax file DST was converted with (input_scale "
                   "and KV-cache scales are recomputed only from it; needed for --scales amax)")
    v.add_argument("--export-rounding", choices=("cpu", "cuda"), default=None,
                   help="with --source: the export rounding DST was made with (default: cpu, then cuda)")
    v.add_argument("--no-recompute", action="store_true",
                   help="with --source: skip the bit-exact recomputation of every group's scales and codes "
                   "(costs about a conversion on the CPU; the reconstruction error is still checked)")
    _output_options(v)
    return parser


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="print errors and warnings only")
    p.add_argument("-v", "--verbose", action="store_true", help="print more: the plan before converting")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the summary or report) "
                   "and nothing else there")


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
        _stderr(f"shardconv: verify: {problem}")
    if len(report.problems) > MAX_REPORTED:
        _stderr(f"shardconv: verify: ... and {len(report.problems) - MAX_REPORTED} more problems")
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

        return run_batch(args, say, _stderr)
    src, dst, overwrite = args.src, args.dst, args.overwrite
    if not args.dry_run and args.device != "cpu":  # CUDA's start-up (a second or more) overlaps planning
        threading.Thread(target=_start_cuda, args=(args.device,), daemon=True).start()
    tmp = None
    if src is None:
        from .synth import sample_checkpoint

        tmp = tempfile.TemporaryDirectory(prefix="shardconv-sample-")
        src = str(sample_checkpoint(Path(tmp.name) / "sample"))
        _note(f"no model given: converting the built-in sample checkpoint ({src})")
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


def say(*lines: str) -> None:
    """Print to stdout; a closed or broken stdout (``| head``, ``>&-``) loses the text, never the run."""
    try:
        if sys.stdout is not None and lines:
            print(*lines, sep="\n")
    except (OSError, ValueError):  # BrokenPipeError, EBADF, or "I/O operation on closed file"
        pass


def _stderr(line: str) -> None:
    try:
        if sys.stderr is not None:
            print(line, file=sys.stderr)
    except (OSError, ValueError):
        pass


_JSON_MODE = [False]


def _note(message: str) -> None:
    """A note: on stdout, unless stdout carries JSON (then stderr)."""
    (_stderr if _JSON_MODE[0] else say)(f"note: {message}")


def _warn(message: str) -> None:
    _stderr(f"shardconv: warning: {message}")


class _Printer(logging.Handler):
    """The ``shardconv`` logger's records as the CLI prints them: notes and warnings."""

    def emit(self, record: logging.LogRecord) -> None:
        (_warn if record.levelno >= logging.WARNING else _note)(record.getMessage())


def _logging(args) -> None:
    logger = logging.getLogger("shardconv")
    logger.handlers = [h for h in logger.handlers if not isinstance(h, _Printer)] + [_Printer()]
    logger.propagate = False
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    _JSON_MODE[0] = bool(getattr(args, "json", False))


def _error(message: str, error: BaseException | None = None) -> None:
    """One line on stderr; with SHARDCONV_DEBUG=1 the traceback that led to it first."""
    try:
        if error is not None and os.environ.get("SHARDCONV_DEBUG") == "1":
            import traceback

            traceback.print_exception(error.__cause__ or error, file=sys.stderr)
        print(f"shardconv: error: {' '.join(message.split())}", file=sys.stderr)
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _logging(args)
    helper = None
    try:
        if args.command == "convert":
            _start_readahead(args)
            helper = _start_linears_helper(args)
            return _convert(args)
        if args.command == "verify":
            return _verify(args)
    except ShardconvError as e:
        _error(str(e), e)
        return 2
    except OSError as e:  # the disk, not the input: e.g. DST filled up while config files were written
        where = f"{e.filename}: " if e.filename else ""
        _error(f"{where}{e.strerror or e}", e)
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

        _error(unexpected(e), e)
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
