"""Base U-Net configurations and pickle-free load/save of diffusers model dirs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from stepadapt import StepadaptError, first_line
from stepadapt.io import atomic_dir, read_json
from stepadapt.schedule import DEFAULT_SCHEDULER, make_scheduler

# `tiny`: <= 0.1 GMACs at 32x32 so it trains on 2 CPU cores in minutes; GroupNorm
# with 8 groups means widths prune in steps of C/8 (2 channels at the top level).
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        sample_size=32,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
    # A latent text-to-image U-Net for 4 x 8 x 8 latents (a VAE's of 32 x 32 images): cross-attention
    # over the text on the two finer levels; `cross_attention_dim` follows the text encoder. 1.5 M
    # parameters at text width 64: the shipped pipeline stays under 5 MB in fp16.
    "tiny-t2i": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,  # UNet2DConditionModel reads it as the number of heads
        norm_num_groups=8,
    ),
    # The google/ddpm-cifar10-32 architecture (35.7M params, 6.06 GMACs).
    "ddpm-cifar10": dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        attention_head_dim=None,
    ),
}

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SCHEDULER_NAME = "scheduler_config.json"
CLASSES_NAME = "classes.json"  # a class-conditional base's class names, index order
DEFAULT_BASE = Path(__file__).parent / "weights" / "fashion-tiny"


# The U-Net classes a base may be: diffusers' own, loaded from safetensors only.
UNET_CLASSES: dict[str, type] = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}


def build_unet(
    name: str = "tiny",
    in_channels: int | None = None,
    seed: int = 0,
    sample_size: int | None = None,
    classes: int = 0,
    text_dim: int | None = None,
) -> UNet2DModel | UNet2DConditionModel:
    """A freshly initialised U-Net of a named config (seeded, so runs are repeatable); channels and
    size follow the data when given. ``classes`` > 0: class-conditional, with one more embedding for
    the null class that guidance needs (see :mod:`stepadapt.conditioning`). A config with
    cross-attention is a ``UNet2DConditionModel`` over text of width ``text_dim`` (its own else)."""
    if name not in CONFIGS:
        raise StepadaptError(f"unknown model config {name!r}; choose one of {', '.join(CONFIGS)}")
    cfg = dict(CONFIGS[name])
    if in_channels is not None:
        cfg["in_channels"] = cfg["out_channels"] = in_channels
    if sample_size is not None:
        step = 2 ** (len(cfg["block_out_channels"]) - 1)  # every level but the last halves the image
        if sample_size < step or sample_size % step:
            raise StepadaptError(f"config {name} needs an image side divisible by {step}, got {sample_size}")
        cfg["sample_size"] = sample_size
    if classes:
        cfg["num_class_embeds"] = int(classes) + 1
    cls = UNet2DConditionModel if "cross_attention_dim" in cfg else UNet2DModel
    if text_dim is not None:
        if cls is UNet2DModel:
            raise StepadaptError(f"config {name} has no cross-attention: it cannot take text")
        cfg["cross_attention_dim"] = int(text_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**cfg)


def save_base(
    model: UNet2DModel,
    path: str | os.PathLike,
    scheduler_cfg: dict | None = None,
    class_names: tuple[str, ...] | list[str] = (),
) -> Path:
    """Write a diffusers-format dir (config.json + safetensors) plus the scheduler config, and a
    class-conditional model's class names (``classes.json``, index order)."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / SCHEDULER_NAME).write_text(
            json.dumps({**DEFAULT_SCHEDULER, **(scheduler_cfg or {})}, indent=2) + "\n"
        )
        if class_names:
            (tmp / CLASSES_NAME).write_text(json.dumps(list(class_names), indent=2) + "\n")
        for extra in ("MODEL_CARD.md", "samples.png"):
            if (path / extra).is_file():
                (tmp / extra).write_bytes((path / extra).read_bytes())
    return path


def load_base(path: str | os.PathLike | None = None) -> tuple[UNet2DModel, dict[str, Any]]:
    """Load a diffusers U-Net dir (``UNet2DModel``, or ``UNet2DConditionModel`` for cross-attention;
    safetensors only) and its scheduler config.

    The scheduler config is kept whole, as diffusers' own pipeline would build from it; a dir
    without ``scheduler_config.json`` (e.g. a plain download of google/ddpm-cifar10-32's unet) gets
    DDPMScheduler's defaults.
    """
    path = Path(path) if path is not None else DEFAULT_BASE
    if not path.is_dir():
        raise StepadaptError(f"base model directory not found: {path}")
    # Accept a full pipeline dir too (unet/ + scheduler/).
    unet_dir = (path / "unet/config.json").parent if (path / "unet/config.json").is_file() else path
    if not (unet_dir / "config.json").is_file():
        raise StepadaptError(f"{unet_dir} has no config.json: not a diffusers model directory")
    if not (unet_dir / WEIGHTS_NAME).is_file():
        raise StepadaptError(
            f"{unet_dir} has no {WEIGHTS_NAME} (only safetensors weights are loaded, never pickles)"
        )
    cfg = read_json(unet_dir / "config.json", "model config")
    cls = UNET_CLASSES.get(cfg.get("_class_name", "UNet2DModel"))
    if cls is None:
        raise StepadaptError(f"{unet_dir} holds a {cfg['_class_name']}, not one of {', '.join(UNET_CLASSES)}")
    try:
        model = cls.from_pretrained(unet_dir, use_safetensors=True, low_cpu_mem_usage=False).float()
    except Exception as e:
        msg = first_line(e)
        raise StepadaptError(f"cannot load model from {unet_dir}: {msg}") from None
    sched_path = next(
        (p for p in (path / SCHEDULER_NAME, path / "scheduler" / SCHEDULER_NAME) if p.is_file()),
        None,
    )
    sched = dict(DEFAULT_SCHEDULER)
    if sched_path is not None:  # all of it: variance_type, timestep_spacing, ... decide the images too
        loaded = read_json(sched_path, "scheduler config")
        if not isinstance(loaded, dict):
            raise StepadaptError(f"scheduler config {sched_path} is not a JSON object")
        sched.update({k: v for k, v in loaded.items() if not k.startswith("_")})
        make_scheduler("ddpm", sched)  # a bad prediction type or beta schedule is said here, once
    from stepadapt.pipeline import is_pipeline

    if is_pipeline(path):  # as StableDiffusionPipeline corrects old configs: latents are never
        sched.update(clip_sample=False, steps_offset=1)  # clipped to +-1, steps are offset by 1
    return model.eval(), sched


def read_class_names(path: str | os.PathLike | None, classes: int) -> tuple[str, ...]:
    """A base's class names (``classes.json``), else the label numbers themselves."""
    f = Path(path if path is not None else DEFAULT_BASE) / CLASSES_NAME
    if f.is_file():
        names = read_json(f, "class names")
        if isinstance(names, list) and len(names) == classes and all(isinstance(n, str) for n in names):
            return tuple(names)
        raise StepadaptError(f"{f} must list {classes} class names")
    return tuple(str(i) for i in range(classes))


def clean_config(model: UNet2DModel) -> dict[str, Any]:
    """The model's constructor config as plain JSON (no paths, no private keys)."""
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dict(model.config).items()
        if not k.startswith("_")
    }


def weights_sha256(model: torch.nn.Module) -> str:
    """The digest of a model's weights (not of a file: the same weights loaded from anywhere agree),
    which a bundle records of its base so a teacher or reference of other weights is caught."""
    from stepadapt.io import sha256_tensors

    return sha256_tensors(model.state_dict())


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
