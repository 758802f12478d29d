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
