"""Step-level continuous batching: the evaluations of many requests, each at its own step, run as
one call per expert -- Orca's iteration-level scheduling (vLLM's continuous batching) with a
diffusion step as the iteration.

Why a step: the Router already sends each step to an expert of its own size, so a step is where
the cost of a request changes; between two steps a request can join, leave (finished, cancelled,
failed) or be looked at, and nothing else about it changes. Each request owns its
:class:`~stepadapt.sampling.Trajectory` (its noise, its scheduler, a multistep solver's history),
so it gets the images it gets alone, whoever it shares a call with.

The engine times every call it makes (:class:`StepCosts`) and can replay its own future from those
costs (:meth:`Engine.finish_times`): when each request will be done if nobody else came. That is
what an SLO policy needs before it admits a request (``stepadapt.admission``).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import torch

from stepadapt import StepadaptError
from stepadapt.conditioning import Cond, model_rows
from stepadapt.sampling import Denoiser, Router, Trajectory, evaluate_together, timestep_batch

CostKey = tuple[str, int]  # (model, expert index)
OVERHEAD: CostKey = ("", -1)  # a step's cost beyond its calls (grouping, looking at requests), by jobs


@dataclass(frozen=True)
class Served:
    """A model the engine steps: ``denoiser`` answers a call (the Router, guided where the bundle is
    class-conditional); ``router`` says which expert owns a timestep, so a call holds one expert's
    rows and is timed as that expert's."""

    denoiser: Denoiser
    router: Router


@dataclass(eq=False)
class Job:
    """One request in the engine: its trajectory, the model that serves it, and the clock time it
    should be done by (an SLO), if it has one."""

    key: Hashable
    model: str
    run: Trajectory
    deadline: float | None = None
    _experts: list[int] | None = field(default=None, repr=False)
    _seq: int = field(default=0, repr=False)  # admission order, set by the engine (0: not yet: last)

    @property
    def urgency(self) -> tuple[float, int]:
        """Earliest deadline first; without one, after every deadline, in admission order."""
        return (math.inf if self.deadline is None else self.deadline, self._seq or math.inf)

    @property
    def rows(self) -> int:
        """Model rows per evaluation (an image under guidance costs two)."""
        return model_rows(self.run.cond, self.run.x.shape[0])

    def experts_ahead(self, router: Router) -> list[int]:
        """The expert of each evaluation still to come."""
        if self._experts is None:
            self._experts = [router.index(float(t)) for t in self.run.timesteps]
        return self._experts[self.run.i :]


@dataclass(frozen=True)
class Call:
    """One denoiser call of a step: jobs of one model whose current timestep one expert owns."""

    model: str
    expert: int
    jobs: tuple[Job, ...]

    @property
    def rows(self) -> int:
        return sum(j.rows for j in self.jobs)


def batches(entries: Sequence[tuple[str, int, int]], max_rows: int) -> list[tuple[str, int, list[int]]]:
    """``(model, expert, rows)`` per job -> the calls of one step: ``(model, expert, job indices)``,
    jobs in order, each call at most ``max_rows`` rows (a job is never split; one larger than the
    cap runs alone). The engine and its own prediction batch alike through here."""
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, (model, expert, _) in enumerate(entries):
        groups[model, expert].append(i)
    out = []
    for (model, expert), members in groups.items():
        chunk, rows = [], 0
        for i in members:
            if chunk and rows + entries[i][2] > max_rows:
                out.append((model, expert, chunk))
                chunk, rows = [], 0
            chunk.append(i)
            rows += entries[i][2]
        out.append((model, expert, chunk))
    return out


class StepCosts:
    """Seconds of one expert call as ``a + b * rows``, fitted to that expert's last ``window`` calls,
    so predictions follow the machine as it is now (shared cores, other load). An expert never
    timed costs 0 (``Engine.calibrate`` times each one before the first request)."""

    def __init__(self, window: int = 32):
        self.window = window
        self._seen: dict[CostKey, deque[tuple[int, float]]] = {}
        self._fit: dict[CostKey, tuple[float, float]] = {}

    def observe(self, key: CostKey, rows: int, seconds: float) -> None:
        self._seen.setdefault(key, deque(maxlen=self.window)).append((int(rows), float(seconds)))
        self._fit.pop(key, None)

    def known(self, key: CostKey) -> bool:
        return key in self._seen

    def predict(self, key: CostKey, rows: int) -> float:
        if key not in self._seen:
            return 0.0
        if key not in self._fit:
            self._fit[key] = _linear(self._seen[key])
        a, b = self._fit[key]
        return a + b * rows

    def table(self) -> dict[str, dict[str, float]]:
        """``model/expert`` -> its fitted fixed and per-row seconds (for logs and /stats)."""
        return {
            f"{m}/{e}": dict(zip(("fixed_s", "per_row_s"), _linear(obs), strict=True))
            for (m, e), obs in self._seen.items()
        }


def _linear(obs: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least squares ``seconds = a + b * rows`` with both non-negative; one row count seen: all of
    the cost per row."""
    n = len(obs)
    mr = sum(r for r, _ in obs) / n
    ms = sum(s for _, s in obs) / n
    var = sum((r - mr) ** 2 for r, _ in obs)
    if var == 0:
        return 0.0, ms / max(mr, 1)
    b = sum((r - mr) * (s - ms) for r, s in obs) / var
    a = ms - b * mr
    if b < 0:
        return ms, 0.0
    if a < 0:
        return 0.0, ms / max(mr, 1)
    return a, b


class Engine:
    """The requests being sampled, stepped together. No threads and no clock of its own beyond
    ``clock`` (for timing calls): the caller admits, drops and steps, between steps.

    ``step_rows``: None steps every job at every step (processor sharing: each newcomer slows all);
    a number steps only the most urgent jobs (earliest deadline first) up to that many rows, the
    rest waiting their turn -- at a step's granularity, EDF, which meets deadlines best where a
    row costs the same in any batch (a CPU); a job is never split, the first always runs."""

    def __init__(
        self,
        models: Mapping[str, Served],
        *,
        max_rows: int = 64,
        step_rows: int | None = None,
        costs: StepCosts | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if not models:
            raise StepadaptError("an engine needs at least one model")
        if max_rows < 1 or (step_rows is not None and step_rows < 1):
            raise StepadaptError(f"max_rows and step_rows must be at least 1, got {max_rows}, {step_rows}")
        self.models = dict(models)
        self.max_rows = int(max_rows)
        self.step_rows = step_rows
        self._admitted = 0
        self.costs = costs or StepCosts()
        self.clock = clock
        self.jobs: list[Job] = []
        self._last_end: float | None = None  # when the previous step ended, while jobs remained

    def __len__(self) -> int:
        return len(self.jobs)

    def admit(self, job: Job) -> None:
        if job.model not in self.models:
            raise StepadaptError(f"no model {job.model!r} here; there are {', '.join(self.models)}")
        if any(j.key == job.key for j in self.jobs):
            raise StepadaptError(f"a request {job.key!r} is already running")
        job.experts_ahead(self.models[job.model].router)  # an uncovered timestep is said now, not mid-run
        self._admitted += 1
        job._seq = self._admitted
        self.jobs.append(job)

    def drop(self, key: Hashable) -> Job | None:
        """Take a job out (cancelled, out of time): it costs nothing from the next step on."""
        for i, j in enumerate(self.jobs):
            if j.key == key:
                return self.jobs.pop(i)
        return None

    def _turn(self, jobs: Sequence[Job], rows: Callable[[Job], int]) -> list[Job]:
        """The jobs a step runs: all, or the most urgent up to ``step_rows`` rows (at least one)."""
        if self.step_rows is None:
            return list(jobs)
        out, total = [], 0
        for j in sorted(jobs, key=lambda j: j.urgency):
            if out and total + rows(j) > self.step_rows:
                break
            out.append(j)
            total += rows(j)
        return out

    def calls(self) -> list[Call]:
        """The calls the next step makes: one per (model, expert) of its jobs' current timesteps,
        split where they pass ``max_rows``."""
        active = self._turn([j for j in self.jobs if not j.run.done], lambda j: j.rows)
        entries = [(j.model, self.models[j.model].router.index(j.run.t), j.rows) for j in active]
        return [Call(m, e, tuple(active[i] for i in idx)) for m, e, idx in batches(entries, self.max_rows)]

    def step(self) -> list[tuple[Job, Exception | None]]:
        """One evaluation of every job; returns the jobs that left: finished (``None``) or failed
        (their error: one request's NaN or bad shape fails it alone, its call-mates step on).

        What the step costs beyond its calls -- and whatever the caller did since the last step,
        e.g. admitting requests -- is measured too (``OVERHEAD``, by the number of jobs): on a small
        model it is a good part of a step."""
        start = self.clock()
        calls = self.calls()
        jobs = sum(len(c.jobs) for c in calls)
        between = start - self._last_end if self._last_end is not None else 0.0
        left: list[tuple[Job, Exception | None]] = []
        in_calls = 0.0
        for call in calls:
            failed, seconds = self._run(call)
            left += failed
            in_calls += seconds
        failed_ids = {id(j) for j, _ in left}
        left += [(j, None) for j in self.jobs if j.run.done and id(j) not in failed_ids]
        gone = {id(j) for j, _ in left}
        self.jobs = [j for j in self.jobs if id(j) not in gone]
        end = self.clock()
        if jobs:
            self.costs.observe(OVERHEAD, jobs, max(end - start - in_calls, 0.0) + between)
        self._last_end = end if self.jobs else None
        return left

    def _run(self, call: Call) -> tuple[list[tuple[Job, Exception]], float]:
        """One call and its jobs' scheduler steps, timed together (what a step of these rows costs);
        returns the jobs that failed and the seconds it took."""
        start = self.clock()
        try:
            outs = evaluate_together(self.models[call.model].denoiser, [j.run for j in call.jobs])
        except Exception as e:  # noqa: BLE001 - find the culprit: each job alone
            if len(call.jobs) == 1:
                return [(call.jobs[0], e)], self.clock() - start
            alone = [self._run(Call(call.model, call.expert, (j,))) for j in call.jobs]
            return [f for failed, _ in alone for f in failed], self.clock() - start
        failed = []
        for job, out in zip(call.jobs, outs, strict=True):
            try:
                job.run.advance(out)
            except StepadaptError as e:
                failed.append((job, e))
        seconds = self.clock() - start
        self.costs.observe((call.model, call.expert), call.rows, seconds)
        return failed, seconds

    def finish_times(self, extra: Sequence[Job] = ()) -> dict[Hashable, float]:
        """Seconds from now until each job is done (with ``extra`` as if admitted now, after those
        already here), if no other request came: the engine's own steps
        replayed with the measured costs, turns taken and calls batched as :meth:`calls` does."""
        jobs = [*self.jobs, *extra]
        ahead = {id(j): j.experts_ahead(self.models[j.model].router) for j in jobs}
        rows = {id(j): j.rows for j in jobs}
        at = {id(j): 0 for j in jobs}
        done = {j.key: 0.0 for j in jobs if not ahead[id(j)]}
        left = [j for j in jobs if ahead[id(j)]]
        elapsed = 0.0
        while left:
            turn = self._turn(left, lambda j: rows[id(j)])
            entries = [(j.model, ahead[id(j)][at[id(j)]], rows[id(j)]) for j in turn]
            elapsed += self.costs.predict(OVERHEAD, len(entries))
            for model, expert, idx in batches(entries, self.max_rows):
                elapsed += self.costs.predict((model, expert), sum(entries[i][2] for i in idx))
            for j in turn:
                at[id(j)] += 1
                if at[id(j)] == len(ahead[id(j)]):
                    done[j.key] = elapsed
            left = [j for j in left if at[id(j)] < len(ahead[id(j)])]
        return done

    def calibrate(
        self,
        shape: Sequence[int],
        scheduler_cfg: dict,
        cond: Callable[[str, int], Cond] | None = None,
        rows: Sequence[int] = (1, 4),
        solver: str = "unipc",
    ) -> None:
        """Time every expert of every model at ``rows``, with a ``solver`` step after each call as a
        real step has (after one untimed warm-up), so the first predictions are measured ones.
        ``cond(model, n)``: the condition of ``n`` rows (a class-conditional model's experts need
        labels)."""
        for name, served in self.models.items():
            b = served.router.boundaries
            for e, (lo, hi) in enumerate(pairwise(b)):
                for n in rows:
                    x, t = torch.zeros(n, *shape), timestep_batch((lo + hi) // 2, n)
                    c = cond(name, n) if cond else {}
                    for timed in (False, True):
                        run = Trajectory(solver, scheduler_cfg, x, 4)
                        start = self.clock()
                        run.advance(served.router(x, t, c))
                        if timed:
                            self.costs.observe((name, e), n, self.clock() - start)
