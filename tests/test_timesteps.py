import pytest
import torch

from stepadapt import StepadaptError
from stepadapt.timesteps import (
    TIMESTEP_SAMPLERS,
    AdaptiveSampler,
    CurriculumSampler,
    LossMomentSampler,
    make_sampler,
)

LO, HI = 137, 391


def _drive(sampler, steps: int, gen, reward=lambda t: torch.zeros(())):
    """Feed a sampler ``steps`` updates: losses rise towards low t, probes see ``reward(t)`` as decrease."""
    for _ in range(steps):
        t, _ = sampler.sample(16, gen)
        probe = sampler.probes(gen)
        before = after = None
        if probe is not None:
            before = torch.ones(len(probe))
            after = before - reward(t) + 0.01 * torch.randn(len(probe), generator=gen)
        sampler.update(t, 1.0 - (t - LO) / (HI - LO) + 0.1, before, after)


@pytest.mark.parametrize("name", TIMESTEP_SAMPLERS)
def test_samplers_draw_only_inside_their_interval(name):
    gen = torch.Generator().manual_seed(0)
    options = {"timesteps": range(0, 1000, 40)} if name == "visited" else {}
    s = make_sampler(name, LO, HI, **options)
    for _ in range(3):
        t, w = s.sample(4000, gen)
        assert t.min() >= LO and t.max() < HI
        assert torch.isfinite(w).all() and (w > 0).all()
        p = s.probabilities()
        assert p.shape == (HI - LO,) and abs(float(p.sum()) - 1) < 1e-9
        _drive(s, 150, gen)


def test_unknown_sampler_and_empty_interval_are_refused():
    with pytest.raises(StepadaptError, match="unknown timestep sampler"):
        make_sampler("cosine", 0, 10)
    with pytest.raises(StepadaptError, match="empty"):
        make_sampler("uniform", 5, 5)


def test_loss_moment_follows_second_moment_and_stays_unbiased():
    gen = torch.Generator().manual_seed(1)
    s = LossMomentSampler(LO, HI, history=4, uniform_mix=0.01)
    t_all = torch.arange(LO, HI)
    loss = 0.05 + ((HI - t_all) / (HI - LO)) ** 2  # low t has the larger loss
    while not s.warm():
        t, w = s.sample(64, gen)
        assert torch.equal(w, torch.ones(64))  # uniform until every t has its history
        s.update(t, loss[t - LO])
    p = s.probabilities()
    expected = loss / loss.sum() * 0.99 + 0.01 / (HI - LO)
    assert torch.allclose(p, expected.double(), atol=1e-9)
    # weights 1/(N p_t) make E_p[w L] the uniform mean: the Monte-Carlo estimate agrees,
    # while the draws favour the hard (low-t) end
    t, w = s.sample(200_000, gen)
    assert torch.allclose(w.double(), 1.0 / ((HI - LO) * p[t - LO]), rtol=1e-6)
    assert float((w * loss[t - LO]).mean()) == pytest.approx(float(loss.mean()), rel=0.01)
    assert float(t.double().mean()) < (LO + HI) / 2 - 20


def test_curriculum_starts_easy_and_advances_on_a_plateau():
    gen = torch.Generator().manual_seed(2)
    s = CurriculumSampler(LO, HI, clusters=4, patience=5)
    t, _ = s.sample(1000, gen)
    top = s.range()[0]
    assert t.min() >= top > LO + (HI - LO) // 2  # stage 1: only the noisiest cluster
    for i in range(40):  # an improving loss keeps the stage
        s.update(t[:8], torch.full((8,), 1.0 / (i + 1)))
    assert s.stage == 1
    for _ in range(6):  # a flat loss for `patience` updates moves on
        s.update(t[:8], torch.full((8,), 0.5))
    assert s.stage == 2 and s.range()[0] < top
    for _ in range(100):
        s.update(t[:8], torch.full((8,), 0.5))
    assert s.stage == 4 and s.range() == (LO, HI)  # the last stage is plain uniform
    assert torch.allclose(s.probabilities(), torch.full((HI - LO,), 1.0 / (HI - LO), dtype=torch.float64))


@pytest.mark.parametrize("helpful", ["high", "low"])
def test_adaptive_policy_moves_towards_timesteps_whose_updates_help(helpful):
    """Synthetic case: an update lowers the probe loss by the share of its timesteps in the helpful half."""
    gen = torch.Generator().manual_seed(3)
    s = AdaptiveSampler(LO, HI, lr=0.05)
    mid = (LO + HI) / 2
    assert s.mean_timestep() == pytest.approx(mid - 0.5, abs=1)  # starts uniform

    def reward(t):
        good = (t >= mid) if helpful == "high" else (t < mid)
        return good.double().mean()

    _drive(s, 400, gen, reward)
    shift = s.mean_timestep() - mid
    assert (shift > 30) if helpful == "high" else (shift < -30), shift
    assert s.probabilities().min() >= 0.1 / (HI - LO) - 1e-12  # exploration keeps every t alive


def test_adaptive_probes_pick_the_timesteps_that_explain_the_loss_change():
    gen = torch.Generator().manual_seed(4)
    s = AdaptiveSampler(LO, HI, candidates=16, probes=3, reselect_every=1)
    informative = [2, 7, 11]
    for _ in range(8):
        t, _ = s.sample(8, gen)
        probe = s.probes(gen)
        assert len(probe) == 16
        change = 1e-4 * torch.randn(16, generator=gen)
        change[informative] = torch.randn(3, generator=gen)
        s.update(t, torch.ones(8), torch.ones(16), torch.ones(16) - change)
    assert s.selected.tolist() == informative
    # the mean change over 16 candidates is (sum of the three) / 16: each coefficient is 1/16
    assert torch.allclose(s.coef, torch.full((3,), 1 / 16, dtype=torch.float64), atol=1e-3)


def test_adaptive_needs_probe_losses():
    s = AdaptiveSampler(0, 100)
    with pytest.raises(StepadaptError, match="probe"):
        s.update(torch.tensor([1]), torch.ones(1))


def test_visited_sampler_draws_only_the_visited_timesteps_of_its_interval():
    from stepadapt.plan import visited_timesteps
    from stepadapt.schedule import DEFAULT_SCHEDULER
    from stepadapt.train import TrainConfig

    visits = set(visited_timesteps("ddim", 25, DEFAULT_SCHEDULER).tolist())
    s = TrainConfig(timestep_sampler="visited", visit_steps=25).make_sampler(300, 700, DEFAULT_SCHEDULER)
    t, w = s.sample(4000, torch.Generator().manual_seed(0))
    inside = {v for v in visits if 300 <= v < 700}
    assert set(t.tolist()) == inside and torch.all(w == 1)
    assert abs(float(s.probabilities().sum()) - 1.0) < 1e-9
    with pytest.raises(StepadaptError, match="no visited timestep"):
        TrainConfig(timestep_sampler="visited", visit_steps=2).make_sampler(1, 30, DEFAULT_SCHEDULER)


def test_sampler_registry_lists_its_choices_and_says_what_each_needs():
    from stepadapt.timesteps import sampler_class

    assert TIMESTEP_SAMPLERS == ("uniform", "curriculum", "adaptive", "loss-moment", "visited")
    with pytest.raises(
        StepadaptError,
        match=f"unknown timestep sampler 'cosine'; choose one of {', '.join(TIMESTEP_SAMPLERS)}$",
    ):
        sampler_class("cosine")
    assert [n for n in TIMESTEP_SAMPLERS if sampler_class(n).needs_probes] == ["adaptive"]
    assert [n for n in TIMESTEP_SAMPLERS if sampler_class(n).needs_visits] == ["visited"]
    assert sampler_class("curriculum").options == ("clusters", "patience")


def test_train_config_builds_each_sampler_from_the_options_it_names():
    from stepadapt.schedule import DEFAULT_SCHEDULER
    from stepadapt.train import TrainConfig

    s = TrainConfig(timestep_sampler="curriculum", clusters=4, patience=7).make_sampler(0, 100)
    assert isinstance(s, CurriculumSampler) and (s.clusters, s.patience) == (4, 7)
    for name in TIMESTEP_SAMPLERS:
        built = TrainConfig(timestep_sampler=name).make_sampler(0, 1000, DEFAULT_SCHEDULER)
        assert built.name == name
    with pytest.raises(StepadaptError, match="unknown timestep sampler 'cosine'"):
        TrainConfig(timestep_sampler="cosine").validate()
    with pytest.raises(StepadaptError, match="--visit-steps"):
        TrainConfig(timestep_sampler="visited", visit_steps=0).validate()
