import numpy as np
import pytest
import torch

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


# --- which Gaussian, and why: analyze on unconditional, class- and text-conditional bases ------------


def _labelled_npz(path, n: int = 240, classes: int = 3, seed: int = 0, size: int = 8):
    """``classes`` kinds of 8 x 8 images (each its own pattern plus noise) and their labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    patterns = rng.integers(30, 220, (classes, size, size))
    images = np.clip(patterns[y] + rng.normal(0, 25, (n, size, size)), 0, 255).astype(np.uint8)
    np.savez(path, images=images, labels=y.astype(np.int64))
    return str(path)


def _base(tmp_path, classes: int = 0):
    from stepadapt.models import build_unet, save_base

    names = tuple("abcdefgh"[:classes])
    return save_base(build_unet("tiny", sample_size=8, classes=classes), tmp_path / "base", class_names=names)


def test_a_plan_names_its_gaussian_and_old_plans_still_load(tmp_path):
    from stepadapt.plan import GaussianChoice

    plan = make_plan(D, SNR, 1_000_000, groups=3, budget=0.5, scheduler_cfg=DEFAULT_SCHEDULER,
                     gaussian_from=700, gaussian_macs=20_000, gaussian_kind="class-gaussian")  # fmt: skip
    plan.gaussian = GaussianChoice("given", 700, kind="class-gaussian", rank=12, classes=10, explained=0.91,
                                   why="one Gaussian per class")  # fmt: skip
    plan.save(tmp_path / "p.json")
    again = Plan.load(tmp_path / "p.json")
    assert again.gaussian == plan.gaussian and again.groups[-1].kind == "class-gaussian"
    assert (
        "class Gaussian expert, rank 12 (91% of the variance), 10 classes: one Gaussian per class"
        in again.gaussian.describe()
    )
    d = plan.to_dict()
    old = {**d, "version": 3, "gaussian": {"rule": "given", "start": 700}}  # before kinds and ranks
    old["groups"] = [{**g, "kind": "gaussian" if g["kind"] != "unet" else "unet"} for g in d["groups"]]
    assert Plan.from_dict(old).gaussian.kind == "gaussian" and Plan.from_dict(old).gaussian.rank is None
    with pytest.raises(
        StepadaptError, match="its Gaussian group is a class-gaussian expert, its fit a gaussian"
    ):
        Plan.from_dict({**d, "gaussian": {**d["gaussian"], "kind": "gaussian"}})
    none = GaussianChoice("none", None, why="the base is text-conditional")
    assert none.describe() == "no Gaussian expert: the base is text-conditional"


def test_analyze_fits_a_gaussian_per_class_and_judges_it_with_held_out_labels(tmp_path, monkeypatch):
    """Class-conditional base: the loss profile and the cut-off get the held-out images' labels,
    the fit is one Gaussian per class on the labelled training split, and the plan says so."""
    from safetensors.torch import load_file

    import stepadapt.analyze as analyze_module
    from stepadapt.analyze import AnalyzeOptions, analyze
    from stepadapt.data import fingerprint, load_labelled

    data, base = _labelled_npz(tmp_path / "d.npz"), _base(tmp_path, classes=3)
    seen = {}
    real = analyze_module.gaussian_cutoff

    def cutoff(model, gaussian, sched, held_out, **kw):
        seen.update(judged=held_out, labels=kw["labels"], kind=type(gaussian).__name__)
        return real(model, gaussian, sched, held_out, **kw)

    monkeypatch.setattr(analyze_module, "gaussian_cutoff", cutoff)
    opts = AnalyzeOptions(
        out=tmp_path / "plan.json", base=base, data=data, groups=3, proxy_size=16, device="cpu"
    )
    plan = analyze(opts).plan
    choice = plan.gaussian
    assert (choice.kind, choice.classes, choice.rule) == ("class-gaussian", 3, "auto")
    assert plan.groups[-1].kind == "class-gaussian" and plan.groups[-1].lo == choice.start
    assert 1 <= choice.rank < 64 and 0.9 <= choice.explained <= 1 and "per class" in choice.why
    x_test, y_test = load_labelled(data, "test", 8, 1, limit=16, seed=0)
    assert seen["kind"] == "ClassGaussianDenoiser"
    assert torch.equal(seen["judged"], x_test) and torch.equal(seen["labels"], y_test)
    assert choice.data_sha256 == fingerprint(*load_labelled(data, "train", 8, 1))
    fit = load_file(str(tmp_path / choice.weights))
    assert fit["means"].shape == (4, 64) and fit["bases"].shape == (4, 64, choice.rank)
    assert Plan.load(tmp_path / "plan.json").gaussian == choice
    assert analyze(opts.replace(gaussian_rank="5", gaussian="700")).plan.gaussian.rank == 5
    with pytest.raises(
        StepadaptError, match=r"\(--gaussian-rank full\): a class-conditional base's Gaussians are low-rank"
    ):
        analyze(opts.replace(gaussian_rank="full", gaussian="700"))
    np.savez(tmp_path / "bad.npz", images=np.zeros((40, 8, 8), np.uint8), labels=np.arange(40) % 5)
    with pytest.raises(StepadaptError, match=r"held-out labels span \d..4; the base knows 0..2") as e:
        analyze(opts.replace(data=str(tmp_path / "bad.npz")))
    assert "\n" not in str(e.value)


def test_a_text_conditional_base_gets_no_gaussian_and_the_plan_says_why(tmp_path):
    from diffusers import UNet2DConditionModel

    from stepadapt.analyze import AnalyzeOptions, analyze
    from stepadapt.models import save_base

    text = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12, attention_head_dim=2,
        norm_num_groups=8,
    )  # fmt: skip
    base = save_base(text, tmp_path / "text")
    np.savez(
        tmp_path / "d.npz", images=np.random.default_rng(0).integers(0, 256, (120, 8, 8), dtype=np.uint8)
    )
    opts = AnalyzeOptions(out=tmp_path / "p.json", base=base, data=str(tmp_path / "d.npz"), groups=3,
                          proxy_size=8, device="cpu")  # fmt: skip
    result = analyze(opts)
    assert result.plan.gaussian.rule == "none" and "text-conditional" in result.plan.gaussian.why
    assert all(g.kind == "unet" for g in result.plan.groups) and "text-conditional" in result.note
    assert Plan.load(tmp_path / "p.json").gaussian.rule == "none"
    # the noisy end decides what to draw: no group below the text floor unless asked
    assert result.plan.floor == 0.4 and min(g.macs_ratio for g in result.plan.groups) >= 0.4 - 1e-4
    assert analyze(opts.replace(floor=0.05)).plan.groups[-1].macs_ratio < 0.4
    with pytest.raises(
        StepadaptError, match=r"^Gaussian expert \(--gaussian 700\): the base is text-conditional"
    ):
        analyze(opts.replace(gaussian="700"))


def test_unconditional_auto_keeps_the_low_rank_form_only_where_it_measures_as_good(tmp_path, monkeypatch):
    """Both forms fitted (the full one is affordable here), compared at the cut-off on held-out images:
    the plan keeps the low-rank one when its eps error is within the tolerance, else the full one,
    and records both errors."""
    from safetensors.torch import load_file

    import stepadapt.analyze as analyze_module
    from stepadapt.analyze import AnalyzeOptions, analyze

    data, base = _labelled_npz(tmp_path / "d.npz", n=400), _base(tmp_path)
    opts = AnalyzeOptions(
        out=tmp_path / "plan.json", base=base, data=data, groups=3, proxy_size=16, device="cpu"
    )
    choice = analyze(opts).plan.gaussian
    assert choice.kind == "gaussian" and set(choice.compared) == {"t", "full", "low_rank"}
    ratio = choice.compared["low_rank"] / choice.compared["full"]
    assert (choice.rank is not None) == (ratio <= 1.05)
    assert choice.compared["t"] == choice.tolerance_from
    monkeypatch.setattr(analyze_module, "LOW_RANK_TOLERANCE", 0.5)  # no low-rank form is that good
    strict = analyze(opts.replace(gaussian="700")).plan.gaussian  # a given start: compared there
    assert strict.rank is None and strict.why.startswith("full covariance: the rank-")
    assert strict.compared["t"] == 700
    assert "remainder" not in load_file(str(tmp_path / strict.weights))
    forced = analyze(opts.replace(gaussian_rank="7", gaussian="700")).plan.gaussian
    assert forced.rank == 7 and not forced.compared  # a given rank is not second-guessed
    with pytest.raises(StepadaptError, match="--gaussian-rank must be auto, full or a rank"):
        AnalyzeOptions(gaussian_rank="0")


def test_a_floor_lifts_the_noisy_end_and_the_others_pay_for_it(tmp_path):
    """--floor: no U-Net group below it, the visit-weighted mean still the budget, the order of the
    rest kept; it round-trips through plan.json and the pruner's re-solve keeps it."""
    plain = make_plan(D, SNR, 1_000_000, groups=4, budget=0.5, sampler="unipc", steps=24)
    floored = make_plan(D, SNR, 1_000_000, groups=4, budget=0.5, sampler="unipc", steps=24, floor=0.4)
    assert plain.groups[-1].macs_ratio < 0.3 and min(g.macs_ratio for g in floored.groups) >= 0.4 - 1e-4
    assert floored.mean_ratio() == pytest.approx(0.5, abs=1e-3)
    assert floored.groups[0].macs_ratio < plain.groups[0].macs_ratio
    floored.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json").floor == 0.4
    d, w = [g.difficulty for g in floored.groups], [g.visit_share for g in floored.groups]
    assert min(budget_ratios(d, w, 0.5, fixed={0: 0.9}, saturate=True, floor=0.4)) >= 0.4
    with pytest.raises(StepadaptError, match=r"floor must be in \[0.05, budget 0.5\], got 0.6"):
        make_plan(D, SNR, 1_000_000, groups=4, budget=0.5, floor=0.6)
    with pytest.raises(StepadaptError, match="the TDC rule has no budget"):
        make_plan(D, SNR, 1_000_000, groups=4, budget=None, floor=0.3)
    import json

    bad = json.loads((tmp_path / "p.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**bad, "floor": 2}))
    with pytest.raises(StepadaptError, match=r"malformed plan: floor must be in \[0.05, 1\], got 2"):
        Plan.load(tmp_path / "bad.json")
