"""Routed sampling: one scheduler loop for every kind of denoiser.

A *denoiser* is any callable ``(x, t) -> eps`` with ``x`` of shape B x C x H x W
and ``t`` an int64 tensor of shape [B]. The :class:`Router` is itself a denoiser
that dispatches each timestep to the expert owning it, so the same loop serves
the base model, a pruned model, experts in PyTorch, in onnxruntime, or behind
Triton (where the expert is a BLS call).
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, SchedulerMixin
from PIL import Image

from stepadapt import StepadaptError
from stepadapt.devices import device_of
from stepadapt.io import atomic_path
from stepadapt.schedule import make_scheduler

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]
RowFilter = Callable[[int], Sequence[bool] | None]

MAX_STEPS = 1000


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

    def index(self, t: int) -> int:
        """Which expert owns timestep ``t``."""
        if not self.boundaries[0] <= t < self.boundaries[-1]:
            raise StepadaptError(
                f"timestep {t} is outside [{self.boundaries[0]}, {self.boundaries[-1]}): no expert covers it"
            )
        return bisect.bisect_right(self.boundaries, t) - 1

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        idx = [self.index(int(v)) for v in t.reshape(-1).tolist()]
        if len(set(idx)) == 1:
            return self.experts[idx[0]](x, t)
        out = torch.empty_like(x)
        for e in sorted(set(idx)):
            sel = torch.tensor([i == e for i in idx])
            out[sel] = self.experts[e](x[sel], t[sel])
        return out


def swapped_in(base: Denoiser, other: Denoiser, lo: int, hi: int, num_train_timesteps: int) -> Router:
    """The base everywhere except [lo, hi), which ``other`` takes: one interval's damage, alone."""
    bounds = sorted({0, lo, hi, num_train_timesteps})
    return Router(bounds, [other if b == lo else base for b in bounds[:-1]])


def module_denoiser(model: torch.nn.Module) -> Denoiser:
    """Wrap a diffusers UNet2DModel (or any module returning eps, like the Gaussian expert) as a
    plain ``(x, t) -> eps`` function. It runs where the model lives and answers where ``x`` lives,
    so the sampling loop (and its CPU generators) stays the same on a GPU."""
    device = device_of(model)

    @torch.no_grad()
    def run(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(x.to(device), t.to(device))
        return getattr(out, "sample", out).to(x.device)

    return run


def initial_noise(n: int, shape: Sequence[int], seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """x_T for ``n`` images and the generator the sampler continues with (DDPM noise)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((n, *shape), generator=g), g


def validate_request(steps: int, n: int, eta: float, max_images: int, num_train_timesteps: int):
    if not 1 <= steps <= num_train_timesteps:
        raise StepadaptError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    if not 1 <= n <= max_images:
        raise StepadaptError(f"number of images must be in [1, {max_images}], got {n}")
    if not (math.isfinite(eta) and 0.0 <= eta <= 1.0):
        raise StepadaptError(f"eta must be in [0, 1], got {eta}")


def sample(
    denoiser: Denoiser,
    scheduler: SchedulerMixin,
    x_t: torch.Tensor,
    steps: int,
    *,
    eta: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    callback: StepCallback | None = None,
    keep: RowFilter | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``x_t``; returns x_0 in [-1, 1] (model range).

    ``generator`` may be one per image (diffusers draws each image's noise from
    its own), which is what lets unrelated requests share a batch.
    ``callback(i, t, x)`` runs after every step (progress bars, streaming).
    ``keep(i)``, asked before step i, may return a mask over the rows of
    ``x_t``: rows it drops stop there and are not returned (a server drops a
    cancelled request's images and steps the others on). DDPM and DDIM keep no
    state across steps, so the rows left get exactly what they would alone.
    """
    scheduler.set_timesteps(steps)
    x = x_t * scheduler.init_noise_sigma
    rows = torch.arange(x.shape[0])
    extra = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    for i, t in enumerate(scheduler.timesteps):
        mask = keep(i) if keep is not None else None
        if mask is not None:
            sel = torch.as_tensor(mask, dtype=torch.bool)[rows]
            if not sel.all():
                x, rows = x[sel], rows[sel]
                if isinstance(generator, list):
                    generator = [g for g, s in zip(generator, sel.tolist(), strict=True) if s]
                if not len(rows):
                    return x
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
        eps = denoiser(x, tt)
        if eps.shape != x.shape:
            raise StepadaptError(f"denoiser returned shape {tuple(eps.shape)}, expected {tuple(x.shape)}")
        if not torch.isfinite(eps).all():
            raise StepadaptError(f"denoiser returned NaN/inf at step {i} (t={int(t)})")
        x = scheduler.step(eps, t, x, generator=generator, **extra).prev_sample
        if callback is not None:
            callback(i, int(t), x)
    return x


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
    sampler: str = "ddim",
    eta: float = 0.0,
    seed: int = 0,
    batch: int = 64,
    callback: StepCallback | None = None,
) -> np.ndarray:
    """``n`` uint8 images (N x H x W x C) in chunks of ``batch``; same seed, same images."""
    validate_request(steps, n, eta, 1_000_000, int(scheduler_cfg.get("num_train_timesteps", 1000)))
    x_t, gen = initial_noise(n, shape, seed)
    chunks = [
        sample(
            denoiser,
            make_scheduler(sampler, scheduler_cfg),
            x_t[lo : lo + batch],
            steps,
            eta=eta,
            generator=[gen] * len(x_t[lo : lo + batch]),
            callback=callback,
        )  # fmt: skip
        for lo in range(0, n, batch)
    ]
    return to_uint8(torch.cat(chunks))


def sample_together(
    denoiser: Denoiser,
    scheduler_cfg: dict,
    shape: Sequence[int],
    requests: Sequence[tuple[int, int]],
    *,
    steps: int = 50,
    sampler: str = "ddim",
    eta: float = 0.0,
    stopped: Callable[[], Sequence[bool]] | None = None,
) -> list[np.ndarray | None]:
    """Several requests ``(n, seed)`` as one batch, stepped in lockstep.

    Each request gets exactly the images ``sample_images(..., n, seed=seed)``
    gives it alone (its own x_T and its own noise generator), so a server may
    batch the steps of concurrent requests without changing what anyone gets.
    ``stopped()``, asked before every step, flags requests to give up on
    (cancelled, out of time): they get ``None`` and cost nothing from then on.
    """
    if not requests:
        return []
    noise, generators = [], []
    for n, seed in requests:
        x, g = initial_noise(n, shape, seed)
        noise.append(x)
        generators += [g] * n
    sizes = [n for n, _ in requests]
    dropped = [False] * len(requests)

    def keep(_: int) -> list[bool] | None:
        flags = stopped()
        if not any(f and not d for f, d in zip(flags, dropped, strict=True)):
            return None
        dropped[:] = [f or d for f, d in zip(flags, dropped, strict=True)]
        return [not d for d, n in zip(dropped, sizes, strict=True) for _ in range(n)]

    x0 = sample(
        denoiser,
        make_scheduler(sampler, scheduler_cfg),
        torch.cat(noise),
        steps,
        eta=eta,
        generator=generators,
        keep=keep if stopped is not None else None,
    )
    kept = [n for n, d in zip(sizes, dropped, strict=True) if not d]
    images = iter(np.split(to_uint8(x0), np.cumsum(kept)[:-1]))
    return [None if d else next(images) for d in dropped]


def max_pixel_diff(a: np.ndarray, b: np.ndarray) -> int:
    """Largest per-pixel difference between two uint8 image batches (0..255)."""
    if a.shape != b.shape:
        raise StepadaptError(f"image batches differ in shape: {a.shape} vs {b.shape}")
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
