"""``StepAdaptivePipeline``: a bundle (or a base) called the way a diffusers pipeline is called.

A diffusers user's first reach is ``pipe = Pipeline.from_pretrained(...); pipe(prompt, ...).images``.
This gives them exactly that for every kind of bundle -- unconditional, class-conditional, text --
with the experts in place of the U-Net: ``prompt=``/``negative_prompt=`` (text), ``class_labels=``
(classes), ``num_inference_steps=``, ``guidance_scale=``, ``num_images_per_prompt=``,
``generator=`` (a ``torch.Generator``, drawn from as diffusers draws: the initial latents in one
call, then the solver's noise), returning ``.images`` as PIL images.

For a text bundle it is the StableDiffusionPipeline loop: prompts padded and cut to the tokenizer's
limit, classifier-free guidance above scale 1 with the negative prompt's embedding (``""`` when
none), latents decoded by the VAE after dividing by its ``scaling_factor``; the images equal the
pipeline's for the same generator (tests/test_sd_pipeline.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from stepadapt import StepadaptError
from stepadapt.conditioning import Conditioning, conditioning_of, for_model, labels_cond
from stepadapt.pipeline import Surround, surround_of
from stepadapt.sampling import Denoiser, Trajectory, images_of, module_denoiser, sample, validate_request
from stepadapt.solvers import resolve_setting
from stepadapt.text import SD_GUIDANCE

MAX_IMAGES = 4096


@dataclass
class PipelineOutput:
    """What a call returns: ``images`` (PIL, or arrays for ``output_type`` "np"/"uint8"), and which
    prompts lost words to the tokenizer's length limit."""

    images: list[Image.Image] | np.ndarray
    truncated: tuple[bool, ...] = field(default=())
    sampler: str = ""
    steps: int = 0


class StepAdaptivePipeline:
    """A denoiser (a bundle's Router, or a base U-Net) with its schedule, its conditioning and, for a
    latent text-to-image model, its VAE and text encoder."""

    def __init__(
        self,
        denoiser: Denoiser,
        scheduler_cfg: dict,
        sample_shape: Sequence[int],
        conditioning: Conditioning,
        surround: Surround | None = None,
        recommended: dict[str, Any] | None = None,
        jump: Any = None,
    ):
        self.denoiser = for_model(denoiser, conditioning)
        self.scheduler_cfg = dict(scheduler_cfg)
        self.sample_shape = tuple(int(v) for v in sample_shape)
        self.conditioning = conditioning
        self.surround = surround
        self.recommended = recommended
        self._jump = jump
        if conditioning.text_dim and (surround is None or surround.text is None):
            raise StepadaptError("a text-conditioned model needs its tokenizer and text encoder (a pipeline)")

    @classmethod
    def from_bundle(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", denoiser: Denoiser | None = None
    ) -> StepAdaptivePipeline:
        """A bundle's PyTorch experts behind its Router (or ``denoiser``: the same experts elsewhere,
        e.g. ``stepadapt.export.onnx.onnx_router(bundle)`` after export)."""
        from stepadapt.bundle import Bundle

        b = Bundle.load(path)
        m = b.manifest
        jump = b.jump() if m.recommended and m.recommended.get("jump") else None
        den = denoiser if denoiser is not None else b.router(device)
        return cls(den, m.scheduler, m.sample_shape, m.conditioning, b.surround(), m.recommended, jump)

    @classmethod
    def from_base(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> StepAdaptivePipeline:
        """A base (a U-Net directory or a diffusers pipeline directory) as it is."""
        from stepadapt.kinds import UNET
        from stepadapt.models import load_base

        model, sched = load_base(path)
        surround = surround_of(path)  # checked against the U-Net there
        den = module_denoiser(model.to(device))
        return cls(den, sched, UNET.sample_shape(model), conditioning_of(model.config), surround)

    from_pretrained = from_base  # the name a diffusers user types

    # --- the call ------------------------------------------------------------------------------
    def condition(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        class_labels: int | Sequence[int] | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
    ) -> tuple[dict[str, torch.Tensor], tuple[bool, ...]]:
        """The rows' condition (each prompt or label ``num_images_per_prompt`` times, in order) and
        which prompts were truncated; a one-line error for what this model cannot take."""
        c, n = self.conditioning, int(num_images_per_prompt)
        if n < 1:
            raise StepadaptError(f"num_images_per_prompt must be at least 1, got {n}")
        if c.text_dim:
            if class_labels is not None:
                raise StepadaptError("class labels given, but this model is conditioned on text")
            if prompt is None:
                raise StepadaptError("this model is text-conditioned: give a prompt")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
            scale = SD_GUIDANCE if guidance_scale is None else float(guidance_scale)
            cond, truncated = self.surround.text.condition(prompts, negs, scale)
            rows = torch.arange(len(prompts)).repeat_interleave(n)
            return {k: v[rows] for k, v in cond.items()}, truncated
        if prompt is not None or negative_prompt is not None:
            raise StepadaptError(f"a prompt given, but this model is {c.describe()} (it takes no text)")
        if c.classes:
            labels = (
                [class_labels] if isinstance(class_labels, int) else list(class_labels or range(c.classes))
            )
            scale = 1.0 if guidance_scale is None else float(guidance_scale)
            cond = labels_cond(torch.as_tensor(labels).repeat_interleave(n), scale if scale != 1.0 else None)
            c.check(cond, len(cond["class_labels"]))
            return cond, ()
        if class_labels is not None or (guidance_scale is not None and guidance_scale != 1.0):
            raise StepadaptError("class labels or guidance given, but this model is unconditional")
        return {}, ()

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        *,
        class_labels: int | Sequence[int] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        output_type: str = "pil",
        callback: Callable[[int, float, torch.Tensor], None] | None = None,
    ) -> PipelineOutput:
        """Images as a diffusers pipeline makes them; ``sampler`` picks a solver by spec (default: the
        bundle's recommended one, else DDIM; ``num_inference_steps``: the recommended, else 50)."""
        if output_type not in ("pil", "np", "uint8"):
            raise StepadaptError(f"output_type must be pil, np or uint8, got {output_type!r}")
        setting = resolve_setting(self.recommended, sampler, num_inference_steps)
        cond, truncated = self.condition(
            prompt, negative_prompt, class_labels, guidance_scale, num_images_per_prompt
        )
        rows = len(next(iter(cond.values()))) if cond else int(num_images_per_prompt)
        validate_request(
            setting.steps, rows, MAX_IMAGES, int(self.scheduler_cfg.get("num_train_timesteps", 1000))
        )
        if generator is None:  # a draw from torch's global generator (never reseeding it), as diffusers
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        g = generator
        x_t = torch.randn((rows, *self.sample_shape), generator=g)  # diffusers' randn_tensor on the CPU
        jump = self._jump if setting.jump else None
        run = Trajectory(setting.sampler, self.scheduler_cfg, x_t, setting.steps, generator=g,
                         seed=g.initial_seed(), jump=jump, cond=cond)  # fmt: skip
        x0 = sample(self.denoiser, run, callback=callback)
        latent = self.surround.latent if self.surround is not None else None
        images = images_of(x0, latent.decode if latent is not None else None)
        return PipelineOutput(_as(images, output_type), truncated, setting.sampler, setting.steps)


def _as(images: np.ndarray, output_type: str) -> list[Image.Image] | np.ndarray:
    if output_type == "uint8":
        return images
    if output_type == "np":
        return images.astype(np.float32) / 255.0
    return [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in images]
