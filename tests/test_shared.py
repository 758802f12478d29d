"""Weight-shared experts: nested structures, shared gradients, and exports that equal the shared net."""

import copy
import math
import shutil

import pytest
import torch
import torch_pruning as tp

from stepadapt import StepadaptError
from stepadapt.bundle import Bundle
from stepadapt.finetune import finetune_bundle, phase_iterations, shared_experts
from stepadapt.importance import ProxyBatch, proxy_loss
from stepadapt.io import load_torch
from stepadapt.models import build_unet
from stepadapt.prune import prune_once
from stepadapt.shared import SharedExperts, slice_map
from stepadapt.train import TrainConfig


def _pruned(base, ratio):
    return prune_once(base, ratio, tp.importance.GroupMagnitudeImportance(p=2))


def test_slices_cut_from_the_base_are_the_pruned_models(tiny):
    small, h = _pruned(tiny, 0.4)
    shared = SharedExperts(copy.deepcopy(tiny), [0, 500, 1000], [[], h])
    for i, ref in enumerate([tiny, small]):
        cut = shared.export(i).state_dict()
        assert all(torch.equal(cut[k], v) for k, v in ref.state_dict().items())
    x, t = torch.randn(4, 1, 32, 32), torch.tensor([3, 499, 500, 999])
    with torch.no_grad():
        routed = shared(x, t).sample
        assert torch.allclose(routed[:2], tiny(x[:2], t[:2]).sample, atol=1e-5)
        assert torch.allclose(routed[2:], small(x[2:], t[2:]).sample, atol=1e-5)


def test_nested_histories_compose_and_nest(tiny):
    mid, h1 = _pruned(tiny, 0.25)
    small, h2 = _pruned(mid, 0.3)
    outer, inner = slice_map(tiny, h1), slice_map(tiny, h1 + h2)
    nested = 0
    for name, idx in inner.items():
        for d, kept in enumerate(idx):
            if kept is None:
                assert outer[name][d] is None or len(outer[name][d]) == tiny.get_parameter(name).shape[d]
                continue
            parent = outer[name][d]
            parent = range(tiny.get_parameter(name).shape[d]) if parent is None else parent.tolist()
            assert set(kept.tolist()) <= set(parent), name
            nested += 1
    assert nested > 0
    cut = SharedExperts(copy.deepcopy(tiny), [0, 1000], [h1 + h2]).export(0).state_dict()
    assert all(torch.equal(cut[k], v) for k, v in small.state_dict().items())


def test_an_update_on_one_experts_timesteps_moves_the_others(tiny):
    _, h = _pruned(tiny, 0.4)
    shared = SharedExperts(copy.deepcopy(tiny), [0, 500, 1000], [[], h])
    before = shared.export(1).state_dict()
    opt = torch.optim.SGD(shared.parameters(), lr=0.1)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 20])  # only the full expert's interval
    shared(x, t).sample.pow(2).mean().backward()
    opt.step()
    after = shared.export(1).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert set(shared.state_dict()) == {f"base.{k}" for k in tiny.state_dict()}  # one set of weights


def test_timesteps_outside_the_experts_are_refused(tiny):
    shared = SharedExperts(copy.deepcopy(tiny), [0, 1000], [[]])
    with pytest.raises(StepadaptError, match="no expert"):
        shared(torch.randn(1, 1, 32, 32), torch.tensor([1000]))


def test_phases():
    assert phase_iterations("shared", 100, 0.0) == (100, 0)
    assert phase_iterations("shared", 100, 0.25) == (75, 25)
    assert phase_iterations("separate", 100, 0.5) == (0, 100)
    with pytest.raises(StepadaptError):
        phase_iterations("joint", 100, 0.0)
    with pytest.raises(StepadaptError):
        phase_iterations("shared", 100, 1.5)


@pytest.mark.slow
def test_shared_finetune_trains_every_pruned_expert_and_exports_the_shared_net(
    tmp_path, squares, bundle_maker
):
    base = build_unet("tiny", seed=0)
    d = bundle_maker(base, tmp_path / "b")
    b = Bundle.load(d)
    assert [bool(b.structure(e.name)) for e in b.experts] == [False, True, True]
    assert b.expert("g2").parent == "g1"  # nested by default
    x, sched = squares(), b.manifest.scheduler
    untouched = b.expert("g0").sha256
    before = {e.name: proxy_loss(b.load_expert(e.name), sched, ProxyBatch.draw(x, e.lo, e.hi, 5))
              for e in b.experts[1:]}  # fmt: skip
    cfg = TrainConfig(batch_size=16, lr=2e-3, warmup=2, ema_decay=0.0, checkpoint_every=100)
    res = finetune_bundle(b, x, cfg, 40, mode="shared", teacher=base, progress=False)
    assert set(res) == {"shared"} and res["shared"].steps == 40
    again = Bundle.load(d)
    assert again.expert("g0").sha256 == untouched  # the base fits g0: it is the base
    for e in again.experts[1:]:
        after = proxy_loss(again.load_expert(e.name), sched, ProxyBatch.draw(x, e.lo, e.hi, 5))
        assert after < before[e.name], (e.name, before[e.name], after)
        assert e.training["mode"] == "shared" and e.training["t_lo"] == again.experts[1].lo
    # The exported experts are the shared network's slices: rebuild it from the checkpoint's EMA.
    st = load_torch(d / "finetune" / "shared" / "checkpoint.pt")
    final = copy.deepcopy(base)
    for p, v in zip(final.parameters(), st["ema"]["shadow_params"], strict=True):
        p.data.copy_(v)
    net = shared_experts(again, final, check=False)
    for i, e in enumerate(again.experts[1:], start=1):
        mine = again.load_expert(e.name).state_dict()
        assert all(torch.allclose(net.export(i).state_dict()[k], v) for k, v in mine.items())
    # Once fine-tuned, the experts are no slices of the base any more: shared training refuses.
    with pytest.raises(StepadaptError, match="not a slice"):
        finetune_bundle(again, x, cfg, 4, mode="shared", teacher=base, progress=False)
    # ...while a separate specialisation phase goes on from them.
    finetune_bundle(again, x, cfg, 4, mode="separate", progress=False)
    assert Bundle.load(d).expert("g2").training["after"]["mode"] == "shared"


def test_shared_finetune_needs_the_base(tiny_bundle, tmp_path, squares):
    d = tmp_path / "b"
    shutil.copytree(tiny_bundle, d)
    with pytest.raises(StepadaptError, match="--teacher"):
        finetune_bundle(
            Bundle.load(d), squares(8), TrainConfig(batch_size=4), 3, mode="shared", progress=False
        )


def test_shared_training_refuses_an_unpruned_expert_between_pruned_ones(tmp_path, squares, tiny):
    from stepadapt.compress import compress
    from stepadapt.difficulty import normalise, snr_profile
    from stepadapt.importance import Candidate
    from stepadapt.plan import make_plan
    from stepadapt.prune import count_macs
    from stepadapt.schedule import DEFAULT_SCHEDULER

    s = snr_profile(DEFAULT_SCHEDULER)
    plan = make_plan(normalise(s), s, count_macs(tiny)[0], boundaries=[0, 300, 600, 1000], budget=None,
                     scheduler_cfg=DEFAULT_SCHEDULER)  # fmt: skip
    for g, r in zip(plan.groups, (0.5, 1.0, 0.5), strict=True):
        g.macs_ratio = r
    x = squares(8)
    compress(tiny, DEFAULT_SCHEDULER, plan, x, x, tmp_path / "b", candidates=(Candidate("magnitude", False),),
             nested=False)  # fmt: skip
    b = Bundle.load(tmp_path / "b")
    assert [b.is_pruned(e.name) for e in b.experts] == [True, False, True]
    with pytest.raises(StepadaptError, match="unpruned expert sits between"):
        finetune_bundle(b, x, TrainConfig(batch_size=4), 2, mode="shared", teacher=tiny, progress=False)


@pytest.mark.slow
def test_shared_experts_forward_and_train_under_bf16_autocast(tmp_path, squares, bundle_maker):
    """Mixed precision (a GPU's --precision auto): each slice answers in bf16, and the shared net
    writes their answers into one batch of that dtype (an fp32 buffer would refuse them)."""
    from stepadapt.devices import autocast

    base = build_unet("tiny", seed=0)
    b = Bundle.load(bundle_maker(base, tmp_path / "b"))
    net = shared_experts(b, base)
    x, t = torch.randn(6, 1, 32, 32), torch.tensor([100, 500, 900, 150, 550, 950])
    t = t.clamp(max=b.experts[-1].hi - 1).clamp(min=b.experts[1].lo)
    with torch.no_grad(), autocast("bf16", "cpu"):
        y = net(x, t).sample
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    cfg = TrainConfig(batch_size=8, warmup=1, checkpoint_every=100, precision="bf16")
    res = finetune_bundle(b, squares(16), cfg, 3, mode="shared", teacher=base, progress=False)
    assert res["shared"].steps == 3 and math.isfinite(res["shared"].final_loss)
