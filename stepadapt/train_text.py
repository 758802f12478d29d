"""The train-text stage: the tokenizer and text encoder of a latent text-to-image model.

No pretrained CLIP can be downloaded here, so both are made from the captions: a CLIP-style BPE
tokenizer (lowercased words, ``</w>`` ends a word, ``<|startoftext|>`` / ``<|endoftext|>``) trained
by ``tokenizers`` with transformers' own ``CLIPTokenizer`` pipeline, so that what it learned is what
``CLIPTokenizer.from_pretrained`` splits; and a small ``CLIPTextModel`` trained as CLIP was,
contrastively against an image tower that is thrown away afterwards. A U-Net then cross-attends to
the text encoder's hidden states, which have learned what in a caption tells images apart.

A few templates caption many images alike, so a batch holds the same caption many times; those pairs
are all positives (a multi-positive InfoNCE target), or the loss would push identical texts apart.
"""

from __future__ import annotations

import json
import math
import string
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from stepadapt import Notice, StepadaptError
from stepadapt.options import option
from stepadapt.train_vae import WARMUP, Checkpointed, RunOptions, at_least, read_checkpoint

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Every printable ASCII character is in the vocabulary, alone and ending a word, so a prompt in words
# the captions never used still tokenizes (into pieces) instead of into the unknown token.
ALPHABET = string.ascii_lowercase + string.digits + string.punctuation
IMAGE_WIDTHS = (32, 64, 128)  # the image tower's stages (each halves the side)
INIT_TEMPERATURE, MAX_SCALE = 0.07, 100.0  # CLIP's: logits scaled by 1 / 0.07 at first, never past 100
ENCODE_BATCH = 1000


@dataclass(frozen=True)
class TrainTextOptions(RunOptions):
    """``stepadapt train-text``: captioned images -> OUT/tokenizer/ (CLIPTokenizer) and
    OUT/text_encoder/ (CLIPTextModel, safetensors), trained contrastively against the images."""

    out: Path = option(
        Path("runs/text"), "Run directory (checkpoint, tokenizer/, text_encoder/).", flag="--out"
    )
    data: str = option(
        "fashion-mnist",
        "'fashion-mnist' (captioned from its labels), or an image folder with metadata.jsonl or .txt "
        "captions.",
    )
    iterations: int = option(2000, "Optimizer steps (a resumed run may ask for more than it started with).")
    batch_size: int = option(128, "Image-caption pairs per step (the contrastive loss's candidates).")
    lr: float = option(1e-3, f"Learning rate (Adam; linear warm-up over {WARMUP} steps, then constant).")
    vocab_size: int = option(256, "Tokenizer vocabulary, special tokens and the ASCII alphabet included.")
    hidden: int = option(64, "Text encoder width (what a U-Net's cross-attention reads).")
    layers: int = option(2, "Text encoder transformer layers.")
    heads: int = option(4, "Attention heads (must divide --hidden).")
    max_length: int = option(16, "Tokens per caption, start and end tokens included; longer ones are cut.")

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least(self, "batch_size", least=2)  # one pair has nothing to be contrasted with
        at_least(self, "hidden", "layers", "heads")
        at_least(self, "max_length", least=3)  # start, one token, end
        if self.hidden % self.heads:
            raise StepadaptError(f"--heads {self.heads} does not divide --hidden {self.hidden}")
        least = 2 * len(ALPHABET) + 2
        if self.vocab_size < least:
            raise StepadaptError(
                f"--vocab-size must be at least {least} (2 special tokens, and the {len(ALPHABET)} ASCII "
                f"characters alone and ending a word), got {self.vocab_size}"
            )


@dataclass
class TextResult:
    steps: int
    resumed_from: int  # 0: a fresh run; else the checkpoint's step it went on from
    final_loss: float
    seconds: float
    params: int  # the text encoder's (the image tower is not kept)
    vocab_size: int  # as trained: the captions may need fewer merges than --vocab-size allows
    unique_captions: int
    truncated_captions: int  # captions longer than --max-length tokens
    test_images: int
    zero_shot_accuracy: float | None  # held-out images vs the 10 class prompts (Fashion-MNIST only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_tokenizer(captions: list[str], vocab_size: int, max_length: int) -> CLIPTokenizer:
    """A BPE vocabulary learned from ``captions`` through CLIPTokenizer's own normaliser and word
    splitter (taken from an empty CLIPTokenizer, so training and use cannot split differently)."""
    from tokenizers import Tokenizer, models, trainers

    pipeline = CLIPTokenizer().backend_tokenizer
    tok = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer, tok.pre_tokenizer = pipeline.normalizer, pipeline.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS], end_of_word_suffix="</w>",
        initial_alphabet=list(ALPHABET), show_progress=False,
    )  # fmt: skip
    # the alphabet once more as one-letter words: each character also gets its word-final form
    tok.train_from_iterator([*captions, " ".join(ALPHABET)], trainer)
    spec = vocabulary(tok)
    # the trainer numbers some tokens in hash-map order, which differs from process to process; the
    # same tokens in sorted order make the same embedding rows, so a run repeats exactly
    tokens = sorted(t for t in spec["vocab"] if t not in (BOS, EOS))
    spec["vocab"] = {t: i for i, t in enumerate([BOS, EOS, *tokens])}
    return clip_tokenizer(spec, max_length)


def vocabulary(backend: Any) -> dict[str, Any]:
    """A ``tokenizers`` BPE's vocabulary and merges as plain JSON values: what rebuilds the tokenizer
    exactly (the checkpoint keeps it, and a resume must find the same again)."""
    model = json.loads(backend.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]  # older: "a b"
    return {"vocab": model["vocab"], "merges": merges}


def clip_tokenizer(spec: dict[str, Any], max_length: int) -> CLIPTokenizer:
    """The CLIPTokenizer of a trained vocabulary: pads with the end token and cuts at ``max_length``."""
    try:
        vocab, merges = dict(spec["vocab"]), [tuple(m) for m in spec["merges"]]
    except (KeyError, TypeError, ValueError):
        raise StepadaptError("not a tokenizer record: expected 'vocab' and 'merges'") from None
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """int64 N x max_length ids, as a diffusers pipeline makes them (padded to the full length)."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids  # fmt: skip


def build_text_encoder(tokenizer: CLIPTokenizer, o: TrainTextOptions) -> CLIPTextModel:
    """A fresh CLIPTextModel for ``tokenizer`` (weights from ``o.seed`` only); its end token id is the
    tokenizer's, where the pooled output is read."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=o.hidden, intermediate_size=4 * o.hidden,
        num_hidden_layers=o.layers, num_attention_heads=o.heads, max_position_embeddings=o.max_length,
        projection_dim=o.hidden, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(o.seed)
        return CLIPTextModel(config)


class ImageTower(nn.Module):
    """Conv-GroupNorm-SiLU stages, each halving the side, average-pooled into the shared embedding:
    the text encoder's partner in training, small because only the text side is kept."""

    def __init__(self, channels: int, dim: int, widths: tuple[int, ...] = IMAGE_WIDTHS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(), nn.AvgPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.proj = nn.Linear(c, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x))


class ClipPair(nn.Module):
    """Text encoder, its projection, the image tower and the learned temperature: one module, so one
    state dict checkpoints the whole pair."""

    def __init__(self, text: CLIPTextModel, channels: int, seed: int) -> None:
        super().__init__()
        self.text = text
        dim = text.config.projection_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.text_projection = nn.Linear(text.config.hidden_size, dim, bias=False)
            self.image = ImageTower(channels, dim)
        self.logit_scale = nn.Parameter(torch.tensor(1.0 / INIT_TEMPERATURE).log())

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text(input_ids=ids).pooler_output), dim=-1)

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(x), dim=-1)

    def loss(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE where every pair of identical token sequences is a positive. The text
        tower runs once per distinct caption of the batch (the same gradient, far less work)."""
        unique, which = torch.unique(ids, dim=0, return_inverse=True)
        text = self.encode_text(unique)[which]
        scale = self.logit_scale.clamp(max=math.log(MAX_SCALE)).exp()
        logits = scale * self.encode_images(x) @ text.T
        positive = (which[:, None] == which[None, :]).float()
        target = positive / positive.sum(1, keepdim=True)  # symmetric, so it serves both directions
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train_text_encoder(
    options: TrainTextOptions, log: Callable[[str], None] | None = None
) -> tuple[TextResult, Path]:
    """Train the tokenizer, then (or resume) the text encoder against the images; score zero-shot
    classification on the held-out split; write OUT/tokenizer/, OUT/text_encoder/, OUT/result.json."""
    from stepadapt.captions import load_captioned
    from stepadapt.classifier import augment
    from stepadapt.devices import resolve_device
    from stepadapt.io import sha256_tensors, write_json

    o, say = options, log or (lambda _: None)
    if o.threads:
        torch.set_num_threads(o.threads)
    dev = resolve_device(o.device)
    x, captions = load_captioned(o.data, "train", 32, None, limit=o.limit, seed=o.seed, holdout=o.holdout)
    say(f"data: {o.data} -> {tuple(x.shape)}, {len(set(captions))} distinct captions")
    saved = read_checkpoint(o.out) if o.resume else None
    if saved is None:
        tokenizer = train_tokenizer(captions, o.vocab_size, o.max_length)
    else:  # the very vocabulary the checkpoint's embeddings are rows of
        tokenizer = clip_tokenizer(Checkpointed.extra_of(saved), o.max_length)
    pair = ClipPair(build_text_encoder(tokenizer, o), x.shape[1], o.seed).to(dev)
    run = Checkpointed(
        o, pair, sha256_tensors({"images": x}, extra=captions), extra=vocabulary(tokenizer.backend_tokenizer)
    )
    if saved is not None:
        run.restore(saved)
        say(f"resuming at step {run.step} of {o.iterations}")
    ids, truncated = tokenize(tokenizer, captions), count_truncated(tokenizer, captions)
    if truncated:
        msg = f"{truncated} of {len(captions)} captions are longer than --max-length {o.max_length}: cut"
        warnings.warn(Notice(msg), stacklevel=2)
    params = sum(p.numel() for p in pair.text.parameters())
    say(f"tokenizer: {len(tokenizer)} tokens; text encoder: {params:,} parameters")
    step0 = run.step

    def loss_fn(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(x), (o.batch_size,), generator=g)
        return pair.loss(augment(x[idx], g).to(dev), ids[idx].to(dev))

    loss, seconds = run.fit(loss_fn, "train-text")
    result = TextResult(
        steps=run.step, resumed_from=step0, final_loss=loss, seconds=seconds, params=params,
        vocab_size=len(tokenizer), unique_captions=len(set(captions)), truncated_captions=truncated,
        test_images=0, zero_shot_accuracy=None,
    )  # fmt: skip
    score_zero_shot(pair, tokenizer, o, result, say)
    save_text_parts(pair.text, tokenizer, o.out)
    write_json(o.out / "result.json", {"options": o.to_dict(), "result": result.to_dict()})
    return result, o.out / "text_encoder"


def count_truncated(tokenizer: CLIPTokenizer, captions: list[str]) -> int:
    """How many captions say more than ``max_length`` tokens hold: the text encoder never sees the rest."""
    distinct = sorted(set(captions))
    lengths = [len(ids) for ids in tokenizer(distinct, verbose=False).input_ids]
    long = {c for c, n in zip(distinct, lengths, strict=True) if n > tokenizer.model_max_length}
    return sum(c in long for c in captions)


def save_text_parts(text: CLIPTextModel, tokenizer: CLIPTokenizer, out: Path) -> None:
    """OUT/tokenizer/ and OUT/text_encoder/ as a Stable Diffusion pipeline's folders hold them."""
    from stepadapt.io import atomic_dir
    from stepadapt.train_vae import readable_like_config

    with atomic_dir(out / "tokenizer") as tmp:
        tokenizer.save_pretrained(tmp)
    with atomic_dir(out / "text_encoder") as tmp:
        text.to("cpu").save_pretrained(tmp)  # transformers 5 writes safetensors only
        readable_like_config(tmp)


@torch.inference_mode()
def zero_shot(pair: ClipPair, tokenizer: CLIPTokenizer, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The index of the prompt each image is closest to (CLIP's zero-shot classification)."""
    from stepadapt.devices import device_of

    pair.eval()
    dev = device_of(pair)
    text = pair.encode_text(tokenize(tokenizer, prompts).to(dev))
    return torch.cat(
        [(pair.encode_images(b.to(dev)) @ text.T).argmax(1).cpu() for b in x.split(ENCODE_BATCH)]
    )


def score_zero_shot(
    pair: ClipPair,
    tokenizer: CLIPTokenizer,
    o: TrainTextOptions,
    result: TextResult,
    say: Callable[[str], None],
) -> None:
    """Held-out Fashion-MNIST images against the ten class prompts: a sanity number for the pair (other
    data has no class prompts to ask with)."""
    from stepadapt.captions import class_prompt
    from stepadapt.data import FASHION_CLASSES, FASHION_NAMES, load_labelled

    if o.data not in FASHION_NAMES:
        say(f"{o.data} is not Fashion-MNIST: no class prompts, zero-shot accuracy not measured")
        return
    x, y = load_labelled(o.data, "test", 32, limit=o.eval_limit, seed=o.seed, holdout=o.holdout)
    pred = zero_shot(pair, tokenizer, x, [class_prompt(c) for c in range(len(FASHION_CLASSES))])
    result.test_images = len(x)
    result.zero_shot_accuracy = round(float((pred == y).float().mean()), 6)
    say(f"zero-shot accuracy: {result.zero_shot_accuracy:.4f} on {len(x)} held-out images")
