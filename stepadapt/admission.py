"""A latency objective a server keeps: admit a request only as it can finish in time.

At admission the engine replays its own future from the costs it measured (``Engine.finish_times``)
with the newcomer in it. A request that would miss its deadline at the configuration it asked for is
served cheaper (``degrade``: a smaller bundle of the same base, and fewer steps where that is not
enough) or refused at once (``reject``); none is queued past its deadline, and a degrade that
finds nothing in time refuses too.
An offer is also refused if it would push a request already admitted past a deadline that request
was predicted to meet: the ones inside were promised first. A newcomer is admitted with more
headroom (``margin``) than an admitted request must keep (``keep``): the difference is what the
requests arriving after it may take; were the two equal, every admitted request would sit at the
edge of its promise and the next arrival would be refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from stepadapt import StepadaptError
from stepadapt.engine import Engine, Job
from stepadapt.options import Options, option
from stepadapt.solvers import Setting

POLICIES = ("degrade", "reject")
PER = ("image", "request")
STEP_FACTOR = 0.75  # degrade's step counts: the asked one, then each 3/4 of the last, down to min_steps


@dataclass(frozen=True)
class Slo(Options):
    """The server's objective: each request done within ``ms`` (per image or per request)."""

    ms: float = option(help="Milliseconds a request may take (per image, or per request).")
    per: str = option("image", "image: the objective grows with the images asked for; request: it does not.")
    policy: str = option(
        "degrade",
        "degrade: a request that would miss it is served cheaper (fewer steps, a smaller bundle); "
        "reject: it is refused at once (503).",
    )
    margin: float = option(
        1.5,
        "A request is admitted only as its predicted seconds times this fit its time: the headroom "
        "that requests arriving after it may take (the prediction assumes nobody else comes).",
    )
    keep: float = option(
        1.1, "A request already admitted keeps its predicted seconds times this within its time."
    )
    min_steps: int = option(4, "degrade never goes below this many steps.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.ms, bool) or not isinstance(self.ms, int | float) or not self.ms > 0:
            raise StepadaptError(f"the SLO must be a positive number of milliseconds, got {self.ms!r}")
        if self.per not in PER:
            raise StepadaptError(f"the SLO is per {' or per '.join(PER)}, not {self.per!r}")
        if self.policy not in POLICIES:
            raise StepadaptError(f"unknown SLO policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if not self.margin >= self.keep >= 1:
            raise StepadaptError(f"the SLO needs margin >= keep >= 1, got {self.margin!r} and {self.keep!r}")

    def seconds(self, images: int) -> float:
        """The time a request of ``images`` images has."""
        return self.ms / 1000 * (images if self.per == "image" else 1)


@dataclass(frozen=True)
class Offer:
    """One way to serve a request: the model (a served bundle's name) and the setting."""

    model: str
    setting: Setting

    def __str__(self) -> str:
        return f"{self.model} {self.setting}"


@dataclass(frozen=True)
class Decision:
    """What admission did: the job to admit (``None``: refused, with ``why``), the offer it runs at,
    its predicted seconds from now, and whether that is less than it asked for."""

    job: Job | None
    offer: Offer
    predicted: float
    degraded: bool
    why: str = ""


def step_ladder(steps: int, min_steps: int) -> list[int]:
    """The step counts degrade may give a request that asked for ``steps``: that, then each about
    3/4 of the last, down to ``min_steps`` (never above what it asked)."""
    out = [int(steps)]
    while out[-1] > min_steps:
        out.append(max(min_steps, min(out[-1] - 1, math.ceil(out[-1] * STEP_FACTOR))))
    return out


def decide(
    engine: Engine,
    asked: Offer,
    smaller: Sequence[str],
    job_for: Callable[[Offer], Job],
    deadline: float,
    now: float,
    slo: Slo,
) -> Decision:
    """The asked offer if it makes ``deadline`` and breaks no promise; else (``degrade``) the offer
    that does with the most steps -- of equal steps the larger bundle -- among the asked bundle and
    the ``smaller`` ones (dearest first), each at the most steps of its :func:`step_ladder` that
    fit (found by bisection: more steps never finish sooner); else refused. Steps before size:
    experts of a smaller bundle at the same steps lose little (docs/results.md), fewer steps lose
    more. An offer whose job cannot be made (a step count its solver refuses) does not fit."""
    before = engine.finish_times()
    promised = [
        j for j in engine.jobs if j.deadline is not None and now + slo.keep * before[j.key] <= j.deadline
    ]
    fastest = [math.inf]

    def fits(offer: Offer) -> tuple[Job, float] | None:
        """The offer's job and its predicted seconds, where it fits."""
        try:
            job = job_for(offer)
        except StepadaptError:
            if offer == asked:
                raise
            return None
        after = engine.finish_times([job])
        fastest[0] = min(fastest[0], after[job.key])
        ok = now + slo.margin * after[job.key] <= deadline
        ok = ok and all(now + slo.keep * after[j.key] <= j.deadline for j in promised)
        return (job, after[job.key]) if ok else None

    fit = fits(asked)
    if fit is not None:
        return Decision(fit[0], asked, fit[1], False)
    found = []
    for model in [asked.model, *smaller] if slo.policy == "degrade" else ():
        ladder = step_ladder(asked.setting.steps, min(slo.min_steps, asked.setting.steps))
        rungs = [Offer(model, Setting(asked.setting.sampler, n, asked.setting.jump)) for n in ladder]
        lo, hi, best = 0, len(rungs) - 1, None  # the first rung (most steps) that fits
        while lo <= hi:
            mid = (lo + hi) // 2
            fit = fits(rungs[mid]) if rungs[mid] != asked else None
            if fit is not None:
                best, hi = (rungs[mid], *fit), mid - 1
            else:
                lo = mid + 1
        if best is not None:
            found.append(best)
    if found:  # most steps; of equal steps the larger bundle (found first)
        offer, job, seconds = max(found, key=lambda f: f[0].setting.steps)
        return Decision(job, offer, seconds, True)
    why = (
        f"the server is too busy to finish this request within its {slo.ms:g} ms SLO"
        f" ({max(deadline - now, 0):.2f} s left; the fastest way tried would take about "
        f"{slo.margin * fastest[0]:.2f} s)"
    )
    return Decision(None, asked, fastest[0], False, why)
