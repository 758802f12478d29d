"""Base model -> Plan: the difficulty profiles and the grouping/allocation in one call.

Which Gaussian expert takes the noisy end follows the base's conditioning: an unconditional base
gets the training images' Gaussian, low-rank where that measures as good as the full covariance; a
class-conditional one a low-rank Gaussian per class (and one pooled for the null class), fitted to
the labelled training split and judged with the labels on the held-out one; a text-conditional
base none (free text has no closed-form posterior mean), and the plan says so."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DModel

from stepadapt import Notice, StepadaptError
from stepadapt.conditioning import Cond, Conditioning, Labels, conditioning_of, rows_cond
from stepadapt.data import (
    DEFAULT_HOLDOUT,
    HOLDOUT_HELP,
    fingerprint,
    held_out,
)
from stepadapt.devices import DEVICE_HELP, resolve_device
from stepadapt.difficulty import MEASURES, loss_profile, normalise, snr_profile
from stepadapt.gaussian import (
    DEFAULT_EXPLAINED,
    DEFAULT_TOLERANCE,
    LOW_RANK_TOLERANCE,
    ClassGaussianDenoiser,
    GaussianDenoiser,
    affordable,
    eps_errors,
    fit_class_gaussian,
    fit_gaussian,
    fit_low_rank,
    gaussian_cutoff,
    low_rank_affordable,
    low_rank_of,
    max_rank,
)
from stepadapt.kinds import GAUSSIAN, kind_of_model
from stepadapt.models import DEFAULT_BASE, load_base
from stepadapt.options import Options, option
from stepadapt.pipeline import surround_of
from stepadapt.plan import MIN_RATIO, TEXT_FLOOR, GaussianChoice, Plan, make_plan, visited_timesteps
from stepadapt.plots import plot_plan
from stepadapt.prune import count_macs
from stepadapt.space import DataSpace


@dataclass
class GaussianFit:
    """A fitted Gaussian expert and what the plan records of it, or why there is none.

    ``full``: on unconditional data where the full covariance is affordable too, the full form the
    low-rank ``gaussian`` is measured against (at the cut-off) before the plan takes either."""

    gaussian: torch.nn.Module | None
    data_sha256: str = ""
    why: str = ""  # how its form and rank were chosen; or why there is none
    full: GaussianDenoiser | None = None

    def choice_fields(self, gaussian: torch.nn.Module | None = None) -> dict[str, Any]:
        """The plan's record of ``gaussian`` (this fit's by default): kind, rank, classes, variance kept."""
        g = gaussian if gaussian is not None else self.gaussian
        low = isinstance(g, ClassGaussianDenoiser) or g.low_rank
        return {
            "kind": kind_of_model(g).name, "rank": g.rank if low else None,
            "classes": getattr(g, "classes", 0), "explained": round(g.explained, 5) if low else None,
            "why": self.why,
        }  # fmt: skip


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
    gaussian: torch.nn.Module | GaussianFit | None = None,
    gaussian_from: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    labels: torch.Tensor | None = None,
    floor: float = MIN_RATIO,
) -> tuple[Plan, dict[str, np.ndarray]]:
    """Returns the plan and every normalised profile (all are plotted, ``measure`` decides).

    ``gaussian``: a fitted closed-form denoiser (or a :class:`GaussianFit`) takes the noisy end
    [t*, T), from ``gaussian_from`` or, when that is None, from the t* where its eps error on the
    proxy comes within ``tolerance`` x the base's (:func:`stepadapt.gaussian.gaussian_cutoff`).
    ``labels``: the proxy images' classes, for a class-conditional base (its loss profile and the
    Gaussian's cut-off are the conditional ones).

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
            gaussian_from=gaussian_from, tolerance=tolerance, labels=labels, **(damage or {}),
        )  # fmt: skip
    if measure not in MEASURES:
        choices = ", ".join((*MEASURES, "damage"))
        raise StepadaptError(f"unknown measure {measure!r}; choose one of {choices}")
    fit = gaussian if isinstance(gaussian, GaussianFit) else GaussianFit(gaussian)
    s = snr_profile(scheduler_cfg)
    base_macs = count_macs(model)[0]
    chosen, placed = None, None
    if fit.gaussian is not None and (gaussian_from is not None or boundaries is not None or groups >= 2):
        # (auto with a single group leaves no room for a second kind of expert)
        chosen, gaussian_from, placed = _place_gaussian(
            model, scheduler_cfg, proxy, fit, gaussian_from=gaussian_from, budget=budget, base_macs=base_macs,
            tolerance=tolerance, sampler=sampler, steps=steps, seed=seed, labels=labels,
        )  # fmt: skip
    cond = _proxy_cond(conditioning_of(model.config), labels, len(proxy))
    profiles = {
        "snr": normalise(s),
        "loss": normalise(loss_profile(model, scheduler_cfg, proxy, seed=seed, cond=cond)),
    }
    plan = make_plan(
        profiles[measure], s, base_macs, groups=groups, partition_kind=partition, boundaries=boundaries,
        budget=budget, tdc_k=tdc_k, sampler=sampler, steps=steps, measure=measure,
        scheduler_cfg=scheduler_cfg, gaussian_from=gaussian_from, floor=floor,
        gaussian_macs=placed.macs if placed is not None else 0,
        gaussian_kind=kind_of_model(placed).name if placed is not None else GAUSSIAN.name,
    )  # fmt: skip
    plan.gaussian = chosen
    return plan, profiles


def _proxy_cond(cond: Conditioning, labels: Labels | None, n: int) -> Cond | None:
    """The proxy images' condition: their labels or captions (a conditional base must have them; a
    bare text U-Net's rows carry the empty text), so its loss profile is the conditional one."""
    if labels is None and not cond.unconditional:
        raise StepadaptError(f"this base is conditioned on {cond.describe()}: analyze needs them")
    if labels is not None and cond.unconditional:
        raise StepadaptError("labels given, but this base is unconditional")
    return rows_cond(labels) if labels is not None else None


def _place_gaussian(
    model: UNet2DModel, scheduler_cfg: dict, proxy: torch.Tensor, fit: GaussianFit, *,
    gaussian_from: int | None, budget: float | None, base_macs: int, tolerance: float, sampler: str,
    steps: int, seed: int, labels: torch.Tensor | None,
) -> tuple[GaussianChoice, int | None, torch.nn.Module]:  # fmt: skip
    """Where the Gaussian starts and which form takes it: the cut-off (auto) is judged on the
    held-out proxy; where a full form is there to compare with, the low-rank one is kept if its eps
    error at that timestep is within LOW_RANK_TOLERANCE of the full one's, else the full one is."""
    T = int(scheduler_cfg["num_train_timesteps"])
    gaussian, why, compared = fit.gaussian, fit.why, {}
    if gaussian_from is not None:
        if fit.full is not None:
            gaussian, why, compared = _choose_form(fit, scheduler_cfg, proxy, gaussian_from, seed)
        fields = {**fit.choice_fields(gaussian), "why": why, "compared": compared}
        return GaussianChoice("given", gaussian_from, **fields), gaussian_from, gaussian

    def judge(g: torch.nn.Module) -> tuple[int, dict]:
        return gaussian_cutoff(model, g, scheduler_cfg, proxy, tolerance=tolerance, seed=seed, labels=labels)

    cut, errs = judge(gaussian)
    if fit.full is not None:
        gaussian, why, compared = _choose_form(fit, scheduler_cfg, proxy, cut if cut < T else min(errs), seed)
        if gaussian is fit.full:
            cut, errs = judge(gaussian)
    mse = {str(t): [round(b, 7), round(g, 7)] for t, (b, g) in sorted(errs.items())}
    fields = {**fit.choice_fields(gaussian), "why": why, "compared": compared}
    chosen = GaussianChoice("auto", cut, tolerance=tolerance, tolerance_from=cut, eps_mse=mse, **fields)
    if budget is not None and cut < T:  # never so far down that the budget cannot be spent
        cut = _spendable_from(cut, budget, gaussian.macs / base_macs, sampler, steps, scheduler_cfg)
        chosen.start = cut
    return chosen, (cut if cut < T else None), gaussian


def _choose_form(
    fit: GaussianFit, scheduler_cfg: dict, proxy: torch.Tensor, t: int, seed: int
) -> tuple[GaussianDenoiser, str, dict[str, float]]:
    """The low-rank form where its eps error at ``t`` (held-out, same images and noise) is within
    LOW_RANK_TOLERANCE of the full form's; else the full form. The plan keeps both errors."""
    low, full = fit.gaussian, fit.full
    errs = eps_errors({"full": full, "low_rank": low}, scheduler_cfg, proxy, t, seed=seed)
    ratio = errs["low_rank"] / max(errs["full"], 1e-30)
    compared = {"t": int(t), "full": round(errs["full"], 7), "low_rank": round(errs["low_rank"], 7)}
    at = f"its eps error at t = {t} on held-out images is {ratio:.4f} x the full covariance's"
    if ratio <= LOW_RANK_TOLERANCE:
        return (
            low,
            f"{fit.why}; {at} (within {LOW_RANK_TOLERANCE}) at {low.macs / full.macs:.3f} x its MACs",
            compared,
        )
    return (
        full,
        f"full covariance: the rank-{low.rank} form was tried, and {at} (over {LOW_RANK_TOLERANCE})",
        compared,
    )


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
    gaussian: torch.nn.Module | GaussianFit | None, gaussian_from: int | None, tolerance: float,
    labels: torch.Tensor | None = None, **options,
) -> tuple[Plan, dict[str, np.ndarray]]:  # fmt: skip
    """``options``: measure_damage's (for a class-conditional base, ``data_labels`` and
    ``train_labels``/``val_labels`` of the proxy sets among them); ``labels``: the proxy's."""
    from stepadapt.allocate import Option, choose, measure_damage

    plan, profiles = analyze_base(
        model, scheduler_cfg, proxy, measure="snr", groups=groups, partition=partition,
        boundaries=boundaries, budget=budget, sampler=sampler, steps=steps, seed=seed,
        gaussian=gaussian, gaussian_from=gaussian_from, tolerance=tolerance, labels=labels,
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
    data: str = option(
        "fashion-mnist",
        "Proxy data: 'fashion-mnist', an image folder or .npz (labelled, for a class-conditional base).",
    )
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
    floor: float | None = option(
        None,
        f"--budget: the smallest MACs share (of the base) any U-Net group gets (default: {TEXT_FLOOR} for "
        "a text-conditioned base, which decides what to draw at the noisy end SNR ranks easiest; else "
        f"{MIN_RATIO}).",
    )
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
        "covariance, per class for a class-conditional base; see --gaussian-rank) as the last of "
        "--groups, and what it saves of --budget to the U-Net groups: auto (from where its eps error on "
        "held-out images is within --gaussian-tolerance of the base's; later if the budget needs it; "
        "none where it would cost over 0.25 x the base, nor for a text-conditional base), a timestep to "
        "start at, or off. With --boundaries, the groups above its start merge into it. Fitted once; "
        "prune uses the same fit.",
    )
    gaussian_tolerance: float = option(
        DEFAULT_TOLERANCE, "auto: the factor by which the Gaussian's eps error may exceed the base's."
    )
    gaussian_rank: str = option(
        "auto",
        "The Gaussian's covariance: auto (the top directions that keep 90% of the training variance "
        "plus one variance for the rest: 2 x pixels x rank MACs, and it needs only more images than its "
        "rank; on unconditional data the full covariance instead where that measures better at the "
        "cut-off), full (all pixels^2 entries; unconditional bases only), or a rank. A class-conditional "
        "base gets one Gaussian per class (and one of all images for the null class) of that rank.",
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
        rank = self.gaussian_rank
        if rank not in ("auto", "full") and not (rank.isdigit() and int(rank) >= 1):
            raise StepadaptError(f"--gaussian-rank must be auto, full or a rank >= 1, got {rank!r}")
        if self.tdc and self.floor is not None:
            raise StepadaptError("--floor bounds what --budget gives each group; the TDC rule has no budget")
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
    *,
    rank: str = "auto",
    labels: torch.Tensor | None = None,
    space: DataSpace | None = None,
) -> GaussianFit:
    """The Gaussian expert fitted to ``data``'s training part (with its labels, for a
    class-conditional base) and the fingerprint of what it saw; or none and why not: ``off``, a
    text-conditional base, or ``auto`` where none pays. A given start that cannot be honoured is an
    error. The one place a Gaussian expert is fitted (analyze; prune only for plans without a fit).

    ``rank`` (--gaussian-rank): ``auto`` (the rank that keeps DEFAULT_EXPLAINED of the variance; on
    unconditional data where the full covariance is affordable too, both are fitted and the plan
    takes the one that measures better at the cut-off), ``full``, or a number. The low-rank form is
    afforded by its MACs (at most MAX_RATIO x the base's) and images (two per Gaussian and more than
    its rank), so large images and small datasets get one; the full form needs D images and 2 D^2 MACs.
    """
    if choice == "off":
        return GaussianFit(None, why="turned off")
    cond = conditioning_of(model.config)
    if cond.text_dim:
        why = (
            "the base is text-conditional: free text has no closed-form posterior mean (a Gaussian per "
            "prompt cannot be fitted), so the noisy end stays with U-Net experts"
        )
        return _none(choice, why)
    c, size = model.config.in_channels, model.config.sample_size
    shape, base_macs = (c, size, size), count_macs(model)[0]
    why_not = (
        low_rank_affordable(shape, base_macs, images=2) if rank != "full" else affordable(shape, base_macs)
    )
    if why_not is None:
        if train is None:  # loaded here only where a fit can pay (it may be a large dataset)
            train, labels = (space or DataSpace.of(dict(model.config))).rows(data, "train", holdout=holdout)
        try:
            fit = _fit(train, labels, cond, scheduler_cfg, rank, shape, base_macs)
            fit.data_sha256 = fingerprint(train, labels) if cond.classes else fingerprint(train)
            return fit
        except StepadaptError as e:
            why_not = str(e)
    if rank != "auto":  # a form or rank the user gave that cannot be had is said, not skipped
        raise StepadaptError(f"Gaussian expert (--gaussian-rank {rank}): {why_not}")
    return _none(choice, why_not)


def _none(choice: str, why: str) -> GaussianFit:
    if choice != "auto":
        raise StepadaptError(f"Gaussian expert (--gaussian {choice}): {why}")
    return GaussianFit(None, why=why)


def _fit(
    train: torch.Tensor, labels: torch.Tensor | None, cond: Conditioning, scheduler_cfg: dict, rank: str,
    shape: tuple[int, int, int], base_macs: int,
) -> GaussianFit:  # fmt: skip
    given = int(rank) if rank.isdigit() else None
    cap = max_rank(shape, base_macs)
    how = f"rank {rank} as given" if given else f"the rank that keeps {DEFAULT_EXPLAINED:.0%} of the variance"
    if cond.classes:
        if rank == "full":
            raise StepadaptError(
                "a class-conditional base's Gaussians are low-rank (one basis per class): give a rank or auto"
            )
        g = fit_class_gaussian(train, labels, cond.classes, scheduler_cfg, rank=given, rank_cap=cap)
        return GaussianFit(g, why=f"one Gaussian per class and one pooled for the null class; {how}")
    full_why = affordable(shape, base_macs, images=len(train))
    if rank == "full":
        if full_why is not None:
            raise StepadaptError(full_why)
        return GaussianFit(fit_gaussian(train, scheduler_cfg), why="the full covariance, as given")
    if rank == "auto" and full_why is None:  # both: the cut-off decides (analyze_base)
        full = fit_gaussian(train, scheduler_cfg)
        return GaussianFit(low_rank_of(full, rank_cap=cap), why=how, full=full)
    g = fit_low_rank(train, scheduler_cfg, rank=given, rank_cap=cap)
    return GaussianFit(g, why=how + (f" (no full covariance: {full_why})" if full_why and not given else ""))


def save_gaussian(
    gaussian: torch.nn.Module, choice: GaussianChoice, path: Path, data: str, data_sha256: str
) -> None:
    """Keep the fit beside the plan and name it in the plan's choice, so prune uses this very fit."""
    written = kind_of_model(gaussian).write(path.parent, path.name.removesuffix(".safetensors"), gaussian)
    choice.data, choice.data_sha256 = data, data_sha256
    choice.weights, choice.weights_sha256 = path.name, written["sha256"]


def _proxies(o: AnalyzeOptions, space: DataSpace, log: Callable | None) -> tuple:
    """The held-out proxy (and its labels), and damage's training data and proxy sets (and theirs)."""
    proxy, labels = space.rows(o.data, "test", o.proxy_size, o.seed, o.holdout)
    if o.measure != "damage":
        return proxy, labels, None
    damage: dict[str, Any] = {"sizes": list(o.sizes), "recover_iterations": o.recover_iterations, "log": log}
    (pt, pt_y), (pv, pv_y) = space.proxy_sets(o.data, o.proxy_size, o.seed, o.holdout)
    data, data_y = space.rows(o.data, "train", seed=o.seed, holdout=o.holdout)
    if data_y is not None:
        damage.update(data_labels=data_y, train_labels=pt_y, val_labels=pv_y)
    damage.update(data=data, proxy_train=pt, proxy_val=pv)
    return proxy, labels, damage


def default_floor(floor: float | None, conditioning: Conditioning, budget: float | None) -> float:
    """The floor asked for, else a text base's (measured on fashion-tiny-t2i: with the noisy-end expert
    at 0.4 x instead of SNR's 0.2 x, KID 0.0154 against 0.0203 at less fine-tuning; docs/results.md),
    never above the budget; else none to speak of (also under the TDC rule, ``budget`` None)."""
    if floor is not None:
        return floor
    return min(TEXT_FLOOR, budget) if conditioning.text_dim and budget is not None else MIN_RATIO


def analyze(options: AnalyzeOptions, log: Callable[[str], None] | None = None) -> Analysis:
    """The analyze stage: difficulty per timestep -> groups and a MAC budget per group.

    The proxy (the loss profile, the Gaussian's cut-off) comes from the held-out part of the data,
    the Gaussian's fit and damage's recovery from its training part; for a class-conditional base
    with their labels."""
    o = options
    dev = resolve_device(o.device)  # a bad --device is said before anything loads
    model, sched_cfg = load_base(o.base)
    model = model.to(dev)
    space = DataSpace.of(dict(model.config), surround_of(o.base))
    if not held_out(o.data, o.holdout):
        msg = f"{o.data} has no held-out part: the loss profile and Gaussian cut-off see training images"
        warnings.warn(Notice(msg), stacklevel=2)
    proxy, labels, damage = _proxies(o, space, log)
    fit = fit_gaussian_for(o.gaussian, model, sched_cfg, o.data, o.holdout, rank=o.gaussian_rank, space=space)
    plan, profiles = analyze_base(
        model, sched_cfg, proxy, measure=o.measure, groups=o.groups, partition=o.partition,
        boundaries=list(o.boundaries) if o.boundaries else None, budget=None if o.tdc else o.budget,
        tdc_k=o.tdc_k, sampler=o.sampler, steps=o.steps, seed=o.seed, damage=damage, gaussian=fit,
        gaussian_from=o.gaussian_start, tolerance=o.gaussian_tolerance, labels=labels,
        floor=default_floor(o.floor, space.conditioning, None if o.tdc else o.budget),
    )  # fmt: skip
    if fit.gaussian is None and o.gaussian != "off":  # the plan says why there is none
        plan.gaussian = GaussianChoice("none", None, why=fit.why)
    if plan.gaussian is not None and fit.gaussian is not None and plan.fixed_ratios():
        kept = fit.full if fit.full is not None and plan.gaussian.rank is None else fit.gaussian
        save_gaussian(kept, plan.gaussian, o.gaussian_path, o.data, fit.data_sha256)
    plan.save(o.out)
    note = fit.why if fit.gaussian is None else None
    return Analysis(plan, profiles, plot_plan(plan, profiles, o.out.with_suffix(".png")), note)
