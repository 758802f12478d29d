"""Base + plan -> expert bundle: the candidate search for every U-Net group.

A ``gaussian`` group gets the caller's fitted closed-form denoiser
(stepadapt.gaussian) and its fixed cost; the U-Net groups share the rest.

In budget mode the groups are pruned one after another and the budgets of the
groups still to come are re-solved after each, so the widths one group could
not reach (GroupNorm staircase) are paid back by the others and the trajectory
mean still meets the target.

Each expert is pruned from the base by default, keeping the channels that
matter at its own timesteps. ``nested`` prunes the groups from the largest
budget to the smallest instead, each from the expert before it, so every
expert's channels are a subset of every larger expert's: the experts then share
weights coherently when fine-tuned together (stepadapt.shared), as the widths
of a slimmable network do. An expert's
structure is still one history replayed on the base (the parents' steps, then
its own).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from diffusers import UNet2DModel

from stepadapt import StepadaptError
from stepadapt.bundle import ExpertSpec, Manifest, provenance, save_bundle
from stepadapt.gaussian import GaussianDenoiser
from stepadapt.importance import (
    DEFAULT_CANDIDATES,
    Candidate,
    Memory,
    search_group,
)
from stepadapt.models import clean_config
from stepadapt.plan import Plan, budget_ratios
from stepadapt.prune import count_macs


def compress(
    base: UNet2DModel,
    scheduler_cfg: dict,
    plan: Plan,
    proxy_train: torch.Tensor,
    proxy_val: torch.Tensor,
    out: str | os.PathLike,
    *,
    candidates: tuple[Candidate, ...] = DEFAULT_CANDIDATES,
    memory: Memory | None = None,
    seed: int = 0,
    nested: bool = False,
    gaussian: GaussianDenoiser | None = None,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
) -> Manifest:
    """``gaussian``: the fitted closed-form denoiser for the plan's ``gaussian`` groups."""
    base_macs, base_params = count_macs(base)
    ratios = [g.macs_ratio for g in plan.groups]
    achieved: dict[int, float] = {}
    models, specs = {}, {}
    for i, g in enumerate(plan.groups):
        if g.kind == "unet":
            continue
        if gaussian is None:
            raise StepadaptError(f"the plan gives [{g.lo},{g.hi}) to a Gaussian expert, but none was fitted")
        achieved[i] = gaussian.macs / base_macs
        models[g.name] = gaussian
        specs[i] = ExpertSpec(
            name=g.name, timesteps=(g.lo, g.hi), snr_db=g.snr_db, target_macs=gaussian.macs,
            macs=gaussian.macs, params=gaussian.params, weights="", sha256="", structure="",
            structure_sha256="", importance="closed form", kind="gaussian",
        )  # fmt: skip
        if log:
            log(f"group {g.name} [{g.lo},{g.hi}): Gaussian denoiser, {gaussian.macs / 1e6:.2f} MMACs "
                f"({achieved[i]:.3f} x base)")  # fmt: skip
    order = [i for i in range(len(plan.groups)) if plan.groups[i].kind == "unet"]
    if nested:  # largest first (stable: ties keep the plan's order)
        order = sorted(order, key=lambda i: -ratios[i])
    parent, parent_history, parent_name = base, [], None
    for i in order:
        g = plan.groups[i]
        if plan.allocation == "budget" and len(achieved) > len(plan.fixed_ratios()):
            ratios = budget_ratios(
                [x.difficulty for x in plan.groups],
                [x.visit_share for x in plan.groups],
                plan.budget,
                fixed=achieved,
                saturate=True,  # widths reached so far may leave no exact solution: the nearest, and a note
            )
        target = ratios[i] * base_macs
        if log:
            log(f"group {g.name} [{g.lo},{g.hi}): target {target / 1e6:.2f} MMACs ({ratios[i]:.3f} x base)")
        res = search_group(
            parent, scheduler_cfg, g.lo, g.hi, target, proxy_train, proxy_val,
            candidates=candidates, memory=memory, seed=seed, log=log,
        )  # fmt: skip
        achieved[i] = res.best.macs / base_macs
        history = parent_history + res.best.history
        models[g.name] = (res.best.model, history)
        specs[i] = ExpertSpec(
            name=g.name, timesteps=(g.lo, g.hi), snr_db=g.snr_db, target_macs=int(target),
            macs=res.best.macs, params=res.best.params, weights="", sha256="",
            structure="", structure_sha256="",
            importance=res.best_label if res.best.history else ("unpruned" if not history else "parent's"),
            proxy_loss=round(res.proxy_loss, 6), parent=parent_name if parent_history else None,
        )  # fmt: skip
        if nested:
            parent, parent_history = res.best.model, history
            parent_name = g.name if history else None
    mean = plan.mean_ratio([achieved[i] for i in range(len(plan.groups))])
    if log and plan.budget is not None and abs(mean - plan.budget) > 0.02 * plan.budget:
        # Only budget allocation re-solves later groups; damage sizes and nested parents can drift.
        log(
            f"note: trajectory mean {mean:.3f} x base MACs, budget {plan.budget:.3f}: the widths the groups "
            "could reach (GroupNorm steps) left the others no exact way to pay it back"
        )
    manifest = Manifest(
        base_config=clean_config(base),
        scheduler=dict(scheduler_cfg),
        sample_shape=(base.config.in_channels, base.config.sample_size, base.config.sample_size),
        base_macs=base_macs,
        base_params=base_params,
        experts=[specs[i] for i in range(len(plan.groups))],
        plan=plan.to_dict(),
        provenance=provenance(command, seed=seed, nested=nested, candidates=[c.label for c in candidates]),
    )
    save_bundle(out, manifest, models)
    return manifest
