"""The expert bundle: a directory of pruned experts and the manifest that describes them.

```
manifest.json                 format, version, base config, scheduler, experts, provenance
experts/<name>.safetensors    weights
experts/<name>.structure.json torch-pruning history that turns the base config into the expert
```
No pickle anywhere: an expert is rebuilt by replaying its pruning history on a
fresh base built from the config, then its safetensors are loaded. Loading
checks every checksum, the coverage of [0, T) and every tensor shape. An expert
of kind ``gaussian`` (stepadapt.gaussian) has no structure: its safetensors
hold the data's mean, covariance eigenbasis and the schedule.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stepadapt import StepadaptError, __version__
from stepadapt.gaussian import GaussianDenoiser, GaussianJump
from stepadapt.io import atomic_dir, atomic_path, read_json, sha256_file, write_json
from stepadapt.plan import check_coverage, visited_timesteps
from stepadapt.prune import History, replay
from stepadapt.sampling import Denoiser, Router, module_denoiser, steps_for_jump
from stepadapt.schema import safe_relative, validate_manifest
from stepadapt.solvers import Solver

BUNDLE_FORMAT = "stepadapt-bundle"
BUNDLE_VERSION = 2  # 2: experts have a kind (1 loads as all U-Nets)
MANIFEST = "manifest.json"


@dataclass
class ExpertSpec:
    name: str
    timesteps: tuple[int, int]  # [lo, hi)
    snr_db: tuple[float, float]
    target_macs: int
    macs: int
    params: int
    weights: str
    sha256: str
    structure: str
    structure_sha256: str
    importance: str = ""
    proxy_loss: float | None = None
    parent: str | None = None  # nested pruning: the larger expert this one was cut from
    onnx: dict[str, Any] | None = None
    trt: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    kind: str = "unet"  # or "gaussian": the closed-form denoiser, nothing to prune or fine-tune

    @property
    def lo(self) -> int:
        return self.timesteps[0]

    @property
    def hi(self) -> int:
        return self.timesteps[1]


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
    def jump_cut(self) -> int:
        """Where the analytic jump stops: the lowest timestep of the Gaussian expert on the noisy end."""
        top = self.experts[-1]
        if top.kind != "gaussian":
            raise StepadaptError("the jump needs a Gaussian expert on the noisy end; this bundle has none")
        return top.lo

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

    def to_dict(self) -> dict[str, Any]:
        return {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if not isinstance(d, dict) or d.get("format") != BUNDLE_FORMAT:
            raise StepadaptError("not a stepadapt bundle manifest (format field missing or wrong)")
        if d.get("version") not in (1, BUNDLE_VERSION):
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
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    return sha256_file(path)


def write_expert_files(directory: Path, name: str, model: UNet2DModel, history: History) -> dict:
    """Write one expert's weights + structure into ``directory``; returns manifest fields."""
    directory.mkdir(parents=True, exist_ok=True)
    w, s = directory / f"{name}.safetensors", directory / f"{name}.structure.json"
    sha = save_weights(w, model)
    write_json(s, history)
    return {
        "weights": f"experts/{w.name}",
        "sha256": sha,
        "structure": f"experts/{s.name}",
        "structure_sha256": sha256_file(s),
    }


def write_gaussian_files(directory: Path, name: str, model: GaussianDenoiser) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    w = directory / f"{name}.safetensors"
    with atomic_path(w) as tmp:
        save_file(model.tensors(), str(tmp))
    return {"weights": f"experts/{w.name}", "sha256": sha256_file(w)}


def _same_network(a: tuple[UNet2DModel, History], b: tuple[UNet2DModel, History]) -> bool:
    if a[1] != b[1]:
        return False
    sa, sb = a[0].state_dict(), b[0].state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def merge_identical(experts: list[ExpertSpec], models: dict) -> list[ExpertSpec]:
    """Experts in timestep order, each run of neighbouring identical U-Nets folded into the first."""
    merged: list[ExpertSpec] = []
    for e in sorted(experts, key=lambda e: e.lo):
        prev = merged[-1] if merged else None
        if (
            prev is not None and prev.kind == e.kind == "unet" and prev.hi == e.lo
            and _same_network(models[prev.name], models[e.name])
        ):  # fmt: skip
            prev.timesteps, prev.snr_db = (prev.lo, e.hi), (e.snr_db[0], prev.snr_db[1])
            continue
        merged.append(e)
    return merged


def save_bundle(
    path: str | os.PathLike,
    manifest: Manifest,
    models: dict[str, tuple[UNet2DModel, History] | GaussianDenoiser],
) -> Path:
    """Write a whole bundle atomically (a crash leaves the previous one, or none).

    Neighbouring experts that are the same network (typically two groups that
    both got the whole base) are written once, as one expert over both
    intervals: one copy of the weights, one model to serve.
    """
    check_coverage(manifest.boundaries, manifest.num_train_timesteps)
    manifest.experts = merge_identical(manifest.experts, models)
    path = Path(path)
    with atomic_dir(path) as tmp:
        for e in manifest.experts:
            if e.kind == "gaussian":
                fields = write_gaussian_files(tmp / "experts", e.name, models[e.name])
            else:
                fields = write_expert_files(tmp / "experts", e.name, *models[e.name])
            for k, v in fields.items():
                setattr(e, k, v)
        write_json(tmp / MANIFEST, manifest.to_dict())
    return path


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
                b.verify_file(e.weights, e.sha256, f"weights of expert {e.name}")
                if e.kind == "unet":
                    b.verify_file(e.structure, e.structure_sha256, f"structure of expert {e.name}")
        return b

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
        if e.kind != "unet":
            raise StepadaptError(f"expert {name} is a {e.kind} denoiser: it has no pruning structure")
        return json.loads((self.path / e.structure).read_text())

    def is_pruned(self, name: str) -> bool:
        """A pruned U-Net: what fine-tuning recovers (not the base itself, not a closed form)."""
        return self.expert(name).kind == "unet" and bool(self.structure(name))

    def _tensors(self, e: ExpertSpec) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(self.path / e.weights))
        except (SafetensorError, OSError) as err:
            raise StepadaptError(f"cannot read weights of expert {e.name}: {err}") from None

    def load_expert(self, name: str) -> UNet2DModel | GaussianDenoiser:
        """Rebuild an expert's structure and load its weights, checking every shape."""
        e = self.expert(name)
        if e.kind == "gaussian":
            m = self.manifest
            return GaussianDenoiser.from_tensors(self._tensors(e), m.sample_shape, m.scheduler)
        model = replay(self.manifest.base_config, self.structure(name))
        tensors = self._tensors(e)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise StepadaptError(
                f"weights of expert {name} do not match its structure "
                f"(missing {missing[:3]}, unexpected {extra[:3]})"
            )
        for k, v in expected.items():
            if tuple(tensors[k].shape) != tuple(v.shape):
                raise StepadaptError(
                    f"weights of expert {name} do not match its structure: {k} has shape "
                    f"{tuple(tensors[k].shape)}, structure wants {tuple(v.shape)}"
                )
        model.load_state_dict(tensors)
        return model.eval()

    def models(self) -> dict[str, tuple[UNet2DModel, History] | GaussianDenoiser]:
        """Every expert loaded, in the form :func:`save_bundle` writes."""
        return {
            e.name: (self.load_expert(e.name), self.structure(e.name))
            if e.kind == "unet"
            else self.load_expert(e.name)
            for e in self.experts
        }

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
            tensors = {k: v.to(dtype).contiguous() for k, v in load_file(str(path)).items()}
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp))
            changes[e.name] = {"sha256": sha256_file(path)}
        self.update_experts(changes)

    def update_expert_weights(self, name: str, model: UNet2DModel, **fields) -> None:
        """Replace one expert's weights (same structure) and update the manifest atomically."""
        e = self.expert(name)
        self.update_experts({name: {"sha256": save_weights(self.path / e.weights, model), **fields}})
