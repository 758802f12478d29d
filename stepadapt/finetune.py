"""Fine-tune a bundle's experts: each alone on its own interval, or together on shared weights.

``separate`` (the default) trains each expert alone on its own interval with
its share of the iterations (split by interval length). ``shared`` trains all
pruned experts at once as slices of one full-width network (stepadapt.shared):
every update reaches every expert at its own timesteps; on the shipped 0.69 M
base it measured worse than ``separate`` at the same fine-tuning images (the
experts interfere in a network with little to spare; docs/results.md).
``specialize`` hands that fraction of the iterations to a separate phase after
the shared one. An expert the base meets the budget of
(empty pruning history) *is* the base: it is never trained and keeps the base's
weights.

Each phase trains in ``BUNDLE/finetune/<shared|name>/`` with its own resumable
checkpoint; when it finishes, the EMA weights replace the pruned ones in the
bundle (atomically) and the experts' ONNX/TensorRT exports are dropped from the
manifest, since they no longer match the weights.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from stepadapt import Notice, StepadaptError
from stepadapt import distributed as dist
from stepadapt.bundle import Bundle, ExpertSpec
from stepadapt.conditioning import DEFAULT_LABEL_DROPOUT, Labels
from stepadapt.data import DEFAULT_HOLDOUT, HOLDOUT_HELP
from stepadapt.devices import DEVICE_HELP, PRECISION_HELP
from stepadapt.kinds import kind_of
from stepadapt.options import Options, option
from stepadapt.shared import SharedExperts
from stepadapt.train import (
    CHECKPOINT_NAME,
    DEFAULT_DISTILL,
    TrainConfig,
    TrainResult,
    loss_weight_class,
    train,
)

MODES = ("shared", "separate")
DEFAULT_MODE = "separate"
SHARED_RUN = "shared"
DEFAULT_BATCH = 64
DEFAULT_LR = 5e-4


def finetune_config(iterations: int, **options: Any) -> TrainConfig:
    """The recovery recipe's defaults (FinetuneOptions.train_config starts from them)."""
    defaults = {
        "batch_size": DEFAULT_BATCH, "lr": DEFAULT_LR, "warmup": min(100, iterations // 10),
        "distill": DEFAULT_DISTILL, "checkpoint_every": 250, "sample_every": 10**9,
    }  # fmt: skip
    return TrainConfig(**{**defaults, **options})


def iteration_budgets(experts: list[ExpertSpec], total: int) -> dict[str, int]:
    """Split ``total`` iterations over experts in proportion to their interval lengths."""
    if total < len(experts):
        raise StepadaptError(f"{total} iterations cannot cover {len(experts)} experts")
    span = sum(e.hi - e.lo for e in experts)
    return {e.name: max(1, round(total * (e.hi - e.lo) / span)) for e in experts}


def phase_iterations(mode: str, total: int, specialize: float) -> tuple[int, int]:
    """(shared, separate) iterations of a fine-tune of ``total``."""
    if mode not in MODES:
        raise StepadaptError(f"unknown fine-tuning mode {mode!r}; choose one of {', '.join(MODES)}")
    if not 0.0 <= specialize <= 1.0:
        raise StepadaptError(f"specialize must be a fraction in [0, 1], got {specialize}")
    if mode == "separate":
        return 0, total
    separate = round(total * specialize)
    return total - separate, separate


def _run(bundle: Bundle, name: str) -> tuple:
    d = bundle.path / "finetune" / name
    return d, (d / CHECKPOINT_NAME).is_file()


def unet_experts(bundle: Bundle) -> list:
    """The U-Net experts (in timestep order): what shared weights can hold. They must tile one interval."""
    unets = [e for e in bundle.experts if kind_of(e.kind).has_structure]
    if not unets or any(a.hi != b.lo for a, b in zip(unets, unets[1:], strict=False)):
        raise StepadaptError("shared fine-tuning needs the U-Net experts to tile one interval of timesteps")
    return unets


def shared_experts(bundle: Bundle, base: UNet2DModel, check: bool = True) -> SharedExperts:
    """The bundle's experts as slices of a copy of ``base``; ``check``: they must be slices of it now."""
    unets = unet_experts(bundle)
    shared = SharedExperts(
        copy.deepcopy(base), [e.lo for e in unets] + [unets[-1].hi], [bundle.structure(e.name) for e in unets]
    )
    if check:
        for i, e in enumerate(unets):
            own = bundle.load_expert(e.name).state_dict()
            cut = shared.export(i).state_dict()
            if any(not torch.allclose(own[k], cut[k], atol=1e-6) for k in own):
                raise StepadaptError(
                    f"expert {e.name}'s weights are not a slice of the given base (fine-tuned already, or "
                    "another base): shared fine-tuning starts from the base the bundle was pruned from; "
                    "prune again or use --mode separate"
                )
    return shared


def finetune_bundle(
    bundle: Bundle,
    data: torch.Tensor,
    template: TrainConfig,
    total_iterations: int,
    *,
    mode: str = DEFAULT_MODE,
    specialize: float = 0.0,
    experts: list[str] | None = None,
    teacher: UNet2DModel | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    device: str = "cpu",
    labels: torch.Tensor | None = None,
) -> dict[str, TrainResult]:
    """Fine-tune the pruned experts (``teacher``: the base, for distillation and as the shared start;
    ``labels``: the images' classes for a class-conditional bundle, the teacher seeing the same)."""
    n_shared, n_separate = phase_iterations(mode, total_iterations, specialize)
    pruned = [e for e in bundle.experts if bundle.is_pruned(e.name)]
    say = log if log and dist.is_main() else (lambda _: None)
    for e in bundle.experts:
        if e not in pruned:
            say(f"expert {e.name} [{e.lo},{e.hi}) is {bundle.describe(e.name)}: kept as it is")
    if not pruned:
        return {}
    results: dict[str, TrainResult] = {}
    if n_shared > 0:
        if experts:
            raise StepadaptError("--expert picks experts for --mode separate; shared training trains all")
        if teacher is None:
            raise StepadaptError("shared fine-tuning needs the base the bundle was pruned from (--teacher)")
        spans = sorted((e.lo, e.hi) for e in pruned)
        if any(a[1] != b[0] for a, b in zip(spans, spans[1:], strict=False)):
            raise StepadaptError(
                "shared fine-tuning trains one interval, but an unpruned expert sits between pruned ones "
                f"({', '.join(f'[{lo},{hi})' for lo, hi in spans)}): use --mode separate"
            )
        run_dir, started = _run(bundle, SHARED_RUN)
        shared = shared_experts(bundle, teacher, check=not (resume and started))
        cfg = TrainConfig.from_dict(
            {**template.to_dict(), "iterations": n_shared,
             "t_lo": min(e.lo for e in pruned), "t_hi": max(e.hi for e in pruned)}
        )  # fmt: skip
        say(f"shared: {len(pruned)} experts on one set of weights, t in [{cfg.t_lo},{cfg.t_hi}), "
            f"{n_shared} iterations")  # fmt: skip
        ema, res = train(
            shared, data, bundle.manifest.scheduler, cfg, run_dir, resume=resume and started,
            progress=progress, device=device, teacher=teacher, labels=labels,
        )  # fmt: skip
        if dist.is_main():
            for i, e in enumerate(unet_experts(bundle)):
                if e in pruned:
                    bundle.update_expert_weights(
                        e.name, ema.export(i), onnx=None, trt=None,
                        training=_record(cfg, res, teacher, mode="shared"),
                    )  # fmt: skip
        dist.barrier()
        results[SHARED_RUN] = res
    if n_separate == 0:
        return results
    chosen = [bundle.expert(n) for n in experts] if experts else pruned
    budgets = iteration_budgets(pruned, n_separate)
    for e in chosen:
        if e not in pruned:
            say(f"expert {e.name} is {bundle.describe(e.name)}: nothing to fine-tune")
            continue
        cfg = TrainConfig.from_dict(
            {**template.to_dict(), "iterations": budgets[e.name], "t_lo": e.lo, "t_hi": e.hi,
             "seed": template.seed + bundle.experts.index(e)}
        )  # fmt: skip
        run_dir, started = _run(bundle, e.name)
        say(f"expert {e.name} [{e.lo},{e.hi}): {cfg.iterations} iterations")
        model = bundle.load_expert(e.name)
        ema, res = train(
            model, data, bundle.manifest.scheduler, cfg, run_dir, resume=resume and started,
            progress=progress, device=device, teacher=teacher, labels=labels,
        )  # fmt: skip
        if dist.is_main():  # under torchrun every process holds the same weights; one writes
            previous = e.training or {}
            record = _record(cfg, res, teacher, mode="separate")
            if previous.get("mode") == "shared":
                record["after"] = previous
            bundle.update_expert_weights(e.name, ema.cpu(), onnx=None, trt=None, training=record)
        dist.barrier()
        results[e.name] = res
    return results


def _record(cfg: TrainConfig, res: TrainResult, teacher, mode: str) -> dict:
    return {
        **cfg.to_dict(),
        "mode": mode,
        "final_loss": res.final_loss,
        "steps": res.steps,
        "world_size": dist.world_size(),
        "distilled": teacher is not None and cfg.distill > 0,
    }


@dataclass(frozen=True)
class FinetuneOptions(Options):
    """``stepadapt finetune``: a bundle's pruned experts recovered on their own timesteps."""

    bundle: Path = option(help="Bundle directory (weights are replaced in place).", argument=True)
    data: str = option(
        "fashion-mnist", "'fashion-mnist', an image folder, or an .npz file (its training part)."
    )
    iterations: int = option(2000, "Total iterations (both phases, all experts).")
    mode: str = option(
        DEFAULT_MODE,
        "separate: each expert alone on its interval, iterations split by interval length; shared: all "
        "pruned experts at once as slices of one network (every update reaches every expert; measured "
        "worse on the shipped base, see docs/results.md).",
    )
    specialize: float = option(0.0, "shared: fraction of the iterations for a separate phase afterwards.")
    batch_size: int = option(DEFAULT_BATCH, "Images per step.")
    lr: float = option(DEFAULT_LR, "Peak learning rate.")
    loss_weight: str = option(
        "none",
        "none, min-snr, or relative: each timestep's loss over the base's own loss there, so the noisy "
        "steps (small eps errors, large image errors) are not neglected.",
    )
    min_snr_gamma: float = option(5.0, "gamma of min-SNR weighting.")
    distill: float = option(
        DEFAULT_DISTILL, "Weight of the base's eps in the target (0..1); the rest is the true noise."
    )
    teacher: Path | None = option(
        None,
        "The base the bundle was cut from: teacher for --distill, start of --mode shared (default: the "
        "base the manifest records, else the shipped base).",
    )
    allow_other_base: bool = option(
        False, "Take a --teacher whose weights are not the recorded base's.", flags=("--allow-other-base",)
    )
    expert: tuple[str, ...] = option((), "Only this expert (repeatable; separate).", repeat=True)
    limit: int | None = option(None, "Use a deterministic subset of N images.")
    seed: int = option(0, "Seed (expert i uses seed + i).")
    holdout: float | None = option(None, HOLDOUT_HELP + " Default: the bundle's (its prune's), else 0.1.")
    resume: bool = option(False, "Continue from BUNDLE/finetune/ checkpoints (after a crash or kill).")
    checkpoint_every: int = option(250, "Checkpoint period in steps.")
    device: str = option("auto", DEVICE_HELP)
    timestep_sampler: str = option(
        "uniform",
        "Timestep sampler: uniform, curriculum (easy-to-hard clusters), adaptive (REINFORCE policy), "
        "loss-moment (improved-DDPM importance sampling, unbiased weights), visited (only the timesteps "
        "a --visit-steps DDIM run visits: for a fixed serving step count).",
    )
    clusters: int = option(20, "curriculum: clusters per interval.")
    patience: int = option(200, "curriculum: flat-loss updates before the next stage.")
    visit_steps: int = option(25, "visited: the DDIM step count served.")
    threads: int | None = option(None, "CPU threads for torch.")
    precision: str = option("auto", PRECISION_HELP)
    label_dropout: float = option(
        DEFAULT_LABEL_DROPOUT,
        "Class-conditional bundles: share of labels trained as the null class, so the unconditional "
        "branch that guidance needs stays trained.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        phase_iterations(self.mode, self.iterations, self.specialize)  # a bad mode is said here
        if not 0.0 <= self.distill <= 1.0:
            raise StepadaptError(f"--distill must be in [0, 1], got {self.distill}")

    @property
    def needs_teacher(self) -> bool:
        """Distillation, shared training (it starts from the base) and relative loss weights all read
        the base; the other recipes never load it."""
        return self.distill > 0 or self.mode == "shared" or loss_weight_class(self.loss_weight).needs_teacher

    def train_config(self) -> TrainConfig:
        return finetune_config(
            self.iterations, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
            loss_weight=self.loss_weight, min_snr_gamma=self.min_snr_gamma, distill=self.distill,
            timestep_sampler=self.timestep_sampler, clusters=self.clusters, patience=self.patience,
            visit_steps=self.visit_steps, checkpoint_every=self.checkpoint_every, precision=self.precision,
            label_dropout=self.label_dropout,
        )  # fmt: skip


def teacher_for(options: FinetuneOptions, bundle: Bundle) -> UNet2DModel | None:
    """The teacher the options need: the one given, else the recorded base, else the shipped base;
    refused where its weights are not the base the bundle was cut from."""
    from stepadapt.models import load_base

    if not options.needs_teacher:
        return None
    path = options.teacher or bundle.manifest.default_base("--teacher")
    model = load_base(path)[0]
    bundle.manifest.check_base(model, path, options.allow_other_base)
    return model


def training_data(options: FinetuneOptions, bundle: Bundle) -> tuple[torch.Tensor, Labels | None]:
    """The training part of ``options.data``, split as the bundle's prune split it (unless told
    otherwise), as the experts train on it (latents through the bundle's VAE, with their classes or
    captions where the bundle is conditional); other images than the bundle was pruned with are
    said in one line."""
    from stepadapt.data import fingerprint
    from stepadapt.space import DataSpace

    o, record = options, bundle.manifest.data or {}
    holdout = o.holdout if o.holdout is not None else record.get("holdout", DEFAULT_HOLDOUT)
    space = DataSpace.of(bundle.manifest.base_config, bundle.surround())
    x, y = space.rows(o.data, "train", limit=o.limit, seed=o.seed, holdout=holdout)
    if record and o.limit is None and fingerprint(x, y) != record.get("sha256"):
        msg = f"fine-tuning on other images than {bundle.path} was pruned with ({record.get('source')})"
        warnings.warn(Notice(msg), stacklevel=2)
    return x, y


def finetune(options: FinetuneOptions, log: Callable[[str], None] | None = None) -> dict[str, TrainResult]:
    """The finetune stage (under ``torchrun`` every process runs it; rank 0 writes the bundle)."""
    from stepadapt.devices import resolve_device, resolve_precision

    o = options
    dev = resolve_device(o.device)
    resolve_precision(o.precision, dev)
    if o.threads:
        torch.set_num_threads(o.threads)
    dist.init_from_env()
    b = Bundle.load(o.bundle)
    teacher = teacher_for(o, b)
    x, y = training_data(o, b)
    return finetune_bundle(
        b, x, o.train_config(), o.iterations, mode=o.mode, specialize=o.specialize,
        experts=list(o.expert) or None, teacher=teacher, resume=o.resume, log=log, device=dev, labels=y,
    )  # fmt: skip
