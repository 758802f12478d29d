"""The closed-form Gaussian denoiser: Bayes-optimal on Gaussian data, a denoiser like any other."""

import pytest
import torch

from stepadapt import StepadaptError
from stepadapt.gaussian import GaussianDenoiser, fit_gaussian, gaussian_cutoff
from stepadapt.sampling import sample_images
from stepadapt.schedule import DEFAULT_SCHEDULER, make_scheduler


def _gaussian_data(n: int = 4000, seed: int = 0) -> torch.Tensor:
    mix = torch.randn(16, 16, generator=torch.Generator().manual_seed(123), dtype=torch.float64) * 0.3
    g = torch.Generator().manual_seed(seed)  # the same distribution, other samples
    return (torch.randn(n, 16, generator=g, dtype=torch.float64) @ mix + 0.2).reshape(n, 1, 4, 4).float()


def _scaled(den: GaussianDenoiser, k: float) -> GaussianDenoiser:
    """The same denoiser, told the data vary k times as much: a mis-specified prior."""
    t = den.tensors()
    return GaussianDenoiser.from_tensors(
        {**t, "eigenvalues": t["eigenvalues"] * k}, den.sample_shape, DEFAULT_SCHEDULER
    )


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
        other = _scaled(den, k)
        assert _eps_mse(other, test, t) > best
    trivial = _eps_mse(lambda x, tt: x / (1 - make_scheduler("ddpm", DEFAULT_SCHEDULER).alphas_cumprod[tt])
                       .sqrt().view(-1, 1, 1, 1), test, t)  # fmt: skip
    assert best < trivial


def test_it_samples_through_the_one_sampling_loop_and_checks_shapes():
    den = fit_gaussian(_gaussian_data(), DEFAULT_SCHEDULER)
    images = sample_images(den, DEFAULT_SCHEDULER, (1, 4, 4), 8, steps=10)
    assert images.shape == (8, 4, 4, 1) and images.std() > 0
    assert den.macs == 2 * 16 * 16
    with pytest.raises(StepadaptError, match=r"fits \(1, 4, 4\) images, got \(1, 8, 8\)"):
        den(torch.zeros(2, 1, 8, 8), torch.tensor([5, 5]))
    with pytest.raises(StepadaptError, match="needs at least 16 training images, got 15"):
        fit_gaussian(torch.zeros(15, 1, 4, 4), DEFAULT_SCHEDULER)  # fewer images than pixels


def test_tensors_round_trip_and_bad_tensors_are_refused():
    den = fit_gaussian(_gaussian_data(), DEFAULT_SCHEDULER)
    assert sorted(den.tensors()) == ["basis", "eigenvalues", "mean"]  # the schedule is the manifest's
    again = GaussianDenoiser.from_tensors(den.tensors(), (1, 4, 4), DEFAULT_SCHEDULER)
    x, t = torch.randn(5, 1, 4, 4), torch.tensor([900, 10, 500, 999, 0])
    assert torch.equal(den(x, t), again(x, t))
    bad = den.tensors()
    bad["mean"] = bad["mean"].clone()
    bad["mean"][3] = float("nan")
    with pytest.raises(StepadaptError, match="mean has NaN"):
        GaussianDenoiser.from_tensors(bad, (1, 4, 4), DEFAULT_SCHEDULER)
    with pytest.raises(StepadaptError, match="do not fit"):
        GaussianDenoiser.from_tensors(den.tensors(), (1, 8, 8), DEFAULT_SCHEDULER)
    with pytest.raises(StepadaptError, match="lack basis"):
        GaussianDenoiser.from_tensors({"mean": bad["mean"]}, (1, 4, 4), DEFAULT_SCHEDULER)


class _AsUNet(torch.nn.Module):
    """A denoiser called the way a diffusers U-Net is (``.sample``), to stand in for the base."""

    def __init__(self, den):
        super().__init__()
        self.den = den

    def forward(self, x, t):
        return type("Out", (), {"sample": self.den(x, t)})()


def test_cutoff_is_where_the_gaussian_comes_within_tolerance_of_the_base():
    """The exact posterior mean as 'base' against a prior 4 x too wide: far worse where the data
    matter (low t), alike where noise dominates (high t). The cut-off must sit between, with every
    grid point above it within the tolerance and the one below it not."""
    exact = fit_gaussian(_gaussian_data(), DEFAULT_SCHEDULER)
    wide = _scaled(exact, 4.0)
    held_out = _gaussian_data(512, seed=2)
    cut, errors = gaussian_cutoff(_AsUNet(exact), wide, DEFAULT_SCHEDULER, held_out, tolerance=1.1, grid=50)
    assert 0 < cut < 1000
    assert all(g <= 1.1 * b for t, (b, g) in errors.items() if t >= cut)
    below = max(t for t in errors if t < cut)
    assert errors[below][1] > 1.1 * errors[below][0]
    never, _ = gaussian_cutoff(_AsUNet(exact), wide, DEFAULT_SCHEDULER, held_out, tolerance=0.5, grid=50)
    assert never == 1000


@pytest.mark.parametrize("layout", ["subfolders", "hash"])
def test_the_gaussian_expert_is_fitted_to_the_training_split_of_a_folder_only(tmp_path, layout):
    """Held-out images (here all white, so they would move the mean) never reach the fit: the
    cut-off judges the Gaussian on them, which means nothing if it was fitted to them."""
    import numpy as np
    from PIL import Image

    from stepadapt.analyze import fit_gaussian_for
    from stepadapt.data import fingerprint, folder_split, load_dataset
    from stepadapt.models import build_unet

    rng = np.random.default_rng(0)
    train_dir = tmp_path / "d" / "train" if layout == "subfolders" else tmp_path / "d"
    train_dir.mkdir(parents=True)
    for i in range(90):
        Image.fromarray(rng.integers(0, 120, (8, 8), dtype=np.uint8)).save(train_dir / f"{i:03d}.png")
    if layout == "subfolders":
        (tmp_path / "d" / "test").mkdir()
        for i in range(30):
            Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(tmp_path / "d" / "test" / f"{i}.png")
    else:  # the hash split's held-out files turned white
        for f in folder_split(tmp_path / "d")[1]:
            Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(f)
    data = str(tmp_path / "d")
    train, test = load_dataset(data, "train", 8, 1), load_dataset(data, "test", 8, 1)
    assert len(train) >= 64 and len(test) > 0 and (test == 1).all() and (train < 0).all()
    den, data_sha256 = fit_gaussian_for("auto", build_unet("tiny", sample_size=8), DEFAULT_SCHEDULER, data)
    assert den is not None and data_sha256 == fingerprint(train)
    assert torch.allclose(den.tensors()["mean"], train.reshape(len(train), -1).mean(0), atol=1e-6)
