"""Stable Diffusion pipeline directories as bases: loading, faithful sampling against diffusers'
StableDiffusionPipeline, and StepAdaptivePipeline's call."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UniPCMultistepScheduler
from tiny_sd import MAX_LENGTH, write_tiny_pipeline
from typer.testing import CliRunner

from stepadapt import StepadaptError
from stepadapt.api import StepAdaptivePipeline
from stepadapt.cli import app
from stepadapt.pipeline import Surround, surround_of

PROMPT = "a photo of an ankle boot"
NEGATIVE = "a bag"


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


def _reference(pipe_dir, scheduler_cls, steps: int, n: int, guidance: float, negative: str | None):
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, use_safetensors=True, safety_checker=None)
    if scheduler_cls is not None:  # None: the pipeline's own (from_config would undo its corrections)
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPT, negative_prompt=negative, guidance_scale=guidance, num_inference_steps=steps,
        num_images_per_prompt=n, generator=torch.Generator().manual_seed(0), output_type="np",
    ).images  # fmt: skip
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize(
    ("sampler", "scheduler_cls", "guidance", "negative"),
    [("ddim", DDIMScheduler, 7.5, NEGATIVE), ("unipc", UniPCMultistepScheduler, 3.0, None)],
)
def test_sample_base_equals_stable_diffusion_pipeline(
    pipe_dir, tmp_path, sampler, scheduler_cls, guidance, negative
):
    """`stepadapt sample --base PIPE --prompt ...` gives the pipeline's images for the same seed,
    prompt, negative prompt and guidance (within 1/255), with DDIM and a multistep solver."""
    want = _reference(pipe_dir, scheduler_cls, 6, 2, guidance, negative)
    out = tmp_path / "s.png"
    args = ["sample", "--base", str(pipe_dir), "--prompt", PROMPT, "--guidance-scale", str(guidance),
            "--steps", "6", "--seed", "0", "--n", "2", "--sampler", sampler, "--out", str(out)]  # fmt: skip
    if negative:
        args += ["--negative-prompt", negative]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    got = np.load(out.with_suffix(".npz"))["images"]
    assert got.shape == want.shape == (2, 32, 32, 1)
    assert int(np.abs(got.astype(int) - want.astype(int)).max()) <= 1
    assert got.std() > 0  # not a blank image that would equal anything blank


def test_an_old_scheduler_config_is_corrected_as_the_pipeline_corrects_it(pipe_dir, tmp_path):
    """A scheduler config written before SD's fixes (no clip_sample, so DDPMScheduler's True, and
    steps_offset 0): StableDiffusionPipeline turns clipping off and offsets the steps; so do we."""
    import json
    import shutil

    old = shutil.copytree(pipe_dir, tmp_path / "old")
    cfg_path = old / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("clip_sample", None)
    cfg["steps_offset"] = 0
    cfg_path.write_text(json.dumps(cfg))
    with pytest.warns(FutureWarning):  # diffusers says it corrects the config
        want = _reference(old, None, 6, 1, 7.5, None)  # the directory's own DDIMScheduler
    out = tmp_path / "s.png"
    args = ["sample", "--base", str(old), "--prompt", PROMPT, "--steps", "6", "--seed", "0", "--n", "1",
            "--sampler", "ddim", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    got = np.load(out.with_suffix(".npz"))["images"]
    assert int(np.abs(got.astype(int) - want.astype(int)).max()) <= 1


def test_guidance_and_negative_prompt_change_the_images(pipe_dir):
    pipe = StepAdaptivePipeline.from_base(pipe_dir)
    kw = dict(num_inference_steps=4, output_type="uint8")

    def run(**more):
        return pipe(PROMPT, generator=torch.Generator().manual_seed(1), **kw, **more).images

    plain, guided, negative = (
        run(guidance_scale=1.0),
        run(guidance_scale=5.0),
        run(guidance_scale=5.0, negative_prompt=NEGATIVE),
    )
    assert not np.array_equal(plain, guided)
    assert not np.array_equal(guided, negative)
    again = run(guidance_scale=5.0, negative_prompt=NEGATIVE)
    assert np.array_equal(negative, again)


def test_pipeline_call_returns_pil_images_and_says_truncation(pipe_dir):
    pipe = StepAdaptivePipeline.from_pretrained(pipe_dir)
    long = " ".join(["a photo of a coat"] * MAX_LENGTH)
    out = pipe(
        [PROMPT, long],
        num_inference_steps=3,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(out.images) == 4 and out.images[0].size == (32, 32) and out.images[0].mode == "L"
    assert out.truncated == (False, True)


def test_without_a_generator_the_global_seed_decides_and_is_not_reseeded(pipe_dir):
    """generator=None draws from torch's global generator as diffusers does: torch.manual_seed
    before the call repeats it, and the caller's stream goes on where the call left it."""
    pipe = StepAdaptivePipeline.from_pretrained(pipe_dir)

    def run():
        torch.manual_seed(7)
        images = pipe(PROMPT, num_inference_steps=2, output_type="uint8").images
        return images, torch.rand(1)

    (a, after_a), (b, after_b) = run(), run()
    assert np.array_equal(a, b) and torch.equal(after_a, after_b)


def test_text_pipeline_refuses_what_it_cannot_take(pipe_dir):
    pipe = StepAdaptivePipeline.from_base(pipe_dir)
    with pytest.raises(StepadaptError, match="give a prompt"):
        pipe(num_inference_steps=2)
    with pytest.raises(StepadaptError, match="conditioned on text"):
        pipe(PROMPT, class_labels=[1], num_inference_steps=2)
    with pytest.raises(StepadaptError, match="finite"):
        pipe(PROMPT, guidance_scale=float("nan"), num_inference_steps=2)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("cross_attention_dim", 48, "text encoder's width is 32; the U-Net cross-attends over 48"),
     ("in_channels", 9, "VAE makes 4-channel latents; the U-Net takes 9 channels")],
)  # fmt: skip
def test_parts_that_do_not_fit_the_unet_are_one_line(pipe_dir, tmp_path, key, value, message):
    """SDXL's wider text, an inpainting U-Net's 9 input channels: said where the pipeline loads."""
    import json
    import shutil

    odd = shutil.copytree(pipe_dir, tmp_path / "odd")
    cfg = json.loads((odd / "unet" / "config.json").read_text())
    (odd / "unet" / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(StepadaptError, match=message):
        surround_of(odd)


def test_surround_loads_and_refuses_pickles(pipe_dir, tmp_path):
    s = surround_of(pipe_dir)
    assert s is not None and s.vae is not None and s.text is not None
    assert s.latent.factor == 4 and s.text.max_length == MAX_LENGTH
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(pipe_dir, bad)
    (bad / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (bad / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(StepadaptError, match="pickled weights"):
        Surround.load(bad)
    json.loads((pipe_dir / "model_index.json").read_text())  # the index stays plain JSON


def test_a_bundle_copies_only_the_files_the_pipeline_loads(pipe_dir, tmp_path):
    """A hub download holds variants, flax weights, pickles beside safetensors and dotfiles: the
    bundle copies (and hashes, and verifies on every load) only what the pipeline loads."""
    import shutil

    from stepadapt.pipeline import copy_surround

    full = shutil.copytree(pipe_dir, tmp_path / "full")
    for junk in ("diffusion_pytorch_model.fp16.safetensors", "flax_model.msgpack", "pytorch_model.bin",
                 ".DS_Store", "model.onnx"):  # fmt: skip
        (full / "vae" / junk).write_bytes(b"x")
    record = copy_surround(full, tmp_path / "out")
    assert set(record["vae"]) == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert {p.name for p in (tmp_path / "out" / "vae").iterdir()} == set(record["vae"])
    assert "tokenizer_config.json" in record["tokenizer"] and "text_encoder" in record


SHIPPED = Path(__file__).resolve().parents[1] / "stepadapt" / "weights"


@pytest.mark.parametrize(
    ("bundle", "call", "flags"),
    [
        ("fashion-tiny-experts", dict(num_images_per_prompt=3), []),
        (
            "fashion-tiny-cond-experts",
            dict(class_labels=[1, 7, 9], guidance_scale=3.0),
            ["--class-labels", "1,7,9", "--guidance-scale", "3"],
        ),
    ],
)
def test_pipeline_api_serves_every_kind_of_bundle_as_sample_does(bundle, call, flags, tmp_path):
    """Unconditional and class bundles called like a diffusers pipeline give `stepadapt sample`'s
    images (DDIM: the same initial noise, no other draw)."""
    pipe = StepAdaptivePipeline.from_bundle(SHIPPED / bundle)
    out = pipe(**call, num_inference_steps=6, sampler="ddim", generator=torch.Generator().manual_seed(4))
    assert len(out.images) == 3 and out.images[0].mode == "L" and out.images[0].size == (32, 32)
    path = tmp_path / "s.png"
    args = ["sample", "--bundle", str(SHIPPED / bundle), "--n", "3", "--steps", "6", "--sampler", "ddim",
            "--seed", "4", "--out", str(path), *flags]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    want = np.load(path.with_suffix(".npz"))["images"]
    got = np.stack([np.asarray(im)[..., None] for im in out.images])
    assert np.array_equal(got, want)
    with pytest.raises(StepadaptError, match="takes no text"):
        pipe("a photo of a coat", num_inference_steps=2)
