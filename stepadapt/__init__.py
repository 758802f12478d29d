"""stepadapt: step-adaptive expert denoisers compressed from one diffusion U-Net."""

__version__ = "0.1.0"


class StepadaptError(Exception):
    """A user-facing error: its message is one line that names the problem.

    The CLI prints it without a traceback, so every check on user input raises
    this (or a subclass) instead of letting a deep library error escape.
    """
