"""Prompts -> text embeddings, the way diffusers' StableDiffusionPipeline makes them.

A text-conditioned U-Net cross-attends over a CLIP text encoder's last hidden states. The
pipeline pads every prompt to the tokenizer's ``model_max_length`` and cuts what is longer, and
the unconditional branch of guidance is the embedding of the negative prompt (``""`` when none),
padded to the same length. Doing exactly that is what makes our images equal to the pipeline's;
a truncated prompt is reported, since the user's words beyond the limit changed nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stepadapt import StepadaptError
from stepadapt.conditioning import GUIDANCE, NEGATIVE_TEXT, TEXT, Prompts

SD_GUIDANCE = 7.5  # StableDiffusionPipeline's default guidance scale


@dataclass(frozen=True)
class Encoded:
    """Embeddings [B, L, E] of B prompts, and which of them lost tokens to the length limit."""

    embeddings: torch.Tensor
    truncated: tuple[bool, ...]


class TextEncoder:
    """A tokenizer and a text model as one function of strings (the encoder may be a torch
    ``CLIPTextModel`` or any callable ``ids [B, L] int64 -> hidden states [B, L, E]``, e.g. an
    onnxruntime session behind a server)."""

    def __init__(self, tokenizer, encoder):
        self.tokenizer = tokenizer
        self.encoder = encoder

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def ids(self, prompts: Sequence[str]) -> tuple[torch.Tensor, tuple[bool, ...]]:
        """Token ids [B, max_length] and which prompts were cut, as the pipeline tokenizes."""
        for p in prompts:
            if not isinstance(p, str):
                raise StepadaptError(f"a prompt must be a string, got {type(p).__name__}")
        cut = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt")  # fmt: skip
        lengths = [len(i) for i in self.tokenizer(list(prompts), truncation=False, verbose=False).input_ids]
        truncated = tuple(n > self.max_length for n in lengths)
        return cut.input_ids.to(torch.long), truncated

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Encoded:
        ids, truncated = self.ids(prompts)
        out = self.encoder(ids)
        hidden = out[0] if isinstance(out, (tuple, list)) or hasattr(out, "last_hidden_state") else out
        hidden = torch.as_tensor(hidden).float()
        if not torch.isfinite(hidden).all():
            raise StepadaptError("the text encoder returned NaN or infinite values")
        return Encoded(hidden, truncated)

    def prompts(self, texts: Sequence[str]) -> Prompts:
        """Rows of captions as ids into a table of their embeddings, each distinct text encoded once;
        the table's last row is the empty prompt (the unconditional branch guidance trains and uses)."""
        unique = list(dict.fromkeys(texts))
        index = {t: i for i, t in enumerate(unique)}
        table = torch.cat([self.encode(unique[i : i + 256]).embeddings for i in range(0, len(unique), 256)]
                          + [self.encode([""]).embeddings])  # fmt: skip
        return Prompts(torch.tensor([index[t] for t in texts], dtype=torch.long), table)

    def condition(
        self, prompts: Sequence[str], negative: Sequence[str] | None, guidance_scale: float
    ) -> tuple[dict[str, torch.Tensor], tuple[bool, ...]]:
        """The condition of one row per prompt, as the pipeline guides: above scale 1 each row carries
        its negative prompt's embedding (``""`` where none) and the scale; at 1 or below the pipeline
        does not guide, and neither does this (scale 1; the negative text, unused, is zeros). Every
        row has the same keys, so requests with and without guidance stack into one batch. Returns
        which prompts (or their negatives) were truncated."""
        if not prompts:
            raise StepadaptError("no prompt given: a text-conditioned model needs one")
        if not math.isfinite(float(guidance_scale)):
            raise StepadaptError(f"guidance scale must be a finite number, got {guidance_scale}")
        enc = self.encode(prompts)
        truncated = enc.truncated
        scale = float(guidance_scale) if guidance_scale > 1.0 else 1.0
        if scale > 1.0:
            neg = list(negative) if negative else [""] * len(prompts)
            if len(neg) != len(prompts):
                raise StepadaptError(f"{len(neg)} negative prompts for {len(prompts)} prompts")
            neg_enc = self.encode(neg)
            negative_text = neg_enc.embeddings
            truncated = tuple(a or b for a, b in zip(truncated, neg_enc.truncated, strict=True))
        else:
            negative_text = torch.zeros_like(enc.embeddings)
        cond = {TEXT: enc.embeddings, NEGATIVE_TEXT: negative_text,
                GUIDANCE: torch.full((len(prompts),), scale, dtype=torch.float32)}  # fmt: skip
        return cond, truncated
