"""What the ``shardconv`` command line accepts: its parser, ``--help`` text and value parsers.

Apart from cli.py so that the options and their help read in one place, apart from what the commands
do with them. It imports no torch: the start-up read-ahead begins right after parsing.
"""

from __future__ import annotations

import argparse

from . import __version__
from .destination import DEFAULT_MAX_EXTRA
from .errors import OptionError


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
                   help="largest relative reconstruction error accepted with --source (default: 0.5; FP8 layers of a "
                   "mixed output: at most 0.125)")
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
