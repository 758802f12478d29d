"""One training loop for base training and expert fine-tuning.

Every source of randomness (batch indices, timesteps, noise) is drawn from one
``torch.Generator`` whose state goes into the checkpoint, so ``resume`` after a
kill continues bit-for-bit where the run stopped.
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

from stepadapt import StepadaptError
from stepadapt import distributed as dist
from stepadapt.devices import autocast, grad_scaler, resolve_precision
from stepadapt.difficulty import loss_profile
from stepadapt.io import load_torch, save_torch, write_json
from stepadapt.plan import visited_timesteps
from stepadapt.progress import progress as progress_bar
from stepadapt.schedule import make_scheduler, noised_target, snr
from stepadapt.timesteps import TimestepSampler, make_sampler, sampler_class

CHECKPOINT_NAME = "checkpoint.pt"
LOSS_WEIGHTS = ("none", "min-snr", "relative")
RELATIVE_PROXY = 64  # images the base's own loss profile is measured on (relative weighting)
DEFAULT_DISTILL = 0.7  # Diff-Pruning's mix: 0.7 x the base's eps + 0.3 x the true noise


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
    sampler: str = "uniform"  # one of timesteps.SAMPLERS
    clusters: int = 20  # curriculum: clusters of the interval
    patience: int = 200  # curriculum: plateau length (updates) before the next stage
    probe_images: int = 8  # adaptive: images per probe timestep
    visit_steps: int = 25  # visited: the DDIM step count whose timesteps are trained
    precision: str = "auto"  # forward passes: auto (bf16/fp16 on a GPU, fp32 on a CPU), fp32, bf16, fp16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise StepadaptError(f"unknown training options: {', '.join(sorted(unknown))}")
        return cls(**d)

    def validate(self) -> None:
        if self.iterations < 1 or self.batch_size < 1:
            raise StepadaptError("iterations and batch size must be positive")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise StepadaptError(f"learning rate must be positive, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise StepadaptError(f"EMA decay must be in [0, 1), got {self.ema_decay}")
        if self.loss_weight not in LOSS_WEIGHTS:
            raise StepadaptError(
                f"unknown loss weight {self.loss_weight!r}; choose one of {', '.join(LOSS_WEIGHTS)}"
            )
        if not 0.0 <= self.distill <= 1.0:
            raise StepadaptError(f"distillation weight must be in [0, 1], got {self.distill}")
        sampler_class(self.sampler)  # an unknown name fails with the other option checks
        resolve_precision(self.precision, "cpu")
        if self.sampler == "visited" and self.visit_steps < 1:
            raise StepadaptError(f"--visit-steps must be at least 1, got {self.visit_steps}")

    def make_sampler(self, lo: int, hi: int, scheduler_cfg: dict | None = None) -> TimestepSampler:
        if self.sampler == "curriculum":
            return make_sampler(self.sampler, lo, hi, clusters=self.clusters, patience=self.patience)
        if self.sampler == "visited":
            visits = visited_timesteps("ddim", self.visit_steps, scheduler_cfg or {})
            return make_sampler(self.sampler, lo, hi, timesteps=visits.tolist())
        return make_sampler(self.sampler, lo, hi)


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    images_per_second: float
    checkpoint: Path


def relative_weights(
    teacher: UNet2DModel, scheduler_cfg: dict[str, Any], data: torch.Tensor, lo: int, hi: int, seed: int
) -> torch.Tensor:
    """Per-timestep weights 1 / (the base's own loss at t), mean 1 over [lo, hi).

    A pruned student's eps error matters relative to how well the base itself does there: at the
    noisy end the base's loss is ~1e-4 and an error of 1e-3, negligible in plain eps-MSE, is a
    large, systematic error in the image (x0 error = eps error / sqrt(SNR)). Dividing by the base's
    loss counts every timestep's error in units of the base's own, which is what "as good as the
    base" means; it behaves like x0 weighting at low SNR and like eps weighting at high SNR.
    """
    g = torch.Generator().manual_seed(seed)
    proxy = data[torch.randperm(len(data), generator=g)[:RELATIVE_PROXY]]
    ref = loss_profile(teacher, scheduler_cfg, proxy, points=50, seed=seed, log=True)
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
) -> torch.Tensor:
    """Per-sample MSE against the model's own target (eps, v or x0, as the scheduler's
    ``prediction_type`` says; unweighted: samplers learn from these).

    With a ``teacher`` the target mixes in its prediction: (1-distill)*target + distill*teacher's,
    so a pruned expert learns what the base does at its timesteps, not only the data.
    """
    x_t = scheduler.add_noise(x0, noise, t)
    target = noised_target(scheduler, x0, noise, t)
    if teacher is not None and distill > 0:
        with torch.no_grad():
            target = (1.0 - distill) * target + distill * teacher(x_t, t).sample
    return F.mse_loss(model(x_t, t).sample, target, reduction="none").mean(dim=(1, 2, 3))


def denoising_loss(
    model: torch.nn.Module,
    scheduler: Any,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    weight: torch.Tensor | None = None,
    teacher: UNet2DModel | None = None,
    distill: float = 0.0,
) -> torch.Tensor:
    """The training objective: mean of the per-sample losses, times ``weight`` where given."""
    per_sample = denoising_losses(model, scheduler, x0, t, noise, teacher, distill)
    return (per_sample * weight).mean() if weight is not None else per_sample.mean()


def _state(
    step, model, ema, opt, lr_sched, scaler, precision: str, ranks: list[dict], cfg: TrainConfig, losses
) -> dict[str, Any]:
    return {
        "step": step,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": opt.state_dict(),
        "lr_scheduler": lr_sched.state_dict(),
        "grad_scaler": scaler.state_dict(),  # fp16's loss scale ({} when unused)
        "precision": precision,  # as resolved: a resume elsewhere must not change the arithmetic
        "ranks": ranks,  # per process: timestep sampler state and generator state
        "config": json.dumps(cfg.to_dict()),
        "losses": torch.tensor(losses, dtype=torch.float64),
    }


def _probe_losses(model, scheduler, x0, t_probe, noise, teacher, distill) -> torch.Tensor:
    """Mean loss at each probe timestep over the same images and noise (no gradients)."""
    m, k = len(x0), len(t_probe)
    with torch.no_grad():
        per = denoising_losses(
            model, scheduler, x0.repeat(k, 1, 1, 1), t_probe.repeat_interleave(m),
            noise.repeat(k, 1, 1, 1), teacher, distill,
        )  # fmt: skip
    return per.view(k, m).mean(dim=1).cpu()


def ema_model(model: UNet2DModel, ema: EMAModel) -> UNet2DModel:
    """A copy of ``model`` carrying the EMA weights (the one to sample from and ship)."""
    m = copy.deepcopy(model)
    ema.copy_to(m.parameters())
    return m.eval()


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
) -> tuple[UNet2DModel, TrainResult]:
    """Train ``model`` in place; returns the EMA copy and a summary.

    ``on_sample(step, ema_model)`` is called every ``cfg.sample_every`` steps and
    at the end (sample grids); checkpoints land in ``out_dir/checkpoint.pt``.
    Under ``torchrun`` the model is wrapped in DDP, each process draws
    ``batch_size / world`` images with its own generator, and only rank 0 writes.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT_NAME
    device = dist.local_device(device)
    world, rank = dist.world_size(), dist.rank()
    if cfg.batch_size % world:
        raise StepadaptError(f"batch size {cfg.batch_size} does not split over {world} processes")
    local_batch = cfg.batch_size // world
    if data.ndim != 4 or data.shape[1] != model.config.in_channels:
        raise StepadaptError(
            f"data has shape {tuple(data.shape)}; the model wants N x {model.config.in_channels} x H x W"
        )
    if not torch.isfinite(data).all():
        raise StepadaptError("training data contains NaN or infinite values")
    scheduler = make_scheduler("ddpm", scheduler_cfg)
    T = scheduler.config.num_train_timesteps
    t_hi = cfg.t_hi if cfg.t_hi is not None else T
    if not 0 <= cfg.t_lo < t_hi <= T:
        raise StepadaptError(f"timestep interval [{cfg.t_lo}, {t_hi}) is not inside [0, {T})")
    sampler = cfg.make_sampler(cfg.t_lo, t_hi, scheduler_cfg)
    snr_all = snr(scheduler).float()
    if cfg.distill > 0 and teacher is None:
        raise StepadaptError("distillation asked for, but no teacher model given")
    if teacher is not None:
        teacher = teacher.to(device).eval()
    rel_w = None
    if cfg.loss_weight == "relative":
        if teacher is None:
            raise StepadaptError(
                "relative loss weights divide by the base's own loss: give the base (teacher)"
            )
        rel_w = relative_weights(teacher, scheduler_cfg, data, cfg.t_lo, t_hi, cfg.seed)

    model.to(device).train()
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = get_cosine_schedule_with_warmup(opt, cfg.warmup, cfg.iterations)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
    precision = resolve_precision(cfg.precision, device)
    scaler, mixed = grad_scaler(precision, device), functools.partial(autocast, precision, device)
    gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * rank)
    losses: list[float] = []
    step = 0
    if resume and ckpt_path.exists():
        st = load_torch(ckpt_path)
        saved = TrainConfig.from_dict(json.loads(st["config"]))
        if saved.to_dict() != cfg.to_dict():
            diff = [k for k, v in saved.to_dict().items() if cfg.to_dict()[k] != v]
            raise StepadaptError(f"cannot resume: options differ from the checkpoint ({', '.join(diff)})")
        saved_precision = st.get("precision", "fp32")  # checkpoints from before --precision: fp32
        if saved_precision != precision:
            raise StepadaptError(
                f"cannot resume: the checkpoint trained in {saved_precision}, this run would use {precision} "
                f"(--precision {saved_precision}, or resume on the same kind of device)"
            )
        if len(st["ranks"]) != world:
            raise StepadaptError(
                f"cannot resume: checkpoint was written by {len(st['ranks'])} processes, this run has {world}"
            )
        try:
            model.load_state_dict(st["model"])
        except RuntimeError as e:
            raise StepadaptError(
                f"checkpoint {ckpt_path} does not fit this model: {str(e).splitlines()[0]}"
            ) from None
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["optimizer"])
        lr_sched.load_state_dict(st["lr_scheduler"])
        if st.get("grad_scaler"):
            scaler.load_state_dict(st["grad_scaler"])
        sampler.load_state_dict(st["ranks"][rank]["sampler"])
        gen.set_state(st["ranks"][rank]["generator"])
        losses = st["losses"].tolist()
        step = int(st["step"])
    elif resume:
        raise StepadaptError(f"nothing to resume: {ckpt_path} does not exist")

    n = len(data)
    show = progress and dist.is_main()
    bar = progress_bar(total=cfg.iterations, initial=step, disable=not show, unit="it", dynamic_ncols=True)
    bar.set_description(f"t in [{cfg.t_lo},{t_hi}) {cfg.sampler}")
    t0, step0 = time.perf_counter(), step
    smooth = losses[-1] if losses else None
    while step < cfg.iterations:
        idx = torch.randint(n, (local_batch,), generator=gen)
        x0 = data[idx].to(device)
        t, w = sampler.sample(local_batch, gen)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t_probe = sampler.probes(gen)
        before = after = None
        if t_probe is not None:  # same images and noise before and after the update
            m = min(cfg.probe_images, local_batch)
            p_noise = torch.randn((m, *x0.shape[1:]), generator=gen).to(device)
            with mixed():
                before = _probe_losses(
                    model, scheduler, x0[:m], t_probe.to(device), p_noise, teacher, cfg.distill
                )
        if cfg.loss_weight == "min-snr":
            w = w * min_snr_weight(snr_all[t], cfg.min_snr_gamma, scheduler.config.prediction_type)
        elif cfg.loss_weight == "relative":
            w = w * rel_w[t]
        with mixed():  # weights, gradients and the optimizer stay fp32; the loss is formed in fp32
            per_sample = denoising_losses(net, scheduler, x0, t.to(device), noise, teacher, cfg.distill)
        loss = (per_sample.float() * w.to(device)).mean()
        if not torch.isfinite(loss):
            raise StepadaptError(f"loss became {loss.item()} at step {step}: lower the learning rate")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)  # clip the true gradients, not fp16's scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)  # fp16: skipped (and the scale lowered) where a gradient overflowed
        scaler.update()
        lr_sched.step()
        ema.step(model.parameters())
        if t_probe is not None:
            with mixed():
                after = _probe_losses(
                    model, scheduler, x0[:m], t_probe.to(device), p_noise, teacher, cfg.distill
                )
        sampler.update(t, per_sample.detach().cpu(), before, after)
        step += 1
        v = loss.item()
        smooth = v if smooth is None else 0.98 * smooth + 0.02 * v
        losses.append(smooth)
        elapsed = time.perf_counter() - t0
        bar.set_postfix(
            loss=f"{smooth:.4f}", img_s=f"{(step - step0) * cfg.batch_size / elapsed:.0f}", refresh=False
        )
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.iterations:
            ranks = dist.gather({"sampler": sampler.state_dict(), "generator": gen.get_state()})
            if dist.is_main():
                state = _state(step, model, ema, opt, lr_sched, scaler, precision, ranks, cfg, losses)
                save_torch(ckpt_path, state)
        if (
            on_sample is not None
            and dist.is_main()
            and (step % cfg.sample_every == 0 or step == cfg.iterations)
        ):
            on_sample(step, ema_model(model, ema))
    bar.close()
    seconds = time.perf_counter() - t0
    spread = dist.max_param_spread(model)
    if spread > 0:
        raise StepadaptError(f"processes disagree on the weights after training (max difference {spread:g})")
    result = TrainResult(
        steps=step,
        final_loss=losses[-1] if losses else float("nan"),
        seconds=seconds,
        images_per_second=(step - step0) * cfg.batch_size / seconds if seconds > 0 else 0.0,
        checkpoint=ckpt_path,
    )
    if dist.is_main():
        write_json(
            out_dir / "train_log.json",
            {
                "config": cfg.to_dict(),
                "world_size": world,
                "precision": precision,  # as resolved on this device (the config may say auto)
                "steps": result.steps,
                "resumed_from": step0,  # 0: a fresh run; else the checkpoint's step it continued from
                "final_loss": result.final_loss,
                "seconds_this_run": round(seconds, 1),
                "images_per_second": round(result.images_per_second, 1),
                "smoothed_loss_every_50": losses[::50],
                "sampler_probabilities_every_10": sampler.probabilities()[::10].tolist(),
            },
        )
    dist.barrier()
    return ema_model(model, ema), result
