"""A small image classifier: how ``evaluate`` tells whether a class-conditional model drew the class
it was asked for (class accuracy, beside KID).

The classifier is trained by this project's own command on the training split only, so a score on
generated images is never a score against images it has seen; its card states its accuracy on the
real test split, the ceiling that generated images are read against. It reads images in the form
evaluate holds them (uint8 N x H x W x C, as :func:`stepadapt.sampling.to_uint8` makes them), so
the number on the card and the number in a report come through the same path. Weights are
safetensors and the architecture a JSON config: nothing is pickled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stepadapt import StepadaptError, first_line
from stepadapt.data import DEFAULT_HOLDOUT, HOLDOUT_HELP
from stepadapt.devices import DEVICE_HELP
from stepadapt.options import Options, option

DEFAULT_CLASSIFIER = Path(__file__).parent / "weights" / "fashion-classifier"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT, VERSION = "stepadapt-classifier", 1
SIZE = 32  # the side every stage works at (data.py pads Fashion-MNIST's 28 to it)
MAX_SHIFT = 2  # augmentation: pixels a training image may move each way (garments are not centred alike)
PREDICT_BATCH = 500


@dataclass(frozen=True)
class ClassifierOptions(Options):
    """``stepadapt train-classifier``: labelled data -> a small CNN (safetensors + config.json) whose
    test-split accuracy ``evaluate``'s class accuracy is read against."""

    out: Path = option(Path("runs/classifier"), "Output directory (model.safetensors, config.json).")
    data: str = option(
        "fashion-mnist", "'fashion-mnist', a folder with one subfolder per class, or an .npz with labels."
    )
    holdout: float = option(DEFAULT_HOLDOUT, HOLDOUT_HELP)
    widths: tuple[int, ...] = option(
        (16, 32, 64, 96), "Channels of each stage (2 convs, then halve the side)."
    )
    iterations: int = option(1800, "Optimizer steps (batches go through the data in seeded epochs).")
    batch_size: int = option(128, "Images per step.")
    lr: float = option(3e-3, "Peak learning rate (AdamW; short warm-up, then cosine to 0).")
    weight_decay: float = option(5e-4, "AdamW weight decay.")
    augment: bool = option(True, f"Random shifts (up to {MAX_SHIFT} px) and left-right flips while training.")
    seed: int = option(0, "Seed for init, batch order and augmentation.")
    threads: int | None = option(None, "CPU threads for torch.")
    device: str = option("auto", DEVICE_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        from stepadapt.devices import check_device

        for name in ("iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise StepadaptError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if not self.lr > 0 or self.weight_decay < 0:
            raise StepadaptError(
                f"--lr must be > 0 and --weight-decay >= 0, got {self.lr}, {self.weight_decay}"
            )
        if not self.widths or min(self.widths) < 1:
            raise StepadaptError(f"--widths must be positive channel counts, got {self.widths}")
        if self.threads is not None and self.threads < 1:
            raise StepadaptError(f"--threads must be at least 1, got {self.threads}")
        check_device(self.device)


@dataclass(frozen=True)
class ClassifierConfig(Options):
    """The architecture and the classes, as config.json records them: enough to rebuild the module
    before its weights load (an Options subclass for its checked JSON round trip)."""

    classes: tuple[str, ...] = ()
    channels: int = 1
    size: int = SIZE
    widths: tuple[int, ...] = (16, 32, 64, 96)
    convs: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.classes) < 2 or self.channels not in (1, 3) or not self.widths or self.convs < 1:
            raise StepadaptError(
                f"not a classifier config: {len(self.classes)} classes, {self.channels} channels, "
                f"widths {self.widths}, {self.convs} convs"
            )


class Classifier(nn.Module):
    """Conv-BatchNorm-ReLU stages, each halving the side, then global average pooling: small enough
    to ship, and BatchNorm lets a few epochs on one CPU core reach the accuracy the card states."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c = config.channels
        for i, w in enumerate(config.widths):
            for _ in range(config.convs):
                layers += [
                    nn.Conv2d(c, w, 3, padding=1, bias=False),
                    nn.BatchNorm2d(w),
                    nn.ReLU(inplace=True),
                ]
                c = w
            if i < len(config.widths) - 1:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, len(config.classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for model-range images N x C x H x W in [-1, 1]."""
        return self.head(self.features(x))


@dataclass
class ClassifierResult:
    iterations: int
    final_loss: float
    seconds: float
    images_per_second: float
    params: int
    test_images: int
    test_accuracy: float | None  # None where the data has no test part
    per_class: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image moved by a whole number of pixels (up to MAX_SHIFT each way; what comes in is
    background, -1) and flipped left-right with probability 1/2, drawn from ``g`` alone."""
    n, _, h, w = x.shape
    shift = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (n, 2), generator=g).float()
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = flip, 1.0
    theta[:, 0, 2], theta[:, 1, 2] = 2 * shift[:, 0] / w, 2 * shift[:, 1] / h
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    # nearest on whole-pixel moves copies pixels exactly; zero padding in (x + 1) is -1 in x
    return F.grid_sample(x + 1, grid, mode="nearest", padding_mode="zeros", align_corners=False) - 1


def batches(n: int, batch_size: int, iterations: int, g: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices for ``iterations`` steps, epoch after epoch of seeded permutations (every image
    once per epoch, unlike i.i.d. draws); a batch may span two epochs."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(iterations):
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=g)])
        yield order[:batch_size]
        order = order[batch_size:]


def build_classifier(config: ClassifierConfig, seed: int = 0) -> Classifier:
    """A fresh classifier whose initial weights depend on ``seed`` only (torch's global RNG is left
    as the caller had it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Classifier(config)


def train_classifier(
    options: ClassifierOptions, log: Callable[[str], None] | None = None
) -> tuple[ClassifierResult, Path]:
    """Train on the training split, score the real test split through :func:`predict` (the path
    evaluate uses), and write OUT/model.safetensors and OUT/config.json (with what made them)."""
    from stepadapt.data import class_names, load_labelled
    from stepadapt.devices import resolve_device

    o, say = options, log or (lambda _: None)
    if o.threads:
        torch.set_num_threads(o.threads)
    dev = resolve_device(o.device)
    x, y = load_labelled(o.data, "train", size=SIZE, holdout=o.holdout)
    names = class_names(o.data, o.holdout)
    if int(y.max()) >= len(names):
        raise StepadaptError(f"{o.data}: label {int(y.max())} for only {len(names)} classes")
    say(f"data: {o.data} -> {tuple(x.shape)}, {len(names)} classes: {', '.join(names)}")
    config = ClassifierConfig(classes=names, channels=x.shape[1], widths=o.widths)
    model = build_classifier(config, o.seed).to(dev)
    params = sum(p.numel() for p in model.parameters())
    say(f"classifier: widths {o.widths}, {params:,} parameters")
    loss, seconds = fit(model, x, y, o)
    result = ClassifierResult(
        iterations=o.iterations, final_loss=loss, seconds=seconds,
        images_per_second=o.iterations * o.batch_size / max(seconds, 1e-9), params=params,
        test_images=0, test_accuracy=None,
    )  # fmt: skip
    score_test_split(model.cpu(), o, result)
    if result.test_accuracy is None:
        say(f"{o.data} holds no images out of training: test accuracy not measured")
    else:
        say(f"test accuracy: {result.test_accuracy:.4f} on {result.test_images} images")
    save_classifier(model, o.out, {"options": o.to_dict(), "result": result.to_dict()})
    return result, o.out


def fit(model: Classifier, x: torch.Tensor, y: torch.Tensor, o: ClassifierOptions) -> tuple[float, float]:
    """The training loop: (the last steps' mean loss, seconds). Deterministic for a seed and thread
    count: batch order, augmentation and init each come from their own seeded generator."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from stepadapt.devices import device_of
    from stepadapt.progress import progress

    dev = device_of(model)
    g = torch.Generator().manual_seed(o.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, min(100, o.iterations // 10), o.iterations)
    model.train()
    recent: list[float] = []
    start = time.perf_counter()
    with progress(total=o.iterations, desc="train-classifier", unit="step") as bar:
        for idx in batches(len(x), o.batch_size, o.iterations, g):
            xb = augment(x[idx], g) if o.augment else x[idx]
            # label smoothing: a small, well-calibrated net generalises better on ambiguous garments
            loss = F.cross_entropy(model(xb.to(dev)), y[idx].to(dev), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            recent = (recent + [loss.item()])[-50:]
            bar.update()
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
    model.eval()
    return sum(recent) / len(recent), time.perf_counter() - start


def score_test_split(model: Classifier, o: ClassifierOptions, result: ClassifierResult) -> None:
    """Fill ``result``'s test accuracy (overall and per class) from the data's real test split."""
    from torchmetrics.functional.classification import multiclass_accuracy

    from stepadapt.data import held_out, load_labelled
    from stepadapt.sampling import to_uint8

    if not held_out(o.data, o.holdout):  # its "test" split would be training images: memory, not skill
        return
    x, y = load_labelled(o.data, "test", size=SIZE, holdout=o.holdout)
    pred, k = predict(model, to_uint8(x)), len(model.config.classes)
    per = multiclass_accuracy(pred, y, num_classes=k, average="none")
    present = torch.bincount(y, minlength=k) > 0
    result.test_images = len(y)
    result.test_accuracy = round(float(multiclass_accuracy(pred, y, num_classes=k, average="micro")), 6)
    result.per_class = {
        n: round(float(a), 6) for n, a, p in zip(model.config.classes, per, present, strict=True) if p
    }


def save_classifier(model: Classifier, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """OUT/model.safetensors and OUT/config.json, swapped in as one directory (files already there,
    such as a MODEL_CARD.md, are kept), so a reader never pairs new weights with an old config."""
    from stepadapt.io import atomic_dir, save_safetensors, write_json

    path = Path(path)
    with atomic_dir(path) as tmp:
        if path.is_dir():
            for f in path.iterdir():
                if f.is_file() and f.name not in (WEIGHTS_NAME, CONFIG_NAME):
                    (tmp / f.name).write_bytes(f.read_bytes())
        sha = save_safetensors(tmp / WEIGHTS_NAME, model.state_dict())
        cfg = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(), "sha256": sha}
        write_json(tmp / CONFIG_NAME, {**cfg, "provenance": provenance or {}})
    return path


def load_classifier(path: str | Path | None = None) -> Classifier:
    """A classifier directory (default: the shipped Fashion-MNIST one), checked: its format, the
    weights' sha256, and every tensor's shape against the config; any fault is one line."""
    from safetensors.torch import load_file

    from stepadapt.io import read_json, sha256_file

    path = Path(path) if path is not None else DEFAULT_CLASSIFIER
    if not path.is_dir():
        raise StepadaptError(f"classifier directory not found: {path}")
    meta = read_json(path / CONFIG_NAME, "classifier config")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise StepadaptError(f"{path / CONFIG_NAME} is not a {FORMAT} v{VERSION} config")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise StepadaptError(f"{path} has no {WEIGHTS_NAME} (only safetensors weights are loaded)")
    if meta.get("sha256") not in (None, sha256_file(weights)):
        raise StepadaptError(f"{weights} does not match the sha256 in its config: corrupt or replaced")
    model = Classifier(ClassifierConfig.from_dict(meta.get("config")))
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error type for a truncated or garbled file
        msg = first_line(e)
        raise StepadaptError(f"{weights} is corrupt or unreadable: {msg}") from None
    want = model.state_dict()
    for k in sorted(set(want) | set(tensors)):
        if k not in tensors or k not in want or tensors[k].shape != want[k].shape:
            got = tuple(tensors[k].shape) if k in tensors else "nothing"
            need = tuple(want[k].shape) if k in want else "nothing"
            raise StepadaptError(f"{weights} does not fit its config: {k} is {got}, the config wants {need}")
    model.load_state_dict(tensors)
    return model.eval()


def _model_range(images: np.ndarray | torch.Tensor, config: ClassifierConfig) -> torch.Tensor:
    """uint8 N x H x W x C -> float N x C x H x W in [-1, 1], refusing any other form in one line."""
    t = torch.as_tensor(images)
    want = f"uint8 N x {config.size} x {config.size} x {config.channels}"
    if (
        t.dtype != torch.uint8
        or t.ndim != 4
        or tuple(t.shape[1:]) != (config.size, config.size, config.channels)
    ):
        raise StepadaptError(f"the classifier reads {want} images, got {t.dtype} {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def predict(classifier: Classifier, images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """int64 class indices for uint8 N x H x W x C images, in batches, on the classifier's device."""
    from stepadapt.devices import device_of

    x, dev = _model_range(images, classifier.config), device_of(classifier)
    was = classifier.training
    classifier.eval()
    try:
        with torch.inference_mode():
            out = [classifier(b.to(dev)).argmax(1).cpu() for b in x.split(PREDICT_BATCH)]
    finally:
        classifier.train(was)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def class_accuracy(
    classifier: Classifier, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor
) -> float:
    """The share of ``images`` the classifier puts in the class each was asked for (``labels``)."""
    from torchmetrics.functional.classification import multiclass_accuracy

    y = torch.as_tensor(labels).long().reshape(-1)
    k = len(classifier.config.classes)
    if len(y) != len(images):
        raise StepadaptError(f"{len(y)} labels for {len(images)} images")
    if len(y) == 0:
        raise StepadaptError("no images to score")
    bad = y[(y < 0) | (y >= k)]
    if len(bad):
        raise StepadaptError(f"labels must be in 0..{k - 1} (the classifier's classes), got {int(bad[0])}")
    return float(multiclass_accuracy(predict(classifier, images), y, num_classes=k, average="micro"))
