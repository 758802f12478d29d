"""Pictures a person would rather look at than read: the plan."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stepadapt.io import atomic_path  # noqa: E402
from stepadapt.kinds import kind_of  # noqa: E402
from stepadapt.plan import Plan  # noqa: E402


def plot_plan(
    plan: Plan, profiles: dict[str, np.ndarray], path: str | os.PathLike, achieved: list[float] | None = None
) -> Path:
    """Difficulty profiles over t, group boundaries, and each group's MAC budget."""
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 2])
    t = np.arange(plan.num_train_timesteps)
    for name, v in profiles.items():
        ax.plot(t, v, label=name)
    ax.set_ylabel("normalised difficulty")
    ax.set_title(
        f"{len(plan.groups)} groups ({plan.partition}), allocation {plan.allocation}, "
        f"mean {plan.mean_ratio():.3f} x base MACs over {plan.steps} {plan.sampler} steps"
    )
    for g in plan.groups:
        for a in (ax, bx):
            a.axvline(g.lo, color="grey", lw=0.8, ls="--")
        bx.fill_between([g.lo, g.hi], 0, g.macs_ratio, step="pre", alpha=0.35, color="C0")
        label = f"{g.name} {kind_of(g.kind).label}".rstrip() + f"\n{g.macs_ratio:.2f}"
        bx.text((g.lo + g.hi) / 2, g.macs_ratio + 0.02, label, ha="center", va="bottom")
    if achieved:
        for g, r in zip(plan.groups, achieved, strict=True):
            bx.hlines(r, g.lo, g.hi, color="C3", lw=2)
        bx.plot([], [], color="C3", lw=2, label="achieved")
        bx.legend(loc="upper right")
    ax.legend(loc="upper right")
    bx.set_ylim(0, 1.25)
    bx.set_ylabel("MACs / base")
    bx.set_xlabel("timestep t (0 = clean image)")
    return save_figure(fig, path, dpi=110)


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Lay out, write atomically as PNG, and free the figure."""
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path


def side_by_side(images: list[str | os.PathLike], titles: list[str], path: str | os.PathLike) -> Path:
    """Sample grids next to each other with their titles (base vs experts, same noise)."""
    from PIL import Image

    fig, axes = plt.subplots(1, len(images), figsize=(4.2 * len(images), 5.0), squeeze=False)
    for ax, img, title in zip(axes[0], images, titles, strict=True):
        ax.imshow(Image.open(img), cmap="gray")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    return save_figure(fig, path)
