"""Serving benchmark: the endpoint against in-process onnxruntime on the same bundle.

Router overhead per step = (end-to-end latency through Triton - in-process
onnxruntime latency for the same request) / steps: what the BLS hops, the
Python router and the HTTP frontend add on top of the expert compute.

    python -m benchmarks.serving BUNDLE [--n 1] [--steps 50] [--requests 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stepadapt.export.onnx import export_bundle, onnx_router
from stepadapt.serving.client import GenerateRequest, generate
from stepadapt.serving.repository import RepositoryOptions, write_repository
from stepadapt.serving.server import TritonServer

from stepadapt.bundle import Bundle
from stepadapt.io import write_json
from stepadapt.sampling import sample_images


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--n", type=int, default=1, help="images per request")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--requests", type=int, default=5, help="requests per client")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--queue-delay-us", type=int, default=0, help="experts' dynamic-batching delay")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serving.json"))
    a = ap.parse_args()

    b = Bundle.load(a.bundle)
    if not all(e.onnx for e in b.experts):
        export_bundle(b)
    router = onnx_router(b, threads=1)
    shape, sched = b.manifest.sample_shape, b.manifest.scheduler
    sample_images(router, sched, shape, a.n, steps=a.steps)  # warm-up
    local = []
    for i in range(a.requests):
        t0 = time.perf_counter()
        sample_images(router, sched, shape, a.n, steps=a.steps, seed=i)
        local.append(time.perf_counter() - t0)
    local_ms = statistics.median(local) * 1e3

    repo = write_repository(b, b.path / "triton", RepositoryOptions(queue_delay_us=a.queue_delay_us))
    results = {}
    with TritonServer(repo, log_path=b.path / "triton-bench.log") as server:
        generate(server.http_url, GenerateRequest(num_images=a.n, steps=a.steps))  # warm-up
        for c in a.concurrency:
            lat: list[float] = []

            def client(k: int, lat: list[float] = lat) -> None:
                for j in range(a.requests):
                    t0 = time.perf_counter()
                    generate(
                        server.http_url, GenerateRequest(num_images=a.n, steps=a.steps, seed=k * 100 + j)
                    )
                    lat.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                list(pool.map(client, range(c)))
            wall = time.perf_counter() - t0
            results[str(c)] = {
                "requests": len(lat),
                "images_per_s": round(len(lat) * a.n / wall, 2),
                "p50_ms": round(_pct(lat, 0.5) * 1e3, 1),
                "p99_ms": round(_pct(lat, 0.99) * 1e3, 1),
            }
            print(f"concurrency {c}: {results[str(c)]}", flush=True)
    e2e_ms = results[str(a.concurrency[0])]["p50_ms"]
    report = {
        "command": "python -m benchmarks.serving "
        + " ".join(map(str, [a.bundle, "--n", a.n, "--steps", a.steps, "--requests", a.requests]))
        + f" --queue-delay-us {a.queue_delay_us} --concurrency {' '.join(map(str, a.concurrency))}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "images_per_request": a.n,
        "steps": a.steps,
        "queue_delay_us": a.queue_delay_us,
        "in_process_onnxruntime_ms": round(local_ms, 1),
        "router_overhead_ms_per_step": round((e2e_ms - local_ms) / a.steps, 3),
        "concurrency": results,
    }
    write_json(a.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
