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


@pytest.mark.slow
def test_damage_of_a_class_conditional_base_is_measured_with_its_labels(monkeypatch):
    """The proxy sets, the recovery and the compared images all carry labels: recovery trains on
    the data's labels, the reference and the swapped-in trajectories are sampled for the same
    labels (cycling through the classes), and the search gets the proxy sets' labels."""
    import torch

    import stepadapt.allocate as allocate
    from stepadapt.analyze import analyze_base
    from stepadapt.models import build_unet
    from stepadapt.schedule import DEFAULT_SCHEDULER

    base = build_unet("tiny", sample_size=8, classes=3).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(24, 1, 8, 8, generator=g) * 2 - 1, torch.arange(24) % 3
    seen = {"sampled": [], "trained": [], "searched": []}
    real_sample, real_train, real_search = allocate.sample_images, allocate.train, allocate.search_group

    def sample(*a, cond=None, **k):
        seen["sampled"].append(cond)
        return real_sample(*a, cond=cond, **k)

    monkeypatch.setattr(allocate, "sample_images", sample)
    monkeypatch.setattr(
        allocate,
        "train",
        lambda *a, labels=None, **k: seen["trained"].append(labels) or real_train(*a, labels=labels, **k),
    )
    monkeypatch.setattr(
        allocate, "search_group", lambda *a, **k: seen["searched"].append(k) or real_search(*a, **k)
    )
    plan, _ = analyze_base(
        base, DEFAULT_SCHEDULER, x[:8], measure="damage", boundaries=[0, 500, 1000], budget=0.8, labels=y[:8],
        damage={"data": x, "data_labels": y, "proxy_train": x[:8], "proxy_val": x[8:16],
                "train_labels": y[:8], "val_labels": y[8:16], "sizes": [0.5], "recover_iterations": 1,
                "batch_size": 4, "sample_steps": 2, "n": 4},
    )  # fmt: skip
    assert plan.allocation == "damage"
    assert all(torch.equal(c["class_labels"], torch.tensor([0, 1, 2, 0])) for c in seen["sampled"])
    assert seen["trained"] and all(torch.equal(t, y) for t in seen["trained"])
    assert all(
        torch.equal(k["train_labels"], y[:8]) and torch.equal(k["val_labels"], y[8:16])
        for k in seen["searched"]
    )
