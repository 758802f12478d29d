"""`stepadapt demo`: the stages the commands run, in order, on the shipped default base.

Each stage is the library function its command calls (``analyze``, ``prune``, ``finetune``,
``export``, ``serve``) with options built from :class:`DemoOptions`, so the demo cannot drift
from what the commands do; the demo adds only what it shows: sample grids of every step, the
KID beside the base's, and the base-vs-experts figure. It lives in stepadapt.serving because its
last stages export and serve: the flow stays one-way (core <- export <- serving). Every grid
uses the same seed, so grids compare image by image.

A fine-tune that fits the demo's minutes cannot make the experts look like the
base (docs/results.md measures how far they get), so the demo runs the whole
recipe on its own bundle briefly, to show each step working, and serves the
shipped bundle that the same commands fine-tuned for longer
(stepadapt/weights/fashion-tiny-experts, its card says how), and prints the
KID of both beside the base's.

Bundles are sampled the way the served bundle's manifest recommends (``stepadapt
tune``: solver, steps, jump), the base the way that measurement found best for it
within its budget; without a recommendation both take 50 DDIM steps.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from stepadapt.export.stage import ExportOptions, export
from stepadapt.serving.repository import RepositoryOptions
from stepadapt.serving.stage import ServeOptions, start

from stepadapt import StepadaptError
from stepadapt.analyze import Analysis, AnalyzeOptions, analyze
from stepadapt.bundle import Bundle, Manifest
from stepadapt.compress import PruneOptions, prune
from stepadapt.devices import DEVICE_HELP, check_device, resolve_device
from stepadapt.finetune import FinetuneOptions, finetune
from stepadapt.importance import DEFAULT_CANDIDATES, Candidate
from stepadapt.models import DEFAULT_BASE, load_base
from stepadapt.options import Options, option
from stepadapt.plan import visited_timesteps
from stepadapt.sampling import Denoiser, max_pixel_diff, module_denoiser, sample_images, save_grid
from stepadapt.solvers import Setting, resolve_setting

SHIPPED_BUNDLE = DEFAULT_BASE.with_name("fashion-tiny-experts")
DATA = "fashion-mnist"  # the shipped base's data: every stage's proxy, fine-tuning and KID set
STAGES = 8


@dataclass(frozen=True)
class DemoOptions(Options):
    """``stepadapt demo``: base -> analyze -> prune -> fine-tune -> KID -> export -> serve.

    Writes OUT/base_samples.png, OUT/plan.json + plan.png (+ plan.gaussian.safetensors, the
    Gaussian expert's fit), OUT/bundle/ (this run's experts), OUT/bundle_samples.png (pruned
    only), OUT/finetuned_samples.png, OUT/served/ (the bundle served: the shipped one, fine-tuned
    longer by the same commands), OUT/onnxruntime_samples.png, OUT/endpoint_samples.png (from a
    real tritonserver on 127.0.0.1) and OUT/base_vs_experts.png.
    """

    out: Path = option(Path("demo-out"), "Where the demo writes its results.", flag="--out")
    base: Path = option(DEFAULT_BASE, "Base model dir (diffusers UNet2DModel).", flag="--base")
    budget: float = option(0.5, "Target mean MACs per step, fraction of the base.")
    groups: int = option(4, "Number of experts.")
    gaussian: bool = option(
        True,
        "The closed-form Gaussian expert on the noisy end (as analyze --gaussian auto).",
        flags=("--gaussian/--no-gaussian",),
    )
    n: int = option(36, "Images per sample grid.", flag="--n")
    finetune_iterations: int = option(
        300, "Fine-tuning iterations for this run's bundle (0 skips fine-tuning)."
    )
    kid_images: int = option(128, "Images per KID (0 skips the KID stage).")
    serve_shipped: bool = option(
        True,
        "Serve the shipped, longer fine-tuned bundle (default), or the one this run made.",
        flags=("--serve-shipped/--serve-own",),
    )
    device: str = option("auto", DEVICE_HELP + " The PyTorch stages' device.")
    proxy_size: int = option(128, "Images per proxy set (importance, candidate scoring, loss profile).")
    candidates: tuple[str, ...] = option(
        tuple(c.label for c in DEFAULT_CANDIDATES), "Candidate structures: importance/scope, comma-separated."
    )
    conditional: bool = option(
        True,
        "Then the shipped class-conditional base beside its experts served by Triton: one row per "
        "class, KID and class accuracy.",
        flags=("--conditional/--no-conditional",),
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # plain values (a str path, a list) as their fields' types
        if not 0.0 < self.budget <= 1.0:
            raise StepadaptError(f"--budget must be in (0, 1], got {self.budget}")
        for flag, value, least in (("--groups", self.groups, 1), ("--n", self.n, 1),
                                   ("--finetune-iterations", self.finetune_iterations, 0),
                                   ("--kid-images", self.kid_images, 0),
                                   ("--proxy-size", self.proxy_size, 2)):  # fmt: skip
            if value < least:
                raise StepadaptError(f"{flag} must be at least {least}, got {value}")
        check_device(self.device)
        for label in self.candidates:
            Candidate.parse(label)  # an unknown importance or scope is said before anything loads

    @property
    def bundle(self) -> Path:
        """This run's bundle."""
        return self.out / "bundle"

    @property
    def served(self) -> Path:
        """Where the served bundle is copied (exported and served there, leaving its source alone)."""
        return self.out / "served"

    @property
    def served_source(self) -> Path:
        """The bundle to serve: the shipped one where asked for and present, else this run's."""
        shipped = self.serve_shipped and (SHIPPED_BUNDLE / "manifest.json").is_file()
        return SHIPPED_BUNDLE if shipped else self.bundle

    @property
    def onnx_device(self) -> str:
        """onnxruntime's device: CUDA only with onnxruntime-gpu, so anything but cpu is ``auto``."""
        return "cpu" if self.device == "cpu" else "auto"

    def analyze_options(self) -> AnalyzeOptions:
        return AnalyzeOptions(
            out=self.out / "plan.json", base=self.base, data=DATA, groups=self.groups, budget=self.budget,
            proxy_size=self.proxy_size, gaussian="auto" if self.gaussian else "off", device=self.device,
        )  # fmt: skip

    def prune_options(self) -> PruneOptions:
        return PruneOptions(
            out=self.bundle, plan=self.out / "plan.json", base=self.base, data=DATA,
            proxy_size=self.proxy_size, candidates=self.candidates, memory=self.out / "memory.json",
            device=self.device,
        )  # fmt: skip

    def finetune_options(self) -> FinetuneOptions:
        """The recovery recipe's defaults, distilled from the recorded base (this run's ``base``)."""
        return FinetuneOptions(bundle=self.bundle, data=DATA, iterations=self.finetune_iterations,
                               device=self.device)  # fmt: skip

    def export_options(self) -> ExportOptions:
        return ExportOptions(bundle=self.served)

    def serve_options(self, http_port: int, grpc_port: int) -> ServeOptions:
        """One copy of the router: the demo sends one request."""
        return ServeOptions(
            bundles=(str(self.served),), http_port=http_port, grpc_port=grpc_port, instances=1,
            max_images=max(self.n, RepositoryOptions.max_batch), device=self.onnx_device,
            log=self.out / "triton.log", metrics_port=0,
        )  # fmt: skip


def run_demo(options: DemoOptions, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every stage in order. Returns the KIDs (``kid``: name -> (mean, std); empty with
    ``kid_images=0``), the served bundle's MACs per image (``macs_per_image``, in base
    evaluations) and its ratio to the base's (``macs_ratio``), the figure's path (``figure``),
    both settings (``setting``, ``base_setting``) and the largest pixel difference between the
    endpoint's images and onnxruntime's in process (``endpoint_max_pixel_diff``)."""
    return _Demo(options, log or (lambda _: None)).run()


def _two_ports() -> tuple[int, int]:
    from stepadapt.serving.server import free_port

    http = free_port()
    grpc = free_port()
    while grpc == http:
        grpc = free_port()
    return http, grpc


class _Demo:
    """One run: the base, the settings and what the stages hand on to the next."""

    def __init__(self, options: DemoOptions, log: Callable[[str], None]) -> None:
        self.o, self.log = options, log
        self.device = resolve_device(options.device)  # one that is not there: said before any work
        self.model, self.scheduler = load_base(options.base)
        self.model.to(self.device)
        c, s = self.model.config.in_channels, self.model.config.sample_size
        self.shape = (c, s, s)
        source = options.served_source
        # This run's bundle is fresh from prune: no recommendation (``tune`` writes one).
        rec = Bundle.load(source).manifest.recommended if source != options.bundle else None
        self.setting = resolve_setting(rec)  # the bundles'
        best = rec.get("base_best") if rec else None
        self.base_setting = (
            Setting.from_dict(best) if best else Setting(self.setting.sampler, self.setting.steps)
        )
        self.analysis: Analysis | None = None

    def sample(self, denoiser: Denoiser, n: int, bundle: Bundle | None = None) -> np.ndarray:
        """``n`` images from seed 0: a bundle with its setting (jumping where its noisy end has an
        expert that jumps), the base with its own."""
        s = self.setting if bundle is not None else self.base_setting
        jumps = s.jump and bundle is not None and bundle.manifest.can_jump
        return sample_images(denoiser, self.scheduler, self.shape, n, steps=s.steps, sampler=s.sampler,
                             jump=bundle.jump() if jumps else None)  # fmt: skip

    def grid(self, denoiser: Denoiser, name: str, bundle: Bundle | None = None) -> np.ndarray:
        images = self.sample(denoiser, self.o.n, bundle)
        self.log(f"{name} -> {save_grid(images, self.o.out / f'{name}.png')}")
        return images

    def analyze(self) -> Analysis:
        self.analysis = analyze(self.o.analyze_options(), log=self.log)
        if self.analysis.note:
            self.log(f"no Gaussian expert: {self.analysis.note}")
        return self.analysis

    def prune(self) -> Manifest:
        from stepadapt.plots import plot_plan

        manifest = prune(self.o.prune_options(), log=self.log, command="stepadapt demo")
        plan, profiles = self.analysis.plan, self.analysis.profiles
        # Per plan group (neighbours that both got the whole base are one expert in the bundle).
        owner = {g.name: next(e for e in manifest.experts if e.lo <= g.lo < e.hi) for g in plan.groups}
        achieved = [owner[g.name].macs / manifest.base_macs for g in plan.groups]
        plot_plan(plan, profiles, self.o.out / "plan.png", achieved=achieved)
        b = Bundle.load(self.o.bundle)
        self.grid(b.router(self.device), "bundle_samples", b)
        return manifest

    def finetune(self) -> None:
        if self.o.finetune_iterations <= 0:
            return
        finetune(self.o.finetune_options(), log=self.log)
        b = Bundle.load(self.o.bundle)
        self.grid(b.router(self.device), "finetuned_samples", b)

    def serve_copy(self) -> Bundle:
        """The served bundle's copy, without the source's fine-tuning checkpoints, exports and card."""
        source, served = self.o.served_source, self.o.served
        if served.exists():
            shutil.rmtree(served)
        shutil.copytree(source, served, ignore=shutil.ignore_patterns("finetune", "onnx", "triton", "*.md"))
        self.log(f"serving {source} (copied to {served})")
        return Bundle.load(served)

    def kid(self, served: Bundle) -> dict[str, tuple[float, float]]:
        """KID against real test images (``kid_images`` each) of the base, the served bundle and,
        where another one is served, this run's bundle; each sampled with its setting."""
        from stepadapt.evaluate import InceptionFeatures, kid, real_set
        from stepadapt.evaluate import features as inception

        if self.o.kid_images <= 0:
            return {}
        targets: dict[str, tuple[Denoiser, Bundle | None]] = {
            "base": (module_denoiser(self.model), None),
            "served": (served.router(self.device), served),
        }
        if self.o.served_source.resolve() != self.o.bundle.resolve():
            own = Bundle.load(self.o.bundle)
            targets["demo"] = (own.router(self.device), own)
        net = InceptionFeatures()
        _, real = real_set(net, DATA, self.o.kid_images, self.shape[1], self.shape[0])
        scores = {}
        for name, (den, bundle) in targets.items():
            scores[name] = kid(real, inception(net, self.sample(den, self.o.kid_images, bundle)))
            self.log(f"KID {name}: {scores[name][0]:.4f} ± {scores[name][1]:.4f} (n={self.o.kid_images})")
        return scores

    def export(self) -> np.ndarray:
        """ONNX per expert (the export stage's parity check), then a grid from onnxruntime."""
        from stepadapt.export.onnx import onnx_router

        export(self.o.export_options(), log=self.log)
        b = Bundle.load(self.o.served)
        images = self.grid(onnx_router(b, device=self.o.onnx_device), "onnxruntime_samples", b)
        torch_images = self.sample(b.router(self.device), self.o.n, b)
        self.log(f"onnxruntime vs PyTorch: max pixel difference {max_pixel_diff(images, torch_images)}/255")
        return images

    def serve(self, reference: np.ndarray) -> int:
        """One request to a real tritonserver; the endpoint's largest pixel difference to ``reference``."""
        from stepadapt.serving.client import GenerateRequest
        from stepadapt.serving.client import generate as call

        with start(self.o.serve_options(*_two_ports()), log=self.log) as server:
            # Silent on the solver: the endpoint samples the way the bundle's manifest recommends.
            served = call(server.http_url, GenerateRequest(num_images=self.o.n, seed=0))
        diff = max_pixel_diff(served, reference)
        path = save_grid(served, self.o.out / "endpoint_samples.png")
        self.log(f"endpoint samples -> {path} (max pixel difference to onnxruntime: {diff}/255)")
        return diff

    def run(self) -> dict[str, Any]:
        o, say = self.o, self.log
        say(f"[1/{STAGES}] base samples ({o.n}, {self.base_setting}; bundles: {self.setting})")
        self.grid(module_denoiser(self.model), "base_samples")
        say(f"[2/{STAGES}] analyze: difficulty, groups, budgets")
        self.analyze()
        say(f"[3/{STAGES}] prune: one expert per group from the base, candidate search")
        self.prune()
        say(f"[4/{STAGES}] fine-tune ({o.finetune_iterations} iterations, each alone, distilled)")
        self.finetune()
        say(f"[5/{STAGES}] KID: base, this run's bundle, the bundle to serve")
        served = self.serve_copy()
        scores = self.kid(served)
        say(f"[6/{STAGES}] export: ONNX per expert, parity-checked in onnxruntime")
        reference = self.export()
        say(f"[7/{STAGES}] serve: tritonserver on 127.0.0.1, generate through the endpoint")
        diff = self.serve(reference)
        result = {**self.figure(served, scores), "kid": scores, "endpoint_max_pixel_diff": diff}
        if o.conditional:
            say(f"[8/{STAGES}] class-conditional: the base beside its shipped experts, served")
            result["conditional"] = self.conditional()
        return result

    def conditional(self) -> dict[str, Any] | None:
        from stepadapt.serving.demo_cond import COND_BUNDLE, run_conditional, shipped

        if not shipped():
            self.log(f"no class-conditional bundle at {COND_BUNDLE}: stage skipped")
            return None
        return run_conditional(self.o.out, self.device, self.o.onnx_device, _two_ports(), self.log)

    def figure(self, served: Bundle, scores: dict[str, tuple[float, float]]) -> dict[str, Any]:
        """base_vs_experts.png: the base's grid beside the endpoint's, with what each costs."""
        from stepadapt.plots import side_by_side

        s, bs = self.setting, self.base_setting
        per_image = served.manifest.macs_per_image(s.steps, s.sampler, s.jump)
        base_per_image = len(visited_timesteps(bs.sampler, bs.steps, self.scheduler))
        titles = [f"base, {bs}: {base_per_image} base evaluations",
                  f"endpoint: experts, {s}: {per_image:.2f} base evaluations"]  # fmt: skip
        for i, key in enumerate(("base", "served")):
            if key in scores:
                titles[i] += f"\nKID {scores[key][0]:.4f} ± {scores[key][1]:.4f}"
        figure = side_by_side(
            [self.o.out / "base_samples.png", self.o.out / "endpoint_samples.png"], titles,
            self.o.out / "base_vs_experts.png",
        )  # fmt: skip
        self.log(f"base vs experts -> {figure}")
        return {"macs_ratio": per_image / base_per_image, "macs_per_image": per_image, "figure": figure,
                "setting": str(s), "base_setting": str(bs)}  # fmt: skip
