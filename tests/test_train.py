import pytest
import torch

from stepadapt import StepadaptError
from stepadapt.models import build_unet
from stepadapt.schedule import DEFAULT_SCHEDULER, make_scheduler
from stepadapt.timesteps import SAMPLERS
from stepadapt.train import TrainConfig, denoising_loss, train


def _fixed_batch_loss(model, x):
    sched = make_scheduler("ddpm", DEFAULT_SCHEDULER)
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, 1000, (len(x),), generator=g)
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        return denoising_loss(model, sched, x, t, noise).item()


def test_a_few_steps_lower_the_loss(tmp_path, squares):
    x = squares()
    model = build_unet("tiny", seed=0)
    before = _fixed_batch_loss(model, x)
    cfg = TrainConfig(iterations=25, batch_size=16, lr=2e-3, warmup=2, checkpoint_every=100)
    train(model, x, DEFAULT_SCHEDULER, cfg, tmp_path, progress=False)
    after = _fixed_batch_loss(model.eval(), x)
    assert after < 0.8 * before


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_resume_equals_uninterrupted_run(tmp_path, squares, sampler):
    """Model, EMA, optimizer, generator and the timestep sampler's own state all come back."""
    x = squares()
    lo, hi = (30, 50) if sampler == "visited" else (10, 13)  # 25 DDIM steps visit t=40 there
    cfg = TrainConfig(
        iterations=6, batch_size=8, warmup=2, checkpoint_every=3, ema_decay=0.9,
        sampler=sampler, t_lo=lo, t_hi=hi, clusters=3, patience=1, probe_images=2,
    )  # fmt: skip
    full = build_unet("tiny", seed=0)
    ema_full, _ = train(full, x, DEFAULT_SCHEDULER, cfg, tmp_path / "a", progress=False)

    # Stop at step 3 (a run with 3 iterations would change the LR schedule, so
    # stop the same 6-step run by raising from the sample hook instead).
    class Stop(Exception):
        pass

    def stop(step, _):
        raise Stop

    part_cfg = TrainConfig(**{**cfg.to_dict(), "sample_every": 3})
    with pytest.raises(Stop):
        train(
            build_unet("tiny", seed=0),
            x,
            DEFAULT_SCHEDULER,
            part_cfg,
            tmp_path / "b",
            progress=False,
            on_sample=stop,
        )
    resumed = build_unet("tiny", seed=99)  # different init: everything must come from the checkpoint
    ema_res, res = train(resumed, x, DEFAULT_SCHEDULER, part_cfg, tmp_path / "b", resume=True, progress=False)
    assert res.steps == 6
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for a, b in zip(ema_full.parameters(), ema_res.parameters(), strict=True):
        assert torch.equal(a, b)


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path, squares):
    x = squares(8)
    cfg = TrainConfig(iterations=2, batch_size=4, warmup=1, checkpoint_every=1)
    with pytest.raises(StepadaptError, match="nothing to resume"):
        train(build_unet("tiny"), x, DEFAULT_SCHEDULER, cfg, tmp_path, resume=True, progress=False)
    train(build_unet("tiny"), x, DEFAULT_SCHEDULER, cfg, tmp_path, progress=False)
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:500])
    with pytest.raises(StepadaptError, match="corrupt"):
        train(build_unet("tiny"), x, DEFAULT_SCHEDULER, cfg, tmp_path, resume=True, progress=False)


def test_resume_with_other_options_is_refused(tmp_path, squares):
    x = squares(8)
    cfg = TrainConfig(iterations=2, batch_size=4, warmup=1, checkpoint_every=1)
    train(build_unet("tiny"), x, DEFAULT_SCHEDULER, cfg, tmp_path, progress=False)
    other = TrainConfig(**{**cfg.to_dict(), "lr": 1e-4})
    with pytest.raises(StepadaptError, match="options differ.*lr"):
        train(build_unet("tiny"), x, DEFAULT_SCHEDULER, other, tmp_path, resume=True, progress=False)


def test_bad_data_and_interval_are_refused(tmp_path, squares):
    cfg = TrainConfig(iterations=1, batch_size=2)
    with pytest.raises(StepadaptError, match="shape"):
        train(build_unet("tiny"), torch.zeros(4, 3, 32, 32), DEFAULT_SCHEDULER, cfg, tmp_path)
    nan = squares(4)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(StepadaptError, match="NaN"):
        train(build_unet("tiny"), nan, DEFAULT_SCHEDULER, cfg, tmp_path)
    bad = TrainConfig(iterations=1, batch_size=2, t_lo=500, t_hi=400)
    with pytest.raises(StepadaptError, match="interval"):
        train(build_unet("tiny"), squares(4), DEFAULT_SCHEDULER, bad, tmp_path)


def test_train_config_round_trips_and_rejects_unknown_keys():
    cfg = TrainConfig(iterations=7, t_lo=10, t_hi=20)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(StepadaptError, match="unknown training options"):
        TrainConfig.from_dict({"iterations": 1, "bogus": 2})


def test_relative_weights_count_errors_in_units_of_the_base_loss():
    """1 / (the base's loss at t), mean 1 over the interval: the trained base's noisy end weighs most."""
    from stepadapt.data import load_dataset
    from stepadapt.difficulty import loss_profile
    from stepadapt.models import DEFAULT_BASE, load_base
    from stepadapt.train import RELATIVE_PROXY, relative_weights

    base, sched = load_base(DEFAULT_BASE)
    x = load_dataset("fashion-mnist", "train", 32, 1, limit=256)
    w = relative_weights(base, sched, x, 300, 1000, seed=0)
    assert w.shape == (1000,)
    assert w[300:].mean().item() == pytest.approx(1.0, abs=1e-5)
    assert w[990] > 20 * w[310]  # the base's loss at t=990 is ~1e-4, at t=310 ~2e-2
    proxy = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:RELATIVE_PROXY]]
    ref = torch.from_numpy(loss_profile(base, sched, proxy, points=50, seed=0, log=True)).float()
    assert torch.allclose(w * ref, (w * ref)[500].expand(1000), rtol=1e-4)  # w is proportional to 1/ref


def test_relative_weights_need_the_base(tmp_path, squares):
    cfg = TrainConfig(iterations=2, batch_size=4, warmup=0, loss_weight="relative")
    with pytest.raises(StepadaptError, match="base"):
        train(build_unet("tiny", seed=0), squares(), DEFAULT_SCHEDULER, cfg, tmp_path, progress=False)


def test_progress_off_a_terminal_writes_a_line_per_interval_not_per_update():
    import io

    from stepadapt.progress import progress

    buf = io.StringIO()  # pytest's stderr is not a terminal either
    with progress(total=2000, file=buf) as bar:
        for i in range(2000):
            bar.set_postfix(loss=i, refresh=False)
            bar.update(1)
    redraws = buf.getvalue().count("\r")
    assert 1 <= redraws <= 3, redraws  # first, last, maybe one 30 s tick; per update would be 2000
