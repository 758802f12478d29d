"""The train-vae stage: the autoencoder of a latent (Stable Diffusion layout) text-to-image model.

No pretrained VAE can be downloaded here, so a small diffusers ``AutoencoderKL`` is trained from
scratch: reconstruction (L1, as Stable Diffusion's VAE) plus a small KL term that keeps the latent
space smooth enough for a diffusion model to learn. The latents' scale is then measured on the
training images and stored as ``scaling_factor``, as Stable Diffusion's 0.18215 was chosen, so a
U-Net sees latents of unit variance. The held-out numbers are the ones that say whether a latent
model can work at all: PSNR, and whether the shipped Fashion-MNIST classifier still recognises
the reconstructions as well as the originals.

The checkpointed loop here (a constant learning rate after a fixed warm-up, so that a resumed run
may also go on past the step count it was started with) is shared with :mod:`stepadapt.train_text`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from stepadapt import StepadaptError, first_line
from stepadapt.data import DEFAULT_HOLDOUT, HOLDOUT_HELP
from stepadapt.devices import DEVICE_HELP
from stepadapt.options import Options, option

CHECKPOINT_NAME = "checkpoint.pt"
WARMUP = 100  # steps of linear warm-up; fixed, so the schedule never depends on --iterations
GRAD_CLIP = 1.0
SMOOTH = 50  # steps the reported loss is averaged over
ENCODE_BATCH = 500
GRID_IMAGES = 16  # reconstructions.png: this many originals, each with its reconstruction below
# Options that may differ between a run and its resumption: where it runs, how often it saves, and how
# far it goes (the learning rate is constant after the warm-up, so a longer run is the same run).
RESUME_FREE = ("out", "resume", "iterations", "checkpoint_every", "threads", "device", "eval_limit")


@dataclass(frozen=True)
class RunOptions(Options):
    """What every checkpointed trainer of a pipeline part takes beside its own options (train-vae,
    train-text-encoder), checked in one place."""

    limit: int | None = option(None, "Train on a deterministic subset of N images.")
    eval_limit: int | None = option(None, "Score N held-out images (default: the whole test split).")
    seed: int = option(0, "Seed for init, batches and sampling.")
    holdout: float = option(DEFAULT_HOLDOUT, HOLDOUT_HELP)
    checkpoint_every: int = option(500, "Checkpoint period in steps.")
    resume: bool = option(False, "Continue from OUT/checkpoint.pt exactly.")
    threads: int | None = option(None, "CPU threads for torch.")
    device: str = option("auto", DEVICE_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_run_options(self)


@dataclass(frozen=True)
class TrainVaeOptions(RunOptions):
    """``stepadapt train-vae``: images -> a diffusers AutoencoderKL (OUT/vae/, safetensors) whose
    config holds the latents' scaling_factor."""

    out: Path = option(
        Path("runs/vae"), "Run directory (checkpoint, reconstructions.png, vae/).", flag="--out"
    )
    data: str = option("fashion-mnist", "'fashion-mnist', an image folder, or an .npz file.")
    size: int = option(32, "Image side the autoencoder is trained at.")
    channels: int | None = option(None, "Image channels (1 or 3); default: the data's own.")
    iterations: int = option(3500, "Optimizer steps (a resumed run may ask for more than it started with).")
    batch_size: int = option(32, "Images per step.")
    lr: float = option(1e-3, f"Learning rate (Adam; linear warm-up over {WARMUP} steps, then constant).")
    kl_weight: float = option(
        1e-5, "Weight of the KL term against the per-pixel L1 loss (summed over each image, as in SD)."
    )
    latent_channels: int = option(4, "Channels of the latents.")
    widths: tuple[int, ...] = option(
        (16, 32, 64), "Channels of each resolution level; each level after the first halves the side."
    )
    layers_per_block: int = option(1, "Residual blocks per encoder level (the decoder has one more).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.kl_weight >= 0 or math.isinf(self.kl_weight):
            raise StepadaptError(f"--kl-weight must be a finite number >= 0, got {self.kl_weight}")
        if self.channels not in (None, 1, 3):
            raise StepadaptError(f"--channels must be 1 or 3, got {self.channels}")
        at_least(self, "latent_channels", "layers_per_block", "size")
        if not self.widths or min(self.widths) < 1:
            raise StepadaptError(f"--widths must be positive channel counts, got {self.widths}")
        if self.size % self.downsampling:
            raise StepadaptError(
                f"--size {self.size} does not halve {len(self.widths) - 1} times (--widths "
                f"{','.join(map(str, self.widths))}): choose a multiple of {self.downsampling}"
            )

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.widths) - 1)


@dataclass
class VaeResult:
    steps: int
    resumed_from: int  # 0: a fresh run; else the checkpoint's step it went on from
    final_loss: float
    seconds: float
    params: int
    latent_shape: tuple[int, int, int]
    scaling_factor: float
    latent_mean: float  # of the training latents' means, before scaling (SD assumes about 0)
    test_images: int
    psnr: float | None  # dB, of the uint8 reconstructions over all held-out pixels; None: none held out
    classifier_accuracy: float | None  # the shipped classifier on the reconstructions (Fashion-MNIST only)
    classifier_accuracy_originals: float | None  # ... and on the same originals: the ceiling

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def at_least(o: Options, *names: str, least: int = 1) -> None:
    for name in names:
        if getattr(o, name) < least:
            raise StepadaptError(
                f"--{name.replace('_', '-')} must be at least {least}, got {getattr(o, name)}"
            )


def check_run_options(o: Any) -> None:
    """The checks every checkpointed trainer here shares (one line each, naming the flag)."""
    from stepadapt.devices import check_device

    at_least(o, "iterations", "batch_size", "checkpoint_every")
    if not o.lr > 0 or math.isinf(o.lr):
        raise StepadaptError(f"--lr must be a finite number > 0, got {o.lr}")
    for name in ("limit", "eval_limit", "threads"):
        if getattr(o, name, None) is not None:
            at_least(o, name)
    if isinstance(o.seed, bool) or not isinstance(o.seed, int) or o.seed < 0:
        raise StepadaptError(f"--seed must be an integer >= 0, got {o.seed!r}")
    check_device(o.device)


def build_vae(o: TrainVaeOptions, channels: int) -> AutoencoderKL:
    """A fresh AutoencoderKL whose weights depend on ``o.seed`` only (the caller's RNG is left alone).
    GroupNorm's groups divide every width (32 where they allow, as diffusers' default)."""
    n = len(o.widths)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(o.seed)
        return AutoencoderKL(
            in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=o.widths,
            layers_per_block=o.layers_per_block, latent_channels=o.latent_channels,
            norm_num_groups=math.gcd(32, *o.widths), sample_size=o.size,
        )  # fmt: skip


class Checkpointed:
    """Model, optimizer, generator, step and recent losses saved together and restored together, so
    that a resumed run takes exactly the steps an uninterrupted one would have (for a thread count).
    ``extra`` holds what else the run is defined by (a tokenizer), read back by :meth:`extra_of`."""

    def __init__(self, o: Any, model: torch.nn.Module, data_sha256: str, extra: dict[str, Any] | None = None):
        self.o, self.model, self.data_sha256, self.extra = o, model, data_sha256, extra or {}
        self.path = Path(o.out) / CHECKPOINT_NAME
        self.optimizer = torch.optim.Adam(model.parameters(), lr=o.lr)
        self.generator = torch.Generator().manual_seed(o.seed)
        self.step, self.losses = 0, []

    def run_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.o.to_dict().items() if k not in RESUME_FREE}

    def save(self) -> None:
        from stepadapt.io import save_torch

        save_torch(self.path, {
            "step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(), "losses": torch.tensor(self.losses, dtype=torch.float64),
            "options": json.dumps(self.run_options(), sort_keys=True), "data_sha256": self.data_sha256,
            "extra": json.dumps(self.extra, sort_keys=True),
        })  # fmt: skip

    def restore(self, st: dict[str, Any]) -> None:
        """Load a checkpoint (:func:`read_checkpoint`) into this run, after checking it is this run's."""
        try:
            saved = json.loads(st["options"])
            now = self.run_options()
            differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            if differ:
                raise StepadaptError(
                    f"cannot resume: options differ from the checkpoint ({', '.join(differ)})"
                )
            if st["data_sha256"] != self.data_sha256:
                raise StepadaptError("cannot resume: the training data differ from the checkpoint's")
            if int(st["step"]) > self.o.iterations:
                raise StepadaptError(
                    f"cannot resume: the checkpoint is at step {int(st['step'])}, past --iterations "
                    f"{self.o.iterations}"
                )
            self.model.load_state_dict(st["model"])
            self.optimizer.load_state_dict(st["optimizer"])
            self.generator.set_state(st["generator"])
            self.step, self.losses = int(st["step"]), st["losses"].tolist()
        except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as e:
            msg = first_line(e)
            raise StepadaptError(f"checkpoint {self.path} does not fit this run: {msg}") from None

    @staticmethod
    def extra_of(st: dict[str, Any]) -> dict[str, Any]:
        """What else a checkpoint's run was defined by (its ``extra``), needed before the model is built."""
        try:
            return json.loads(st["extra"])
        except (KeyError, TypeError, json.JSONDecodeError):
            raise StepadaptError("checkpoint does not fit this run: it has no valid 'extra' record") from None

    def fit(self, loss_fn: Callable[[torch.Generator], torch.Tensor], desc: str) -> tuple[float, float]:
        """Step to ``--iterations``: each step's loss from ``loss_fn`` (drawing only from the given
        generator), checkpointing on schedule and at the end. Returns (smoothed loss, seconds)."""
        from stepadapt.progress import progress

        o, start = self.o, time.perf_counter()
        self.model.train()
        with progress(total=o.iterations, initial=self.step, desc=desc, unit="step") as bar:
            while self.step < o.iterations:
                for group in self.optimizer.param_groups:
                    group["lr"] = o.lr * min(1.0, (self.step + 1) / WARMUP)
                loss = loss_fn(self.generator)
                if not torch.isfinite(loss):
                    raise StepadaptError(f"loss became {loss.item()} at step {self.step}: lower --lr")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
                self.optimizer.step()
                self.step += 1
                self.losses = (self.losses + [loss.item()])[-SMOOTH:]
                bar.update()
                bar.set_postfix(loss=f"{self.smoothed:.4f}", refresh=False)
                if self.step % o.checkpoint_every == 0 or self.step == o.iterations:
                    self.save()
        self.model.eval()
        return self.smoothed, time.perf_counter() - start

    @property
    def smoothed(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def readable_like_config(folder: Path) -> None:
    """Give every file in a saved model folder the mode its config.json got: safetensors writes its
    file 0600 (only the owner may read), where open() honours the umask as everything else here does."""
    mode = (folder / "config.json").stat().st_mode & 0o777
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(mode)


def read_checkpoint(out: Path) -> dict[str, Any]:
    """OUT/checkpoint.pt, loaded without unpickling code; its absence is the error a resume reports."""
    from stepadapt.io import load_torch

    path = Path(out) / CHECKPOINT_NAME
    if not path.is_file():
        raise StepadaptError(f"nothing to resume: {path} does not exist")
    return load_torch(path)


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, g: torch.Generator, kl_weight: float) -> torch.Tensor:
    """L1 + ``kl_weight`` x KL, both summed over each image (Stable Diffusion's ratio), divided by the
    pixels so that the learning rate does not depend on the image size."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator=g)).sample
    per_image = (recon - x).abs().flatten(1).sum(1) + kl_weight * posterior.kl()
    return per_image.mean() / x[0].numel()


@torch.inference_mode()
def latent_means(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """The posterior means of ``x``, in batches on the VAE's device (returned on the CPU)."""
    from stepadapt.devices import device_of

    dev = device_of(vae)
    return torch.cat([vae.encode(b.to(dev)).latent_dist.mean.cpu() for b in x.split(ENCODE_BATCH)])


@torch.inference_mode()
def reconstruct(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Decoded posterior means (no sampling): what the autoencoder keeps of each image."""
    from stepadapt.devices import device_of

    dev = device_of(vae)
    return torch.cat(
        [vae.decode(vae.encode(b.to(dev)).latent_dist.mean).sample.cpu() for b in x.split(ENCODE_BATCH)]
    )


def save_reconstructions(x: torch.Tensor, recon: torch.Tensor, path: Path, per_row: int = 8) -> Path:
    """Rows of originals, each directly above a row of their reconstructions."""
    import numpy as np

    from stepadapt.sampling import make_grid, save_grid, to_uint8

    a, b = to_uint8(x[:GRID_IMAGES]), to_uint8(recon[:GRID_IMAGES])
    k = min(per_row, len(a))
    rows = [part[i : i + k] for i in range(0, len(a), k) for part in (a, b)]
    if len(a) % k:  # a last short row: pad with white so the grid stays rectangular
        rows = [np.concatenate([r, np.full((k - len(r), *r.shape[1:]), 255, np.uint8)]) for r in rows]
    return save_grid(make_grid(np.concatenate(rows), ncol=k)[None], path)


def train_vae(options: TrainVaeOptions, log: Callable[[str], None] | None = None) -> tuple[VaeResult, Path]:
    """Train (or resume), measure the scaling factor, score the held-out split, and write OUT/vae/
    (diffusers layout, safetensors), OUT/reconstructions.png and OUT/result.json."""
    from stepadapt.data import fingerprint, load_dataset
    from stepadapt.devices import resolve_device
    from stepadapt.io import atomic_dir, write_json

    o, say = options, log or (lambda _: None)
    if o.threads:
        torch.set_num_threads(o.threads)
    dev = resolve_device(o.device)
    x = load_dataset(o.data, "train", o.size, o.channels, limit=o.limit, seed=o.seed, holdout=o.holdout)
    say(f"data: {o.data} -> {tuple(x.shape)}")
    vae = build_vae(o, x.shape[1]).to(dev)
    params = sum(p.numel() for p in vae.parameters())
    shape = (o.latent_channels, o.size // o.downsampling, o.size // o.downsampling)
    say(f"vae: widths {o.widths}, {params:,} parameters, latents {shape[0]} x {shape[1]} x {shape[2]}")
    run = Checkpointed(o, vae, fingerprint(x))
    if o.resume:
        run.restore(read_checkpoint(o.out))
        say(f"resuming at step {run.step} of {o.iterations}")
    step0 = run.step

    def loss_fn(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(x), (o.batch_size,), generator=g)
        return vae_loss(vae, x[idx].to(dev), g, o.kl_weight)

    loss, seconds = run.fit(loss_fn, "train-vae")
    means = latent_means(vae, x)
    std, mean = float(means.std()), float(means.mean())
    vae.register_to_config(scaling_factor=1.0 / std)
    say(f"latents: mean {mean:.4f}, std {std:.4f} -> scaling_factor {1.0 / std:.5f}")
    result = VaeResult(
        steps=run.step, resumed_from=step0, final_loss=loss, seconds=seconds, params=params,
        latent_shape=shape, scaling_factor=1.0 / std, latent_mean=mean, test_images=0, psnr=None,
        classifier_accuracy=None, classifier_accuracy_originals=None,
    )  # fmt: skip
    score_held_out(vae, o, result, say)
    with atomic_dir(o.out / "vae") as tmp:
        vae.to("cpu").save_pretrained(tmp, safe_serialization=True)
        readable_like_config(tmp)
    write_json(o.out / "result.json", {"options": o.to_dict(), "result": result.to_dict()})
    return result, o.out / "vae"


def score_held_out(
    vae: AutoencoderKL, o: TrainVaeOptions, result: VaeResult, say: Callable[[str], None]
) -> None:
    """PSNR and (on Fashion-MNIST at 32 x 32 grey, what the shipped classifier reads) the classifier's
    accuracy on reconstructions and on the originals; writes OUT/reconstructions.png. Data without a
    held-out part gets the grid of training images and no numbers: those would measure memory."""
    from stepadapt.data import FASHION_NAMES, held_out, load_dataset, load_labelled
    from stepadapt.sampling import to_uint8

    part = dict(limit=o.eval_limit, seed=o.seed, holdout=o.holdout)
    if not held_out(o.data, o.holdout):
        x = load_dataset(o.data, "train", o.size, o.channels, **{**part, "limit": GRID_IMAGES})
        save_reconstructions(x, reconstruct(vae, x), o.out / "reconstructions.png")
        say(f"{o.data} holds no images out of training: PSNR not measured")
        return
    fashion = o.data in FASHION_NAMES and o.size == 32 and vae.config.in_channels == 1
    if fashion:
        x, y = load_labelled(o.data, "test", o.size, **part)
    else:
        x, y = load_dataset(o.data, "test", o.size, o.channels, **part), None
    recon = reconstruct(vae, x)
    save_reconstructions(x, recon, o.out / "reconstructions.png")
    a, b = to_uint8(x).astype("float64"), to_uint8(recon).astype("float64")
    result.test_images = len(x)
    result.psnr = round(10 * math.log10(255.0**2 / max(float(((a - b) ** 2).mean()), 1e-12)), 3)
    say(f"held out: PSNR {result.psnr:.2f} dB on {len(x)} images")
    if y is not None:
        from stepadapt.classifier import class_accuracy, load_classifier

        clf = load_classifier()
        result.classifier_accuracy = round(class_accuracy(clf, to_uint8(recon), y), 6)
        result.classifier_accuracy_originals = round(class_accuracy(clf, to_uint8(x), y), 6)
        say(
            f"classifier accuracy: {result.classifier_accuracy:.4f} on reconstructions, "
            f"{result.classifier_accuracy_originals:.4f} on the originals"
        )
