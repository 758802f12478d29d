"""Every diffusers solver by name: specs, configs, faithfulness to diffusers' own loop, what an image
costs per model evaluation, and the analytic jump over the Gaussian expert's interval."""

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OWN_SCHEDULER as OWN
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)
from typer.testing import CliRunner

from stepadapt import StepadaptError
from stepadapt.bundle import Bundle
from stepadapt.cli import app
from stepadapt.gaussian import GaussianJump, fit_gaussian
from stepadapt.sampling import Trajectory, sample
from stepadapt.schedule import DEFAULT_SCHEDULER, make_scheduler
from stepadapt.solvers import NAMES, Setting, Solver, resolve_setting

SHIPPED = Path(__file__).resolve().parents[1] / "stepadapt" / "weights" / "fashion-tiny-experts"

# What each name means, written out against diffusers alone (not through stepadapt's registry).
DIFFUSERS = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++3m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpm++2m-sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpm++sde": (DPMSolverSDEScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
}


def test_the_registry_is_diffusers_zoo():
    assert set(NAMES) == set(DIFFUSERS)
    for name, (cls, fixed) in DIFFUSERS.items():
        s = Solver.parse(name).scheduler(DEFAULT_SCHEDULER)
        assert type(s) is cls
        assert all(s.config[k] == v for k, v in fixed.items())


@pytest.mark.parametrize(
    "spec, want",
    [("unipc", Solver("unipc")), ("DPM++2M:thresholding", Solver("dpm++2m", thresholding=True)),
     ("ddim:eta=0.5,spacing=trailing,no-clip", Solver("ddim", spacing="trailing", clip=False, eta=0.5)),
     ("euler:karras", Solver("euler", karras=True))],
)  # fmt: skip
def test_specs_round_trip_through_strings_and_json(spec, want):
    got = Solver.parse(spec)
    assert got == want
    assert Solver.parse(str(got)) == got
    assert Solver.from_dict(json.loads(json.dumps(got.to_dict()))) == got


@pytest.mark.parametrize(
    "spec, msg",
    [("dpm++9m", "unknown sampler 'dpm\\+\\+9m'"), ("ddim:turbo", "unknown sampler option 'turbo'"),
     ("euler:thresholding", "sampler euler has no option 'thresholding'"),
     ("ddim:karras", "sampler ddim has no option 'karras'"), ("ddim:spacing=odd", "spacing 'odd'"),
     ("unipc:eta=0.3", "only ddim"), ("ddim:eta=x", "eta must be a number"),
     ("ddim:eta=2", "eta must be in")],
)  # fmt: skip
def test_bad_specs_are_one_line_errors(spec, msg):
    with pytest.raises(StepadaptError, match=msg) as e:
        Solver.parse(spec)
    assert "\n" not in str(e.value)


def test_options_reach_the_scheduler_and_the_model_config_stays_underneath():
    s = Solver.parse("dpm++2m:thresholding,karras,spacing=leading").scheduler(OWN)
    assert s.config.thresholding and s.config.use_karras_sigmas and s.config.timestep_spacing == "leading"
    assert s.config.prediction_type == "v_prediction" and s.config.beta_schedule == "squaredcos_cap_v2"
    assert Solver.parse("ddim").scheduler(OWN).config.timestep_spacing == "trailing"  # the model's own
    assert Solver.parse("ddim:clip").scheduler(OWN).config.clip_sample is True
    # A fresh instance each time: a multi-step solver's history belongs to one trajectory.
    solver = Solver.parse("unipc")
    assert solver.scheduler(OWN) is not solver.scheduler(OWN)


def test_settings_follow_flags_then_the_recommendation_then_ddim_50():
    rec = {"sampler": "unipc", "steps": 8, "jump": True}
    assert resolve_setting(None) == Setting("ddim", 50, False)
    assert resolve_setting(rec) == Setting("unipc", 8, True)
    assert resolve_setting(rec, steps=12) == Setting("unipc", 12, True)
    assert resolve_setting(rec, "unipc") == Setting("unipc", 8, True)
    # Another solver: the recommended steps and jump were measured for unipc, not for it.
    assert resolve_setting(rec, "dpm++2m") == Setting("dpm++2m", 50, False)
    assert resolve_setting(None, eta=0.5) == Setting("ddim:eta=0.5", 50, False)


def _diffusers_loop(unet, scheduler, n: int, steps: int, seed: int) -> np.ndarray:
    """diffusers' pipeline loop as StableDiffusionPipeline writes it (set_timesteps, noise x
    init_noise_sigma, scale_model_input, the model, step with the generator and eta where step takes
    them), for an unconditional U-Net."""
    g = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn((n, 1, 32, 32), generator=g) * scheduler.init_noise_sigma
    takes = inspect.signature(scheduler.step).parameters
    extra = {k: v for k, v in (("generator", g), ("eta", 0.0)) if k in takes}
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(out, t, x, **extra).prev_sample
    return ((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_sample_base_gives_what_diffusers_loop_gives_for_every_solver(own_model, tmp_path, name):
    """The model's own scheduler config under each solver, diffusers' loop written against diffusers
    only; DDPMPipeline itself where its loop is right for the solver (no input scaling, noise at
    sigma 1, a step that takes a generator)."""
    args = ["--n", "2", "--steps", "6", "--seed", "3", "--sampler", name, "--out", str(tmp_path / "s.png")]
    r = CliRunner().invoke(app, ["sample", "--base", str(own_model), *args])
    assert r.exit_code == 0, r.output
    ours = np.load(tmp_path / "s.npz")["images"]
    unet = UNet2DModel.from_pretrained(own_model).eval()
    cls, fixed = DIFFUSERS[name]
    sched = cls.from_config(DDPMScheduler.load_config(own_model), **fixed)
    if name == "dpm++sde":
        sched.noise_sampler_seed = 3  # its Brownian tree's seed; step takes no generator
    theirs = _diffusers_loop(unet, sched, 2, 6, 3)
    assert ours.shape == theirs.shape == (2, 32, 32, 1)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    if name in ("ddpm", "dpm++2m", "dpm++3m", "dpm++2m-sde"):
        out = DDPMPipeline(unet, cls.from_config(DDPMScheduler.load_config(own_model), **fixed))(
            batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=6, output_type="np"
        ).images  # fmt: skip
        assert np.abs(ours.astype(int) - (out * 255).round().astype(int)).max() <= 1


def test_an_unknown_solver_is_a_one_line_cli_error(own_model, tmp_path):
    r = CliRunner().invoke(app, ["sample", "--base", str(own_model), "--sampler", "ddim:warp",
                                 "--out", str(tmp_path / "s.png")])  # fmt: skip
    assert r.exit_code != 0 and "unknown sampler option 'warp'" in r.output


def test_macs_per_image_count_every_model_evaluation():
    m = Bundle.load(SHIPPED).manifest
    cost = {e.name: e.macs / m.base_macs for e in m.experts}

    def by_hand(name, steps):
        ts = Solver.parse(name).evaluations(steps, m.scheduler).double()
        return sum(cost[e.name] * int(((ts >= e.lo) & (ts < e.hi)).sum()) for e in m.experts)

    assert len(Solver.parse("heun").evaluations(8, m.scheduler)) == 15  # two per step, the last Euler
    assert len(Solver.parse("euler").evaluations(8, m.scheduler)) == 8
    for name in ("heun", "euler", "unipc", "pndm", "dpm++sde"):
        assert m.macs_per_image(8, name) == pytest.approx(by_hand(name, 8))
    assert m.macs_per_image(8, "heun") > 1.8 * m.macs_per_image(8, "euler")
    assert m.macs_per_image(8, "unipc") == pytest.approx(3.3885, abs=1e-3)  # the 3.39


def test_analyze_spends_the_budget_over_the_solvers_evaluations(tmp_path):
    from stepadapt.plan import visited_timesteps

    heun = visited_timesteps("heun", 7, DEFAULT_SCHEDULER)
    assert len(heun) == 13 and heun.dtype.kind == "f"  # linspace Heun lands between timesteps
    assert visited_timesteps("heun", 10, DEFAULT_SCHEDULER).dtype.kind == "i"  # 999 / 9 = 111: whole
    assert list(visited_timesteps("ddim", 4, DEFAULT_SCHEDULER)) == [750, 500, 250, 0]


# --- the analytic jump ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gaussian():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(16, 16, generator=g) * 0.3
    data = (torch.randn(4000, 16, generator=g) @ mix + 0.2).reshape(-1, 1, 4, 4).clamp(-1, 1)
    return fit_gaussian(data, DEFAULT_SCHEDULER)


def test_the_jump_is_the_probability_flow_ode_of_the_gaussian(gaussian):
    """1000 fine DDIM (eta 0) steps with the Gaussian expert as the model, from t=999 to t=300, land
    where one transport does; the map composes and is the identity at equal noise."""
    ab = make_scheduler("ddpm", DEFAULT_SCHEDULER).alphas_cumprod.double()
    x = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    with torch.no_grad():
        for t in range(999, 300, -1):
            eps = gaussian(y, torch.full((8,), t)).double()
            a, b = ab[t], ab[t - 1]
            x0 = (y.double() - (1 - a).sqrt() * eps) / a.sqrt()
            y = (b.sqrt() * x0 + (1 - b).sqrt() * eps).float()
    jumped = gaussian.transport(x, float(ab[999]), float(ab[300]))
    assert (jumped - y).abs().max() < 2e-3 * y.abs().max()
    assert torch.allclose(gaussian.transport(x, 0.3, 0.3), x, atol=1e-6)
    two = gaussian.transport(gaussian.transport(x, 1e-4, 0.1), 0.1, 0.6)
    assert torch.allclose(two, gaussian.transport(x, 1e-4, 0.6), atol=1e-5)


def test_fractional_timesteps_see_the_noise_level_the_solver_means(gaussian):
    """Euler's sigma between training timesteps is the linear interpolation the Gaussian uses."""
    s = Solver.parse("euler").scheduler(DEFAULT_SCHEDULER)
    s.set_timesteps(7)
    frac = [(i, t) for i, t in enumerate(s.timesteps.tolist()) if t != int(t)]
    assert frac
    for i, t in frac:
        want = 1.0 / (1.0 + float(s.sigmas[i]) ** 2)
        assert float(gaussian.alpha_bar(torch.tensor([t]))) == pytest.approx(want, rel=1e-5)
    assert float(gaussian.alpha_bar(torch.tensor([500]))) == float(gaussian.alphas_cumprod[500])


@pytest.mark.parametrize("name", ["unipc", "euler", "ddim", "dpm++2m", "dpm++3m"])
def test_a_jump_spends_every_step_below_the_cut_and_lands_nearer_the_exact_answer(gaussian, name):
    """With Gaussian data and the Gaussian as the model, the exact sample is the flow from x_T to
    t = 0 in closed form; 8 steps after the jump land nearer it than 8 steps from the top (where a
    solver that mis-starts mid-schedule -- LMS, whose order follows its step index -- lands further)."""
    cfg = {**DEFAULT_SCHEDULER, "clip_sample": False}
    jump = GaussianJump(gaussian, 580)
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    errors = []
    for j in (None, jump):
        run = Trajectory(name, cfg, x, 8, jump=j)
        if j is not None:
            left = run.timesteps[run.i :]
            assert len(left) == 8 and float(left.max()) < 580 and run.i > 0
        exact = gaussian.transport(x, run._alpha_bar(0), 1.0)
        errors.append(float((sample(lambda y, t, cond: gaussian(y, t), run) - exact).abs().max()))
    assert errors[1] < 0.75 * errors[0], errors


@pytest.mark.parametrize("name", ["heun", "dpm++sde", "pndm", "lms"])
def test_solvers_that_cannot_start_mid_schedule_refuse_the_jump(gaussian, name):
    with pytest.raises(StepadaptError, match=re.escape(f"{name} is not so")):
        Trajectory(name, DEFAULT_SCHEDULER, torch.randn(1, 1, 4, 4), 6, jump=GaussianJump(gaussian, 580))
    with pytest.raises(StepadaptError, match="do not fit"):
        Trajectory("unipc", DEFAULT_SCHEDULER, torch.randn(1, 1, 4, 4), 700, jump=GaussianJump(gaussian, 580))


def test_jump_needs_a_gaussian_expert(tmp_path):
    b = Bundle.load(SHIPPED)
    assert b.jump().cut == 580 and b.manifest.macs_per_image(6, "unipc", jump=True) > 0
    r = CliRunner().invoke(
        app, ["sample", "--jump", "--n", "1", "--steps", "2", "--out", str(tmp_path / "x.png")]
    )
    assert r.exit_code != 0 and "--jump needs a --bundle" in r.output


def test_a_plan_spends_its_budget_over_the_solvers_evaluations():
    """analyze --sampler heun --steps 10: the budget is a mean over Heun's 19 evaluations, so the
    visit shares (what each group's budget is weighed by) are Heun's, not DDIM's."""
    from stepadapt.difficulty import normalise, snr_profile
    from stepadapt.plan import make_plan

    snr = snr_profile(DEFAULT_SCHEDULER)
    kw = dict(groups=3, budget=0.5, steps=10, scheduler_cfg=DEFAULT_SCHEDULER)
    heun = make_plan(normalise(snr), snr, 1000, sampler="heun", **kw)
    ddim = make_plan(normalise(snr), snr, 1000, sampler="ddim", **kw)
    assert heun.sampler == "heun" and heun.mean_ratio() == pytest.approx(0.5, abs=0.02)
    visits = Solver.parse("heun").evaluations(10, DEFAULT_SCHEDULER)
    for g in heun.groups:
        share = float(((visits >= g.lo) & (visits < g.hi)).double().mean())
        assert g.visit_share == pytest.approx(share)
    assert [g.visit_share for g in heun.groups] != [g.visit_share for g in ddim.groups]
