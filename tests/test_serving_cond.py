"""A class-conditional bundle served by a real tritonserver on 127.0.0.1: class labels and a
guidance scale through both layouts and the stream, against the in-process guided sampler."""

import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from stepadapt.export.stage import ExportOptions, export
from stepadapt.serving.client import GenerateRequest, _labels, generate, generate_stream
from stepadapt.serving.condition import request_condition
from stepadapt.serving.repository import RepositoryOptions, write_repository
from stepadapt.serving.server import TritonServer

from stepadapt import StepadaptError
from stepadapt.bundle import Bundle, ExpertDraft, Manifest, save_bundle
from stepadapt.conditioning import Conditioning, guided, labels_cond
from stepadapt.sampling import sample_images

STEPS = 6
CLASSES = 3  # labels 0..2, and 3 for no class


def make_cond_bundle(out: Path) -> Bundle:
    """A random class-conditional tiny U-Net split three ways and exported: itself on [0, 300), a
    magnitude-pruned copy at 0.5 x its MACs on [300, 700), a Gaussian (which takes no labels) on
    [700, 1000). Assembled directly: the analyze and prune stages are not label-aware yet."""
    from conftest import _squares

    from stepadapt.difficulty import snr_profile
    from stepadapt.gaussian import fit_gaussian
    from stepadapt.importance import make_importance
    from stepadapt.models import build_unet, clean_config
    from stepadapt.prune import count_macs, prune_to_macs
    from stepadapt.schedule import DEFAULT_SCHEDULER

    base = build_unet("tiny", seed=0, classes=CLASSES).eval()
    macs, params = count_macs(base)
    half = prune_to_macs(base, 0.5 * macs, lambda: make_importance("magnitude"))
    gauss = fit_gaussian(_squares(1024, seed=5), DEFAULT_SCHEDULER)
    snr = snr_profile(DEFAULT_SCHEDULER)

    def draft(name, lo, hi, target, macs, params, **kw):
        return ExpertDraft(name, (lo, hi), (float(snr[lo]), float(snr[hi - 1])), target, macs, params, **kw)

    drafts = [
        draft("g0", 0, 300, macs, macs, params, importance="unpruned"),
        draft("g1", 300, 700, int(0.5 * macs), half.macs, half.params, importance="magnitude"),
        draft("g2", 700, 1000, gauss.macs, gauss.macs, gauss.params, kind="gaussian"),
    ]
    models = {"g0": (base, []), "g1": (half.model, half.history), "g2": gauss}
    manifest = Manifest(clean_config(base), dict(DEFAULT_SCHEDULER), (1, 32, 32), macs, params, [],
                        class_names=["square", "bar", "dot"])  # fmt: skip
    save_bundle(out, manifest, drafts, models)
    export(ExportOptions(bundle=out))
    return Bundle.load(out)


@pytest.fixture(scope="module")
def cond_bundle(tmp_path_factory):
    torch.set_num_threads(2)
    return make_cond_bundle(tmp_path_factory.mktemp("cond") / "bundle")


@pytest.fixture(scope="module")
def in_process(cond_bundle):
    """The in-process sampler the endpoint must match: the PyTorch experts, guided."""
    m = cond_bundle.manifest
    denoiser = guided(cond_bundle.router(), m.conditioning.null_label)

    def run(n, seed, labels, scale=None):
        return sample_images(denoiser, m.scheduler, m.sample_shape, n, steps=STEPS, seed=seed,
                             cond=labels_cond(labels, scale))  # fmt: skip

    return run


@pytest.fixture(scope="module", params=["fused", "bls"])
def served_cond(cond_bundle, request):
    """Both layouts; a queue delay at the fused router so concurrent requests meet in one batch,
    and a verbose log that says so."""
    b, layout = cond_bundle, request.param
    options = RepositoryOptions(
        max_batch=8, queue_delay_us=200_000, layout=layout, front_instances=4, max_queue=8, instances=1
    )
    repo = write_repository(b, b.path / f"triton-{layout}", options)
    with TritonServer(repo, log_path=b.path / f"triton-{layout}.log", verbose=1) as server:
        yield layout, server


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_labels_and_guidance_match_the_in_process_sampler(served_cond, in_process):
    _, server = served_cond
    req = GenerateRequest(num_images=3, steps=STEPS, seed=7, class_labels=[0, 2, 1], guidance_scale=3.0)
    http = generate(server.http_url, req)
    assert http.shape == (3, 32, 32, 1) and http.dtype == np.uint8
    assert np.array_equal(http, generate(server.grpc_url, req, protocol="grpc"))
    assert _close(http, in_process(3, 7, [0, 2, 1], 3.0))
    plain = generate(server.http_url, replace(req, guidance_scale=None))  # default 1: no guidance
    assert _close(plain, in_process(3, 7, [0, 2, 1]))
    assert not np.array_equal(plain, http)  # the scale alone changes them
    other = generate(server.http_url, replace(req, class_labels=[1, 0, 3]))  # 3: no class
    assert _close(other, in_process(3, 7, [1, 0, 3], 3.0))
    assert not np.array_equal(other, http)  # the labels alone change them


def test_the_stream_takes_labels_and_guidance(served_cond):
    _, server = served_cond
    req = GenerateRequest(num_images=2, steps=STEPS, seed=3, class_labels=[2, 0], guidance_scale=2.5)
    steps = []
    images = generate_stream(server.grpc_url, req, lambda *a: steps.append(a))
    assert [s for s, _, _ in steps] == list(range(1, STEPS + 1))
    assert np.array_equal(images, generate(server.http_url, req))
    with pytest.raises(StepadaptError, match="class_labels holds 1 labels for num_images=2"):
        generate_stream(server.grpc_url, replace(req, class_labels=[1]))


def test_concurrent_requests_with_their_own_labels_and_scales_keep_their_images(served_cond, in_process):
    """Different labels, counts and scales (one unguided) in one batch: every expert runs once per
    step for all their rows, and each request gets what it gets alone."""
    layout, server = served_cond
    asks = [(1, 5, [2], 4.0), (2, 6, [0, 1], None), (3, 8, [1, 1, 0], 1.5)]
    reqs = [GenerateRequest(num_images=n, steps=STEPS, seed=s, class_labels=y, guidance_scale=g)
            for n, s, y, g in asks]  # fmt: skip
    # A long request in flight throughout, so the three overlap with it however the threads are
    # scheduled (a busy machine can otherwise finish one before the next arrives).
    long = GenerateRequest(num_images=1, steps=200, seed=9, class_labels=[0], guidance_scale=2.0)
    with ThreadPoolExecutor(4) as pool:
        held = pool.submit(generate, server.http_url, long) if layout == "fused" else None
        got = list(pool.map(lambda r: generate(server.http_url, r), reqs))
        assert held is None or held.result().shape[0] == 1
    for (n, seed, labels, scale), images in zip(asks, got, strict=True):
        assert _close(images, in_process(n, seed, labels, scale)), (n, seed, labels, scale)
    if layout == "fused":  # the step engine had them in flight together (said once it is idle again)
        deadline = time.monotonic() + 10
        while not (in_flight := re.findall(r"at most (\d+) in flight", server.log_path.read_text())):
            assert time.monotonic() < deadline, "the engine never said its busy stretch"
            time.sleep(0.1)
        assert max(int(n) for n in in_flight) >= 2


def test_a_full_guided_request_keeps_to_the_experts_batch_size(served_cond, in_process):
    """8 images (the repository's max) at guidance 2 are 16 model rows a step: the bls router
    splits them over two calls to an expert whose max_batch_size is 8; the images do not change."""
    _, server = served_cond
    labels = [0, 1, 2, 3, 2, 1, 0, 0]
    req = GenerateRequest(num_images=8, steps=STEPS, seed=11, class_labels=labels, guidance_scale=2.0)
    assert _close(generate(server.http_url, req), in_process(8, 11, labels, 2.0))


def _refusal(server, **inputs) -> tuple[str, str]:
    """(HTTP status, message) of a request the endpoint refuses; raw tensors, so NaN and wrong
    counts reach the server as a client of any language could send them."""
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    types = {np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32"}
    tensors = []
    for name, value in inputs.items():
        a = np.asarray(value)
        t = th.InferInput(name, list(a.shape), types[a.dtype])
        t.set_data_from_numpy(a)
        tensors.append(t)
    client = th.InferenceServerClient(server.http_url)
    try:
        with pytest.raises(InferenceServerException) as e:
            client.infer("generate", tensors)
    finally:
        client.close()
    return e.value.status(), e.value.message()


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"class_labels": [0, 4]}, "class label 4 is out of range: this model knows 0..2 (and 3 for"),
        ({"class_labels": [-1, 0]}, "class label -1 is out of range"),
        ({"class_labels": [0]}, "class_labels holds 1 labels for num_images=2"),
        ({"class_labels": [0, 1, 2]}, "class_labels holds 3 labels for num_images=2"),
        ({}, "this bundle is class-conditional: send class_labels, one per image (0..2, or 3 for no class)"),
        ({"class_labels": [0, 1], "guidance_scale": [np.nan]}, "guidance_scale must be a finite number"),
        ({"class_labels": [0, 1], "guidance_scale": [np.inf]}, "guidance_scale must be a finite number"),
    ],
)
def test_a_bad_condition_is_a_one_line_400_and_the_server_keeps_serving(served_cond, inputs, message):
    _, server = served_cond
    arrays = {"num_images": np.array([2], np.int32), "steps": np.array([2], np.int32)}
    for name, value in inputs.items():
        arrays[name] = np.array(value, np.int32 if name == "class_labels" else np.float32)
    status, text = _refusal(server, **arrays)
    assert status == "400" and message in text and "\n" not in text, (status, text)
    ok = generate(server.http_url, GenerateRequest(num_images=1, steps=2, class_labels=[1]))
    assert ok.shape == (1, 32, 32, 1)


@pytest.mark.parametrize("served_cond", ["bls"], indirect=True)
def test_a_bls_expert_takes_labels_from_any_caller_and_checks_them(served_cond):
    """The experts are Triton models of their own in the bls layout: called directly, the U-Net
    takes one label per row (the null label too) and refuses others in one line."""
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    _, server = served_cond

    def call(labels):
        x = np.zeros((len(labels), 1, 32, 32), np.float32)
        arrays = [("sample", x, "FP32"), ("timestep", np.full((len(labels), 1), 100, np.float32), "FP32"),
                  ("class_labels", np.array(labels, np.int64).reshape(-1, 1), "INT64")]  # fmt: skip
        tensors = []
        for name, a, dtype in arrays:
            tensors.append(th.InferInput(name, list(a.shape), dtype))
            tensors[-1].set_data_from_numpy(a)
        with th.InferenceServerClient(server.http_url) as client:
            return client.infer("expert_g0", tensors).as_numpy("eps")

    assert call([0, 3]).shape == (2, 1, 32, 32)
    with pytest.raises(InferenceServerException, match=r"class label outside 0..3 \(3: no class\)") as e:
        call([1, 4])
    assert e.value.status() == "400"


def labels_in(model) -> bool:
    return (
        'name: "class_labels" data_type: TYPE_INT32 dims: [ -1 ] optional: true }'
        in (model / "config.pbtxt").read_text()
    )


def test_the_repository_declares_the_condition_inputs(cond_bundle, tmp_path):
    """Router configs take class_labels (ragged at the lockstep router, whose batches mix image
    counts) and guidance_scale, optional; an expert that takes labels has an INT64 input for them
    (GPU config too), the Gaussian has none."""
    bls = write_repository(cond_bundle, tmp_path / "b", RepositoryOptions(layout="bls"))
    fused = write_repository(
        cond_bundle, tmp_path / "f", RepositoryOptions(layout="fused", scheduling="lockstep")
    )
    step = write_repository(cond_bundle, tmp_path / "s", RepositoryOptions(layout="fused"))
    assert labels_in(step / "router") and "fill" not in (step / "generate" / "config.pbtxt").read_text()
    labels = 'name: "class_labels" data_type: TYPE_INT32 dims: [ -1 ] optional: true'
    scale = 'name: "guidance_scale" data_type: TYPE_FP32 dims: [ 1 ] optional: true'
    for config in (bls / "generate", bls / "generate_stream", fused / "generate", fused / "generate_stream"):
        text = (config / "config.pbtxt").read_text()
        assert labels + " }" in text and scale in text, config
    assert labels + " allow_ragged_batch: true }" in (fused / "router" / "config.pbtxt").read_text()
    fill = '"{\\"class_labels\\": [], \\"guidance_scale\\": [1.0]}"'  # what a request leaves out
    front = (fused / "generate" / "config.pbtxt").read_text()
    assert f'key: "fill" value: {{ string_value: {fill} }}' in front
    for name in ("g0", "g1"):
        cpu = (bls / f"expert_{name}" / "config.pbtxt").read_text()
        assert 'name: "class_labels" data_type: TYPE_INT64 dims: [ 1 ] }' in cpu
        assert 'key: "null_label" value: { string_value: "3" }' in cpu
        gpu = (bls / f"expert_{name}" / "configs" / "gpu.pbtxt").read_text()
        assert 'name: "class_labels" data_type: TYPE_INT64 dims: [ 1 ] reshape: { shape: [ ] } }' in gpu
    for config in ("config.pbtxt", "configs/gpu.pbtxt"):
        assert "class_labels" not in (bls / "expert_g2" / config).read_text()
    text = replace(cond_bundle.manifest, base_config={**cond_bundle.manifest.base_config,
                                                      "cross_attention_dim": 32})  # fmt: skip
    with pytest.raises(StepadaptError, match="conditioned on text but has no text encoder"):
        write_repository(Bundle(cond_bundle.path, text), tmp_path / "t")


def test_request_condition_rules():
    """What the router checks before a request joins a batch, without a server."""
    classes = Conditioning(classes=CLASSES)
    cond = request_condition(classes, 2, np.array([2, 3], np.int32), None)
    assert cond["class_labels"].dtype == torch.int64 and cond["class_labels"].tolist() == [2, 3]
    assert cond["guidance_scale"].tolist() == [1.0, 1.0]  # default: no guidance, rows stack with others
    assert request_condition(classes, 1, np.array([0]), 4.0)["guidance_scale"].tolist() == [4.0]
    assert request_condition(Conditioning(), 2, None, None) == {}
    for labels, scale, msg in [
        (np.array([0]), None, "class_labels given, but this bundle is not class-conditional"),
        (None, 2.0, "guidance_scale given, but this bundle is not class-conditional"),
    ]:
        with pytest.raises(StepadaptError, match=msg):
            request_condition(Conditioning(), 1, labels, scale)
    with pytest.raises(StepadaptError, match="guidance_scale must be a finite number, got nan"):
        request_condition(classes, 1, np.array([0]), float("nan"))
    assert _labels(None) is None and _labels([]).shape == (0,)
    assert _labels((1, 2)).dtype == np.int32
    for bad in ([0.5], [True], [2**40]):
        with pytest.raises(StepadaptError, match="class labels must be whole numbers"):
            _labels(bad)


def test_labels_survive_the_json_protocol(served_cond, in_process):
    """A client without tritonclient: plain HTTP/JSON with one label per image."""
    _, server = served_cond
    body = {
        "inputs": [
            {"name": "num_images", "shape": [1], "datatype": "INT32", "data": [2]},
            {"name": "steps", "shape": [1], "datatype": "INT32", "data": [STEPS]},
            {"name": "seed", "shape": [1], "datatype": "INT64", "data": [4]},
            {"name": "class_labels", "shape": [2], "datatype": "INT32", "data": [1, 2]},
            {"name": "guidance_scale", "shape": [1], "datatype": "FP32", "data": [2.0]},
        ]
    }
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/models/generate/infer", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())["outputs"][0]
    except urllib.error.HTTPError as e:
        raise AssertionError(e.read().decode()) from None
    images = np.asarray(out["data"], dtype=np.uint8).reshape(out["shape"])
    assert _close(images, in_process(2, 4, [1, 2], 2.0))
