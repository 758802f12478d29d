"""stepadapt's figures on Triton's metrics port (``/metrics``, Prometheus text), beside Triton's own.

The python backend's custom metrics (``pb_utils.MetricFamily``): per served bundle the requests
served, degraded and refused and the model evaluations run; the step engine's queue depth and the
seconds of each of its steps. Where the backend cannot make them (metrics off, an old Triton) the
server serves on without them and says so once in its log.
"""

import time
from collections import Counter

import triton_python_backend_utils as pb_utils

STEP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
FLUSH_EVERY = 0.5  # seconds: each update is an IPC to Triton, so they are kept here and sent together


class Metrics:
    """Updates are gathered here and sent at most every FLUSH_EVERY seconds (``flush``)."""

    def __init__(self, model):
        self.model = model  # every figure carries its engine's model name: engines are separate models
        self._metrics = {}
        self._counts = Counter()
        self._steps = []
        self._depth = None
        self._next = 0.0
        try:
            F = pb_utils.MetricFamily
            self._families = {
                "requests": F("stepadapt_requests_total", "Requests by bundle and outcome", F.COUNTER),
                "degraded": F(
                    "stepadapt_degraded_total", "Requests served cheaper than asked (SLO)", F.COUNTER
                ),
                "steps": F("stepadapt_evaluations_total", "Model evaluations run for requests", F.COUNTER),
                "queue": F("stepadapt_queue_depth", "Requests in the step engine or waiting for it", F.GAUGE),
                "step": F("stepadapt_step_seconds", "Seconds of one engine step", F.HISTOGRAM),
            }
        except Exception as e:  # noqa: BLE001 - figures are a help, never a reason to stop serving
            pb_utils.Logger.log_warn(f"stepadapt metrics unavailable: {type(e).__name__}: {e}")
            self._families = None

    def _get(self, family, **labels):
        key = (family, tuple(sorted(labels.items())))
        if key not in self._metrics:
            extra = {"buckets": STEP_BUCKETS} if family == "step" else {}
            self._metrics[key] = self._families[family].Metric(
                labels={**labels, "model": self.model}, **extra
            )
        return self._metrics[key]

    def _do(self, family, method, value, **labels):
        if self._families is not None:
            try:
                getattr(self._get(family, **labels), method)(value)
            except Exception as e:  # noqa: BLE001
                pb_utils.Logger.log_warn(f"stepadapt metric {family}: {e}")
                self._families = None

    def request(self, bundle, outcome):
        """One request ended: ``served``, ``rejected`` (SLO), ``invalid``, ``cancelled``, ``failed``."""
        self._counts["requests", (("bundle", bundle), ("outcome", outcome))] += 1

    def degraded(self, bundle):
        self._counts["degraded", (("bundle", bundle),)] += 1

    def evaluations(self, bundle, n):
        self._counts["steps", (("bundle", bundle),)] += n

    def queue(self, depth):
        self._depth = depth

    def step(self, seconds):
        self._steps.append(seconds)

    def flush(self, force=False):
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + FLUSH_EVERY
        for (family, labels), n in self._counts.items():
            self._do(family, "increment", n, **dict(labels))
        self._counts.clear()
        for seconds in self._steps:
            self._do("step", "observe", seconds)
        self._steps.clear()
        if self._depth is not None:
            self._do("queue", "set", self._depth)
