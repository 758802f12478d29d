"""A tiny random Stable Diffusion pipeline through the whole chain on caption data: analyze ->
prune (2 and 4 groups at 0.5 x) -> finetune -> export -> serve -> generate with a prompt, the
endpoint equal to the in-process sampler and to StepAdaptivePipeline."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from stepadapt.export.onnx import onnx_router
from stepadapt.serving.client import Endpoint, GenerateRequest
from stepadapt.serving.repository import RepositoryOptions, write_repository
from stepadapt.serving.server import TritonServer
from tiny_sd import write_tiny_pipeline
from typer.testing import CliRunner

from stepadapt import StepadaptError
from stepadapt.api import StepAdaptivePipeline
from stepadapt.bundle import Bundle
from stepadapt.captions import class_prompt, load_captioned
from stepadapt.cli import app
from stepadapt.data import fashion_mnist_labels, load_fashion_mnist

pytestmark = pytest.mark.slow
STEPS = 5


def write_captioned_folder(root, n_train: int = 64, n_test: int = 16):
    """Fashion-MNIST images as PNGs with captions: train/ by a metadata.jsonl, test/ by .txt files."""
    x = ((load_fashion_mnist("train", 28)[: n_train + n_test] + 1) * 127.5).round().byte()
    y = fashion_mnist_labels("train")[: n_train + n_test]
    for split, rows in (("train", range(n_train)), ("test", range(n_train, n_train + n_test))):
        d = root / split
        d.mkdir(parents=True)
        meta = []
        for i in rows:
            Image.fromarray(x[i, 0].numpy()).save(d / f"{i:04d}.png")
            caption = class_prompt(int(y[i]), i)
            if split == "train":
                meta.append(json.dumps({"file_name": f"{i:04d}.png", "text": caption}))
            else:
                (d / f"{i:04d}.txt").write_text(caption + "\n")
        if meta:
            (d / "metadata.jsonl").write_text("\n".join(meta) + "\n")
    return root


def _cli(*args: str) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("sdchain")
    pipe, data = write_tiny_pipeline(root / "pipe"), write_captioned_folder(root / "data")
    bundles = {}
    for groups in (2, 4):
        plan, out = root / f"plan{groups}.json", root / f"experts{groups}"
        _cli("analyze", "--base", pipe, "--data", data, "--groups", groups, "--budget", 0.5,
             "--proxy-size", 8, "--out", plan)  # fmt: skip
        _cli("prune", "--base", pipe, "--data", data, "--plan", plan, "--candidates", "magnitude/local",
             "--proxy-size", 8, "--out", out)  # fmt: skip
        bundles[groups] = out
    out = bundles[4]
    _cli("finetune", out, "--data", data, "--iterations", 4, "--batch-size", 8, "--distill", 0.5)
    _cli("export", out)
    return pipe, data, bundles


def test_pruned_text_bundles_keep_the_budget_heads_and_surround(chain):
    pipe, data, bundles = chain
    for groups, path in bundles.items():
        b = Bundle.load(path)
        assert len(b.experts) <= groups and b.manifest.conditioning.text_dim == 32
        assert abs(b.manifest.trajectory_macs_ratio() - 0.5) <= 0.025, groups
        assert set(b.manifest.pipeline) == {"vae", "text_encoder", "tokenizer"}
        assert b.image_shape == (1, 32, 32) and tuple(b.manifest.sample_shape) == (4, 8, 8)
        plan = b.manifest.plan
        assert all(g["kind"] == "unet" for g in plan["groups"])  # no Gaussian for free text, and why
        assert plan["gaussian"]["rule"] == "none" and "text-conditional" in plan["gaussian"]["why"]
    b = Bundle.load(bundles[4])
    assert any(e.training for e in b.experts)  # fine-tuned on the captioned folder
    assert set(b.manifest.surround_onnx) == {"text_encoder", "vae_decoder"}
    x, texts = load_captioned(str(data), "train", 32, 1)
    assert len(x) == 64 and texts[0] == class_prompt(int(fashion_mnist_labels("train")[0]), 0)


def test_bundle_samples_as_the_pipeline_api_in_torch_and_onnxruntime(chain, tmp_path):
    _, _, bundles = chain
    path = bundles[4]
    pipe = StepAdaptivePipeline.from_bundle(path)
    kw = dict(num_inference_steps=STEPS, guidance_scale=3.0, num_images_per_prompt=2, output_type="uint8")
    want = pipe("a photo of a bag", generator=torch.Generator().manual_seed(3), **kw).images
    onnx = StepAdaptivePipeline.from_bundle(
        path, denoiser=onnx_router(Bundle.load(path), threads=1, device="cpu")
    )
    got = onnx("a photo of a bag", generator=torch.Generator().manual_seed(3), **kw).images
    assert np.abs(want.astype(int) - got.astype(int)).max() <= 2
    out = tmp_path / "s.png"
    _cli("sample", "--bundle", path, "--prompt", "a photo of a bag", "--guidance-scale", 3, "--steps", STEPS,
         "--n", 2, "--seed", 3, "--out", out)  # fmt: skip
    assert np.array_equal(np.load(out.with_suffix(".npz"))["images"], want)


@pytest.fixture(scope="module", params=["fused", "bls"])
def served_text(chain, request):
    """fused: text encoder, experts and VAE decoder in the step engine's process; bls: each a Triton
    model of its own, the router's steps BLS calls to them."""
    path = chain[2][4]
    b = Bundle.load(path)
    o = RepositoryOptions(max_batch=8, front_instances=4, instances=1, layout=request.param)
    repo = write_repository(b, path / f"triton-{request.param}", o)
    if request.param == "bls":  # the parts are models of their own; the router keeps the tokenizer
        assert {"text_encoder", "vae_decoder"} <= {p.name for p in repo.iterdir()}
        kept = {p.name for p in (repo / "generate" / "1" / "bundles" / b.path.name).iterdir()}
        assert "tokenizer" in kept and not any(k.endswith(".onnx") for k in kept)
        assert "encoder_hidden_states" in (repo / "expert_g0" / "config.pbtxt").read_text()
    with TritonServer(repo, log_path=path / f"triton-{request.param}.log") as server:
        yield b, server


def _request(prompt, seed, scale, negative=None, n=2):
    return GenerateRequest(num_images=n, steps=STEPS, seed=seed, sampler="ddim", prompt=prompt,
                           negative_prompt=negative, guidance_scale=scale)  # fmt: skip


def test_the_endpoint_answers_prompts_as_the_in_process_sampler(served_text):
    """Concurrent requests with their own prompts, negatives and scales each get their in-process
    images (within 2/255): the text encoder per request, the VAE per image, steps shared."""
    b, server = served_text
    pipe = StepAdaptivePipeline.from_bundle(b.path)
    asks = [("a photo of a bag", 0, 3.0, None), ("an ankle boot", 1, 5.0, "a bag"), ("a dress", 2, 1.0, None)]

    def ask(a):  # a client per thread: one HTTP connection is not shared between threads
        with Endpoint(server.http_url) as e:
            return e.infer(_request(*a))

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(ask, asks))
    for (prompt, seed, scale, negative), got in zip(asks, answers, strict=True):
        g = torch.Generator().manual_seed(seed)
        kw = dict(num_inference_steps=STEPS, num_images_per_prompt=2, sampler="ddim", output_type="uint8")
        want = pipe(prompt, negative, guidance_scale=scale, generator=g, **kw).images
        assert got.images.shape == (2, 32, 32, 1) and not got.truncated
        assert np.abs(got.images.astype(int) - want.astype(int)).max() <= 2, prompt


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(prompt=None), "send a prompt"),
        (dict(prompt="a bag", guidance_scale=float("nan")), "finite"),
    ],
)
def test_a_bad_text_request_is_a_one_line_400_and_the_server_keeps_serving(served_text, change, message):
    _, server = served_text
    with Endpoint(server.http_url) as e:
        with pytest.raises(StepadaptError, match=message):
            e.infer(GenerateRequest(num_images=1, steps=2, **change))
        long = " ".join(["a photo of a coat"] * 8)
        ok = e.infer(GenerateRequest(num_images=1, steps=2, prompt=long))
    assert ok.images.shape == (1, 32, 32, 1) and ok.truncated


def test_a_prompt_that_is_not_utf8_is_a_400(served_text):
    """Bytes that are not UTF-8, sent raw (KServe v2 binary tensor data), are refused in one line."""
    import struct
    import urllib.error
    import urllib.request

    _, server = served_text
    payload = b"\xff\xfe\xfa"
    data = struct.pack("<I", len(payload)) + payload
    header = json.dumps({"inputs": [
        {"name": "prompt", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(data)}},
        {"name": "steps", "datatype": "INT32", "shape": [1], "data": [2]},
    ]}).encode()  # fmt: skip
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    url = f"http://{server.http_url}/v2/models/generate/infer"
    req = urllib.request.Request(url, data=header + data, headers=headers)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400 and "not UTF-8" in e.value.read().decode()
