"""What the ``shardconv`` command line prints: stdout lines, stderr lines, notes, warnings, the error line.

Apart from cli.py as an idea of its own: the command's messages go through here (the subcommands'
output, ``convert --batch``'s, the ``shardconv`` logger's notes and warnings, the error line), so that
a closed or broken stdout or stderr does not end a run and ``--json`` keeps stdout to its one JSON object.
"""

from __future__ import annotations

import logging
import os
import sys


def say(*lines: str) -> None:
    """Print to stdout; a closed or broken stdout (``| head``, ``>&-``) loses the text, never the run."""
    try:
        if sys.stdout is not None and lines:
            print(*lines, sep="\n")
    except (OSError, ValueError):  # BrokenPipeError, EBADF, or "I/O operation on closed file"
        pass


def stderr_line(line: str) -> None:
    try:
        if sys.stderr is not None:
            print(line, file=sys.stderr)
    except (OSError, ValueError):
        pass


_JSON_MODE = [False]


def note(message: str) -> None:
    """A note: on stdout, unless stdout carries JSON (then stderr)."""
    (stderr_line if _JSON_MODE[0] else say)(f"note: {message}")


def _warn(message: str) -> None:
    stderr_line(f"shardconv: warning: {message}")


class _Printer(logging.Handler):
    """The ``shardconv`` logger's records as the CLI prints them: notes and warnings."""

    def emit(self, record: logging.LogRecord) -> None:
        (_warn if record.levelno >= logging.WARNING else note)(record.getMessage())


def route_logging(args) -> None:
    logger = logging.getLogger("shardconv")
    logger.handlers = [h for h in logger.handlers if not isinstance(h, _Printer)] + [_Printer()]
    logger.propagate = False
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    _JSON_MODE[0] = bool(getattr(args, "json", False))


def error_line(message: str, error: BaseException | None = None) -> None:
    """One line on stderr; with SHARDCONV_DEBUG=1 the traceback that led to it first."""
    try:
        if error is not None and os.environ.get("SHARDCONV_DEBUG") == "1":
            import traceback

            traceback.print_exception(error.__cause__ or error, file=sys.stderr)
        print(f"shardconv: error: {' '.join(message.split())}", file=sys.stderr)
    except (OSError, ValueError):
        pass
