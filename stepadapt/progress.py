"""Progress bars that suit where they are written.

On a terminal tqdm redraws in place; in a log file (CI, nohup, a pipe) every
redraw is a new line, so off a terminal a bar writes at most one line every
``LOG_INTERVAL`` seconds, and postfix updates never force a line of their own.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL = 30.0  # seconds between lines when stderr is not a terminal


def progress(**kwargs: Any) -> tqdm:
    """``tqdm(**kwargs)``, throttled off a terminal (``mininterval`` given by the caller wins)."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL)
        kwargs.setdefault("maxinterval", float("inf"))  # tqdm's monitor would redraw every 10 s
        kwargs.setdefault("miniters", 1)
    return tqdm(**kwargs)
