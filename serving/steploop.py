"""The fused layout's router under load: a thread that runs the step engine (``stepadapt.engine``).

``execute`` (the router is decoupled) only hands each request to :class:`StepLoop` and returns;
the loop, at every step boundary, admits what arrived (the SLO decides at what offer, or refuses),
looks at every request (cancelled, out of time, the server stopping), runs one engine step (one
call per expert for the rows of all requests at that expert's timesteps) and answers the requests
that finished, each with its images and what served it. A request that arrives mid-flight waits
at most one step, not a whole batch.

Imported only inside Triton's python backend.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import triton_python_backend_utils as pb_utils
from stepadapt.serving import cancel
from stepadapt.serving.cancel import Watch
from stepadapt.serving.metrics import Metrics
from stepadapt.serving.replies import error, internal
from stepadapt.serving.served import pick, served_response

from stepadapt import StepadaptError
from stepadapt.admission import Offer, decide
from stepadapt.engine import Engine, Job, Served

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
LOG_EVERY = 10.0


@dataclass
class Arrival:
    request: object
    id: str
    sender: object
    at: float


@dataclass
class Busy:
    """One busy stretch of the engine, said in one log line when it ends (or every LOG_EVERY s):
    cheap enough to keep on, and it shows requests sharing steps."""

    since: float = 0.0
    admitted: int = 0
    steps: int = 0
    most: int = 0
    rows: int = 0


@dataclass
class Live:
    """A request inside the engine: whom to answer, what watches it, what it runs at."""

    sender: object
    watch: Watch
    offer: Offer
    degraded: bool
    truncated: bool = False


class StepLoop:
    def __init__(self, name, bundles, *, max_rows, max_seconds, slo=None, conditions=None, step_rows=None):
        self.bundles = bundles
        self.engine = Engine(
            {n: Served(b.denoiser, b.router) for n, b in bundles.items()},
            max_rows=max_rows, step_rows=step_rows, clock=time.monotonic,
        )  # fmt: skip
        self.max_seconds = max_seconds
        self.slo = slo
        self.name = name
        self.metrics = Metrics(name)
        self._busy = Busy()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.live: dict[str, Live] = {}
        self._stop = threading.Event()
        self._held = -1
        self._count = 0
        if slo is not None:
            first = next(iter(bundles.values()))
            self.engine.calibrate(first.shape, first.scheduler, conditions)
        self.order = self._by_cost()
        self.thread = threading.Thread(target=self._run, name="stepadapt-engine", daemon=True)
        self.thread.start()

    def _by_cost(self):
        """Bundle names, the most MACs per evaluation first (over the timestep axis): degrade's
        order. MACs, not timings: a few calibration calls on a busy machine can misorder them."""
        return sorted(self.bundles, key=lambda n: -self.bundles[n].macs)

    def submit(self, request):
        at = time.monotonic()
        self.inbox.put(Arrival(request, request.request_id(), request.get_response_sender(), at))

    def stop(self):
        self._stop.set()
        self.thread.join(timeout=10)

    # ------------------------------------------------------------------ the loop
    def _run(self):
        while not self._stop.is_set():
            try:
                self._arrivals(block=not self.live)
                self._look()
                if self.live:
                    self._step()
                held = len(self.live) + self.inbox.qsize()
                self.metrics.queue(held)
                self.metrics.flush(force=not self.live)
                self._said()
                if held != self._held:  # for the front's choice of engine
                    cancel.set_load(self.name, held)
                    self._held = held
            except Exception as e:  # noqa: BLE001 - the loop must outlive any one request's failure
                pb_utils.Logger.log_error(f"stepadapt engine: {type(e).__name__}: {e}")
        for key in list(self.live):
            self._end(key, error("the server is shutting down", "UNAVAILABLE", True), "cancelled")

    def _arrivals(self, block):
        try:
            first = self.inbox.get(timeout=0.1) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        arrivals = [first]
        while True:
            try:
                arrivals.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for a in arrivals:
            self._admit(a)

    def _admit(self, a):
        name = next(iter(self.bundles))  # a bad request counts against the default bundle
        try:
            bundle = pick(self.bundles, a.request)
            name = bundle.name
            ask = bundle.ask(a.request)
        except StepadaptError as e:
            self._send(a.sender, error(str(e), relayed=True))
            self.metrics.request(name, "invalid")
            return
        except Exception as e:  # noqa: BLE001
            self._send(a.sender, internal(e, True))
            self.metrics.request(name, "failed")
            return
        self._count += 1
        key = f"{self._count}"
        asked = Offer(bundle.name, ask.setting)

        def job_for(offer):
            return Job(key, offer.model, self.bundles[offer.model].trajectory(ask, offer.setting), deadline)

        now = time.monotonic()
        try:
            if self.slo is None:
                deadline = None
                job, offer, degraded = job_for(asked), asked, False
            else:
                deadline = a.at + self.slo.seconds(ask.n)
                smaller = self.order[self.order.index(bundle.name) + 1 :]
                d = decide(self.engine, asked, smaller, job_for, deadline, now, self.slo)
                if d.job is None:
                    self._send(a.sender, error(d.why, "UNAVAILABLE", True))
                    self.metrics.request(bundle.name, "rejected")
                    return
                job, offer, degraded = d.job, d.offer, d.degraded
            self.engine.admit(job)
        except StepadaptError as e:
            self._send(a.sender, error(str(e), relayed=True))
            self.metrics.request(bundle.name, "invalid")
            return
        sender = a.sender
        watch = Watch(a.id, self.max_seconds, sender.is_cancelled, start=a.at)
        self.live[key] = Live(sender, watch, offer, degraded, ask.truncated)
        if not self._busy.since:
            self._busy.since = now
        self._busy.admitted += 1
        self._busy.most = max(self._busy.most, len(self.live))
        if degraded:
            self.metrics.degraded(bundle.name)
            pb_utils.Logger.log_info(f"{self.name}: request {key} asked {asked}, runs at {offer} (SLO)")

    def _look(self):
        for key, live in list(self.live.items()):
            stopped = live.watch.check()
            if stopped is not None:
                self.engine.drop(key)
                outcome = "cancelled" if stopped.code == "CANCELLED" else "failed"
                self._end(key, error(str(stopped), stopped.code, True), outcome)

    def _step(self):
        start = time.monotonic()
        before = [(j, j.run.evaluations) for j in self.engine.jobs]
        left = self.engine.step()
        self.metrics.step(time.monotonic() - start)
        stepped = [j for j, n in before if j.run.evaluations > n]  # all, or the urgent few (step_rows)
        for job in stepped:
            self.metrics.evaluations(job.model, 1)
        self._busy.steps += 1
        self._busy.rows += sum(j.rows for j in stepped)
        for job, err in left:
            live = self.live[job.key]
            if err is None:
                try:  # a decoder that fails (a VAE out of memory) fails this request, not those after it
                    images = self.bundles[live.offer.model].images(job.run.x)
                except Exception as e:  # noqa: BLE001 - answered, and the engine goes on
                    err = e
                else:
                    answer = served_response(
                        images, live.offer.model, live.offer.setting, live.degraded, truncated=live.truncated
                    )
                    self._end(job.key, answer, "served")
                    continue
            if isinstance(err, StepadaptError):
                self._end(job.key, error(str(err), "INTERNAL", True), "failed")
            else:
                self._end(job.key, internal(err, True), "failed")

    def _said(self):
        b = self._busy
        if b.since and (not self.live or time.monotonic() - b.since > LOG_EVERY):
            pb_utils.Logger.log_info(
                f"{self.name}: {b.admitted} requests in {time.monotonic() - b.since:.2f} s, "
                f"at most {b.most} in flight, {b.steps} steps of {b.rows / max(b.steps, 1):.1f} rows "
                "on average"
            )
            self._busy = Busy(since=time.monotonic() if self.live else 0.0)

    def _end(self, key, response, outcome):
        live = self.live.pop(key)
        self.metrics.request(live.offer.model, outcome)
        self._send(live.sender, response)

    @staticmethod
    def _send(sender, response):
        try:
            sender.send(response, flags=FINAL)
        except Exception as e:  # noqa: BLE001 - the caller went away; nobody is left to tell
            pb_utils.Logger.log_warn(f"router: answer not delivered: {e}")
