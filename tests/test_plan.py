import numpy as np
import pytest

from stepadapt import StepadaptError
from stepadapt.difficulty import normalise, snr_profile
from stepadapt.plan import Plan, budget_ratios, make_plan, partition, tdc_ratios, visited_timesteps
from stepadapt.schedule import DEFAULT_SCHEDULER

SNR = snr_profile(DEFAULT_SCHEDULER)
D = normalise(SNR)


@pytest.mark.parametrize("kind", ["uniform", "snr", "mass"])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_partitions_tile_the_timesteps(kind, n):
    b = partition(kind, n, D, SNR)
    assert b[0] == 0 and b[-1] == 1000 and len(b) == n + 1
    assert all(lo < hi for lo, hi in zip(b, b[1:], strict=False))


def test_snr_partition_has_equal_db_width():
    b = partition("snr", 4, D, SNR)
    widths = [SNR[lo] - SNR[hi - 1] for lo, hi in zip(b, b[1:], strict=False)]
    assert max(widths) - min(widths) < 1.5  # dB, up to one timestep of rounding


def test_tdc_rule_matches_the_paper():
    # N=5, k=0.5: 0.6, 0.7, 0.8, 0.9, 1.0 of F, the largest on the hardest group.
    r = tdc_ratios([0.9, 0.1, 0.5, 0.3, 0.7], k=0.5)
    assert r == pytest.approx([1.0, 0.6, 0.8, 0.7, 0.9])
    assert np.mean(r) == pytest.approx(0.8)


def test_budget_mean_is_over_visited_steps():
    plan = make_plan(D, SNR, 1_000_000, groups=4, budget=0.5, sampler="ddim", steps=50)
    assert plan.mean_ratio() == pytest.approx(0.5, abs=1e-3)
    assert sum(g.visit_share for g in plan.groups) == pytest.approx(1.0)
    ratios = [g.macs_ratio for g in plan.groups]
    assert ratios == sorted(ratios, reverse=True), "harder (low t) groups get more compute"
    visits = visited_timesteps("ddim", 50, {})
    assert len(visits) == 50 and visits.max() < 1000


def test_budget_with_fixed_groups_pays_back_the_difference():
    d, w = [0.9, 0.6, 0.3, 0.1], [0.1, 0.3, 0.3, 0.3]
    r = budget_ratios(d, w, 0.5, fixed={0: 1.0})
    assert r[0] == 1.0
    assert sum(a * b for a, b in zip(r, w, strict=True)) == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(StepadaptError, match="not reachable"):
        budget_ratios(d, w, 0.02)
    # The first group overshot to the whole base: the rest can only go to the floor; said, not refused.
    r = budget_ratios([0.9, 0.1], [0.9, 0.1], 0.5, fixed={0: 1.0}, saturate=True)
    assert r == [1.0, pytest.approx(0.05)]
    with pytest.raises(StepadaptError, match="not reachable"):
        budget_ratios([0.9, 0.1], [0.9, 0.1], 0.5, fixed={0: 1.0})


@pytest.mark.parametrize("groups, least", [(2, 0.2), (4, 0.04)])
def test_snr_cuts_on_a_cosine_schedule_stay_where_the_sampler_goes(groups, least):
    """Cosine betas fall to -86 dB in the last steps; equal SNR-dB widths over the whole range would
    give a group the last 2% of t (no step visits it). Within the visited range every group is used."""
    from stepadapt.difficulty import normalise, snr_profile

    cfg = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}
    s = snr_profile(cfg)
    plan = make_plan(normalise(s), s, 10**6, groups=groups, budget=0.5, scheduler_cfg=cfg)
    assert all(g.visit_share >= least for g in plan.groups), [
        (g.lo, g.hi, g.visit_share) for g in plan.groups
    ]
    assert plan.mean_ratio() == pytest.approx(0.5, abs=1e-4)  # ratios are stored to 4 decimals


def test_plan_json_round_trip_and_validation(tmp_path):
    plan = make_plan(D, SNR, 123, boundaries=[0, 100, 600, 1000], budget=None, tdc_k=0.5)
    assert plan.allocation == "tdc" and plan.partition == "explicit"
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again == plan
    with pytest.raises(StepadaptError, match="cover"):
        make_plan(D, SNR, 123, boundaries=[0, 100, 900])
    with pytest.raises(StepadaptError, match="overlap"):
        make_plan(D, SNR, 123, boundaries=[0, 500, 500, 1000])
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(StepadaptError, match="not a stepadapt plan"):
        Plan.load(tmp_path / "bad.json")


def test_gaussian_group_takes_the_noisy_end_and_frees_budget_for_the_rest():
    plan = make_plan(D, SNR, 1_000_000, groups=4, budget=0.5, scheduler_cfg=DEFAULT_SCHEDULER,
                     gaussian_from=600, gaussian_macs=20_000)  # fmt: skip
    assert [g.kind for g in plan.groups] == ["unet"] * 3 + ["gaussian"]
    assert plan.boundaries[-2:] == [600, 1000] and plan.groups[-1].macs_ratio == pytest.approx(0.02)
    assert plan.mean_ratio() == pytest.approx(0.5, abs=1e-3)
    assert plan.fixed_ratios() == {3: pytest.approx(0.02)}
    unet = plan.groups[:3]
    assert sum(g.visit_share * g.macs_ratio for g in unet) / sum(g.visit_share for g in unet) > 0.75
    # Explicit boundaries: every group above the Gaussian's start merges into it.
    explicit = make_plan(
        D, SNR, 1_000_000, boundaries=[0, 300, 700, 1000], budget=0.5, scheduler_cfg=DEFAULT_SCHEDULER,
        gaussian_from=500, gaussian_macs=20_000,
    )  # fmt: skip
    assert explicit.boundaries == [0, 300, 500, 1000] and explicit.groups[-1].kind == "gaussian"
    again = Plan.from_dict(plan.to_dict())
    assert again == plan
    with pytest.raises(StepadaptError, match="inside"):
        make_plan(D, SNR, 1, groups=4, gaussian_from=1000)
    with pytest.raises(StepadaptError, match="at least 2 groups"):
        make_plan(D, SNR, 1, groups=1, gaussian_from=500)


def test_tdc_ranks_the_unet_groups_among_themselves_and_the_gaussian_keeps_its_cost():
    plan = make_plan(D, SNR, 1_000_000, groups=4, budget=None, tdc_k=0.5, scheduler_cfg=DEFAULT_SCHEDULER,
                     gaussian_from=600, gaussian_macs=20_000)  # fmt: skip
    assert [g.macs_ratio for g in plan.groups] == pytest.approx([1.0, 2 / 3 + 1 / 6, 2 / 3, 0.02], abs=1e-4)


def test_a_budget_the_gaussian_leaves_no_room_for_names_the_gaussian():
    with pytest.raises(StepadaptError, match=r"Gaussian expert on \[300, 1000\) serves 70% .*--gaussian off"):
        make_plan(D, SNR, 1_000_000, groups=3, budget=0.5, scheduler_cfg=DEFAULT_SCHEDULER,
                  gaussian_from=300, gaussian_macs=20_000)  # fmt: skip
    bad = make_plan(D, SNR, 1, groups=2, budget=0.5, scheduler_cfg=DEFAULT_SCHEDULER).to_dict()
    bad["groups"][0]["kind"] = "oracle"
    with pytest.raises(StepadaptError, match="unknown kind"):
        Plan.from_dict(bad)


def test_auto_cutoff_moves_up_until_the_budget_can_be_spent():
    from stepadapt.analyze import _spendable_from

    visits = visited_timesteps("ddim", 50, DEFAULT_SCHEDULER)
    lo = _spendable_from(300, 0.6, 0.02, "ddim", 50, DEFAULT_SCHEDULER)
    share = float(np.mean(visits >= lo))
    assert (1 - share) + 0.02 * share >= 0.6  # reachable from lo on ...
    below = max(v for v in visits if v < lo)  # ... and not with one more visited step given to it
    assert (1 - np.mean(visits >= below)) + 0.02 * np.mean(visits >= below) < 0.6
    assert _spendable_from(700, 0.5, 0.02, "ddim", 50, DEFAULT_SCHEDULER) == 700  # no need to move


def test_gaussian_expert_is_only_offered_where_it_is_cheap():
    from stepadapt.gaussian import affordable, macs_for

    assert macs_for((1, 32, 32)) == 2 * 1024**2
    assert affordable((1, 32, 32), 95_000_000) is None
    assert "0.25" in affordable((3, 64, 64), 1_000_000_000)
