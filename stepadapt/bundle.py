"""The expert bundle: a directory of pruned experts and the manifest that describes them.

```
manifest.json                 format, version, base config, scheduler, experts, provenance
experts/<name>.safetensors    weights
experts/<name>.structure.json torch-pruning history that turns the base config into the expert
```
No pickle anywhere: each expert's kind (stepadapt.kinds) writes and rebuilds
its own files (a U-Net replays its pruning history on a fresh base built from
the config, then loads its safetensors). Loading checks every checksum, the
coverage of [0, T) and every tensor shape. The manifest records the base the
bundle was cut from (its weights' sha256) and the data it was fitted to, so a
teacher or reference of other weights is caught.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from stepadapt import StepadaptError, __version__
from stepadapt.conditioning import Conditioning, conditioning_of
from stepadapt.gaussian import GaussianJump
from stepadapt.io import atomic_dir, read_json, save_safetensors, sha256_file, write_json
from stepadapt.kinds import DEFAULT, Stored, kind_of
from stepadapt.pipeline import BUNDLE_DIR as SURROUND_DIR
from stepadapt.pipeline import Surround, copy_surround
from stepadapt.plan import check_coverage, visited_timesteps
from stepadapt.prune import History
from stepadapt.sampling import Denoiser, Router, module_denoiser, steps_for_jump
from stepadapt.schema import safe_relative, validate_manifest
from stepadapt.solvers import Solver

BUNDLE_FORMAT = "stepadapt-bundle"
BUNDLE_VERSION = 3  # 3: records its base and data; 2: experts have a kind (1 loads as all U-Nets)
MANIFEST = "manifest.json"


@dataclass
class ExpertDraft:
    """An expert before its files exist: what a stage decided. :func:`save_bundle` writes the files
    through the expert's kind and turns each draft into an :class:`ExpertSpec`."""

    name: str
    timesteps: tuple[int, int]  # [lo, hi)
    snr_db: tuple[float, float]
    target_macs: int
    macs: int
    params: int
    importance: str = ""
    proxy_loss: float | None = None
    parent: str | None = None  # nested pruning: the larger expert this one was cut from
    training: dict[str, Any] | None = None
    kind: str = DEFAULT  # a name in stepadapt.kinds.KINDS

    @property
    def lo(self) -> int:
        return self.timesteps[0]

    @property
    def hi(self) -> int:
        return self.timesteps[1]


@dataclass
class ExpertSpec(ExpertDraft):
    """A written expert: its draft plus the files its kind keeps (checksummed) and its exports."""

    weights: str = field(default="", kw_only=True)
    sha256: str = field(default="", kw_only=True)
    structure: str = field(default="", kw_only=True)  # U-Nets: the pruning history
    structure_sha256: str = field(default="", kw_only=True)
    onnx: dict[str, Any] | None = field(default=None, kw_only=True)
    trt: dict[str, Any] | None = field(default=None, kw_only=True)

    def draft(self) -> ExpertDraft:
        """What to re-save this expert from (its exports stay behind: they are files of this bundle)."""
        return ExpertDraft(**{k: v for k, v in asdict(self).items() if k in ExpertDraft.__dataclass_fields__})


@dataclass
class Manifest:
    base_config: dict[str, Any]
    scheduler: dict[str, Any]
    sample_shape: tuple[int, int, int]
    base_macs: int
    base_params: int
    experts: list[ExpertSpec]
    plan: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    # How to sample this bundle, as measured by `stepadapt tune`: sampler spec, steps, jump, the KID
    # it scored and the base's best at no more MACs per image. The default of sample/evaluate/serve.
    recommended: dict[str, Any] | None = None
    # The base the experts were cut from: {"path": as given, "sha256": models.weights_sha256}; and
    # the data they were fitted to: {"source": as given, "sha256": data.fingerprint of its train part}.
    base: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    # A class-conditional bundle's class names (index order), copied from its base's classes.json.
    class_names: list[str] | None = None
    # A pipeline base's surround (VAE, text encoder, tokenizer), copied under pipeline/:
    # {part: {file name: sha256}} (stepadapt.pipeline), so the bundle alone is a whole pipeline.
    pipeline: dict[str, dict[str, str]] | None = None
    # Their ONNX exports (stepadapt.export.surround): {"text_encoder" | "vae_decoder": {path, sha256,
    # max_abs_err, opset, inputs, outputs}}, what a server runs beside the experts.
    surround_onnx: dict[str, dict[str, Any]] | None = None

    @property
    def conditioning(self) -> Conditioning:
        """What the experts are conditioned on: the base's (every expert keeps its inputs)."""
        return conditioning_of(self.base_config)

    @property
    def prediction_type(self) -> str:
        """What every expert outputs (eps, v or x0): the scheduler's, never a second copy of it."""
        return str(self.scheduler.get("prediction_type", "epsilon"))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler["num_train_timesteps"])

    @property
    def boundaries(self) -> list[int]:
        return [e.lo for e in self.experts] + [self.experts[-1].hi]

    def _visits(self, steps: int | None, sampler: str | Solver | None, jump: bool = False) -> np.ndarray:
        """The timesteps the model runs at (the plan's sampler and steps by default: 50 DDIM); with
        ``jump``, only those the solver steps below the Gaussian's cut-off."""
        plan = self.plan or {}
        solver = Solver.parse(sampler or plan.get("sampler", "ddim"))
        steps = steps or plan.get("steps", 50)
        if not jump:
            return visited_timesteps(solver, steps, self.scheduler)
        visits = visited_timesteps(
            solver, steps_for_jump(solver, steps, self.jump_cut, self.scheduler), self.scheduler
        )
        return visits[visits < self.jump_cut]

    @property
    def can_jump(self) -> bool:
        """Whether the expert on the noisy end has an exact flow map (the analytic jump)."""
        return kind_of(self.experts[-1].kind).jumps

    @property
    def jump_cut(self) -> int:
        """Where the analytic jump stops: the lowest timestep of the Gaussian expert on the noisy end."""
        if not self.can_jump:
            raise StepadaptError("the jump needs a Gaussian expert on the noisy end; this bundle has none")
        return self.experts[-1].lo

    def visit_shares(self, steps: int | None = None, sampler: str | Solver | None = None) -> list[float]:
        """Fraction of the model evaluations (the plan's sampler by default: 50 DDIM) each expert serves."""
        visits = self._visits(steps, sampler)
        return [float(np.mean((visits >= e.lo) & (visits < e.hi))) for e in self.experts]

    def trajectory_macs_ratio(self, steps: int | None = None, sampler: str | Solver | None = None) -> float:
        """Mean MACs per model evaluation, as a fraction of the base's."""
        shares = self.visit_shares(steps, sampler)
        return sum(s * e.macs for s, e in zip(shares, self.experts, strict=True)) / self.base_macs

    def macs_per_image(
        self, steps: int | None = None, sampler: str | Solver | None = None, jump: bool = False
    ) -> float:
        """What one image costs, in base evaluations: every model evaluation the solver makes (two
        per Heun step, PNDM's warm-up) at the expert that owns it, plus the jump (one Gaussian
        evaluation's MACs) where there is one."""
        visits = self._visits(steps, sampler, jump)
        total = sum(int(((visits >= e.lo) & (visits < e.hi)).sum()) * e.macs for e in self.experts)
        if jump:
            total += self.experts[-1].macs
        return total / self.base_macs

    def default_base(self, flag: str) -> Path:
        """The default teacher and reference: the recorded base; the shipped base for bundles made
        before bases were recorded. A recorded base that is not here is said (``flag`` names the
        option to give it by), never replaced by another."""
        from stepadapt.models import DEFAULT_BASE

        if self.base is None:
            return DEFAULT_BASE
        path = Path(self.base.get("path", ""))
        if not path.is_dir():
            raise StepadaptError(
                f"the bundle was cut from {path} (weights sha256 {self.base['sha256'][:16]}...), which is "
                f"not here: pass {flag} with that base"
            )
        return path

    def check_base(self, model: torch.nn.Module, path: str | os.PathLike, allow_other: bool = False) -> None:
        """Refuse a teacher or reference whose weights are not the recorded base's (one line naming
        both digests): a same-architecture model of other weights would otherwise be taken silently."""
        from stepadapt.models import weights_sha256

        if self.base is None or allow_other:
            return
        digest = weights_sha256(model)
        if digest != self.base["sha256"]:
            raise StepadaptError(
                f"{path} has weights sha256 {digest[:16]}..., but the bundle was cut from "
                f"{self.base.get('path', 'its base')} (sha256 {self.base['sha256'][:16]}...); "
                "pass --allow-other-base to use it anyway"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if not isinstance(d, dict) or d.get("format") != BUNDLE_FORMAT:
            raise StepadaptError("not a stepadapt bundle manifest (format field missing or wrong)")
        if d.get("version") not in (1, 2, BUNDLE_VERSION):
            raise StepadaptError(f"unsupported bundle version {d.get('version')} (want {BUNDLE_VERSION})")
        validate_manifest(d)
        # prediction_type: bundles before 2026-12 kept a copy beside the scheduler's own
        body = {k: v for k, v in d.items() if k not in ("format", "version", "prediction_type")}
        try:
            body["experts"] = [
                ExpertSpec(**{**e, "timesteps": tuple(e["timesteps"]), "snr_db": tuple(e["snr_db"])})
                for e in body["experts"]
            ]
            body["sample_shape"] = tuple(body["sample_shape"])
            return cls(**body)
        except (TypeError, KeyError) as e:
            raise StepadaptError(f"malformed bundle manifest: {e}") from None


def provenance(command: str | None = None, **extra) -> dict[str, Any]:
    import diffusers
    import torch_pruning

    return {
        "command": command or " ".join(sys.argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {
            "stepadapt": __version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "torch_pruning": torch_pruning.__version__,
            "python": platform.python_version(),
        },
        **extra,
    }


def save_weights(path: Path, model: UNet2DModel) -> str:
    """Write ``model``'s tensors as safetensors (atomically); returns the file's sha256."""
    return save_safetensors(path, model.state_dict())


def merge_identical(drafts: list[ExpertDraft], models: dict[str, Stored]) -> list[ExpertDraft]:
    """Drafts in timestep order, each run of neighbouring identical networks folded into the first."""
    merged: list[ExpertDraft] = []
    for e in sorted(drafts, key=lambda e: e.lo):
        prev = merged[-1] if merged else None
        if (
            prev is not None and prev.kind == e.kind and prev.hi == e.lo
            and kind_of(e.kind).same(models[prev.name], models[e.name])
        ):  # fmt: skip
            prev.timesteps, prev.snr_db = (prev.lo, e.hi), (e.snr_db[0], prev.snr_db[1])
            continue
        merged.append(e)
    return merged


def save_bundle(
    path: str | os.PathLike, manifest: Manifest, drafts: list[ExpertDraft], models: dict[str, Stored],
    surround: str | os.PathLike | None = None,
) -> Manifest:  # fmt: skip
    """Write a whole bundle atomically (a crash leaves the previous one, or none); returns
    ``manifest`` with its experts: ``drafts`` with the files their kinds wrote.

    Neighbouring experts that are the same network (typically two groups that
    both got the whole base) are written once, as one expert over both
    intervals: one copy of the weights, one model to serve. ``surround``: a pipeline directory (or
    a bundle's copy of one) whose VAE and text parts the bundle copies.
    """
    drafts = merge_identical([replace(d) for d in drafts], models)
    check_coverage([d.lo for d in drafts] + [drafts[-1].hi], int(manifest.scheduler["num_train_timesteps"]))
    path = Path(path)
    with atomic_dir(path) as tmp:
        experts = [
            ExpertSpec(**asdict(d), **kind_of(d.kind).write(tmp / "experts", d.name, models[d.name]))
            for d in drafts
        ]
        parts = copy_surround(surround, tmp / SURROUND_DIR) if surround is not None else None
        manifest = replace(manifest, experts=experts, pipeline=parts or None)
        write_json(tmp / MANIFEST, manifest.to_dict())
    return manifest


class Bundle:
    """A loaded, validated bundle. Experts are rebuilt lazily on request."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> Bundle:
        path = Path(path)
        if not path.is_dir():
            raise StepadaptError(f"bundle directory not found: {path}")
        m = Manifest.from_dict(read_json(path / MANIFEST, "bundle manifest"))
        names = [e.name for e in m.experts]
        if len(set(names)) != len(names):
            raise StepadaptError(f"bundle {path} has duplicate expert names")
        ordered = sorted(m.experts, key=lambda e: e.lo)
        for a, b in zip(ordered, ordered[1:], strict=False):
            if a.hi > b.lo:
                raise StepadaptError(f"experts {a.name} and {b.name} overlap at t={b.lo}..{a.hi}")
            if a.hi < b.lo:
                raise StepadaptError(
                    f"no expert covers timesteps [{a.hi}, {b.lo}) (gap between {a.name} and {b.name})"
                )
        m.experts = ordered
        check_coverage(m.boundaries, m.num_train_timesteps)
        b = cls(path, m)
        if verify:
            for e in m.experts:
                for path_field, sha_field in kind_of(e.kind).files:
                    what = f"{path_field} of expert {e.name}"
                    b.verify_file(getattr(e, path_field), getattr(e, sha_field), what)
            for part, files in (m.pipeline or {}).items():
                for name, sha in files.items():
                    b.verify_file(f"{SURROUND_DIR}/{part}/{name}", sha, f"{part} file {name}")
        return b

    @property
    def surround_dir(self) -> Path | None:
        """Where this bundle keeps its pipeline's VAE and text parts (None: a bare U-Net's bundle)."""
        return self.path / SURROUND_DIR if self.manifest.pipeline else None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """C x H x W of the images it makes: its samples', or its VAE's pixels for a latent bundle."""
        if self.surround_dir is None or not (self.surround_dir / "vae" / "config.json").is_file():
            return tuple(self.manifest.sample_shape)
        from stepadapt.latents import pixels_per_latent

        vae = read_json(self.surround_dir / "vae" / "config.json", "VAE config")
        f = pixels_per_latent(vae)
        _, h, w = self.manifest.sample_shape
        return int(vae.get("in_channels", 3)), h * f, w * f

    def surround(self) -> Surround | None:
        """The VAE, text encoder and tokenizer this bundle was cut with (verified on load)."""
        return Surround.load(self.surround_dir) if self.surround_dir is not None else None

    def verify_file(self, rel: str, sha: str, what: str) -> Path:
        p = self.path / safe_relative(rel, what)
        root = self.path.resolve()
        if root not in p.resolve().parents:  # a symlink out of the bundle
            raise StepadaptError(f"{what} points outside the bundle: {rel}")
        if not p.is_file():
            raise StepadaptError(f"{what} missing: {p}")
        if sha256_file(p) != sha:
            raise StepadaptError(f"{what} failed its checksum: {p} is corrupt or was changed")
        return p

    @property
    def experts(self) -> list[ExpertSpec]:
        return self.manifest.experts

    def expert(self, name: str) -> ExpertSpec:
        for e in self.experts:
            if e.name == name:
                return e
        raise StepadaptError(f"bundle has no expert {name!r} (has {', '.join(e.name for e in self.experts)})")

    def structure(self, name: str) -> History:
        """The expert's pruning history on the base (empty: the expert is the base itself)."""
        e = self.expert(name)
        return kind_of(e.kind).history(self.path, e)

    def is_pruned(self, name: str) -> bool:
        """Whether fine-tuning has anything to recover (not the base itself, not a closed form)."""
        e = self.expert(name)
        return kind_of(e.kind).trains(self.path, e)

    def describe(self, name: str) -> str:
        e = self.expert(name)
        return kind_of(e.kind).describe(self.path, e)

    def load_expert(self, name: str) -> torch.nn.Module:
        """Rebuild an expert and load its weights, checking every shape."""
        e = self.expert(name)
        return kind_of(e.kind).load(self.path, e, self.manifest)

    def models(self) -> dict[str, Stored]:
        """Every expert loaded, in the form :func:`save_bundle` writes."""
        return {e.name: kind_of(e.kind).stored(self.path, e, self.manifest) for e in self.experts}

    def copy_to(self, path: str | os.PathLike) -> Bundle:
        """This bundle re-saved at ``path`` (experts that are the same network stored once); exports
        are not copied."""
        save_bundle(
            path, replace(self.manifest, experts=[], surround_onnx=None), [e.draft() for e in self.experts],
            self.models(),
            surround=self.surround_dir,
        )  # fmt: skip
        return Bundle.load(path)

    def router(self, device: str | torch.device = "cpu") -> Router:
        """PyTorch experts (on ``device``) behind a Router: a denoiser like any other."""
        return Router(
            self.manifest.boundaries,
            [self.denoiser(e.name, device) for e in self.experts],
        )

    def jump(self) -> GaussianJump:
        """The analytic jump over the Gaussian expert's interval (``--jump``)."""
        cut = self.manifest.jump_cut
        return GaussianJump(self.load_expert(self.experts[-1].name), cut)

    def denoiser(self, name: str, device: str | torch.device = "cpu") -> Denoiser:
        """One expert as a plain ``(x, t) -> eps`` function (PyTorch, on ``device``)."""
        return module_denoiser(self.load_expert(name).to(device))

    def update_experts(self, changes: dict[str, dict[str, Any]]) -> None:
        """The one way a bundle's manifest changes after it is written: under a lock, re-read it
        from disk, set the given fields of the given experts, write it atomically. Parallel jobs on
        one bundle (``finetune --expert`` per expert, ``export``) then each add their own experts'
        fields instead of the last writer restoring everyone else's stale copy."""

        def change(current: Manifest) -> None:
            by_name = {e.name: e for e in current.experts}
            for name, fields in changes.items():
                if name not in by_name:
                    raise StepadaptError(f"bundle {self.path} no longer has an expert {name!r}")
                for k, v in fields.items():
                    setattr(by_name[name], k, v)
                    setattr(self.expert(name), k, v)

        self._update(change)

    def set_recommended(self, recommended: dict[str, Any] | None) -> None:
        """Record how to sample this bundle (``stepadapt tune``), under the same lock as the experts."""

        def change(current: Manifest) -> None:
            current.recommended = self.manifest.recommended = recommended

        self._update(change)

    def set_surround_onnx(self, records: dict[str, dict[str, Any]]) -> None:
        """Record the text encoder's and VAE decoder's ONNX exports, under the manifest's lock."""

        def change(current: Manifest) -> None:
            current.surround_onnx = self.manifest.surround_onnx = {**(current.surround_onnx or {}), **records}

        self._update(change)

    def surround_onnx(self, part: str) -> Path:
        """The verified ONNX file of a surround part (``text_encoder``, ``vae_decoder``)."""
        r = (self.manifest.surround_onnx or {}).get(part)
        if r is None:
            raise StepadaptError(f"bundle {self.path} has no ONNX {part}: run 'stepadapt export {self.path}'")
        return self.verify_file(r["path"], r["sha256"], f"ONNX {part}")

    def _update(self, change) -> None:
        import fcntl

        with open(self.path / ".manifest.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = Manifest.from_dict(read_json(self.path / MANIFEST, "bundle manifest"))
                change(current)
                write_json(self.path / MANIFEST, current.to_dict())
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def cast_weights(self, dtype: torch.dtype) -> None:
        """Store every expert's weights as ``dtype`` (float16 ships a bundle at half the size).

        Loading casts them back to the rebuilt model's float32, so only the
        stored precision changes.
        """
        changes = {}
        for e in self.experts:
            path = self.verify_file(e.weights, e.sha256, f"weights of expert {e.name}")
            tensors = {k: v.to(dtype) for k, v in load_file(str(path)).items()}
            changes[e.name] = {"sha256": save_safetensors(path, tensors)}
        self.update_experts(changes)

    def update_expert_weights(self, name: str, model: UNet2DModel, **fields) -> None:
        """Replace one expert's weights (same structure) and update the manifest atomically."""
        e = self.expert(name)
        self.update_experts({name: {"sha256": save_weights(self.path / e.weights, model), **fields}})
