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
    damage: dict | None = None,
) -> tuple[Plan, dict[str, np.ndarray]]:
    """Returns the plan and every normalised profile (all are plotted, ``measure`` decides).

    ``measure="damage"`` groups by ``partition`` and sizes each group by measured
    damage (stepadapt.allocate); ``damage`` then holds the training data
    (``data``), the proxy sets (``proxy_train``, ``proxy_val``) and any options
    of :func:`stepadapt.allocate.measure_damage`.
    """
    if measure == "damage":
        if budget is None:
            raise StepadaptError("--measure damage sizes the groups under a --budget; the TDC rule has none")
        if not damage or not {"data", "proxy_train", "proxy_val"} <= damage.keys():
            raise StepadaptError(
                "--measure damage needs training data and two proxy sets to recover and judge sizes"
            )
        return _damage_plan(
            model, scheduler_cfg, proxy, groups=groups, partition=partition, boundaries=boundaries,
            budget=budget, sampler=sampler, steps=steps, seed=seed, **(damage or {}),
        )  # fmt: skip
    if measure not in MEASURES:
        choices = ", ".join((*MEASURES, "damage"))
        raise StepadaptError(f"unknown measure {measure!r}; choose one of {choices}")
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


def _damage_plan(
    model: UNet2DModel, scheduler_cfg: dict, proxy: torch.Tensor, *, groups: int, partition: str,
    boundaries: list[int] | None, budget: float | None, sampler: str, steps: int, seed: int,
    data: torch.Tensor, proxy_train: torch.Tensor, proxy_val: torch.Tensor, **options,
) -> tuple[Plan, dict[str, np.ndarray]]:  # fmt: skip
    from stepadapt.allocate import choose, measure_damage

    plan, profiles = analyze_base(
        model, scheduler_cfg, proxy, measure="snr", groups=groups, partition=partition,
        boundaries=boundaries, budget=budget, sampler=sampler, steps=steps, seed=seed,
    )  # fmt: skip
    table = measure_damage(
        model, scheduler_cfg, plan.boundaries, data, proxy_train, proxy_val, seed=seed, **options
    )
    picks = choose(table, [g.visit_share for g in plan.groups], budget)
    for g, row, k in zip(plan.groups, table, picks, strict=True):
        g.macs_ratio = row[k].ratio
    plan.measure, plan.allocation = "damage", "damage"
    plan.damage = [[[o.ratio, o.damage] for o in row] for row in table]
    return plan, profiles
