import numpy as np
import pytest
import torch

from stepadapt import StepadaptError
from stepadapt.sampling import (
    Router,
    Trajectory,
    initial_noise,
    make_grid,
    module_denoiser,
    sample,
    sample_images,
    sample_together,
    save_grid,
    to_uint8,
    validate_request,
)
from stepadapt.schedule import DEFAULT_SCHEDULER, make_scheduler, snr_db
from stepadapt.solvers import NAMES, Solver


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_sampling_shapes_and_determinism(tiny, kind):
    den = module_denoiser(tiny)

    def run(seed):
        x_t, g = initial_noise(3, (1, 32, 32), seed)
        return sample(den, Trajectory(kind, DEFAULT_SCHEDULER, x_t, 5, generator=g))

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (3, 1, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.abs().max() <= 1.0 + 1e-6


def test_callback_sees_every_step(tiny):
    seen = []
    x_t, g = initial_noise(1, (1, 32, 32), 0)
    sample(module_denoiser(tiny), Trajectory("ddim", {}, x_t, 7), callback=lambda i, t, x: seen.append(t))
    assert len(seen) == 7 and seen == sorted(seen, reverse=True) and seen[0] > 800


def test_nan_denoiser_is_reported():
    x_t, _ = initial_noise(1, (1, 8, 8), 0)
    with pytest.raises(StepadaptError, match="NaN"):
        sample(lambda x, t, c: torch.full_like(x, float("nan")), Trajectory("ddim", {}, x_t, 3))


def test_router_dispatches_by_timestep():
    calls = []

    def expert(k):
        def f(x, t, cond):
            calls.append((k, t.tolist()))
            return torch.full_like(x, float(k))

        return f

    r = Router([0, 250, 600, 1000], [expert(0), expert(1), expert(2)])
    assert [r.index(t) for t in (0, 249, 250, 599, 600, 999)] == [0, 0, 1, 1, 2, 2]
    x = torch.zeros(4, 1, 2, 2)
    y = r(x, torch.tensor([10, 300, 700, 20]))
    assert y[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 0.0]
    with pytest.raises(StepadaptError, match="no expert covers"):
        r.index(1000)
    with pytest.raises(StepadaptError, match="increase"):
        Router([0, 500, 500, 1000], [expert(0)] * 3)


def test_request_validation():
    validate_request(50, 4, 64, 1000)
    for args, msg in [((0, 4), "steps"), ((50, 0), "images")]:
        with pytest.raises(StepadaptError, match=msg):
            validate_request(*args, 64, 1000)
    with pytest.raises(StepadaptError, match="eta"):
        Solver.parse(f"ddim:eta={float('nan')}")


def test_router_routes_fractional_timesteps_where_their_whole_part_goes():
    seen = []
    r = Router([0, 500, 1000], [lambda x, t, c: seen.append(0) or x, lambda x, t, c: seen.append(1) or x])
    r(torch.zeros(3, 1, 2, 2), torch.tensor([499.7, 500.0, 999.9]))
    assert seen == [0, 1]
    with pytest.raises(StepadaptError, match="no expert covers"):
        r(torch.zeros(1, 1, 2, 2), torch.tensor([1000.5]))


@pytest.mark.parametrize("name", NAMES)
def test_every_solver_samples_through_a_router_deterministically(name):
    """Whole and fractional timesteps alike reach the expert that owns them."""
    owners = []

    def expert(k):
        def f(x, t, cond):
            owners.append((k, t.tolist()))
            return 0.1 * x

        return f

    router = Router([0, 400, 1000], [expert(0), expert(1)])
    a = sample_images(router, DEFAULT_SCHEDULER, (1, 4, 4), 2, steps=5, sampler=name, seed=1)
    b = sample_images(router, DEFAULT_SCHEDULER, (1, 4, 4), 2, steps=5, sampler=name, seed=1)
    assert np.array_equal(a, b)
    assert all((k == 0) == (max(ts) < 400) for k, ts in owners)
    assert {k for k, _ in owners} == {0, 1}


def test_snr_db_matches_the_linear_schedule():
    s = snr_db(make_scheduler("ddpm", DEFAULT_SCHEDULER))
    assert abs(s[0] - 40.0) < 0.1 and abs(s[999] + 43.9) < 0.1 and abs(s[470] + 9.3) < 0.1


def test_grid_and_uint8(tmp_path):
    x = torch.linspace(-1, 1, 5 * 4 * 4).reshape(5, 1, 4, 4)
    u = to_uint8(x)
    assert u.shape == (5, 4, 4, 1) and u.dtype == np.uint8 and u.min() == 0 and u.max() == 255
    g = make_grid(u, ncol=3, pad=1)
    assert g.shape == (2 * 5 + 1, 3 * 5 + 1, 1)
    assert save_grid(u, tmp_path / "g.png").stat().st_size > 0


def test_swapped_in_gives_one_interval_to_the_other_denoiser():
    import torch

    from stepadapt.sampling import swapped_in

    base = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    other = lambda x, t, c: torch.ones_like(x)  # noqa: E731
    r = swapped_in(base, other, 300, 700, 1000)
    x = torch.zeros(4, 1, 2, 2)
    out = r(x, torch.tensor([0, 299, 300, 699])).flatten(1).mean(1)
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert r(x[:1], torch.tensor([999])).sum() == 0
    assert swapped_in(base, other, 0, 1000, 1000).boundaries == [0, 1000]


TOGETHER = [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0), ("dpm++2m", None), ("dpm++3m:thresholding", None),
            ("unipc", None), ("dpm++2m-sde", None), ("dpm++sde", None), ("euler-a", None), ("heun", None),
            ("pndm", None), ("lms:karras", None)]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("sampler, eta", TOGETHER)
def test_requests_stepped_together_get_the_images_they_get_alone(sampler, eta):
    """Lockstep batching (the server's) must not change anyone's images, noise included."""

    def den(x, t, cond=None):  # per-sample, so batching cannot change the arithmetic
        return 0.3 * x + 1e-3 * t.view(-1, 1, 1, 1).float()

    shape = (3, 7, 7)  # 147 values per image: not a multiple of torch's 16-wide normal sampler
    kw = dict(steps=8, sampler=sampler, eta=eta)
    together = sample_together(den, DEFAULT_SCHEDULER, shape, [(2, 11), (1, 12), (3, 11)], **kw)
    alone = [
        sample_images(den, DEFAULT_SCHEDULER, shape, n, seed=seed, **kw)
        for n, seed in [(2, 11), (1, 12), (3, 11)]
    ]
    assert [a.shape for a in together] == [(2, 7, 7, 3), (1, 7, 7, 3), (3, 7, 7, 3)]
    for a, b in zip(together, alone, strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(together[0], together[1][:1].repeat(2, 0))


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.7), ("ddpm", 0.0), ("unipc", None), ("euler-a", None)])
def test_a_request_stopped_mid_batch_costs_nothing_more_and_the_others_keep_their_images(sampler, eta):
    """What a server does with a cancelled request: its rows leave the batch at the next step."""
    rows_seen = []

    def den(x, t, cond=None):
        rows_seen.append(x.shape[0])
        return 0.3 * x + 1e-3 * t.view(-1, 1, 1, 1).float()

    reqs, kw = [(2, 11), (1, 12), (3, 13)], dict(steps=8, sampler=sampler, eta=eta)
    calls = []

    def stopped():
        calls.append(None)
        return [False, len(calls) > 3, False]  # the second request gives up before step 3

    got = sample_together(den, DEFAULT_SCHEDULER, (1, 4, 4), reqs, stopped=stopped, **kw)
    assert got[1] is None and rows_seen == [6, 6, 6] + [5] * 5
    for (n, seed), images in zip([reqs[0], reqs[2]], [got[0], got[2]], strict=True):
        assert np.array_equal(images, sample_images(den, DEFAULT_SCHEDULER, (1, 4, 4), n, seed=seed, **kw))
    everyone = sample_together(den, DEFAULT_SCHEDULER, (1, 4, 4), reqs, stopped=lambda: [True] * 3, **kw)
    assert everyone == [None, None, None]
