"""The closed-form Gaussian denoiser: Bayes-optimal on Gaussian data, a denoiser like any other."""

import pytest
import torch

from stepadapt import StepadaptError
from stepadapt.gaussian import GaussianDenoiser, fit_gaussian, fit_low_rank, gaussian_cutoff
from stepadapt.sampling import module_denoiser, sample_images
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
    images = sample_images(module_denoiser(den), DEFAULT_SCHEDULER, (1, 4, 4), 8, steps=10)
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
    fit = fit_gaussian_for("auto", build_unet("tiny", sample_size=8), DEFAULT_SCHEDULER, data)
    den = fit.gaussian
    assert den is not None and fit.data_sha256 == fingerprint(train)
    assert fit.full is not None and den.low_rank  # both forms, for analyze to measure at the cut-off
    assert torch.allclose(den.tensors()["mean"], train.reshape(len(train), -1).mean(0), atol=1e-6)


# --- the low-rank form -----------------------------------------------------------------------------


def _low_rank_model(d: int = 16, k: int = 3, seed: int = 0):
    """A Gaussian that *is* low-rank plus isotropic: mean, orthonormal basis D x k, k variances and
    the variance of every other direction; and its covariance written out as a D x D matrix."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    lam = torch.rand(k, generator=g, dtype=torch.float64) * 2 + 0.5
    rest, mean = 0.05, torch.randn(d, generator=g, dtype=torch.float64) * 0.1
    cov = basis @ torch.diag(lam) @ basis.T + rest * (torch.eye(d, dtype=torch.float64) - basis @ basis.T)
    return mean, basis, lam, rest, cov


def _posterior_eps(mean, cov, x_t, t):
    """eps of E[x0 | x_t] = mu + a S (a^2 S + s^2 I)^-1 (x_t - a mu), solved as a D x D system."""
    ab = make_scheduler("ddpm", DEFAULT_SCHEDULER).alphas_cumprod.double()[t]
    a, s2 = ab.sqrt(), 1 - ab
    eye = torch.eye(len(mean), dtype=torch.float64)
    rows = []
    for xi, ai, si in zip(x_t.double().reshape(len(x_t), -1), a, s2, strict=True):
        x0 = mean + ai * cov @ torch.linalg.solve(ai * ai * cov + si * eye, xi - ai * mean)
        rows.append((xi - ai * x0) / si.sqrt())
    return torch.stack(rows)


def test_the_low_rank_form_is_the_exact_posterior_mean_of_a_low_rank_gaussian():
    """Built from the model's own parameters, the low-rank denoiser (2 D k + D MACs) answers what
    the D x D closed form solved directly answers, at every noise level and between timesteps."""
    from stepadapt.gaussian import macs_for

    mean, basis, lam, rest, cov = _low_rank_model()
    den = GaussianDenoiser(
        mean, basis, lam, make_scheduler("ddpm", DEFAULT_SCHEDULER).alphas_cumprod, (1, 4, 4),
        remainder=torch.tensor([rest]),
    )  # fmt: skip
    x = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1, 50, 300, 600, 900, 999])
    assert torch.allclose(den(x, t).reshape(6, -1).double(), _posterior_eps(mean, cov, x, t), atol=2e-4)
    assert den.low_rank and den.rank == 3 and den.macs == macs_for((1, 4, 4), 3) == 2 * 16 * 3 + 16
    assert den.params == 16 + 16 * 3 + 3 + 1 + 1000  # the schedule it holds is counted too
    # fitted to samples of that very Gaussian at its true rank, the fit answers nearly the same
    g = torch.Generator().manual_seed(2)
    z = torch.randn(20000, 16, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T + mean
    fitted = fit_low_rank(z.reshape(-1, 1, 4, 4).float(), DEFAULT_SCHEDULER, rank=3)
    assert fitted.rank == 3 and abs(float(fitted.remainder) - rest) < 0.01
    assert torch.allclose(fitted(x, t), den(x, t), atol=0.05)


def test_the_low_rank_flow_map_is_the_full_forms_on_the_same_covariance():
    """The analytic jump stays exact: the low-rank transport equals the full form's on the same
    covariance written out with all D eigenpairs (the rest at the isotropic variance)."""
    mean, basis, lam, rest, cov = _low_rank_model()
    ac = make_scheduler("ddpm", DEFAULT_SCHEDULER).alphas_cumprod
    low = GaussianDenoiser(mean, basis, lam, ac, (1, 4, 4), remainder=torch.tensor([rest]))
    full_lam, full_basis = torch.linalg.eigh(cov)
    full = GaussianDenoiser(mean, full_basis, full_lam, ac, (1, 4, 4))
    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(low.transport(x, 0.01, 0.3), full.transport(x, 0.01, 0.3), atol=1e-5)
    t = torch.tensor([5, 200, 500, 800, 999])
    assert torch.allclose(low(x, t), full(x, t), atol=1e-4)


def test_truncating_the_full_fit_is_fitting_the_low_rank_form_and_full_rank_is_the_full_form():
    data = _gaussian_data()
    full = fit_gaussian(data, DEFAULT_SCHEDULER)
    x, t = torch.randn(4, 1, 4, 4), torch.tensor([10, 400, 700, 990])
    assert torch.allclose(
        full.truncated(5)(x, t), fit_low_rank(data, DEFAULT_SCHEDULER, rank=5)(x, t), atol=1e-5
    )
    assert torch.allclose(full.truncated(15)(x, t), full(x, t), atol=1e-3)  # one direction left over
    with pytest.raises(StepadaptError, match=r"rank in \[1, 15\]"):
        full.truncated(16)


def test_the_rank_keeps_the_explained_variance_and_is_capped_by_macs_and_images():
    """Rank from explained variance (the default), an explicit rank, a MAC cap; a rank the images
    cannot show is a one-line error."""
    from stepadapt.gaussian import spectrum

    data = _gaussian_data()
    sp = spectrum(data.reshape(len(data), -1))
    k = fit_low_rank(data, DEFAULT_SCHEDULER, explained=0.9).rank
    assert sp.explained(k) >= 0.9 > sp.explained(k - 1)
    assert fit_low_rank(data, DEFAULT_SCHEDULER, explained=0.9, rank_cap=2).rank == 2
    assert fit_low_rank(data, DEFAULT_SCHEDULER, rank=7).rank == 7
    few = data[:5]  # 5 images show at most 4 directions; the full form needs 16
    assert fit_low_rank(few, DEFAULT_SCHEDULER, explained=0.999).rank == 4
    with pytest.raises(StepadaptError, match="^rank 6 is out of reach") as e:
        fit_low_rank(few, DEFAULT_SCHEDULER, rank=6)
    assert "\n" not in str(e.value)


def test_a_spectrum_from_the_gram_matrix_or_a_randomized_svd_is_the_covariances(monkeypatch):
    """Images fewer than pixels (64 x 64 RGB folders): the N x N Gram matrix gives the same top
    eigenpairs exactly; with both many, a randomized SVD gives them closely."""
    import stepadapt.gaussian as gauss

    g = torch.Generator().manual_seed(4)
    flat = torch.randn(300, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.1 * torch.randn(
        300, 64, generator=g
    )
    exact = gauss.spectrum(flat)
    monkeypatch.setattr(gauss, "EXACT_LIMIT", 32)  # 64 pixels > 32: N x N (300 > 32: randomized)
    rand = gauss.spectrum(flat, rank_cap=8)
    monkeypatch.setattr(gauss, "EXACT_LIMIT", 300)
    gram = gauss.spectrum(flat[:300])
    assert gram.total == pytest.approx(exact.total) and rand.total == pytest.approx(exact.total)
    assert torch.allclose(gram.eigenvalues[:8], exact.eigenvalues[:8], rtol=1e-8)
    assert torch.allclose(
        (gram.basis[:, :8].T @ exact.basis[:, :8]).abs(), torch.eye(8, dtype=torch.float64), atol=1e-6
    )
    assert torch.allclose(rand.eigenvalues[:8], exact.eigenvalues[:8], rtol=1e-3)


def test_low_rank_tensors_round_trip_and_the_full_form_still_loads():
    den = fit_low_rank(_gaussian_data(), DEFAULT_SCHEDULER, rank=4)
    assert sorted(den.tensors()) == ["basis", "eigenvalues", "mean", "remainder"]
    again = GaussianDenoiser.from_tensors(den.tensors(), (1, 4, 4), DEFAULT_SCHEDULER)
    x, t = torch.randn(5, 1, 4, 4), torch.tensor([900, 10, 500, 999, 0])
    assert again.low_rank and torch.equal(den(x, t), again(x, t))
    assert torch.equal(den.transport(x, 0.01, 0.2), again.transport(x, 0.01, 0.2))
    full = fit_gaussian(_gaussian_data(), DEFAULT_SCHEDULER)  # no remainder: the full form, as shipped
    assert not GaussianDenoiser.from_tensors(full.tensors(), (1, 4, 4), DEFAULT_SCHEDULER).low_rank
    bad = {**den.tensors(), "remainder": torch.tensor([-1.0])}
    with pytest.raises(StepadaptError, match="remainder has negative variances"):
        GaussianDenoiser.from_tensors(bad, (1, 4, 4), DEFAULT_SCHEDULER)
    with pytest.raises(StepadaptError, match="do not fit"):  # a D x D basis with a remainder
        GaussianDenoiser.from_tensors(
            {**full.tensors(), "remainder": torch.ones(1)}, (1, 4, 4), DEFAULT_SCHEDULER
        )
    with pytest.raises(StepadaptError, match="unexpected tensors bases"):
        GaussianDenoiser.from_tensors({**den.tensors(), "bases": torch.ones(1)}, (1, 4, 4), DEFAULT_SCHEDULER)


def test_the_low_rank_form_is_affordable_where_the_full_one_is_not():
    """64 x 64 RGB (12288 pixels) under the tiny config at that size (4 x 95 M MACs): the full form
    costs 2 x D^2 = 0.8 x the base and 500 images cannot fit it; a low-rank one fits both."""
    from stepadapt.gaussian import affordable, low_rank_affordable, macs_for, max_rank

    shape, base = (3, 64, 64), 4 * 95_222_352
    assert "0.25" in affordable(shape, base)
    assert low_rank_affordable(shape, base, images=500) is None
    k = max_rank(shape, base)
    assert macs_for(shape, k) <= 0.25 * base < macs_for(shape, k + 1)
    assert "at least 1024 training images" in affordable((1, 32, 32), 95_000_000, images=500)
    assert "rank-1" in low_rank_affordable(shape, 50_000, images=500)
    assert "at least 2" in low_rank_affordable((1, 32, 32), 95_000_000, images=1)
