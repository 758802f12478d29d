"""Images <-> latents through a pipeline's VAE, the way Stable Diffusion scales them.

A latent model's U-Net never sees pixels: training images are encoded once (the posterior mean,
times the VAE's ``scaling_factor`` so the latents have about unit variance, the noise schedule's
assumption), and sampled latents are divided by it and decoded. The encoded training set is cached
on disk by the fingerprint of the images and the VAE's weights, so analyze, prune and finetune pay
for the encoder once.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from stepadapt import StepadaptError
from stepadapt.io import save_safetensors, sha256_tensors
from stepadapt.progress import progress

CACHE_DIR = Path(os.environ.get("STEPADAPT_CACHE", Path.home() / ".cache" / "stepadapt")) / "latents"


def pixels_per_latent(vae_config: dict) -> int:
    """How many pixels one latent spans on a side: 2 per down block after the first."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


class LatentCodec:
    """A VAE as encode/decode of model-range tensors ([-1, 1] images, scaled latents). ``decoder``
    replaces the VAE's own decode where given (an onnxruntime session behind a server)."""

    def __init__(self, vae: torch.nn.Module | None, scaling_factor: float | None = None, decoder=None):
        if vae is None and decoder is None:
            raise StepadaptError("a latent codec needs a VAE or a decoder")
        self.vae = vae
        given = scaling_factor if scaling_factor is not None else vae.config.scaling_factor
        self.scaling_factor = float(given)
        self._decoder = decoder

    @property
    def factor(self) -> int:
        return pixels_per_latent(self.vae.config)

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels)

    @property
    def digest(self) -> str:
        return sha256_tensors(self.vae.state_dict())

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch: int = 64, show: bool = False) -> torch.Tensor:
        """[-1, 1] images N x C x H x W -> scaled latents (the posterior mean: deterministic)."""
        if self.vae is None:
            raise StepadaptError("this latent codec has only a decoder: it cannot encode images")
        out = []
        with progress(total=len(images), unit="img", desc="encoding images", disable=not show) as bar:
            for lo in range(0, len(images), batch):
                dist = self.vae.encode(images[lo : lo + batch]).latent_dist
                out.append(dist.mean * self.scaling_factor)
                bar.update(len(images[lo : lo + batch]))
        return torch.cat(out) if out else images.new_zeros((0, self.vae.config.latent_channels, 1, 1))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 8) -> torch.Tensor:
        """Scaled latents -> model-range images, as the pipeline decodes (``latents / scaling_factor``),
        ``batch`` at a time: an SD VAE decoding 64 images at once wants tens of GB."""
        z = latents / self.scaling_factor
        run = self._decoder if self._decoder is not None else (lambda x: self.vae.decode(x).sample)
        parts = [torch.as_tensor(run(z[lo : lo + batch])).float() for lo in range(0, len(z), batch)]
        return torch.cat(parts) if parts else z.new_zeros((0, *z.shape[1:]))

    def encode_cached(self, images: torch.Tensor, cache: Path | None = CACHE_DIR) -> torch.Tensor:
        """:meth:`encode`, remembered on disk under the images' and the VAE's digests."""
        from safetensors.torch import load_file

        if cache is None:
            return self.encode(images, show=len(images) > 512)
        key = sha256_tensors({"images": images}, {"vae": self.digest, "scaling": self.scaling_factor})
        path = Path(cache) / f"{key}.safetensors"
        if path.is_file():
            try:
                z = load_file(str(path))["latents"]
                if len(z) == len(images):
                    return z
            except Exception:  # a torn or foreign file: encode again and replace it
                pass
        z = self.encode(images, show=len(images) > 512)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(path, {"latents": z})
        return z
