"""Routed sampling: one scheduler loop for every kind of denoiser and every solver.

A *denoiser* is any callable ``(x, t, cond) -> eps`` with ``x`` of shape B x C x H x W,
``t`` a tensor of shape [B] (int64 for whole timesteps, float32 where a
sigma-space solver such as Euler lands between them) and ``cond`` a dict of
row-aligned tensors (class labels, text embeddings; empty for an unconditional
model: see :mod:`stepadapt.conditioning`). The :class:`Router` is
itself a denoiser that dispatches each timestep to the expert owning it, so the
same loop serves the base model, a pruned model, experts in PyTorch, in
onnxruntime, or behind Triton (where the expert is a BLS call). The loop is
diffusers' pipeline loop (``scale_model_input``, model, ``step``), taken one
model evaluation at a time by a :class:`Trajectory`, so the evaluations of many
requests -- at different steps, with different solvers -- can share one call.
"""

from __future__ import annotations

import bisect
import inspect
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from stepadapt import StepadaptError
from stepadapt.conditioning import Cond, Denoiser, model_inputs, take
from stepadapt.conditioning import cat as cat_conds
from stepadapt.devices import device_of
from stepadapt.io import atomic_path
from stepadapt.solvers import Setting, Solver

__all__ = ["Cond", "Denoiser"]  # re-exported: the denoiser protocol is where sampling meets models
StepCallback = Callable[[int, float, torch.Tensor], None]
Decode = Callable[[torch.Tensor], torch.Tensor]  # latents -> images in [-1, 1] (a VAE's decoder)


class Router:
    """Timestep -> expert. ``boundaries[i] <= t < boundaries[i+1]`` belongs to ``experts[i]``."""

    def __init__(self, boundaries: Sequence[int], experts: Sequence[Denoiser]):
        b = [int(v) for v in boundaries]
        if len(b) != len(experts) + 1:
            raise StepadaptError(
                f"router needs len(experts)+1 boundaries, got {len(b)} for {len(experts)} experts"
            )
        if any(lo >= hi for lo, hi in zip(b, b[1:], strict=False)):
            raise StepadaptError(f"router boundaries must increase strictly: {b}")
        self.boundaries = b
        self.experts = list(experts)

    def index(self, t: float) -> int:
        """Which expert owns timestep ``t`` (fractional ones too: 579.4 belongs where 579 does)."""
        if not self.boundaries[0] <= t < self.boundaries[-1]:
            raise StepadaptError(
                f"timestep {t} is outside [{self.boundaries[0]}, {self.boundaries[-1]}): no expert covers it"
            )
        return bisect.bisect_right(self.boundaries, t) - 1

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        cond = cond or {}
        idx = [self.index(v) for v in t.reshape(-1).tolist()]
        if len(set(idx)) == 1:
            return self.experts[idx[0]](x, t, cond)
        out = torch.empty_like(x)
        for e in sorted(set(idx)):
            sel = torch.tensor([i == e for i in idx])
            out[sel] = self.experts[e](x[sel], t[sel], take(cond, sel))
        return out


def swapped_in(base: Denoiser, other: Denoiser, lo: int, hi: int, num_train_timesteps: int) -> Router:
    """The base everywhere except [lo, hi), which ``other`` takes: one interval's damage, alone."""
    bounds = sorted({0, lo, hi, num_train_timesteps})
    return Router(bounds, [other if b == lo else base for b in bounds[:-1]])


def module_denoiser(model: torch.nn.Module) -> Denoiser:
    """Wrap a diffusers UNet2DModel (or any module returning eps, like the Gaussian expert) as a
    plain ``(x, t, cond) -> eps`` function. It runs where the model lives and answers where ``x``
    lives, so the sampling loop (and its CPU generators) stays the same on a GPU."""
    device = device_of(model)
    # What its forward takes: an unconditional expert (the Gaussian) in a conditional bundle gets
    # the Router's rows with their labels, and ignores them as its ONNX export does.
    params = inspect.signature(model.forward).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    @torch.no_grad()
    def run(x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        extra = {k: v.to(device) for k, v in model_inputs(cond or {}).items() if takes_all or k in params}
        out = model(x.to(device), t.to(device), **extra)
        return getattr(out, "sample", out).to(x.device)

    return run


def initial_noise(n: int, shape: Sequence[int], seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """x_T for ``n`` images and the generator the sampler continues with (DDPM noise)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((n, *shape), generator=g), g


def validate_request(steps: int, n: int, max_images: int, num_train_timesteps: int) -> None:
    if not 1 <= steps <= num_train_timesteps:
        raise StepadaptError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    if not 1 <= n <= max_images:
        raise StepadaptError(f"number of images must be in [1, {max_images}], got {n}")


def timestep_batch(t: float | torch.Tensor, n: int) -> torch.Tensor:
    """``t`` for ``n`` rows: int64 where it is whole (the DDPM family's timesteps, and what older ONNX
    exports take), float32 where a sigma-space solver lands between training timesteps."""
    v = float(t)
    if v == int(v):
        return torch.full((n,), int(v), dtype=torch.long)
    return torch.full((n,), v, dtype=torch.float32)


class Jump(Protocol):
    """A closed-form map of x_vp from one noise level to a lower one (a Gaussian data model's
    probability-flow ODE, solved exactly), valid from ``cut`` up to the top of the schedule."""

    cut: int

    def transport(self, x: torch.Tensor, alpha_bar_from: float, alpha_bar_to: float) -> torch.Tensor: ...


class Trajectory:
    """One run of a solver over a set of rows: the diffusers pipeline loop (``scale_model_input``, the
    model, ``step``) taken one model evaluation at a time, so a caller can batch the evaluations of
    many trajectories (other requests, other solvers) into one model call. It owns its scheduler:
    multi-step solvers keep the last model outputs of *these* rows across steps.

    ``generator`` (one, or one per row) is handed to ``step`` only where it takes one; ``seed`` seeds
    DPM-Solver++ SDE's Brownian tree instead. With ``jump``, x_T is carried in closed form to the first
    timestep below ``jump.cut`` and ``steps`` solver steps are all spent below it.
    """

    def __init__(
        self,
        solver: Solver | str,
        scheduler_cfg: dict,
        x_t: torch.Tensor,
        steps: int,
        *,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        jump: Jump | None = None,
        cond: Cond | None = None,
    ):
        self.cond = dict(cond or {})
        if any(v.shape[0] != x_t.shape[0] for v in self.cond.values()):
            raise StepadaptError(f"the condition's rows do not match the {x_t.shape[0]} images")
        self.solver = Solver.parse(solver)
        self.scheduler = self.solver.scheduler(scheduler_cfg, seed=seed)
        self.solver.set_timesteps(
            self.scheduler, steps_for_jump(self.solver, steps, jump.cut, scheduler_cfg) if jump else steps
        )
        self.kwargs: dict = {}
        if self.solver.family.step_takes("generator"):
            self.kwargs["generator"] = generator
        if self.solver.family.step_takes("eta"):
            self.kwargs["eta"] = self.solver.eta
        self.x = x_t * self.scheduler.init_noise_sigma
        self.i = 0
        self.evaluations = 0
        if jump is not None:
            self._jump(jump)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def done(self) -> bool:
        return self.i >= len(self.timesteps)

    @property
    def t(self) -> float | int:
        v = float(self.timesteps[self.i])
        return int(v) if v == int(v) else v

    def model_input(self) -> tuple[torch.Tensor, torch.Tensor, Cond]:
        """What the model sees at this evaluation: the scaled sample, its timesteps, its condition."""
        t = self.timesteps[self.i]
        return self.scheduler.scale_model_input(self.x, t), timestep_batch(t, self.x.shape[0]), self.cond

    def advance(self, out: torch.Tensor) -> None:
        """One ``step`` with the model's output for this evaluation."""
        if out.shape != self.x.shape:
            raise StepadaptError(
                f"denoiser returned shape {tuple(out.shape)}, expected {tuple(self.x.shape)}"
            )
        if not torch.isfinite(out).all():
            raise StepadaptError(f"denoiser returned NaN/inf at step {self.i} (t={self.t})")
        t = self.timesteps[self.i]
        self.x = self.scheduler.step(out, t, self.x, **self.kwargs).prev_sample
        self.i += 1
        self.evaluations += 1

    # --- the analytic jump over the Gaussian's interval -----------------------------------------
    def _alpha_bar(self, i: int) -> float:
        """alpha_bar where the scheduler stands at evaluation ``i``: from its sigmas where it has them
        (they are what its step uses: interpolated, Karras), else from the training table."""
        sigmas = getattr(self.scheduler, "sigmas", None)
        if sigmas is not None and len(sigmas) > i:
            return float(1.0 / (1.0 + sigmas[i].double() ** 2))
        return float(self.scheduler.alphas_cumprod[int(self.timesteps[i])])

    def _vp_scale(self, i: int) -> float:
        """x_vp = scale * state: 1 for DDPM-family solvers, 1 / sqrt(1 + sigma^2) in sigma space."""
        return self._alpha_bar(i) ** 0.5 if self.solver.family.sigma_space else 1.0

    def _jump(self, jump: Jump) -> None:
        below = (self.timesteps < jump.cut).nonzero()
        if not len(below):
            raise StepadaptError(f"no step of this schedule lies below the jump's cut-off t={jump.cut}")
        k = int(below[0])
        if k == 0:
            return
        x = jump.transport(self.x * self._vp_scale(0), self._alpha_bar(0), self._alpha_bar(k))
        self.x = x / self._vp_scale(k)
        self.i = k
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(k)


def steps_for_jump(solver: Solver, steps: int, cut: int, scheduler_cfg: dict) -> int:
    """The step count whose schedule spends ``steps`` evaluations below ``cut`` (the nearest above
    it, when no count does exactly): from a little under steps x T / cut upwards. A jumped run is
    that schedule from its first timestep below the cut."""
    check_jump(solver, steps, cut)
    T = int(scheduler_cfg.get("num_train_timesteps", 1000))
    for m in range(max(steps, int(steps * T / max(cut, 1)) - 3), T + 1):
        if int((solver.evaluations(m, scheduler_cfg) < cut).sum()) >= steps:
            return m
    raise StepadaptError(f"no schedule of {solver.name} has {steps} steps below t={cut}")


def validate_setting(setting: Setting, scheduler_cfg: dict, jump_cut: int | None) -> None:
    """A one-line error for a setting no trajectory can run (a server checks before it batches):
    a step count the solver refuses, a jump without a Gaussian expert or that cannot be taken."""
    solver = Solver.parse(setting.sampler)
    solver.evaluations(setting.steps, scheduler_cfg)
    if setting.jump:
        if jump_cut is None:
            raise StepadaptError("jump asked for, but this bundle has no Gaussian expert on the noisy end")
        check_jump(solver, setting.steps, jump_cut)


def check_jump(solver: Solver, steps: int, cut: int) -> None:
    """A one-line error for a jump no trajectory can take: a solver that cannot start mid-schedule,
    or more steps below the cut than there are timesteps."""
    if not solver.jumps:
        raise StepadaptError(f"the jump needs one model evaluation per step; {solver.name} is not so")
    if not 1 <= steps <= cut:
        raise StepadaptError(f"the jump leaves {cut} timesteps below t={cut}; {steps} steps do not fit")


def sample(
    denoiser: Denoiser, trajectory: Trajectory, *, callback: StepCallback | None = None
) -> torch.Tensor:
    """Run ``trajectory`` to its end; returns x_0 in the model's range.

    ``callback(i, t, x)`` runs after every model evaluation (progress bars, streaming).
    """
    while not trajectory.done:
        t = trajectory.t
        trajectory.advance(denoiser(*trajectory.model_input()))
        if callback is not None:
            callback(trajectory.evaluations - 1, t, trajectory.x)
    return trajectory.x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model-range images N x C x H x W -> uint8 N x H x W x C."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 N x H x W x C -> one uint8 image with the N tiles on a grid."""
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str | os.PathLike, scale: int = 2) -> Path:
    grid = make_grid(images)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def save_npz(images: np.ndarray, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=images)
    return path


def sample_images(
    denoiser: Denoiser,
    scheduler_cfg: dict,
    shape: Sequence[int],
    n: int,
    *,
    steps: int = 50,
    sampler: Solver | str = "ddim",
    eta: float | None = None,
    seed: int = 0,
    batch: int = 64,
    callback: StepCallback | None = None,
    jump: Jump | None = None,
    cond: Cond | None = None,
    decode: Decode | None = None,
) -> np.ndarray:
    """``n`` uint8 images (N x H x W x C) in chunks of ``batch``; same seed, same images.

    ``sampler`` is a :class:`Solver` or its spec (``"unipc"``, ``"dpm++2m:thresholding"``); ``eta``,
    where given, overrides the spec's. ``cond``: the ``n`` rows' condition (labels, guidance);
    ``decode``: a latent model's decoder (latents -> images in [-1, 1])."""
    solver = _solver(sampler, eta)
    validate_request(steps, n, 1_000_000, int(scheduler_cfg.get("num_train_timesteps", 1000)))
    x_t, gen = initial_noise(n, shape, seed)
    chunks = []
    for lo in range(0, n, batch):
        rows = x_t[lo : lo + batch]
        part = take(cond or {}, slice(lo, lo + batch))
        run = Trajectory(
            solver, scheduler_cfg, rows, steps, generator=[gen] * len(rows), seed=seed + lo, jump=jump,
            cond=part,
        )  # fmt: skip
        chunks.append(sample(denoiser, run, callback=callback))
    return images_of(torch.cat(chunks), decode)


def images_of(x: torch.Tensor, decode: Decode | None = None) -> np.ndarray:
    """A trajectory's end as uint8 images: decoded first where the model works in latents."""
    return to_uint8(decode(x) if decode is not None else x)


def _solver(sampler: Solver | str, eta: float | None) -> Solver:
    solver = Solver.parse(sampler)
    return solver if eta is None else solver.with_(eta=float(eta))


def request_trajectory(
    solver: Solver | str,
    scheduler_cfg: dict,
    shape: Sequence[int],
    n: int,
    seed: int,
    steps: int,
    *,
    jump: Jump | None = None,
    cond: Cond | None = None,
) -> Trajectory:
    """The trajectory of one request of ``n`` images from ``seed``: what ``sample_images`` runs for
    it (one chunk), so whoever batches requests gives each the images it gets alone."""
    x, g = initial_noise(n, shape, seed)
    return Trajectory(solver, scheduler_cfg, x, steps, generator=[g] * n, seed=seed, jump=jump, cond=cond)


def evaluate_together(denoiser: Denoiser, runs: Sequence[Trajectory]) -> list[torch.Tensor]:
    """The model's output for the current evaluation of each of ``runs``, as **one** denoiser call:
    their rows are stacked (the Router splits them by expert) and the output split back."""
    inputs = [r.model_input() for r in runs]
    x, t, cond = (torch.cat([i[0] for i in inputs]), torch.cat([i[1] for i in inputs]),
                  cat_conds([i[2] for i in inputs]))  # fmt: skip
    return list(denoiser(x, t, cond).split([i[0].shape[0] for i in inputs]))


def step_together(denoiser: Denoiser, runs: Sequence[Trajectory]) -> None:
    """One model evaluation for each of ``runs`` (unfinished) in one call; each takes its own step."""
    for r, out in zip(runs, evaluate_together(denoiser, runs), strict=True):
        r.advance(out)


def sample_together(
    denoiser: Denoiser,
    scheduler_cfg: dict,
    shape: Sequence[int],
    requests: Sequence[tuple[int, int] | tuple[int, int, Cond]],
    *,
    steps: int = 50,
    sampler: Solver | str = "ddim",
    eta: float | None = None,
    stopped: Callable[[], Sequence[bool]] | None = None,
    jump: Jump | None = None,
    decode: Decode | None = None,
) -> list[np.ndarray | None]:
    """Several requests ``(n, seed[, cond])`` as one batch: every model evaluation is one call for all.

    Each request owns its trajectory (its x_T, its noise generator, its scheduler: a multi-step
    solver's history is per request), so it gets exactly the images ``sample_images(..., n,
    seed=seed)`` gives it alone, and a server may batch concurrent requests without changing what
    anyone gets. ``stopped()``, asked before every evaluation, flags requests to give up on
    (cancelled, out of time): they get ``None`` and cost nothing from then on.
    """
    solver = _solver(sampler, eta)
    runs: list[Trajectory | None] = [
        request_trajectory(
            solver, scheduler_cfg, shape, n, seed, steps, jump=jump, cond=cond[0] if cond else None
        )
        for n, seed, *cond in requests
    ]
    while True:
        if stopped is not None:
            runs = [None if f else r for r, f in zip(runs, stopped(), strict=True)]
        active = [r for r in runs if r is not None and not r.done]
        if not active:
            break
        step_together(denoiser, active)
    return [None if r is None else images_of(r.x, decode) for r in runs]


def max_pixel_diff(a: np.ndarray, b: np.ndarray) -> int:
    """Largest per-pixel difference between two uint8 image batches (0..255)."""
    if a.shape != b.shape:
        raise StepadaptError(f"image batches differ in shape: {a.shape} vs {b.shape}")
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
