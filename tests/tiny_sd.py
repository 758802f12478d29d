"""A tiny random Stable Diffusion pipeline directory, written the way diffusers writes one.

All five parts from configs the test writes: a CLIP BPE tokenizer from a vocabulary and merges
written here (whole words of the Fashion-MNIST captions, letters for anything else), a 2-layer
CLIPTextModel, a 2-level cross-attention UNet2DConditionModel on 4 x 8 x 8 latents, a 3-level
AutoencoderKL for 1 x 32 x 32 images (Fashion-MNIST's padded size) and a scheduler with Stable
Diffusion's own config numbers (scaled-linear betas 0.00085..0.012, steps offset 1).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from stepadapt.captions import FASHION_PHRASES, TEMPLATES

TEXT_DIM = 32
MAX_LENGTH = 12
SD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000,
)  # fmt: skip


def write_tokenizer_files(d: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of a CLIP BPE that spells every caption word as one token: each
    word is merged left to right (``p h`` -> ``ph``, ``ph o`` -> ``pho``, ... ``phot o</w>``)."""
    words = sorted({w for t in (*TEMPLATES, *FASHION_PHRASES) for w in t.replace("{}", " ").split()})
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + "-/.,!?'":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[str] = []
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if f"{parts[0]} {parts[1]}" not in merges:
                merges.append(f"{parts[0]} {parts[1]}")
            vocab.setdefault(merged, len(vocab))
            parts = [merged] + parts[2:]
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return d / "vocab.json", d / "merges.txt"


def write_tiny_pipeline(path: Path, seed: int = 0, unet_widths: tuple[int, int] = (32, 64)) -> Path:
    """Write the pipeline directory (safetensors everywhere) and return it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = write_tokenizer_files(path.parent / f"{path.name}-vocab")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=MAX_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1,
                pad_token_id=1,
            )
        ).eval()  # fmt: skip
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=unet_widths, layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
            attention_head_dim=4, norm_num_groups=8,
        ).eval()  # fmt: skip
        vae = AutoencoderKL(
            in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), latent_channels=4,
            norm_num_groups=8, sample_size=32, scaling_factor=0.5,
        ).eval()  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(path, safe_serialization=True)
    return path
