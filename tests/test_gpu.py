"""The chain on a CUDA device: what runs on a GPU gives what the CPU gives, up to arithmetic.

These run only where torch sees a GPU (the device tool lends one to some tasks; CI has none):
the choice logic itself is tested on the CPU in test_cli.py and test_train.py.
"""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stepadapt.cli import app
from stepadapt.models import build_unet, save_base

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")

runner = CliRunner()


def _run(*args: str) -> None:
    r = runner.invoke(app, list(args))
    assert r.exit_code == 0, r.output


def test_analyze_prune_sample_on_cuda_match_the_cpu(tmp_path):
    save_base(build_unet("tiny", seed=0).eval(), tmp_path / "m")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (16, 28, 28), dtype=np.uint8))
    common = ["--base", str(tmp_path / "m"), "--data", str(tmp_path / "d.npz")]
    for dev in ("cpu", "cuda"):
        _run("analyze", *common, "--groups", "3", "--budget", "0.6", "--proxy-size", "8",
             "--gaussian", "off", "--device", dev, "--out", str(tmp_path / f"plan-{dev}.json"))  # fmt: skip
        _run("prune", *common, "--plan", str(tmp_path / f"plan-{dev}.json"), "--proxy-size", "4",
             "--candidates", "taylor/global", "--device", dev,
             "--out", str(tmp_path / f"b-{dev}"))  # fmt: skip
        _run("sample", "--bundle", str(tmp_path / f"b-{dev}"), "--n", "4", "--steps", "5", "--device", dev,
             "--out", str(tmp_path / f"s-{dev}.png"))  # fmt: skip
    plans = [json.loads((tmp_path / f"plan-{d}.json").read_text()) for d in ("cpu", "cuda")]
    cuts = [[(g["lo"], g["hi"]) for g in plan["groups"]] for plan in plans]
    assert cuts[0] == cuts[1]
    manifests = [json.loads((tmp_path / f"b-{d}" / "manifest.json").read_text()) for d in ("cpu", "cuda")]
    macs = [[e["macs"] for e in m["experts"]] for m in manifests]
    assert all(abs(a - b) <= 0.05 * a for a, b in zip(*macs, strict=True)), macs
    # the same CPU-drawn noise through the same bundle on either device
    _run("sample", "--bundle", str(tmp_path / "b-cpu"), "--n", "4", "--steps", "5", "--device", "cuda",
         "--out", str(tmp_path / "s-cpu-on-cuda.png"))  # fmt: skip
    a = np.load(tmp_path / "s-cpu.npz")["images"].astype(int)
    b = np.load(tmp_path / "s-cpu-on-cuda.npz")["images"].astype(int)
    assert np.abs(a - b).max() <= 2


def test_training_on_cuda_uses_mixed_precision_and_learns(tmp_path):
    from stepadapt.schedule import DEFAULT_SCHEDULER, make_scheduler
    from stepadapt.train import TrainConfig, denoising_loss, train

    x = torch.zeros(64, 1, 32, 32)
    x[:, :, 8:24, 8:24] = 1.0  # one square: learnable in a few steps
    g = torch.Generator().manual_seed(1)
    t, noise = torch.randint(0, 1000, (64,), generator=g), torch.randn(x.shape, generator=g)

    sched = make_scheduler("ddpm", DEFAULT_SCHEDULER)

    def loss(m):
        with torch.no_grad():
            return denoising_loss(m.cpu().eval(), sched, x, t, noise).item()

    model = build_unet("tiny", seed=0)
    before = loss(model)
    cfg = TrainConfig(iterations=30, batch_size=16, warmup=2, checkpoint_every=100)  # precision auto
    train(model, x, DEFAULT_SCHEDULER, cfg, tmp_path, progress=False, device="cuda")
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert loss(model) < 0.8 * before


def test_gaussian_analyze_and_both_finetune_modes_on_cuda(tmp_path):
    """The Gaussian's cut-off (base on the GPU, Gaussian on the CPU), the nested bundle, and
    fine-tuning each way under --precision auto (bf16/fp16 on a GPU), shared slices included."""
    save_base(build_unet("tiny", seed=0).eval(), tmp_path / "m")
    x = np.zeros((1100, 28, 28), dtype=np.uint8)  # more images than pixels: the Gaussian can be fitted
    rng = np.random.default_rng(0)
    for i in range(len(x)):
        a, b = rng.integers(2, 14, 2)
        x[i, a : a + 12, b : b + 12] = rng.integers(100, 256)
    np.savez(tmp_path / "d.npz", images=x)
    common = ["--base", str(tmp_path / "m"), "--data", str(tmp_path / "d.npz"), "--device", "cuda"]
    _run("analyze", *common, "--groups", "3", "--budget", "0.6", "--proxy-size", "16", "--gaussian", "700",
         "--out", str(tmp_path / "plan.json"))  # fmt: skip
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["groups"][-1]["kind"] == "gaussian"
    _run("prune", *common, "--plan", str(tmp_path / "plan.json"), "--proxy-size", "8", "--nested",
         "--candidates", "taylor/global", "--out", str(tmp_path / "b"))  # fmt: skip
    for mode in ("shared", "separate"):
        _run("finetune", str(tmp_path / "b"), "--data", str(tmp_path / "d.npz"), "--mode", mode,
             "--teacher", str(tmp_path / "m"), "--iterations", "6", "--batch-size", "8",
             "--device", "cuda")  # fmt: skip
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert any(e.get("training") for e in manifest["experts"])
