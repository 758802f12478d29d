import json

import pytest
import torch

from stepadapt import StepadaptError
from stepadapt.models import build_unet
from stepadapt.schedule import DEFAULT_SCHEDULER, make_scheduler
from stepadapt.timesteps import TIMESTEP_SAMPLERS
from stepadapt.train import TrainConfig, denoising_loss, train


def _fixed_batch_loss(model, x):
    sched = make_scheduler("ddpm", DEFAULT_SCHEDULER)
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, 1000, (len(x),), generator=g)
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        return denoising_loss(model, sched, x, t, noise).item()


class _Stop(Exception):
    pass


def _stop(step, _):
    raise _Stop


def _stopped_and_resumed(x, cfg: TrainConfig, at: int, out):
    """The same run stopped at step ``at`` (raised from the sample hook: a run of ``at`` iterations
    would have another LR schedule), then resumed from its checkpoint into a model initialised
    otherwise, so that everything has to come from the checkpoint."""
    part = TrainConfig(**{**cfg.to_dict(), "sample_every": at})
    with pytest.raises(_Stop):
        train(build_unet("tiny", seed=0), x, DEFAULT_SCHEDULER, part, out, progress=False, on_sample=_stop)
    resumed = build_unet("tiny", seed=99)
    ema, res = train(resumed, x, DEFAULT_SCHEDULER, part, out, resume=True, progress=False)
    return resumed, ema, res


@pytest.mark.slow
def test_a_few_steps_lower_the_loss(tmp_path, squares):
    x = squares()
    model = build_unet("tiny", seed=0)
    before = _fixed_batch_loss(model, x)
    cfg = TrainConfig(iterations=25, batch_size=16, lr=2e-3, warmup=2, checkpoint_every=100)
    train(model, x, DEFAULT_SCHEDULER, cfg, tmp_path, progress=False)
    after = _fixed_batch_loss(model.eval(), x)
    assert after < 0.8 * before


@pytest.mark.slow
@pytest.mark.parametrize("sampler", TIMESTEP_SAMPLERS)
def test_resume_equals_uninterrupted_run(tmp_path, squares, sampler):
    """Model, EMA, optimizer, generator and the timestep sampler's own state all come back."""
    x = squares()
    lo, hi = (30, 50) if sampler == "visited" else (10, 13)  # 25 DDIM steps visit t=40 there
    cfg = TrainConfig(
        iterations=6, batch_size=8, warmup=2, checkpoint_every=3, ema_decay=0.9,
        timestep_sampler=sampler, t_lo=lo, t_hi=hi, clusters=3, patience=1, probe_images=2,
    )  # fmt: skip
    full = build_unet("tiny", seed=0)
    ema_full, _ = train(full, x, DEFAULT_SCHEDULER, cfg, tmp_path / "a", progress=False)

    resumed, ema_res, res = _stopped_and_resumed(x, cfg, 3, tmp_path / "b")
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_mixed_precision_trains_fp32_weights_with_bf16_forward_passes(tmp_path, squares):
    """bf16 autocast (CPU autocast here; a GPU's under --precision auto) lowers the loss like fp32
    does, keeps weights fp32, and really changes the arithmetic (the weights differ from fp32's)."""
    x = squares()
    before = _fixed_batch_loss(build_unet("tiny", seed=0), x)
    runs = {}
    for precision in ("fp32", "bf16"):
        model = build_unet("tiny", seed=0)
        cfg = TrainConfig(iterations=25, batch_size=16, lr=2e-3, warmup=2, checkpoint_every=100,
                          precision=precision)  # fmt: skip
        train(model, x, DEFAULT_SCHEDULER, cfg, tmp_path / precision, progress=False)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert json.loads((tmp_path / precision / "train_log.json").read_text())["precision"] == precision
        runs[precision] = model.eval()
    assert _fixed_batch_loss(runs["bf16"], x) < 0.8 * before
    pairs = zip(runs["fp32"].parameters(), runs["bf16"].parameters(), strict=True)
    diff = max((a - b).abs().max().item() for a, b in pairs)
    assert diff > 1e-6


@pytest.mark.slow
def test_fp16_resume_restores_the_loss_scale(tmp_path, squares):
    """fp16 scales the loss (lowering the scale, and skipping the step, where gradients overflow;
    raising it after a run of clean steps); the scaler's state is in the checkpoint, so a resumed
    fp16 run is the uninterrupted one, weights and scaler alike."""
    x = squares()[:16]
    cfg = TrainConfig(iterations=4, batch_size=4, warmup=1, checkpoint_every=2, precision="fp16")
    full = build_unet("tiny", seed=0)
    train(full, x, DEFAULT_SCHEDULER, cfg, tmp_path / "a", progress=False)
    resumed, _, _ = _stopped_and_resumed(x, cfg, 2, tmp_path / "b")
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    scalers = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["grad_scaler"] for d in "ab"]
    # a fresh scaler on resume would have counted 2 clean steps since its start, not 4
    assert scalers[0] == scalers[1] and scalers[0]["_growth_tracker"] == 4


def test_resume_where_auto_means_another_precision_is_refused(tmp_path, squares, monkeypatch):
    """--precision auto is fp32 on this CPU; a resume where it would mean bf16 (a GPU) would change
    the arithmetic mid-run, so it is refused in one line instead."""
    import stepadapt.train as train_module

    x = squares()[:8]
    cfg = TrainConfig(iterations=2, batch_size=4, warmup=1, checkpoint_every=1)  # precision auto
    train(build_unet("tiny", seed=0), x, DEFAULT_SCHEDULER, cfg, tmp_path, progress=False)
    monkeypatch.setattr(train_module, "resolve_precision", lambda name, device: "bf16")
    with pytest.raises(StepadaptError, match="checkpoint trained in fp32, this run would use bf16"):
        train(build_unet("tiny", seed=0), x, DEFAULT_SCHEDULER, cfg, tmp_path, resume=True, progress=False)


def test_precision_choice(monkeypatch):
    """auto: fp32 on a CPU; on a CUDA device bf16 where the GPU has it in hardware (compute
    capability 8), else fp16 (tested here without a GPU, on the capability it would report)."""
    from stepadapt.devices import resolve_precision

    assert resolve_precision("auto", "cpu") == "fp32"
    asked = []

    def capability(device=None):
        asked.append(device)
        return (8, 0) if device is None else (7, 5)  # the current GPU an A100, cuda:1 a T4

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", torch.device("cuda", 1)) == "fp16"  # bf16 only emulated there
    assert asked == [None, torch.device("cuda", 1)]
    assert resolve_precision("fp16", "cpu") == "fp16"
    with pytest.raises(StepadaptError, match="--precision must be one of"):
        TrainConfig(precision="fp8").validate()


@pytest.mark.slow
def test_a_trainer_driven_step_by_step_then_restored_equals_one_run(tmp_path, squares):
    """Trainer's parts alone: N steps and a checkpoint by hand, then a fresh Trainer restored from
    it and run to the end, give the weights of one train() call (the adaptive sampler's probes too)."""
    from stepadapt.train import Trainer

    x = squares()
    cfg = TrainConfig(
        iterations=6, batch_size=8, warmup=2, checkpoint_every=100, ema_decay=0.9,
        timestep_sampler="adaptive", t_lo=10, t_hi=13, probe_images=2,
    )  # fmt: skip
    full = build_unet("tiny", seed=0)
    ema_full, res_full = train(full, x, DEFAULT_SCHEDULER, cfg, tmp_path / "a", progress=False)

    first = Trainer(build_unet("tiny", seed=0), x, DEFAULT_SCHEDULER, cfg, tmp_path / "b")
    smoothed = [first.step() for _ in range(4)]
    assert first.steps == 4 and first.losses == smoothed
    first.checkpoint()

    second = Trainer(build_unet("tiny", seed=99), x, DEFAULT_SCHEDULER, cfg, tmp_path / "b")
    second.restore()
    assert second.steps == 4 and second.losses == first.losses
    ema, res = second.run(progress=False)
    assert res.steps == 6 and res.final_loss == res_full.final_loss
    for (k, a), b in zip(full.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for a, b in zip(ema_full.parameters(), ema.parameters(), strict=True):
        assert torch.equal(a, b)
    log = json.loads((tmp_path / "b" / "train_log.json").read_text())
    assert log["resumed_from"] == 4 and log["config"]["timestep_sampler"] == "adaptive"


def test_only_a_sampler_that_needs_probes_draws_them(tmp_path, squares):
    """Probes cost forward passes and generator draws: adaptive gets them, on probe_images images;
    uniform gets none and leaves the generator where it was."""
    from stepadapt.train import Trainer

    x = squares(8)
    cfg = TrainConfig(iterations=1, batch_size=4, timestep_sampler="adaptive", probe_images=2)
    adaptive = Trainer(build_unet("tiny", seed=0), x, DEFAULT_SCHEDULER, cfg, tmp_path / "a")
    probe = adaptive.probe(x[:4], {})
    assert probe is not None and probe.x0.shape == probe.noise.shape == (2, 1, 32, 32)
    assert adaptive.probe_losses(probe).shape == probe.t.shape
    uniform = Trainer(
        build_unet("tiny", seed=0), x, DEFAULT_SCHEDULER, TrainConfig(iterations=1), tmp_path / "u"
    )
    state = uniform.generator.get_state()
    assert uniform.probe(x[:4], {}) is None and uniform.probe_losses(None) is None
    assert torch.equal(uniform.generator.get_state(), state)


def test_loss_weight_registry_says_what_each_needs(tmp_path, squares):
    from stepadapt.train import LOSS_WEIGHTS, Trainer, loss_weight_class

    assert LOSS_WEIGHTS == ("none", "min-snr", "relative")
    assert loss_weight_class("relative").needs_teacher is True
    assert loss_weight_class("none").needs_teacher is False
    assert loss_weight_class("min-snr").needs_teacher is False
    assert TrainConfig(loss_weight="relative").needs_teacher
    assert not TrainConfig(loss_weight="min-snr").needs_teacher
    assert TrainConfig(distill=0.5).needs_teacher  # distillation reads the base too
    with pytest.raises(
        StepadaptError, match=r"unknown loss weight 'snr'; choose one of none, min-snr, relative"
    ):
        loss_weight_class("snr")
    with pytest.raises(StepadaptError, match="unknown loss weight 'snr'"):
        TrainConfig(loss_weight="snr").validate()
    relative = TrainConfig(iterations=1, batch_size=4, loss_weight="relative")
    with pytest.raises(StepadaptError, match=r"^relative loss weights divide by the base's own loss: give"):
        Trainer(build_unet("tiny"), squares(4), DEFAULT_SCHEDULER, relative, tmp_path)


def test_loss_weights_weigh_by_timestep():
    from stepadapt.schedule import snr
    from stepadapt.train import WeightInputs, loss_weight_class, min_snr_weight

    sched = make_scheduler("ddpm", DEFAULT_SCHEDULER)
    cfg = TrainConfig(min_snr_gamma=2.0)
    t, w = torch.tensor([0, 500, 999]), torch.tensor([1.0, 2.0, 3.0])
    run = WeightInputs(cfg, sched, DEFAULT_SCHEDULER, torch.zeros(1), 1000, None)
    none = loss_weight_class("none").prepare(run)
    assert torch.equal(none.apply(w, t), w)
    min_snr = loss_weight_class("min-snr").prepare(run)
    assert torch.equal(min_snr.apply(w, t), w * min_snr_weight(snr(sched).float()[t], 2.0))
    assert min_snr.apply(w, t)[0] < w[0]  # t=0: SNR far above gamma, weight gamma/SNR


def test_old_sampler_key_reads_as_timestep_sampler():
    """Bundle manifests' training records and old checkpoints carry the field's old name."""
    cfg = TrainConfig.from_dict({"iterations": 3, "sampler": "curriculum"})
    assert cfg.timestep_sampler == "curriculum" and "sampler" not in cfg.to_dict()
    assert (
        TrainConfig.from_dict({"sampler": "visited", "timestep_sampler": "visited"}).timestep_sampler
        == "visited"
    )
    with pytest.raises(StepadaptError, match="both sampler='adaptive' and timestep_sampler='uniform'"):
        TrainConfig.from_dict({"sampler": "adaptive", "timestep_sampler": "uniform"})


def test_resume_from_a_checkpoint_written_before_the_rename(tmp_path, squares):
    """A checkpoint whose stored config says 'sampler' resumes under the renamed field."""
    x = squares(8)
    cfg = TrainConfig(iterations=2, batch_size=4, warmup=1, checkpoint_every=1, timestep_sampler="curriculum")
    train(build_unet("tiny", seed=0), x, DEFAULT_SCHEDULER, cfg, tmp_path, progress=False)
    path = tmp_path / "checkpoint.pt"
    st = torch.load(path, weights_only=False)
    old = json.loads(st["config"])
    old["sampler"] = old.pop("timestep_sampler")
    st["config"] = json.dumps(old)
    torch.save(st, path)
    _, res = train(
        build_unet("tiny", seed=0), x, DEFAULT_SCHEDULER, cfg, tmp_path, resume=True, progress=False
    )
    assert res.steps == 2


def test_a_resume_on_other_training_images_is_refused(tmp_path, squares):
    """Other --data, --holdout or --limit would continue the run on other images from the saved
    generator state: not the run it claims to be."""
    cfg = TrainConfig(iterations=2, batch_size=4, warmup=1, checkpoint_every=1)
    train(build_unet("tiny"), squares(8), DEFAULT_SCHEDULER, cfg, tmp_path, progress=False)
    with pytest.raises(StepadaptError, match="training images differ"):
        train(
            build_unet("tiny"),
            squares(8, seed=1),
            DEFAULT_SCHEDULER,
            cfg,
            tmp_path,
            resume=True,
            progress=False,
        )
    ema, res = train(
        build_unet("tiny"), squares(8), DEFAULT_SCHEDULER, cfg, tmp_path, resume=True, progress=False
    )
    assert res.steps == 2
