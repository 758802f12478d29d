"""Difficulty profiles over timesteps: how hard is denoising at t?

For an epsilon-predictor the hard steps are the low-noise ones (high SNR): the
noise is a small part of x_t and must be told apart from image detail. Each
measure is returned per timestep (length T) and normalised to [0, 1] by
:func:`normalise` before it sizes the groups.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import UNet2DModel

from stepadapt import StepadaptError
from stepadapt.conditioning import Cond, model_inputs
from stepadapt.devices import device_of
from stepadapt.schedule import make_scheduler, noised_target, snr_db

MEASURES = ("snr", "loss")


def snr_profile(scheduler_cfg: dict) -> np.ndarray:
    return snr_db(make_scheduler("ddpm", scheduler_cfg)).numpy()


@torch.no_grad()
def loss_profile(
    model: UNet2DModel,
    scheduler_cfg: dict,
    data: torch.Tensor,
    points: int = 40,
    seed: int = 0,
    log: bool = False,
    cond: Cond | None = None,
) -> np.ndarray:
    """The model's denoising loss at ``points`` timesteps, interpolated to all T.

    The same images and noise are used at every timestep, so differences
    between timesteps are not sampling noise. ``log`` interpolates log-loss: the
    loss spans three decades over the schedule. ``cond``: the images' condition (class labels
    row-aligned with ``data``), which a conditional model is asked with: its loss is the
    conditional one.
    """
    sched = make_scheduler("ddpm", scheduler_cfg)
    T = sched.config.num_train_timesteps
    g = torch.Generator().manual_seed(seed)
    data = data.to(device_of(model))  # the model's device; the noise is drawn on the CPU, as always
    noise = torch.randn(data.shape, generator=g).to(data.device)
    extra = {k: v.to(data.device) for k, v in model_inputs(cond or {}).items()}
    ts = np.unique(np.linspace(0, T - 1, points).round().astype(int))
    losses = []
    model.eval()
    for t in ts:
        tt = torch.full((len(data),), int(t), dtype=torch.long, device=data.device)
        out = model(sched.add_noise(data, noise, tt), tt, **extra).sample
        losses.append(torch.mean((out - noised_target(sched, data, noise, tt)) ** 2).item())
    losses = np.asarray(losses)
    if log:
        return np.exp(np.interp(np.arange(T), ts, np.log(np.maximum(losses, 1e-12))))
    return np.interp(np.arange(T), ts, losses)


def normalise(values: np.ndarray, floor: float = 0.05) -> np.ndarray:
    """Min-max to [floor, 1]: every group keeps a non-zero share of compute."""
    v = np.asarray(values, dtype=np.float64)
    if not np.isfinite(v).all():
        raise StepadaptError("difficulty profile contains NaN or infinite values")
    span = v.max() - v.min()
    z = (v - v.min()) / span if span > 0 else np.ones_like(v)
    return floor + (1.0 - floor) * z
