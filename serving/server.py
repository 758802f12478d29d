"""Start and stop the real ``tritonserver`` shipped in the nvidia-pytriton wheel.

The wheel carries Triton 2.51 with the python backend only; it runs on CPU-only
machines once (1) the python backend stub for this Python sits in
``backends/python/``, (2) ``LD_LIBRARY_PATH`` puts this interpreter's libpython
first (else the stub loads the system one and every model dies with
``'_thread.RLock' object has no attribute '_recursion_count'``) and (3)
``PATH`` names this environment's ``python3`` first: the stub takes its
packages from that interpreter's environment (it ignores ``PYTHONPATH``;
measured, tests/test_serving.py).

Stopping marks ``shutdown`` in the server's signal directory first, so every
request in flight ends with an error at its next step and Triton's own drain
takes a moment, not the length of the longest request; whatever is still
alive after ``timeout`` is killed with its whole process group (the model
stubs included), and the work directory goes with it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from stepadapt.serving import cancel

from stepadapt import StepadaptError


def _pytriton_dir() -> Path:
    try:
        import pytriton
    except ImportError:
        raise StepadaptError("nvidia-pytriton is not installed: pip install nvidia-pytriton==0.7.0") from None
    d = Path(pytriton.__file__).parent / "tritonserver"
    if not (d / "bin" / "tritonserver").is_file():
        raise StepadaptError(f"no tritonserver binary in {d}")
    return d


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def prepare_backends(work: Path) -> Path:
    """Copy the python backend and this Python's stub into ``work/backends``."""
    src = _pytriton_dir()
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = src / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.is_file():
        raise StepadaptError(f"the pytriton wheel has no python backend stub for Python {ver}")
    dst = work / "backends"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src / "backends", dst)
    shutil.copy2(stub, dst / "python" / "triton_python_backend_stub")
    return dst


def server_env(signals: Path | None = None) -> dict[str, str]:
    import pytriton

    env = dict(os.environ)
    if signals is not None:
        env[cancel.ENV] = str(signals)
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    ld = [sysconfig.get_config_var("LIBDIR") or "", str(libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in ld if p)
    # The stub's interpreter is this environment's (torch, onnxruntime, ...): the python3 on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies do not count: an init that
    never reaps would keep them forever, and they hold nothing)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:  # zombie, or dead and being reaped
            return True
    return False


def _wait_gone(pgid: int, timeout: float = 2.0) -> None:
    """SIGKILL is delivered when a process next runs: on a loaded machine a killed stub can be seen
    for a moment after the kill. Wait that moment, so that stopped means nothing runs."""
    if not os.path.isdir("/proc"):
        return
    deadline = time.monotonic() + timeout
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


class TritonServer:
    """A running tritonserver process on ``host`` (127.0.0.1 unless told otherwise)."""

    def __init__(
        self,
        repository: str | os.PathLike,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        log_path: str | os.PathLike | None = None,
        model_config_name: str | None = None,
        verbose: int = 0,
        binary: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        metrics_port: int | None = None,
    ):
        """``binary``: an installed full Triton's ``tritonserver`` (its ``../backends`` beside it: the
        NGC container's layout, with onnxruntime and TensorRT); default the pytriton wheel's.
        ``env``: overrides of the server's environment. ``metrics_port``: Prometheus metrics on
        ``host`` (Triton's and stepadapt's, ``/metrics``); None: no metrics."""
        self.repository = Path(repository)
        self.binary = Path(binary) if binary is not None else None
        self.env_overrides = dict(env or {})
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.work = Path(tempfile.mkdtemp(prefix="stepadapt-triton-"))
        self.log_path = Path(log_path) if log_path else self.work / "tritonserver.log"
        self.model_config_name = model_config_name
        self.metrics_port = metrics_port
        self.verbose = verbose
        self.proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str | None:
        return f"http://{self.host}:{self.metrics_port}/metrics" if self.metrics_port else None

    @property
    def signals(self) -> Path:
        """Where this server's models look for stop marks (``stepadapt.serving.cancel``)."""
        return self.work / "signals"

    def backends(self) -> Path:
        return self.binary.absolute().parent.parent / "backends" if self.binary else self.work / "backends"

    def command(self) -> list[str]:
        binary = self.binary or _pytriton_dir() / "bin" / "tritonserver"
        cmd = [
            str(binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.backends()}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            *(
                [
                    "--allow-metrics=true",
                    f"--metrics-address={self.host}",
                    f"--metrics-port={self.metrics_port}",
                ]
                if self.metrics_port
                else ["--allow-metrics=false"]
            ),
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=false",
            f"--log-verbose={self.verbose}",
            "--exit-on-error=true",
            "--exit-timeout-secs=2",  # requests in flight see the shutdown mark within a step
            "--strict-readiness=true",
        ]
        if self.model_config_name:
            cmd.append(f"--model-config-name={self.model_config_name}")
        return cmd

    def start(self, timeout: float = 180.0) -> TritonServer:
        if not (self.repository / "generate" / "config.pbtxt").is_file():
            raise StepadaptError(f"{self.repository} is not a stepadapt model repository")
        if self.binary is None:
            prepare_backends(self.work)
        elif not (self.binary.is_file() and os.access(self.binary, os.X_OK)):
            raise StepadaptError(f"--tritonserver {self.binary} is not an executable file")
        elif not (self.backends() / "python").is_dir():
            raise StepadaptError(f"{self.binary}: no python backend in {self.backends()}")
        self.signals.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**server_env(self.signals), **self.env_overrides},
            start_new_session=True,
        )
        log.close()
        try:  # its own session: a Ctrl-C here reaches only us, so we stop it on every way out
            return self._wait_ready(timeout)
        except BaseException:
            self.stop(keep_log=True)
            raise

    def _wait_ready(self, timeout: float) -> TritonServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = self.load_errors() or f"tritonserver exited with code {self.proc.returncode}"
                raise StepadaptError(f"Triton failed to start: {msg} (log: {self.log_path})")
            if self.ready():
                return self
            time.sleep(0.25)
        msg = self.load_errors()
        raise StepadaptError(
            f"Triton not ready after {timeout:.0f}s{': ' + msg if msg else ''} (log: {self.log_path})"
        )

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def load_errors(self) -> str:
        """Triton's own words about models that failed to load (one line)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        lines = [ln for ln in text.splitlines() if re.match(r"^E\d{4}", ln) or "failed to load" in ln]
        return " | ".join(ln.split("] ", 1)[-1] for ln in lines[:3])

    def stop(self, timeout: float = 4.0, keep_log: bool = False) -> None:
        """Stop within ``timeout`` seconds: requests in flight get an error, nothing is left running.

        The work directory goes, with the log when it lives there, unless ``keep_log`` (a failed start
        names the log in its error).
        """
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(OSError):  # e.g. a /tmp cleaner took it: kill anyway
                    (self.signals / cancel.SHUTDOWN).touch()
                os.killpg(self.proc.pid, signal.SIGINT)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            with contextlib.suppress(ProcessLookupError):  # stubs outliving tritonserver, too
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            _wait_gone(self.proc.pid)
        self.proc = None
        if keep_log and self.log_path.is_relative_to(self.work):
            for p in self.work.iterdir():
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p != self.log_path:
                    p.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
