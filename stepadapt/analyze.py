"""Base model -> Plan: the difficulty profiles and the grouping/allocation in one call."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import UNet2DModel

from stepadapt import StepadaptError
from stepadapt.difficulty import MEASURES, loss_profile, normalise, snr_profile
from stepadapt.gaussian import DEFAULT_TOLERANCE, GaussianDenoiser, gaussian_cutoff
from stepadapt.plan import Plan, make_plan, visited_timesteps
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
    gaussian: GaussianDenoiser | None = None,
    gaussian_from: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> tuple[Plan, dict[str, np.ndarray]]:
    """Returns the plan and every normalised profile (all are plotted, ``measure`` decides).

    ``gaussian``: a fitted closed-form denoiser takes the noisy end [t*, T), from
    ``gaussian_from`` or, when that is None, from the t* where its eps error on the
    proxy comes within ``tolerance`` x the base's (:func:`stepadapt.gaussian.gaussian_cutoff`).

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
            budget=budget, sampler=sampler, steps=steps, seed=seed, gaussian=gaussian,
            gaussian_from=gaussian_from, tolerance=tolerance, **(damage or {}),
        )  # fmt: skip
    if measure not in MEASURES:
        choices = ", ".join((*MEASURES, "damage"))
        raise StepadaptError(f"unknown measure {measure!r}; choose one of {choices}")
    s = snr_profile(scheduler_cfg)
    base_macs = count_macs(model)[0]
    chosen = None
    if gaussian is not None and gaussian_from is None and boundaries is None and groups < 2:
        gaussian = None  # auto, but a single group leaves no room for a second kind of expert
    if gaussian is not None:
        chosen = {"rule": "given", "from": gaussian_from}
        if gaussian_from is None:
            cut, errs = gaussian_cutoff(model, gaussian, scheduler_cfg, proxy, tolerance=tolerance, seed=seed)
            mse = {str(t): [round(b, 7), round(g, 7)] for t, (b, g) in sorted(errs.items())}
            chosen = {"rule": "auto", "from": cut, "tolerance_from": cut, "tolerance": tolerance}
            chosen["eps_mse"] = mse
            if budget is not None and cut < len(s):  # never so far down that the budget cannot be spent
                cut = _spendable_from(cut, budget, gaussian.macs / base_macs, sampler, steps, scheduler_cfg)
                chosen["from"] = cut
            gaussian_from = cut if cut < len(s) else None
    profiles = {
        "snr": normalise(s),
        "loss": normalise(loss_profile(model, scheduler_cfg, proxy, seed=seed)),
    }
    plan = make_plan(
        profiles[measure],
        s,
        base_macs,
        groups=groups,
        partition_kind=partition,
        boundaries=boundaries,
        budget=budget,
        tdc_k=tdc_k,
        sampler=sampler,
        steps=steps,
        measure=measure,
        scheduler_cfg=scheduler_cfg,
        gaussian_from=gaussian_from,
        gaussian_macs=gaussian.macs if gaussian is not None else 0,
    )
    plan.gaussian = chosen
    return plan, profiles


def _spendable_from(
    cut: int, budget: float, ratio: float, sampler: str, steps: int, scheduler_cfg: dict
) -> int:
    """The lowest start >= ``cut`` at which U-Nets of at most the base's size can still spend ``budget``:
    a Gaussian on more of the visited steps would leave the budget unreachable."""
    visits = visited_timesteps(sampler, steps, scheduler_cfg)
    for lo in sorted({cut, *(int(v) + 1 for v in visits if v >= cut)}):
        gaussian_share = float(np.mean(visits >= lo))
        if (1.0 - gaussian_share) + gaussian_share * ratio >= budget - 1e-9:
            return lo
    return int(scheduler_cfg["num_train_timesteps"])


def _damage_plan(
    model: UNet2DModel, scheduler_cfg: dict, proxy: torch.Tensor, *, groups: int, partition: str,
    boundaries: list[int] | None, budget: float | None, sampler: str, steps: int, seed: int,
    data: torch.Tensor, proxy_train: torch.Tensor, proxy_val: torch.Tensor,
    gaussian: GaussianDenoiser | None, gaussian_from: int | None, tolerance: float, **options,
) -> tuple[Plan, dict[str, np.ndarray]]:  # fmt: skip
    from stepadapt.allocate import Option, choose, measure_damage

    plan, profiles = analyze_base(
        model, scheduler_cfg, proxy, measure="snr", groups=groups, partition=partition,
        boundaries=boundaries, budget=budget, sampler=sampler, steps=steps, seed=seed,
        gaussian=gaussian, gaussian_from=gaussian_from, tolerance=tolerance,
    )  # fmt: skip
    fixed = plan.fixed_ratios()  # the Gaussian's size is set: only the U-Net groups are measured
    unet = [g for i, g in enumerate(plan.groups) if i not in fixed]
    measured = iter(measure_damage(
        model, scheduler_cfg, [g.lo for g in unet] + [unet[-1].hi], data, proxy_train, proxy_val, seed=seed,
        **options,
    ))  # fmt: skip
    table = [[Option(fixed[i], 0.0)] if i in fixed else next(measured) for i in range(len(plan.groups))]
    picks = choose(table, [g.visit_share for g in plan.groups], budget)
    for g, row, k in zip(plan.groups, table, picks, strict=True):
        g.macs_ratio = row[k].ratio
    plan.measure, plan.allocation = "damage", "damage"
    plan.damage = [[[o.ratio, o.damage] for o in row] for row in table]
    return plan, profiles
