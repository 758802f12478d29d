"""The train-base stage: a base U-Net trained from scratch on a dataset.

The rules about its options live here: which configs exist, which channel
counts, and what image side the model is built for (the data's own, else the
config's, said in one line either way), so the CLI only maps flags.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DModel

from stepadapt import Notice, StepadaptError
from stepadapt import distributed as dist
from stepadapt.conditioning import DEFAULT_LABEL_DROPOUT
from stepadapt.data import DEFAULT_HOLDOUT, HOLDOUT_HELP
from stepadapt.devices import DEVICE_HELP, PRECISION_HELP
from stepadapt.options import Options, option
from stepadapt.schedule import DEFAULT_SCHEDULER
from stepadapt.train import TrainConfig, TrainResult


@dataclass(frozen=True)
class TrainBaseOptions(Options):
    """``stepadapt train-base``: data -> a diffusers UNet2DModel (EMA weights, safetensors)."""

    out: Path = option(Path("runs/base"), "Run directory (checkpoint, samples, model/).", flag="--out")
    data: str = option(
        "fashion-mnist", "'fashion-mnist', an image folder, or an .npz file (its training part)."
    )
    config: str = option("tiny", "Model config: tiny or ddpm-cifar10.")
    channels: int | None = option(None, "Image channels (1 or 3); default: the data's own.")
    size: int | None = option(None, "Image side; default: the data's own (else the config's).")
    iterations: int = option(6000, "Optimizer steps.")
    batch_size: int = option(128, "Images per step.")
    lr: float = option(2e-3, "Peak learning rate (cosine decay after warm-up).")
    ema_decay: float = option(0.999, "EMA decay of the shipped weights.")
    limit: int | None = option(None, "Use a deterministic subset of N images.")
    seed: int = option(0, "Seed for init, batches, timesteps and noise.")
    holdout: float = option(DEFAULT_HOLDOUT, HOLDOUT_HELP)
    checkpoint_every: int = option(500, "Checkpoint period in steps.")
    sample_every: int = option(1000, "Sample-grid period in steps.")
    resume: bool = option(False, "Continue from OUT/checkpoint.pt exactly.")
    device: str = option("auto", DEVICE_HELP)
    threads: int | None = option(None, "CPU threads for torch.")
    timestep_sampler: str = option("uniform", "Timestep sampler (see 'finetune --help').")
    precision: str = option("auto", PRECISION_HELP)
    conditional: bool = option(
        False,
        "Class-conditional: train on the data's labels (Fashion-MNIST's, a folder's subfolders, an "
        ".npz's 'labels'), one class embedding per class plus a null class for guidance.",
    )
    label_dropout: float = option(
        DEFAULT_LABEL_DROPOUT, "Share of labels trained as the null class (what guidance needs)."
    )
    init: Path | None = option(
        None,
        "Start from this base's weights (same config) instead of from scratch; a class-conditional "
        "model learns its class embedding from zero, so it starts as the unconditional base.",
    )
    surround: tuple[Path, ...] = option(
        (),
        "Directories with vae/ and text_encoder/ + tokenizer/ (train-vae's and train-text-encoder's "
        "OUT, or one pipeline directory; repeat the flag): train a latent U-Net on the VAE's latents "
        "of the data, conditioned on its captions; OUT/model is then a diffusers pipeline directory. "
        "Use with --config tiny-t2i.",
    )
    class_lr_scale: float | None = option(
        None,
        "The class embedding's learning rate over --lr (default: 30 with --init and --conditional, "
        "where a zero embedding on a trained base barely moves at the base's rate; else 1).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from stepadapt.models import CONFIGS

        if self.config not in CONFIGS:
            raise StepadaptError(f"unknown config {self.config!r}; choose one of {', '.join(CONFIGS)}")
        if self.channels not in (None, 1, 3):
            raise StepadaptError(f"--channels must be 1 or 3, got {self.channels}")
        text = "cross_attention_dim" in CONFIGS[self.config]
        if text and not self.surround:
            raise StepadaptError(
                f"config {self.config} is a text-to-image U-Net: give --surround (VAE, text encoder)"
            )
        if self.surround and (self.conditional or self.init is not None):
            raise StepadaptError("--surround trains a latent model from scratch: no --conditional or --init")

    def side(self) -> int:
        """The image side to train at: --size, else the data's own, else the config's (with a note
        wherever the choice is not the one the user may expect)."""
        from stepadapt.data import native_size
        from stepadapt.models import CONFIGS

        side, default = self.size or native_size(self.data), CONFIGS[self.config]["sample_size"]
        if side is None:
            warnings.warn(
                Notice(f"{self.data} has no single image size; training at {default} (set --size)"),
                stacklevel=2,
            )
            return default
        if self.size is None and side != default:
            msg = f"training {self.config} at {side} x {side}, the data's size (--size to choose)"
            warnings.warn(Notice(msg), stacklevel=2)
        return side

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            iterations=self.iterations, batch_size=self.batch_size, lr=self.lr, ema_decay=self.ema_decay,
            seed=self.seed, checkpoint_every=self.checkpoint_every, sample_every=self.sample_every,
            timestep_sampler=self.timestep_sampler, precision=self.precision,
            label_dropout=self.label_dropout,
            class_lr_scale=self.class_lr_scale or self.default_class_lr_scale,
        )  # fmt: skip

    @property
    def default_class_lr_scale(self) -> float:
        return 30.0 if self.init is not None and self.conditional else 1.0


def sample_grid(model: UNet2DModel, scheduler_cfg: dict, path: Path, n: int = 16, steps: int = 50) -> Path:
    """A grid of ``n`` images from seed 0 (50 DDIM steps): how training is going, by eye. A
    class-conditional model draws its classes in turn (label i mod classes), unguided."""
    from stepadapt.conditioning import balanced_labels, conditioning_of, labels_cond
    from stepadapt.sampling import module_denoiser, sample_images, save_grid

    shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    classes = conditioning_of(model.config).classes
    cond = labels_cond(balanced_labels(n, classes)) if classes else None
    return save_grid(
        sample_images(module_denoiser(model), scheduler_cfg, shape, n, steps=steps, cond=cond), path
    )


def initial_model(o: TrainBaseOptions, channels: int, side: int, classes: int) -> UNet2DModel:
    """The model training starts from: fresh (seeded), or --init's weights, where a class embedding
    the init has not got starts at zero (the model then answers as the init does, for every label)."""
    from stepadapt.models import build_unet, load_base

    model = build_unet(o.config, in_channels=channels, seed=o.seed, sample_size=side, classes=classes)
    if o.init is None:
        return model
    init, _ = load_base(o.init)
    mine, theirs = model.state_dict(), init.state_dict()
    unknown = sorted(k for k in theirs if k not in mine or theirs[k].shape != mine[k].shape)
    if unknown:
        raise StepadaptError(f"--init {o.init} does not fit config {o.config}: {unknown[0]} differs")
    model.load_state_dict(theirs, strict=False)
    new = sorted(set(mine) - set(theirs))
    if any(not k.startswith("class_embedding.") for k in new):
        raise StepadaptError(f"--init {o.init} lacks {new[0]}: not the same architecture")
    with torch.no_grad():
        for k in new:
            model.get_parameter(k).zero_()
    return model


def train_base(
    options: TrainBaseOptions, log: Callable[[str], None] | None = None
) -> tuple[TrainResult, Path]:
    """The train-base stage: OUT/checkpoint.pt (resumable), OUT/samples/step_*.png, and at the end
    OUT/model/ (EMA weights). Under ``torchrun`` it trains with DDP; rank 0 writes the model."""
    from stepadapt.data import class_names, load_dataset, load_labelled
    from stepadapt.devices import resolve_device, resolve_precision
    from stepadapt.models import save_base
    from stepadapt.train import train

    o, say = options, log or (lambda _: None)
    if o.threads:
        torch.set_num_threads(o.threads)
    dev = resolve_device(o.device)
    resolve_precision(o.precision, dev)  # a bad --precision is said before the data loads
    dist.init_from_env()
    side = o.side()
    part = dict(limit=o.limit, seed=o.seed, holdout=o.holdout)
    if o.surround:
        return _train_latent(o, side, part, dev, say)
    y, names = None, ()
    if o.conditional:
        x, y = load_labelled(o.data, "train", side, o.channels, **part)
        names = class_names(o.data, o.holdout)
        say(f"data: {o.data} -> {tuple(x.shape)}, {len(names)} classes: {', '.join(names)}")
    else:
        x = load_dataset(o.data, "train", side, o.channels, **part)
        say(f"data: {o.data} -> {tuple(x.shape)}")
    model = initial_model(o, x.shape[1], side, len(names))

    def on_sample(step: int, ema: UNet2DModel) -> None:
        path = sample_grid(ema, DEFAULT_SCHEDULER, o.out / "samples" / f"step_{step:06d}.png")
        say(f"step {step}: samples -> {path}")

    ema, res = train(
        model, x, DEFAULT_SCHEDULER, o.train_config(), o.out, resume=o.resume, on_sample=on_sample,
        device=dev, labels=y,
    )  # fmt: skip
    if dist.is_main():
        save_base(ema.cpu(), o.out / "model", DEFAULT_SCHEDULER, class_names=names)
    return res, o.out / "model"


def _train_latent(o: TrainBaseOptions, side: int, part: dict, dev, say: Callable[[str], None]) -> tuple:
    """train-base for a latent model: the U-Net on the surround's VAE latents of the data (captioned
    rows for a text encoder), Stable Diffusion's schedule, and OUT/model a pipeline directory."""
    from stepadapt.captions import load_captions
    from stepadapt.models import build_unet
    from stepadapt.pipeline import Surround, write_pipeline
    from stepadapt.schedule import SD_SCHEDULER
    from stepadapt.space import DataSpace
    from stepadapt.train import train

    surround = Surround.load(*o.surround)
    if surround.vae is None:
        raise StepadaptError(
            f"--surround {', '.join(map(str, o.surround))} has no vae/: a latent model needs one"
        )
    latent = surround.latent
    if side % latent.factor:
        raise StepadaptError(
            f"images of side {side} do not divide into the VAE's {latent.factor}-pixel latents"
        )
    text_dim = surround.text_model.config.hidden_size if surround.text is not None else None
    model = build_unet(o.config, in_channels=surround.vae.config.latent_channels, seed=o.seed,
                       sample_size=side // latent.factor, text_dim=text_dim)  # fmt: skip
    x, y = DataSpace.of(dict(model.config), surround).rows(o.data, "train", **part)
    say(
        f"data: {o.data} -> latents {tuple(x.shape)}"
        + (f", {len(y.table) - 1} distinct captions" if y is not None else "")
    )
    prompts = list(dict.fromkeys(load_captions(o.data, "train", o.holdout)))[:16] if text_dim else None

    def on_sample(step: int, ema: torch.nn.Module) -> None:
        path = latent_grid(ema, surround, SD_SCHEDULER, o.out / "samples" / f"step_{step:06d}.png", prompts)
        say(f"step {step}: samples -> {path}")

    ema, res = train(model, x, SD_SCHEDULER, o.train_config(), o.out, resume=o.resume, on_sample=on_sample,
                     device=dev, labels=y)  # fmt: skip
    if dist.is_main():
        write_pipeline(o.out / "model", ema.cpu(), SD_SCHEDULER, surround)
    return res, o.out / "model"


def latent_grid(
    model: torch.nn.Module,
    surround,
    scheduler_cfg: dict,
    path: Path,
    prompts: list[str] | None,
    steps: int = 20,
) -> Path:
    """A grid of a latent model's images from seed 0 (DDIM, guidance 3 for text): one per prompt."""
    from stepadapt.api import StepAdaptivePipeline
    from stepadapt.conditioning import conditioning_of
    from stepadapt.kinds import UNET
    from stepadapt.sampling import module_denoiser, save_grid

    pipe = StepAdaptivePipeline(module_denoiser(model), scheduler_cfg, UNET.sample_shape(model),
                                conditioning_of(model.config), surround)  # fmt: skip
    kw = dict(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="uint8")
    out = pipe(prompts, guidance_scale=3.0, **kw) if prompts else pipe(num_images_per_prompt=16, **kw)
    return save_grid(out.images, path)
