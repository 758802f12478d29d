"""Proxy-based structural importance and the per-group candidate search.

The proxy is deterministic: first-order Taylor scores from the denoising loss
*at the group's own timesteps* decide which channels an expert keeps, and each
candidate structure is judged by its untrained denoising loss on held-out data
at those timesteps. Tried candidates are remembered in a JSON memory bank, so a
re-run with the same base, group and budget skips the search.

A class-conditional base is scored on its conditional loss: the proxy images' labels travel
beside them, a share of them dropped to the null class as in training (so the channels the
unconditional branch of guidance needs count too).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from diffusers import UNet2DModel

from stepadapt import StepadaptError
from stepadapt.conditioning import (
    DEFAULT_LABEL_DROPOUT,
    Labels,
    Prompts,
    conditioning_of,
    drop_rows,
    rows_cond,
    take,
)
from stepadapt.devices import device_of
from stepadapt.difficulty import loss_profile
from stepadapt.io import read_json, write_json
from stepadapt.prune import History, PruneResult, apply_history, prune_to_macs
from stepadapt.schedule import make_scheduler
from stepadapt.train import denoising_loss


@dataclass(frozen=True)
class ProxyBatch:
    """Fixed images, timesteps and noise (and the images' condition): the same evaluation for every
    candidate."""

    x0: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    cond: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def draw(
        cls,
        data: torch.Tensor,
        lo: int,
        hi: int,
        seed: int,
        labels: Labels | None = None,
        null_label: int | None = None,
    ) -> ProxyBatch:
        """``labels``: the images' classes or captions; a share ``DEFAULT_LABEL_DROPOUT`` of them is
        dropped to the null class (with a ``null_label``) or the empty prompt, as training drops
        them (drawn after the timesteps and the noise, so those are what an unlabelled batch of the
        same seed draws)."""
        g = torch.Generator().manual_seed(seed)
        t = torch.randint(lo, hi, (len(data),), generator=g)
        noise = torch.randn(data.shape, generator=g)
        if labels is None:
            return cls(data, t, noise)
        if labels.shape != (len(data),):
            raise StepadaptError(f"{tuple(labels.shape)} labels for {len(data)} proxy images")
        return cls(data, t, noise, rows_cond(drop_rows(labels, DEFAULT_LABEL_DROPOUT, null_label, g)))

    def to(self, device: torch.device) -> ProxyBatch:
        """Drawn on the CPU (the same batch on any machine), evaluated where the model lives."""
        cond = {k: v.to(device) for k, v in self.cond.items()}
        return ProxyBatch(self.x0.to(device), self.t.to(device), self.noise.to(device), cond)


def null_label(model: torch.nn.Module) -> int | None:
    """The label a class-conditional model's proxy batches drop to; None for other models."""
    cond = conditioning_of(model.config)
    return cond.null_label if cond.classes else None


def group_gradients(
    model: UNet2DModel, scheduler_cfg: dict, batch: ProxyBatch, chunk: int = 64
) -> dict[str, torch.Tensor]:
    """Gradients of the mean denoising loss over ``batch`` (Taylor importance needs them)."""
    sched = make_scheduler("ddpm", scheduler_cfg)
    batch = batch.to(device_of(model))
    model.zero_grad(set_to_none=True)
    model.eval()
    n = len(batch.x0)
    for s in range(0, n, chunk):
        sl = slice(s, s + chunk)
        loss = denoising_loss(
            model, sched, batch.x0[sl], batch.t[sl], batch.noise[sl], cond=take(batch.cond, sl)
        )
        (loss * (len(batch.x0[sl]) / n)).backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def diff_pruning_timesteps(
    model: UNet2DModel,
    scheduler_cfg: dict,
    data: torch.Tensor,
    threshold: float = 0.1,
    seed: int = 0,
    labels: Labels | None = None,
) -> int:
    """Diff-Pruning's rule: keep the low-noise steps until the loss falls below
    ``threshold`` x its peak; returns the end of that [0, t_end) range."""
    cond = rows_cond(labels[:32]) if labels is not None else None
    prof = loss_profile(model, scheduler_cfg, data[:32], points=20, seed=seed, cond=cond)
    below = (prof < threshold * prof.max()).nonzero()[0]
    return int(below[0]) if len(below) and below[0] > 0 else len(prof)


# (base, scheduler config, proxy images, lo, hi, seed, labels=None) -> the batch its gradients come from
GradientBatch = Callable[..., ProxyBatch]


def _group_batch(
    base: UNet2DModel, scheduler_cfg: dict, proxy: torch.Tensor, lo: int, hi: int, seed: int,
    labels: Labels | None = None,
) -> ProxyBatch:  # fmt: skip
    """Taylor's: the loss at the group's own timesteps, so a channel counts where the expert works."""
    return ProxyBatch.draw(proxy, lo, hi, seed, labels, null_label(base))


def _diff_pruning_batch(
    base: UNet2DModel, scheduler_cfg: dict, proxy: torch.Tensor, lo: int, hi: int, seed: int,
    labels: Labels | None = None,
) -> ProxyBatch:  # fmt: skip
    """Diff-Pruning's: its low-noise steps (``diff_pruning_timesteps``), whatever the group."""
    t_end = diff_pruning_timesteps(base, scheduler_cfg, proxy, seed=seed, labels=labels)
    return ProxyBatch.draw(proxy, 0, t_end, seed, labels, null_label(base))


@dataclass(frozen=True)
class ImportanceKind:
    """One way of scoring channels. ``gradient_batch`` is where its loss gradients are taken (None:
    it needs none), so the search backpropagates only for the kinds that read gradients."""

    name: str
    make: Callable[[], tp.importance.Importance]
    gradient_batch: GradientBatch | None = None

    @property
    def needs_gradients(self) -> bool:
        return self.gradient_batch is not None


IMPORTANCE_KINDS: dict[str, ImportanceKind] = {
    k.name: k
    for k in (
        ImportanceKind("taylor", tp.importance.GroupTaylorImportance, _group_batch),
        ImportanceKind("magnitude", lambda: tp.importance.GroupMagnitudeImportance(p=2)),
        ImportanceKind("random", tp.importance.RandomImportance),
        ImportanceKind("diff-pruning", tp.importance.GroupTaylorImportance, _diff_pruning_batch),
    )
}
IMPORTANCES = tuple(IMPORTANCE_KINDS)  # the names, for help texts and validation


def importance_kind(name: str) -> ImportanceKind:
    """The registry entry, so callers ask it (``.needs_gradients``) instead of comparing names."""
    if name not in IMPORTANCE_KINDS:
        raise StepadaptError(f"unknown importance {name!r}; choose one of {', '.join(IMPORTANCES)}")
    return IMPORTANCE_KINDS[name]


def make_importance(kind: str) -> tp.importance.Importance:
    return importance_kind(kind).make()


@torch.no_grad()
def proxy_loss(model: UNet2DModel, scheduler_cfg: dict, batch: ProxyBatch, chunk: int = 128) -> float:
    sched = make_scheduler("ddpm", scheduler_cfg)
    batch = batch.to(device_of(model))
    model.eval()
    total, n = 0.0, len(batch.x0)
    for s in range(0, n, chunk):
        sl = slice(s, s + chunk)
        loss = denoising_loss(
            model, sched, batch.x0[sl], batch.t[sl], batch.noise[sl], cond=take(batch.cond, sl)
        )
        total += loss.item() * len(batch.x0[sl])
    return total / n


@dataclass(frozen=True)
class Candidate:
    importance: str
    global_pruning: bool

    @property
    def label(self) -> str:
        return f"{self.importance}/{'global' if self.global_pruning else 'local'}"

    @classmethod
    def parse(cls, text: str) -> Candidate:
        """'taylor/global' -> Candidate('taylor', True); the scope defaults to local."""
        kind, _, scope = text.strip().partition("/")
        if kind not in IMPORTANCE_KINDS or scope not in ("local", "global", ""):
            raise StepadaptError(
                f"bad candidate {text!r}: use IMPORTANCE[/local|/global], "
                f"IMPORTANCE one of {', '.join(IMPORTANCES)}"
            )
        return cls(kind, scope == "global")


DEFAULT_CANDIDATES = (
    Candidate("taylor", False),
    Candidate("taylor", True),
    Candidate("magnitude", False),
)


@dataclass
class Tried:
    candidate: str
    ratio: float
    macs: int
    params: int
    proxy_loss: float
    history: History


class Memory:
    """JSON memory bank: (base, group, budget, candidate, proxy) -> what was found."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict] = {}
        if self.path and self.path.is_file():
            try:
                self.entries = read_json(self.path, "memory bank")
            except StepadaptError:
                self.entries = {}  # a broken cache is only a cache: start afresh

    @staticmethod
    def key(**parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    def get(self, key: str) -> Tried | None:
        e = self.entries.get(key)
        return Tried(**e) if e else None

    def put(self, key: str, tried: Tried) -> None:
        self.entries[key] = asdict(tried)
        if self.path:
            write_json(self.path, self.entries)


def tensor_fingerprint(tensors: dict[str, torch.Tensor], extra: Any = None) -> str:
    """Every byte of every tensor (and ``extra`` as JSON): a memory-bank entry is reused only for
    the very same base and proxy images, never for one that merely starts alike."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for k, v in sorted(tensors.items()):
        v = v.detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:24]


def base_fingerprint(model: UNet2DModel) -> str:
    return tensor_fingerprint(model.state_dict(), dict(model.config))


@dataclass
class SearchResult:
    best: PruneResult
    best_label: str
    proxy_loss: float
    tried: list[Tried]


def search_group(
    base: UNet2DModel,
    scheduler_cfg: dict,
    lo: int,
    hi: int,
    target_macs: float,
    proxy_train: torch.Tensor,
    proxy_val: torch.Tensor,
    *,
    candidates: tuple[Candidate, ...] = DEFAULT_CANDIDATES,
    memory: Memory | None = None,
    seed: int = 0,
    tol: float = 0.02,
    log=None,
    train_labels: Labels | None = None,
    val_labels: Labels | None = None,
) -> SearchResult:
    """Prune ``base`` to ``target_macs`` with each candidate; keep the lowest proxy loss.
    ``train_labels``/``val_labels``: the proxy images' classes or captions, for a conditional base."""
    memory = memory or Memory(None)
    fp = base_fingerprint(base)
    _check_proxy_labels(base, train_labels, val_labels)
    proxies = {"train": proxy_train, "val": proxy_val}
    if isinstance(train_labels, Prompts):
        proxies.update({f"train_{k}": v for k, v in train_labels.tensors().items()})
        proxies.update({f"val_{k}": v for k, v in val_labels.tensors().items()})
    elif train_labels is not None:  # unlabelled searches keep the keys they always had
        proxies.update(train_labels=train_labels, val_labels=val_labels)
    proxy_fp = tensor_fingerprint(proxies)
    val_batch = ProxyBatch.draw(proxy_val, lo, hi, seed + 1, val_labels, null_label(base))
    grads_cache: dict[str, dict] = {}
    tried: list[Tried] = []
    best: tuple[float, PruneResult, str] | None = None
    for cand in candidates:
        key = memory.key(
            base=fp, lo=lo, hi=hi, target=round(float(target_macs)), cand=cand.label,
            proxy=proxy_fp, seed=seed,
        )  # fmt: skip
        hit = memory.get(key)
        if hit is not None:
            model = apply_history(copy.deepcopy(base).eval(), hit.history)
            res = PruneResult(model, hit.ratio, hit.macs, hit.params, hit.history, True)
            t = hit
        else:
            kind = importance_kind(cand.importance)
            grads = None
            if kind.needs_gradients:  # once per kind: the candidates differ in scope, not in gradients
                if kind.name not in grads_cache:
                    batch = kind.gradient_batch(
                        base, scheduler_cfg, proxy_train, lo, hi, seed, labels=train_labels
                    )
                    grads_cache[kind.name] = group_gradients(base, scheduler_cfg, batch)
                grads = grads_cache[kind.name]
            res = prune_to_macs(
                base, target_macs, lambda c=cand: make_importance(c.importance),
                global_pruning=cand.global_pruning, grads=grads, seed=seed, tol=tol,
            )  # fmt: skip
            t = Tried(cand.label, res.ratio, res.macs, res.params,
                      proxy_loss(res.model, scheduler_cfg, val_batch), res.history)  # fmt: skip
            memory.put(key, t)
        tried.append(t)
        if log:
            log(f"  [{lo},{hi}) {t.candidate}: {t.macs / 1e6:.2f} MMACs, proxy loss {t.proxy_loss:.4f}")
        # A candidate above its budget would win on capacity, not on structure:
        # it only counts if nothing met the budget.
        fits = t.macs <= target_macs * (1 + tol)
        rank = (not fits, t.proxy_loss)
        if best is None or rank < best[0]:
            best = (rank, res, t)
    assert best is not None
    return SearchResult(best[1], best[2].candidate, best[2].proxy_loss, tried)


def _check_proxy_labels(base: torch.nn.Module, train: Labels | None, val: Labels | None) -> None:
    """A class-conditional base needs both proxy sets' labels (in its range), a text-conditioned one
    their captions; an unconditional base none."""
    from stepadapt.space import check_classes

    cond = conditioning_of(base.config)
    if (train is None) != (val is None):
        raise StepadaptError("give labels for both proxy sets or for neither")
    if train is None:
        if not cond.unconditional:
            raise StepadaptError(
                f"this base is conditioned on {cond.describe()}: its proxy images need theirs"
            )
        return
    if cond.text_dim:
        if not (isinstance(train, Prompts) and isinstance(val, Prompts)):
            raise StepadaptError("this base is text-conditioned: its proxy images need captions")
        return
    if not cond.classes or isinstance(train, Prompts):
        raise StepadaptError("proxy labels given, but this base is not class-conditional")
    for labels in (train, val):
        check_classes(labels, cond.classes, "proxy labels")
