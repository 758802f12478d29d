"""The closed-form Gaussian denoiser: Bayes-optimal on Gaussian data, a denoiser like any other."""

import dataclasses

import pytest
import torch

from stepadapt import StepadaptError
from stepadapt.gaussian import fit_gaussian
from stepadapt.sampling import sample_images
from stepadapt.schedule import DEFAULT_SCHEDULER, make_scheduler


def _gaussian_data(n: int = 4000, seed: int = 0) -> torch.Tensor:
    mix = torch.randn(16, 16, generator=torch.Generator().manual_seed(123), dtype=torch.float64) * 0.3
    g = torch.Generator().manual_seed(seed)  # the same distribution, other samples
    return (torch.randn(n, 16, generator=g, dtype=torch.float64) @ mix + 0.2).reshape(n, 1, 4, 4).float()


def _eps_mse(den, x0: torch.Tensor, t: int) -> float:
    sched = make_scheduler("ddpm", DEFAULT_SCHEDULER)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    tt = torch.full((len(x0),), t)
    return float(((den(sched.add_noise(x0, noise, tt), tt) - noise) ** 2).mean())


@pytest.mark.parametrize("t", [100, 500, 900])
def test_it_is_the_posterior_mean_on_gaussian_data(t):
    """Fitted on one sample, tested on another: scaling its gain either way does worse."""
    den = fit_gaussian(_gaussian_data(seed=0), DEFAULT_SCHEDULER)
    test = _gaussian_data(2000, seed=1)
    best = _eps_mse(den, test, t)
    for k in (0.5, 2.0):
        other = dataclasses.replace(den, eigenvalues=den.eigenvalues * k)
        assert _eps_mse(other, test, t) > best
    trivial = _eps_mse(lambda x, tt: x / (1 - make_scheduler("ddpm", DEFAULT_SCHEDULER).alphas_cumprod[tt])
                       .sqrt().view(-1, 1, 1, 1), test, t)  # fmt: skip
    assert best < trivial


def test_it_samples_through_the_one_sampling_loop_and_checks_shapes():
    den = fit_gaussian(_gaussian_data(), DEFAULT_SCHEDULER)
    images = sample_images(den, DEFAULT_SCHEDULER, (1, 4, 4), 8, steps=10)
    assert images.shape == (8, 4, 4, 1) and images.std() > 0
    assert den.macs == 2 * 16 * 16
    with pytest.raises(StepadaptError, match="16 pixels"):
        den(torch.zeros(2, 1, 8, 8), torch.tensor([5, 5]))
    with pytest.raises(StepadaptError, match="at least 2"):
        fit_gaussian(torch.zeros(1, 1, 4, 4), DEFAULT_SCHEDULER)
