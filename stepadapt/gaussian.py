"""A closed-form denoiser: the exact posterior mean if the data were Gaussian.

Fit the training images' mean mu and covariance S = U diag(lam) U^T once; for
x_t = a x0 + s eps (a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t)) the
posterior mean of a Gaussian x0 is

    E[x0 | x_t] = mu + U diag(g(lam)) U^T (x_t - a mu),    g(lam) = a lam / (a^2 lam + s^2)

and eps = (x_t - a E[x0 | x_t]) / s. At high noise the posterior of real images
is close to this (Wang & Vastola, arXiv 2311.10892), so the noisiest steps can go
to a denoiser that costs two matrix-vector products instead of a U-Net: on the
shipped Fashion-MNIST base it is *closer to the truth than the base itself* for
t >= 700 (docs/results.md), where pruned U-Nets are furthest from it.

Two forms of the covariance, one formula:

- **full**: all D eigenpairs; 2 x D^2 MACs and D^2 parameters, and it needs at least D
  training images or S is singular (the denoiser then reproduces its training images).
- **low-rank** (probabilistic PCA, Tipping & Bishop 1999): the top k eigenpairs and one
  isotropic variance sigma^2 for the D - k directions left, the mean of their eigenvalues
  (the maximum-likelihood value). S is still diagonal in [U_k, U_rest], so the posterior
  mean stays *exact* under that model, without ever forming U_rest:

      E[x0 | x_t] = mu + g(sigma^2) r + U_k diag(g(lam_k) - g(sigma^2)) U_k^T r,  r = x_t - a mu

  2 x D x k + D MACs and D x k parameters, and any number of images above k does. At the
  noise levels the Gaussian serves, the directions past the top few dozen barely move the
  posterior mean: on Fashion-MNIST the rank that keeps 90% of the variance (84 of 1024) is
  within 0.1% of the full form's eps error from t = 500 up (:data:`DEFAULT_EXPLAINED`).

:class:`ClassGaussianDenoiser` keeps one low-rank Gaussian per class and one more, fitted to all
images pooled, for the null class that classifier-free guidance asks for: each row is denoised
under its own label's Gaussian, which keeps the condition that an unconditional noisy-end expert
would erase (eDiff-I, arXiv 2211.01324: the condition steers the noisy steps).

They are ``torch.nn.Module``s of plain tensor ops (gather, matmul, elementwise), so a bundle stores
them as safetensors and exports them to ONNX like any expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stepadapt import StepadaptError
from stepadapt.conditioning import Conditioning
from stepadapt.schedule import make_scheduler, model_target, noised_target

TENSORS = ("mean", "basis", "eigenvalues")  # what a bundle stores; the schedule comes from its manifest
REMAINDER = "remainder"  # the low-rank form's isotropic variance of the directions past its rank
CLASS_TENSORS = ("means", "bases", "eigenvalues", "remainders")  # per class, the null class last
MAX_RATIO = 0.25  # a Gaussian expert costing more than this x the base's MACs saves too little
# The default rank keeps this share of the training images' variance. Measured on Fashion-MNIST's
# held-out split (docs in the module docstring): 0.9 keeps 84 of 1024 directions and is within 0.1%
# of the full form's eps error at every t >= 500 and within 0.4% at t = 400; 0.95 (187) buys < 0.1%
# more there at twice the MACs and parameters (a per-class Gaussian stores one basis per class).
DEFAULT_EXPLAINED = 0.9
# --gaussian-rank auto on unconditional data: the low-rank form replaces the full one where its eps
# error at the cut-off (held-out images) is within this factor of the full form's.
LOW_RANK_TOLERANCE = 1.05
EXACT_LIMIT = 4096  # up to this many pixels (or images) the spectrum comes from an exact eigh
RANDOMIZED_RANK = 1024  # beyond both: a randomized SVD finds at most this many top directions
# --gaussian auto: the Gaussian takes [t*, T) where, from t* on, its eps error on held-out images is
# within this factor of the base's own (the base is not the truth either).
DEFAULT_TOLERANCE = 1.1
CUTOFF_GRID = 20  # timesteps between the points the cut-off is searched on


def _alpha_bar(alphas_cumprod: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """alpha_bar at each timestep; between training timesteps (Euler & co. on linspace or Karras
    schedules) sigma = sqrt((1 - ab) / ab) is interpolated linearly, as those schedulers do, so
    the expert sees the noise level the solver means. Whole timesteps read the table exactly."""
    t = timestep.reshape(-1).float()
    last = alphas_cumprod.shape[0] - 1
    lo = t.floor().long().clamp(0, last)
    hi = (lo + 1).clamp(max=last)
    frac = t - lo.float()
    sigma = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
    between = 1.0 / (1.0 + (sigma[lo] * (1.0 - frac) + sigma[hi] * frac) ** 2)
    return torch.where(frac == 0, alphas_cumprod[lo], between)


def _gain(a: torch.Tensor, s2: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The posterior mean's shrinkage of a direction of variance ``lam``: a lam / (a^2 lam + s^2)."""
    return a * lam / (a * a * lam + s2)


def _low_rank_x0(
    r: torch.Tensor, basis: torch.Tensor, eigenvalues: torch.Tensor, remainder: torch.Tensor,
    a: torch.Tensor, s2: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """E[x0 | x_t] - mu for residuals ``r`` (B x D) under U diag(lam) U^T + sigma^2 (I - U U^T).
    ``basis`` is D x k (one Gaussian) or B x D x k (each row its own, gathered); the two products
    are the 2 x D x k MACs."""
    iso = _gain(a, s2, remainder)
    delta = _gain(a, s2, eigenvalues) - iso  # what each kept direction adds to the isotropic gain
    if basis.dim() == 2:
        return iso * r + ((r @ basis) * delta) @ basis.T
    proj = (r.unsqueeze(1) @ basis).squeeze(1)  # B x k
    return iso * r + ((proj * delta).unsqueeze(1) @ basis.transpose(1, 2)).squeeze(1)


def _check_values(names: tuple[str, ...], values: tuple[torch.Tensor, ...]) -> None:
    for name, v in zip(names, values, strict=True):
        if not torch.isfinite(v).all():
            raise StepadaptError(f"Gaussian denoiser tensor {name} has NaN or inf values")
        if name in ("eigenvalues", REMAINDER, "remainders") and bool((v < 0).any()):
            raise StepadaptError(f"Gaussian denoiser tensor {name} has negative variances")


class GaussianDenoiser(torch.nn.Module):
    """``(x, t) -> eps`` (or v, or x0: the model's ``prediction_type``) for data N(mean, S); a
    denoiser like any expert, so it answers in the parameterisation the sampler expects.

    ``remainder`` None: S = U diag(lam) U^T with all D eigenpairs (the full form). Else ``basis`` is
    D x k, k < D, and S = U diag(lam) U^T + remainder (I - U U^T) (the low-rank form)."""

    def __init__(
        self,
        mean: torch.Tensor,
        basis: torch.Tensor,
        eigenvalues: torch.Tensor,
        alphas_cumprod: torch.Tensor,
        sample_shape: tuple[int, int, int],
        prediction_type: str = "epsilon",
        remainder: torch.Tensor | None = None,
    ):
        super().__init__()
        d = int(np.prod(sample_shape))
        k = basis.shape[1] if basis.dim() == 2 else -1
        fits = mean.shape == (d,) and basis.dim() == 2 and basis.shape[0] == d and eigenvalues.shape == (k,)
        if remainder is None:
            fits = fits and k == d
        else:
            remainder = remainder.reshape(-1)
            fits = fits and 1 <= k < d and remainder.shape == (1,)
        if not fits:
            raise StepadaptError(
                f"Gaussian denoiser tensors do not fit a {sample_shape} image: mean {tuple(mean.shape)}, "
                f"basis {tuple(basis.shape)}, eigenvalues {tuple(eigenvalues.shape)}"
                + (f", remainder {tuple(remainder.shape)}" if remainder is not None else "")
            )
        names, values = (*TENSORS, "alphas_cumprod"), (mean, basis, eigenvalues, alphas_cumprod)
        if remainder is not None:
            names, values = (*names, REMAINDER), (*values, remainder)
        _check_values(names, values)
        for name, v in zip(names, values, strict=True):
            self.register_buffer(name, v.float().contiguous())
        if remainder is None:
            self.remainder = None
        self.sample_shape = tuple(int(v) for v in sample_shape)
        self.prediction_type = prediction_type

    @property
    def low_rank(self) -> bool:
        return self.remainder is not None

    @property
    def rank(self) -> int:
        """The directions with their own variance: D for the full form."""
        return int(self.basis.shape[1])

    @property
    def macs(self) -> int:
        return macs_for(self.sample_shape, self.rank if self.low_rank else None)

    @property
    def explained(self) -> float:
        """The share of the training variance its own directions keep (1 for the full form)."""
        if self.remainder is None:
            return 1.0
        kept = float(self.eigenvalues.double().sum())
        total = kept + float(self.remainder.double()) * (self.basis.shape[0] - self.rank)
        return kept / total if total > 0 else 1.0

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
        if self.remainder is None:  # the full form, as bundles made before the low-rank one sample it
            gain = a * self.eigenvalues / (a * a * self.eigenvalues + s2)
            x0 = self.mean + ((flat - a * self.mean) @ self.basis * gain) @ self.basis.T
        else:
            x0 = self.mean + _low_rank_x0(
                flat - a * self.mean, self.basis, self.eigenvalues, self.remainder, a, s2
            )
        eps = (flat - a * x0) / s2.sqrt()
        return model_target(self.prediction_type, x0, eps, ab).reshape(sample.shape).to(sample.dtype)

    def alpha_bar(self, timestep: torch.Tensor) -> torch.Tensor:
        return _alpha_bar(self.alphas_cumprod, timestep)

    @torch.no_grad()
    def transport(self, x: torch.Tensor, alpha_bar_from: float, alpha_bar_to: float) -> torch.Tensor:
        """The probability-flow ODE solved exactly for Gaussian data (Wang & Vastola, arXiv
        2311.10892): x_t's marginal is N(a mu, U diag(ab lam + 1 - ab) U^T), and the flow keeps each
        eigen-coordinate's standardised value, so one map carries x_vp from ``alpha_bar_from`` to
        ``alpha_bar_to`` -- any number of solver steps over the Gaussian's interval in one. The
        low-rank form's remaining directions share one variance, so they share one factor."""
        flat = x.reshape(x.shape[0], -1).to(self.basis.dtype)
        a0, a1 = float(alpha_bar_from) ** 0.5, float(alpha_bar_to) ** 0.5

        def factor(lam: torch.Tensor) -> torch.Tensor:
            return (
                (alpha_bar_to * lam + 1.0 - alpha_bar_to) / (alpha_bar_from * lam + 1.0 - alpha_bar_from)
            ).sqrt()

        r = flat - a0 * self.mean
        if self.remainder is None:
            out = a1 * self.mean + (r @ self.basis * factor(self.eigenvalues)) @ self.basis.T
        else:
            iso = factor(self.remainder)
            out = (
                a1 * self.mean
                + iso * r
                + ((r @ self.basis) * (factor(self.eigenvalues) - iso)) @ self.basis.T
            )
        return out.reshape(x.shape).to(x.dtype)

    def truncated(self, rank: int) -> GaussianDenoiser:
        """This full-form Gaussian's low-rank form: its top ``rank`` eigenpairs, and the mean of the
        other eigenvalues as the isotropic remainder (exactly what fitting the low-rank form to the
        same images gives, without a second eigendecomposition)."""
        if self.low_rank:
            raise StepadaptError("only a full-covariance Gaussian can be truncated")
        d = self.basis.shape[0]
        if not 1 <= rank < d:
            raise StepadaptError(
                f"a low-rank Gaussian of {d}-pixel images needs a rank in [1, {d - 1}], got {rank}"
            )
        order = torch.argsort(self.eigenvalues, descending=True, stable=True)[:rank]
        lam = self.eigenvalues.double()
        rest = (lam.sum() - lam[order].sum()).clamp(min=0.0) / (d - rank)
        return GaussianDenoiser(
            self.mean, self.basis[:, order], self.eigenvalues[order], self.alphas_cumprod, self.sample_shape,
            self.prediction_type, remainder=rest.reshape(1),
        ).eval()  # fmt: skip

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a bundle stores (safetensors); :meth:`from_tensors` is the inverse."""
        names = (*TENSORS, REMAINDER) if self.low_rank else TENSORS
        return {name: getattr(self, name).detach().contiguous().cpu() for name in names}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], sample_shape: tuple[int, int, int], scheduler_cfg: dict
    ) -> GaussianDenoiser:
        """Inverse of :meth:`tensors` (either form: a ``remainder`` makes it low-rank); the schedule is
        rebuilt in float32 from ``scheduler_cfg`` (a stored copy, e.g. in float16, would round
        1 - alpha_bar to 0 at the first timesteps)."""
        _check_keys(tensors, TENSORS, (REMAINDER,))
        sched = make_scheduler("ddpm", scheduler_cfg)
        rest = tensors.get(REMAINDER)
        return cls(
            *(tensors[k].float() for k in TENSORS), sched.alphas_cumprod, sample_shape=sample_shape,
            prediction_type=sched.config.prediction_type, remainder=None if rest is None else rest.float(),
        ).eval()  # fmt: skip


def _check_keys(tensors: dict[str, torch.Tensor], needed: tuple[str, ...], optional: tuple[str, ...]) -> None:
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise StepadaptError(f"Gaussian denoiser weights lack {', '.join(missing)}")
    extra = sorted(set(tensors) - set(needed) - set(optional))
    if extra:
        raise StepadaptError(f"Gaussian denoiser weights hold unexpected tensors {', '.join(extra)}")


class ClassGaussianDenoiser(torch.nn.Module):
    """``(x, t, class_labels) -> eps``: each row denoised under the low-rank Gaussian of its label,
    label ``classes`` (the null class) under the one fitted to all images pooled -- the exact
    posterior mean under a per-class Gaussian model, and its unconditional counterpart, which is
    what classifier-free guidance combines.

    Stored stacked, the null class last: ``means`` (K+1) x D, ``bases`` (K+1) x D x k, ``eigenvalues``
    (K+1) x k, ``remainders`` K+1. Each row gathers its own mean and basis (no loop over rows), so a
    row costs what one low-rank Gaussian costs, 2 x D x k + D MACs, whatever K is."""

    def __init__(
        self,
        means: torch.Tensor,
        bases: torch.Tensor,
        eigenvalues: torch.Tensor,
        remainders: torch.Tensor,
        alphas_cumprod: torch.Tensor,
        sample_shape: tuple[int, int, int],
        prediction_type: str = "epsilon",
    ):
        super().__init__()
        d = int(np.prod(sample_shape))
        n = means.shape[0] if means.dim() == 2 else 0
        k = bases.shape[-1] if bases.dim() == 3 else 0
        if not (
            n >= 2 and means.shape == (n, d) and bases.shape == (n, d, k) and 1 <= k < d
            and eigenvalues.shape == (n, k) and remainders.shape == (n,)
        ):  # fmt: skip
            raise StepadaptError(
                f"class Gaussian tensors do not fit {sample_shape} images of 1+ classes and a null class: "
                f"means {tuple(means.shape)}, bases {tuple(bases.shape)}, eigenvalues "
                f"{tuple(eigenvalues.shape)}, remainders {tuple(remainders.shape)}"
            )
        values = (means, bases, eigenvalues, remainders, alphas_cumprod)
        _check_values((*CLASS_TENSORS, "alphas_cumprod"), values)
        for name, v in zip((*CLASS_TENSORS, "alphas_cumprod"), values, strict=True):
            self.register_buffer(name, v.float().contiguous())
        self.sample_shape = tuple(int(v) for v in sample_shape)
        self.prediction_type = prediction_type

    @property
    def classes(self) -> int:
        """The labels 0..classes-1; ``classes`` itself is the null label."""
        return int(self.means.shape[0]) - 1

    @property
    def conditioning(self) -> Conditioning:
        return Conditioning(classes=self.classes)

    @property
    def rank(self) -> int:
        return int(self.bases.shape[-1])

    @property
    def macs(self) -> int:
        """Per row: one class's low-rank Gaussian (the gather moves memory, it multiplies nothing)."""
        return macs_for(self.sample_shape, self.rank)

    @property
    def explained(self) -> float:
        """The least share of its training variance any class's (or the pooled) Gaussian keeps."""
        kept = self.eigenvalues.double().sum(1)
        total = kept + self.remainders.double() * (self.bases.shape[1] - self.rank)
        return float(torch.where(total > 0, kept / total.clamp(min=1e-300), torch.ones_like(total)).min())

    @property
    def params(self) -> int:
        return sum(v.numel() for v in self.buffers())

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        if tuple(sample.shape[1:]) != self.sample_shape:
            raise StepadaptError(
                f"class Gaussian denoiser fits {self.sample_shape} images, got {tuple(sample.shape[1:])}"
            )
        if class_labels is None:
            raise StepadaptError(
                f"the class Gaussian denoiser needs class_labels "
                f"(0..{self.classes - 1}, {self.classes} for none)"
            )
        labels = class_labels.reshape(-1).long()
        if not torch.jit.is_tracing():  # an exported graph gathers; out-of-range indices fail there
            self._check_labels(labels, sample.shape[0])
        flat = sample.reshape(sample.shape[0], -1).to(self.bases.dtype)
        ab = _alpha_bar(self.alphas_cumprod, timestep).unsqueeze(1)
        a, s2 = ab.sqrt(), 1.0 - ab
        mean = self.means[labels]  # B x D
        rest = self.remainders[labels].unsqueeze(1)  # B x 1
        x0 = mean + _low_rank_x0(flat - a * mean, self.bases[labels], self.eigenvalues[labels], rest, a, s2)
        eps = (flat - a * x0) / s2.sqrt()
        return model_target(self.prediction_type, x0, eps, ab).reshape(sample.shape).to(sample.dtype)

    def _check_labels(self, labels: torch.Tensor, rows: int) -> None:
        if labels.shape[0] != rows:
            raise StepadaptError(f"{labels.shape[0]} class labels for {rows} images")
        bad = labels[(labels < 0) | (labels > self.classes)]
        if len(bad):
            raise StepadaptError(
                f"class label {int(bad[0])} is out of range: this Gaussian knows 0..{self.classes - 1} "
                f"(and {self.classes} for no label)"
            )

    def gaussian(self, label: int) -> GaussianDenoiser:
        """One label's Gaussian on its own (``classes``: the pooled one of the null class)."""
        if not 0 <= label <= self.classes:
            raise StepadaptError(f"class label {label} is out of range 0..{self.classes}")
        return GaussianDenoiser(
            self.means[label], self.bases[label], self.eigenvalues[label], self.alphas_cumprod,
            self.sample_shape, self.prediction_type, remainder=self.remainders[label : label + 1],
        ).eval()  # fmt: skip

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach().contiguous().cpu() for name in CLASS_TENSORS}

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, torch.Tensor],
        sample_shape: tuple[int, int, int],
        scheduler_cfg: dict,
        classes: int | None = None,
    ) -> ClassGaussianDenoiser:
        """Inverse of :meth:`tensors`; ``classes``: what the model it stands in for knows (a fit of
        another class count is refused, so a label never reaches the wrong Gaussian)."""
        _check_keys(tensors, CLASS_TENSORS, ())
        sched = make_scheduler("ddpm", scheduler_cfg)
        model = cls(
            *(tensors[k].float() for k in CLASS_TENSORS), sched.alphas_cumprod, sample_shape=sample_shape,
            prediction_type=sched.config.prediction_type,
        ).eval()  # fmt: skip
        if classes is not None and model.classes != classes:
            raise StepadaptError(
                f"the class Gaussian knows {model.classes} classes, the model it serves {classes}"
            )
        return model


@dataclass(frozen=True)
class GaussianJump:
    """The analytic jump (``sampling.Jump``): ``gaussian``'s exact flow, from the top of the schedule
    down to ``cut``, the lowest timestep the Gaussian expert owns in its bundle."""

    gaussian: GaussianDenoiser
    cut: int

    def transport(self, x: torch.Tensor, alpha_bar_from: float, alpha_bar_to: float) -> torch.Tensor:
        return self.gaussian.transport(x, alpha_bar_from, alpha_bar_to)


def macs_for(sample_shape: tuple[int, ...], rank: int | None = None) -> int:
    """What a Gaussian expert for images of this shape costs per image: two D x D products for D
    pixels (the full form; its elementwise steps are negligible beside them), or two D x k products
    and the isotropic part's D (the low-rank form of rank k)."""
    d = int(np.prod(sample_shape))
    return 2 * d * d if rank is None else 2 * d * int(rank) + d


def max_rank(sample_shape: tuple[int, ...], base_macs: int, limit: float = MAX_RATIO) -> int:
    """The highest rank whose low-rank Gaussian costs at most ``limit`` x the base's MACs (0: none)."""
    d = int(np.prod(sample_shape))
    return max(min(int((limit * base_macs - d) // (2 * d)), d - 1), 0)


def affordable(
    sample_shape: tuple[int, ...], base_macs: int, limit: float = MAX_RATIO, images: int | None = None
) -> str | None:
    """None if a *full-covariance* Gaussian expert is worth fitting for this base (and ``images``, where
    given, are enough to make its covariance non-singular), else why not (one line)."""
    d = int(np.prod(sample_shape))
    ratio = macs_for(sample_shape) / base_macs
    if ratio > limit:
        return (
            f"a Gaussian expert for {d}-pixel images costs 2 x {d}^2 MACs = {ratio:.2f} x the base's "
            f"(more than {limit}): it pays only for small images"
        )
    if images is not None and images < d:
        return (
            f"a full-covariance Gaussian of {d}-pixel images needs at least {d} training images, got {images}"
        )
    return None


def low_rank_affordable(
    sample_shape: tuple[int, ...], base_macs: int, images: int, limit: float = MAX_RATIO
) -> str | None:
    """None if a low-rank Gaussian expert (rank >= 1) fits under ``limit`` x the base's MACs and
    ``images`` (the fewest any one of its Gaussians is fitted to) can fit one, else why not."""
    d = int(np.prod(sample_shape))
    if max_rank(sample_shape, base_macs, limit) < 1:
        return (
            f"even a rank-1 Gaussian expert for {d}-pixel images costs "
            f"{macs_for(sample_shape, 1) / base_macs:.2f} x the base's MACs (more than {limit})"
        )
    if images < 2:
        return f"a low-rank Gaussian needs at least 2 training images per Gaussian, got {images}"
    return None


def fit_gaussian(data: torch.Tensor, scheduler_cfg: dict) -> GaussianDenoiser:
    """Mean and full covariance of ``data`` (N x C x H x W in the model's range), fitted in float64
    and kept in float32. Needs at least as many images as pixels, or the covariance is singular and
    the denoiser reproduces its training images instead of the distribution (the low-rank form,
    :func:`fit_low_rank`, needs far fewer)."""
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


@dataclass(frozen=True)
class Spectrum:
    """The top of one image set's covariance spectrum: ``eigenvalues`` descending with their
    ``basis`` columns, ``total`` the covariance's trace (so the variance past any rank is known
    without the rest of the spectrum), ``count`` the images."""

    mean: torch.Tensor
    eigenvalues: torch.Tensor
    basis: torch.Tensor
    total: float
    count: int

    @property
    def available(self) -> int:
        """The highest rank it can give: the directions found, fewer than the pixels and the images."""
        return min(len(self.eigenvalues), self.basis.shape[0] - 1, self.count - 1)

    def rank_for(self, explained: float) -> int:
        """The fewest directions that keep ``explained`` of the variance (within :attr:`available`)."""
        if self.total <= 0:
            return 1
        share = torch.cumsum(self.eigenvalues, 0) / self.total
        return int(
            min(
                int(torch.searchsorted(share, torch.tensor(explained, dtype=share.dtype))) + 1, self.available
            )
        )

    def explained(self, rank: int) -> float:
        return float(self.eigenvalues[:rank].sum() / self.total) if self.total > 0 else 1.0

    def low_rank(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, basis D x k, eigenvalues k, remainder) of the rank-``rank`` model."""
        d = self.basis.shape[0]
        rest = max(self.total - float(self.eigenvalues[:rank].sum()), 0.0) / (d - rank)
        return (
            self.mean,
            self.basis[:, :rank],
            self.eigenvalues[:rank],
            torch.tensor([rest], dtype=torch.float64),
        )


def spectrum(flat: torch.Tensor, rank_cap: int | None = None, seed: int = 0) -> Spectrum:
    """The covariance spectrum of ``flat`` (N x D): exact from the D x D covariance, or from the
    N x N Gram matrix where the images are fewer than the pixels (a 64 x 64 RGB folder of a few
    hundred images); a randomized SVD (Halko et al.) of the top ``rank_cap`` directions only where
    both are large. Float64 throughout the exact paths."""
    n, d = flat.shape
    if n < 2:
        raise StepadaptError(f"a Gaussian needs at least 2 training images, got {n}")
    mean = flat.double().mean(0)
    centred = flat.double() - mean
    total = float(centred.pow(2).sum() / (n - 1))
    if d <= EXACT_LIMIT:
        lam, basis = torch.linalg.eigh(torch.cov(centred.T))
        lam, basis = lam.flip(0).clamp(min=0.0), basis.flip(1)
    elif n <= EXACT_LIMIT:
        lam, v = torch.linalg.eigh(centred @ centred.T / (n - 1))
        lam, v = lam.flip(0), v.flip(1)
        keep = lam > lam[0] * 1e-12
        lam, v = lam[keep], v[:, keep]
        basis = centred.T @ v / (lam * (n - 1)).sqrt()  # the covariance's eigenvectors, unit length
    else:
        q = min(rank_cap or RANDOMIZED_RANK, RANDOMIZED_RANK, n - 1, d - 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(centred.float(), q=min(q + 10, n, d), niter=4)
        lam, basis = (s.double() ** 2 / (n - 1))[:q], v.double()[:, :q]
    return Spectrum(mean, lam, basis, total, n)


def fit_low_rank(
    data: torch.Tensor,
    scheduler_cfg: dict,
    rank: int | None = None,
    explained: float = DEFAULT_EXPLAINED,
    rank_cap: int | None = None,
) -> GaussianDenoiser:
    """The low-rank Gaussian of ``data``: ``rank`` directions, or where None the fewest that keep
    ``explained`` of the variance; never more than ``rank_cap`` (what the MACs allow) nor more than
    the images can show."""
    flat = data.reshape(len(data), -1)
    sp = spectrum(flat, rank_cap if rank is None else rank)
    k = _rank(rank, [sp], explained, rank_cap, flat.shape[1])
    sched = make_scheduler("ddpm", scheduler_cfg)
    mean, basis, lam, rest = sp.low_rank(k)
    return GaussianDenoiser(
        mean, basis, lam, sched.alphas_cumprod, sample_shape=tuple(data.shape[1:]),
        prediction_type=sched.config.prediction_type, remainder=rest,
    ).eval()  # fmt: skip


def low_rank_of(
    full: GaussianDenoiser, explained: float = DEFAULT_EXPLAINED, rank_cap: int | None = None
) -> GaussianDenoiser:
    """``full``'s low-rank form at the rank that keeps ``explained`` of its variance (at most
    ``rank_cap``): the same as :func:`fit_low_rank` on its images, from the eigenpairs at hand."""
    d = full.basis.shape[0]
    lam = full.eigenvalues.double().sort(descending=True).values
    sp = Spectrum(full.mean, lam, full.basis, float(lam.sum()), count=d + 1)
    return full.truncated(_rank(None, [sp], explained, rank_cap, d))


def _rank(rank: int | None, spectra: list[Spectrum], explained: float, cap: int | None, d: int) -> int:
    """One rank for all ``spectra``: the given one, else the highest any needs to keep ``explained``;
    at most ``cap`` and what the smallest image set can show. A given rank beyond that is an error."""
    can = min(min(sp.available for sp in spectra), cap if cap is not None else d - 1)
    if rank is not None:
        if not 1 <= rank <= can:
            raise StepadaptError(
                f"rank {rank} is out of reach: {d}-pixel images, "
                f"{min(sp.count for sp in spectra)} images in the smallest set and the MAC limit "
                f"allow 1..{can}"
            )
        return int(rank)
    if can < 1:
        raise StepadaptError(
            f"no low-rank Gaussian fits: {min(sp.count for sp in spectra)} images in the smallest set"
        )
    return max(1, min(max(sp.rank_for(explained) for sp in spectra), can))


def fit_class_gaussian(
    data: torch.Tensor,
    labels: torch.Tensor,
    classes: int,
    scheduler_cfg: dict,
    rank: int | None = None,
    explained: float = DEFAULT_EXPLAINED,
    rank_cap: int | None = None,
) -> ClassGaussianDenoiser:
    """One low-rank Gaussian per class of ``labels`` (0..classes-1) and one of all images pooled for
    the null class, all of one rank (a row costs the same whatever its label): ``rank``, or the
    highest any of them needs to keep ``explained`` of its own variance."""
    labels = torch.as_tensor(labels).reshape(-1).long()
    if labels.shape != (len(data),):
        raise StepadaptError(f"{labels.shape[0]} labels for {len(data)} images")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < classes:
        raise StepadaptError(
            f"labels span {int(labels.min())}..{int(labels.max())}; the model knows 0..{classes - 1}"
        )
    counts = torch.bincount(labels, minlength=classes)
    if int(counts.min()) < 2:
        c = int(torch.argmin(counts))
        raise StepadaptError(
            f"class {c} has {int(counts[c])} training images; a class Gaussian needs at least 2"
        )
    flat = data.reshape(len(data), -1)
    cap = rank_cap if rank is None else rank
    spectra = [spectrum(flat[labels == c], cap) for c in range(classes)] + [spectrum(flat, cap)]
    k = _rank(rank, spectra, explained, rank_cap, flat.shape[1])
    parts = [sp.low_rank(k) for sp in spectra]
    sched = make_scheduler("ddpm", scheduler_cfg)
    return ClassGaussianDenoiser(
        *(torch.stack([p[i] for p in parts]) for i in range(3)), torch.cat([p[3] for p in parts]),
        sched.alphas_cumprod, sample_shape=tuple(data.shape[1:]),
        prediction_type=sched.config.prediction_type,
    ).eval()  # fmt: skip


@torch.no_grad()
def eps_errors(
    denoisers: dict[str, torch.nn.Module],
    scheduler_cfg: dict,
    held_out: torch.Tensor,
    t: int,
    labels: torch.Tensor | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Each denoiser's mean squared error against the true target at timestep ``t``, on the same
    ``held_out`` images and noise (and ``labels``, for those that take them): a paired comparison."""
    from stepadapt.conditioning import labels_cond
    from stepadapt.sampling import module_denoiser

    sched = make_scheduler("ddpm", scheduler_cfg)
    g = torch.Generator().manual_seed(seed)
    held_out = held_out.cpu()
    noise, tt = torch.randn(held_out.shape, generator=g), torch.full((len(held_out),), int(t))
    x_t = sched.add_noise(held_out, noise, tt)
    target = noised_target(sched, held_out, noise, tt)
    cond = labels_cond(labels) if labels is not None else {}
    return {
        name: float(((module_denoiser(den)(x_t, tt, cond) - target) ** 2).mean())
        for name, den in denoisers.items()
    }


@torch.no_grad()
def gaussian_cutoff(
    base: torch.nn.Module,
    gaussian: torch.nn.Module,
    scheduler_cfg: dict,
    held_out: torch.Tensor,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    grid: int = CUTOFF_GRID,
    seed: int = 0,
    labels: torch.Tensor | None = None,
) -> tuple[int, dict[int, tuple[float, float]]]:
    """The lowest t* on the grid from which on the Gaussian's eps error (against the truth, on
    ``held_out`` images) stays within ``tolerance`` x the base's; T when it never does. The lowest
    grid step stays with the U-Net even when the base is worse everywhere (an untrained base).
    ``labels``: the held-out images' classes, which a class-conditional base and class Gaussian both
    get (the conditional branch is judged).

    Returns t* and, per grid point, (base error, Gaussian error): what the plot and the log show.
    """
    from stepadapt.conditioning import labels_cond
    from stepadapt.sampling import module_denoiser

    sched = make_scheduler("ddpm", scheduler_cfg)
    T = int(sched.config.num_train_timesteps)
    g = torch.Generator().manual_seed(seed)
    held_out = held_out.cpu()  # the Gaussian runs on the CPU; the base where it lives, answering here
    on_base, on_gauss = module_denoiser(base), module_denoiser(gaussian)
    cond = labels_cond(labels) if labels is not None else {}
    errors: dict[int, tuple[float, float]] = {}
    cut = T
    for t in range(T - 1 - (T - 1) % grid, -1, -grid):  # from the noisy end down
        noise, tt = torch.randn(held_out.shape, generator=g), torch.full((len(held_out),), t)
        x_t = sched.add_noise(held_out, noise, tt)
        target = noised_target(sched, held_out, noise, tt)
        e_base = float(((on_base(x_t, tt, cond) - target) ** 2).mean())
        e_gauss = float(((on_gauss(x_t, tt, cond) - target) ** 2).mean())
        errors[t] = (e_base, e_gauss)
        if e_gauss > tolerance * e_base or t < grid:
            break
        cut = t
    return cut, errors
