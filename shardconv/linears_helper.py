"""Finding the Linear layers (linears.py) in a helper process started with the command.

Why: importing transformers and building the config's model on the meta device took 13-20 s of a
fresh H200 machine's 14-25 s start-up (README Performance), after torch's import and before the plan.
In a second process it runs beside torch's import, CUDA's start and the header reads (a thread would
not: both hold the GIL), and the command's own process does not import transformers unless the
helper is not started or its answer is not for the headers the command read (then linears.find
builds the model in-process).

The helper reads SRC's headers itself, runs :func:`linears.find` exactly as the plan would (on the
plain view of an FP8, MXFP4 or INT4 source), and prints one JSON line: the key of what it read
(:func:`answer_key`: config, every classified tensor's name, dtype and shape, the folder,
``trust_remote_code``) and the answer, or the SourceError it raised. The
command uses an answer only under the same key; where the helper failed, died or read other headers,
linears.find builds the model in-process as it always did. Torch-free until an answer is read, so
the command line can start it before importing torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import profile
from .threads import usable as _cores

# Cores this process may use below which no helper is started: on the 2-core development VM the
# helper's imports competed with the command's own (ready to convert 5.9-13.1 s without it, 10.2-10.9
# s with it, under other load); on the 16-core H200 machine it ran beside them (README Performance).
MIN_CORES = 4
WAIT = 600.0  # seconds: a helper that takes longer is ended, and the model is built in-process
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


def answer_key(source, trust_remote_code: bool, tensors: dict | None = None) -> str:
    """What linears.find's answer depends on, besides the installed transformers (the same here and
    in the helper: the same interpreter and environment): ``tensors`` are those it classified (the
    source's own by default; an encoded source's plain view, :func:`plain_view`)."""
    tensors = sorted((t.name, t.dtype, list(t.shape)) for t in (source.tensors if tensors is None else tensors).values())
    blob = json.dumps({"config": source.config, "tensors": tensors, "root": str(source.root),
                       "trust_remote_code": bool(trust_remote_code)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def plain_view(source) -> dict:
    """The tensors the plan asks linears.find about (encodings.plain_tensors: an FP8, MXFP4 or INT4
    source's weights under their plain names); the source's own where its encoding is refused (the
    plan refuses it too, before asking)."""
    from . import encodings
    from .errors import ShardconvError

    try:
        encoding = encodings.detect(source)
        return encodings.plain_tensors(source, encoding, encoding.weights(source))
    except ShardconvError:
        return source.tensors


def encode(source, trust_remote_code: bool, tensors: dict | None = None) -> dict:
    """linears.find's answer for ``source`` (``tensors``: as for :func:`answer_key`) as JSON-ready data
    (what the helper prints)."""
    from dataclasses import asdict

    from .errors import SourceError
    from .linears import find

    key = answer_key(source, trust_remote_code, tensors)
    try:
        return {"key": key, "linears": asdict(find(source, trust_remote_code, tensors))}
    except SourceError as e:
        return {"key": key, "error": str(e)}


def decode(answer: dict):
    """The Linears of :func:`encode`'s data; raises the SourceError it recorded."""
    from .errors import SourceError
    from .linears import Linears

    if "error" in answer:
        raise SourceError(answer["error"])
    return Linears(**answer["linears"])


class Helper:
    """The helper process for one SRC folder; :meth:`answer` waits for it and checks its key."""

    def __init__(self, src: str, trust_remote_code: bool):
        self.trust_remote_code = bool(trust_remote_code)
        self.result: dict | None = None
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_PACKAGE_PARENT, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", "shardconv.linears_helper", src, str(int(self.trust_remote_code))],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)

    def pending(self, trust_remote_code: bool) -> bool:
        """:meth:`answer` would wait for the process: it runs, its answer unread, for this setting."""
        return (bool(trust_remote_code) == self.trust_remote_code and self.result is None
                and self.proc is not None and self.proc.poll() is None)

    def answer(self, source, trust_remote_code: bool, tensors: dict | None = None):
        """The helper's Linears for ``tensors`` of ``source`` (as for :func:`answer_key`), or None (the
        caller finds them itself): raises the helper's SourceError (a tensor of the model in no shard)
        as linears.find would have."""
        if bool(trust_remote_code) != self.trust_remote_code:
            return None
        if self.result is None:
            t0 = time.perf_counter()
            try:
                out, _ = self.proc.communicate(timeout=WAIT)
                lines = out.decode("utf-8", "replace").strip().splitlines()
                self.result = json.loads(lines[-1]) if self.proc.returncode == 0 and lines else {}
            except (subprocess.TimeoutExpired, ValueError, OSError):
                self.close()
                self.result = {}
            profile.say(f"linears helper answered {profile.process_age():.1f} s after process start (waited "
                        f"{time.perf_counter() - t0:.1f} s for it): {'an answer' if self.result else 'none'}")
        if not isinstance(self.result, dict) or self.result.get("key") != answer_key(source, trust_remote_code, tensors):
            return None
        try:
            return decode(self.result)
        except (TypeError, KeyError):  # an answer of another shape: not trusted
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start(src: str | None, trust_remote_code: bool) -> Helper | None:
    """A helper for a local SRC folder; None for a hub id or the built-in sample (their folder is
    known only later), where this process has imported transformers already or may use fewer than
    MIN_CORES cores, with ``SHARDCONV_LINEARS_HELPER=0`` (``=1``: always), or where no process can be
    started."""
    if not src or os.environ.get("SHARDCONV_LINEARS_HELPER") == "0" or not Path(src).expanduser().is_dir():
        return None
    if os.environ.get("SHARDCONV_LINEARS_HELPER") != "1":
        if "transformers" in sys.modules:
            return None  # imported already (a notebook, the tests): building the model here costs less
        if _cores() < MIN_CORES:
            return None  # no spare core: the helper would only compete with this process's imports
    try:
        return Helper(src, trust_remote_code)
    except OSError:
        return None


def use(helper: Helper) -> None:
    """Make linears.find ask ``helper`` first (imports linears, and so torch: after the spawn)."""
    from . import linears

    linears.HELPERS.append(helper)


def stop(helper: Helper) -> None:
    """End ``helper`` and stop asking it."""
    from . import linears

    helper.close()
    if helper in linears.HELPERS:
        linears.HELPERS.remove(helper)


def main(argv: list[str]) -> int:
    """The helper: print :func:`encode`'s answer as the last line of stdout; nothing else goes there."""
    out = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # transformers or a model's own code printing: not in the answer
    from .source import open_source

    source = open_source(argv[0])
    answer = encode(source, argv[1] == "1", plain_view(source))
    out.write(json.dumps(answer) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    os._exit(code)  # without torch's and transformers' teardown: the command waits for this exit
