"""A diffusers pipeline directory as a base: the U-Net and what surrounds it.

A Stable Diffusion pipeline directory (``model_index.json``; ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) is a base like any U-Net directory: only its U-Net is split into
experts. The rest -- the VAE that maps latents to images and the tokenizer and text encoder that map
prompts to embeddings -- is the *surround*. A bundle keeps a copy of it (each file with its sha256)
so that a bundle alone is a complete pipeline: it samples, exports and serves without its base.

Weights load from safetensors only; a part that ships only pickled weights (``*.bin``, ``*.ckpt``,
``*.pt``) is refused in one line rather than unpickled.
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stepadapt import StepadaptError, first_line
from stepadapt.io import atomic_dir, read_json, sha256_file
from stepadapt.latents import LatentCodec
from stepadapt.text import TextEncoder

MODEL_INDEX = "model_index.json"
SURROUND = ("vae", "text_encoder", "tokenizer")  # the parts a bundle copies beside its experts
PICKLES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
BUNDLE_DIR = "pipeline"  # where a bundle keeps its copy of the surround


def is_pipeline(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_INDEX).is_file()


def _part_dir(root: Path, part: str) -> Path | None:
    d = root / part
    return d if d.is_dir() else None


def _refuse_pickles(d: Path, what: str) -> None:
    safe = list(d.glob("*.safetensors"))
    pickled = [p for p in d.iterdir() if p.suffix in PICKLES]
    if pickled and not safe:
        raise StepadaptError(
            f"{what} in {d} has only pickled weights ({pickled[0].name}); convert them to safetensors "
            "(pickles are never loaded)"
        )


def _quiet_transformers() -> None:
    """transformers' per-load progress bars and notes (torchvision missing, ...) are not ours to show."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _load(part: str, d: Path) -> Any:
    """One surround part from its directory (diffusers' / transformers' own loaders)."""
    _quiet_transformers()
    try:
        if part == "tokenizer":
            from transformers import CLIPTokenizer

            return CLIPTokenizer.from_pretrained(d)
        _refuse_pickles(d, part)
        if part == "vae":
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(d, use_safetensors=True, low_cpu_mem_usage=False)
            return vae.float().eval()  # weights shipped in fp16 compute in fp32 here, as the U-Net's do
        from transformers import CLIPTextModel

        return CLIPTextModel.from_pretrained(d, use_safetensors=True).float().eval()
    except StepadaptError:
        raise
    except Exception as e:
        msg = first_line(e)
        raise StepadaptError(f"cannot load the {part} from {d}: {msg}") from None


@dataclass
class Surround:
    """The VAE, text encoder and tokenizer of a latent text-to-image pipeline (either may be absent:
    a latent unconditional pipeline has no text parts, a pixel text model no VAE)."""

    root: Path
    vae: torch.nn.Module | None = None
    text_model: torch.nn.Module | None = None
    tokenizer: Any = None

    @classmethod
    def load(cls, *roots: str | os.PathLike) -> Surround:
        """The surround of a pipeline directory or of a bundle's ``pipeline/`` copy; given several
        directories (train-vae's and train-text-encoder's runs), each part from the first that has it."""
        dirs = [Path(r) for r in roots]
        for d in dirs:
            if not d.is_dir():
                raise StepadaptError(f"surround directory not found: {d}")
        found = {p: next((x for d in dirs if (x := _part_dir(d, p)) is not None), None) for p in SURROUND}
        parts = {p: _load(p, d) for p, d in found.items() if d is not None}
        if ("text_encoder" in parts) != ("tokenizer" in parts):
            where = ", ".join(map(str, dirs))
            raise StepadaptError(f"{where}: a text encoder without a tokenizer or the other way round")
        return cls(dirs[0], parts.get("vae"), parts.get("text_encoder"), parts.get("tokenizer"))

    @property
    def latent(self) -> LatentCodec | None:
        return LatentCodec(self.vae) if self.vae is not None else None

    @property
    def text(self) -> TextEncoder | None:
        return TextEncoder(self.tokenizer, self.text_model) if self.text_model is not None else None

    def check_unet(self, unet_config: dict) -> None:
        """One line where the parts do not fit the U-Net: latent channels, text width."""
        if self.vae is not None and self.vae.config.latent_channels != unet_config.get("in_channels"):
            raise StepadaptError(
                f"the VAE makes {self.vae.config.latent_channels}-channel latents; the U-Net takes "
                f"{unet_config.get('in_channels')} channels"
            )
        cross = unet_config.get("cross_attention_dim")
        if isinstance(cross, (list, tuple)):
            cross = cross[0]
        if self.text_model is not None and cross != self.text_model.config.hidden_size:
            raise StepadaptError(
                f"the text encoder's width is {self.text_model.config.hidden_size}; the U-Net "
                f"cross-attends over {cross}"
            )


def surround_of(path: str | os.PathLike | None) -> Surround | None:
    """A base's surround: a pipeline directory's (checked against its own U-Net, so parts that do not
    fit -- an inpainting U-Net's 9 channels, SDXL's wider text -- are one line wherever it loads),
    None for a bare U-Net directory."""
    if path is None or not is_pipeline(path):
        return None
    read_json(Path(path) / MODEL_INDEX, "pipeline index")
    surround = Surround.load(path)
    unet = Path(path) / "unet" / "config.json"
    if unet.is_file():
        surround.check_unet(read_json(unet, "U-Net config"))
    return surround


def loaded_part_file(name: str) -> bool:
    """Whether a part's file is one the pipeline loads (configs, tokenizer files, the default
    safetensors and their shard index), not a variant (``*.fp16.safetensors``), another framework's
    weights (flax's ``.msgpack``, ONNX), a pickle or a dotfile: a bundle copies, hashes and verifies
    only what it uses (SD 1.5's repository holds GBs beside it)."""
    if name.startswith(".") or Path(name).suffix in PICKLES:
        return False
    if name.endswith(".safetensors"):
        return name.count(".") == 1  # model.safetensors, model-00001-of-00002.safetensors
    if ".safetensors.index." in name:
        return name.endswith(".safetensors.index.json")
    return Path(name).suffix in (".json", ".txt", ".model")  # configs, vocab/merges, sentencepiece


def copy_surround(src: str | os.PathLike, dst: Path) -> dict[str, dict[str, str]]:
    """Copy ``src``'s surround parts into ``dst`` (inside a bundle being written); returns
    ``{part: {file: sha256}}`` for the manifest, so a loaded bundle can verify every byte."""
    src = Path(src)
    record: dict[str, dict[str, str]] = {}
    for part in SURROUND:
        d = _part_dir(src, part)
        if d is None:
            continue
        _refuse_pickles(d, part)
        files = sorted(p for p in d.iterdir() if p.is_file() and loaded_part_file(p.name))
        (dst / part).mkdir(parents=True, exist_ok=True)
        record[part] = {}
        for f in files:
            shutil.copyfile(f, dst / part / f.name)
            record[part][f.name] = sha256_file(dst / part / f.name)
    return record


def write_pipeline(
    path: str | os.PathLike,
    unet: torch.nn.Module,
    scheduler_cfg: dict,
    surround: Surround,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A diffusers pipeline directory of ``unet`` and ``surround`` (what StableDiffusionPipeline
    loads), written atomically: how a base trained here becomes a pipeline. ``dtype`` float16
    stores the weights at half the size (they load back into float32 models)."""
    _quiet_transformers()
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from stepadapt.schedule import from_model_config

    diffusers_logging.disable_progress_bar()

    pipe = StableDiffusionPipeline(
        vae=surround.vae, text_encoder=surround.text_model, tokenizer=surround.tokenizer, unet=unet,
        scheduler=from_model_config(DDPMScheduler, scheduler_cfg), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    if dtype != torch.float32:
        pipe = copy.deepcopy(pipe).to(dtype)
    with atomic_dir(Path(path)) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for extra in ("MODEL_CARD.md", "samples.png"):  # a card written beside an earlier copy stays
            if (Path(path) / extra).is_file():
                shutil.copyfile(Path(path) / extra, tmp / extra)
    return Path(path)
