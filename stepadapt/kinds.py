"""Expert kinds: what an expert *is*, behind one registry.

An expert is a denoiser ``(x, t) -> eps`` over an interval of timesteps (k-diffusion's
"a model is just a callable"); its kind says how it is built from the base and a
plan group, which files a bundle keeps for it, how it loads and exports, what it
costs and whether fine-tuning recovers it. The rest of the code asks its kind
(``kind_of(spec.kind).trains``) instead of comparing names, so a new kind is one
class here plus its tests.

- ``unet``: a structurally pruned copy of the base (or the base itself): weights
  plus the torch-pruning history that rebuilds its structure from the base config.
- ``gaussian``: the closed-form denoiser of the training images' mean and
  covariance, full or low-rank (stepadapt.gaussian); its size is set by the image,
  not the budget, and its exact flow map allows the analytic jump.
- ``class-gaussian``: one low-rank Gaussian per class plus the pooled one for the
  null class, for class-conditional bases: the noisy end keeps the label.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from stepadapt import StepadaptError
from stepadapt.conditioning import Conditioning, conditioning_of
from stepadapt.gaussian import ClassGaussianDenoiser, GaussianDenoiser
from stepadapt.io import save_safetensors, sha256_file, write_json

Stored = Any  # what a kind keeps in memory for one expert: (U-Net, history) or a GaussianDenoiser


@dataclass
class BuildContext:
    """Everything a kind may build an expert from; each kind takes what it needs."""

    base: UNet2DModel
    scheduler_cfg: dict
    proxy_train: torch.Tensor | None = None
    proxy_val: torch.Tensor | None = None
    candidates: tuple = ()
    memory: Any = None
    seed: int = 0
    # fitted once, before (stepadapt.plan.GaussianChoice): a GaussianDenoiser or ClassGaussianDenoiser
    gaussian: torch.nn.Module | None = None
    log: Callable[[str], None] | None = None
    parent: tuple[UNet2DModel, list, str | None] | None = None  # nested pruning: model, history, name
    # The candidate search a pruned kind is built by (stepadapt.importance.search_group), injected
    # by the caller so that kinds stay below the pruning machinery.
    search: Callable[..., Any] | None = None
    # a class-conditional base: the proxy images' labels, row for row
    proxy_train_labels: torch.Tensor | None = None
    proxy_val_labels: torch.Tensor | None = None

    def proxy_labels(self) -> dict[str, torch.Tensor]:
        """The search's label arguments, where there are labels (none: the call it always was)."""
        if self.proxy_train_labels is None and self.proxy_val_labels is None:
            return {}
        return {"train_labels": self.proxy_train_labels, "val_labels": self.proxy_val_labels}


@dataclass
class Built:
    """One built expert: the model as its kind stores it and the manifest fields it fills."""

    stored: Stored
    macs: int
    params: int
    importance: str = ""
    proxy_loss: float | None = None
    parent: str | None = None


class ExpertKind:
    """One kind of expert. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    model_type: ClassVar[type]  # what an expert of this kind is in memory
    label: ClassVar[str]  # how a table names it beside its size
    sized_by_budget: ClassVar[bool]  # the allocator chooses its MACs (else the image sets them)
    jumps: ClassVar[bool] = False  # an exact flow map over its interval exists (``--jump``)
    # a pruning history over the base: it can be a slice of the base (shared fine-tuning, nesting)
    has_structure: ClassVar[bool] = False
    # manifest (path field, sha256 field) pairs every bundle must verify before loading
    files: ClassVar[tuple[tuple[str, str], ...]] = (("weights", "sha256"),)

    def build(self, group: Any, target_macs: float, ctx: BuildContext) -> Built:
        raise NotImplementedError

    def write(self, directory: Path, name: str, stored: Stored) -> dict[str, str]:
        """Write the expert's files into ``directory`` (atomically); the manifest fields for them."""
        raise NotImplementedError

    def load(self, root: Path, spec: Any, manifest: Any) -> torch.nn.Module:
        """Rebuild the expert from its verified files, checking every shape."""
        raise NotImplementedError

    def stored(self, root: Path, spec: Any, manifest: Any) -> Stored:
        """The expert in the form :meth:`write` takes (to re-save a loaded bundle)."""
        return self.load(root, spec, manifest)

    def trains(self, root: Path, spec: Any) -> bool:
        """Whether fine-tuning has anything to recover in this expert."""
        return False

    def history(self, root: Path, spec: Any) -> list:
        """The pruning history that rebuilds this expert from the base (``has_structure`` kinds)."""
        raise StepadaptError(f"expert {spec.name} is a {self.name} denoiser: it has no pruning structure")

    def describe(self, root: Path, spec: Any) -> str:
        """What it is, for the line that says why fine-tuning leaves it alone."""
        return f"a {self.name} expert"

    def same(self, a: Stored, b: Stored) -> bool:
        """Whether two neighbouring experts are one network (then the bundle keeps one)."""
        return False

    def as_eps(self, model: torch.nn.Module) -> torch.nn.Module:
        """The expert as a module ``(sample, timestep, *condition) -> eps tensor`` (the condition's
        inputs in the order :meth:`conditioning` names them): what ONNX exports."""
        return _EpsOnly(model, self.conditioning(model).inputs)

    def conditioning(self, model: torch.nn.Module) -> Conditioning:
        """What the expert takes beside (x, t)."""
        return Conditioning()

    def sample_shape(self, model: torch.nn.Module) -> tuple[int, int, int]:
        raise NotImplementedError


def _tensors(root: Path, spec: Any) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(root / spec.weights))
    except (SafetensorError, OSError) as err:
        raise StepadaptError(f"cannot read weights of expert {spec.name}: {err}") from None


class _EpsOnly(torch.nn.Module):
    """diffusers returns a dataclass and takes its condition by keyword; ONNX wants a plain tensor
    output and positional inputs: ``(sample, timestep, *condition)`` in the order of ``keys``."""

    def __init__(self, model: torch.nn.Module, keys: tuple[str, ...] = ()):
        super().__init__()
        self.model, self.keys = model, tuple(keys)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        out = self.model(sample, timestep, **dict(zip(self.keys, cond, strict=True)))
        return getattr(out, "sample", out)


class UNetKind(ExpertKind):
    name = "unet"
    model_type = (UNet2DModel, UNet2DConditionModel)
    label = ""
    sized_by_budget = True
    has_structure = True
    files = (("weights", "sha256"), ("structure", "structure_sha256"))

    def build(self, group: Any, target_macs: float, ctx: BuildContext) -> Built:
        if ctx.search is None:
            raise StepadaptError(f"group {group.name}: a pruned U-Net needs a candidate search to build it")
        parent, parent_history, parent_name = ctx.parent or (ctx.base, [], None)
        res = ctx.search(
            parent, ctx.scheduler_cfg, group.lo, group.hi, target_macs, ctx.proxy_train, ctx.proxy_val,
            candidates=ctx.candidates, memory=ctx.memory, seed=ctx.seed, log=ctx.log, **ctx.proxy_labels(),
        )  # fmt: skip
        history = parent_history + res.best.history
        importance = res.best_label if res.best.history else ("unpruned" if not history else "parent's")
        return Built(
            (res.best.model, history), res.best.macs, res.best.params, importance=importance,
            proxy_loss=round(res.proxy_loss, 6), parent=parent_name if parent_history else None,
        )  # fmt: skip

    def write(self, directory: Path, name: str, stored: Stored) -> dict[str, str]:
        model, history = stored
        directory.mkdir(parents=True, exist_ok=True)
        w, s = directory / f"{name}.safetensors", directory / f"{name}.structure.json"
        sha = save_safetensors(w, model.state_dict())
        write_json(s, history)
        return {
            "weights": f"{directory.name}/{w.name}",
            "sha256": sha,
            "structure": f"{directory.name}/{s.name}",
            "structure_sha256": sha256_file(s),
        }

    def history(self, root: Path, spec: Any) -> list:
        return json.loads((root / spec.structure).read_text())

    def load(self, root: Path, spec: Any, manifest: Any) -> torch.nn.Module:
        from stepadapt.prune import replay

        model = replay(manifest.base_config, self.history(root, spec))
        tensors, expected = _tensors(root, spec), model.state_dict()
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise StepadaptError(
                f"weights of expert {spec.name} do not match its structure "
                f"(missing {missing[:3]}, unexpected {extra[:3]})"
            )
        for k, v in expected.items():
            if tuple(tensors[k].shape) != tuple(v.shape):
                raise StepadaptError(
                    f"weights of expert {spec.name} do not match its structure: {k} has shape "
                    f"{tuple(tensors[k].shape)}, structure wants {tuple(v.shape)}"
                )
        model.load_state_dict(tensors)
        return model.eval()

    def stored(self, root: Path, spec: Any, manifest: Any) -> Stored:
        return self.load(root, spec, manifest), self.history(root, spec)

    def trains(self, root: Path, spec: Any) -> bool:
        return bool(self.history(root, spec))  # an empty history is the base itself

    def describe(self, root: Path, spec: Any) -> str:
        return "a pruned U-Net" if self.trains(root, spec) else "the unpruned base"

    def same(self, a: Stored, b: Stored) -> bool:
        if a[1] != b[1]:
            return False
        sa, sb = a[0].state_dict(), b[0].state_dict()
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    def conditioning(self, model: torch.nn.Module) -> Conditioning:
        return conditioning_of(model.config)

    def sample_shape(self, model: torch.nn.Module) -> tuple[int, int, int]:
        c = model.config
        return c.in_channels, c.sample_size, c.sample_size


class GaussianKind(ExpertKind):
    name = "gaussian"
    model_type = GaussianDenoiser
    label = "Gaussian"
    sized_by_budget = False
    jumps = True

    def build(self, group: Any, target_macs: float, ctx: BuildContext) -> Built:
        if ctx.gaussian is None:
            raise StepadaptError(
                f"the plan gives [{group.lo},{group.hi}) to a {self.label} expert, but none was fitted"
            )
        if not isinstance(ctx.gaussian, self.model_type):
            raise StepadaptError(
                f"the plan gives [{group.lo},{group.hi}) to a {self.name} expert, but the fit is a "
                f"{type(ctx.gaussian).__name__}"
            )
        g, serves = ctx.gaussian, conditioning_of(ctx.base.config)
        if self.conditioning(g) != serves:
            raise StepadaptError(
                f"a {self.label} expert taking {self.conditioning(g).describe()} cannot stand in for a base "
                f"taking {serves.describe()}"
            )
        return Built(g, g.macs, g.params, importance="closed form")

    def write(self, directory: Path, name: str, stored: Stored) -> dict[str, str]:
        directory.mkdir(parents=True, exist_ok=True)
        w = directory / f"{name}.safetensors"
        return {"weights": f"{directory.name}/{w.name}", "sha256": save_safetensors(w, stored.tensors())}

    def load(self, root: Path, spec: Any, manifest: Any) -> torch.nn.Module:
        return self.from_tensors(
            _tensors(root, spec), manifest.sample_shape, manifest.scheduler, manifest.conditioning
        )

    def from_tensors(
        self, tensors: dict[str, torch.Tensor], sample_shape: tuple[int, int, int], scheduler_cfg: dict,
        conditioning: Conditioning,
    ) -> torch.nn.Module:  # fmt: skip
        """The expert from its stored tensors (a bundle's file, or the fit analyze kept beside a plan),
        checked against the model it stands in for."""
        return GaussianDenoiser.from_tensors(tensors, sample_shape, scheduler_cfg)

    def describe(self, root: Path, spec: Any) -> str:
        return "a closed-form Gaussian denoiser"

    def sample_shape(self, model: torch.nn.Module) -> tuple[int, int, int]:
        return model.sample_shape


class ClassGaussianKind(GaussianKind):
    """One low-rank Gaussian per class and the pooled one for the null class
    (:class:`stepadapt.gaussian.ClassGaussianDenoiser`), taking ``class_labels`` beside (x, t) as a
    class-conditional U-Net does, so guidance, the Router and ONNX export treat it alike.

    No analytic jump: each row's own Gaussian has an exact flow, but the guided map
    ``eps_u + s (eps_c - eps_u)`` mixes two Gaussians' scores and is not the flow of any Gaussian,
    so the sampler steps through its interval like any expert's."""

    name = "class-gaussian"
    model_type = ClassGaussianDenoiser
    label = "class Gaussian"
    jumps = False

    def from_tensors(
        self, tensors: dict[str, torch.Tensor], sample_shape: tuple[int, int, int], scheduler_cfg: dict,
        conditioning: Conditioning,
    ) -> torch.nn.Module:  # fmt: skip
        if not conditioning.classes:
            raise StepadaptError("a class Gaussian expert serves class-conditional models only")
        return ClassGaussianDenoiser.from_tensors(tensors, sample_shape, scheduler_cfg, conditioning.classes)

    def describe(self, root: Path, spec: Any) -> str:
        return "closed-form Gaussian denoisers, one per class"

    def conditioning(self, model: torch.nn.Module) -> Conditioning:
        return model.conditioning


KINDS: dict[str, ExpertKind] = {}


def register(kind: ExpertKind) -> ExpertKind:
    """Add a kind; the manifest schema, the plan and the CLI take the valid names from here."""
    KINDS[kind.name] = kind
    return kind


UNET = register(UNetKind())
GAUSSIAN = register(GaussianKind())
CLASS_GAUSSIAN = register(ClassGaussianKind())
DEFAULT = UNET.name  # manifests and plans from before kinds existed hold only U-Nets


def kind_of(name: str) -> ExpertKind:
    try:
        return KINDS[name]
    except KeyError:
        raise StepadaptError(f"unknown expert kind {name!r}; known: {', '.join(KINDS)}") from None


def kind_of_model(model: torch.nn.Module) -> ExpertKind:
    """The kind of an in-memory expert (for export, which gets models rather than specs)."""
    for kind in KINDS.values():
        if isinstance(model, kind.model_type):
            return kind
    raise StepadaptError(f"no expert kind holds a {type(model).__name__}")
