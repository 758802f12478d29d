"""The step engine behind a real tritonserver: requests joining mid-flight, budgets, the SLO, metrics."""

import json
import re
import shutil
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import exported_copy
from stepadapt.export.onnx import onnx_router
from stepadapt.serving.client import Endpoint, GenerateRequest
from stepadapt.serving.repository import RepositoryOptions, write_repository
from stepadapt.serving.server import TritonServer, free_port

from stepadapt import StepadaptError
from stepadapt.admission import Slo
from stepadapt.bundle import Bundle
from stepadapt.sampling import max_pixel_diff, sample_images

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tiny_bundle, tmp_path_factory):
    return exported_copy(tiny_bundle, tmp_path_factory, "experts")


@pytest.fixture(scope="module")
def twin(exported, tmp_path_factory):
    """A second bundle of the same base (a copy under another name): what a budget picks between."""
    d = tmp_path_factory.mktemp("load") / "twin"
    shutil.copytree(exported.path, d)
    return Bundle.load(d)


def alone(b, req, steps=None, sampler=None):
    m = b.manifest
    return sample_images(
        onnx_router(b), m.scheduler, m.sample_shape, req.num_images, seed=req.seed,
        steps=steps or req.steps, sampler=sampler or req.sampler or "ddim",
    )  # fmt: skip


def _metrics(server, wait_for):
    """The server's /metrics once ``wait_for`` shows in it (figures are sent every half second)."""
    deadline = time.monotonic() + 5
    while True:
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        if re.search(wait_for, text) or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def _figures(text, name):
    """``{labels: value}`` of one metric in Prometheus text (labels as a frozenset of pairs)."""
    out = {}
    for labels, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        out[frozenset(re.findall(r'(\w+)="([^"]*)"', labels))] = float(value)
    return out


def _total(text, name, **labels):
    """The sum of one metric over the series whose labels include ``labels`` (over every engine)."""
    return sum(v for k, v in _figures(text, name).items() if set(labels.items()) <= k)


def _serve(bundles, tmp_path, name, **options):
    o = RepositoryOptions(front_instances=6, max_batch=8, **options)
    repo = write_repository(bundles, tmp_path / name, o)
    return TritonServer(repo, log_path=tmp_path / f"{name}.log", metrics_port=free_port())


def test_requests_joining_mid_flight_get_their_solo_images_and_leave_when_done(exported, tmp_path):
    """A long request runs; others join while it is mid-flight (other solvers, step counts, image
    counts) and leave before it ends; one more is cancelled mid-flight. Each gets what the
    in-process sampler gives it alone, and the cancelled one stops costing within a step."""
    long = GenerateRequest(num_images=1, steps=1000, seed=1, sampler="ddim")
    joiners = [
        GenerateRequest(num_images=2, steps=8, seed=2, sampler="unipc"),
        GenerateRequest(num_images=1, steps=12, seed=3, sampler="dpm++2m"),
        GenerateRequest(num_images=1, steps=6, seed=4, sampler="ddpm"),
    ]
    done = {}

    def run(key, req, delay, timeout=120.0):
        time.sleep(delay)
        with Endpoint(server.grpc_url, "grpc", timeout=timeout) as endpoint:
            try:
                done[key] = (endpoint.infer(req), time.monotonic())
            except StepadaptError as e:
                done[key] = (e, time.monotonic())

    with _serve(exported, tmp_path, "repo") as server:
        threads = [threading.Thread(target=run, args=("long", long, 0.0))]
        threads += [threading.Thread(target=run, args=(k, r, 0.5 + 0.2 * k)) for k, r in enumerate(joiners)]
        threads += [
            threading.Thread(
                target=run, args=("cancelled", GenerateRequest(num_images=2, steps=900), 0.4, 1.5)
            )
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    log = (tmp_path / "repo.log").read_text()  # the engine says its busy stretch when it ends
    assert isinstance(done["cancelled"][0], StepadaptError) and "cancelled" in str(done["cancelled"][0])
    assert done["long"][0].bundle == "experts" and done["long"][0].steps == 1000
    assert max_pixel_diff(done["long"][0].images, alone(exported, long)) <= 2
    for k, req in enumerate(joiners):
        got, at = done[k]
        assert not isinstance(got, Exception), got
        assert (got.steps, got.sampler, got.degraded) == (req.steps, req.sampler, False)
        assert max_pixel_diff(got.images, alone(exported, req)) <= 2
        assert at < done["long"][1]  # it joined mid-flight and left before the long one ended
    in_flight = [int(n) for n in re.findall(r"at most (\d+) in flight", log)]
    assert max(in_flight) >= 3  # they did run together


def test_a_budget_picks_the_bundle_and_bad_budgets_are_one_line_400s(exported, twin, tmp_path):
    with _serve({"experts": exported, "twin": twin}, tmp_path, "two") as server:
        with Endpoint(server.http_url) as endpoint:
            req = GenerateRequest(num_images=1, steps=4, seed=9)
            assert endpoint.infer(req).bundle == "experts"  # the first is the default
            got = endpoint.infer(GenerateRequest(num_images=1, steps=4, seed=9, budget="twin"))
            assert got.bundle == "twin" and max_pixel_diff(got.images, alone(twin, req)) <= 2
            with pytest.raises(
                StepadaptError, match="unknown budget 'huge'; this server serves experts, twin"
            ):
                endpoint.infer(GenerateRequest(num_images=1, steps=4, budget="huge"))
        body = {"inputs": [{"name": "budget", "shape": [1], "datatype": "INT32", "data": [3]}]}
        request = urllib.request.Request(
            f"http://{server.http_url}/v2/models/generate/infer",
            data=json.dumps(body).encode(),
            method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=60)
        assert e.value.code == 400 and "budget" in e.value.read().decode()
        metrics = _metrics(server, r'stepadapt_evaluations_total\{[^}]*bundle="twin"[^}]*\} 4')
    requests = "stepadapt_requests_total"
    assert _total(metrics, requests, bundle="experts", outcome="served") == 1
    assert _total(metrics, requests, bundle="twin", outcome="served") == 1
    assert (
        _total(metrics, requests, bundle="experts", outcome="invalid") == 1
    )  # unknown budget: the default's
    assert _total(metrics, "stepadapt_step_seconds_count") >= 8
    assert _total(metrics, "stepadapt_evaluations_total", bundle="twin") == 4


def test_the_slo_degrades_what_would_miss_it_or_refuses_it(exported, twin, tmp_path):
    """A request far too long for the SLO is served with fewer steps (degrade, the images those steps
    give) or refused at once with 503 (reject); a short one is served as asked either way."""
    huge = GenerateRequest(num_images=8, steps=1000, seed=5)  # many seconds here
    short = GenerateRequest(num_images=1, steps=4, seed=6)
    slo = Slo(ms=1500, per="request")
    with _serve({"experts": exported, "twin": twin}, tmp_path, "degrade", slo=slo) as server:
        with Endpoint(server.http_url) as endpoint:
            got = endpoint.infer(huge)
            assert got.degraded and got.steps < 1000
            assert (
                max_pixel_diff(
                    got.images, alone(exported if got.bundle == "experts" else twin, huge, got.steps)
                )
                <= 2
            )
            small = endpoint.infer(short)
            assert not small.degraded and small.steps == 4
        metrics = _metrics(server, "stepadapt_degraded_total")
        assert _total(metrics, "stepadapt_degraded_total", bundle="experts") == 1
    with _serve(exported, tmp_path, "reject", slo=slo.replace(policy="reject")) as server:
        with Endpoint(server.http_url) as endpoint:
            t0 = time.monotonic()
            with pytest.raises(
                StepadaptError, match="too busy to finish this request within its 1500 ms SLO"
            ):
                endpoint.infer(huge)
            assert time.monotonic() - t0 < 2.0  # refused at once, not after trying
            assert not endpoint.infer(short).degraded
        with ThreadPoolExecutor(1) as pool:  # the 503 as HTTP says it
            body = {
                "inputs": [
                    {"name": "steps", "shape": [1], "datatype": "INT32", "data": [1000]},
                    {"name": "num_images", "shape": [1], "datatype": "INT32", "data": [8]},
                ]
            }
            request = urllib.request.Request(
                f"http://{server.http_url}/v2/models/generate/infer",
                data=json.dumps(body).encode(),
                method="POST",
            )
            with pytest.raises(urllib.error.HTTPError) as e:
                pool.submit(urllib.request.urlopen, request, timeout=60).result()
        assert e.value.code == 503
