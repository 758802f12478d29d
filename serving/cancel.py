"""Marks that stop work in flight, shared by the models of one server through a directory.

Triton tells a model when *its* client cancelled (gRPC only; Triton 2.51's HTTP
front end never cancels), but not the request a model made for it over BLS:
the fused layout's ``generate`` front sees the cancellation and the ``router``
doing the work does not. So the front marks the request id it gave the
router's request, and the router looks for the mark between steps. The
server's own stop is one more mark (``shutdown``) so that requests in flight
end within a step instead of holding the exit for minutes.

``Watch`` is the one look a model takes at a request between its steps.

Files, not sockets: both sides are separate stub processes with no channel of
their own, a ``stat`` is microseconds, and nothing is left running if either dies.
Numpy-free and torch-free: the front imports it.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import uuid
from pathlib import Path

ENV = "STEPADAPT_SIGNAL_DIR"
SHUTDOWN = "shutdown"
_ID = re.compile(r"[0-9a-f]{32}")


def signal_dir() -> Path:
    """The server's directory (set by ``TritonServer``), else one per user for a foreign tritonserver."""
    d = os.environ.get(ENV)
    return Path(d) if d else Path(tempfile.gettempdir()) / f"stepadapt-signals-{os.getuid()}"


def new_id() -> str:
    return uuid.uuid4().hex


def _path(name: str) -> Path | None:
    # Request ids come from clients too: only our own form names a file.
    return signal_dir() / name if name == SHUTDOWN or _ID.fullmatch(name) else None


def mark(name: str) -> None:
    p = _path(name)
    if p is not None:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()


def clear(name: str) -> None:
    p = _path(name)
    if p is not None:
        p.unlink(missing_ok=True)


_MODEL = re.compile(r"[A-Za-z0-9_]+")


def set_load(model: str, requests: int) -> None:
    """Say how many requests engine ``model`` holds (the front sends the next one to the least
    loaded: join the shortest queue). A rename, so a reader never sees half a number."""
    if _MODEL.fullmatch(model):
        d = signal_dir()
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".load-{model}.{os.getpid()}"
        tmp.write_text(str(int(requests)))
        os.replace(tmp, d / f"load-{model}")


def load(model: str) -> int:
    """What ``set_load`` last said for ``model`` (0 before it said anything)."""
    try:
        return int((signal_dir() / f"load-{model}").read_text()) if _MODEL.fullmatch(model) else 0
    except (OSError, ValueError):
        return 0


def marked(name: str) -> bool:
    p = _path(name)
    return p is not None and p.exists()


CHECK_EVERY = 0.05  # seconds between looks at one request (each may ask Triton over IPC)


class Stopped(Exception):
    """A request given up on between steps; ``code`` is the Triton status it ends with."""

    def __init__(self, code: str, msg: str):
        super().__init__(msg)
        self.code = code


class Watch:
    """Whether one request should stop now, and why: cancelled by its client (``cancelled()``, or a
    mark under its id), past the server's time limit, or the server stopping. Asked before every
    step, looked up at most every CHECK_EVERY seconds so a fast step does not pay for it."""

    def __init__(self, request_id: str, max_seconds: float, cancelled, start: float | None = None):
        self.cancelled = cancelled
        self.id = request_id
        self.max_seconds = max_seconds
        self.deadline = (time.monotonic() if start is None else start) + max_seconds
        self.stopped: Stopped | None = None
        self._next = 0.0

    def check(self) -> Stopped | None:
        now = time.monotonic()
        if self.stopped is None and now >= self._next:
            self._next = now + CHECK_EVERY
            if marked(SHUTDOWN):
                self.stopped = Stopped("UNAVAILABLE", "the server is shutting down")
            elif self.cancelled() or marked(self.id):
                self.stopped = Stopped("CANCELLED", "cancelled by the client")
            elif now > self.deadline:
                limit = f"{self.max_seconds:g}"
                self.stopped = Stopped("UNAVAILABLE", f"the request ran past the server's limit of {limit} s")
        return self.stopped
