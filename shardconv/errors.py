"""One exception type for every user-facing failure, and how anything else becomes one.

The CLI prints ``str(error)`` as a single line and exits non-zero. An unexpected exception (a bug, or
an OS error without a file name) raised while a tensor is worked on is turned into a ShardconvError
naming that file and tensor by :func:`working_on`, so the user still gets one line saying where it
happened; ``SHARDCONV_DEBUG=1`` makes the CLI print the original traceback too.
"""

from __future__ import annotations

from contextlib import contextmanager


class ShardconvError(Exception):
    """A problem with the user's input or options, reported as one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class SourceError(ShardconvError):
    """SRC is unusable: a missing or malformed file, header, config or tensor (NaN/Inf values too)."""


class AmaxError(ShardconvError):
    """The amax file is unreadable or does not fit the model."""


class DestinationError(ShardconvError):
    """DST cannot take this output: not empty, inside SRC, locked by another run, or not writable."""


class OptionError(ShardconvError):
    """An option, or a combination of options, that cannot work."""


class QuantizationError(ShardconvError):
    """A weight that NVFP4 cannot represent with usable scales (e.g. a max |w| too small)."""


def describe(error: BaseException) -> str:
    """``Type: message`` of an unexpected exception, on one line."""
    text = " ".join(str(error).split())
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror + (f": {error.filename}" if error.filename else "")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def unexpected(error: BaseException) -> str:
    """The one line for an exception shardconv did not expect: a bug to report."""
    return f"unexpected {describe(error)} (a shardconv bug: please report it; SHARDCONV_DEBUG=1 prints the traceback)"


@contextmanager
def working_on(path, tensor: str | None = None):
    """Re-raise anything but a ShardconvError, an OS error that names its file, or an interrupt as a
    ShardconvError naming ``path`` and ``tensor`` (the original stays as ``__cause__``)."""
    try:
        yield
    except ShardconvError:
        raise
    except OSError as e:
        if e.filename:  # already says which file: the CLI prints it as it is
            raise
        where = f"{path}: tensor {tensor!r}" if tensor else f"{path}"
        raise ShardconvError(f"{where}: {describe(e)}") from e
    except Exception as e:
        where = f"{path}: tensor {tensor!r}" if tensor else f"{path}"
        raise ShardconvError(f"{where}: {unexpected(e)}") from e


def in_context(method):
    """A pipeline stage method (``method(self, subject, ...)``, subject a TensorInfo or a Unit) whose
    unexpected errors name the tensor it was working on (:func:`working_on`)."""
    import functools

    @functools.wraps(method)
    def wrapper(self, subject, *args, **kwargs):
        info = getattr(subject, "first", subject)  # a Unit's first input, or the TensorInfo itself
        with working_on(info.path, info.name):
            return method(self, subject, *args, **kwargs)
    return wrapper
