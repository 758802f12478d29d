"""Start and stop the real ``tritonserver`` shipped in the nvidia-pytriton wheel.

The wheel carries Triton 2.51 with the python backend only; it runs on CPU-only
machines once (1) the python backend stub for this Python sits in
``backends/python/``, (2) ``LD_LIBRARY_PATH`` puts this interpreter's libpython
first (else the stub loads the system one and every model dies with
``'_thread.RLock' object has no attribute '_recursion_count'``) and (3) the
stub can import this environment's packages (``PYTHONPATH``).
"""

from __future__ import annotations

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


def server_env() -> dict[str, str]:
    import pytriton

    env = dict(os.environ)
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    ld = [sysconfig.get_config_var("LIBDIR") or "", str(libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in ld if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # The stub's interpreter must see this environment's packages (torch, onnxruntime, stepadapt).
    paths = [p for p in sys.path if p and Path(p).is_dir()]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


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
    ):
        self.repository = Path(repository)
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.work = Path(tempfile.mkdtemp(prefix="stepadapt-triton-"))
        self.log_path = Path(log_path) if log_path else self.work / "tritonserver.log"
        self.model_config_name = model_config_name
        self.verbose = verbose
        self.proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> list[str]:
        binary = _pytriton_dir() / "bin" / "tritonserver"
        cmd = [
            str(binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.work / 'backends'}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=false",
            f"--log-verbose={self.verbose}",
            "--exit-on-error=true",
            "--strict-readiness=true",
        ]
        if self.model_config_name:
            cmd.append(f"--model-config-name={self.model_config_name}")
        return cmd

    def start(self, timeout: float = 180.0) -> TritonServer:
        if not (self.repository / "generate" / "config.pbtxt").is_file():
            raise StepadaptError(f"{self.repository} is not a stepadapt model repository")
        prepare_backends(self.work)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = self.load_errors() or f"tritonserver exited with code {self.proc.returncode}"
                self.stop()
                raise StepadaptError(f"Triton failed to start: {msg} (log: {self.log_path})")
            if self.ready():
                return self
            time.sleep(0.25)
        msg = self.load_errors()
        self.stop()
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

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.work / "backends", ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
