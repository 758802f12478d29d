"""The endpoint's condition inputs: what a request's ``class_labels``, ``prompt``,
``negative_prompt`` and ``guidance_scale`` mean for the served bundle, checked before the request
joins a batch.

A request's condition is checked alone, so a bad one is its own 400 and never fails the requests
it would have been stepped with. The checked condition is the sampler's own
(:mod:`stepadapt.conditioning`): labels as int64 rows and a guidance scale per row, so concurrent
requests with different labels and scales stack into one batch, and classifier-free guidance
(``conditioning.guided``) runs each expert once per step for all of them.

Torch and numpy only, no Triton: the router imports it, and its rules are tested without a server.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from stepadapt import StepadaptError
from stepadapt.conditioning import CLASS_LABELS, GUIDANCE, TEXT, Cond, Conditioning, labels_cond
from stepadapt.text import SD_GUIDANCE, TextEncoder

__all__ = [
    "CLASS_LABELS",
    "GUIDANCE",
    "TEXT",
    "prompt_condition",
    "request_condition",
    "takes_labels",
    "takes_text",
]


def takes_labels(onnx_record: dict | None) -> bool:
    """Whether an expert's ONNX export takes ``class_labels`` (from the manifest's record of its
    inputs): a class-conditional U-Net does, the closed-form Gaussian beside it does not."""
    return CLASS_LABELS in (onnx_record or {}).get("inputs", {})


def takes_text(onnx_record: dict | None) -> bool:
    """Whether an expert's ONNX export takes the text embedding (``encoder_hidden_states``)."""
    return TEXT in (onnx_record or {}).get("inputs", {})


def request_condition(
    conditioning: Conditioning,
    n: int,
    labels: np.ndarray | None,
    guidance_scale: float | None,
) -> Cond:
    """The condition of a request for ``n`` images, or a one-line error saying what is wrong.

    A class-conditional bundle needs one label per image (its null label, ``classes``, asks for an
    unconditional image; none, or an empty list, is refused); ``guidance_scale`` defaults to 1
    (no guidance: one model row per image; the manifest records no recommended scale). An
    unconditional bundle takes neither input, so a client that believes it talks to another
    bundle hears so instead of getting images that ignored its labels.
    """
    if conditioning.text_dim:
        raise StepadaptError("this bundle is text-conditioned: send a prompt")
    if not conditioning.classes:
        for name, given in ((CLASS_LABELS, labels), (GUIDANCE, guidance_scale)):
            if given is not None:
                raise StepadaptError(f"{name} given, but this bundle is not class-conditional")
        return {}
    if labels is None or not np.size(labels):
        raise StepadaptError(
            f"this bundle is class-conditional: send class_labels, one per image "
            f"(0..{conditioning.classes - 1}, or {conditioning.null_label} for no class)"
        )
    labels = np.asarray(labels).reshape(-1)
    if labels.size != n:
        raise StepadaptError(f"class_labels holds {labels.size} labels for num_images={n}")
    scale = 1.0 if guidance_scale is None else float(guidance_scale)
    if not math.isfinite(scale):
        raise StepadaptError(f"guidance_scale must be a finite number, got {scale}")
    cond = labels_cond(torch.from_numpy(labels.astype(np.int64)), scale)
    conditioning.check(cond, n)  # labels out of range, in the library's words
    return cond


def prompt_condition(
    text: TextEncoder | None,
    n: int,
    prompt: str | None,
    negative_prompt: str | None,
    guidance_scale: float | None,
    labels: np.ndarray | None = None,
) -> tuple[Cond, bool]:
    """The condition of a request for ``n`` images of one prompt, and whether the prompt (or its
    negative) was cut to the tokenizer's limit, as diffusers cuts it. The text encoder runs once
    for the request, not once per image; guidance defaults to Stable Diffusion's 7.5."""
    if text is None:
        raise StepadaptError("prompt given, but this bundle is not text-conditioned")
    if labels is not None and np.size(labels):
        raise StepadaptError(f"{CLASS_LABELS} given, but this bundle is conditioned on text")
    if prompt is None:
        raise StepadaptError("this bundle is text-conditioned: send a prompt")
    scale = SD_GUIDANCE if guidance_scale is None else float(guidance_scale)
    if not math.isfinite(scale):
        raise StepadaptError(f"guidance_scale must be a finite number, got {scale}")
    cond, truncated = text.condition([prompt], None if negative_prompt is None else [negative_prompt], scale)
    return {k: v.expand(n, *v.shape[1:]).contiguous() for k, v in cond.items()}, bool(truncated[0])
