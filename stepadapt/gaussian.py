"""A closed-form denoiser: the exact posterior mean if the data were Gaussian.

Fit the training images' mean mu and covariance S = U diag(lam) U^T once; for
x_t = a x0 + s eps (a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t)) the
posterior mean of a Gaussian x0 is

    E[x0 | x_t] = mu + U diag(a lam / (a^2 lam + s^2)) U^T (x_t - a mu)

and eps = (x_t - a E[x0 | x_t]) / s. At high noise the posterior of real images
is close to this, so the noisiest steps can go to a denoiser that costs two
matrix-vector products (2 x D^2 MACs for D pixels) instead of a U-Net: on the
shipped Fashion-MNIST base it is *closer to the truth than the base itself*
for t >= 700 (docs/results.md), where pruned U-Nets are furthest from it.

It is a ``torch.nn.Module`` of plain tensor ops (gather, matmul, elementwise), so
a bundle stores it as safetensors and exports it to ONNX like any expert. Its
cost grows with the square of the pixel count, so it pays only for small images
(:func:`affordable` says when).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stepadapt import StepadaptError
from stepadapt.schedule import make_scheduler, model_target, noised_target

TENSORS = ("mean", "basis", "eigenvalues")  # what a bundle stores; the schedule comes from its manifest
MAX_RATIO = 0.25  # a Gaussian expert costing more than this x the base's MACs saves too little
# --gaussian auto: the Gaussian takes [t*, T) where, from t* on, its eps error on held-out images is
# within this factor of the base's own (the base is not the truth either).
DEFAULT_TOLERANCE = 1.1
CUTOFF_GRID = 20  # timesteps between the points the cut-off is searched on


class GaussianDenoiser(torch.nn.Module):
    """``(x, t) -> eps`` (or v, or x0: the model's ``prediction_type``) for data N(mean, U diag(lam)
    U^T); a denoiser like any expert, so it answers in the parameterisation the sampler expects."""

    def __init__(
        self,
        mean: torch.Tensor,
        basis: torch.Tensor,
        eigenvalues: torch.Tensor,
        alphas_cumprod: torch.Tensor,
        sample_shape: tuple[int, int, int],
        prediction_type: str = "epsilon",
    ):
        super().__init__()
        d = int(np.prod(sample_shape))
        if mean.shape != (d,) or basis.shape != (d, d) or eigenvalues.shape != (d,):
            raise StepadaptError(
                f"Gaussian denoiser tensors do not fit a {sample_shape} image: mean {tuple(mean.shape)}, "
                f"basis {tuple(basis.shape)}, eigenvalues {tuple(eigenvalues.shape)}"
            )
        values = (mean, basis, eigenvalues, alphas_cumprod)
        for name, v in zip((*TENSORS, "alphas_cumprod"), values, strict=True):
            if not torch.isfinite(v).all():
                raise StepadaptError(f"Gaussian denoiser tensor {name} has NaN or inf values")
            self.register_buffer(name, v.float().contiguous())
        self.sample_shape = tuple(int(v) for v in sample_shape)
        self.prediction_type = prediction_type

    @property
    def macs(self) -> int:
        return macs_for(self.sample_shape)

    @property
    def params(self) -> int:
        return sum(v.numel() for v in self.buffers())

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if tuple(sample.shape[1:]) != self.sample_shape:
            raise StepadaptError(
                f"Gaussian denoiser fits {self.sample_shape} images, got {tuple(sample.shape[1:])}"
            )
        flat = sample.reshape(sample.shape[0], -1).to(self.basis.dtype)
        ab = self.alpha_bar(timestep).unsqueeze(1)
        a, s2 = ab.sqrt(), 1.0 - ab
        gain = a * self.eigenvalues / (a * a * self.eigenvalues + s2)
        x0 = self.mean + ((flat - a * self.mean) @ self.basis * gain) @ self.basis.T
        eps = (flat - a * x0) / s2.sqrt()
        return model_target(self.prediction_type, x0, eps, ab).reshape(sample.shape).to(sample.dtype)

    def alpha_bar(self, timestep: torch.Tensor) -> torch.Tensor:
        """alpha_bar at each timestep; between training timesteps (Euler & co. on linspace or Karras
        schedules) sigma = sqrt((1 - ab) / ab) is interpolated linearly, as those schedulers do, so
        the expert sees the noise level the solver means. Whole timesteps read the table exactly."""
        t = timestep.reshape(-1).float()
        last = self.alphas_cumprod.shape[0] - 1
        lo = t.floor().long().clamp(0, last)
        hi = (lo + 1).clamp(max=last)
        frac = t - lo.float()
        sigma = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        between = 1.0 / (1.0 + (sigma[lo] * (1.0 - frac) + sigma[hi] * frac) ** 2)
        return torch.where(frac == 0, self.alphas_cumprod[lo], between)

    @torch.no_grad()
    def transport(self, x: torch.Tensor, alpha_bar_from: float, alpha_bar_to: float) -> torch.Tensor:
        """The probability-flow ODE solved exactly for Gaussian data (Wang & Vastola, arXiv
        2311.10892): x_t's marginal is N(a mu, U diag(ab lam + 1 - ab) U^T), and the flow keeps each
        eigen-coordinate's standardised value, so one map carries x_vp from ``alpha_bar_from`` to
        ``alpha_bar_to`` -- any number of solver steps over the Gaussian's interval in one."""
        flat = x.reshape(x.shape[0], -1).to(self.basis.dtype)
        a0, a1 = float(alpha_bar_from) ** 0.5, float(alpha_bar_to) ** 0.5
        lam = self.eigenvalues
        gain = (
            (alpha_bar_to * lam + 1.0 - alpha_bar_to) / (alpha_bar_from * lam + 1.0 - alpha_bar_from)
        ).sqrt()
        out = a1 * self.mean + ((flat - a0 * self.mean) @ self.basis * gain) @ self.basis.T
        return out.reshape(x.shape).to(x.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a bundle stores (safetensors); :meth:`from_tensors` is the inverse."""
        return {name: getattr(self, name).detach().contiguous().cpu() for name in TENSORS}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], sample_shape: tuple[int, int, int], scheduler_cfg: dict
    ) -> GaussianDenoiser:
        """Inverse of :meth:`tensors`; the schedule is rebuilt in float32 from ``scheduler_cfg`` (a
        stored copy, e.g. in float16, would round 1 - alpha_bar to 0 at the first timesteps)."""
        missing = [k for k in TENSORS if k not in tensors]
        if missing:
            raise StepadaptError(f"Gaussian denoiser weights lack {', '.join(missing)}")
        sched = make_scheduler("ddpm", scheduler_cfg)
        return cls(
            *(tensors[k].float() for k in TENSORS), sched.alphas_cumprod, sample_shape=sample_shape,
            prediction_type=sched.config.prediction_type,
        ).eval()  # fmt: skip


@dataclass(frozen=True)
class GaussianJump:
    """The analytic jump (``sampling.Jump``): ``gaussian``'s exact flow, from the top of the schedule
    down to ``cut``, the lowest timestep the Gaussian expert owns in its bundle."""

    gaussian: GaussianDenoiser
    cut: int

    def transport(self, x: torch.Tensor, alpha_bar_from: float, alpha_bar_to: float) -> torch.Tensor:
        return self.gaussian.transport(x, alpha_bar_from, alpha_bar_to)


def macs_for(sample_shape: tuple[int, ...]) -> int:
    """What a Gaussian expert for images of this shape costs per image: two D x D products for D
    pixels (the elementwise steps are negligible)."""
    return 2 * int(np.prod(sample_shape)) ** 2


def affordable(sample_shape: tuple[int, ...], base_macs: int, limit: float = MAX_RATIO) -> str | None:
    """None if a Gaussian expert is worth fitting for this base, else why not (one line)."""
    ratio = macs_for(sample_shape) / base_macs
    if ratio > limit:
        d = int(np.prod(sample_shape))
        return (
            f"a Gaussian expert for {d}-pixel images costs 2 x {d}^2 MACs = {ratio:.2f} x the base's "
            f"(more than {limit}): it pays only for small images"
        )
    return None


def fit_gaussian(data: torch.Tensor, scheduler_cfg: dict) -> GaussianDenoiser:
    """Mean and covariance of ``data`` (N x C x H x W in the model's range), fitted in float64 and
    kept in float32. Needs at least as many images as pixels, or the covariance is singular and
    the denoiser reproduces its training images instead of the distribution."""
    flat = data.reshape(len(data), -1).double()
    if len(flat) < max(2, flat.shape[1]):
        raise StepadaptError(
            f"a Gaussian denoiser for {flat.shape[1]}-pixel images needs at least {max(2, flat.shape[1])} "
            f"training images, got {len(flat)}"
        )
    mean = flat.mean(0)
    lam, basis = torch.linalg.eigh(torch.cov((flat - mean).T))
    sched = make_scheduler("ddpm", scheduler_cfg)
    return GaussianDenoiser(
        mean, basis, lam.clamp(min=0.0), sched.alphas_cumprod, sample_shape=tuple(data.shape[1:]),
        prediction_type=sched.config.prediction_type,
    ).eval()  # fmt: skip


@torch.no_grad()
def gaussian_cutoff(
    base: torch.nn.Module,
    gaussian: GaussianDenoiser,
    scheduler_cfg: dict,
    held_out: torch.Tensor,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    grid: int = CUTOFF_GRID,
    seed: int = 0,
) -> tuple[int, dict[int, tuple[float, float]]]:
    """The lowest t* on the grid from which on the Gaussian's eps error (against the truth, on
    ``held_out`` images) stays within ``tolerance`` x the base's; T when it never does. The lowest
    grid step stays with the U-Net even when the base is worse everywhere (an untrained base).

    Returns t* and, per grid point, (base error, Gaussian error): what the plot and the log show.
    """
    from stepadapt.sampling import module_denoiser

    sched = make_scheduler("ddpm", scheduler_cfg)
    T = int(sched.config.num_train_timesteps)
    g = torch.Generator().manual_seed(seed)
    held_out = held_out.cpu()  # the Gaussian runs on the CPU; the base where it lives, answering here
    on_base = module_denoiser(base)
    errors: dict[int, tuple[float, float]] = {}
    cut = T
    for t in range(T - 1 - (T - 1) % grid, -1, -grid):  # from the noisy end down
        noise, tt = torch.randn(held_out.shape, generator=g), torch.full((len(held_out),), t)
        x_t = sched.add_noise(held_out, noise, tt)
        target = noised_target(sched, held_out, noise, tt)
        e_base = float(((on_base(x_t, tt) - target) ** 2).mean())
        e_gauss = float(((gaussian(x_t, tt) - target) ** 2).mean())
        errors[t] = (e_base, e_gauss)
        if e_gauss > tolerance * e_base or t < grid:
            break
        cut = t
    return cut, errors
