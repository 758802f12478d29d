"""Sizes by measured damage: the knapsack, and the measurement on a small model."""

import itertools
import random

import numpy as np
import pytest

from stepadapt import StepadaptError
from stepadapt.allocate import Option, choose


def _brute(options, shares, budget):
    best = None
    for pick in itertools.product(*[range(len(o)) for o in options]):
        cost = sum(s * o[k].ratio for s, o, k in zip(shares, options, pick, strict=True))
        dmg = sum(o[k].damage for o, k in zip(options, pick, strict=True))
        if cost <= budget + 1e-9 and (best is None or dmg < best[0] - 1e-12):
            best = (dmg, pick)
    return best


def test_knapsack_prefers_the_lower_damage_choice_under_the_budget():
    # Two groups visited equally; the noisy group suffers less from shrinking than the clean one.
    options = [
        [Option(1.0, 0.0), Option(0.5, 0.08), Option(0.25, 0.30)],
        [Option(1.0, 0.0), Option(0.5, 0.02), Option(0.25, 0.05)],
    ]
    pick = choose(options, [0.5, 0.5], 0.625)
    assert pick == [0, 2]  # full model where shrinking hurts, the smallest where it does not
    assert 0.5 * 1.0 + 0.5 * 0.25 <= 0.625
    assert choose(options, [0.5, 0.5], 1.0) == [0, 0]  # enough budget: no damage at all
    with pytest.raises(StepadaptError, match="below the smallest"):
        choose(options, [0.5, 0.5], 0.2)


def test_knapsack_is_exact_on_random_cases():
    rng = random.Random(0)
    for _ in range(200):
        g = rng.randint(1, 4)
        options = [
            [Option(1.0, 0.0)]
            + [Option(rng.uniform(0.1, 0.95), rng.uniform(0, 1)) for _ in range(rng.randint(0, 4))]
            for _ in range(g)
        ]
        shares = list(np.random.default_rng(rng.randint(0, 99)).dirichlet(np.ones(g)))
        budget = rng.uniform(0.3, 1.0)
        want = _brute(options, shares, budget)
        if want is None:
            with pytest.raises(StepadaptError):
                choose(options, shares, budget)
            continue
        pick = choose(options, shares, budget)
        cost = sum(s * o[k].ratio for s, o, k in zip(shares, options, pick, strict=True))
        assert cost <= budget + 1e-9
        assert abs(sum(o[k].damage for o, k in zip(options, pick, strict=True)) - want[0]) < 1e-9


@pytest.mark.slow
def test_damage_plan_measures_each_size_and_meets_the_budget(tiny, squares):
    from stepadapt.analyze import analyze_base
    from stepadapt.schedule import DEFAULT_SCHEDULER

    x = squares(16)
    plan, _ = analyze_base(
        tiny, DEFAULT_SCHEDULER, x, measure="damage", boundaries=[0, 300, 1000], budget=0.7,
        damage={"data": x, "proxy_train": x[:8], "proxy_val": x[8:], "sizes": [0.4], "recover_iterations": 2,
                "batch_size": 4, "sample_steps": 4, "n": 4},
    )  # fmt: skip
    assert plan.allocation == "damage" and len(plan.damage) == 2
    for row in plan.damage:
        assert row[0] == [1.0, 0.0]  # the base itself: no damage
        assert len(row) == 2 and 0 < row[1][0] < 0.6 and row[1][1] > 0  # the pruned size moves the images
    assert plan.mean_ratio() <= 0.7 + 1e-9
    sizes = [g.macs_ratio for g in plan.groups]
    assert all(r in [o[0] for o in row] for r, row in zip(sizes, plan.damage, strict=True))
    with pytest.raises(StepadaptError, match="budget"):
        analyze_base(tiny, DEFAULT_SCHEDULER, x, measure="damage", budget=None, damage={})
