"""Base + plan -> expert bundle: the candidate search for every U-Net group.

A ``gaussian`` or ``class-gaussian`` group gets the caller's fitted closed-form
denoiser (stepadapt.gaussian) and its fixed cost; the U-Net groups share the rest.
A class-conditional base is pruned on its conditional loss: the proxy images'
labels travel beside them (stepadapt.importance), and the bundle records the
base's class names.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from stepadapt import StepadaptError
from stepadapt.bundle import ExpertDraft, Manifest, provenance, save_bundle
from stepadapt.conditioning import Labels, conditioning_of
from stepadapt.data import DEFAULT_HOLDOUT, HOLDOUT_HELP
from stepadapt.devices import DEVICE_HELP
from stepadapt.importance import (
    DEFAULT_CANDIDATES,
    Candidate,
    Memory,
    search_group,
)
from stepadapt.io import sha256_file
from stepadapt.kinds import CLASS_GAUSSIAN, GAUSSIAN, BuildContext, Built, kind_of
from stepadapt.models import DEFAULT_BASE, clean_config, load_base, read_class_names, weights_sha256
from stepadapt.options import Options, option
from stepadapt.pipeline import Surround, surround_of
from stepadapt.plan import Plan, budget_ratios, uniform_plan
from stepadapt.prune import count_macs


def _draft(group: Any, built: Built, target_macs: float) -> ExpertDraft:
    return ExpertDraft(
        name=group.name, timesteps=(group.lo, group.hi), snr_db=group.snr_db, target_macs=int(target_macs),
        macs=built.macs, params=built.params, importance=built.importance, proxy_loss=built.proxy_loss,
        parent=built.parent, kind=group.kind,
    )  # fmt: skip


def _order(plan: Plan, nested: bool) -> list[int]:
    """Fixed-size kinds first (their sizes pin the budget), then the budget-sized groups: in plan
    order, or largest first when nested (stable: ties keep the plan's order)."""
    fixed = list(plan.fixed_ratios())
    sized = [i for i in range(len(plan.groups)) if i not in fixed]
    if nested:
        sized = sorted(sized, key=lambda i: -plan.groups[i].macs_ratio)
    return fixed + sized


def _target(plan: Plan, i: int, achieved: dict[int, float], base_macs: int) -> float:
    """Group ``i``'s MACs: the plan's, re-solved in budget mode after each group is built, so the
    widths one group could not reach (GroupNorm staircase) are paid back by the others."""
    ratios = [g.macs_ratio for g in plan.groups]
    if plan.allocation == "budget" and len(achieved) > len(plan.fixed_ratios()):
        ratios = budget_ratios(
            [x.difficulty for x in plan.groups], [x.visit_share for x in plan.groups], plan.budget,
            fixed=achieved, saturate=True, floor=plan.floor,  # no exact solution left: the nearest
        )  # fmt: skip
    return ratios[i] * base_macs


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
    gaussian: torch.nn.Module | None = None,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
    records: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    proxy_train_labels: Labels | None = None,
    proxy_val_labels: Labels | None = None,
    surround: Surround | None = None,
) -> Manifest:
    """Build every group's expert through its kind and write the bundle. ``gaussian``: the fitted
    closed-form denoiser for the plan's Gaussian groups; ``records``: manifest fields (``base``,
    ``data``, ``class_names``) saying what the bundle came from; ``options``: the stage's options,
    kept in the provenance so the bundle can be made again. ``proxy_train_labels`` and
    ``proxy_val_labels``: the proxy images' classes or captions, which a conditional base needs;
    ``surround``: a pipeline base's VAE and text parts, which the bundle copies."""
    base_macs, base_params = count_macs(base)
    ctx = BuildContext(
        base, scheduler_cfg, proxy_train, proxy_val, candidates=candidates, memory=memory, seed=seed,
        gaussian=gaussian, log=log, search=search_group, proxy_train_labels=proxy_train_labels,
        proxy_val_labels=proxy_val_labels,
    )  # fmt: skip
    achieved: dict[int, float] = {}
    models, drafts = {}, {}
    for i in _order(plan, nested):
        g, kind = plan.groups[i], kind_of(plan.groups[i].kind)
        target = _target(plan, i, achieved, base_macs) if kind.sized_by_budget else 0.0
        if log:
            size = (
                f"target {target / 1e6:.2f} MMACs ({target / base_macs:.3f} x base)" if target else kind.label
            )
            log(f"group {g.name} [{g.lo},{g.hi}): {size}")
        built = kind.build(g, target, ctx)
        achieved[i] = built.macs / base_macs
        models[g.name], drafts[i] = built.stored, _draft(g, built, target or built.macs)
        if nested and kind.sized_by_budget:
            model, history = built.stored
            ctx.parent = (model, history, g.name if history else None)
    _note_drift(plan, [achieved[i] for i in range(len(plan.groups))], log)
    manifest = Manifest(
        base_config=clean_config(base),
        scheduler=dict(scheduler_cfg),
        sample_shape=(base.config.in_channels, base.config.sample_size, base.config.sample_size),
        base_macs=base_macs,
        base_params=base_params,
        experts=[],
        plan=plan.to_dict(),
        provenance=provenance(
            command,
            seed=seed,
            nested=nested,
            candidates=[c.label for c in candidates],
            **({"options": options} if options else {}),
        ),  # fmt: skip
        **(records or {}),
    )
    return save_bundle(
        out, manifest, [drafts[i] for i in range(len(plan.groups))], models,
        surround=surround.root if surround is not None else None,
    )  # fmt: skip


def _note_drift(plan: Plan, achieved: list[float], log: Callable[[str], None] | None) -> None:
    mean = plan.mean_ratio(achieved)
    if log and plan.budget is not None and abs(mean - plan.budget) > 0.02 * plan.budget:
        # Only budget allocation re-solves later groups; damage sizes and nested parents can drift.
        log(
            f"note: trajectory mean {mean:.3f} x base MACs, budget {plan.budget:.3f}: the widths the groups "
            "could reach (GroupNorm steps) left the others no exact way to pay it back"
        )


@dataclass(frozen=True)
class PruneOptions(Options):
    """``stepadapt prune``: base + plan -> bundle."""

    out: Path = option(Path("bundle"), "Bundle directory to write.", flag="--out")
    plan: Path = option(Path("plan.json"), "plan.json from 'stepadapt analyze'.", flag="--plan")
    base: Path = option(DEFAULT_BASE, "Base model dir (diffusers UNet2DModel).")
    data: str = option(
        "fashion-mnist",
        "Proxy data for importance and candidate scoring (its training part); the plan's Gaussian "
        "expert was fitted to the same data.",
    )
    proxy_size: int = option(128, "Images per proxy set (importance / held-out).")
    candidates: tuple[str, ...] = option(
        tuple(c.label for c in DEFAULT_CANDIDATES), "Candidate structures: importance/scope, comma-separated."
    )
    uniform: bool = option(
        False, "One expert for all t at the plan's mean MACs (the baseline).", flags=("--uniform",)
    )
    memory: Path | None = option(None, "Memory bank of tried candidates (default: OUT.memory.json).")
    nested: bool = option(
        False,
        "Independent (default): each expert is pruned from the base for its own timesteps. Nested: each "
        "is cut from the next larger one, so their channels nest and they share weights coherently "
        "under 'finetune --mode shared'.",
        flags=("--nested/--independent",),
    )
    seed: int = option(0, "Seed of proxy sets and random importance.")
    holdout: float = option(DEFAULT_HOLDOUT, HOLDOUT_HELP)
    device: str = option("auto", DEVICE_HELP + " Where candidates are scored.")

    def __post_init__(self) -> None:
        super().__post_init__()
        for label in self.candidates:
            Candidate.parse(label)  # an unknown importance or scope is said before anything loads
        if self.proxy_size < 2:
            raise StepadaptError(f"--proxy-size must be at least 2, got {self.proxy_size}")

    @property
    def memory_path(self) -> Path:
        return self.memory or self.out.with_name(self.out.name + ".memory.json")


def plan_gaussian(
    plan: Plan,
    plan_path: Path,
    base: UNet2DModel,
    scheduler_cfg: dict,
    data: str,
    train: torch.Tensor,
    data_sha256: str,
    labels: torch.Tensor | None = None,
) -> torch.nn.Module | None:
    """The Gaussian expert of ``plan``: the fit analyze kept beside it (checksummed), or for a plan
    without one, fitted here, once, to ``train`` (``data``'s training part, with its ``labels`` for
    a class-conditional base; ``data_sha256`` their fingerprint), which must be the data the plan
    chose it on. Its kind and classes must be what ``base`` takes."""
    from stepadapt.analyze import fit_gaussian_for

    fixed = plan.fixed_ratios()
    if not fixed:
        return None
    kind = kind_of(plan.groups[next(iter(fixed))].kind)
    choice = plan.gaussian
    _check_gaussian_fits_base(kind.name, choice.classes if choice is not None else None, base)
    chosen_on = choice.data if choice is not None and choice.data else data
    if chosen_on != data or (choice is not None and choice.data_sha256 not in ("", data_sha256)):
        raise StepadaptError(
            f"the plan's Gaussian expert was fitted to --data {chosen_on} (training part sha256 "
            f"{(choice.data_sha256 if choice else '')[:16]}...); prune with the same data and --holdout"
        )
    if choice is not None and choice.weights:
        path = plan_path.parent / choice.weights
        if not path.is_file() or sha256_file(path) != choice.weights_sha256:
            raise StepadaptError(
                f"the plan's Gaussian fit {path} is missing or was changed: run analyze again"
            )
        c, s = base.config.in_channels, base.config.sample_size
        return kind.from_tensors(load_file(str(path)), (c, s, s), scheduler_cfg, conditioning_of(base.config))
    # a plan without a kept fit: the form it names (plans before ranks existed: the full covariance)
    rank = (
        str(choice.rank) if choice is not None and choice.rank else ("full" if kind is GAUSSIAN else "auto")
    )
    fit = fit_gaussian_for("in the plan", base, scheduler_cfg, data, train=train, rank=rank, labels=labels)
    return fit.gaussian


def _check_gaussian_fits_base(kind: str, classes: int | None, base: UNet2DModel) -> None:
    """One line where a plan's Gaussian cannot stand in for ``base``: another kind than its
    conditioning calls for, or a class Gaussian of another class count."""
    cond = conditioning_of(base.config)
    want = CLASS_GAUSSIAN.name if cond.classes else GAUSSIAN.name
    if cond.text_dim:
        raise StepadaptError(
            "the plan has a Gaussian expert, but the base is text-conditional: analyze it again"
        )
    if kind != want:
        raise StepadaptError(
            f"the plan's Gaussian expert is a {kind} one, but the base ({cond.describe()}) needs a {want} "
            "one: analyze this base"
        )
    if cond.classes and classes is not None and classes != cond.classes:
        raise StepadaptError(
            f"the plan's Gaussian knows {classes} classes, the base {cond.classes}: analyze this base"
        )


def prune(
    options: PruneOptions, log: Callable[[str], None] | None = None, command: str | None = None
) -> Manifest:
    """The prune stage: one expert per plan group, each built by its kind (a U-Net group by
    candidate search on proxy loss, a Gaussian group from the plan's fit); the bundle records the
    base's weights digest, the data's fingerprint and a class-conditional base's class names."""
    from stepadapt.data import fingerprint
    from stepadapt.devices import resolve_device
    from stepadapt.space import DataSpace

    o = options
    dev = resolve_device(o.device)  # a bad --device is said before anything loads
    model, sched_cfg = load_base(o.base)
    model = model.to(dev)
    plan = Plan.load(o.plan)
    if o.uniform:
        plan = uniform_plan(plan, sched_cfg)
    classes = conditioning_of(model.config).classes
    surround = surround_of(o.base)
    space = DataSpace.of(dict(model.config), surround)
    records: dict[str, Any] = {"base": {"path": str(o.base.resolve()), "sha256": weights_sha256(model)}}
    # labelled: the conditional loss scores and judges, and the fit saw the labels too
    images, labels = space.rows(o.data, "train", holdout=o.holdout)
    data_sha256 = fingerprint(images, labels)
    (train, train_y), (val, val_y) = space.proxy_sets(o.data, o.proxy_size, o.seed, o.holdout)
    proxy_labels = {"proxy_train_labels": train_y, "proxy_val_labels": val_y} if train_y is not None else {}
    if classes:
        records["class_names"] = list(read_class_names(o.base, classes))
    gaussian = plan_gaussian(plan, o.plan, model, sched_cfg, o.data, images, data_sha256, labels)
    records["data"] = {"source": o.data, "holdout": o.holdout, "sha256": data_sha256}
    return compress(
        model, sched_cfg, plan, train, val, o.out, candidates=tuple(map(Candidate.parse, o.candidates)),
        memory=Memory(o.memory_path), seed=o.seed, nested=o.nested, gaussian=gaussian, log=log,
        command=command, records=records, options={"prune": o.to_dict()}, surround=surround, **proxy_labels,
    )  # fmt: skip
