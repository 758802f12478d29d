"""Latency/FLOP benchmark of a bundle: what its MACs become in time, per backend and through Triton.

Five sections, each measured in one run with the arms interleaved:

* ``flops``: MACs and params per expert; MACs per image along the sampler's
  trajectory beside the base, the uniform model of equal mean MACs, the TDC
  rule and published ratios.
* ``latency``: one denoiser call per model, backend and batch (median over
  repeats after warm-up), and the latency ratio to the base beside the MAC ratio.
* ``trajectory``: time per image (batch 1) for base / uniform / experts, in
  process (torch, onnxruntime) and through the endpoint.
* ``serving``: concurrent clients against a real Triton server, per repository
  layout: images/s, p50 / p99, router overhead per step, and the in-process
  onnxruntime throughput at the same batch as the ceiling.
* ``load``: open-loop Poisson arrivals against the base alone, the lockstep
  layout, the step engine and the step engine keeping an SLO (``benchmarks/load.py``).

The three arms are bundles of their own (base and uniform as one-expert
bundles in the work directory), so every backend and the endpoint run them the
same way. Timings do not depend on the weights: where no base is given the base
is the bundle's architecture freshly initialised (said so in the report).
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from diffusers import UNet2DModel
from stepadapt.benchmarks.load import LoadSettings, load_section
from stepadapt.export.onnx import OnnxDenoiser, export_bundle
from stepadapt.export.runtime import session, timestep_feed
from stepadapt.serving.client import Endpoint, GenerateRequest
from stepadapt.serving.repository import RepositoryOptions, write_repository
from stepadapt.serving.server import TritonServer

from stepadapt import StepadaptError, __version__
from stepadapt.bundle import Bundle, ExpertDraft, ExpertSpec, Manifest, provenance, save_bundle
from stepadapt.devices import autocast
from stepadapt.io import write_json
from stepadapt.plan import tdc_ratios
from stepadapt.progress import progress
from stepadapt.prune import count_macs, prune_to_macs
from stepadapt.sampling import Denoiser, Router, module_denoiser, sample_images, sample_together

CPU_BACKENDS = ("torch", "onnxruntime-t1", "onnxruntime-t2", "onnxruntime-basic-t2")
# On a GPU: torch fp32 and under bf16 autocast, and onnxruntime's CUDA provider (onnxruntime-gpu).
# Each call includes the copies to and from the device, as stepadapt's sampler makes them.
GPU_BACKENDS = ("torch-cuda", "torch-cuda-bf16", "onnxruntime-cuda")
FORMAT = "stepadapt-bench"
VERSION = 1
SECTIONS = ("flops", "latency", "trajectory", "serving", "load")
ARMS = ("base", "uniform", "experts")
WARMUP_STEPS = 5
# Published trajectory-mean compute of the same base architecture (CIFAR-10, ddpm-cifar10).
REFERENCES = [
    {"system": "Diff-Pruning (NeurIPS 2023), one Taylor-pruned model", "mac_ratio": round(3.4 / 6.1, 3)},
    {"system": "DDSM (ICLR 2024), width per step by search", "mac_ratio": 0.51},
    {"system": "Step-Adaptive / TDC training (arXiv 2312.13307)", "mac_ratio": 0.80},
]


@dataclass
class BenchSettings:
    """What one run measures; ``quick`` is the CI-sized run (the figures only have to exist)."""

    quick: bool = False
    sections: tuple[str, ...] = SECTIONS
    batches: tuple[int, ...] = (1, 8, 32, 64)
    backends: tuple[str, ...] = field(default_factory=lambda: CPU_BACKENDS + available_gpu_backends())
    repeats: int = 7
    min_repeats: int = 3
    batch_seconds: float = 120.0  # stop repeating a batch size after this long (>= min_repeats)
    warmup: int = 2
    steps: tuple[int, ...] = (50, 25)
    trajectory_repeats: int = 3
    overhead_repeats: int = 15  # endpoint / in-process pairs for the experts' router overhead
    trajectory_backends: tuple[str, ...] = field(
        default_factory=lambda: ("torch", "onnxruntime-t2", *available_gpu_backends()[:1])
    )
    endpoint_arms: tuple[str, ...] = ARMS
    layouts: tuple[str, ...] = ("fused", "bls")
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    requests: int = 100  # per concurrency level (p99 of 100 is the second-slowest) ...
    level_seconds: float = 60.0  # ... unless that takes longer (then at least 3 per client)
    serving_steps: int = 50
    sampler: str = "ddim"  # the solver spec every timed trajectory and request uses
    threads: int = 1  # onnxruntime threads per session on the server (and the in-process reference)
    instances: int = field(default_factory=lambda: os.cpu_count() or 1)  # router / expert instances
    load: LoadSettings = field(default_factory=LoadSettings)
    seed: int = 0

    @classmethod
    def quick_run(cls) -> BenchSettings:
        return cls(
            quick=True, batches=(1, 8), backends=("torch", "onnxruntime-t1"), repeats=3, warmup=1,
            steps=(10,), trajectory_repeats=1, overhead_repeats=3, trajectory_backends=("onnxruntime-t1",),
            endpoint_arms=("experts",), layouts=("fused",), concurrency=(1, 4), requests=8,
            serving_steps=10, load=LoadSettings.quick_run(),
        )  # fmt: skip


# ----------------------------------------------------------------------------- arms


def _model_bundle(path: Path, like: Manifest, name: str, model: UNet2DModel, history: list) -> Bundle:
    """One model over every timestep, as a bundle: the base or the uniform arm."""
    macs, params = count_macs(model)
    snr = (min(e.snr_db[0] for e in like.experts), max(e.snr_db[1] for e in like.experts))
    draft = ExpertDraft(
        name=name, timesteps=(0, like.num_train_timesteps), snr_db=snr, target_macs=macs, macs=macs,
        params=params,
    )  # fmt: skip
    manifest = Manifest(
        base_config=like.base_config, scheduler=like.scheduler, sample_shape=like.sample_shape,
        base_macs=like.base_macs, base_params=like.base_params, experts=[],
        plan=like.plan, provenance=provenance(),
    )  # fmt: skip
    save_bundle(path, manifest, [draft], {name: (model, history)})
    return Bundle.load(path)


def prepare_arms(bundle: Bundle, work: Path, base_dir: Path | None = None, log=print) -> dict[str, Bundle]:
    """Exported base / uniform / experts bundles under ``work`` (reused when already there)."""
    from stepadapt.models import load_base

    work.mkdir(parents=True, exist_ok=True)
    m = bundle.manifest
    stamp = json.dumps({"manifest": m.to_dict(), "base": str(base_dir)}, sort_keys=True, default=str)
    stamp_path = work / "arms.json"
    if not (stamp_path.is_file() and stamp_path.read_text() == stamp):
        shutil.rmtree(work / "arms", ignore_errors=True)
    arms_dir = work / "arms"
    arms: dict[str, Bundle] = {}
    if not (arms_dir / "experts").is_dir():
        log(f"copying {bundle.path} -> {arms_dir / 'experts'}")
        shutil.copytree(bundle.path, arms_dir / "experts", ignore=shutil.ignore_patterns("triton*"))
    arms["experts"] = Bundle.load(arms_dir / "experts")
    if not (arms_dir / "base").is_dir():
        if base_dir is not None:
            base, _ = load_base(base_dir)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                base = UNet2DModel.from_config(m.base_config).eval()
        _model_bundle(arms_dir / "base", m, "base", base, [])
    arms["base"] = Bundle.load(arms_dir / "base")
    if not (arms_dir / "uniform").is_dir():
        base = arms["base"].load_expert("base")
        target = m.trajectory_macs_ratio() * m.base_macs
        log(f"uniform arm: magnitude pruning to {target / 1e6:.1f} MMACs (the experts' trajectory mean)")
        res = prune_to_macs(base, target, lambda: tp.importance.MagnitudeImportance(p=1))
        _model_bundle(arms_dir / "uniform", m, "uniform", res.model, res.history)
    arms["uniform"] = Bundle.load(arms_dir / "uniform")
    for name, b in arms.items():
        if not all(e.onnx for e in b.experts):
            log(f"exporting the {name} arm to ONNX")
            export_bundle(b, batches=(2,))
    stamp_path.write_text(stamp)
    return {k: arms[k] for k in ARMS}


# ----------------------------------------------------------------------------- backends


def available_gpu_backends() -> tuple[str, ...]:
    """The GPU backends this machine can run (none without a CUDA device)."""
    if not torch.cuda.is_available():
        return ()
    import onnxruntime

    ort_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return tuple(b for b in GPU_BACKENDS if ort_cuda or not b.startswith("onnxruntime"))


def check_backends(backends: Sequence[str]) -> None:
    """A backend that does not exist, or needs a GPU this machine lacks, is said before anything runs."""
    for b in backends:
        if b not in CPU_BACKENDS + GPU_BACKENDS and not _is_onnx_cpu(b):
            raise StepadaptError(
                f"unknown bench backend {b!r}; choose from {', '.join(CPU_BACKENDS + GPU_BACKENDS)} "
                "(or onnxruntime[-basic]-tN)"
            )
        if b in GPU_BACKENDS and b not in available_gpu_backends():
            why = "no CUDA device" if not torch.cuda.is_available() else "onnxruntime has no CUDA provider"
            raise StepadaptError(f"bench backend {b} cannot run here: {why}")


def _is_onnx_cpu(backend: str) -> bool:
    head, _, n = backend.rpartition("-t")
    return head in ("onnxruntime", "onnxruntime-basic") and n.isdigit() and int(n) > 0


def _threads(backend: str) -> int:
    """``onnxruntime[-basic]-t<threads>`` -> threads (1 for the CUDA provider: it runs on the GPU)."""
    return int(backend.rsplit("-t", 1)[1]) if _is_onnx_cpu(backend) else 1


def _on_gpu(den: Denoiser, backend: str) -> Denoiser:
    """``den`` (a module_denoiser on the GPU) under the backend's autocast, finished when it returns."""
    precision = "bf16" if backend.endswith("-bf16") else "fp32"

    def run(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast(precision, torch.device("cuda")):
            out = den(x, t).float()
        torch.cuda.synchronize()
        return out

    return run


def _ort_device(backend: str) -> str:
    """onnxruntime's device for a backend: its CUDA provider, or the CPU (never auto: a CPU backend
    must not run on CUDA where onnxruntime-gpu happens to be installed)."""
    return "cuda" if backend == "onnxruntime-cuda" else "cpu"


def _onnx_session(path: Path, backend: str):
    """``onnxruntime[-basic]-t<threads>``: the level of graph optimisation and the thread count;
    ``onnxruntime-cuda``: the CUDA provider."""
    level = "basic" if "-basic-" in backend else "all"
    return session(path, _threads(backend), level=level, device=_ort_device(backend))


def call_for(bundle: Bundle, expert: ExpertSpec, backend: str) -> Callable[[np.ndarray, np.ndarray], Any]:
    """One expert as a function of numpy inputs on ``backend``: what a step costs there."""
    if backend == "torch":
        module = bundle.load_expert(expert.name)
        den = module_denoiser(module) if isinstance(module, UNet2DModel) else module
        return lambda x, t: den(torch.from_numpy(x), torch.from_numpy(t))
    if backend.startswith("torch-cuda"):
        den = _on_gpu(bundle.denoiser(expert.name, "cuda"), backend)
        return lambda x, t: den(torch.from_numpy(x), torch.from_numpy(t))
    if backend.startswith("onnxruntime"):
        s = _onnx_session(bundle.path / expert.onnx["path"], backend)
        return lambda x, t: s.run(["eps"], {"sample": x, "timestep": timestep_feed(s, t)})
    raise StepadaptError(f"unknown backend {backend!r}")


def denoiser_for(bundle: Bundle, backend: str) -> Denoiser:
    """The bundle's router on ``backend`` (torch modules or onnxruntime sessions)."""
    if backend == "torch":
        return bundle.router()
    if backend.startswith("torch-cuda"):
        router = bundle.router("cuda")
        return Router(router.boundaries, [_on_gpu(e, backend) for e in router.experts])
    threads, device = _threads(backend), _ort_device(backend)
    experts = [OnnxDenoiser(bundle.path / e.onnx["path"], threads, device) for e in bundle.experts]
    return Router(bundle.manifest.boundaries, experts)


class Denoisers:
    """Each arm's router per backend, built once; every expert runs twice at the batch it will be
    timed at before anything is timed (onnxruntime sizes its buffers on the first runs)."""

    def __init__(self, arms: dict[str, Bundle]):
        self.arms, self.cache, self.warm = arms, {}, set()

    def get(self, arm: str, backend: str, batch: int = 1) -> Denoiser:
        key = (arm, backend)
        if key not in self.cache:
            self.cache[key] = denoiser_for(self.arms[arm], backend)
        if (arm, backend, batch) not in self.warm:
            router, shape = self.cache[key], self.arms[arm].manifest.sample_shape
            for lo, expert in zip(router.boundaries, router.experts, strict=False):
                for _ in range(2):
                    expert(torch.randn(batch, *shape), torch.full((batch,), lo, dtype=torch.long))
            self.warm.add((arm, backend, batch))
        return self.cache[key]


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- sections


def flops_section(arms: dict[str, Bundle], steps: Sequence[int], sampler: str = "ddim") -> dict[str, Any]:
    m = arms["experts"].manifest
    models = []
    for arm, b in arms.items():
        for e in b.experts:
            models.append({
                "arm": arm, "name": e.name, "kind": e.kind, "timesteps": list(e.timesteps),
                "macs": e.macs, "params": e.params, "mac_ratio": e.macs / m.base_macs,
            })  # fmt: skip
    plan_steps = (m.plan or {}).get("steps", 50)
    trajectory = []
    for n in sorted({*steps, plan_steps}, reverse=True):
        for arm, b in arms.items():
            per_image = b.manifest.macs_per_image(n, sampler)  # in base evaluations, every evaluation counted
            trajectory.append({
                "arm": arm, "sampler": sampler, "steps": n, "macs_per_image": round(per_image * m.base_macs),
                "mac_ratio": b.manifest.trajectory_macs_ratio(n, sampler),
            })  # fmt: skip
    groups = (m.plan or {}).get("groups") or []
    tdc = tdc_ratios([g["difficulty"] for g in groups], 0.5) if groups else []
    shares = [g["visit_share"] for g in groups]
    return {
        "base": {"macs": m.base_macs, "params": m.base_params},
        "models": models,
        "trajectory": trajectory,
        "tdc_rule": {"k": 0.5, "groups": len(groups), "ratios": tdc, "mac_ratio": float(np.dot(tdc, shares))}
        if groups
        else None,
        "references": REFERENCES,
    }


def latency_section(arms: dict[str, Bundle], s: BenchSettings, bar) -> dict[str, Any]:
    """Every (model, backend) at each batch, in a shuffled order per repeat so drift hits all alike."""
    m = arms["experts"].manifest
    models = [
        (arm, e) for arm, b in arms.items() for e in b.experts if not (arm == "experts" and is_base(b, e))
    ]
    fns = {(arm, e.name, be): call_for(arms[arm], e, be) for arm, e in models for be in s.backends}
    rng = random.Random(s.seed)
    cells = []
    for batch in s.batches:
        samples: dict[tuple, list[float]] = {k: [] for k in fns}
        inputs = {}
        for arm, e in models:
            x = np.random.default_rng(s.seed).standard_normal((batch, *m.sample_shape)).astype(np.float32)
            inputs[(arm, e.name)] = (x, np.full((batch,), (e.lo + e.hi) // 2, dtype=np.int64))
        for k, fn in fns.items():
            for _ in range(s.warmup):
                fn(*inputs[k[:2]])
        t_batch = time.perf_counter()
        for r in range(s.repeats):
            if r >= s.min_repeats and time.perf_counter() - t_batch > s.batch_seconds:
                break
            order = list(fns)
            rng.shuffle(order)
            for k in order:
                samples[k].append(_timed(fns[k], *inputs[k[:2]]) * 1e3)
                bar.update(1)
        for (arm, name, be), xs in samples.items():
            e = arms[arm].expert(name)
            base_ms = statistics.median(samples[("base", "base", be)])
            cells.append({
                "arm": arm, "model": name, "kind": e.kind, "backend": be, "batch": batch,
                "mac_ratio": e.macs / m.base_macs, "samples_ms": [round(v, 4) for v in xs],
                "median_ms": statistics.median(xs), "latency_ratio": statistics.median(xs) / base_ms,
            })  # fmt: skip
    return {"cells": cells}


def is_base(bundle: Bundle, e: ExpertSpec) -> bool:
    """Whether ``e`` is the base itself (nothing pruned away): timing it again would time the base arm."""
    return not bundle.is_pruned(e.name) and e.macs == bundle.manifest.base_macs


def trajectory_section(arms: dict[str, Bundle], s: BenchSettings, pool: Denoisers, bar) -> dict[str, Any]:
    m = arms["experts"].manifest
    dens = {(arm, be): pool.get(arm, be) for arm in arms for be in s.trajectory_backends}
    rng = random.Random(s.seed + 1)
    samples: dict[tuple, list[float]] = {(arm, be, n): [] for arm, be in dens for n in s.steps}
    for r in range(s.trajectory_repeats):
        order = list(samples)
        rng.shuffle(order)
        for arm, be, n in order:
            args = (dens[(arm, be)], m.scheduler, m.sample_shape, 1)
            t = _timed(sample_images, *args, steps=n, seed=r, sampler=s.sampler)
            samples[(arm, be, n)].append(t)
            bar.update(1)
    return {"rows": _time_rows(samples, arms, s.sampler)}


def _time_rows(
    samples: dict[tuple, list[float]], arms: dict[str, Bundle], sampler: str
) -> list[dict[str, Any]]:
    rows = []
    for (arm, be, n), xs in samples.items():
        base = samples.get(("base", be, n))
        rows.append({
            "arm": arm, "backend": be, "steps": n,
            "mac_ratio": arms[arm].manifest.trajectory_macs_ratio(n, sampler),
            "samples_s": [round(v, 5) for v in xs], "median_s": statistics.median(xs),
            "time_ratio": statistics.median(xs) / statistics.median(base) if base else None,
        })  # fmt: skip
    return rows


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q * 100, method="higher"))


def _load(
    url: str, concurrency: int, requests: int, steps: int, seconds: float = 1e9, sampler: str = "ddim"
) -> dict[str, Any]:
    """``requests`` one-image requests from ``concurrency`` clients at once (fewer if that would take
    over ``seconds``: then at least 3 per client); latencies and throughput."""
    lat: list[float] = []
    counter = iter(range(requests))
    deadline = time.perf_counter() + seconds

    def client(_: int) -> None:
        with Endpoint(url) as endpoint:
            for k, j in enumerate(counter):
                req = GenerateRequest(num_images=1, steps=steps, seed=j, sampler=sampler, jump=False)
                lat.append(_timed(endpoint.generate, req))
                if k >= 2 and time.perf_counter() > deadline:
                    break

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency, "requests": len(lat), "images_per_s": len(lat) / wall,
        "p50_ms": _pct(lat, 0.5) * 1e3, "p99_ms": _pct(lat, 0.99) * 1e3,
        "latencies_ms": [round(v * 1e3, 3) for v in lat],
    }  # fmt: skip


def _options(layout: str, s: BenchSettings) -> RepositoryOptions:
    """Both layouts get the same cores: ``instances`` routers (fused) or of each expert (bls)."""
    return RepositoryOptions(
        layout=layout, threads=s.threads, instances=s.instances, router_instances=max(s.concurrency),
        front_instances=max(s.concurrency), max_requests=max(s.concurrency),
    )  # fmt: skip


def serving_section(
    arms: dict[str, Bundle], s: BenchSettings, pool: Denoisers, work: Path, bar
) -> dict[str, Any]:
    m = arms["experts"].manifest
    threads_backend = f"onnxruntime-t{s.threads}"
    local = {arm: pool.get(arm, threads_backend) for arm in arms}
    in_process: dict[tuple, list[float]] = {}
    served: dict[tuple, list[float]] = {}
    layouts: dict[str, Any] = {}
    for arm in s.endpoint_arms:
        for layout in s.layouts if arm == "experts" else ("fused",):
            b = arms[arm]
            repo = write_repository(b, work / f"triton-{arm}-{layout}", _options(layout, s))
            server = TritonServer(repo, log_path=work / f"triton-{arm}-{layout}.log")
            with server, Endpoint(server.http_url) as endpoint:
                # Warm-up: every instance, every expert (5 DDIM steps visit each interval here).
                _load(server.http_url, 2 * s.instances, 4 * s.instances, WARMUP_STEPS)
                repeats = s.overhead_repeats if arm == "experts" else s.trajectory_repeats
                for n in s.steps:
                    for r in range(repeats):  # interleaved with the in-process run
                        req = GenerateRequest(num_images=1, steps=n, seed=r, sampler=s.sampler, jump=False)
                        t = _timed(endpoint.generate, req)
                        served.setdefault((arm, layout, n), []).append(t)
                        if layout == s.layouts[0]:
                            args = (local[arm], m.scheduler, m.sample_shape, 1)
                            t = _timed(sample_images, *args, steps=n, seed=r, sampler=s.sampler)
                            in_process.setdefault((arm, threads_backend, n), []).append(t)
                        bar.update(1)
                if arm == "experts":
                    levels = []
                    for c in s.concurrency:
                        _load(server.http_url, c, c, WARMUP_STEPS)  # buffers for this batch size
                        lv = _load(server.http_url, c, max(s.requests, c), s.serving_steps, s.level_seconds,
                                   s.sampler)  # fmt: skip
                        levels.append(lv)
                        bar.update(1)
                    layouts[layout] = {"options": asdict(_options(layout, s)), "levels": levels}
    # The ceiling: the same one-image requests, c of them stepped together in process, with the
    # server's threads or all of its cores in one session, whichever is faster.
    ceiling = []
    cores = sorted({s.threads, s.threads * s.instances})
    for c in s.concurrency:
        best = {}
        for t in cores:
            den = pool.get("experts", f"onnxruntime-t{t}", batch=c)
            args = (den, m.scheduler, m.sample_shape, [(1, j) for j in range(c)])
            kw = {"steps": s.serving_steps, "sampler": s.sampler}
            xs = [_timed(sample_together, *args, **kw) for _ in range(s.trajectory_repeats)]
            best[t] = c / statistics.median(xs)
        t = max(best, key=best.get)
        ceiling.append({"concurrency": c, "batch": c, "threads": t, "images_per_s": best[t]})
    overhead = {}
    for (arm, layout, n), xs in served.items():
        local_s = statistics.median(in_process[(arm, threads_backend, n)])
        overhead[f"{arm}/{layout}/{n}"] = {
            "arm": arm, "layout": layout, "steps": n, "endpoint_ms": statistics.median(xs) * 1e3,
            "in_process_ms": local_s * 1e3,
            "router_overhead_ms_per_step": (statistics.median(xs) - local_s) * 1e3 / n,
        }  # fmt: skip
    times = {(a, f"endpoint-{lay}", n): xs for (a, lay, n), xs in served.items()}
    times |= {(a, be, n): xs for (a, be, n), xs in in_process.items()}
    rows = _time_rows(times, arms, s.sampler)
    return {"threads": s.threads, "steps": s.serving_steps, "layouts": layouts, "ceiling": ceiling,
            "router_overhead": list(overhead.values()), "trajectory_rows": rows}  # fmt: skip


# ----------------------------------------------------------------------------- the run


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "gpu": gpu}


def versions() -> dict[str, str]:
    import diffusers
    import onnxruntime

    out = {"stepadapt": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "onnxruntime": onnxruntime.__version__, "diffusers": diffusers.__version__,
           "torch_pruning": tp.__version__}  # fmt: skip
    try:
        from importlib.metadata import version

        out["nvidia-pytriton"] = version("nvidia-pytriton")
    except Exception:  # noqa: BLE001 - informational only
        pass
    return out


def commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                           cwd=Path(__file__).parent)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
        return (r.stdout.strip() + ("+dirty" if dirty else "")) if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _steps_total(arms: dict[str, Bundle], s: BenchSettings) -> int:
    n = 0
    if "latency" in s.sections:
        models = sum(len(b.experts) for b in arms.values())
        models -= sum(is_base(arms["experts"], e) for e in arms["experts"].experts)
        n += len(s.batches) * s.repeats * models * len(s.backends)
    if "trajectory" in s.sections:
        n += len(arms) * len(s.trajectory_backends) * len(s.steps) * s.trajectory_repeats
    if "serving" in s.sections:
        n += (len(s.endpoint_arms) - 1) * len(s.steps) * s.trajectory_repeats
        n += len(s.layouts) * len(s.steps) * s.overhead_repeats
        n += len(s.layouts) * len(s.concurrency)
    if "load" in s.sections:
        n += len(s.load.multipliers) * len(s.load.arms)
    return n


def run_bench(
    bundle_path: str | os.PathLike,
    settings: BenchSettings,
    *,
    work: str | os.PathLike,
    base: str | os.PathLike | None = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure one bundle; returns the report (the caller writes it)."""
    s = settings
    unknown = set(s.sections) - set(SECTIONS)
    if unknown:
        raise StepadaptError(f"unknown bench section(s) {', '.join(sorted(unknown))}; choose from {SECTIONS}")
    check_backends((*s.backends, *s.trajectory_backends))
    bundle = Bundle.load(bundle_path)
    if not bundle.manifest.conditioning.unconditional:
        raise StepadaptError(f"{bundle_path} is conditional: bench times unconditional bundles only so far")
    work = Path(work)
    torch.set_num_threads(s.threads)
    arms = prepare_arms(bundle, work, Path(base) if base else None, log=log)
    report: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "name": Path(bundle_path).name,
        "bundle": str(bundle_path), "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(), "versions": versions(), "commit": commit(), "settings": asdict(s),
        "weights": "the base's own" if base else "the bundle's experts; base and uniform freshly initialised "
        "(timing does not depend on weights)",
        "skipped": _skipped(),
    }  # fmt: skip
    with progress(total=_steps_total(arms, s), desc=f"bench {report['name']}", unit="run") as bar:
        if "flops" in s.sections:
            report["flops"] = flops_section(arms, s.steps, s.sampler)
        if "latency" in s.sections:
            report["latency"] = latency_section(arms, s, bar)
        pool = Denoisers(arms)
        if "trajectory" in s.sections:
            report["trajectory"] = trajectory_section(arms, s, pool, bar)
        if "serving" in s.sections:
            report["serving"] = serving_section(arms, s, pool, work, bar)
        if "load" in s.sections:
            report["load"] = load_section(
                arms, s.load, work, s.threads, s.instances, log=log, tick=lambda: bar.update(1),
                quality_of=Path(bundle_path),
            )  # fmt: skip
    return report


def _skipped() -> dict[str, str]:
    from stepadapt.export.tensorrt import unavailable_reason

    out = {}
    reason = unavailable_reason()
    if reason:
        out["tensorrt"] = reason
    if not torch.cuda.is_available():
        out["gpu"] = f"no CUDA device on this machine: {', '.join(GPU_BACKENDS)} not run"
    elif "onnxruntime-cuda" not in available_gpu_backends():
        out["gpu"] = "onnxruntime has no CUDA provider (install onnxruntime-gpu): onnxruntime-cuda not run"
    return out


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write the report; the sections it did not measure are kept from the report already there
    (``--sections load`` adds one section to a full run), each with the run that measured it in
    ``section_runs``."""
    path = Path(out_dir) / f"bench-{report['name']}.json"
    run = {k: report.get(k) for k in ("command", "commit", "created", "machine")}
    runs = {sec: run for sec in SECTIONS if sec in report}
    if path.is_file():
        from stepadapt.io import read_json

        old = read_json(path, "bench report")
        kept = [sec for sec in SECTIONS if sec in old and sec not in report]
        if kept and old.get("bundle") == report.get("bundle"):
            previous = {k: old.get(k) for k in ("command", "commit", "created", "machine")}
            for sec in kept:
                report[sec] = old[sec]
                runs[sec] = old.get("section_runs", {}).get(sec, previous)
            # The page's header stays the main run's; the sections measured now name their own run.
            for k in ("command", "commit", "created", "machine", "versions", "weights"):
                report[k] = old.get(k, report.get(k))
            report["settings"] = {**old.get("settings", {}), "load": report["settings"].get("load")}
    report["section_runs"] = {sec: runs[sec] for sec in SECTIONS if sec in runs}
    write_json(path, report)
    return path


def check_report(report: dict[str, Any]) -> list[str]:
    """Schema problems of a report (empty when sound): keys, types, positive finite figures."""
    problems = []
    if report.get("format") != FORMAT or report.get("version") != VERSION:
        problems.append("format/version")
    for key in ("name", "machine", "versions", "settings"):
        if key not in report:
            problems.append(f"missing {key}")

    def figures(path: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                figures(f"{path}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                figures(f"{path}[{i}]", v)
        elif isinstance(value, bool) or value is None or isinstance(value, str):
            return
        elif isinstance(value, int | float):
            if not np.isfinite(value) or (value < 0 and "overhead" not in path):
                problems.append(f"{path} = {value}")
            if value == 0 and any(w in path for w in ("_ms", "_s", "macs", "per_s", "ratio")) \
                    and "overhead" not in path and "goodput" not in path:  # fmt: skip
                problems.append(f"{path} is zero")

    for section in SECTIONS:
        if section in report:
            figures(section, report[section])
    return problems
