"""Sizes by measured damage: try a few sizes per group, recover each briefly, pick under the budget.

A difficulty proxy (SNR, the base's loss) says how hard a group's steps are,
not what shrinking its model does to the *images*: on our base the SNR rule
starves the noisy end, whose steps lay out the whole picture, and the loss
right after pruning does not predict quality after recovery (TinyFusion). So
each candidate size of each group is pruned, recovered with a short distilled
fine-tune on the group's timesteps, and swapped into the base's trajectory
alone (base everywhere else, same noise); its damage is how far the images
move from the base's. A multiple-choice knapsack then picks one size per group
with the least total damage whose visit-weighted mean MACs meet the budget.

A class-conditional base is measured with its labels: the proxy sets' and the recovery data's
travel beside the images, and the images compared are sampled for labels cycling through the
classes (unguided: the conditional branch).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import UNet2DModel

from stepadapt import StepadaptError
from stepadapt.conditioning import Cond, conditioning_of, labels_cond
from stepadapt.devices import device_of
from stepadapt.evaluate import fidelity
from stepadapt.importance import Candidate, search_group
from stepadapt.prune import count_macs
from stepadapt.sampling import module_denoiser, sample_images, swapped_in
from stepadapt.train import DEFAULT_DISTILL, TrainConfig, train

DEFAULT_SIZES = (0.25, 0.4, 0.55, 0.7)


@dataclass(frozen=True)
class Option:
    ratio: float  # MACs / base, as reached
    damage: float


def choose(options: Sequence[Sequence[Option]], shares: Sequence[float], budget: float) -> list[int]:
    """Multiple-choice knapsack: one option per group, sum(share * ratio) <= budget, least total damage.

    Exact: a Pareto front of (cost, damage) over the groups seen so far, dominated
    partial choices dropped; with a handful of groups and sizes it stays tiny.
    """
    if len(options) != len(shares) or any(not o for o in options):
        raise StepadaptError("every group needs at least one size to choose from")
    front: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    for opts, share in zip(options, shares, strict=True):
        grown = sorted(
            (c + share * o.ratio, d + o.damage, pick + (k,))
            for c, d, pick in front
            for k, o in enumerate(opts)
            if c + share * o.ratio <= budget + 1e-9
        )
        front = []
        for c, d, pick in grown:  # by cost; keep only what lowers the damage
            if not front or d < front[-1][1] - 1e-15:
                front.append((c, d, pick))
        if not front:
            cheapest = sum(s * min(o.ratio for o in opt) for opt, s in zip(options, shares, strict=True))
            raise StepadaptError(
                f"budget {budget:.3f} is below the smallest sizes tried (mean {cheapest:.3f}): "
                "add smaller --sizes"
            )
    return list(min(front, key=lambda x: (x[1], x[0]))[2])


def swap_damage(
    model: UNet2DModel, base: UNet2DModel, lo: int, hi: int, scheduler_cfg: dict, reference: np.ndarray,
    steps: int, seed: int, cond: Cond | None = None,
) -> float:  # fmt: skip
    """Mean squared pixel error (range [0, 1]) against the base's images, ``model`` alone on [lo, hi);
    ``cond``: the condition the reference was sampled with."""
    T = int(scheduler_cfg["num_train_timesteps"])
    hybrid = swapped_in(module_denoiser(base), module_denoiser(model), lo, hi, T)
    shape = reference.shape[3], reference.shape[1], reference.shape[2]
    images = sample_images(hybrid, scheduler_cfg, shape, len(reference), steps=steps, seed=seed, cond=cond)
    return fidelity(images, reference)["mse"]


def reference_cond(base: torch.nn.Module, n: int) -> Cond | None:
    """What the compared images are sampled for: labels cycling through a class-conditional base's
    classes (every class alike); None for an unconditional base."""
    classes = conditioning_of(base.config).classes
    return labels_cond(torch.arange(n) % classes) if classes else None


def measure_damage(
    base: UNet2DModel,
    scheduler_cfg: dict,
    boundaries: Sequence[int],
    data: torch.Tensor,
    proxy_train: torch.Tensor,
    proxy_val: torch.Tensor,
    *,
    sizes: Sequence[float] = DEFAULT_SIZES,
    recover_iterations: int = 100,
    batch_size: int = 32,
    sample_steps: int = 25,
    n: int = 64,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    data_labels: torch.Tensor | None = None,
    train_labels: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
) -> list[list[Option]]:
    """Per group: the unpruned base (no damage) and each size below 1, pruned, recovered and swapped in.
    ``data_labels``, ``train_labels``, ``val_labels``: the classes of ``data`` and of the proxy sets,
    for a class-conditional base."""
    if any(not 0 < s < 1 for s in sizes):
        raise StepadaptError(f"sizes are fractions of the base's MACs in (0, 1), got {list(sizes)}")
    base_macs = count_macs(base)[0]
    c, s = base.config.in_channels, base.config.sample_size
    cond = reference_cond(base, n)
    reference = sample_images(
        module_denoiser(base), scheduler_cfg, (c, s, s), n, steps=sample_steps, seed=seed, cond=cond
    )
    labelled = {} if train_labels is None else {"train_labels": train_labels, "val_labels": val_labels}
    table = []
    for lo, hi in zip(boundaries, boundaries[1:], strict=False):
        row = [Option(1.0, 0.0)]
        for size in sorted(sizes, reverse=True):
            found = search_group(
                base, scheduler_cfg, lo, hi, size * base_macs, proxy_train, proxy_val,
                candidates=(Candidate("taylor", True),), seed=seed, **labelled,
            ).best  # fmt: skip
            ratio = round(found.macs / base_macs, 4)
            if any(o.ratio == ratio for o in row):
                continue  # the GroupNorm staircase gave a size already tried
            cfg = TrainConfig(
                iterations=recover_iterations, batch_size=batch_size, lr=5e-4, t_lo=lo, t_hi=hi,
                warmup=min(10, recover_iterations), distill=DEFAULT_DISTILL, seed=seed,
                checkpoint_every=10**9, sample_every=10**9,
            )  # fmt: skip
            with tempfile.TemporaryDirectory() as tmp:
                recovered, _ = train(
                    found.model, data, scheduler_cfg, cfg, tmp, progress=False, teacher=base,
                    device=device_of(base), labels=data_labels,
                )  # fmt: skip
            damage = swap_damage(recovered, base, lo, hi, scheduler_cfg, reference, sample_steps, seed, cond)
            row.append(Option(ratio, damage))
            if log:
                log(
                    f"  [{lo},{hi}) {ratio:.3f} x MACs, {recover_iterations} recovery it: damage {damage:.5f}"
                )
        table.append(row)
    return table
