"""Noise-schedule quantities on top of diffusers' schedulers.

SNR(t) = alpha_bar_t / (1 - alpha_bar_t); the step-adaptive plan is drawn in
SNR-dB because that is where the difficulty of denoising changes evenly.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, SchedulerMixin

from stepadapt import StepadaptError

DEFAULT_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
}
SAMPLERS = ("ddpm", "ddim")


def make_scheduler(sampler: str = "ddpm", config: dict[str, Any] | None = None) -> SchedulerMixin:
    """A fresh diffusers scheduler of the given kind from a (shared) config dict."""
    cfg = {**DEFAULT_SCHEDULER, **(config or {})}
    if sampler == "ddpm":
        return DDPMScheduler.from_config(cfg)
    if sampler == "ddim":
        return DDIMScheduler.from_config(cfg)
    raise StepadaptError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def scheduler_config(scheduler: SchedulerMixin) -> dict[str, Any]:
    """The JSON-able subset that defines the forward process."""
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
    cfg = {k: scheduler.config[k] for k in keys if k in scheduler.config}
    cfg["clip_sample"] = bool(scheduler.config.get("clip_sample", True))
    return cfg


def alpha_bar(scheduler: SchedulerMixin) -> torch.Tensor:
    return scheduler.alphas_cumprod.double()


def snr(scheduler: SchedulerMixin) -> torch.Tensor:
    ab = alpha_bar(scheduler)
    return ab / (1.0 - ab)


def snr_db(scheduler: SchedulerMixin) -> torch.Tensor:
    return 10.0 * torch.log10(snr(scheduler))
