"""Base model -> Plan: the difficulty profiles and the grouping/allocation in one call."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import UNet2DModel

from stepadapt import StepadaptError
from stepadapt.difficulty import MEASURES, loss_profile, normalise, snr_profile
from stepadapt.plan import Plan, make_plan
from stepadapt.prune import count_macs


def analyze_base(
    model: UNet2DModel,
    scheduler_cfg: dict,
    proxy: torch.Tensor,
    *,
    measure: str = "snr",
    groups: int = 4,
    partition: str = "snr",
    boundaries: list[int] | None = None,
    budget: float | None = 0.5,
    tdc_k: float = 0.5,
    sampler: str = "ddim",
    steps: int = 50,
    seed: int = 0,
) -> tuple[Plan, dict[str, np.ndarray]]:
    """Returns the plan and every normalised profile (all are plotted, ``measure`` decides)."""
    if measure not in MEASURES:
        raise StepadaptError(f"unknown measure {measure!r}; choose one of {', '.join(MEASURES)}")
    s = snr_profile(scheduler_cfg)
    profiles = {
        "snr": normalise(s),
        "loss": normalise(loss_profile(model, scheduler_cfg, proxy, seed=seed)),
    }
    plan = make_plan(
        profiles[measure],
        s,
        count_macs(model)[0],
        groups=groups,
        partition_kind=partition,
        boundaries=boundaries,
        budget=budget,
        tdc_k=tdc_k,
        sampler=sampler,
        steps=steps,
        measure=measure,
        scheduler_cfg=scheduler_cfg,
    )
    return plan, profiles
