"""One exception type for every user-facing failure.

The CLI prints ``str(error)`` as a single line and exits non-zero; anything else escaping is a bug.
Messages name the file and, where there is one, the tensor.
"""


class ShardconvError(Exception):
    """A problem with the user's input or options, reported as one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
