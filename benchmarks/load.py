"""Open-loop load against real Triton servers: Poisson arrivals, the arms interleaved.

Closed-loop clients (the ``serving`` section) never ask for more than they get; real traffic
arrives at a rate whatever the server is doing, and only that shows queueing and tail latency.
Each arm is its own tritonserver on 127.0.0.1, all of them up at once (idle ones cost nothing),
measured in turn at every rate, so the machine's noise falls on every arm alike:

* ``base``: the base alone, the step engine, no SLO: what the endpoint did without experts;
* ``lockstep``: the experts, the fused layout before the step engine (requests that arrive
  together run together to the end; one arriving meanwhile waits);
* ``engine``: the experts, the step engine (requests join and leave at every step);
* ``degrade``: base and experts side by side, every request asking for the base, the step engine
  keeping an SLO by serving what would miss it with the experts and/or fewer steps.

Rates are multiples of a capacity measured first (closed-loop clients at saturation): the base
alone's for ``base`` and ``degrade``, the lockstep layout's for ``lockstep`` and ``engine``. The
SLO is twice the unloaded latency of one image at the budget asked (the base for ``base`` and
``degrade``, the experts for the other two). Every request is one image. The KID of what was
served comes from the solver experiment's scores per configuration (``benchmarks/solvers.py``),
where that experiment measured this bundle; it is not measured per request.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from stepadapt.serving.client import Endpoint, GenerateRequest
from stepadapt.serving.repository import RepositoryOptions, write_repository
from stepadapt.serving.server import TritonServer

from stepadapt import StepadaptError
from stepadapt.admission import Slo
from stepadapt.bundle import Bundle
from stepadapt.solvers import Solver

ARMS = ("base", "lockstep", "engine", "degrade")
REFERENCE = {"base": "base", "degrade": "base", "lockstep": "lockstep", "engine": "lockstep"}
ASKED = {"base": "base", "degrade": "base", "lockstep": "experts", "engine": "experts"}
# Every arm: one router (lockstep) or engine (step) per core, as `stepadapt serve --instances` does.


@dataclass(frozen=True)
class LoadSettings:
    multipliers: tuple[float, ...] = (0.25, 0.5, 0.7, 1.0, 1.25, 1.5)
    seconds: float = 30.0  # arrivals per rate and arm ...
    max_requests: int = 300  # ... at most this many
    steps: int = 12
    sampler: str = "unipc"
    capacity_clients: int = 8
    capacity_seconds: float = 20.0
    slo_factor: float = 2.0  # the SLO: this x the unloaded latency of one image at the asked budget
    seed: int = 0
    arms: tuple[str, ...] = ARMS
    front_instances: int = 24  # requests the endpoint takes at once: beyond it they wait unseen

    @classmethod
    def quick_run(cls) -> LoadSettings:
        return cls(multipliers=(1.0,), seconds=2.0, max_requests=4, steps=4, capacity_clients=2,
                   capacity_seconds=1.5, front_instances=2)  # fmt: skip


def _options(
    arm: str, threads: int, cores: int, s: LoadSettings, slo: Slo | None = None
) -> RepositoryOptions:
    """Every arm gets the machine's cores alike: a router (lockstep) or an engine (step) per core,
    ``threads`` onnxruntime threads each."""
    common = dict(front_instances=s.front_instances, max_queue=4 * s.front_instances, queue_timeout_s=120.0)
    scheduling = "lockstep" if arm == "lockstep" else "step"
    return RepositoryOptions(scheduling=scheduling, instances=cores, threads=threads, slo=slo, **common)


def _request(arm: str, s: LoadSettings, seed: int) -> GenerateRequest:
    return GenerateRequest(
        num_images=1, steps=s.steps, sampler=s.sampler, seed=seed, jump=False, budget=ASKED[arm]
    )


def _served_bundles(arm: str, arms: dict[str, Bundle]) -> dict[str, Bundle]:
    if arm == "degrade":
        return {"base": arms["base"], "experts": arms["experts"]}
    return {ASKED[arm]: arms[ASKED[arm]]}


def open_loop(
    url: str, rate: float, seconds: float, max_requests: int, make: Callable[[int], GenerateRequest],
    seed: int, timeout: float = 600.0,
) -> tuple[list[dict[str, Any]], float]:  # fmt: skip
    """Poisson arrivals at ``rate`` per second for ``seconds`` (at most ``max_requests``), each sent at
    its time over gRPC whatever is still running; waits for every answer. Returns each request's
    outcome and the seconds over which they arrived."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=max_requests)
    arrivals = np.cumsum(gaps)
    arrivals = arrivals[arrivals <= seconds] if (arrivals <= seconds).any() else arrivals[:1]
    outcomes: list[dict[str, Any]] = []
    lock, all_in = threading.Lock(), threading.Event()

    def record(answer, sent: float) -> None:
        latency = time.perf_counter() - sent
        ok = not isinstance(answer, Exception)
        o = {"latency_s": latency, "ok": ok}
        if ok:
            o.update(bundle=answer.bundle, steps=answer.steps, degraded=answer.degraded)
        else:
            o["error"] = str(answer)[:160]
        with lock:
            outcomes.append(o)
            if len(outcomes) == len(arrivals):
                all_in.set()

    with Endpoint(url, "grpc", timeout=timeout) as endpoint:
        t0 = time.perf_counter()
        for k, at in enumerate(arrivals):
            wait = t0 + at - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            sent = time.perf_counter()
            endpoint.submit(make(k), lambda answer, sent=sent: record(answer, sent))
        all_in.wait(timeout)
    return outcomes, float(arrivals[-1])


def capacity(url: str, make: Callable[[int], GenerateRequest], clients: int, seconds: float) -> float:
    """Images per second at saturation: ``clients`` closed-loop clients for ``seconds``."""
    done = Counter()
    deadline = time.perf_counter() + seconds

    def client(c: int) -> None:
        with Endpoint(url, "grpc") as endpoint:
            k = 0
            while time.perf_counter() < deadline:
                endpoint.infer(make(1000 * c + k))
                done[c] += 1
                k += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return sum(done.values()) / (time.perf_counter() - t0)


def unloaded(url: str, make: Callable[[int], GenerateRequest], n: int = 5) -> float:
    """Median seconds of one request with nothing else running."""
    with Endpoint(url, "grpc") as endpoint:
        times = []
        for k in range(n):
            t0 = time.perf_counter()
            endpoint.infer(make(k))
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pct(xs: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(xs), q, method="higher")) * 1e3 if xs else None


def level(outcomes: list[dict[str, Any]], slo_s: float, wall: float, kids: dict) -> dict:
    """One arm at one rate: latency percentiles of what was served, SLO attainment over everything
    sent (refused and failed requests miss), goodput, the mix served and its KID (``kid_table``)."""
    served = [o for o in outcomes if o["ok"]]
    lat = [o["latency_s"] for o in served]
    met = sum(o["latency_s"] <= slo_s for o in served)
    mix = Counter(f"{o['bundle']} x{o['steps']}" for o in served)
    return {
        "sent": len(outcomes), "served": len(served),
        "degraded": sum(bool(o.get("degraded")) for o in served),
        "refused": sum("SLO" in o.get("error", "") for o in outcomes),
        "failed": sum(not o["ok"] and "SLO" not in o.get("error", "") for o in outcomes),
        "p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "p99_ms": _pct(lat, 99),
        "slo_attainment": met / max(len(outcomes), 1), "goodput_images_per_s": met / max(wall, 1e-9),
        "mix": dict(mix), "kid": served_kid(mix, kids),
        "errors": sorted({o["error"] for o in outcomes if not o["ok"]})[:3],
    }  # fmt: skip


def kid_table(bundle_path: str | Path, sampler: str) -> dict[str, dict[str, float]]:
    """KID by served bundle and measured step count, from the solver experiment's rows where that
    experiment measured this bundle (the shipped experts; the base beside them) with the solver
    family of ``sampler`` (options aside: the base's rows used thresholding). Empty elsewhere."""
    from stepadapt.benchmarks import solvers

    try:
        same = Path(bundle_path).resolve() == solvers.BUNDLE.resolve()
        rows = solvers.scored_rows() if same else []
    except Exception:  # noqa: BLE001 - no experiment results here: no KID column
        rows = []
    family = Solver.parse(sampler).name
    table: dict[str, dict[str, float]] = {}
    for r in rows:
        if not r.get("jump") and Solver.parse(r["solver"]).name == family and r.get("kid") is not None:
            table.setdefault(r["target"], {})[str(int(r["steps"]))] = r["kid"]
    return table


def served_kid(mix: dict[str, int], table: dict[str, dict[str, float]]) -> float | None:
    """The mean KID of what was served (``"bundle xSTEPS": count``), each at the nearest measured step
    count at or below its own (never flattering); None where any of it was not measured."""
    total, n = 0.0, 0
    for key, count in mix.items():
        name, steps = key.rsplit(" x", 1)
        below = [int(k) for k in table.get(name, {}) if int(k) <= int(steps)]
        if not below:
            return None
        total += count * table[name][str(max(below))]
        n += count
    return total / n if n else None


def load_section(
    arms: dict[str, Bundle], s: LoadSettings, work: Path, threads: int, cores: int,
    log: Callable[[str], None] = print, tick: Callable[[], None] = lambda: None,
    quality_of: Path | None = None,
) -> dict:  # fmt: skip
    """Every arm at every rate; ``quality_of``: the bundle the arms were made from (whose solver
    experiment scores, where there are some, price what was served)."""
    servers: dict[str, TritonServer] = {}
    make = {arm: (lambda k, arm=arm: _request(arm, s, k)) for arm in s.arms}

    def start(arm: str, slo: Slo | None = None) -> None:
        repo = write_repository(
            _served_bundles(arm, arms), work / f"load-{arm}", _options(arm, threads, cores, s, slo)
        )
        servers[arm] = TritonServer(repo, log_path=work / f"load-{arm}.log").start()
        try:
            unloaded(servers[arm].grpc_url, make[arm], n=2)  # warm-up: sessions, buffers
        except StepadaptError as e:  # an SLO arm may refuse it on a busy machine: it warmed up all the same
            if slo is None or "SLO" not in str(e):
                raise

    try:
        for arm in s.arms:
            if arm != "degrade":
                log(f"load: starting the {arm} arm's server")
                start(arm)
        ref = {"base": "base", "experts": "engine" if "engine" in servers else "lockstep"}
        alone = {b: unloaded(servers[a].grpc_url, make[a]) for b, a in ref.items() if a in servers}
        slo = {arm: s.slo_factor * alone[ASKED[arm]] for arm in s.arms}
        cap = {a: capacity(servers[a].grpc_url, make[a], s.capacity_clients, s.capacity_seconds)
               for a in ("base", "lockstep", "engine") if a in servers}  # fmt: skip
        log(f"load: unloaded {alone}, capacity {cap} images/s")
        if "degrade" in s.arms:
            start("degrade", Slo(ms=slo["degrade"] * 1e3, per="image", policy="degrade"))
        kids = kid_table(quality_of, s.sampler) if quality_of else {}
        levels = []
        for i, m in enumerate(s.multipliers):
            for arm in s.arms:  # interleaved: every arm at this rate before the next rate
                rate = m * cap[REFERENCE[arm]]
                outcomes, wall = open_loop(servers[arm].grpc_url, rate, s.seconds, s.max_requests, make[arm],
                                           seed=s.seed + 1000 * i)  # fmt: skip
                levels.append({"arm": arm, "multiplier": m, "rate": rate, "seconds": wall,
                               **level(outcomes, slo[arm], wall, kids)})  # fmt: skip
                tick()
    finally:
        for server in servers.values():
            server.stop()
    return {
        "steps": s.steps, "sampler": s.sampler, "arms": list(s.arms),
        "unloaded_ms": {k: v * 1e3 for k, v in alone.items()},
        "slo_ms": {k: v * 1e3 for k, v in slo.items()}, "capacity_images_per_s": cap, "levels": levels,
        "kid_table": kids,
        "settings": asdict(s),
    }  # fmt: skip


# ----------------------------------------------------------------------------- report


def _at(load: dict, arm: str, m: float) -> dict | None:
    return next((x for x in load["levels"] if x["arm"] == arm and abs(x["multiplier"] - m) < 1e-9), None)


def targets(load: dict) -> list[tuple[str, str, bool | None]]:
    """The issue's two bars: SLO attainment with degrade at the base alone's capacity, and the step
    engine's p99 against the lockstep layout's at 0.7 x the lockstep capacity."""
    out = []
    base, deg = _at(load, "base", 1.0), _at(load, "degrade", 1.0)
    if base and deg:
        out.append((
            "arrivals at the base alone's capacity, SLO 2 × unloaded: degrade attains ≥ 99 % where the "
            "base alone attains < 50 %",
            f"degrade {deg['slo_attainment']:.1%}, base {base['slo_attainment']:.1%}",
            deg["slo_attainment"] >= 0.99 and base["slo_attainment"] < 0.5,
        ))  # fmt: skip
    lock, eng = _at(load, "lockstep", 0.7), _at(load, "engine", 0.7)
    if lock and eng and lock["p99_ms"] and eng["p99_ms"]:
        out.append((
            "arrivals at 0.7 × the lockstep layout's capacity: the step engine's p99 ≤ ½ the lockstep's",
            f"engine {eng['p99_ms']:.0f} ms, lockstep {lock['p99_ms']:.0f} ms "
            f"({eng['p99_ms'] / lock['p99_ms']:.2f} ×)",
            eng["p99_ms"] <= 0.5 * lock["p99_ms"],
        ))  # fmt: skip
    return out


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f}"


def render(load: dict, image: str | None, run: dict | None = None, report: dict | None = None) -> list[str]:
    """The load section of a bench report, as markdown lines; ``run``: the run that measured it,
    said where it is not the report's own (``bench --sections load`` beside an earlier full run)."""
    cap, slo, alone = load["capacity_images_per_s"], load["slo_ms"], load["unloaded_ms"]
    out = ["### Load (open loop)", ""]
    out += [
        f"One-image requests, {load['sampler']} × {load['steps']} steps asked, Poisson arrivals over gRPC "
        f"for up to {load['settings']['seconds']:g} s or {load['settings']['max_requests']} requests per "
        "rate and arm, the arms interleaved at every rate (each its own tritonserver, all up at once). "
        "Capacities (closed-loop, saturated): "
        + ", ".join(f"{k} {v:.2f} images/s" for k, v in cap.items())
        + ". Unloaded latency of one image: " + ", ".join(f"{k} {v:.0f} ms" for k, v in alone.items())
        + ". SLO (2 × unloaded at the asked budget): " + ", ".join(f"{k} {v:.0f} ms" for k, v in slo.items())
        + ". Rates are multiples of the base alone's capacity (base, degrade) or the lockstep layout's "
        "(lockstep, engine). Attainment counts every request sent (refused and failed ones miss); "
        "goodput is the images per second that met the SLO; KID is the solver experiment's score of "
        "each configuration served (nearest measured step count at or below; — where not measured).",
        "",
    ]  # fmt: skip
    rows = []
    for x in sorted(load["levels"], key=lambda x: (x["multiplier"], load["arms"].index(x["arm"]))):
        mix = ", ".join(f"{k}: {v}" for k, v in sorted(x["mix"].items(), key=lambda kv: -kv[1]))
        rows.append([
            f"{x['multiplier']:g} ×", x["arm"], f"{x['rate']:.2f}", x["sent"],
            f"{_ms(x['p50_ms'])} / {_ms(x['p95_ms'])} / {_ms(x['p99_ms'])}",
            f"{x['slo_attainment']:.1%}", f"{x['goodput_images_per_s']:.2f}",
            f"{x['refused']} / {x['failed']}", mix or "—", "—" if x["kid"] is None else f"{x['kid']:.4f}",
        ])  # fmt: skip
    out += [
        "| rate | arm | requests/s | sent | p50 / p95 / p99 ms | SLO attained | goodput images/s "
        "| refused / failed | served (bundle × steps: requests) | KID served |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]
    if image:
        out += [f"![load]({image})", ""]
    if run and report and run.get("command") != report.get("command"):
        m = run["machine"]
        out += [
            f"Measured apart from the sections above: `{run['command']}`, commit `{run.get('commit')}`, "
            f"{run.get('created')}, {m['cpu']} ({m['cores']} cores).",
            "",
        ]
    return out


def plot(load: dict, title: str):
    """p50 / p99 and SLO attainment against the arrival rate, one line per arm (the figure)."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for arm in load["arms"]:
        xs = sorted((x for x in load["levels"] if x["arm"] == arm), key=lambda x: x["multiplier"])
        m = [x["multiplier"] for x in xs]
        line = a.plot(m, [x["p99_ms"] or np.nan for x in xs], "o-", label=f"{arm} p99")[0]
        a.plot(
            m,
            [x["p50_ms"] or np.nan for x in xs],
            "o--",
            color=line.get_color(),
            alpha=0.6,
            label=f"{arm} p50",
        )
        b.plot(m, [100 * x["slo_attainment"] for x in xs], "o-", color=line.get_color(), label=arm)
    a.set(xlabel="arrival rate (× the arm's reference capacity)", ylabel="latency (ms)", yscale="log",
          title=f"{title}: latency")  # fmt: skip
    b.set(xlabel="arrival rate (× the arm's reference capacity)", ylabel="SLO attained (%)", ylim=(0, 102),
          title=f"{title}: SLO attainment (2 × unloaded)")  # fmt: skip
    a.legend(fontsize=7, ncol=2)
    b.legend(fontsize=8)
    return fig
