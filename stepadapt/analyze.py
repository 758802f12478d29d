"""Base model -> Plan: the difficulty profiles and the grouping/allocation in one call."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel

from stepadapt import Notice, StepadaptError
from stepadapt.data import DEFAULT_HOLDOUT, HOLDOUT_HELP, fingerprint, held_out, load_dataset, proxy_sets
from stepadapt.devices import DEVICE_HELP, resolve_device
from stepadapt.difficulty import MEASURES, loss_profile, normalise, snr_profile
from stepadapt.gaussian import DEFAULT_TOLERANCE, GaussianDenoiser, affordable, fit_gaussian, gaussian_cutoff
from stepadapt.kinds import GAUSSIAN
from stepadapt.models import DEFAULT_BASE, load_base
from stepadapt.options import Options, option
from stepadapt.plan import GaussianChoice, Plan, make_plan, visited_timesteps
from stepadapt.plots import plot_plan
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
        chosen = GaussianChoice("given", gaussian_from)
        if gaussian_from is None:
            cut, errs = gaussian_cutoff(model, gaussian, scheduler_cfg, proxy, tolerance=tolerance, seed=seed)
            mse = {str(t): [round(b, 7), round(g, 7)] for t, (b, g) in sorted(errs.items())}
            chosen = GaussianChoice("auto", cut, tolerance=tolerance, tolerance_from=cut, eps_mse=mse)
            if budget is not None and cut < len(s):  # never so far down that the budget cannot be spent
                cut = _spendable_from(cut, budget, gaussian.macs / base_macs, sampler, steps, scheduler_cfg)
                chosen.start = cut
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


GAUSSIAN_CHOICES = "auto, off or a timestep"


@dataclass(frozen=True)
class AnalyzeOptions(Options):
    """``stepadapt analyze``: base -> plan.json (+ plot, + the Gaussian's fit beside it)."""

    out: Path = option(Path("plan.json"), "plan.json to write (a PNG plot lands beside it).", flag="--out")
    base: Path = option(DEFAULT_BASE, "Base model dir (diffusers UNet2DModel).")
    data: str = option("fashion-mnist", "Proxy data: 'fashion-mnist', an image folder or .npz.")
    measure: str = option(
        "snr",
        "What sizes the groups: snr or loss (a difficulty proxy), or damage (each of --sizes pruned, "
        "recovered briefly and swapped into the base's trajectory; a knapsack picks under --budget).",
    )
    sizes: tuple[float, ...] = option((0.25, 0.4, 0.55, 0.7), "damage: sizes to try per group (MACs / base).")
    recover_iterations: int = option(100, "damage: distilled fine-tuning iterations per tried size.")
    groups: int = option(
        4,
        "Number of timestep groups, the Gaussian's included; neighbouring groups that both get the "
        "whole base become one expert.",
    )
    partition: str = option("snr", "uniform (in t), snr (equal SNR-dB width) or mass.")
    boundaries: tuple[int, ...] | None = option(
        None, "Explicit boundaries, e.g. 0,250,500,1000 (overrides --groups)."
    )
    budget: float = option(0.5, "Target mean MACs per sampling step, as a fraction of the base.")
    tdc: bool = option(False, "Use the TDC rule (i/N + (N-i)/N*k) instead of --budget.", flags=("--tdc",))
    tdc_k: float = option(0.5, "k of the TDC rule.")
    sampler: str = option(
        "ddim",
        "Solver whose model evaluations define the mean (any of sample's --sampler, e.g. unipc; Heun's "
        "two evaluations per step count twice).",
    )
    steps: int = option(50, "Solver steps the mean is taken over.")
    proxy_size: int = option(128, "Images in the proxy batch for the loss profile.")
    gaussian: str = option(
        "auto",
        "The noisy end goes to a closed-form Gaussian denoiser (the training images' mean and "
        "covariance: 2 x pixels^2 MACs, 0.022 x the shipped base's) as the last of --groups, and what it "
        "saves of --budget to the U-Net groups: auto (from where its eps error on held-out images is "
        "within --gaussian-tolerance of the base's; later if the budget needs it; none for images "
        "where it would cost over 0.25 x the base), a timestep to start at, or off. With --boundaries, "
        "the groups above its start merge into it. Fitted once; prune uses the same fit.",
    )
    gaussian_tolerance: float = option(
        DEFAULT_TOLERANCE, "auto: the factor by which the Gaussian's eps error may exceed the base's."
    )
    seed: int = option(0, "Seed of the proxy batch and noise.")
    holdout: float = option(DEFAULT_HOLDOUT, HOLDOUT_HELP)
    device: str = option("auto", DEVICE_HELP + " The base's device.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.measure not in (*MEASURES, "damage"):
            raise StepadaptError(
                f"unknown measure {self.measure!r}; choose one of {', '.join((*MEASURES, 'damage'))}"
            )
        if self.gaussian not in ("auto", "off") and not self.gaussian.isdigit():
            raise StepadaptError(f"--gaussian must be {GAUSSIAN_CHOICES}, got {self.gaussian!r}")
        if self.measure == "damage" and self.tdc:
            raise StepadaptError("--measure damage sizes the groups under a --budget; the TDC rule has none")
        if self.proxy_size < 2:
            raise StepadaptError(f"--proxy-size must be at least 2, got {self.proxy_size}")

    @property
    def gaussian_start(self) -> int | None:
        """The start the user gave (None: auto or off)."""
        return int(self.gaussian) if self.gaussian.isdigit() else None

    @property
    def gaussian_path(self) -> Path:
        """Where the Gaussian's fit is kept: beside the plan, named after it."""
        return self.out.with_suffix(".gaussian.safetensors")


@dataclass
class Analysis:
    plan: Plan
    profiles: dict[str, np.ndarray]
    plot: Path
    note: str | None = None  # why there is no Gaussian expert, where that was asked for or possible


def fit_gaussian_for(
    choice: str,
    model: UNet2DModel,
    scheduler_cfg: dict,
    data: str,
    holdout: float = DEFAULT_HOLDOUT,
    train: torch.Tensor | None = None,
) -> tuple[GaussianDenoiser | None, str]:
    """The Gaussian fitted to ``data``'s training part, and the fingerprint of those images; or None
    and why not: ``off``, or ``auto`` where it cannot pay. A given start that cannot be honoured is an
    error. The one place a Gaussian expert is fitted (analyze; prune only for plans without a fit)."""
    if choice == "off":
        return None, "turned off"
    c, size = model.config.in_channels, model.config.sample_size
    why_not = affordable((c, size, size), count_macs(model)[0])
    if why_not is None:
        if train is None:  # loaded here only where the fit can pay (it may be a large dataset)
            train = load_dataset(data, "train", size, c, holdout=holdout)
        try:
            return fit_gaussian(train, scheduler_cfg), fingerprint(train)
        except StepadaptError as e:
            why_not = str(e)
    if choice != "auto":
        raise StepadaptError(f"Gaussian expert (--gaussian {choice}): {why_not}")
    return None, why_not


def save_gaussian(
    gaussian: GaussianDenoiser, choice: GaussianChoice, path: Path, data: str, data_sha256: str
) -> None:
    """Keep the fit beside the plan and name it in the plan's choice, so prune uses this very fit."""
    written = GAUSSIAN.write(path.parent, path.name.removesuffix(".safetensors"), gaussian)
    choice.data, choice.data_sha256 = data, data_sha256
    choice.weights, choice.weights_sha256 = path.name, written["sha256"]


def analyze(options: AnalyzeOptions, log: Callable[[str], None] | None = None) -> Analysis:
    """The analyze stage: difficulty per timestep -> groups and a MAC budget per group.

    The proxy (the loss profile, the Gaussian's cut-off) comes from the held-out part of the data,
    the Gaussian's fit and damage's recovery from its training part."""
    o = options
    dev = resolve_device(o.device)  # a bad --device is said before anything loads
    model, sched_cfg = load_base(o.base)
    model = model.to(dev)
    c, size = model.config.in_channels, model.config.sample_size
    if not held_out(o.data, o.holdout):
        msg = f"{o.data} has no held-out part: the loss profile and Gaussian cut-off see training images"
        warnings.warn(Notice(msg), stacklevel=2)
    proxy = load_dataset(o.data, "test", size, c, limit=o.proxy_size, seed=o.seed, holdout=o.holdout)
    damage = None
    if o.measure == "damage":
        proxy_train, proxy_val = proxy_sets(o.data, o.proxy_size, size, c, o.seed, o.holdout)
        damage = {
            "data": load_dataset(o.data, "train", size, c, seed=o.seed, holdout=o.holdout),
            "proxy_train": proxy_train,
            "proxy_val": proxy_val, "sizes": list(o.sizes), "recover_iterations": o.recover_iterations,
            "log": log,
        }  # fmt: skip
    gaussian, said = fit_gaussian_for(o.gaussian, model, sched_cfg, o.data, o.holdout)
    plan, profiles = analyze_base(
        model, sched_cfg, proxy, measure=o.measure, groups=o.groups, partition=o.partition,
        boundaries=list(o.boundaries) if o.boundaries else None, budget=None if o.tdc else o.budget,
        tdc_k=o.tdc_k, sampler=o.sampler, steps=o.steps, seed=o.seed, damage=damage, gaussian=gaussian,
        gaussian_from=o.gaussian_start, tolerance=o.gaussian_tolerance,
    )  # fmt: skip
    if plan.gaussian is not None and gaussian is not None and plan.fixed_ratios():
        save_gaussian(gaussian, plan.gaussian, o.gaussian_path, o.data, said)
    plan.save(o.out)
    note = said if gaussian is None else None
    return Analysis(plan, profiles, plot_plan(plan, profiles, o.out.with_suffix(".png")), note)
