"""What a denoiser is conditioned on, and classifier-free guidance.

A condition travels beside ``x`` and ``t`` as a dict of row-aligned tensors (k-diffusion's
``extra_args``): ``class_labels`` [B] int64, ``encoder_hidden_states`` [B, L, E]. Nothing about it is
hidden state, so the Router can slice it with the rows it routes and a server can stack the rows of
many requests. An unconditional model gets an empty dict.

Class-conditional models trained here keep one extra class embedding, the *null class* (the last
index), that stands for "no label": training drops labels to it with probability
``label_dropout``, which is what classifier-free guidance needs of a model (Ho & Salimans 2022).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from stepadapt import StepadaptError

Cond = Mapping[str, torch.Tensor]
CLASS_LABELS = "class_labels"
TEXT = "encoder_hidden_states"
NEGATIVE_TEXT = "negative_encoder_hidden_states"  # the unconditional branch's text (CFG), where given
GUIDANCE = "guidance_scale"  # per row, float32; absent: 1 (no guidance)
MODEL_INPUTS = (CLASS_LABELS, TEXT)  # what a model's forward takes; the rest is for the wrappers
DEFAULT_LABEL_DROPOUT = 0.1


@dataclass(frozen=True)
class Conditioning:
    """What a model is conditioned on, read from its config: ``classes`` labels 0..classes-1 and
    the null label ``classes`` (class-conditional), ``text_dim`` the width of the text embedding a
    cross-attention model takes. Neither: unconditional."""

    classes: int = 0
    text_dim: int = 0

    @property
    def unconditional(self) -> bool:
        return not self.classes and not self.text_dim

    @property
    def null_label(self) -> int:
        return self.classes

    @property
    def inputs(self) -> tuple[str, ...]:
        """The model inputs beside (sample, timestep), in the order exports take them."""
        return tuple(k for k, on in ((CLASS_LABELS, self.classes), (TEXT, self.text_dim)) if on)

    def examples(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random inputs for ``n`` rows (labels including the null one; 7-token texts): for tracing,
        parity checks and MAC counts."""
        out = {}
        if self.classes:
            out[CLASS_LABELS] = torch.randint(0, self.null_label + 1, (n,), generator=generator)
        if self.text_dim:
            out[TEXT] = torch.randn(n, 7, self.text_dim, generator=generator)
        return out

    def describe(self) -> str:
        parts = [f"{self.classes} classes + null"] if self.classes else []
        parts += [f"text embeddings of width {self.text_dim}"] if self.text_dim else []
        return ", ".join(parts) or "unconditional"

    def to_dict(self) -> dict[str, int]:
        return {"classes": self.classes, "text_dim": self.text_dim}

    @classmethod
    def from_dict(cls, d: Mapping | None) -> Conditioning:
        d = dict(d or {})
        return cls(classes=int(d.get("classes", 0)), text_dim=int(d.get("text_dim", 0)))

    def check(self, cond: Cond, n: int) -> None:
        """A one-line error for a condition this model cannot take for ``n`` rows: labels to an
        unconditional model, labels out of range, a row count other than ``n``, NaN embeddings."""
        for key, value in cond.items():
            if key not in (*MODEL_INPUTS, NEGATIVE_TEXT, GUIDANCE):
                raise StepadaptError(f"unknown condition {key!r}")
            if value.shape[0] != n:
                raise StepadaptError(f"{key} has {value.shape[0]} rows for {n} images")
        labels = cond.get(CLASS_LABELS)
        if labels is not None:
            if not self.classes:
                raise StepadaptError("class labels given, but this model is not class-conditional")
            bad = labels[(labels < 0) | (labels > self.null_label)]
            if len(bad):
                raise StepadaptError(
                    f"class label {int(bad[0])} is out of range: this model knows 0..{self.classes - 1} "
                    f"(and {self.null_label} for no label)"
                )
        elif GUIDANCE in cond and TEXT not in cond:
            raise StepadaptError(
                "guidance needs class labels: this model is class-conditional"
                if self.classes
                else "guidance needs a conditional model (class labels or text); this one is unconditional"
            )
        for key in (TEXT, NEGATIVE_TEXT):
            if key in cond:
                if not self.text_dim:
                    raise StepadaptError(f"{key} given, but this model takes no text embeddings")
                if cond[key].ndim != 3 or cond[key].shape[-1] != self.text_dim:
                    raise StepadaptError(
                        f"{key} has shape {tuple(cond[key].shape)}; expected B x L x {self.text_dim}"
                    )
                if not torch.isfinite(cond[key]).all():
                    raise StepadaptError(f"{key} contains NaN or infinite values")
        if self.text_dim and TEXT not in cond:
            raise StepadaptError("this model needs encoder_hidden_states (text embeddings)")
        scale = cond.get(GUIDANCE)
        if scale is not None and not torch.isfinite(scale).all():
            raise StepadaptError("guidance scale must be a finite number")


def conditioning_of(config: Mapping) -> Conditioning:
    """A diffusers U-Net's conditioning, from its config: ``num_class_embeds`` counts the null
    class; ``cross_attention_dim`` is the text width of a ``UNet2DConditionModel``."""
    n = config.get("num_class_embeds") or 0
    cross = config.get("cross_attention_dim")  # UNet2DModel's config has no such key
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    return Conditioning(classes=max(int(n) - 1, 0), text_dim=int(cross or 0))


def model_inputs(cond: Cond) -> dict[str, torch.Tensor]:
    """The part of ``cond`` a model's forward takes (keyword arguments of a diffusers U-Net)."""
    return {k: v for k, v in cond.items() if k in MODEL_INPUTS}


def take(cond: Cond, rows: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    """The condition of ``rows`` (a boolean mask, indices or a slice)."""
    return {k: v[rows] for k, v in cond.items()}


def cat(conds: Sequence[Cond]) -> dict[str, torch.Tensor]:
    """Row-stack the conditions of several batches. They must carry the same model inputs; a batch
    without a guidance scale has scale 1 beside those that have one."""
    if not conds:
        return {}
    keys = set(conds[0]) - {GUIDANCE}
    if any(set(c) - {GUIDANCE} != keys for c in conds):
        raise StepadaptError("batches stacked together carry different conditions")
    out = {k: torch.cat([c[k] for c in conds]) for k in sorted(keys)}
    if any(GUIDANCE in c for c in conds):
        out[GUIDANCE] = torch.cat([c[GUIDANCE] if GUIDANCE in c else _ones(c) for c in conds])
    return out


def _ones(cond: Cond) -> torch.Tensor:
    if not cond:  # a batch with nothing to count its rows by cannot sit beside guided ones
        raise StepadaptError("batches stacked together carry different conditions")
    return torch.ones(next(iter(cond.values())).shape[0], dtype=torch.float32)


def balanced_labels(n: int, classes: int) -> torch.Tensor:
    """Labels 0, 1, ..., classes-1, 0, 1, ...: every class alike (50 each of 500 for ten classes)."""
    return torch.arange(n) % classes


def labels_cond(labels: Sequence[int] | torch.Tensor, guidance_scale: float | None = None) -> dict:
    """The condition of a batch of class labels, with one guidance scale for all its rows."""
    y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    out = {CLASS_LABELS: y}
    if guidance_scale is not None:
        out[GUIDANCE] = torch.full((len(y),), float(guidance_scale), dtype=torch.float32)
    return out


def drop_labels(labels: torch.Tensor, p: float, null: int, generator: torch.Generator) -> torch.Tensor:
    """Labels with a share ``p`` replaced by the null class (drawn from ``generator``), so the
    unconditional branch that guidance needs is trained by the same run."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, null), labels)


def unconditional(cond: Cond, null_label: int) -> dict[str, torch.Tensor]:
    """The unconditional branch of ``cond``: labels set to the null class, text to the negative
    text where given (else zeros, the empty condition); other keys dropped."""
    out: dict[str, torch.Tensor] = {}
    if CLASS_LABELS in cond:
        out[CLASS_LABELS] = torch.full_like(cond[CLASS_LABELS], null_label)
    if TEXT in cond:
        out[TEXT] = cond[NEGATIVE_TEXT] if NEGATIVE_TEXT in cond else torch.zeros_like(cond[TEXT])
    return out


@dataclass(frozen=True)
class Prompts:
    """The captions of data rows, for a text-conditioned model: per row an id into ``table``, the
    text embeddings [K+1, L, E] of the K distinct captions and, last, of the empty prompt -- the
    text's null class, which training drops a share of rows to (what guidance needs). Rows stay ids
    (60 000 images of 40 captions are 60 000 ints, not 60 000 embeddings) until a batch needs them."""

    ids: torch.Tensor
    table: torch.Tensor

    @classmethod
    def empty(cls, n: int, text_dim: int) -> Prompts:
        """``n`` uncaptioned rows: every one the empty text (zeros), for a bare text U-Net whose
        encoder is not at hand (timing an architecture with random weights)."""
        return cls(torch.zeros(n, dtype=torch.long), torch.zeros(1, 1, text_dim))

    @property
    def null(self) -> int:
        return len(self.table) - 1

    @property
    def shape(self) -> torch.Size:
        return self.ids.shape

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, rows) -> Prompts:
        return Prompts(self.ids[rows], self.table)

    def cond(self) -> dict[str, torch.Tensor]:
        return {TEXT: self.table[self.ids]}

    def dropped(self, p: float, generator: torch.Generator) -> Prompts:
        return Prompts(drop_labels(self.ids, p, self.null, generator), self.table)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a fingerprint of the rows covers: the ids and what they mean."""
        return {"prompt_ids": self.ids, "prompt_table": self.table}


Labels = torch.Tensor | Prompts  # what data rows are conditioned on: class ids, or captions


def rows_cond(labels: Labels | None) -> dict[str, torch.Tensor]:
    """The model condition of labelled rows: their classes, or their captions' embeddings."""
    if labels is None:
        return {}
    if isinstance(labels, Prompts):
        return labels.cond()
    return {CLASS_LABELS: labels}


def drop_rows(labels: Labels, p: float, null: int | None, generator: torch.Generator) -> Labels:
    """:func:`drop_labels` for either kind of rows (captions drop to their own empty prompt)."""
    if isinstance(labels, Prompts):
        return labels.dropped(p, generator)
    return labels if null is None else drop_labels(labels, p, null, generator)


Denoiser = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


def model_rows(cond: Cond, n: int) -> int:
    """Rows a model call costs for ``n`` images under ``guided``: two for a row guided at a scale
    other than 1 (its unconditional twin rides in the same call), one otherwise."""
    scale = cond.get(GUIDANCE)
    return n + (0 if scale is None else int((scale != 1).sum()))


def guided(denoiser: Denoiser, null_label: int) -> Denoiser:
    """Classifier-free guidance around ``denoiser``: ``out_u + s * (out_c - out_u)`` per row, with
    ``s`` the row's ``guidance_scale``. The conditional and unconditional rows of all guided rows go
    through **one** call (2B rows), so a Router runs each expert once per step.

    The combination is taken on the model's output as it is (eps, v or x0): each is affine in the
    others with coefficients that depend only on x_t and t, which both branches share, so guiding
    the output is guiding eps. Rows with scale 1 (or no scale) cost one row, not two.
    """

    def run(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        scale = cond.get(GUIDANCE)
        inner = model_inputs(cond)
        if scale is None or not bool((scale != 1).any()):
            return denoiser(x, t, inner)
        rows = (scale != 1).nonzero().reshape(-1)
        uncond = take(unconditional(cond, null_label), rows)
        out = denoiser(torch.cat([x, x[rows]]), torch.cat([t, t[rows]]), cat([inner, uncond]))
        out_c, out_u = out[: len(x)], out[len(x) :]
        s = scale[rows].to(out.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        guided_rows = out_u + s * (out_c[rows] - out_u)
        return out_c.index_copy(0, rows, guided_rows)

    return run


def for_model(denoiser: Denoiser, conditioning: Conditioning) -> Denoiser:
    """The denoiser a sampler should call: guided where the model has a null condition to guide
    against (the null class; the negative or empty text), else as it is. A row without a
    ``guidance_scale`` is unguided."""
    return denoiser if conditioning.unconditional else guided(denoiser, conditioning.null_label)


def sampling_condition(
    conditioning: Conditioning, n: int, labels: Sequence[int] | None, guidance_scale: float = 1.0
) -> dict[str, torch.Tensor] | None:
    """The condition of ``n`` images to sample: ``labels`` cycled over them (every class in turn
    where none are given) at ``guidance_scale``; None for an unconditional model, which refuses
    labels and guidance in one line."""
    if conditioning.text_dim:
        raise StepadaptError("a text-conditioned model needs its text encoder: sample it from prompts")
    if not conditioning.classes:
        if labels:
            raise StepadaptError("class labels given, but this model is not class-conditional")
        if guidance_scale != 1.0:
            raise StepadaptError("guidance needs a class-conditional model; this one is unconditional")
        return None
    base = torch.as_tensor(labels if labels else range(conditioning.classes), dtype=torch.long)
    cond = labels_cond(base[balanced_labels(n, len(base))], guidance_scale)
    conditioning.check(cond, n)
    return cond
