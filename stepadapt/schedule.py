"""Noise-schedule quantities on top of diffusers' schedulers.

SNR(t) = alpha_bar_t / (1 - alpha_bar_t); the step-adaptive plan is drawn in
SNR-dB because that is where the difficulty of denoising changes evenly.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, SchedulerMixin

from stepadapt import StepadaptError

# What a diffusers directory without a scheduler config gets: DDPMScheduler's own defaults.
DEFAULT_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
}
# Stable Diffusion's schedule, for latent models: latents are not clipped to [-1, 1] (no clip_sample).
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_CLASSES = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


def _one_of(value: Any, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise StepadaptError(f"{what} {value!r} is not one of {', '.join(choices)}")


def check_scheduler_config(cfg: dict[str, Any]) -> None:
    """A one-line error for a prediction type or beta schedule stepadapt cannot follow."""
    _one_of(cfg["prediction_type"], PREDICTION_TYPES, "scheduler prediction_type")
    if cfg.get("trained_betas") is None:
        _one_of(cfg["beta_schedule"], BETA_SCHEDULES, "scheduler beta_schedule")


def make_scheduler(sampler: str = "ddpm", config: dict[str, Any] | None = None) -> SchedulerMixin:
    """A fresh DDPM (training, noising) or DDIM scheduler from one shared config (the model's own);
    sampling takes any solver through :class:`stepadapt.solvers.Solver`.

    The config is the whole ``scheduler_config.json`` of the model, whichever class wrote it; each
    class takes the keys it knows (``variance_type`` is DDPM's, ``set_alpha_to_one`` DDIM's), as a
    diffusers pipeline does when it swaps schedulers.
    """
    if sampler not in _CLASSES:
        raise StepadaptError(f"unknown schedule kind {sampler!r}; choose one of {', '.join(_CLASSES)}")
    return from_model_config(_CLASSES[sampler], config)


def from_model_config(cls: type[SchedulerMixin], config: dict[str, Any] | None) -> SchedulerMixin:
    """``cls`` from a model's whole scheduler config (DDPMScheduler's defaults under it), checked,
    each class taking the keys it knows."""
    cfg = {**DEFAULT_SCHEDULER, **(config or {})}
    check_scheduler_config(cfg)
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return cls.from_config({k: v for k, v in cfg.items() if k in known})


def model_target(
    prediction_type: str, x0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor
) -> torch.Tensor:
    """What a model of this prediction type outputs for clean ``x0`` noised with ``eps``: the training
    target, and what a closed-form expert must return to stand in for the model.

    ``alpha_bar_t`` broadcasts against ``x0`` (e.g. shape B x 1 x 1 x 1); v = sqrt(ab) eps - sqrt(1-ab) x0.
    """
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return alpha_bar_t.sqrt() * eps - (1.0 - alpha_bar_t).sqrt() * x0
    _one_of(prediction_type, PREDICTION_TYPES, "prediction_type")
    raise AssertionError("unreachable")


def noised_target(
    scheduler: SchedulerMixin, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """:func:`model_target` for ``x0`` noised with ``noise`` at timesteps ``t`` under ``scheduler``:
    what the loss, the loss profile and the Gaussian's cut-off compare a model's output with."""
    ab = per_sample(scheduler.alphas_cumprod, t, x0)
    return model_target(scheduler.config.prediction_type, x0, noise, ab)


def per_sample(alpha_bar: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar at each sample's timestep, shaped to broadcast against ``like`` (B x C x H x W)."""
    return alpha_bar.to(like.device, like.dtype)[t.long()].reshape(-1, *([1] * (like.dim() - 1)))


def alpha_bar(scheduler: SchedulerMixin) -> torch.Tensor:
    return scheduler.alphas_cumprod.double()


def snr(scheduler: SchedulerMixin) -> torch.Tensor:
    ab = alpha_bar(scheduler)
    return ab / (1.0 - ab)


def snr_db(scheduler: SchedulerMixin) -> torch.Tensor:
    return 10.0 * torch.log10(snr(scheduler))
