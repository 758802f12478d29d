"""The serve stage as a library function: exported bundles -> a model repository -> a running
tritonserver.

The CLI, the demo and a notebook all start a server through :func:`start`, so the checks that
come before the minutes of loading (the device, the ports, the layout) and the defaults of the
repository exist once. What stays with a caller is how long the server lives: the CLI waits for
Ctrl-C, the demo stops it after one request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stepadapt.serving.repository import LAYOUTS, SCHEDULING, RepositoryOptions, write_repository
from stepadapt.serving.server import TritonServer

from stepadapt import StepadaptError
from stepadapt.admission import POLICIES, Slo
from stepadapt.devices import DEVICES  # onnxruntime's too (stepadapt.export.runtime.providers)
from stepadapt.options import Options, option


@dataclass(frozen=True)
class ServeOptions(Options):
    """``stepadapt serve``: exported bundles served by tritonserver until its caller stops it."""

    bundles: tuple[str, ...] = option(
        help="Exported bundle directories, as NAME=DIR or DIR (named by its directory): one, or several "
        "of one base (the base, experts at 0.5x, ...) that a request picks by its budget input; the "
        "first is the default.",
        argument=True,
        repeat=True,
        metavar="BUNDLE",
    )
    repo: Path | None = option(None, "Where to write the model repository (default BUNDLE/triton).")
    host: str = option("127.0.0.1", "Address to bind; 127.0.0.1 keeps it local.")
    http_port: int = option(8000, "HTTP port.")
    grpc_port: int = option(8001, "gRPC port.")
    layout: str = option(
        "fused",
        "fused: the experts run inside the router, concurrent requests share each step's batch "
        "(fastest on CPU, docs/benchmarks.md). bls: each expert is a Triton model called once per "
        "step (for a full Triton's GPU backends).",
    )
    threads: int = option(1, "onnxruntime threads per session.")
    instances: int = option(2, "Copies of the router (fused) or of each expert (bls) running at once.")
    max_images: int = option(
        RepositoryOptions.max_batch,
        "Most images one request may ask for (= expert max batch, = TensorRT's profile).",
    )
    max_queue: int = option(
        RepositoryOptions.max_queue, "Requests that may wait beyond those running; more are refused at once."
    )
    queue_timeout: float = option(
        RepositoryOptions.queue_timeout_s, "Seconds a request may wait in the queue before it is refused."
    )
    max_seconds: float = option(
        RepositoryOptions.max_seconds,
        "Seconds a request may run before it is stopped with an error (bounds work an HTTP client "
        "abandoned: only gRPC can cancel).",
    )
    model_config_name: str | None = option(
        None, "'gpu' selects the TensorRT/ONNX Runtime GPU configs (full Triton only)."
    )
    tritonserver: Path | None = option(
        None,
        "An installed full Triton's tritonserver (e.g. /opt/tritonserver/bin/tritonserver in NGC's "
        "container; backends from ../backends). Default: the python-backend-only one in the "
        "nvidia-pytriton wheel.",
    )
    device: str = option(
        "auto", "onnxruntime's device: auto (CUDA where onnxruntime-gpu is installed), cpu, cuda."
    )
    log: Path | None = option(None, "Triton log file (default BUNDLE/triton.log).")
    metrics_port: int = option(
        8002, "Triton's Prometheus metrics port (/metrics: Triton's and stepadapt's figures); 0: none."
    )
    scheduling: str = option(
        "step",
        "fused layout: step (requests join and leave at every step; the SLO needs it) or lockstep "
        "(requests that arrive together run together to the end).",
    )
    slo_ms: float | None = option(
        None, "Latency objective in milliseconds (per image, or per request: --slo-per); none: no SLO."
    )
    slo_per: str = option("image", "What --slo-ms is for: image or request.")
    step_rows: int | None = option(
        None,
        "Step engine: rows run per step, the most urgent requests first (earliest deadline); none: "
        "every request in flight at every step.",
    )
    slo_policy: str = option(
        "degrade",
        "A request that would miss the SLO: degrade (served with fewer steps and/or a smaller bundle) "
        "or reject (503 at once). Either way none is queued past its deadline.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # plain values (a str path) as their fields' types
        self.served()  # names and duplicates said now
        if self.scheduling not in SCHEDULING:
            raise StepadaptError(
                f"--scheduling must be one of {', '.join(SCHEDULING)}, got {self.scheduling!r}"
            )
        if self.slo_policy not in POLICIES:
            raise StepadaptError(
                f"--slo-policy must be one of {', '.join(POLICIES)}, got {self.slo_policy!r}"
            )
        self.slo()  # its own checks, in its own words
        if self.step_rows is not None and (not _whole(self.step_rows) or self.step_rows < 1):
            raise StepadaptError(f"--step-rows must be at least 1, got {self.step_rows!r}")
        if not _whole(self.metrics_port) or not 0 <= self.metrics_port <= 65535:
            raise StepadaptError(
                f"--metrics-port must be a port in 1..65535 (0: none), got {self.metrics_port!r}"
            )
        if self.layout not in LAYOUTS:
            raise StepadaptError(
                f"unknown repository layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}"
            )
        if self.device not in DEVICES:
            raise StepadaptError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not self.host:
            raise StepadaptError("--host must name an address, e.g. 127.0.0.1")
        for flag, port in (("--http-port", self.http_port), ("--grpc-port", self.grpc_port)):
            if not _whole(port) or not 1 <= port <= 65535:
                raise StepadaptError(f"{flag} must be a port in 1..65535, got {port!r}")
        ports = [p for p in (self.http_port, self.grpc_port, self.metrics_port) if p]
        if len(set(ports)) < len(ports):
            raise StepadaptError(f"--http-port, --grpc-port and --metrics-port must differ, got {ports}")
        for flag, value in (("--threads", self.threads), ("--instances", self.instances),
                            ("--max-images", self.max_images)):  # fmt: skip
            if not _whole(value) or value < 1:
                raise StepadaptError(f"{flag} must be at least 1, got {value!r}")
        if not _whole(self.max_queue) or self.max_queue < 0:
            raise StepadaptError(f"--max-queue must be 0 or more, got {self.max_queue!r}")
        for flag, seconds in (("--queue-timeout", self.queue_timeout), ("--max-seconds", self.max_seconds)):
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
                raise StepadaptError(f"{flag} must be a positive number of seconds, got {seconds!r}")

    def repository_options(self) -> RepositoryOptions:
        """The repository these options ask for (the rest of its settings keep their defaults)."""
        return RepositoryOptions(
            threads=self.threads, instances=self.instances, max_batch=self.max_images, layout=self.layout,
            max_queue=self.max_queue, queue_timeout_s=self.queue_timeout, max_seconds=self.max_seconds,
            device=self.device, scheduling=self.scheduling, slo=self.slo(), step_rows=self.step_rows,
        )  # fmt: skip

    def served(self) -> dict[str, Path]:
        """The bundles by the name a request's ``budget`` gives them, the default first."""
        out: dict[str, Path] = {}
        if not self.bundles:
            raise StepadaptError("name at least one bundle to serve")
        for spec in self.bundles:
            name, sep, path = str(spec).partition("=")
            path = Path(path if sep else name)
            name = name.strip() if sep else path.resolve().name
            if not name or "/" in name:
                raise StepadaptError(f"{spec!r}: a bundle's name must be a plain word (NAME=DIR)")
            if name in out:
                raise StepadaptError(f"two bundles are named {name!r}: name them apart (NAME=DIR)")
            out[name] = path
        return out

    def slo(self) -> Slo | None:
        if self.slo_ms is None:
            return None
        return Slo(ms=self.slo_ms, per=self.slo_per, policy=self.slo_policy)

    @property
    def bundle(self) -> Path:
        """The default bundle (the first named): the repository and the log go beside it."""
        return next(iter(self.served().values()))

    @property
    def repo_path(self) -> Path:
        return self.repo or self.bundle / "triton"

    @property
    def log_path(self) -> Path:
        return self.log or self.bundle / "triton.log"


def _whole(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def start(options: ServeOptions, log: Callable[[str], None] | None = None) -> TritonServer:
    """Serve the bundle: the returned server is ready; stopping it is the caller's (``stop()``, or
    use it as a context manager).

    A device onnxruntime cannot use is refused before anything is written or started, so it is
    said in one line rather than as a model that failed to load minutes later. A Ctrl-C while
    the server comes up stops it (TritonServer.start) and propagates.
    """
    from stepadapt.export.runtime import providers

    from stepadapt.bundle import Bundle

    o = options
    providers(o.device)
    bundles = {name: Bundle.load(path) for name, path in o.served().items()}
    repo = write_repository(bundles, o.repo_path, o.repository_options())
    server = TritonServer(
        repo, host=o.host, http_port=o.http_port, grpc_port=o.grpc_port, log_path=o.log_path,
        model_config_name=o.model_config_name, binary=o.tritonserver, metrics_port=o.metrics_port or None,
    )  # fmt: skip
    if log:
        log(f"starting tritonserver on {o.host} (repository {repo}) ...")
    return server.start()
