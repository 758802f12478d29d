"""What a base's data rows are, in one place: the images (or their latents) and their conditions.

Every stage that reads data for a base (train-base, analyze, prune, finetune) asks a
:class:`DataSpace` for rows instead of choosing a loader itself:

- an unconditional base: images at the U-Net's size and channels, no labels;
- a class-conditional base: the images and their class ids;
- a text-conditioned base: the images and their captions as :class:`~stepadapt.conditioning.Prompts`
  (each distinct caption encoded once by the pipeline's text encoder; a bare text U-Net without an
  encoder gets the empty text, zeros, as its proxies always had);
- a latent base (a pipeline with a VAE): the images loaded at the VAE's pixel size and encoded once,
  cached by fingerprint, so the U-Net's rows are latents.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from stepadapt import Notice, StepadaptError
from stepadapt.conditioning import Conditioning, Labels, Prompts, conditioning_of
from stepadapt.data import DEFAULT_HOLDOUT, FASHION_NAMES, load_dataset, load_labelled
from stepadapt.latents import LatentCodec
from stepadapt.pipeline import Surround
from stepadapt.text import TextEncoder

Rows = tuple[torch.Tensor, Labels | None]


@dataclass
class DataSpace:
    conditioning: Conditioning
    size: int  # the side images load at (the VAE's pixels for a latent base)
    channels: int  # the channels images load with
    latent: LatentCodec | None = None
    text: TextEncoder | None = None

    @classmethod
    def of(cls, unet_config: dict, surround: Surround | None = None) -> DataSpace:
        """The data space of a U-Net (its config) and, for a pipeline, its surround."""
        cond = conditioning_of(unet_config)
        size, channels = int(unet_config["sample_size"]), int(unet_config["in_channels"])
        latent = surround.latent if surround is not None else None
        if latent is not None:
            size, channels = size * latent.factor, latent.image_channels
        text = surround.text if surround is not None and cond.text_dim else None
        return cls(cond, size, channels, latent, text)

    def rows(
        self, source: str, split: str = "train", limit: int | None = None, seed: int = 0,
        holdout: float = DEFAULT_HOLDOUT,
    ) -> Rows:  # fmt: skip
        """One split's rows as the U-Net trains on them: images or latents, and their labels."""
        part = dict(limit=limit, seed=seed, holdout=holdout)
        labels: Labels | None = None
        if self.conditioning.classes:
            x, labels = load_labelled(source, split, self.size, self.channels, **part)
            check_classes(
                labels,
                self.conditioning.classes,
                f"{source}'s {'held-out' if split == 'test' else 'training'} labels",
            )
        elif self.conditioning.text_dim and self.text is not None:
            from stepadapt.captions import load_captioned

            x, texts = load_captioned(source, split, self.size, self.channels, **part)
            labels = self.text.prompts(texts)
        else:
            x = load_dataset(source, split, self.size, self.channels, **part)
            if self.conditioning.text_dim:
                warnings.warn(
                    Notice("no text encoder: the text U-Net sees the empty text (zeros)"), stacklevel=2
                )
                labels = Prompts.empty(len(x), self.conditioning.text_dim)
        if self.latent is not None:
            x = self.latent.encode_cached(x)
        return x, labels

    def proxy_sets(
        self, source: str, n: int, seed: int = 0, holdout: float = DEFAULT_HOLDOUT
    ) -> tuple[Rows, Rows]:
        """Two disjoint proxy sets (to score importance, to judge candidates), each with its labels:
        Fashion-MNIST's from its train and test files, other data's from its training part, halved."""
        if source in FASHION_NAMES:
            return self.rows(source, "train", n, seed), self.rows(source, "test", n, seed)
        x, y = self.rows(source, "train", 2 * n, seed, holdout)
        if len(x) < 2:
            raise StepadaptError(f"{source} needs at least 2 training images for the proxy sets")
        half = len(x) // 2
        return (x[:half], None if y is None else y[:half]), (x[half:], None if y is None else y[half:])


def check_classes(labels: torch.Tensor, classes: int, what: str = "labels") -> None:
    """One line where data labels fall outside a model's classes 0..classes-1 (the null label is
    the model's, never the data's)."""
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < classes:
        raise StepadaptError(
            f"{what} span {int(labels.min())}..{int(labels.max())}; the base knows 0..{classes - 1}"
        )
