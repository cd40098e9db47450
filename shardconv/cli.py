"""``shardconv`` command line: ``shardconv convert SRC DST [options]``.

Every failure the user can cause ends in one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

from . import __version__
from .destination import DEFAULT_MAX_EXTRA
from .errors import ShardconvError

SAMPLE_DST = "shardconv-sample-NVFP4"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


def parse_size_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else parse_size(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardconv", description="Convert Hugging Face checkpoints to NVFP4, one shard at a time.")
    parser.add_argument("--version", action="version", version=f"shardconv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert a checkpoint to NVFP4",
                       description="Convert SRC (a checkpoint folder or hub repo id) into an NVFP4 checkpoint in DST. "
                       "Without SRC, converts a small built-in sample checkpoint.")
    c.add_argument("src", nargs="?", help="checkpoint folder or hub repo id (default: a built-in sample)")
    c.add_argument("dst", nargs="?", help="output folder (must be empty; default: <name>-NVFP4 here)")
    c.add_argument("--amax", metavar="FILE", help="saved ModelOpt amax file (.pt or .safetensors)")
    c.add_argument("--scales", choices=("max", "amax", "mse", "four-over-six"), default=None,
                   help="weight scales: 'max' from the weights, 'amax' from --amax, 'mse' the FP8 scale sweep "
                   "(least squared error per block), 'four-over-six' per-block 6 or 4 (default: amax when the "
                   "file has weight amax, else mse)")
    c.add_argument("--exclude", metavar="PATTERN", action="append", default=[],
                   help="keep matching modules in source precision (glob over module names; repeatable)")
    c.add_argument("--format", default="modelopt", choices=("modelopt", "compressed-tensors"),
                   help="output layout: modelopt (ModelOpt's unified HF checkpoint) or compressed-tensors "
                   "(nvfp4-pack-quantized) (default: modelopt)")
    c.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    c.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"), metavar="SIZE",
                   help="largest output shard (default: 5GB)")
    c.add_argument("--export-rounding", choices=("cpu", "cuda"), default="cpu",
                   help="reproduce the bytes of a ModelOpt export that ran on this device kind: its scalar "
                   "divisions round differently on CUDA (default: cpu)")
    # the defaults repeat pipeline.Options' (a test keeps them equal): pipeline imports torch, which the
    # start-up read-ahead must not wait for
    c.add_argument("--readers", type=int, default=4, metavar="N", help="reader threads (default: 4)")
    c.add_argument("--host-buffer", type=parse_size, default=parse_size("1GiB"), metavar="SIZE",
                   help="host staging budget, pinned with a GPU: buffers the size of the largest weight, at least the "
                   "largest fusion group plus one (default: 1GiB)")
    c.add_argument("--gpu-buffer", type=parse_size, default=parse_size("4GiB"), metavar="SIZE",
                   help="GPU temporaries per quantize step (default: 4GiB)")
    c.add_argument("--prefetch", type=parse_size_or_zero, default=0, metavar="SIZE",
                   help="read input this far ahead of the readers into the page cache, on one more thread "
                   "(page cache, not process memory; default: 0, off)")
    c.add_argument("--readahead", type=parse_size_or_zero, default=None, metavar="SIZE",
                   help="input read into the page cache while shardconv starts (imports, CUDA, planning), so the "
                   "disk does not idle then (default: 1/8 of available memory, at most 8GiB; 0: off)")
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
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    v = sub.add_parser("verify", help="check a converted checkpoint (no GPU, never loaded whole)",
                       description="Check DST (ModelOpt or compressed-tensors NVFP4): index and headers, journal "
                       "hashes, fusion-group scales, block scales, declared quantization, finite values, exclusion lists; "
                       "with --source, kept tensors, per-layer reconstruction error and every group recomputed bit "
                       "for bit. Exit status 0: pass, 1: problems found, 2: usage error.")
    v.add_argument("dst", help="converted checkpoint folder")
    v.add_argument("--source", metavar="SRC", help="the source checkpoint (folder or hub repo id) to compare against")
    v.add_argument("--max-error", type=float, default=None, metavar="X",
                   help="largest relative reconstruction error accepted with --source (default: 0.5)")
    v.add_argument("--top", type=int, default=20, metavar="N", help="rows of the error table (default: 20)")
    v.add_argument("--scales", choices=("max", "amax", "mse", "four-over-six"), default=None,
                   help="with --source: the scale method DST was converted with, for the bit-exact recomputation "
                   "(default: the journal's, else every method is tried per fusion group)")
    v.add_argument("--amax", metavar="FILE", help="with --source: the amax file DST was converted with (input_scale "
                   "and KV-cache scales are recomputed only from it; needed for --scales amax)")
    v.add_argument("--export-rounding", choices=("cpu", "cuda"), default=None,
                   help="with --source: the export rounding DST was made with (default: cpu, then cuda)")
    v.add_argument("--no-recompute", action="store_true",
                   help="with --source: skip the bit-exact recomputation of every group's scales and codes "
                   "(costs about a conversion on the CPU; the reconstruction error is still checked)")
    return parser


def _verify(args) -> int:
    from .verify import DEFAULT_MAX_ERROR, MAX_REPORTED, error_table, verify

    max_error = DEFAULT_MAX_ERROR if args.max_error is None else args.max_error
    if args.source is None and (args.scales or args.amax or args.export_rounding or args.no_recompute):
        raise ShardconvError("--scales, --amax, --export-rounding and --no-recompute need --source SRC")
    report = verify(args.dst, args.source, max_error=max_error, scales=args.scales, amax=args.amax,
                    export_rounding=args.export_rounding, recompute=not args.no_recompute)
    say(*report.info, *error_table(report, args.top))
    say(*(f"warning: {w}" for w in report.warnings))
    for problem in report.problems[:MAX_REPORTED]:
        print(f"shardconv: verify: {problem}", file=sys.stderr)
    if len(report.problems) > MAX_REPORTED:
        print(f"shardconv: verify: ... and {len(report.problems) - MAX_REPORTED} more problems", file=sys.stderr)
    say(f"verify: {'PASS' if report.ok else f'FAIL ({len(report.problems)} problems)'}")
    return 0 if report.ok else 1


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


_TESTED_MODEL_TYPES = {"llama", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss"}


def _family(plan) -> str:
    """What the plan found in this model family: MoE layout, shared experts, MLA, kept subtrees, FP8."""
    model_type = plan.source.config.get("model_type") or "?"
    names = [m.module for m in plan.quantized] + list(plan.excluded)
    found = []
    per_expert = {m.group(1) for n in names if (m := re.search(r"^(.*\.experts\.\d+)\.", n))}
    if per_expert:
        layers = {re.sub(r"\.\d+$", "", e) for e in per_expert}
        found.append(f"MoE, {len(per_expert)} per-expert MLPs in {len(layers)} layers")
    stacked = [m for m in plan.quantized if m.stacked]
    if stacked:
        found.append(f"{len(stacked)} stacked [E, in, out] expert tensors (ModelOpt's transposed layout)")
    if any(re.search(r"\.shared_experts?\.", n) for n in names):
        found.append("shared experts")
    if any(n.endswith("q_a_proj") or n.endswith("kv_a_proj_with_mqa") for n in names):
        found.append("MLA (q_a_proj + kv_a_proj_with_mqa grouped)")
    subtrees = [p for p in plan.exclude_list() if p.endswith(".*")]
    if subtrees:
        found.append("kept whole: " + ", ".join(subtrees))
    if plan.fp8 is not None:
        found.append(f"FP8 source, {plan.fp8.block[0]}x{plan.fp8.block[1]} blocks, dequantized to bf16")
    if model_type not in _TESTED_MODEL_TYPES:
        found.append("not a tested family: fusion groups found by name")
    return model_type + (": " + "; ".join(found) if found else "")


def describe(plan) -> list[str]:
    """The --dry-run report: counts, bytes, fusion groups and exclusions, grouped by name pattern."""
    src = plan.source
    arch = ",".join(src.config.get("architectures") or ["?"])
    n_dequant = sum(1 for u in plan.units if getattr(u, "dequant", None) is not None)
    lines = [
        f"source      {src.root}  ({len(src.shards)} shards, {src.total_bytes / 1e9:.3f} GB, {arch})",
        f"family      {_family(plan)}",
    ]
    if getattr(plan, "linears", None) is not None:
        lines.append(f"linears     {plan.linears.describe()}")
    lines += [
        f"scales      {plan.scales}  -> quant_algo {plan.quant_algo}" + ("  + FP8 KV cache" if plan.kv_cache else ""),
        f"quantize    {len(plan.quantized)} Linear weights in {sum(1 for u in plan.units if u.members)} units "
        f"({len(plan.groups)} fusion groups)",
        f"keep        {sum(1 for u in plan.units if u.copy is not None)} tensors as they are "
        f"({len(plan.excluded)} excluded Linear modules)"
        + (f", {n_dequant} excluded FP8 weights dequantized to bf16" if n_dequant else ""),
        f"output      {len(plan.shard_names)} shards, {plan.out_bytes / 1e9:.3f} GB "
        f"({src.total_bytes / max(plan.out_bytes, 1):.2f}x smaller), format {plan.format_name}",
    ]
    groups = Counter(_pattern("{" + ", ".join(m.module for m in u.members) + "}") for u in plan.groups)
    if groups:
        lines.append("fusion groups (one weight_scale_2 each):")
        for pattern, n in sorted(groups.items()):
            parts = pattern[1:-1].split(", ")
            common = parts[0].rsplit(".", 1)[0]
            leaves = ",".join(p.rsplit(".", 1)[1] for p in parts)
            lines.append(f"  {n:5d} x {common}.{{{leaves}}}")
    if plan.excluded:
        lines.append("excluded (kept in source precision):")
        from .plan import excluded_subtree

        rows: Counter = Counter()
        for m, r in plan.excluded.items():
            root = excluded_subtree(m, src.config)
            if root:  # an MTP layer or tower is listed whole, as it is in the config
                r = "MTP layer" if "MTP" in r or root.rsplit(".", 1)[-1].isdigit() else "vision/audio tower"
                rows[(f"{root}.*", f"{r}, kept whole")] += 1
            else:
                rows[(_pattern(m), r)] += 1
        for (pattern, reason), n in sorted(rows.items()):
            lines.append(f"  {n:5d} x {pattern}  ({reason})")
        ignore = plan.exclude_list()
        lines.append(f"exclusion list ({len(ignore)} entries in the config): " + ", ".join(ignore[:6])
                     + (", ..." if len(ignore) > 6 else ""))
    lines += [f"note        {n}" for n in plan.notes]
    return lines


def _start_cuda(device: str) -> None:
    import torch

    try:
        if torch.cuda.is_available():
            torch.zeros(1, device="cuda" if device == "auto" else device)
    except Exception:  # pick_device reports a bad --device later, in the main thread
        pass


def _convert(args) -> int:
    from .amax import load_amax
    from . import identity
    from .formats import get_format
    from . import profile
    from .pipeline import Options, convert
    from .plan import build_plan
    import torch

    from .quantize import pick_device
    from .source import open_source

    src, dst, overwrite = args.src, args.dst, args.overwrite
    if not args.dry_run and args.device != "cpu":  # CUDA's start-up (a second or more) overlaps planning
        threading.Thread(target=_start_cuda, args=(args.device,), daemon=True).start()
    tmp = None
    if src is None:
        from .synth import sample_checkpoint

        tmp = tempfile.TemporaryDirectory(prefix="shardconv-sample-")
        src = str(sample_checkpoint(Path(tmp.name) / "sample"))
        say(f"no model given: converting the built-in sample checkpoint ({src})")
        if dst is None:
            dst, overwrite = SAMPLE_DST, True
    try:
        from .numerics import set_export_rounding

        set_export_rounding(args.export_rounding)
        source = open_source(src)
        if dst is None:
            dst = default_dst(source.root)
        fmt = get_format(args.format)
        # the amax file's content, not its mtime, goes into the run's fingerprint (identity.py)
        amax, amax_id = identity.read_whole(Path(args.amax), load_amax) if args.amax else (None, None)
        plan = build_plan(source, fmt, excludes=args.exclude, amax=amax, scales=args.scales,
                          max_shard_size=args.max_shard_size, trust_remote_code=args.trust_remote_code)
        if args.dry_run:
            say(*describe(plan))
            return 0
        say(*(f"note: {note}" for note in plan.notes))
        device = pick_device(args.device)
        if profile.ENABLED:
            if device.type == "cuda":
                torch.zeros(1, device=device)
            profile.say(f"ready to convert {profile.process_age():.1f} s after process start (imports, CUDA, plan)")
        opts = Options(device=device, readers=args.readers, host_buffer=args.host_buffer,
                       gpu_buffer=args.gpu_buffer, progress=not args.no_progress, fsync=args.fsync,
                       prefetch=args.prefetch)
        extra = {}
        if amax_id:
            extra["amax"] = amax_id
        summary = convert(plan, Path(dst), fmt=fmt, opts=opts, overwrite=overwrite, fingerprint_extra=extra,
                          max_extra_size=args.max_extra_size)
        profile.say(f"done {profile.process_age():.1f} s after process start")
        say(f"wrote {dst}", *summary.lines())
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()


def default_dst(src_root: Path) -> str:
    """Where a conversion of SRC goes when no DST is given: ``<SRC name>-NVFP4`` in the working folder."""
    return f"{src_root.name}-NVFP4"


def _start_readahead(args) -> None:
    """Read the input's first bytes while torch and CUDA start (readahead.py); not on a resume, whose
    first shards may already be done, nor where DST is refused anyway."""
    from . import readahead
    from .destination import is_empty

    if args.dry_run or not args.src:
        return
    dst = Path(args.dst) if args.dst else Path(default_dst(Path(args.src).expanduser().resolve()))
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
    try:
        if args.command == "convert":
            _start_readahead(args)
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
        from .errors import describe

        _error(f"unexpected {describe(e)} (a shardconv bug: please report it; SHARDCONV_DEBUG=1 prints the "
               "traceback)", e)
        return 2
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
