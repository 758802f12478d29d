"""`stepadapt demo` as a pipeline of the stages the commands run, each callable (and testable) alone.

It lives in stepadapt.serving because its last stages export and serve: the
flow stays one-way (core <- export <- serving). Every grid uses the same seed,
so grids compare image by image.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepadapt import StepadaptError
from stepadapt.bundle import Bundle
from stepadapt.importance import DEFAULT_CANDIDATES, Candidate
from stepadapt.models import DEFAULT_BASE, load_base
from stepadapt.plan import visited_timesteps
from stepadapt.sampling import max_pixel_diff, module_denoiser, sample_images, save_grid
from stepadapt.solvers import Setting, resolve_setting

SHIPPED_BUNDLE = DEFAULT_BASE.with_name("fashion-tiny-experts")


@dataclass
class Demo:
    out: Path
    base_dir: Path = DEFAULT_BASE
    budget: float = 0.5
    groups: int = 4
    n: int = 36  # images per grid
    finetune_iterations: int = 300
    kid_images: int = 128  # images per KID (0 skips KID)
    shipped: Path = SHIPPED_BUNDLE
    candidates: tuple[Candidate, ...] = DEFAULT_CANDIDATES
    proxy_size: int = 128  # images per proxy set (importance, candidate scoring, loss profile)
    gaussian: bool = True  # the closed-form Gaussian expert on the noisy end (analyze --gaussian auto)
    device: str = "cpu"  # where the PyTorch stages run (onnxruntime picks its own provider)
    log: Callable[[str], None] = print
    state: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.model, self.scheduler = load_base(self.base_dir)
        self.model.to(self.device)
        c, s = self.model.config.in_channels, self.model.config.sample_size
        self.shape = (c, s, s)
        shipped = self.shipped / "manifest.json"
        rec = Bundle.load(self.shipped).manifest.recommended if shipped.is_file() else None
        self.setting = resolve_setting(rec)  # the bundles'
        self.base_setting = Setting.from_dict(rec["base_best"]) if rec and rec.get("base_best") else (
            Setting(self.setting.sampler, self.setting.steps)
        )  # fmt: skip

    def sample(self, denoiser, n: int, bundle: Bundle | None = None) -> Any:
        """``n`` images from seed 0: a bundle with its setting (jumping where it has the Gaussian
        expert), the base with its own."""
        s = self.setting if bundle is not None else self.base_setting
        jump = (
            bundle.jump() if s.jump and bundle is not None and bundle.experts[-1].kind == "gaussian" else None
        )
        return sample_images(
            denoiser, self.scheduler, self.shape, n, steps=s.steps, sampler=s.sampler, jump=jump
        )

    def grid(self, denoiser, name: str, bundle: Bundle | None = None) -> Any:
        images = self.sample(denoiser, self.n, bundle)
        path = save_grid(images, self.out / f"{name}.png")
        self.log(f"{name} -> {path}")
        return images

    def base_samples(self) -> None:
        self.grid(module_denoiser(self.model), "base_samples")

    def analyze(self):
        from stepadapt.analyze import analyze_base
        from stepadapt.data import proxy_sets
        from stepadapt.plots import plot_plan

        c, s = self.shape[0], self.shape[1]
        self.state["proxy"] = proxy_sets("fashion-mnist", self.proxy_size, s, c)
        from stepadapt.gaussian import gaussian_for

        if not self.gaussian:
            self.log("no Gaussian expert: turned off")
        else:
            try:
                self.state["gaussian"] = gaussian_for(self.model, self.scheduler, "fashion-mnist")
            except StepadaptError as e:
                self.log(f"no Gaussian expert: {e}")
        plan, profiles = analyze_base(
            self.model, self.scheduler, self.state["proxy"][1], groups=self.groups, budget=self.budget,
            gaussian=self.state.get("gaussian"),
        )  # fmt: skip
        plan.save(self.out / "plan.json")
        plot_plan(plan, profiles, self.out / "plan.png")
        self.state["plan"], self.state["profiles"] = plan, profiles
        return plan

    def prune(self):
        from stepadapt.compress import compress
        from stepadapt.importance import Memory
        from stepadapt.plots import plot_plan

        plan = self.state["plan"]
        train, val = self.state["proxy"]
        manifest = compress(
            self.model, self.scheduler, plan, train, val, self.out / "bundle",
            candidates=self.candidates, memory=Memory(self.out / "memory.json"),
            gaussian=self.state.get("gaussian"), log=self.log, command="stepadapt demo",
        )  # fmt: skip
        # Per plan group (neighbours that both got the whole base are one expert in the bundle).
        owner = {g.name: next(e for e in manifest.experts if e.lo <= g.lo < e.hi) for g in plan.groups}
        achieved = [owner[g.name].macs / manifest.base_macs for g in plan.groups]
        plot_plan(plan, self.state["profiles"], self.out / "plan.png", achieved=achieved)
        b = Bundle.load(self.out / "bundle")
        self.grid(b.router(self.device), "bundle_samples", b)
        return manifest

    def finetune(self) -> None:
        from stepadapt.data import load_dataset
        from stepadapt.finetune import finetune_bundle, finetune_config

        if self.finetune_iterations <= 0:
            return
        b = Bundle.load(self.out / "bundle")
        data = load_dataset("fashion-mnist", "train", self.shape[1], self.shape[0])
        cfg = finetune_config(self.finetune_iterations)
        finetune_bundle(
            b, data, cfg, self.finetune_iterations, teacher=self.model, log=self.log, device=self.device
        )
        self.grid(b.router(self.device), "finetuned_samples", b)

    def serve_copy(self) -> Bundle:
        """The bundle the last stages export and serve: the shipped one if present, else the demo's."""
        served = self.out / "served"
        source = self.shipped if (self.shipped / "manifest.json").is_file() else self.out / "bundle"
        self.state["served_from"] = source.resolve()
        if served.exists():
            shutil.rmtree(served)
        shutil.copytree(source, served, ignore=shutil.ignore_patterns("finetune", "onnx", "triton", "*.md"))
        self.log(f"serving {source} (copied to {served})")
        return Bundle.load(served)

    def kid(self, names: dict[str, tuple[Any, Bundle | None]]) -> dict[str, tuple[float, float]]:
        """KID of each (denoiser, bundle or None for the base) against real test images
        (``kid_images`` each), each sampled with its setting."""
        from stepadapt.evaluate import InceptionFeatures, kid, real_set
        from stepadapt.evaluate import features as inception

        if self.kid_images <= 0:
            return {}
        net = InceptionFeatures()
        _, real = real_set(net, "fashion-mnist", self.kid_images, self.shape[1], self.shape[0])
        scores = {}
        for name, (den, bundle) in names.items():
            fake = inception(net, self.sample(den, self.kid_images, bundle))
            scores[name] = kid(real, fake)
            self.log(f"KID {name}: {scores[name][0]:.4f} ± {scores[name][1]:.4f} (n={self.kid_images})")
        return scores

    def export(self, b: Bundle):
        from stepadapt.export.onnx import export_bundle, onnx_router

        export_bundle(b, log=self.log)
        ort_device = "cpu" if self.device == "cpu" else "auto"  # onnxruntime's CUDA only with onnxruntime-gpu
        images = self.grid(onnx_router(b, device=ort_device), "onnxruntime_samples", b)
        torch_images = self.sample(b.router(self.device), self.n, b)
        self.log(f"onnxruntime vs PyTorch: max pixel difference {max_pixel_diff(images, torch_images)}/255")
        return images

    def serve(self, b: Bundle, reference) -> Any:
        from stepadapt.serving.client import GenerateRequest
        from stepadapt.serving.client import generate as call
        from stepadapt.serving.repository import write_repository
        from stepadapt.serving.server import TritonServer

        repo = write_repository(b, b.path / "triton")
        with TritonServer(repo, log_path=self.out / "triton.log") as server:
            # Silent on the solver: the endpoint samples the way the bundle's manifest recommends.
            served = call(server.http_url, GenerateRequest(num_images=self.n, seed=0))
        path = save_grid(served, self.out / "endpoint_samples.png")
        self.log(f"endpoint samples -> {path} (max pixel difference to onnxruntime: "
                 f"{max_pixel_diff(served, reference)}/255)")  # fmt: skip
        return served

    def run(self) -> dict[str, Any]:
        from stepadapt.plots import side_by_side

        stages = 7
        self.log(f"[1/{stages}] base samples ({self.n}, {self.base_setting}; bundles: {self.setting})")
        self.base_samples()
        self.log(f"[2/{stages}] analyze: difficulty, groups, budgets")
        self.analyze()
        self.log(f"[3/{stages}] prune: one expert per group from the base, candidate search")
        self.prune()
        self.log(f"[4/{stages}] fine-tune ({self.finetune_iterations} iterations, each alone, distilled)")
        self.finetune()
        self.log(f"[5/{stages}] KID: base, this run's bundle, the bundle to serve")
        served = self.serve_copy()
        targets = {
            "base": (module_denoiser(self.model), None),
            "served": (served.router(self.device), served),
        }
        if self.state["served_from"] != (self.out / "bundle").resolve():
            own = Bundle.load(self.out / "bundle")
            targets["demo"] = (own.router(self.device), own)
        scores = self.kid(targets)
        self.log(f"[6/{stages}] export: ONNX per expert, parity-checked in onnxruntime")
        ort_images = self.export(served)
        self.log(f"[7/{stages}] serve: tritonserver on 127.0.0.1, generate through the endpoint")
        self.serve(served, ort_images)
        s, bs = self.setting, self.base_setting
        per_image = served.manifest.macs_per_image(s.steps, s.sampler, s.jump)
        base_per_image = len(visited_timesteps(bs.sampler, bs.steps, self.scheduler))
        ratio = per_image / base_per_image
        titles = [f"base, {bs}: {base_per_image} base evaluations",
                  f"endpoint: experts, {s}: {per_image:.2f} base evaluations"]  # fmt: skip
        for i, key in enumerate(("base", "served")):
            if key in scores:
                titles[i] += f"\nKID {scores[key][0]:.4f} ± {scores[key][1]:.4f}"
        figure = side_by_side(
            [self.out / "base_samples.png", self.out / "endpoint_samples.png"], titles,
            self.out / "base_vs_experts.png",
        )  # fmt: skip
        self.log(f"base vs experts -> {figure}")
        return {"kid": scores, "macs_ratio": ratio, "macs_per_image": per_image, "figure": figure,
                "setting": str(s), "base_setting": str(bs)}  # fmt: skip
