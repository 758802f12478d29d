"""A latency objective a server keeps: admit a request only as it can finish in time.

At admission the engine replays its own future from the costs it measured (``Engine.finish_times``)
with the newcomer in it. A request that would miss its deadline at the configuration it asked for is
served at the best one that makes it (``degrade``: fewer steps and/or a smaller bundle of the same
base, tried most expensive first) or refused at once (``reject``); none is queued past its deadline.
An offer is also refused if it would push a request already admitted past a deadline that request
was predicted to meet: the ones inside were promised first.
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
STEP_FRACTIONS = (1.0, 0.75, 0.5, 0.34, 0.25)  # of the asked steps, for degrade's ladder


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
    margin: float = option(1.2, "Predicted seconds are stretched by this before they are trusted.")
    min_steps: int = option(4, "degrade never goes below this many steps.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.ms, bool) or not isinstance(self.ms, int | float) or not self.ms > 0:
            raise StepadaptError(f"the SLO must be a positive number of milliseconds, got {self.ms!r}")
        if self.per not in PER:
            raise StepadaptError(f"the SLO is per {' or per '.join(PER)}, not {self.per!r}")
        if self.policy not in POLICIES:
            raise StepadaptError(f"unknown SLO policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if not self.margin >= 1:
            raise StepadaptError(f"the SLO margin must be at least 1, got {self.margin!r}")

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


def ladder(asked: Offer, smaller: Sequence[str], slo: Slo) -> list[Offer]:
    """The offers degrade may try, the asked one first: the asked bundle and every smaller one, each
    at the asked steps and at fewer (``STEP_FRACTIONS``, not below ``slo.min_steps``)."""
    s = asked.setting
    steps = sorted(
        {max(min(s.steps, slo.min_steps), math.ceil(s.steps * f)) for f in STEP_FRACTIONS}, reverse=True
    )
    out = [asked]
    for model in [asked.model, *smaller]:
        for n in steps:
            offer = Offer(model, Setting(s.sampler, n, s.jump))
            if offer not in out:
                out.append(offer)
    return out


def decide(
    engine: Engine,
    offers: Sequence[Offer],
    job_for: Callable[[Offer], Job],
    deadline: float,
    now: float,
    slo: Slo,
) -> Decision:
    """The first offer that makes ``deadline`` and breaks no promise, trying them most expensive
    first (by their predicted seconds alone); ``reject`` tries only the first (the asked one). An
    offer whose job cannot be made (a step count its solver refuses) is passed over."""
    asked = offers[0]
    before = engine.finish_times()
    promised = [
        j for j in engine.jobs if j.deadline is not None and now + slo.margin * before[j.key] <= j.deadline
    ]
    jobs = []
    for offer in offers if slo.policy == "degrade" else offers[:1]:
        try:
            job = job_for(offer)
        except StepadaptError:
            if offer is asked:
                raise
            continue
        jobs.append((engine.finish_times([job], alone=True)[job.key], offer, job))
    jobs.sort(key=lambda x: -x[0])  # stable: equal costs keep the ladder's order (more steps first)
    jobs.sort(key=lambda x: x[1] is not asked)  # the asked offer first whatever its cost
    best = None
    for _, offer, job in jobs:
        after = engine.finish_times([job])
        t = after[job.key]
        best = t if best is None else min(best, t)
        if now + slo.margin * t <= deadline and all(
            now + slo.margin * after[j.key] <= j.deadline for j in promised
        ):
            return Decision(job, offer, t, offer is not asked)
    allowed = deadline - now
    why = (
        f"the server is too busy to finish this request within its {slo.ms:g} ms SLO"
        f" ({allowed:.2f} s left; the fastest way would take about {slo.margin * (best or 0):.2f} s)"
    )
    return Decision(None, asked, best or 0.0, False, why)
