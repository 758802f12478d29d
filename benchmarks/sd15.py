"""Stable Diffusion 1.5's U-Net architecture through the whole chain, timed on this CPU.

The issue asks whether step-adaptive experts pay off at the size people serve, not only at
ddpm-cifar10's: the SD 1.5 U-Net (its public config numbers; random seeded weights, built here and
never fetched: timing does not depend on weights) is pruned by the real ``stepadapt analyze`` and
``stepadapt prune`` into 4 experts at 0.5 x MACs, each expert is checked (trajectory mean MACs
within 5 % of the budget, every attention's heads whole) and exported to ONNX with parity, and one
classifier-free-guidance step (batch 2, 77-token text) of the base and of every expert is timed in
onnxruntime with the project's session settings, interleaved.

    python -m benchmarks.sd15            # the full architecture (make bench-sd15; about an hour here)
    python -m benchmarks.sd15 --quick    # a scaled-down SD-like U-Net through the same code (a minute)

Each heavy stage runs in a process of its own: its peak memory is its own (the report keeps it)
and the memory an SD-sized stage leaves behind is not the next stage's. Stages whose outputs are
already in the work directory (same settings) are not run again; their recorded times are kept.
Writes the report (``benchmarks/results/sd15.json``) and its section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepadapt import StepadaptError
from stepadapt.io import atomic_path, read_json, write_json
from stepadapt.progress import progress
from stepadapt.schedule import SD_SCHEDULER

FORMAT, VERSION = "stepadapt-bench-sd15", 1
TITLE = "Stable Diffusion 1.5 U-Net architecture (random weights, timing only)"
BEGIN, END = "<!-- sd15:begin (python -m benchmarks.sd15) -->", "<!-- sd15:end -->"
# runwayml/stable-diffusion-v1-5 unet/config.json, as published (diffusers' defaults for the rest).
SD15_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
    mid_block_scale_factor=1,
)  # fmt: skip
# The same blocks at toy widths: what --quick and the test run through the same code.
QUICK_CONFIG: dict[str, Any] = {
    **SD15_CONFIG, "sample_size": 16, "block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 32,
    "attention_head_dim": 4, "norm_num_groups": 8, "layers_per_block": 1,
}  # fmt: skip
# The settings a stage's outputs depend on: a change there starts the work directory afresh.
MAKE_COMMAND = "python -m benchmarks.sd15"  # what `make bench-sd15` runs (with the venv's python)
BUILD_KEYS = ("config", "seed", "groups", "budget", "proxy_size", "analyze_rows", "parity_batches")


@dataclass
class Sd15Settings:
    """One run; ``quick`` is the scaled-down architecture (the figures only have to exist)."""

    config: dict[str, Any] = field(default_factory=lambda: dict(SD15_CONFIG))
    quick: bool = False
    work: str = "runs/bench/sd15"
    groups: int = 4
    budget: float = 0.5
    tol: float = 0.05  # the trajectory mean may miss the budget by this share of it
    proxy_size: int = 16  # per prune proxy set (the .npz holds twice as many training latents)
    analyze_rows: int = 2  # held-out latents of analyze's loss profile (40 timesteps each)
    parity_batches: tuple[int, ...] = (2,)  # the batch every step is served at under CFG
    batch: int = 2  # classifier-free guidance: the conditional and the unconditional row
    tokens: int = 77  # CLIP's context length
    threads: tuple[int, ...] = (2,)  # onnxruntime intra-op threads per session (2: this VM's cores)
    repeats: int = 7
    warmup: int = 2
    seed: int = 0
    isolate: bool = True  # each heavy stage in a process of its own

    @classmethod
    def quick_run(cls, work: str = "runs/bench/sd15-quick") -> Sd15Settings:
        return cls(config=dict(QUICK_CONFIG), quick=True, work=work, proxy_size=4, threads=(1,), repeats=3,
                   warmup=1)  # fmt: skip

    @property
    def text_dim(self) -> int:
        return int(self.config["cross_attention_dim"])

    def build_stamp(self) -> dict[str, Any]:
        return json.loads(json.dumps({k: getattr(self, k) for k in BUILD_KEYS}))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sd15Settings:
        tuples = {"parity_batches", "threads"}
        return cls(**{f.name: tuple(d[f.name]) if f.name in tuples else d[f.name] for f in fields(cls)})


class Work:
    """Where one run's files live (runs/ is git-ignored): the base, the latents, the plan, the bundle."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.base, self.data = self.root / "base", self.root / "latents.npz"
        self.plan, self.bundle = self.root / "plan.json", self.root / "experts"
        self.base_onnx = self.root / "base-onnx" / "base.onnx"
        self.settings, self.stages = self.root / "settings.json", self.root / "stages"

    def stage(self, name: str) -> Path:
        return self.stages / f"{name}.json"

    def reset_if_changed(self, s: Sd15Settings) -> None:
        """Outputs made with other settings are not reused: they go, the new settings are kept."""
        if self.settings.is_file() and read_json(self.settings).get("build") == s.build_stamp():
            write_json(self.settings, {"build": s.build_stamp(), "run": asdict(s)})
            return
        for p in (self.base, self.bundle, self.base_onnx.parent, self.stages):
            shutil.rmtree(p, ignore_errors=True)
        for p in (self.data, self.plan, self.root / "experts.memory.json"):
            p.unlink(missing_ok=True)
        write_json(self.settings, {"build": s.build_stamp(), "run": asdict(s)})


def cli() -> str:
    """The project's own ``stepadapt`` beside this interpreter (the venv's), else the one on PATH."""
    own = Path(sys.executable).with_name("stepadapt")
    return str(own) if own.is_file() else "stepadapt"


def _rss_gb(kb: int) -> float:
    return round(kb / 1e6, 2)  # Linux reports ru_maxrss in kB


# glibc keeps freed heap memory for reuse; tensors above this size get their own mappings instead,
# which go back to the system when freed (measured: 1.4 GB less after an SD 1.5 DepGraph trace).
# Not while timing: there onnxruntime's own arena allocates.
SMALL_HEAP = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def run_process(
    cmd: Sequence[str], log: Callable[[str], None] = print, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``cmd`` (output to ours); its wall time and its own peak RSS (wait4: not the whole family's)."""
    log("$ " + " ".join(map(str, cmd)))
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise StepadaptError(
            f"{Path(cmd[0]).name} {cmd[1]} failed (exit {proc.returncode}) after {wall:.0f} s"
        )
    return {
        "command": " ".join(map(str, cmd)),
        "wall_s": round(wall, 1),
        "peak_rss_gb": _rss_gb(usage.ru_maxrss),
    }


# ----------------------------------------------------------------------------- stages


def build_base(s: Sd15Settings, work: Work) -> dict[str, Any]:
    """The architecture with seeded random weights as a base dir (SD's scheduler), and latents for
    the proxies: N x 4 x H x W floats (training part for prune's two proxy sets, a held-out part
    for analyze's loss profile), in the image range the data loader clamps to."""
    from diffusers import UNet2DConditionModel

    from stepadapt.models import save_base

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = UNet2DConditionModel(**s.config).eval()
    save_base(model, work.base, SD_SCHEDULER)
    params = sum(p.numel() for p in model.parameters())
    del model
    rng = np.random.default_rng(s.seed)
    c, size = s.config["in_channels"], s.config["sample_size"]

    def latents(n: int) -> np.ndarray:
        return np.clip(0.5 * rng.standard_normal((n, c, size, size)), -1, 1).astype(np.float32)

    with atomic_path(work.data) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=latents(2 * s.proxy_size), test=latents(s.analyze_rows))
    return {"params": params}


def attention_of(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Every diffusers Attention's (heads, q width), by module name."""
    from diffusers.models.attention_processor import Attention

    return {n: (m.heads, m.to_q.out_features) for n, m in model.named_modules() if isinstance(m, Attention)}


def attention_problems(
    base: dict[str, tuple[int, int]], model: torch.nn.Module, text_dim: int
) -> tuple[list[str], dict[str, int]]:
    """What breaks the head structure (tests/test_condition_prune.py's check, as problems to report):
    heads changed, q/k/v/out widths other than heads x one head dim, a cross-attention's key/value
    input narrowed from the text width; and the counts (attentions, cross, narrowed)."""
    from diffusers.models.attention_processor import Attention

    problems, counts = [], {"attentions": 0, "cross": 0, "narrowed": 0}
    for name, a in model.named_modules():
        if not isinstance(a, Attention):
            continue
        heads, width0 = base[name]
        head_dim, rest = divmod(a.to_q.out_features, a.heads)
        width = a.heads * head_dim
        widths = (a.to_q.out_features, a.to_k.out_features, a.to_v.out_features, a.to_out[0].in_features)
        kv_in = (a.to_k.in_features, a.to_v.in_features)
        want_in = text_dim if a.is_cross_attention else a.to_q.in_features
        if a.heads != heads or rest or head_dim < 1:
            problems.append(f"{name}: {a.heads} heads (base {heads}), q width {a.to_q.out_features}")
        elif set(widths) != {width} or (a.inner_dim, a.inner_kv_dim) != (width, width):
            problems.append(f"{name}: q/k/v/out widths {widths}, not {heads} heads x {head_dim}")
        elif kv_in != (want_in, want_in) or a.cross_attention_dim != want_in:
            problems.append(f"{name}: key/value input widths {kv_in}, want {want_in}")
        elif a.scale_qk and abs(a.scale - head_dim**-0.5) > 1e-9:
            problems.append(f"{name}: scale {a.scale} for head dim {head_dim}")
        counts["attentions"] += 1
        counts["cross"] += bool(a.is_cross_attention)
        counts["narrowed"] += width < width0
    return problems, counts


def step_inputs(s: Sd15Settings, batch: int = 1, t: int = 500) -> dict[str, torch.Tensor]:
    """One step's inputs with a whole text context: what the MACs of a served step are counted on."""
    g = torch.Generator().manual_seed(s.seed)
    c, size = s.config["in_channels"], s.config["sample_size"]
    return {"sample": torch.randn(batch, c, size, size, generator=g), "timestep": torch.full((batch,), t),
            "encoder_hidden_states": torch.randn(batch, s.tokens, s.text_dim, generator=g)}  # fmt: skip


def check_bundle(s: Sd15Settings, work: Work) -> dict[str, Any]:
    """The issue's acceptance on the pruned bundle: the number of experts, the trajectory mean
    within ``tol`` of the budget, every attention's heads whole; and each expert's MACs for a step
    with the whole 77-token text (the manifest's are traced with a 7-token one)."""
    from stepadapt.bundle import Bundle
    from stepadapt.models import load_base
    from stepadapt.prune import count_macs

    bundle = Bundle.load(work.bundle)
    m = bundle.manifest
    base, _ = load_base(work.base)
    heads = attention_of(base)
    with torch.no_grad():  # the same count; with autograd an SD-sized trace holds GBs of activations
        macs77 = {"base": count_macs(base, step_inputs(s))[0]}
    del base
    gc.collect()
    problems, experts = [], []
    with progress(total=len(bundle.experts), desc="check experts", unit="expert") as bar:
        for e in bundle.experts:
            model = bundle.load_expert(e.name)
            found, counts = attention_problems(heads, model, s.text_dim)
            problems += [f"{e.name} {p}" for p in found]
            with torch.no_grad():
                macs77[e.name] = count_macs(model, step_inputs(s))[0]
            experts.append({"name": e.name, "attention": counts, "is_base": not bundle.is_pruned(e.name)})
            del model
            gc.collect()
            bar.update(1)
    mean = m.trajectory_macs_ratio()
    return {
        "experts": len(bundle.experts), "experts_ok": len(bundle.experts) == s.groups,
        "trajectory_mac_ratio": mean, "mean_ok": abs(mean - s.budget) <= s.tol * s.budget,
        "attention_problems": problems, "per_expert": experts, "macs_77": macs77,
    }  # fmt: skip


def export_onnx(s: Sd15Settings, work: Work, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every expert to ONNX with parity (the project's export_bundle, at the served batch); the base
    too, unless one expert is the base itself (then its file is the base's)."""
    from stepadapt.export.onnx import FP32_ATOL, OnnxDenoiser, export_bundle, export_model, parity

    from stepadapt.bundle import Bundle
    from stepadapt.models import load_base

    bundle = Bundle.load(work.bundle)
    t0 = time.perf_counter()
    reports = export_bundle(bundle, batches=s.parity_batches, log=log)
    errs = {r.name: {"max_abs_err": r.max_abs_err, "seconds": round(r.seconds, 1)} for r in reports}
    out: dict[str, Any] = {"experts": errs, "atol": FP32_ATOL, "batches": list(s.parity_batches)}
    if not any(not bundle.is_pruned(e.name) for e in bundle.experts):
        log("no expert is the base itself: exporting the base")
        base, _ = load_base(work.base)
        work.base_onnx.parent.mkdir(parents=True, exist_ok=True)
        export_model(base, work.base_onnx)
        err = parity(base, OnnxDenoiser(work.base_onnx, threads=1, device="cpu"), 0, 1000, s.parity_batches)
        if not np.isfinite(err) or err > FP32_ATOL:
            raise StepadaptError(f"base: ONNX parity failed (max abs error {err:.2e} > {FP32_ATOL:.0e})")
        out["base"] = {"max_abs_err": err}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def onnx_models(work: Work) -> dict[str, tuple[Path, int]]:
    """name -> (ONNX file, the timestep it is timed at: its interval's middle); ``base`` first."""
    from stepadapt.bundle import Bundle

    bundle = Bundle.load(work.bundle, verify=False)
    models: dict[str, tuple[Path, int]] = {}
    for e in bundle.experts:
        if not bundle.is_pruned(e.name) and "base" not in models:
            models["base"] = (bundle.path / e.onnx["path"], 500)  # the base itself: timed once, as the base
        else:
            models[e.name] = (bundle.path / e.onnx["path"], (e.lo + e.hi) // 2)
    if "base" not in models:
        models["base"] = (work.base_onnx, 500)
    return {"base": models.pop("base"), **models}


def time_steps(s: Sd15Settings, work: Work) -> dict[str, Any]:
    """One CFG step (batch 2, 77-token text) per model in onnxruntime, the project's sessions. The
    base's session stays open and each expert's opens beside it in turn (all four SD 1.5 sessions at
    once were killed at 16.8 GB here: onnxruntime holds about twice the weights); after warm-up,
    ``repeats`` rounds time the base and the expert back to back in a shuffled order, so drift hits
    both alike and each ratio is paired. Raw samples kept (ms)."""
    from stepadapt.export.runtime import session

    models = onnx_models(work)
    base_path, _ = models.pop("base")
    rng, out = random.Random(s.seed), {}
    total = len(s.threads) * (s.warmup + len(models) * (s.warmup + 2 * s.repeats))
    with progress(total=total, desc="time steps", unit="step") as bar:
        for threads in s.threads:
            base = session(base_path, threads, device="cpu")
            for _ in range(s.warmup):
                _step(base, s, 500)
                bar.update(1)
            samples: dict[str, list[float]] = {}
            paired: dict[str, list[float]] = {}
            load = [os.getloadavg()[0]]  # the machine is shared: how busy it was while timing
            for name, (path, t) in models.items():
                expert = session(path, threads, device="cpu")
                for _ in range(s.warmup):
                    _step(expert, s, t)
                    bar.update(1)
                samples[name], paired[name] = [], []
                for _ in range(s.repeats):
                    order = ["base", name]
                    rng.shuffle(order)
                    for which in order:
                        ms = _step(base, s, 500) if which == "base" else _step(expert, s, t)
                        (paired if which == "base" else samples)[name].append(round(ms, 3))
                        bar.update(1)
                del expert  # the only reference: its memory goes before the next expert's session
                give_back_memory()
            load.append(os.getloadavg()[0])
            out[f"t{threads}"] = {"samples_ms": samples, "base_ms": paired, "loadavg": load,
                                  "timesteps": {n: t for n, (_, t) in models.items()}}  # fmt: skip
            del base
            gc.collect()
    return out


def give_back_memory() -> None:
    """Free what a closed session left and hand glibc's free heap back to the system: onnxruntime's
    arena frees into the heap, which glibc keeps (measured: an SD 1.5 expert's next session was
    killed at 19.8 GB beside the base's, where base and expert take 16 GB)."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _step(sess: Any, s: Sd15Settings, t: int) -> float:
    """One step's time (ms); the same latents and text for every model, ``t`` the timestep."""
    from stepadapt.export.runtime import timestep_feed

    c, size = s.config["in_channels"], s.config["sample_size"]
    g = np.random.default_rng(s.seed)
    feed = {
        "sample": g.standard_normal((s.batch, c, size, size)).astype(np.float32),
        "timestep": timestep_feed(sess, np.full(s.batch, t)),
        "encoder_hidden_states": g.standard_normal((s.batch, s.tokens, s.text_dim)).astype(np.float32),
    }
    t0 = time.perf_counter()
    sess.run(["eps"], feed)
    return (time.perf_counter() - t0) * 1e3


class Collector:
    """Python's full garbage collection every ``interval`` seconds while a stage runs (never while
    timing). torch-pruning's op counter, which ``stepadapt.prune.count_macs`` calls, deep-copies the
    model and binds methods to the copy: a reference cycle, so every count leaves a copy of the model
    (3.4 GB of SD 1.5) until the next full collection, which a process holding a U-Net's many
    long-lived objects seldom makes. Measured here: ``stepadapt prune`` on SD 1.5 was killed at
    20.7 GB RSS in its first attempt at g1 on this 24 GB machine."""

    def __init__(self, interval: float = 2.0):
        self.interval, self.stop = interval, threading.Event()
        self.thread = threading.Thread(target=self._run, name="collector", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            gc.collect()

    def __enter__(self) -> Collector:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def prune_experts(s: Sd15Settings, work: Work) -> dict[str, Any]:
    """``stepadapt prune`` as the command runs it (its library function, with the command line it
    would record), here so that the stage's process collects the op counter's model copies."""
    from stepadapt.compress import PruneOptions, prune

    line = " ".join(["stepadapt", *cli_commands(s, work)["prune"][1:]])
    o = PruneOptions(
        out=work.bundle, plan=work.plan, base=work.base, data=str(work.data), proxy_size=s.proxy_size,
        candidates=("magnitude/local",), seed=s.seed, device="cpu",
    )  # fmt: skip
    m = prune(o, log=print, command=line)
    for e in m.experts:
        print(f"{e.name} [{e.lo}, {e.hi}): {e.macs / m.base_macs:.3f} x base, {e.params / 1e6:.1f} M params")
    return {"cli": line}


STAGES: dict[str, Callable[[Sd15Settings, Work], dict[str, Any]]] = {
    "base": build_base, "prune": prune_experts, "check": check_bundle, "export": export_onnx,
    "time": time_steps,
}  # fmt: skip
CACHED = ("base", "analyze", "prune", "check", "export")  # reused from the work directory; "time" always runs


def cli_commands(s: Sd15Settings, work: Work) -> dict[str, list[str]]:
    """analyze and prune as a user runs them (the Makefile's ddpm-cifar10 chain, on latents)."""
    common = ["--base", str(work.base), "--data", str(work.data), "--device", "cpu"]
    return {
        "analyze": [cli(), "analyze", *common, "--groups", str(s.groups), "--budget", str(s.budget),
                    "--gaussian", "off", "--floor", "0.05",  # SNR's split, as timed (random weights)
                    "--proxy-size", str(s.analyze_rows), "--seed", str(s.seed), "--out", str(work.plan)],
        "prune": [cli(), "prune", *common, "--plan", str(work.plan), "--candidates", "magnitude/local",
                  "--proxy-size", str(s.proxy_size), "--seed", str(s.seed), "--out", str(work.bundle)],
    }  # fmt: skip


def run_stage(name: str, s: Sd15Settings, work: Work, log: Callable[[str], None] = print) -> dict[str, Any]:
    """One stage (reused where its record is there): the CLI's, or ours in a process of its own
    (``isolate``) or in this one (then its peak is this process's so far)."""
    record = work.stage(name)
    if name in CACHED and record.is_file():
        log(f"stage {name}: reusing {record}")
        return read_json(record)
    if name == "analyze":
        out = {**run_process(cli_commands(s, work)[name], log, SMALL_HEAP), "result": {}}
    elif s.isolate:
        result_path = work.stages / f"{name}.result.json"
        result_path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "stepadapt.benchmarks.sd15", "--stage", name, "--work", str(work.root)]
        out = {
            **run_process(cmd, log, SMALL_HEAP if name != "time" else None),
            "result": read_json(result_path),
        }
    else:
        log(f"stage {name} (in process)")
        t0 = time.perf_counter()
        with Collector() if name != "time" else nullcontext():
            result = STAGES[name](s, work)
        peak = _rss_gb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        out = {"command": "in process", "wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gb": peak,
               "result": result}  # fmt: skip
    write_json(record, out)
    return out


def accept(check: dict[str, Any], s: Sd15Settings) -> None:
    """Stop before the long export where the bundle misses what the issue asks."""
    why = []
    if not check["experts_ok"]:
        why.append(f"{check['experts']} experts, not {s.groups}")
    if not check["mean_ok"]:
        why.append(
            f"trajectory mean {check['trajectory_mac_ratio']:.3f} x base MACs, not {s.budget} +- {s.tol:.0%}"
        )
    why += check["attention_problems"][:10]
    if why:
        raise StepadaptError("the pruned SD 1.5 bundle fails its checks: " + "; ".join(why))


def run(s: Sd15Settings, command: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every stage, then the report (the caller writes it)."""
    work = Work(s.work)
    work.root.mkdir(parents=True, exist_ok=True)
    work.reset_if_changed(s)
    t0 = time.perf_counter()
    stages = {}
    for name in ("base", "analyze", "prune", "check", "export", "time"):
        stages[name] = run_stage(name, s, work, log)
        if name == "check":
            accept(stages[name]["result"], s)
    return make_report(s, work, stages, command, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- the report


def machine() -> dict[str, Any]:
    """lscpu's model name and the cores, beside bench's platform line; and why there is no GPU figure."""
    from stepadapt.benchmarks.bench import machine as bench_machine

    m = bench_machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m["cpu"] = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, subprocess.SubprocessError, StopIteration):
        pass
    m["gpu_run"] = f"on {m['gpu']}: not run by this benchmark" if m["gpu"] else "not run: no GPU lent"
    return m


def _latency(xs: list[float], base: list[float]) -> dict[str, Any]:
    """Median and spread of one model's step, and its ratio to the base: of the medians, and the
    range of the per-round ratios (each round times the expert and the base back to back)."""
    ratios = [a / b for a, b in zip(xs, base, strict=True)]
    return {"median_ms": statistics.median(xs), "min_ms": min(xs), "max_ms": max(xs),
            "latency_ratio": statistics.median(xs) / statistics.median(base),
            "round_ratio_min": min(ratios), "round_ratio_max": max(ratios)}  # fmt: skip


def make_report(
    s: Sd15Settings, work: Work, stages: dict[str, dict], command: str, wall: float
) -> dict[str, Any]:
    from stepadapt.benchmarks.bench import commit, versions

    from stepadapt.bundle import Bundle

    bundle = Bundle.load(work.bundle, verify=False)
    m = bundle.manifest
    check, exported, timing = (stages[k]["result"] for k in ("check", "export", "time"))
    macs77, shares = check["macs_77"], m.visit_shares()
    base_t = {th: [x for xs in t["base_ms"].values() for x in xs] for th, t in timing.items()}

    def latency(th: str, name: str, is_base: bool) -> dict[str, Any]:
        t = timing[th]  # the base itself is the base's samples; an expert's ratio is to its paired base runs
        return (
            _latency(base_t[th], base_t[th])
            if is_base
            else _latency(t["samples_ms"][name], t["base_ms"][name])
        )

    experts = []
    for e, share in zip(m.experts, shares, strict=True):
        is_base = not bundle.is_pruned(e.name)
        experts.append({
            "name": e.name, "timesteps": list(e.timesteps), "visit_share": share, "is_base": is_base,
            "macs": e.macs, "mac_ratio": e.macs / m.base_macs, "params": e.params,
            "macs_77": macs77[e.name], "mac_ratio_77": macs77[e.name] / macs77["base"],
            "onnx_max_abs_err": exported["experts"][e.name]["max_abs_err"],
            "latency": {th: latency(th, e.name, is_base) for th in timing},
        })  # fmt: skip
    traj = {
        "sampler": (m.plan or {}).get("sampler", "ddim"), "steps": (m.plan or {}).get("steps", 50),
        "mac_ratio": m.trajectory_macs_ratio(),
        "mac_ratio_77": sum(x["visit_share"] * x["mac_ratio_77"] for x in experts),
        "latency_ratio": {th: sum(x["visit_share"] * x["latency"][th]["latency_ratio"] for x in experts)
                          for th in timing},
        "ms_per_step": {th: sum(x["visit_share"] * x["latency"][th]["latency_ratio"] for x in experts)
                        * statistics.median(base_t[th]) for th in timing},
    }  # fmt: skip
    return {
        "format": FORMAT, "version": VERSION, "name": "sd15-quick" if s.quick else "sd15", "title": TITLE,
        "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(), "versions": versions(), "commit": commit(), "settings": asdict(s),
        "scheduler": SD_SCHEDULER, "weights": "random seeded weights (timing only; never fetched)",
        "base": {"macs": m.base_macs, "params": m.base_params, "macs_77": macs77["base"],
                 "latency": {th: _latency(xs, xs) for th, xs in base_t.items()}},
        "experts": experts, "trajectory": traj,
        "loadavg_while_timing": {th: t.get("loadavg") for th, t in timing.items()},
        "checks": {k: check[k] for k in ("experts", "experts_ok", "trajectory_mac_ratio", "mean_ok",
                                         "attention_problems", "per_expert")},
        "parity": {k: exported[k] for k in ("atol", "batches", "experts") if k in exported}
        | ({"base": exported["base"]} if "base" in exported else {}),
        "stages": {k: {x: v[x] for x in ("command", "wall_s", "peak_rss_gb")} for k, v in stages.items()},
        "wall_s": round(sum(v["wall_s"] for v in stages.values()), 1),  # making all of it, reused stages too
        "wall_s_this_invocation": round(wall, 1),
    }  # fmt: skip


def _f(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def _ms(x: float) -> str:
    return f"{x:.1f} ms" if x < 1000 else f"{x / 1e3:.2f} s"


def _macs(x: float) -> str:
    return f"{x / 1e9:.1f} G" if x >= 1e9 else f"{x / 1e6:.2f} M"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]


def _expert_rows(r: dict[str, Any], ths: list[str]) -> list[list[str]]:
    """The per-step table: the base, each expert, and the trajectory mean."""
    b, t, batch = r["base"], r["trajectory"], r["settings"]["batch"]
    rows = [["base", "[0, 1000)", "—", _macs(b["macs"]), "1.000", _macs(batch * b["macs_77"]), "1.000"]]
    for th in ths:
        x = b["latency"][th]
        rows[0].append(f"{_ms(x['median_ms'])} (runs {_ms(x['min_ms'])}–{_ms(x['max_ms'])})")
    for e in r["experts"]:
        name = e["name"] + (" (the base itself)" if e["is_base"] else "")
        row = [name, f"[{e['timesteps'][0]}, {e['timesteps'][1]})", _f(e["visit_share"], 2), _macs(e["macs"])]
        row += [_f(e["mac_ratio"]), _macs(batch * e["macs_77"]), _f(e["mac_ratio_77"])]
        for th in ths:
            x = e["latency"][th]
            spread = f"{_f(x['round_ratio_min'])}–{_f(x['round_ratio_max'])}"
            row.append(f"{_ms(x['median_ms'])} ({_f(x['latency_ratio'])}; {spread})")
        rows.append(row)
    mean = [f"trajectory mean ({t['sampler']} {t['steps']})", "", "", "", f"**{_f(t['mac_ratio'])}**", ""]
    mean += [_f(t["mac_ratio_77"])]
    mean += [f"{_ms(t['ms_per_step'][th])} (**{_f(t['latency_ratio'][th])}**)" for th in ths]
    return rows + [mean]


def _checks(r: dict[str, Any]) -> list[str]:
    s, c, p, cfg = r["settings"], r["checks"], r["parity"], r["settings"]["config"]
    atts = c["per_expert"][0]["attention"] if c["per_expert"] else {}
    narrowed = ", ".join(f"{x['name']} {x['attention']['narrowed']}" for x in c["per_expert"])
    held = "all hold" if not c["attention_problems"] else "**" + "; ".join(c["attention_problems"][:5]) + "**"
    errs = ", ".join(f"{k} {v['max_abs_err']:.1e}" for k, v in p["experts"].items())
    errs += f"; base {p['base']['max_abs_err']:.1e}" if "base" in p else ""
    met = "met" if c["mean_ok"] else "**missed**"
    return [
        "Checks:",
        "",
        f"- {c['experts']} experts; trajectory mean {_f(c['trajectory_mac_ratio'])} x the base's MACs "
        f"(budget {s['budget']} ± {s['tol']:.0%}: {met})",
        f"- attention: {atts.get('attentions', 0)} Attention modules per expert ({atts.get('cross', 0)} "
        f"cross) keep {cfg['attention_head_dim']} heads, q/k/v/out widths = heads x one head dim, "
        f"cross-attention key/value input {cfg['cross_attention_dim']} wide: {held}; attentions narrowed "
        f"per expert: {narrowed}",
        f"- ONNX parity (batch {', '.join(map(str, p['batches']))}, max abs error vs PyTorch, atol "
        f"{p['atol']:.0e}): {errs}",
        "",
    ]


def _load(r: dict[str, Any]) -> list[str]:
    loads = [x for v in (r.get("loadavg_while_timing") or {}).values() if v for x in v]
    if not loads:
        return []
    return [
        f"- Load: the 1-minute load average was {min(loads):.1f}–{max(loads):.1f} on the "
        f"{r['machine']['cores']} cores while timing (the machine is shared); every round times an expert "
        "back to back with the base, so the per-round ratio ranges show what that noise does to a ratio"
    ]


def render_section(r: dict[str, Any]) -> list[str]:
    """The report as a section of docs/benchmarks.md: what was run, on what, and every figure."""
    s, m, cfg = r["settings"], r["machine"], r["settings"]["config"]
    ths = list(r["trajectory"]["latency_ratio"])
    out = [BEGIN, f"## {r['title']}", ""]
    out += [
        f"The SD 1.5 U-Net architecture (block_out_channels {tuple(cfg['block_out_channels'])}, "
        f"cross_attention_dim {cfg['cross_attention_dim']}, {cfg['attention_head_dim']} heads, "
        f"{cfg['layers_per_block']} layers per block, {cfg['sample_size']} x {cfg['sample_size']} latents; "
        f"{r['base']['params'] / 1e6:.0f} M params) with {r['weights']}, built by the benchmark; SD's "
        f"scheduler. `stepadapt analyze` (--groups {s['groups']} --budget {s['budget']} --gaussian off "
        "--floor 0.05) and "
        f"`stepadapt prune` (--candidates magnitude/local) cut it into {r['checks']['experts']} experts on "
        "random latents with the empty text; each is exported to ONNX with parity and one "
        f"classifier-free-guidance step (batch {s['batch']}, text [{s['batch']}, {s['tokens']}, "
        f"{cfg['cross_attention_dim']}]) is timed in onnxruntime.",
        "",
        f"- Command: `{r['command']}`" + (" (`make bench-sd15`)" if r["command"] == MAKE_COMMAND else ""),
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; GPU: {m['gpu_run']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        f"- Commit: `{r['commit']}`, {r['created']}",
        "- Timing: onnxruntime CPU sessions as the project makes them (all graph optimisations, no "
        f"spinning), {', '.join(ths)} (intra-op threads). The base's session stays open and each expert's "
        f"opens beside it in turn (all at once do not fit in memory here); {s['warmup']} warm-up runs "
        f"each, then {s['repeats']} rounds timing the base and the expert back to back in a shuffled "
        "order. Median; the ratio is of the expert's median to its paired base runs' median, with the "
        f"range of the per-round ratios; raw samples in `{r.get('path', 'benchmarks/results/sd15.json')}`",
        *_load(r),
        "",
        "Per step: MACs (torch-pruning's count for one image traced with a 7-token text, as the manifest "
        "records them; and for a whole CFG step with 77 tokens), the median onnxruntime time of one step "
        "and its latency ratio to the base. The trajectory mean weights each expert by its share of the "
        "plan's visited timesteps.",
        "",
    ]
    head = [
        "model",
        "timesteps",
        "visit share",
        "MACs (trace)",
        "MAC ratio",
        f"MACs per step (b{s['batch']})",
    ]
    head += ["MAC ratio (77 tokens)"] + [f"step time, onnxruntime {th} (ratio; round range)" for th in ths]
    out += _table(head, _expert_rows(r, ths)) + _checks(r)
    out += [
        "Memory: `stepadapt prune` holds the base, a copy of every finished expert, the attempt's copy "
        "and its DepGraph trace at once, and every `count_macs` deep-copies the model into a reference "
        "cycle (torch-pruning's op counter) that lives until Python's next full collection. Run as the "
        "command, it was killed by the kernel's OOM killer at 20.7 GB and 19.2 GB of anonymous memory "
        "on this 24 GB machine. Here it runs as its library function (`stepadapt.compress.prune`; the "
        "bundle records the command line above) in a stage process that collects every 2 s, with glibc "
        "returning freed tensors (MALLOC_MMAP_THRESHOLD_=128 KiB), and fits.",
        "",
        "Stages (wall time; peak RSS of the stage's process):",
        "",
    ]
    stages = [[k, f"{v['wall_s']:.0f} s", f"{v['peak_rss_gb']:.1f} GB"] for k, v in r["stages"].items()]
    out += _table(["stage", "wall", "peak RSS"], [*stages, ["all", f"{r['wall_s']:.0f} s", ""]])
    return out + [END]


def write_docs(r: dict[str, Any], docs: str | os.PathLike) -> Path:
    """Put the section into ``docs`` (replacing the one there, else at the end). ``stepadapt bench
    --docs`` rewrites the whole page from its own reports: run ``--docs-only`` after it."""
    docs = Path(docs)
    text = docs.read_text() if docs.is_file() else "# Benchmarks\n"
    section = "\n".join(render_section(r))
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    with atomic_path(docs) as tmp:
        tmp.write_text(text)
    return docs


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="The scaled-down SD-like U-Net (a minute).")
    ap.add_argument("--work", help="Work directory (default runs/bench/sd15[-quick]).")
    ap.add_argument("--out-json", help="Report (default benchmarks/results/sd15.json; --quick: in --work).")
    ap.add_argument(
        "--docs", help="Page to put the section into (default docs/benchmarks.md; --quick: none)."
    )
    ap.add_argument("--no-docs", action="store_true", help="Write no page.")
    ap.add_argument("--docs-only", action="store_true", help="Only render --out-json's report into --docs.")
    ap.add_argument("--repeats", type=int, help="Timed rounds.")
    ap.add_argument("--threads", help="onnxruntime intra-op threads to time, e.g. 1,2.")
    ap.add_argument("--in-process", action="store_true", help="Run our stages in this process.")
    ap.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)  # a child of --isolate
    return ap.parse_args(argv)


def settings_of(a: argparse.Namespace) -> Sd15Settings:
    s = Sd15Settings.quick_run(a.work or "runs/bench/sd15-quick") if a.quick else Sd15Settings()
    if a.work:
        s.work = a.work
    if a.repeats:
        s.repeats = a.repeats
    if a.threads:
        s.threads = tuple(int(x) for x in a.threads.split(","))
    s.isolate = not a.in_process
    return s


def first_to_go() -> None:
    """An SD-sized stage near the machine's memory: should the kernel run out, this run (and its
    stages, which inherit it) is what it kills, not a neighbour's work on the same machine."""
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    try:
        if a.stage:  # one stage in a process of its own: the settings are the work directory's
            work = Work(a.work)
            s = Sd15Settings.from_dict(read_json(work.settings)["run"])
            with Collector() if a.stage != "time" else nullcontext():
                result = STAGES[a.stage](s, work)
            write_json(work.stages / f"{a.stage}.result.json", result)
            return 0
        s = settings_of(a)
        if not a.docs_only and not s.quick:
            first_to_go()
        out_json = Path(
            a.out_json or (Path(s.work) / "sd15.json" if a.quick else "benchmarks/results/sd15.json")
        )
        docs = None if a.no_docs else a.docs or (None if a.quick else "docs/benchmarks.md")
        if a.docs_only:
            report = read_json(out_json, "sd15 report")
        else:
            report = run(s, MAKE_COMMAND + "".join(f" {x}" for x in argv))
            report["path"] = str(out_json)
            write_json(out_json, report)
            print(f"report -> {out_json}")
        if docs:
            print(f"section -> {write_docs(report, docs)}")
    except StepadaptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
