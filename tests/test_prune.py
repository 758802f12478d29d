import pytest
import torch
import torch_pruning as tp

from stepadapt.importance import ProxyBatch, group_gradients, make_importance
from stepadapt.models import build_unet
from stepadapt.prune import count_macs, prune_once, prune_to_macs, replay
from stepadapt.schedule import DEFAULT_SCHEDULER


@pytest.mark.slow
def test_uniform_pruning_reproduces_diff_pruning_size():
    # Diff-Pruning's "0.3" DDPM-CIFAR10 model is 19.8M params / 3.4 GMACs; with
    # torch-pruning 1.6 (GroupNorm widths in steps of num_groups) that is ratio 0.25.
    base = build_unet("ddpm-cifar10")
    model, history = prune_once(base, 0.25, tp.importance.MagnitudeImportance())
    macs, params = count_macs(model)
    assert abs(params - 19.8e6) / 19.8e6 < 0.03
    assert abs(macs - 3.4e9) / 3.4e9 < 0.03
    y = model(torch.randn(2, 3, 32, 32), torch.tensor([1, 999])).sample
    assert y.shape == (2, 3, 32, 32)
    # The JSON-able history rebuilds the same structure from the config alone.
    rebuilt = replay(dict(base.config), history)
    assert count_macs(rebuilt) == (macs, params)


@pytest.mark.slow
def test_prune_to_macs_hits_the_target_or_the_nearest_step():
    base = build_unet("tiny")
    base_macs, _ = count_macs(base)
    for frac in (0.8, 0.5):
        res = prune_to_macs(base, frac * base_macs, lambda: make_importance("magnitude"), global_pruning=True)
        assert res.within_tolerance
        assert abs(res.macs - frac * base_macs) <= 0.02 * frac * base_macs
        assert count_macs(res.model)[0] == res.macs
    # Per-layer ratios on GroupNorm(8) move widths 8 channels at a time, so 0.8 x
    # MACs is unreachable: the nearest reachable size is returned and flagged.
    target = 0.8 * base_macs
    res = prune_to_macs(base, target, lambda: make_importance("magnitude"), global_pruning=False)
    assert not res.within_tolerance
    for r in (0.001, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3):
        m, _ = prune_once(base, r, make_importance("magnitude"))
        assert abs(res.macs - target) <= abs(count_macs(m)[0] - target)


def test_group_restricted_taylor_depends_on_the_timesteps():
    base = build_unet("tiny", seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 32, 32, generator=g) * 2 - 1
    early = group_gradients(base, DEFAULT_SCHEDULER, ProxyBatch.draw(x, 0, 100, 0))
    late = group_gradients(base, DEFAULT_SCHEDULER, ProxyBatch.draw(x, 900, 1000, 0))
    _, h_early = prune_once(base, 0.3, make_importance("taylor"), grads=early)
    _, h_late = prune_once(base, 0.3, make_importance("taylor"), grads=late)
    kept_early = {n: idx for n, _, idx in h_early}
    kept_late = {n: idx for n, _, idx in h_late}
    differing = [n for n in kept_early if kept_early[n] != kept_late.get(n)]
    assert differing, "early and late groups pruned the same channels"


@pytest.mark.slow
def test_four_group_budget_plan_on_ddpm_cifar10(tmp_path):
    from stepadapt.bundle import Bundle
    from stepadapt.compress import compress
    from stepadapt.difficulty import normalise, snr_profile
    from stepadapt.importance import Candidate
    from stepadapt.plan import make_plan

    base = build_unet("ddpm-cifar10")
    base_macs, _ = count_macs(base)
    s = snr_profile(DEFAULT_SCHEDULER)
    plan = make_plan(normalise(s), s, base_macs, groups=4, budget=0.5, scheduler_cfg=DEFAULT_SCHEDULER)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    man = compress(
        base, DEFAULT_SCHEDULER, plan, x, x, tmp_path / "b", candidates=(Candidate("magnitude", False),)
    )
    mean = sum(g.visit_share * e.macs for g, e in zip(plan.groups, man.experts, strict=True))
    assert abs(mean - 0.5 * 6.06e9) / (0.5 * 6.06e9) < 0.03
    b = Bundle.load(tmp_path / "b")
    for e in b.experts:
        y = b.load_expert(e.name)(torch.randn(1, 3, 32, 32), torch.tensor([e.lo])).sample
        assert y.shape == (1, 3, 32, 32)


def test_importance_registry_lists_its_choices_and_says_which_need_gradients():
    import pytest

    from stepadapt import StepadaptError
    from stepadapt.importance import IMPORTANCES, Candidate, importance_kind

    assert IMPORTANCES == ("taylor", "magnitude", "random", "diff-pruning")
    assert [n for n in IMPORTANCES if importance_kind(n).needs_gradients] == ["taylor", "diff-pruning"]
    assert isinstance(make_importance("diff-pruning"), tp.importance.GroupTaylorImportance)
    choices = "taylor, magnitude, random, diff-pruning"
    with pytest.raises(StepadaptError, match=f"^unknown importance 'l1'; choose one of {choices}$"):
        make_importance("l1")
    with pytest.raises(StepadaptError, match=f"IMPORTANCE one of {choices}$"):
        Candidate.parse("l1/global")


@pytest.mark.slow
def test_search_takes_gradients_once_per_kind_that_needs_them(monkeypatch):
    """Taylor/local and taylor/global share the group's gradients; magnitude takes none;
    diff-pruning takes its own, over its low-noise steps whatever the group."""
    from stepadapt import importance as imp

    base = build_unet("tiny", seed=0)
    x = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batches = []

    def counting(model, scheduler_cfg, batch, chunk=64):
        batches.append(batch)
        return group_gradients(model, scheduler_cfg, batch, chunk)

    def unpruned(model, target, make, *, global_pruning, grads, seed, tol):
        make()  # each candidate's importance is still built from the registry
        macs, params = count_macs(model)
        return imp.PruneResult(model, 0.0, macs, params, [], True)

    monkeypatch.setattr(imp, "group_gradients", counting)
    monkeypatch.setattr(imp, "prune_to_macs", unpruned)  # the pruning itself is not what is tested
    cands = tuple(
        imp.Candidate.parse(c) for c in ("taylor/local", "magnitude/local", "taylor/global", "diff-pruning")
    )
    found = imp.search_group(
        base, DEFAULT_SCHEDULER, 100, 400, 0.7 * count_macs(base)[0], x, x, candidates=cands
    )
    assert [t.candidate for t in found.tried] == [c.label for c in cands]
    assert len(batches) == 2
    expected = ProxyBatch.draw(x, 100, 400, 0)  # the group's own timesteps
    assert torch.equal(batches[0].t, expected.t) and torch.equal(batches[0].noise, expected.noise)
    t_end = imp.diff_pruning_timesteps(base, DEFAULT_SCHEDULER, x)
    assert torch.equal(batches[1].t, ProxyBatch.draw(x, 0, t_end, 0).t)
