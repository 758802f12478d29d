"""Solvers: diffusers' scheduler zoo by name, with the options that change the images.

A :class:`Solver` is a small frozen config (a name and its options) that round-trips to JSON and to a
one-line spec such as ``dpm++2m:thresholding,spacing=trailing``: the same string a CLI flag, a bundle's
recommendation and an endpoint request carry. It makes a *fresh* diffusers scheduler from the model's
own scheduler config each time, because multi-step solvers keep state across steps (the last model
outputs), so every trajectory -- every request -- must own its instance.

Each solver's model evaluations are exactly its scheduler's ``timesteps`` after ``set_timesteps``
(Heun and DPM-Solver++ SDE list every timestep they evaluate twice, PNDM its Runge-Kutta warm-up), so
:meth:`Solver.evaluations` is what an image costs, whatever the order of the method.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)

from stepadapt import StepadaptError, first_line
from stepadapt.schedule import from_model_config

SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class Family:
    """What a solver name means to diffusers: the class, the config keys the name fixes, and whether
    the class keeps its state as x_vp * sqrt(1 + sigma^2) (k-diffusion's sigma space, Euler & co)."""

    cls: type[SchedulerMixin]
    fixed: tuple[tuple[str, Any], ...] = ()
    sigma_space: bool = False
    # Can a trajectory begin mid-schedule (after the analytic jump)? Not with two evaluations a
    # step (Heun, DPM-Solver++ SDE), a Runge-Kutta warm-up (PNDM), nor an order that follows the
    # step index (LMS: it would extrapolate from derivatives it never saw).
    jumps: bool = True

    def accepts(self, key: str) -> bool:
        return key in inspect.signature(self.cls.__init__).parameters

    def step_takes(self, key: str) -> bool:
        return key in inspect.signature(self.cls.step).parameters


_DPM = DPMSolverMultistepScheduler
FAMILIES: dict[str, Family] = {
    "ddim": Family(DDIMScheduler),
    "ddpm": Family(DDPMScheduler),
    "dpm++2m": Family(_DPM, (("algorithm_type", "dpmsolver++"), ("solver_order", 2))),
    "dpm++3m": Family(_DPM, (("algorithm_type", "dpmsolver++"), ("solver_order", 3))),
    "dpm++2m-sde": Family(_DPM, (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2))),
    "dpm++sde": Family(DPMSolverSDEScheduler, sigma_space=True, jumps=False),
    "unipc": Family(UniPCMultistepScheduler),
    "euler": Family(EulerDiscreteScheduler, sigma_space=True),
    "euler-a": Family(EulerAncestralDiscreteScheduler, sigma_space=True),
    "heun": Family(HeunDiscreteScheduler, sigma_space=True, jumps=False),
    "pndm": Family(PNDMScheduler, jumps=False),
    "lms": Family(LMSDiscreteScheduler, sigma_space=True, jumps=False),
}
NAMES = tuple(FAMILIES)
# Option -> the scheduler config key it sets; a solver whose class lacks the key refuses the option.
_KEYS = {"spacing": "timestep_spacing", "thresholding": "thresholding", "clip": "clip_sample",
         "karras": "use_karras_sigmas"}  # fmt: skip


@dataclass(frozen=True)
class Solver:
    """A solver and the options that change its images; ``None`` keeps the model's own config."""

    name: str = "ddim"
    spacing: str | None = None  # leading | trailing | linspace
    thresholding: bool = False  # dynamic thresholding of x0 (Imagen), sample_max_value 1.0
    clip: bool | None = None  # clip x0 to [-1, 1] (the model config's clip_sample by default)
    karras: bool = False  # Karras sigmas
    eta: float = 0.0  # DDIM's stochasticity

    def __post_init__(self) -> None:
        if self.name not in FAMILIES:
            raise StepadaptError(f"unknown sampler {self.name!r}; choose one of {', '.join(NAMES)}")
        fam = FAMILIES[self.name]
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise StepadaptError(f"spacing {self.spacing!r} is not one of {', '.join(SPACINGS)}")
        for option, key in self._set_options().items():
            if not fam.accepts(key):
                raise StepadaptError(f"sampler {self.name} has no option {option!r}")
        if not (math.isfinite(self.eta) and 0.0 <= self.eta <= 1.0):
            raise StepadaptError(f"eta must be in [0, 1], got {self.eta}")
        if self.eta and not fam.step_takes("eta"):
            raise StepadaptError(f"sampler {self.name} has no eta (only ddim does)")

    def _set_options(self) -> dict[str, str]:
        """The options this solver sets (option -> scheduler config key); unset ones keep the model's."""
        out = {}
        for option, key in _KEYS.items():
            value = getattr(self, option)
            if value is not None and (value is not False or option == "clip"):
                out[option] = key
        return out

    @property
    def family(self) -> Family:
        return FAMILIES[self.name]

    # --- the spec string: what flags, requests and manifests carry -------------------------------
    @classmethod
    def parse(cls, spec: str | Solver | None) -> Solver:
        """``name[:option,option=value,...]``, e.g. ``unipc``, ``dpm++2m:thresholding,spacing=trailing``,
        ``ddim:eta=0.5``, ``euler:karras``, ``ddim:no-clip``; a one-line error for anything else."""
        if isinstance(spec, Solver):
            return spec
        if spec is None:
            return cls()
        if not isinstance(spec, str):
            raise StepadaptError(f"sampler must be a string, got {type(spec).__name__}")
        name, _, rest = spec.strip().lower().partition(":")
        kw: dict[str, Any] = {}
        for token in filter(None, (t.strip() for t in rest.split(","))):
            key, eq, value = token.partition("=")
            if key in ("thresholding", "karras", "clip") and not eq:
                kw[key] = True
            elif key == "no-clip" and not eq:
                kw["clip"] = False
            elif key == "spacing" and eq:
                kw["spacing"] = value
            elif key == "eta" and eq:
                try:
                    kw["eta"] = float(value)
                except ValueError:
                    raise StepadaptError(f"eta must be a number, got {value!r}") from None
            else:
                raise StepadaptError(
                    f"unknown sampler option {token!r} in {spec!r}; options: thresholding, karras, clip, "
                    f"no-clip, spacing=leading|trailing|linspace, eta=X"
                )
        return cls(name=name, **kw)

    def __str__(self) -> str:
        opts = [k for k in ("thresholding", "karras") if getattr(self, k)]
        if self.clip is not None:
            opts.append("clip" if self.clip else "no-clip")
        if self.spacing:
            opts.append(f"spacing={self.spacing}")
        if self.eta:
            opts.append(f"eta={self.eta:g}")
        return self.name + (":" + ",".join(opts) if opts else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Solver:
        if not isinstance(d, dict):
            raise StepadaptError(f"a solver must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise StepadaptError(f"unknown solver field(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def with_(self, **changes: Any) -> Solver:
        return replace(self, **changes)

    # --- what it does --------------------------------------------------------------------------
    def scheduler(self, config: dict[str, Any] | None = None, *, seed: int | None = None) -> SchedulerMixin:
        """A fresh scheduler from the model's own config (each class takes the keys it knows, as a
        diffusers pipeline does when it swaps schedulers), with this solver's options on top.
        ``seed`` seeds the Brownian tree of DPM-Solver++ SDE, whose ``step`` takes no generator."""
        key = (self, json.dumps(config or {}, sort_keys=True, default=str))
        if key not in _PROTOTYPES:  # building one is ~1 ms, a copy ~0.2: a server builds one per request
            cfg = {**(config or {}), **dict(self.family.fixed)}
            for option, name in self._set_options().items():
                cfg[name] = getattr(self, option)
            if self.thresholding:
                cfg.setdefault("sample_max_value", 1.0)
            if len(_PROTOTYPES) >= 256:
                _PROTOTYPES.clear()
            _PROTOTYPES[key] = from_model_config(self.family.cls, cfg)
        sched = copy.deepcopy(_PROTOTYPES[key])
        if seed is not None and hasattr(sched, "noise_sampler_seed"):
            sched.noise_sampler_seed = int(seed) % 2**63  # torchsde takes non-negative seeds only
        return sched

    def set_timesteps(self, scheduler: SchedulerMixin, steps: int) -> None:
        """``scheduler.set_timesteps`` with diffusers' refusals (PNDM below 4 steps, ...) as one line."""
        try:
            scheduler.set_timesteps(steps)
        except (ValueError, IndexError) as e:
            first = first_line(e)
            raise StepadaptError(f"{self.name} cannot take {steps} steps: {first}") from None

    def evaluations(self, steps: int, config: dict[str, Any] | None = None) -> torch.Tensor:
        """The timesteps at which the model runs for ``steps`` steps: one entry per evaluation."""
        return _evaluations(self, int(steps), json.dumps(config or {}, sort_keys=True, default=str)).clone()

    @property
    def jumps(self) -> bool:
        """Whether a trajectory can begin mid-schedule, after the analytic jump (``Family.jumps``)."""
        return self.family.jumps


_PROTOTYPES: dict[tuple[Solver, str], SchedulerMixin] = {}  # (solver, config) -> a scheduler to copy


@functools.lru_cache(maxsize=1024)
def _evaluations(solver: Solver, steps: int, config_json: str) -> torch.Tensor:
    sched = solver.scheduler(json.loads(config_json))
    solver.set_timesteps(sched, steps)
    return sched.timesteps.detach().clone()


@dataclass(frozen=True)
class Setting:
    """One way to sample: a solver spec, its step count, and whether to jump (bundles with a
    Gaussian expert on the noisy end only)."""

    sampler: str = "ddim"
    steps: int = 50
    jump: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampler", str(Solver.parse(self.sampler)))  # one spelling per setting
        if int(self.steps) < 1:
            raise StepadaptError(f"steps must be at least 1, got {self.steps}")

    def __str__(self) -> str:
        return f"{self.sampler} x{self.steps}" + (" +jump" if self.jump else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Setting:
        return cls(str(d["sampler"]), int(d["steps"]), bool(d.get("jump", False)))


def resolve_setting(
    recommended: dict[str, Any] | None,
    sampler: str | None = None,
    steps: int | None = None,
    jump: bool | None = None,
    eta: float | None = None,
) -> Setting:
    """What a command samples with: each flag given overrides the bundle's recommendation
    (``recommended``), which overrides 50 DDIM steps without a jump. Another solver than the
    recommended one takes nothing else from the recommendation."""
    rec = recommended or {}
    if sampler is not None and Solver.parse(sampler) != Solver.parse(rec.get("sampler", "ddim")):
        rec = {}  # the steps and jump were measured for the recommended solver, not this one
    solver = Solver.parse(sampler if sampler is not None else rec.get("sampler", "ddim"))
    if eta is not None:
        solver = solver.with_(eta=float(eta))
    return Setting(str(solver), steps if steps is not None else int(rec.get("steps", 50)),
                   jump if jump is not None else bool(rec.get("jump", False)))  # fmt: skip
