"""The demo's conditional stage: the class-conditional base beside its shipped experts served by Triton.

One row per class, the base's images and the endpoint's from the same noise and labels at the same
guidance, each scored by KID against real held-out images and by the shipped classifier's accuracy.
The stages that made the shipped bundle (train-base --conditional, analyze, prune, finetune) take
far longer than a demo's minutes; their commands are on the bundle's card.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from stepadapt.export.stage import ExportOptions, export
from stepadapt.serving.stage import ServeOptions, start

from stepadapt.bundle import Bundle
from stepadapt.conditioning import for_model, labels_cond
from stepadapt.models import DEFAULT_BASE, load_base
from stepadapt.plan import visited_timesteps
from stepadapt.sampling import max_pixel_diff, module_denoiser, sample_images, save_grid
from stepadapt.solvers import Setting, resolve_setting

COND_BASE = DEFAULT_BASE.with_name("fashion-tiny-cond")
COND_BUNDLE = DEFAULT_BASE.with_name("fashion-tiny-cond-experts")
GUIDANCE = 3.0  # the experiment's headline guidance (docs/results.md)
PER_CLASS = 10  # images per class: one row each, and the KID / accuracy set


def shipped() -> bool:
    return (COND_BASE / "config.json").is_file() and (COND_BUNDLE / "manifest.json").is_file()


def run_conditional(
    out: Path, device: str, onnx_device: str, ports: tuple[int, int], log: Callable[[str], None]
) -> dict[str, Any]:
    """Serve the shipped class-conditional experts and put them beside their base; returns the KID and
    accuracy of both (``kid``, ``accuracy``), the endpoint's largest pixel difference to onnxruntime's
    images in process (``endpoint_max_pixel_diff``) and the figure (``figure``)."""
    from stepadapt.export.onnx import onnx_router

    model, sched = load_base(COND_BASE)
    served = out / "served-cond"
    if served.exists():
        shutil.rmtree(served)
    shutil.copytree(COND_BUNDLE, served, ignore=shutil.ignore_patterns("finetune", "onnx", "triton", "*.md"))
    export(ExportOptions(bundle=served), log=log)
    b = Bundle.load(served)
    rec = b.manifest.recommended  # else UniPC x 8, the experiment's setting for the experts
    setting = resolve_setting(rec) if rec else Setting("unipc", 8)
    classes = b.manifest.conditioning.classes
    labels = np.repeat(np.arange(classes), PER_CLASS)  # row k: class k
    cond = labels_cond(labels, GUIDANCE)
    shape = tuple(b.manifest.sample_shape)

    def draw(denoiser) -> np.ndarray:
        return sample_images(
            denoiser, sched, shape, len(labels), steps=setting.steps, sampler=setting.sampler, cond=cond
        )

    base_images = draw(for_model(module_denoiser(model.to(device)), b.manifest.conditioning))
    reference = draw(for_model(onnx_router(b, device=onnx_device), b.manifest.conditioning))
    endpoint = _request(served, labels, setting, ports, onnx_device, out, log)
    diff = max_pixel_diff(endpoint, reference)
    log(f"conditional endpoint vs onnxruntime: max pixel difference {diff}/255")
    scores = _scores({"base": base_images, "served": endpoint}, labels, shape, log)
    grids = [save_grid(base_images, out / "cond_base_samples.png"),
             save_grid(endpoint, out / "cond_endpoint_samples.png")]  # fmt: skip
    per_image = b.manifest.macs_per_image(setting.steps, setting.sampler)
    base_per_image = len(visited_timesteps(setting.sampler, setting.steps, sched))
    titles = [
        f"fashion-tiny-cond, {setting}: {base_per_image} base evaluations",
        f"endpoint: its experts, {setting}: {per_image:.2f} base evaluations",
    ]
    for i, key in enumerate(("base", "served")):
        kid, acc = scores["kid"][key], scores["accuracy"][key]
        titles[i] += f"\nKID {kid[0]:.4f} ± {kid[1]:.4f}, accuracy {100 * acc:.0f}%, guidance {GUIDANCE:g}"
    from stepadapt.plots import side_by_side

    figure = side_by_side(grids, titles, out / "cond_base_vs_experts.png")
    log(f"class-conditional base vs experts (one row per class) -> {figure}")
    return {**scores, "endpoint_max_pixel_diff": diff, "figure": figure, "setting": str(setting)}


def _request(
    served: Path, labels: np.ndarray, setting: Setting, ports, device: str, out: Path, log
) -> np.ndarray:
    from stepadapt.serving.client import GenerateRequest
    from stepadapt.serving.client import generate as call

    options = ServeOptions(
        bundles=(str(served),), http_port=ports[0], grpc_port=ports[1], instances=1, max_images=len(labels),
        metrics_port=0,
        device=device, log=out / "triton-cond.log",
    )  # fmt: skip
    with start(options, log=log) as server:
        req = GenerateRequest(
            num_images=len(labels), seed=0, sampler=setting.sampler, steps=setting.steps,
            class_labels=labels.tolist(), guidance_scale=GUIDANCE,
        )  # fmt: skip
        return call(server.http_url, req)


def _scores(images: dict[str, np.ndarray], labels: np.ndarray, shape, log) -> dict[str, dict]:
    """KID against as many real held-out images and the shipped classifier's accuracy, per image set."""
    import torch

    from stepadapt.classifier import class_accuracy, load_classifier
    from stepadapt.evaluate import InceptionFeatures, features, kid, real_set

    net, classifier = InceptionFeatures(), load_classifier()
    _, real = real_set(net, "fashion-mnist", len(labels), shape[1], shape[0])
    out: dict[str, dict] = {"kid": {}, "accuracy": {}}
    for name, imgs in images.items():
        out["kid"][name] = kid(real, features(net, imgs))
        out["accuracy"][name] = class_accuracy(classifier, imgs, torch.as_tensor(labels))
        log(
            f"conditional {name}: KID {out['kid'][name][0]:.4f} ± {out['kid'][name][1]:.4f}, "
            f"accuracy {100 * out['accuracy'][name]:.1f}% (n={len(labels)}, guidance {GUIDANCE:g})"
        )
    return out
