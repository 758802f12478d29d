"""stepadapt: step-adaptive expert denoisers compressed from one diffusion U-Net."""

__version__ = "0.1.0"


class StepadaptError(Exception):
    """A user-facing error: its message is one line that names the problem.

    The CLI prints it without a traceback, so every check on user input raises
    this (or a subclass) instead of letting a deep library error escape.
    """


class Notice(UserWarning):
    """Something done on the user's behalf that they should know of (a conversion, a fallback).

    A warning, not a print: the library stays quiet; the CLI shows each as one ``note:`` line.
    """


def first_line(e: BaseException) -> str:
    """An exception as one line (its message's first, else its type): how a library's multi-line
    error becomes a :class:`StepadaptError` message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
