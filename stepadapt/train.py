"""One training loop for base training and expert fine-tuning.

Every source of randomness (batch indices, timesteps, noise) is drawn from one
``torch.Generator`` whose state goes into the checkpoint, so ``resume`` after a
kill continues bit-for-bit where the run stopped. ``Trainer`` holds a run's
state and does each part of it in its own method (restore, step, probe,
checkpoint, log); ``train`` is the whole run in one call.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from stepadapt import StepadaptError, first_line
from stepadapt import distributed as dist
from stepadapt.conditioning import (
    DEFAULT_LABEL_DROPOUT,
    Cond,
    Labels,
    Prompts,
    conditioning_of,
    drop_rows,
    model_inputs,
    rows_cond,
)
from stepadapt.devices import autocast, grad_scaler, resolve_precision
from stepadapt.difficulty import loss_profile
from stepadapt.io import load_torch, save_torch, write_json
from stepadapt.plan import visited_timesteps
from stepadapt.progress import progress as progress_bar
from stepadapt.schedule import make_scheduler, noised_target, snr
from stepadapt.timesteps import TimestepSampler, make_sampler, sampler_class

CHECKPOINT_NAME = "checkpoint.pt"
RELATIVE_PROXY = 64  # images the base's own loss profile is measured on (relative weighting)
DEFAULT_DISTILL = 0.7  # Diff-Pruning's mix: 0.7 x the base's eps + 0.3 x the true noise
RENAMED_OPTIONS = {"sampler": "timestep_sampler"}  # old key -> field, for configs saved before the rename


def min_snr_weight(snr: torch.Tensor, gamma: float = 5.0, prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): the x0-loss weight min(SNR, g) in the model's own target,
    i.e. min(SNR, g)/SNR for eps, min(SNR, g)/(SNR+1) for v, min(SNR, g) for x0."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    if prediction_type == "sample":
        return clipped
    raise StepadaptError(
        f"min-SNR weighting is defined for epsilon, v_prediction and sample, not {prediction_type!r}"
    )


def relative_weights(
    teacher: UNet2DModel, scheduler_cfg: dict[str, Any], data: torch.Tensor, lo: int, hi: int, seed: int,
    labels: Labels | None = None,
) -> torch.Tensor:  # fmt: skip
    """Per-timestep weights 1 / (the base's own loss at t), mean 1 over [lo, hi).

    A pruned student's eps error matters relative to how well the base itself does there: at the
    noisy end the base's loss is ~1e-4 and an error of 1e-3, negligible in plain eps-MSE, is a
    large, systematic error in the image (x0 error = eps error / sqrt(SNR)). Dividing by the base's
    loss counts every timestep's error in units of the base's own, which is what "as good as the
    base" means; it behaves like x0 weighting at low SNR and like eps weighting at high SNR.
    """
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(data), generator=g)[:RELATIVE_PROXY]
    cond = rows_cond(labels[rows]) if labels is not None else None
    ref = loss_profile(teacher, scheduler_cfg, data[rows], points=50, seed=seed, log=True, cond=cond)
    w = torch.from_numpy(1.0 / ref).float()
    return w / w[lo:hi].mean()


def denoising_losses(
    model: torch.nn.Module,
    scheduler: Any,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    teacher: UNet2DModel | None = None,
    distill: float = 0.0,
    cond: Cond | None = None,
) -> torch.Tensor:
    """Per-sample MSE against the model's own target (eps, v or x0, as the scheduler's
    ``prediction_type`` says; unweighted: samplers learn from these).

    With a ``teacher`` the target mixes in its prediction: (1-distill)*target + distill*teacher's,
    so a pruned expert learns what the base does at its timesteps, not only the data. ``cond``
    (class labels, text embeddings; row-aligned) goes to both, so they answer the same question.
    """
    extra = model_inputs(cond or {})
    x_t = scheduler.add_noise(x0, noise, t)
    target = noised_target(scheduler, x0, noise, t)
    if teacher is not None and distill > 0:
        with torch.no_grad():
            target = (1.0 - distill) * target + distill * teacher(x_t, t, **extra).sample
    return F.mse_loss(model(x_t, t, **extra).sample, target, reduction="none").mean(dim=(1, 2, 3))


def denoising_loss(
    model: torch.nn.Module,
    scheduler: Any,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    weight: torch.Tensor | None = None,
    teacher: UNet2DModel | None = None,
    distill: float = 0.0,
    cond: Cond | None = None,
) -> torch.Tensor:
    """The training objective: mean of the per-sample losses, times ``weight`` where given."""
    per_sample = denoising_losses(model, scheduler, x0, t, noise, teacher, distill, cond)
    return (per_sample * weight).mean() if weight is not None else per_sample.mean()


@dataclass(frozen=True)
class WeightInputs:
    """What a loss weight may be prepared from; each keeps what it uses."""

    cfg: TrainConfig
    scheduler: Any
    scheduler_cfg: dict[str, Any]
    data: torch.Tensor
    t_hi: int
    teacher: UNet2DModel | None
    labels: Labels | None = None


class LossWeight:
    """``none``: every sample's loss counts alike, the plain mean of the per-sample losses.

    Each loss weight is a class in ``LOSS_WEIGHT_KINDS``; ``prepare`` gets everything a weighting
    may need and each keeps what it uses, so the training loop never asks which one it has.
    """

    name = "none"
    needs_teacher = False  # built from the base's own predictions: train() must be given the base
    teacher_use = ""  # what it does with the base (for the error when none is given)

    @classmethod
    def prepare(cls, run: WeightInputs) -> LossWeight:
        return cls()

    def apply(self, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The sampler's weights ``w`` (all ones unless it corrects for its own bias) times this one's."""
        return w


class MinSnrWeight(LossWeight):
    """``min-snr``: Min-SNR-gamma (``min_snr_weight``), so low-noise timesteps stop dominating."""

    name = "min-snr"

    def __init__(self, snr_table: torch.Tensor, gamma: float, prediction_type: str) -> None:
        self.snr_table, self.gamma, self.prediction_type = snr_table, gamma, prediction_type

    @classmethod
    def prepare(cls, run: WeightInputs) -> LossWeight:
        return cls(snr(run.scheduler).float(), run.cfg.min_snr_gamma, run.scheduler.config.prediction_type)

    def apply(self, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return w * min_snr_weight(self.snr_table[t], self.gamma, self.prediction_type)


class RelativeWeight(LossWeight):
    """``relative``: errors in units of the base's own loss at t (``relative_weights``)."""

    name = "relative"
    needs_teacher = True
    teacher_use = "divide by the base's own loss"

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    @classmethod
    def prepare(cls, run: WeightInputs) -> LossWeight:
        assert run.teacher is not None  # the Trainer refuses a run without one (needs_teacher)
        c = run.cfg
        return cls(
            relative_weights(run.teacher, run.scheduler_cfg, run.data, c.t_lo, run.t_hi, c.seed, run.labels)
        )

    def apply(self, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return w * self.table[t]


LOSS_WEIGHT_KINDS: dict[str, type[LossWeight]] = {
    c.name: c for c in (LossWeight, MinSnrWeight, RelativeWeight)
}
LOSS_WEIGHTS = tuple(LOSS_WEIGHT_KINDS)  # the names, for help texts and validation


def loss_weight_class(name: str) -> type[LossWeight]:
    """The registry entry, so callers ask it (``.needs_teacher``) instead of comparing names."""
    if name not in LOSS_WEIGHT_KINDS:
        raise StepadaptError(f"unknown loss weight {name!r}; choose one of {', '.join(LOSS_WEIGHTS)}")
    return LOSS_WEIGHT_KINDS[name]


@dataclass
class TrainConfig:
    iterations: int = 6000
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    t_lo: int = 0
    t_hi: int | None = None  # None: the whole schedule
    checkpoint_every: int = 500
    sample_every: int = 1000
    loss_weight: str = "none"  # one of LOSS_WEIGHTS
    min_snr_gamma: float = 5.0
    distill: float = 0.0  # weight of the teacher's eps in the target (0 = true noise only)
    timestep_sampler: str = "uniform"  # which timesteps training draws: one of timesteps.TIMESTEP_SAMPLERS
    clusters: int = 20  # curriculum: clusters of the interval
    patience: int = 200  # curriculum: plateau length (updates) before the next stage
    probe_images: int = 8  # adaptive: images per probe timestep
    visit_steps: int = 25  # visited: the DDIM step count whose timesteps are trained
    precision: str = "auto"  # forward passes: auto (bf16/fp16 on a GPU, fp32 on a CPU), fp32, bf16, fp16
    label_dropout: float = DEFAULT_LABEL_DROPOUT  # class-conditional: share of labels trained as "none"
    class_lr_scale: float = (
        1.0  # the class embedding's learning rate over ``lr`` (a fresh one on a trained base)
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Also reads the records written before a field was renamed (bundle manifests' ``training``,
        old checkpoints), which carry the old key."""
        d = dict(d)
        for old, new in RENAMED_OPTIONS.items():
            if old in d:
                value = d.pop(old)
                if d.setdefault(new, value) != value:
                    raise StepadaptError(f"training options give both {old}={value!r} and {new}={d[new]!r}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise StepadaptError(f"unknown training options: {', '.join(sorted(unknown))}")
        return cls(**d)

    @property
    def needs_teacher(self) -> bool:
        """Whether training must be given the base: distillation or a loss weight built from it."""
        return self.distill > 0 or loss_weight_class(self.loss_weight).needs_teacher

    def validate(self) -> None:
        if self.iterations < 1 or self.batch_size < 1:
            raise StepadaptError("iterations and batch size must be positive")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise StepadaptError(f"learning rate must be positive, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise StepadaptError(f"EMA decay must be in [0, 1), got {self.ema_decay}")
        loss_weight_class(self.loss_weight)
        if not 0.0 <= self.distill <= 1.0:
            raise StepadaptError(f"distillation weight must be in [0, 1], got {self.distill}")
        sampler = sampler_class(self.timestep_sampler)  # an unknown name fails with the other option checks
        resolve_precision(self.precision, "cpu")
        if not (self.class_lr_scale > 0 and math.isfinite(self.class_lr_scale)):
            raise StepadaptError(f"class embedding LR scale must be positive, got {self.class_lr_scale}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise StepadaptError(f"label dropout must be in [0, 1), got {self.label_dropout}")
        if sampler.needs_visits and self.visit_steps < 1:
            raise StepadaptError(f"--visit-steps must be at least 1, got {self.visit_steps}")

    def make_sampler(self, lo: int, hi: int, scheduler_cfg: dict | None = None) -> TimestepSampler:
        """The sampler entry names the options it takes, so a new sampler needs no branch here."""
        entry = sampler_class(self.timestep_sampler)
        options = {name: getattr(self, name) for name in entry.options}
        if entry.needs_visits:
            visits = visited_timesteps("ddim", self.visit_steps, scheduler_cfg or {})
            options["timesteps"] = visits.tolist()
        return make_sampler(self.timestep_sampler, lo, hi, **options)


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    images_per_second: float
    checkpoint: Path


def _probe_losses(model, scheduler, x0, t_probe, noise, teacher, distill, cond=None) -> torch.Tensor:
    """Mean loss at each probe timestep over the same images and noise (no gradients)."""
    m, k = len(x0), len(t_probe)
    cond = {key: v.repeat(k, *([1] * (v.ndim - 1))) for key, v in (cond or {}).items()}
    with torch.no_grad():
        per = denoising_losses(
            model, scheduler, x0.repeat(k, 1, 1, 1), t_probe.repeat_interleave(m),
            noise.repeat(k, 1, 1, 1), teacher, distill, cond,
        )  # fmt: skip
    return per.view(k, m).mean(dim=1).cpu()


def _param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """One group at ``lr``; with ``class_lr_scale``, the class embedding in its own. A zero embedding
    added to a trained base's time embedding (train-base --init --conditional) gets gradients too noisy
    for Adam to move it far at the base's rate: at 1 x it reached norms of 0.1-0.3 against the time
    embedding's 2-7 in 1200 steps and the samples ignored their labels."""
    params = list(model.named_parameters())
    if cfg.class_lr_scale == 1.0:
        return [{"params": [p for _, p in params]}]
    is_class = [n.startswith("class_embedding.") for n, _ in params]
    return [
        {"params": [p for (_, p), c in zip(params, is_class, strict=True) if not c]},
        {
            "params": [p for (_, p), c in zip(params, is_class, strict=True) if c],
            "lr": cfg.lr * cfg.class_lr_scale,
        },
    ]


def _check_labels(model: torch.nn.Module, data: torch.Tensor, labels: Labels | None) -> int | None:
    """The null label of a class-conditional model given labelled data (None otherwise: captions
    drop to their own empty prompt). Labels for a model that takes none, or none for one that needs
    them, are one-line errors."""
    from stepadapt.space import check_classes

    cond = conditioning_of({"_class_name": type(model).__name__, **model.config})
    if labels is None:
        if cond.classes:
            raise StepadaptError("this model is class-conditional: training needs labelled data")
        if cond.text_dim:
            raise StepadaptError("this model is text-conditioned: training needs captioned data")
        return None
    if labels.shape != (len(data),):
        raise StepadaptError(f"{tuple(labels.shape)} labels for {len(data)} images")
    if isinstance(labels, Prompts):
        if not cond.text_dim:
            raise StepadaptError("captions given, but this model takes no text")
        if labels.table.shape[-1] != cond.text_dim:
            raise StepadaptError(
                f"text embeddings of width {labels.table.shape[-1]}; the model takes {cond.text_dim}"
            )
        return None
    if not cond.classes:
        raise StepadaptError("labels given, but this model is not class-conditional")
    check_classes(labels, cond.classes, "labels")
    return cond.null_label


def ema_model(model: UNet2DModel, ema: EMAModel) -> UNet2DModel:
    """A copy of ``model`` carrying the EMA weights (the one to sample from and ship)."""
    m = copy.deepcopy(model)
    ema.copy_to(m.parameters())
    return m.eval()


@dataclass(frozen=True)
class Probe:
    """Where the timestep sampler wants an update's effect measured. The images and noise are held
    fixed before and after the update, so the difference is the update's doing, not sampling noise."""

    t: torch.Tensor
    x0: torch.Tensor
    noise: torch.Tensor
    cond: Cond


class Trainer:
    """One training run, one concern per method: ``restore``, ``step``, ``probe``, ``checkpoint``,
    ``log``; ``run`` strings them together the way ``train`` always has.

    Kept apart so that a test or a caller can drive a run step by step and stop or restore it
    anywhere. Every draw comes from ``self.generator`` in one order per step (batch indices,
    timesteps, noise, then the probe's noise): that order is what a restored generator continues.
    Under ``torchrun`` the model is wrapped in DDP, each process draws ``batch_size / world``
    images with its own generator, and only rank 0 writes.
    """

    def __init__(
        self,
        model: UNet2DModel,
        data: torch.Tensor,
        scheduler_cfg: dict[str, Any],
        cfg: TrainConfig,
        out_dir: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        teacher: UNet2DModel | None = None,
        labels: Labels | None = None,
    ) -> None:
        cfg.validate()
        self.cfg, self.data, self.labels = cfg, data, labels
        self.null_label = _check_labels(model, data, labels)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.out_dir / CHECKPOINT_NAME
        self.device = dist.local_device(device)
        self.world, self.rank = dist.world_size(), dist.rank()
        self.local_batch = self._local_batch()
        self._check_data(model, data)
        self.scheduler = make_scheduler("ddpm", scheduler_cfg)
        self.t_hi = self._interval_end()
        self.timestep_sampler = cfg.make_sampler(cfg.t_lo, self.t_hi, scheduler_cfg)
        self.teacher = self._teacher(teacher)
        self.loss_weight = self._loss_weight(scheduler_cfg)
        self.model, self.net = model, self._wrap(model)
        self.optimizer = torch.optim.AdamW(
            _param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.lr_scheduler = get_cosine_schedule_with_warmup(self.optimizer, cfg.warmup, cfg.iterations)
        self.ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.scaler = grad_scaler(self.precision, self.device)
        self.mixed = functools.partial(autocast, self.precision, self.device)
        self.generator = torch.Generator().manual_seed(cfg.seed + 1_000_003 * self.rank)
        self.losses: list[float] = []  # the smoothed loss after each step
        self.steps = 0  # optimizer steps taken, counting those before a restore

    def _local_batch(self) -> int:
        if self.cfg.batch_size % self.world:
            raise StepadaptError(
                f"batch size {self.cfg.batch_size} does not split over {self.world} processes"
            )
        return self.cfg.batch_size // self.world

    @staticmethod
    def _check_data(model: UNet2DModel, data: torch.Tensor) -> None:
        if data.ndim != 4 or data.shape[1] != model.config.in_channels:
            raise StepadaptError(
                f"data has shape {tuple(data.shape)}; the model wants N x {model.config.in_channels} x H x W"
            )
        if not torch.isfinite(data).all():
            raise StepadaptError("training data contains NaN or infinite values")

    def _cond(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch's condition: its labels, a share dropped to the null class (drawn after the
        noise, so an unconditional run draws exactly what it always has)."""
        if self.labels is None:
            return {}
        y = drop_rows(self.labels[idx], self.cfg.label_dropout, self.null_label, self.generator)
        return {k: v.to(self.device) for k, v in rows_cond(y).items()}

    def _interval_end(self) -> int:
        T = self.scheduler.config.num_train_timesteps
        t_hi = self.cfg.t_hi if self.cfg.t_hi is not None else T
        if not 0 <= self.cfg.t_lo < t_hi <= T:
            raise StepadaptError(f"timestep interval [{self.cfg.t_lo}, {t_hi}) is not inside [0, {T})")
        return t_hi

    def _teacher(self, teacher: UNet2DModel | None) -> UNet2DModel | None:
        if self.cfg.distill > 0 and teacher is None:
            raise StepadaptError("distillation asked for, but no teacher model given")
        return teacher.to(self.device).eval() if teacher is not None else None

    def _loss_weight(self, scheduler_cfg: dict[str, Any]) -> LossWeight:
        kind = loss_weight_class(self.cfg.loss_weight)
        if kind.needs_teacher and self.teacher is None:
            raise StepadaptError(f"{kind.name} loss weights {kind.teacher_use}: give the base (teacher)")
        return kind.prepare(
            WeightInputs(
                self.cfg, self.scheduler, scheduler_cfg, self.data, self.t_hi, self.teacher, self.labels
            )
        )

    def _wrap(self, model: UNet2DModel) -> torch.nn.Module:
        """The module the training forward goes through: DDP's wrapper averages gradients over
        processes; probes, clipping and the EMA use the bare model."""
        model.to(self.device).train()
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def restore(self) -> None:
        """Continue from the checkpoint in ``out_dir``: weights, EMA, optimizer, LR schedule, loss
        scale, and per process the sampler's and generator's state, so the next step is the one an
        uninterrupted run would take."""
        if not self.checkpoint_path.exists():
            raise StepadaptError(f"nothing to resume: {self.checkpoint_path} does not exist")
        st = load_torch(self.checkpoint_path)
        self._check_resumable(st)
        try:
            self.model.load_state_dict(st["model"])
        except RuntimeError as e:
            raise StepadaptError(
                f"checkpoint {self.checkpoint_path} does not fit this model: {first_line(e)}"
            ) from None
        self.ema.load_state_dict(st["ema"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.lr_scheduler.load_state_dict(st["lr_scheduler"])
        if st.get("grad_scaler"):
            self.scaler.load_state_dict(st["grad_scaler"])
        self.timestep_sampler.load_state_dict(st["ranks"][self.rank]["sampler"])
        self.generator.set_state(st["ranks"][self.rank]["generator"])
        self.losses = st["losses"].tolist()
        self.steps = int(st["step"])

    def _check_resumable(self, st: dict[str, Any]) -> None:
        """A resume that would change the run (options, arithmetic, process count) is refused."""
        saved = TrainConfig.from_dict(json.loads(st["config"])).to_dict()
        now = self.cfg.to_dict()
        if saved != now:
            diff = [k for k, v in saved.items() if now[k] != v]
            raise StepadaptError(f"cannot resume: options differ from the checkpoint ({', '.join(diff)})")
        saved_precision = st.get("precision", "fp32")  # checkpoints from before --precision: fp32
        if saved_precision != self.precision:
            raise StepadaptError(
                f"cannot resume: the checkpoint trained in {saved_precision}, this run would use "
                f"{self.precision} (--precision {saved_precision}, or resume on the same kind of device)"
            )
        if st.get("data_sha256", self.data_sha256) != self.data_sha256:  # older checkpoints: unknown
            raise StepadaptError(
                "cannot resume: the training images differ from the checkpoint's (another --data, "
                "--holdout or --limit)"
            )
        if len(st["ranks"]) != self.world:
            raise StepadaptError(
                f"cannot resume: checkpoint was written by {len(st['ranks'])} processes, "
                f"this run has {self.world}"
            )

    def step(self) -> float:
        """One optimizer update on a fresh batch; returns the smoothed loss."""
        idx = torch.randint(len(self.data), (self.local_batch,), generator=self.generator)
        x0 = self.data[idx].to(self.device)
        t, w = self.timestep_sampler.sample(self.local_batch, self.generator)
        noise = torch.randn(x0.shape, generator=self.generator).to(self.device)
        cond = self._cond(idx)
        probe = self.probe(x0, cond)
        before = self.probe_losses(probe)
        per_sample, loss = self._update(x0, t, self.loss_weight.apply(w, t), noise, cond)
        after = self.probe_losses(probe)
        self.timestep_sampler.update(t, per_sample.detach().cpu(), before, after)
        self.steps += 1
        return self._smooth(loss.item())

    def _update(
        self, x0: torch.Tensor, t: torch.Tensor, w: torch.Tensor, noise: torch.Tensor, cond: Cond
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self.mixed():  # weights, gradients and the optimizer stay fp32; the loss is formed in fp32
            per_sample = denoising_losses(
                self.net, self.scheduler, x0, t.to(self.device), noise, self.teacher, self.cfg.distill, cond
            )
        loss = (per_sample.float() * w.to(self.device)).mean()
        if not torch.isfinite(loss):
            raise StepadaptError(f"loss became {loss.item()} at step {self.steps}: lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not fp16's scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)  # fp16: skipped (and the scale lowered) where a gradient overflowed
        self.scaler.update()
        self.lr_scheduler.step()
        self.ema.step(self.model.parameters())
        return per_sample, loss

    def _smooth(self, loss: float) -> float:
        """The running loss the log and the progress bar show (and the checkpoint keeps)."""
        smooth = loss if not self.losses else 0.98 * self.losses[-1] + 0.02 * loss
        self.losses.append(smooth)
        return smooth

    def probe(self, x0: torch.Tensor, cond: Cond) -> Probe | None:
        """Where a sampler that learns from the update's effect (``needs_probes``) wants it measured,
        with the batch's first images and their own noise; None for the others, which draw nothing."""
        if not self.timestep_sampler.needs_probes:
            return None
        t_probe = self.timestep_sampler.probes(self.generator)
        if t_probe is None:
            return None
        m = min(self.cfg.probe_images, len(x0))
        noise = torch.randn((m, *x0.shape[1:]), generator=self.generator).to(self.device)
        return Probe(t_probe.to(self.device), x0[:m], noise, {k: v[:m] for k, v in cond.items()})

    def probe_losses(self, probe: Probe | None) -> torch.Tensor | None:
        """The mean loss at each probe timestep, measured before and again after the update."""
        if probe is None:
            return None
        with self.mixed():
            return _probe_losses(
                self.model, self.scheduler, probe.x0, probe.t, probe.noise, self.teacher, self.cfg.distill,
                probe.cond,
            )  # fmt: skip

    def checkpoint(self) -> None:
        """Everything ``restore`` needs; each process gives its own sampler and generator state."""
        ranks = dist.gather(
            {"sampler": self.timestep_sampler.state_dict(), "generator": self.generator.get_state()}
        )
        if not dist.is_main():
            return
        state = {
            "step": self.steps,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict(),  # fp16's loss scale ({} when unused)
            "precision": self.precision,  # as resolved: a resume elsewhere must not change the arithmetic
            "ranks": ranks,  # per process: timestep sampler state and generator state
            "config": json.dumps(self.cfg.to_dict()),
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "data_sha256": self.data_sha256,  # other images (--data, --holdout, --limit) are another run
        }
        save_torch(self.checkpoint_path, state)

    def ema_model(self) -> UNet2DModel:
        return ema_model(self.model, self.ema)

    @functools.cached_property
    def data_sha256(self) -> str:
        from stepadapt.data import fingerprint

        return fingerprint(self.data, self.labels)

    def _due(self, every: int) -> bool:
        return self.steps % every == 0 or self.steps == self.cfg.iterations

    def run(
        self, *, progress: bool = True, on_sample: Callable[[int, UNet2DModel], None] | None = None
    ) -> tuple[UNet2DModel, TrainResult]:
        """Step to ``cfg.iterations``, checkpointing and sampling on schedule; see ``train``."""
        cfg = self.cfg
        show = progress and dist.is_main()
        bar = progress_bar(
            total=cfg.iterations, initial=self.steps, disable=not show, unit="it", dynamic_ncols=True
        )
        bar.set_description(f"t in [{cfg.t_lo},{self.t_hi}) {cfg.timestep_sampler}")
        t0, step0 = time.perf_counter(), self.steps
        while self.steps < cfg.iterations:
            smooth = self.step()
            rate = (self.steps - step0) * cfg.batch_size / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{smooth:.4f}", img_s=f"{rate:.0f}", refresh=False)
            bar.update(1)
            if self._due(cfg.checkpoint_every):
                self.checkpoint()
            if on_sample is not None and dist.is_main() and self._due(cfg.sample_every):
                on_sample(self.steps, self.ema_model())
        bar.close()
        return self.finish(time.perf_counter() - t0, step0)

    def finish(self, seconds: float, step0: int) -> tuple[UNet2DModel, TrainResult]:
        """The EMA copy and the summary, once the processes are known to agree on the weights."""
        spread = dist.max_param_spread(self.model)
        if spread > 0:
            raise StepadaptError(
                f"processes disagree on the weights after training (max difference {spread:g})"
            )
        result = TrainResult(
            steps=self.steps,
            final_loss=self.losses[-1] if self.losses else float("nan"),
            seconds=seconds,
            images_per_second=(self.steps - step0) * self.cfg.batch_size / seconds if seconds > 0 else 0.0,
            checkpoint=self.checkpoint_path,
        )
        if dist.is_main():
            self.log(result, step0)
        dist.barrier()
        return self.ema_model(), result

    def log(self, result: TrainResult, step0: int) -> None:
        """``train_log.json``: what a run did, for plots and for telling a resumed run from a fresh one."""
        write_json(
            self.out_dir / "train_log.json",
            {
                "config": self.cfg.to_dict(),
                "world_size": self.world,
                "precision": self.precision,  # as resolved on this device (the config may say auto)
                "steps": result.steps,
                "resumed_from": step0,  # 0: a fresh run; else the checkpoint's step it continued from
                "final_loss": result.final_loss,
                "seconds_this_run": round(result.seconds, 1),
                "images_per_second": round(result.images_per_second, 1),
                "smoothed_loss_every_50": self.losses[::50],
                "sampler_probabilities_every_10": self.timestep_sampler.probabilities()[::10].tolist(),
            },
        )


def train(
    model: UNet2DModel,
    data: torch.Tensor,
    scheduler_cfg: dict[str, Any],
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    on_sample: Callable[[int, UNet2DModel], None] | None = None,
    device: str | torch.device = "cpu",
    teacher: UNet2DModel | None = None,
    labels: Labels | None = None,
) -> tuple[UNet2DModel, TrainResult]:
    """Train ``model`` in place; returns the EMA copy and a summary.

    ``on_sample(step, ema_model)`` is called every ``cfg.sample_every`` steps and
    at the end (sample grids); checkpoints land in ``out_dir/checkpoint.pt``.
    Under ``torchrun`` the model is wrapped in DDP, each process draws
    ``batch_size / world`` images with its own generator, and only rank 0 writes. ``labels``: the
    images' classes or captions, for a conditional model (dropped to the null class or the empty
    prompt at ``label_dropout``).
    """
    trainer = Trainer(model, data, scheduler_cfg, cfg, out_dir, device=device, teacher=teacher, labels=labels)
    if resume:
        trainer.restore()
    return trainer.run(progress=progress, on_sample=on_sample)
