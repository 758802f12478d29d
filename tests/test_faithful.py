"""A user's own diffusers model is sampled and trained the way diffusers itself would."""

import numpy as np
import pytest
import torch
from conftest import OWN_SCHEDULER as OWN
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from typer.testing import CliRunner

from stepadapt import StepadaptError
from stepadapt.cli import app
from stepadapt.models import load_base
from stepadapt.schedule import make_scheduler, model_target, per_sample
from stepadapt.train import denoising_losses, min_snr_weight


def _pipeline_images(pipe, **kw) -> np.ndarray:
    out = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=8,
               output_type="np", **kw).images  # fmt: skip
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_base_gives_what_the_models_own_diffusers_pipeline_gives(own_model, tmp_path, sampler):
    args = ["--n", "2", "--steps", "8", "--seed", "3", "--sampler", sampler]
    r = CliRunner().invoke(app, ["sample", "--base", str(own_model), *args, "--out", str(tmp_path / "s.png")])
    assert r.exit_code == 0, r.output
    ours = np.load(tmp_path / "s.npz")["images"]
    unet = UNet2DModel.from_pretrained(own_model).eval()
    if sampler == "ddpm":
        theirs = _pipeline_images(DDPMPipeline(unet, DDPMScheduler.from_pretrained(own_model)))
    else:
        sched = DDIMScheduler.from_config(DDPMScheduler.load_config(own_model))
        theirs = _pipeline_images(DDIMPipeline(unet, sched), eta=0.0)
    assert ours.shape == theirs.shape == (2, 32, 32, 1)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    # The same weights under DDPMScheduler's defaults (what keeping a few keys gave) differ.
    (own_model / "scheduler_config.json").unlink()
    r = CliRunner().invoke(app, ["sample", "--base", str(own_model), *args, "--out", str(tmp_path / "d.png")])
    assert np.abs(np.load(tmp_path / "d.npz")["images"].astype(int) - ours.astype(int)).max() > 16


def test_the_whole_scheduler_config_is_kept(own_model):
    _, cfg = load_base(own_model)
    for k, v in OWN.items():
        assert cfg[k] == v, k
    assert not any(k.startswith("_") for k in cfg)


def test_bad_scheduler_configs_are_one_line_errors(own_model):
    p = own_model / "scheduler_config.json"
    p.write_text(p.read_text().replace('"v_prediction"', '"flow"'))
    with pytest.raises(StepadaptError, match="prediction_type 'flow' is not one of epsilon, v_prediction"):
        load_base(own_model)
    with pytest.raises(StepadaptError, match="beta_schedule 'cubic'"):
        make_scheduler("ddim", {"beta_schedule": "cubic"})


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_training_target_is_the_models_own(prediction_type):
    """A model that outputs exactly its target has zero loss; the formulas are diffusers' own."""
    sched = make_scheduler("ddpm", {**OWN, "prediction_type": prediction_type})
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    target = model_target(prediction_type, x0, noise, per_sample(sched.alphas_cumprod, t, x0))
    if prediction_type == "v_prediction":
        assert torch.allclose(target, sched.get_velocity(x0, noise, t), atol=1e-6)

    class Oracle(torch.nn.Module):
        def forward(self, x_t, tt):
            return type("Out", (), {"sample": target})

    assert denoising_losses(Oracle(), sched, x0, t, noise).abs().max() < 1e-10
    eps_oracle = type(
        "E", (torch.nn.Module,), {"forward": lambda self, x, tt: type("O", (), {"sample": noise})}
    )
    if prediction_type != "epsilon":  # an eps-predictor is wrong for a v / x0 model
        assert denoising_losses(eps_oracle(), sched, x0, t, noise).mean() > 1e-3
    snr = torch.tensor([0.5, 20.0])
    assert torch.isfinite(min_snr_weight(snr, 5.0, prediction_type)).all()


def test_the_gaussian_expert_answers_in_the_models_parameterisation(squares):
    from stepadapt.gaussian import fit_gaussian

    data = squares(1100)
    eps_model = fit_gaussian(data, {**OWN, "prediction_type": "epsilon"})
    v_model = fit_gaussian(data, OWN)
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(3, 1, 32, 32, generator=g), torch.tensor([50, 400, 900])
    ab = per_sample(make_scheduler("ddpm", OWN).alphas_cumprod, t, x_t)
    eps = eps_model(x_t, t)
    x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
    assert torch.allclose(v_model(x_t, t), ab.sqrt() * eps - (1 - ab).sqrt() * x0, atol=1e-4)


@pytest.mark.slow
def test_a_cosine_v_prediction_model_goes_through_the_whole_chain(own_model, tmp_path, squares, monkeypatch):
    """analyze -> prune at --budget 0.5 (2 and 4 groups) -> finetune (on the v target) -> export ->
    serve -> generate, on a model whose scheduler is nothing like the default."""
    import json

    from stepadapt.export.onnx import export_bundle, onnx_router
    from stepadapt.serving.client import GenerateRequest, generate
    from stepadapt.serving.repository import RepositoryOptions, write_repository
    from stepadapt.serving.server import TritonServer

    from stepadapt import train
    from stepadapt.bundle import Bundle
    from stepadapt.sampling import sample_images

    x = squares(64)
    data = tmp_path / "sq.npz"
    np.savez(data, images=((x[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy())
    runner = CliRunner()
    for groups in (2, 4):
        plan, out = tmp_path / f"plan{groups}.json", tmp_path / f"b{groups}"
        common = ["--base", str(own_model), "--data", str(data), "--proxy-size", "16"]
        args = ["--groups", str(groups), "--gaussian", "off", "--out", str(plan)]
        r = runner.invoke(app, ["analyze", *common, *args])
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["prune", *common, "--plan", str(plan), "--candidates", "magnitude/local",
                                "--out", str(out)])  # fmt: skip
        assert r.exit_code == 0, r.output
        b = Bundle.load(out)  # neighbours pruned to the same structure share one expert
        assert 1 < len(b.experts) <= groups and b.manifest.prediction_type == "v_prediction"
        assert b.manifest.scheduler["variance_type"] == "fixed_large"
        assert b.manifest.trajectory_macs_ratio() == pytest.approx(0.5, abs=0.05)
    seen = []
    real = train.noised_target
    monkeypatch.setattr(train, "noised_target", lambda sched, *a: seen.append(sched.config.prediction_type)
                        or real(sched, *a))  # fmt: skip
    r = runner.invoke(app, ["finetune", str(tmp_path / "b4"), "--data", str(data), "--iterations", "8",
                            "--batch-size", "8", "--distill", "0", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert seen and set(seen) == {"v_prediction"}
    b = Bundle.load(tmp_path / "b4")
    export_bundle(b, batches=(2,))
    b = Bundle.load(b.path)
    m = b.manifest
    alone = sample_images(onnx_router(b), m.scheduler, m.sample_shape, 2, steps=6, sampler="ddpm", seed=4)
    repo = write_repository(b, tmp_path / "repo", RepositoryOptions(front_instances=1, instances=1))
    with TritonServer(repo, log_path=tmp_path / "log") as server:
        served = generate(server.http_url, GenerateRequest(num_images=2, steps=6, sampler="ddpm", seed=4))
    assert np.abs(served.astype(int) - alone.astype(int)).max() <= 2
    assert json.loads((repo / "router" / "1" / "bundles" / "b4" / "manifest.json").read_text())["scheduler"][
        "prediction_type"
    ] == ("v_prediction")
