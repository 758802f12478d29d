"""Against a real tritonserver (from the nvidia-pytriton wheel) on 127.0.0.1."""

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import exported_copy
from stepadapt.export.onnx import onnx_router
from stepadapt.serving.client import Endpoint, GenerateRequest, generate, generate_stream
from stepadapt.serving.repository import RepositoryOptions, write_repository
from stepadapt.serving.server import TritonServer

from stepadapt import StepadaptError
from stepadapt.bundle import Bundle
from stepadapt.sampling import sample_images

STEPS = 6


@pytest.fixture(scope="module")
def exported(tiny_bundle, tmp_path_factory):
    return exported_copy(tiny_bundle, tmp_path_factory, "bundle")


@pytest.fixture(scope="module", params=["fused", "bls"])
def served(exported, request):
    """Every endpoint test runs against both repository layouts."""
    b = exported
    options = RepositoryOptions(
        max_batch=8, queue_delay_us=1000, layout=request.param, front_instances=4, max_queue=8
    )
    repo = write_repository(b, b.path / f"triton-{request.param}", options)
    with TritonServer(repo, log_path=b.path / f"triton-{request.param}.log") as server:
        yield b, server


def _post(url, body):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _infer_json(server, inputs):
    body = {
        "inputs": [{"name": k, "shape": [1], "datatype": dt, "data": [v]} for k, (dt, v) in inputs.items()]
    }
    return _post(f"http://{server.http_url}/v2/models/generate/infer", json.dumps(body).encode())


@pytest.mark.slow
def test_http_and_grpc_match_the_in_process_onnx_sampler(served):
    b, server = served
    req = GenerateRequest(num_images=3, steps=STEPS, seed=7)
    http = generate(server.http_url, req)
    grpc = generate(server.grpc_url, req, protocol="grpc")
    local = sample_images(
        onnx_router(b), b.manifest.scheduler, b.manifest.sample_shape, 3, steps=STEPS, seed=7
    )
    assert http.shape == (3, 32, 32, 1) and http.dtype == np.uint8
    assert np.array_equal(http, grpc)
    assert np.abs(http.astype(int) - local.astype(int)).max() <= 2


def test_ddpm_sampler_and_seed_change_the_images(served):
    _, server = served

    def get(seed, sampler):
        req = GenerateRequest(num_images=2, steps=STEPS, seed=seed, sampler=sampler)
        return generate(server.http_url, req)

    ddpm = get(1, "ddpm")
    assert np.array_equal(ddpm, get(1, "ddpm"))  # same request, same images (its noise is seeded)
    assert not np.array_equal(ddpm, get(1, "ddim"))  # the sampler alone changes them
    assert not np.array_equal(ddpm, get(2, "ddpm"))  # the seed alone changes them


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["euler:karras", "unipc"])
def test_every_solver_and_the_jump_through_the_endpoint_match_the_in_process_sampler(served, sampler):
    """Euler with Karras sigmas lands between timesteps (float32 through the ONNX/Triton boundary in
    both layouts); UniPC keeps per-request state; the jump runs in the router's process."""
    b, server = served
    local = onnx_router(b)
    m = b.manifest
    for jump in (False, True):
        req = GenerateRequest(num_images=2, steps=STEPS, seed=4, sampler=sampler, jump=jump)
        served_images = generate(server.http_url, req)
        alone = sample_images(local, m.scheduler, m.sample_shape, 2, steps=STEPS, seed=4, sampler=sampler,
                              jump=b.jump() if jump else None)  # fmt: skip
        assert np.abs(served_images.astype(int) - alone.astype(int)).max() <= 2
    plain = generate(server.http_url, GenerateRequest(num_images=2, steps=STEPS, seed=4, sampler=sampler))
    assert not np.array_equal(plain, served_images)  # the jump changes them


@pytest.mark.parametrize(
    "sampler, msg",
    [("dpm++9m", "unknown sampler 'dpm++9m'"), ("ddim:karras", "sampler ddim has no option 'karras'")],
)
def test_an_unknown_solver_or_option_is_a_400(served, sampler, msg):
    _, server = served
    status, text = _infer_json(server, {"sampler": ("BYTES", sampler), "steps": ("INT32", 2)})
    assert status == 400 and msg in text
    assert server.ready()
    status, text = _infer_json(
        server, {"sampler": ("BYTES", "heun"), "steps": ("INT32", 2), "jump": ("BOOL", True)}
    )
    assert status == 400 and "heun is not so" in text
    status, text = _infer_json(server, {"sampler": ("BYTES", "pndm"), "steps": ("INT32", 2)})
    assert status == 400 and "pndm cannot take 2 steps" in text


def test_stream_sends_one_message_per_step_then_the_images(served):
    b, server = served
    seen = []
    images = generate_stream(
        server.grpc_url, GenerateRequest(num_images=2, steps=STEPS, seed=3), lambda *a: seen.append(a)
    )
    assert [s for s, _, _ in seen] == list(range(1, STEPS + 1))
    ts = [t for _, t, _ in seen]
    assert ts == sorted(ts, reverse=True)
    names = {e.name for e in b.experts}
    assert {e for _, _, e in seen} <= names and len({e for _, _, e in seen}) > 1
    assert np.array_equal(
        images, generate(server.http_url, GenerateRequest(num_images=2, steps=STEPS, seed=3))
    )


def test_http_generate_stream_route(served):
    _, server = served
    body = json.dumps({"seed": 3, "num_images": 1, "steps": STEPS}).encode()
    status, text = _post(f"http://{server.http_url}/v2/models/generate_stream/generate_stream", body)
    assert status == 200
    events = [json.loads(line[len("data: ") :]) for line in text.splitlines() if line.startswith("data: ")]
    assert len(events) == STEPS + 1
    assert events[0]["step"] == 1 and "expert" in events[0]
    assert np.asarray(events[-1]["images"]).size == 32 * 32


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"steps": ("INT32", 0)}, "steps must be in"),
        ({"num_images": ("INT32", 9)}, "number of images must be in"),
        ({"sampler": ("BYTES", "dpm++9m")}, "unknown sampler"),
        ({"eta": ("FP32", 3.0)}, "eta must be in"),
        ({"steps": ("FP32", 5.0)}, "data-type"),
        ({"bogus": ("INT32", 1)}, "unexpected inference input"),
        ({"class_labels": ("INT32", 1)}, "class_labels given, but this bundle is not class-conditional"),
        ({"guidance_scale": ("FP32", 3.0)}, "guidance_scale given, but this bundle is not class-conditional"),
    ],
)
def test_bad_requests_get_400_and_the_server_keeps_serving(served, inputs, message):
    _, server = served
    status, text = _infer_json(server, inputs)
    assert status == 400, text
    assert message in text
    ok = generate(server.http_url, GenerateRequest(num_images=1, steps=2))
    assert ok.shape == (1, 32, 32, 1)


def test_bad_bytes_are_a_400_in_one_line(served):
    """A sampler that is not UTF-8 (binary BYTES over HTTP): the client's mistake, said in one line
    with no traceback and no server paths."""
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    _, server = served
    t = th.InferInput("sampler", [1], "BYTES")
    t.set_data_from_numpy(np.array([b"\xff\xfe\x00ddim"], dtype=np.object_), binary_data=True)
    client = th.InferenceServerClient(server.http_url)
    try:
        with pytest.raises(InferenceServerException) as e:
            client.infer("generate", [t])
    finally:
        client.close()
    msg = e.value.message()
    assert msg == "input sampler is not UTF-8 text" and e.value.status() == "400"
    assert generate(server.http_url, GenerateRequest(num_images=1, steps=2)).shape == (1, 32, 32, 1)


def test_malformed_json_and_client_errors(served):
    _, server = served
    # Triton's HTTP frontend itself answers malformed JSON (with 500, its choice), naming the parse error.
    status, text = _post(f"http://{server.http_url}/v2/models/generate/infer", b"{not json")
    assert status >= 400 and "JSON" in text.upper(), text
    assert server.ready()
    with pytest.raises(StepadaptError, match="server refused the request: steps must be in"):
        generate(server.http_url, GenerateRequest(steps=-1))
    with pytest.raises(StepadaptError, match="cannot reach Triton"):
        generate("127.0.0.1:1", GenerateRequest(steps=2), timeout=5)


@pytest.mark.slow
def test_bounded_load_run(served):
    _, server = served

    def client(i):
        return [
            generate(server.http_url, GenerateRequest(num_images=2, steps=4, seed=i * 10 + j))
            for j in range(5)
        ]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client, range(8)))
    assert sum(len(r) for r in results) == 40
    assert all(im.shape == (2, 32, 32, 1) for r in results for im in r)
    assert server.ready()


@pytest.mark.parametrize("layout, broken, named", [
    ("bls", "expert_g1/1/model.onnx", "expert_g1"), ("fused", "router/1/bundles/bundle/g1.onnx", "g1.onnx"),
])  # fmt: skip
@pytest.mark.slow
def test_failed_model_load_reports_tritons_message(exported, tmp_path, layout, broken, named):
    repo = write_repository(exported, tmp_path / "repo", RepositoryOptions(layout=layout, front_instances=1))
    (repo / broken).write_bytes(b"not an onnx file")
    server = TritonServer(repo, log_path=tmp_path / "log")
    try:
        with pytest.raises(StepadaptError, match=named):
            server.start(timeout=120)
    finally:  # a start that should have failed and did not must not outlive the test
        server.stop()


def test_layouts_hold_the_models_they_promise(exported, tmp_path):
    fused = write_repository(exported, tmp_path / "f", RepositoryOptions(layout="fused"))
    bls = write_repository(exported, tmp_path / "b", RepositoryOptions(layout="bls"))
    names = {e.name for e in exported.experts}
    assert {p.name for p in fused.iterdir()} == {"generate", "router", "generate_stream"}
    served = fused / "router" / "1" / "bundles" / exported.path.name
    assert {p.name for p in served.glob("*.onnx")} == {f"{n}.onnx" for n in names}
    assert json.loads((fused / "router" / "1" / "bundles.json").read_text()) == [exported.path.name]
    router = (fused / "router" / "config.pbtxt").read_text()
    assert "decoupled: true" in router and "count: 1" in router and '"step"' in router  # the step engine
    lockstep = write_repository(
        exported, tmp_path / "l", RepositoryOptions(layout="fused", scheduling="lockstep")
    )
    assert "max_batch_size: 16" in (lockstep / "router" / "config.pbtxt").read_text()
    assert (
        "fill" not in (lockstep / "generate" / "config.pbtxt").read_text()
    )  # unconditional: nothing to fill
    assert {p.name for p in bls.iterdir()} == {"generate", "generate_stream"} | {f"expert_{n}" for n in names}
    with pytest.raises(StepadaptError, match="unknown repository layout"):
        write_repository(exported, tmp_path / "x", RepositoryOptions(layout="ensemble"))


def test_an_experts_external_onnx_data_travels_with_it_verified(tiny_bundle, tmp_path_factory, tmp_path):
    """A model over protobuf's 2 GiB keeps its weights in ``<name>.onnx.data``: the repository puts
    the file beside the graph under the name the graph records (both layouts), after checking it."""
    import onnx
    import onnxruntime as ort

    from stepadapt.io import sha256_file

    b = exported_copy(tiny_bundle, tmp_path_factory, "big")
    e = b.experts[1]
    graph = b.path / e.onnx["path"]
    data = graph.with_name(graph.name + ".data")
    onnx.save_model(onnx.load(str(graph)), str(graph), save_as_external_data=True, location=data.name,
                    size_threshold=0)  # fmt: skip
    record = {**e.onnx, "sha256": sha256_file(graph),
              "external_data": {"path": f"onnx/{data.name}", "sha256": sha256_file(data)}}  # fmt: skip
    b.update_experts({e.name: {"onnx": record}})
    b = Bundle.load(b.path)
    for layout, where, model in (("fused", "router/1/bundles/big", f"{e.name}.onnx"),
                                 ("bls", f"expert_{e.name}/1", "model.onnx")):  # fmt: skip
        repo = write_repository(b, tmp_path / layout, RepositoryOptions(layout=layout))
        assert (repo / where / data.name).is_file()
        ort.InferenceSession(str(repo / where / model), providers=["CPUExecutionProvider"])  # it loads
    data.write_bytes(data.read_bytes()[:-4] + b"oops")
    with pytest.raises(StepadaptError, match=f"ONNX data of expert {e.name}"):
        write_repository(b, tmp_path / "bad", RepositoryOptions(layout="bls"))


@pytest.mark.slow
@pytest.mark.parametrize("sampler", [None, "dpm++2m-sde"])  # multi-step and stochastic
def test_concurrent_requests_share_a_batch_and_keep_their_images(exported, tmp_path, sampler):
    """The lockstep router steps concurrent requests together (its log counts them) and each still
    gets what the in-process sampler gives it alone: multi-step and stochastic solvers included,
    since each request owns its scheduler and its noise."""
    options = RepositoryOptions(
        layout="fused", instances=1, queue_delay_us=200_000, front_instances=4, scheduling="lockstep"
    )
    repo = write_repository(exported, tmp_path / "repo", options)
    reqs = [
        GenerateRequest(num_images=n, steps=STEPS, seed=s, sampler=sampler)
        for n, s in [(1, 5), (2, 6), (1, 7)]
    ]
    with TritonServer(repo, log_path=tmp_path / "log", verbose=1) as server:
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda r: generate(server.http_url, r), reqs))
    log = (tmp_path / "log").read_text()
    local = onnx_router(exported)
    m = exported.manifest
    for r, images in zip(reqs, got, strict=True):
        alone = sample_images(local, m.scheduler, m.sample_shape, r.num_images, steps=STEPS, seed=r.seed,
                              sampler=sampler or "ddim")  # fmt: skip
        assert images.shape == alone.shape
        assert np.abs(images.astype(int) - alone.astype(int)).max() <= 2
    assert "model router, instance router_0_0, executing 3 requests" in log


@pytest.mark.slow
def test_the_bundles_recommended_setting_is_the_endpoints_default(exported, tmp_path):
    """A request silent on sampler, steps and jump gets the manifest's recommendation (``tune``)."""
    d = tmp_path / "bundle"
    shutil.copytree(exported.path, d, ignore=shutil.ignore_patterns("triton-*"))
    b = Bundle.load(d)
    b.set_recommended({"sampler": "dpm++2m:thresholding", "steps": 5, "jump": True})
    repo = write_repository(b, tmp_path / "repo", RepositoryOptions(layout="fused", front_instances=2))
    with TritonServer(repo, log_path=tmp_path / "log") as server:
        default = generate(server.http_url, GenerateRequest(num_images=2, seed=9))
        asked = generate(
            server.http_url, GenerateRequest(num_images=2, seed=9, sampler="ddim", steps=5, jump=False)
        )
    local, m = onnx_router(b), b.manifest
    rec = sample_images(local, m.scheduler, m.sample_shape, 2, steps=5, seed=9,
                        sampler="dpm++2m:thresholding", jump=b.jump())  # fmt: skip
    ddim = sample_images(local, m.scheduler, m.sample_shape, 2, steps=5, seed=9)
    assert np.abs(default.astype(int) - rec.astype(int)).max() <= 2
    assert np.abs(asked.astype(int) - ddim.astype(int)).max() <= 2


def test_generate_cli_plain_and_streaming(served, tmp_path):
    from typer.testing import CliRunner

    from stepadapt.cli import app

    _, server = served
    runner = CliRunner()
    r = runner.invoke(app, ["generate", "--url", server.http_url, "--n", "2", "--steps", "3",
                            "--out", str(tmp_path / "a.png")])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", "--url", server.grpc_url, "--stream", "--n", "2", "--steps", "3",
                            "--out", str(tmp_path / "b.png")])  # fmt: skip
    assert r.exit_code == 0, r.output
    a, b = np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"]
    assert a.shape == (2, 32, 32, 1) and np.array_equal(a, b)
    r = runner.invoke(
        app, ["generate", "--url", server.http_url, "--sampler", "dpm++9m", "--out", str(tmp_path / "c.png")]
    )
    assert r.exit_code == 2 and "unknown sampler" in r.output and not (tmp_path / "c.png").exists()


def _group_cpu(pgid: int) -> float:
    """CPU seconds used so far by every process of the server's group (tritonserver and its stubs)."""
    total = 0.0
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _processes_naming(path: Path) -> list[str]:
    """PIDs whose command line names ``path`` (tritonserver's repository, its stubs' model files)."""
    found = []
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if str(path).encode() in f.read():
                    found.append(p)
        except OSError:
            continue
    return found


def _idle_within_a_second(server) -> float:
    """CPU seconds the server spends in the second after it was given a second to stop."""
    time.sleep(1.0)
    before = _group_cpu(server.proc.pid)
    time.sleep(1.0)
    return _group_cpu(server.proc.pid) - before


LONG = GenerateRequest(num_images=8, steps=1000)  # tens of seconds here, were it not cancelled


@pytest.mark.slow
def test_a_cancelled_request_frees_the_cpu_within_a_second(served):
    """gRPC: the client's timeout cancels the request; the server drops it at its next step."""
    _, server = served
    with Endpoint(server.grpc_url, "grpc", timeout=1.5) as endpoint:
        with pytest.raises(StepadaptError, match="in 1.5s \\(request cancelled\\)"):
            endpoint.generate(LONG)
    assert _idle_within_a_second(server) < 0.3
    assert generate(server.grpc_url, GenerateRequest(num_images=1, steps=2), "grpc").shape == (1, 32, 32, 1)


@pytest.mark.slow
def test_a_stream_given_up_on_is_cancelled(served):
    """Ctrl-C while streaming: the client cancels the stream and the server stops stepping."""
    _, server = served
    steps = []

    def interrupt(step, t, expert):
        steps.append(step)
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_stream(server.grpc_url, LONG, on_step=interrupt)
    assert _idle_within_a_second(server) < 0.3
    assert steps == [1, 2, 3]


@pytest.mark.slow
def test_a_burst_beyond_the_queue_is_served_or_refused_at_once(served):
    """32 requests at once against 4 running + a queue of 8: every one is answered, none hangs;
    the ones that do not fit are refused at once with a message that says so."""
    _, server = served

    def one(seed):
        t0 = time.monotonic()
        try:
            req = GenerateRequest(num_images=8, steps=100, seed=seed)
            images = generate(server.grpc_url, req, "grpc", 120)
            return images.shape, time.monotonic() - t0
        except StepadaptError as e:
            return str(e), time.monotonic() - t0

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32)))
    served_ = [a for a, _ in answers if a == (8, 32, 32, 1)]
    refused = [(a, dt) for a, dt in answers if a != (8, 32, 32, 1)]
    assert len(served_) >= 4 and refused, answers
    for msg, dt in refused:
        assert msg.startswith("server refused the request: the server is busy, retry later"), msg
        assert dt < 5.0, (msg, dt)
    assert server.ready()


@pytest.mark.slow
def test_an_unexpected_failure_is_one_line_and_the_server_keeps_serving(exported, tmp_path):
    """An expert that onnxruntime refuses at run time (a fixed batch of 2): the client gets one line
    naming no path and no traceback; the details are in the server log; batch 2 still works."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["sample"], ["eps"])], "fixed",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [2, 1, 32, 32]),
         helper.make_tensor_value_info("timestep", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("eps", TensorProto.FLOAT, [2, 1, 32, 32])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    repo = write_repository(exported, tmp_path / "repo", RepositoryOptions(front_instances=1, instances=1))
    for f in (repo / "router" / "1").rglob("*.onnx"):
        onnx.save(model, f)
    with TritonServer(repo, log_path=tmp_path / "log") as server:
        status, text = _infer_json(server, {"num_images": ("INT32", 1), "steps": ("INT32", 2)})
        assert status == 500, text
        msg = json.loads(text)["error"]
        assert msg.startswith("internal error (") and msg.endswith("); see the server log"), msg
        assert "/" not in msg and "\\n" not in msg and "Traceback" not in msg
        assert generate(server.http_url, GenerateRequest(num_images=2, steps=2)).shape == (2, 32, 32, 1)
    assert "generate: " in (tmp_path / "log").read_text()


@pytest.mark.slow
def test_sigterm_stops_serve_within_5s_with_no_orphans(exported, tmp_path):
    """`stepadapt serve`, a long request in flight, SIGTERM: the request ends with an error, the
    server is gone within 5 s, no process of it is left and its temp directory is removed."""
    import signal
    import subprocess
    import sys
    import threading

    from stepadapt.serving.server import free_port

    d = tmp_path / "bundle"
    shutil.copytree(exported.path, d, ignore=shutil.ignore_patterns("triton*"))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    http, grpc = free_port(), free_port()
    exe = str(Path(sys.executable).with_name("stepadapt"))
    proc = subprocess.Popen(
        [exe, "serve", str(d), "--http-port", str(http), "--grpc-port", str(grpc), "--instances", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "TMPDIR": str(tmp)},
    )  # fmt: skip
    try:
        url = f"127.0.0.1:{http}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
        answer = {}

        def long():
            try:
                generate(url, LONG, timeout=120)
                answer["got"] = "images"
            except StepadaptError as e:
                answer["got"] = str(e)

        client = threading.Thread(target=long)
        client.start()
        time.sleep(2.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - t0
        client.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < 5.0, took
    assert proc.returncode == 0
    assert answer["got"] == "server refused the request: the server is shutting down", answer
    assert not _processes_naming(d)
    assert not list(tmp.glob("stepadapt-*")), list(tmp.iterdir())


def test_onnxruntime_provider_choice(monkeypatch):
    import onnxruntime as ort
    from stepadapt.export.runtime import providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert providers("auto") == providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(StepadaptError, match="no CUDA provider"):
        providers("cuda")
    with pytest.raises(StepadaptError, match="unknown device"):
        providers("tpu")
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: both)
    assert providers("auto") == providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers("cpu") == ["CPUExecutionProvider"]


def test_one_batch_setting_for_the_engine_and_the_configs(exported, tmp_path):
    """The TensorRT profile's largest batch and every config's max_batch_size are one setting; where
    a repository asks more than an engine was built for, its GPU config falls back to onnxruntime and
    says so (a TensorRT config would refuse the larger requests)."""
    import inspect

    from stepadapt.export import MAX_BATCH
    from stepadapt.export.tensorrt import build_engine

    from stepadapt.io import sha256_file

    assert inspect.signature(build_engine).parameters["max_batch"].default == MAX_BATCH
    assert RepositoryOptions().max_batch == MAX_BATCH
    d = tmp_path / "b"
    shutil.copytree(exported.path, d, ignore=shutil.ignore_patterns("triton*"))
    (d / "trt").mkdir()
    (d / "trt" / "g0.plan").write_bytes(b"an engine built elsewhere")  # only copied here, never run
    b = Bundle.load(d)
    trt = {"path": "trt/g0.plan", "sha256": sha256_file(d / "trt" / "g0.plan"), "max_abs_err": 0.0}
    b.update_experts({"g0": {"trt": {**trt, "max_batch": 32}}})
    b = Bundle.load(d)
    from stepadapt import Notice

    with pytest.warns(Notice, match="engine takes at most 32 images per batch, the repository 64"):
        repo = write_repository(b, tmp_path / "r64", RepositoryOptions(layout="bls"))
    gpu = (repo / "expert_g0" / "configs" / "gpu.pbtxt").read_text()  # the CPU layout still serves
    assert 'platform: "onnxruntime_onnx"' in gpu and "max_batch_size: 64" in gpu
    assert not (repo / "expert_g0" / "1" / "model.plan").exists()
    repo = write_repository(b, tmp_path / "r32", RepositoryOptions(layout="bls", max_batch=32))
    gpu = (repo / "expert_g0" / "configs" / "gpu.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in gpu and "max_batch_size: 32" in gpu
    assert (repo / "expert_g0" / "1" / "model.plan").read_bytes() == b"an engine built elsewhere"
    assert "max_batch_size: 32" in (repo / "expert_g0" / "config.pbtxt").read_text()


@pytest.mark.slow
def test_the_repository_runs_on_a_triton_whose_python_lacks_stepadapt(exported, tmp_path):
    """A full Triton's layout (bin/tritonserver, backends/ beside it) and a Python that can import
    torch, onnxruntime, diffusers but not stepadapt: the models use the copy inside the repository.
    Without that copy the same server cannot load them, so the test could fail."""
    import re
    import sys

    from stepadapt.serving.server import _pytriton_dir, prepare_backends

    full = tmp_path / "tritonserver"
    (full / "bin").mkdir(parents=True)
    (full / "bin" / "tritonserver").symlink_to(_pytriton_dir() / "bin" / "tritonserver")
    prepare_backends(full)
    # The stub's Python is the environment of the python3 on PATH (it ignores PYTHONPATH): a fresh
    # venv that sees this one's packages through a .pth line, while this one's editable-install
    # finder (a .pth in a directory that is not a site directory there) never runs.
    import site
    import subprocess

    env_dir = tmp_path / "server-python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    ours = next(p for p in site.getsitepackages() if (Path(p) / "torch").is_dir())
    (next(env_dir.glob("lib/python*/site-packages")) / "deps.pth").write_text(ours + "\n")
    no_project = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin"}
    repo = write_repository(exported, tmp_path / "repo", RepositoryOptions(front_instances=1, instances=1))
    server = {"binary": full / "bin" / "tritonserver", "env": no_project}
    with TritonServer(repo, log_path=tmp_path / "log", **server) as s:
        images = generate(s.http_url, GenerateRequest(num_images=1, steps=2))
    assert images.shape == (1, 32, 32, 1)
    used = re.findall(r'router: stepadapt from ([^"\s]+)', (tmp_path / "log").read_text())
    assert used and used[0] == str(repo / "router" / "lib" / "stepadapt"), used
    for lib in repo.glob("*/lib"):
        shutil.rmtree(lib)
    with pytest.raises(StepadaptError, match="stepadapt"):
        TritonServer(repo, log_path=tmp_path / "log2", **server).start(timeout=120)


def test_interrupted_start_leaves_nothing_running(exported, tmp_path, monkeypatch):
    """Ctrl-C (or serve's SIGTERM) while tritonserver is still coming up: it is stopped, its work
    directory removed; the server runs in its own session, so nothing else would stop it."""
    repo = write_repository(exported, tmp_path / "repo", RepositoryOptions(front_instances=1, instances=1))
    server = TritonServer(repo, log_path=tmp_path / "log")

    def interrupted(self):
        time.sleep(0.5)  # it is running by now
        raise KeyboardInterrupt

    monkeypatch.setattr(TritonServer, "ready", interrupted)
    with pytest.raises(KeyboardInterrupt):
        server.start()
    assert server.proc is None and not server.work.exists()
    assert not _processes_naming(repo)


def test_serve_options_round_trip_to_json_and_refuse_bad_values_in_one_line():
    from stepadapt.serving.stage import ServeOptions

    o = ServeOptions(bundles=("b",), layout="bls", http_port=9000, grpc_port=9001, max_images=8, log="x.log")
    assert o.bundle == Path("b") and ServeOptions.from_json(o.to_json()) == o
    assert o.repo_path == Path("b/triton") and o.log_path == Path("x.log")
    assert ServeOptions(bundles=("b",)).log_path == Path("b/triton.log")
    two = ServeOptions(bundles=("base=runs/b", "runs/experts"), slo_ms=800, slo_policy="reject")
    assert two.served() == {"base": Path("runs/b"), "experts": Path("runs/experts")}
    assert two.bundle == Path("runs/b") and two.slo().policy == "reject" and two.slo().seconds(2) == 1.6
    r = o.repository_options()
    assert (r.layout, r.max_batch, r.instances, r.queue_timeout_s) == ("bls", 8, 2, 60.0)
    bad = [
        ({"layout": "ensemble"}, "unknown repository layout 'ensemble'; choose one of fused, bls"),
        ({"http_port": 0}, "--http-port must be a port in 1..65535"),
        ({"grpc_port": 70000}, "--grpc-port must be a port in 1..65535"),
        ({"http_port": 8001}, "--http-port, --grpc-port and --metrics-port must differ"),
        ({"metrics_port": 8000}, "--http-port, --grpc-port and --metrics-port must differ"),
        ({"scheduling": "fifo"}, "--scheduling must be one of step, lockstep"),
        ({"slo_ms": -5}, "the SLO must be a positive number of milliseconds"),
        ({"slo_ms": 5, "slo_policy": "drop"}, "--slo-policy must be one of degrade, reject"),
        ({"slo_ms": 5, "slo_per": "batch"}, "per image or per request"),
        ({"bundles": ("a=x", "a=y")}, "two bundles are named 'a'"),
        ({"bundles": ()}, "name at least one bundle"),
        ({"device": "tpu"}, "--device must be one of auto, cpu, cuda"),
        ({"instances": 0}, "--instances must be at least 1"),
        ({"max_queue": -1}, "--max-queue must be 0 or more"),
        ({"queue_timeout": 0}, "--queue-timeout must be a positive number"),
    ]
    for change, msg in bad:
        with pytest.raises(StepadaptError, match=msg) as e:
            ServeOptions(**{"bundles": ("b",), **change})
        assert "\n" not in str(e.value)
    with pytest.raises(StepadaptError, match="unknown option"):
        ServeOptions.from_dict({"bundles": ["b"], "layot": "fused"})


def test_serve_refuses_a_device_onnxruntime_lacks_before_anything_loads(tmp_path, monkeypatch):
    import onnxruntime as ort
    from stepadapt.serving.stage import ServeOptions, start

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(StepadaptError, match="no CUDA provider"):
        start(ServeOptions(bundles=(str(tmp_path / "no-bundle"),), device="cuda"))  # said before the bundle


@pytest.mark.slow
def test_the_serve_stage_serves_an_exported_bundle(exported, tmp_path):
    """start() returns a ready server on the ports asked for, with the repository and the log
    where the options put them by default; it serves what onnxruntime gives in process."""
    from stepadapt.serving.server import free_port
    from stepadapt.serving.stage import ServeOptions, start

    d = tmp_path / "bundle"
    shutil.copytree(exported.path, d, ignore=shutil.ignore_patterns("triton*"))
    http, grpc = free_port(), free_port()
    said = []
    options = ServeOptions(bundles=(str(d),), http_port=http, grpc_port=grpc, instances=1, metrics_port=0)
    server = start(options, log=said.append)
    try:
        assert server.ready() and server.http_url == f"127.0.0.1:{http}"
        req = GenerateRequest(num_images=2, steps=STEPS, seed=5)
        images = generate(server.http_url, req)
        assert np.array_equal(images, generate(f"127.0.0.1:{grpc}", req, protocol="grpc"))
    finally:
        server.stop()
    assert server.proc is None and not _processes_naming(d)
    m = exported.manifest
    alone = sample_images(onnx_router(exported), m.scheduler, m.sample_shape, 2, steps=STEPS, seed=5)
    assert np.abs(images.astype(int) - alone.astype(int)).max() <= 2
    assert "count: 1" in (d / "triton" / "router" / "config.pbtxt").read_text()  # fused by default
    assert (d / "triton.log").is_file() and said == [
        f"starting tritonserver on 127.0.0.1 (repository {d / 'triton'}) ..."
    ]
