import shutil
from pathlib import Path

import pytest
import torch

from stepadapt import StepadaptError
from stepadapt.bundle import Bundle
from stepadapt.finetune import finetune_bundle, iteration_budgets
from stepadapt.importance import ProxyBatch, proxy_loss
from stepadapt.train import TrainConfig, min_snr_weight


def test_min_snr_weights_are_the_published_formulas():
    snr = torch.tensor([0.1, 5.0, 100.0])
    assert torch.allclose(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.05]))
    assert torch.allclose(min_snr_weight(snr, 5.0, "v_prediction"), torch.tensor([0.1 / 1.1, 5 / 6, 5 / 101]))
    assert torch.allclose(min_snr_weight(snr, 5.0, "sample"), torch.tensor([0.1, 5.0, 5.0]))
    with pytest.raises(StepadaptError):
        min_snr_weight(snr, 5.0, "flow")


def test_budgets_follow_interval_length(tiny_bundle):
    experts = Bundle.load(tiny_bundle).experts
    b = iteration_budgets(experts, 1000)
    for e in experts:
        assert abs(b[e.name] - 1000 * (e.hi - e.lo) / 1000) <= 1
    with pytest.raises(StepadaptError):
        iteration_budgets(experts, 2)


@pytest.mark.slow
def test_short_finetune_lowers_each_experts_loss_on_its_interval(tiny_bundle, tmp_path, squares):
    d = tmp_path / "b"
    shutil.copytree(tiny_bundle, d)
    b = Bundle.load(d)
    x = squares()
    sched = b.manifest.scheduler
    before = {
        e.name: proxy_loss(b.load_expert(e.name), sched, ProxyBatch.draw(x, e.lo, e.hi, 5))
        for e in b.experts
        if e.kind == "unet"
    }
    b.expert("g1").onnx = {"path": "onnx/g1.onnx", "sha256": "x"}  # stale export must be dropped
    unpruned, closed_form = b.expert("g0").sha256, b.expert("g3").sha256
    cfg = TrainConfig(batch_size=16, lr=2e-3, warmup=2, ema_decay=0.0, checkpoint_every=100)
    finetune_bundle(b, x, cfg, 60, mode="separate", progress=False)
    again = Bundle.load(d)  # checksums of the new weights verify
    assert again.expert("g0").sha256 == unpruned and again.expert("g0").training is None  # it is the base
    assert again.expert("g3").sha256 == closed_form and again.expert("g3").training is None  # Gaussian
    for e in again.experts[1:3]:
        after = proxy_loss(again.load_expert(e.name), sched, ProxyBatch.draw(x, e.lo, e.hi, 5))
        assert after < before[e.name], (e.name, before[e.name], after)
        assert e.training["t_lo"] == e.lo and e.training["t_hi"] == e.hi and e.training["mode"] == "separate"
        assert e.onnx is None
    assert (d / "finetune" / "g1" / "checkpoint.pt").is_file()


def test_distillation_needs_a_teacher(tiny_bundle, tmp_path, squares):
    d = tmp_path / "b"
    shutil.copytree(tiny_bundle, d)
    cfg = TrainConfig(batch_size=4, distill=0.5)
    with pytest.raises(StepadaptError, match="teacher"):
        finetune_bundle(Bundle.load(d), squares(8), cfg, 3, mode="separate", progress=False)


@pytest.mark.slow
def test_torchrun_two_gloo_processes_finetune_one_expert(tiny_bundle, tmp_path, squares):
    """Real DDP: torchrun starts 2 CPU processes (gloo); weights stay identical across them and land once."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np

    d = tmp_path / "b"
    shutil.copytree(tiny_bundle, d)
    x = squares(32)
    np.savez(tmp_path / "sq.npz", images=((x[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy())
    before = Bundle.load(d).expert("g1").sha256
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "--no-python",
         str(Path(sys.executable).with_name("stepadapt")), "finetune", str(d),
         "--data", str(tmp_path / "sq.npz"), "--expert", "g1", "--iterations", "12",
         "--batch-size", "8", "--sampler", "loss-moment", "--device", "cpu", "--mode", "separate",
         "--distill", "0"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    b = Bundle.load(d)  # checksums of what rank 0 wrote verify
    g1 = b.expert("g1")
    assert g1.sha256 != before and g1.training["world_size"] == 2
    log = json.loads((d / "finetune" / "g1" / "train_log.json").read_text())
    assert log["world_size"] == 2 and log["steps"] == g1.training["steps"]
    assert r.stdout.count("bundle updated") == 1  # only rank 0 reports


@pytest.mark.slow
def test_two_finetune_processes_on_one_bundle_both_land(tiny_bundle, tmp_path, squares):
    """One `finetune --expert` job per expert, started together (what the README suggests): each
    re-reads the manifest under a lock and adds its own expert, so neither undoes the other."""
    import os
    import subprocess
    import sys

    import numpy as np

    d = tmp_path / "b"
    shutil.copytree(tiny_bundle, d)
    x = squares(32)
    np.savez(tmp_path / "sq.npz", images=((x[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy())
    before = {n: Bundle.load(d).expert(n).sha256 for n in ("g1", "g2")}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    exe = str(Path(sys.executable).with_name("stepadapt"))
    args = ["--data", str(tmp_path / "sq.npz"), "--iterations", "8", "--batch-size", "8",
            "--device", "cpu", "--distill", "0", "--threads", "1"]  # fmt: skip
    jobs = [
        subprocess.Popen(
            [exe, "finetune", str(d), "--expert", name, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )  # fmt: skip
        for name in ("g1", "g2")
    ]
    outputs = [j.communicate(timeout=300)[0] for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    b = Bundle.load(d)  # every checksum verifies: no job restored the other's stale entry
    for name in ("g1", "g2"):
        assert b.expert(name).sha256 != before[name] and b.expert(name).training is not None


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_weights_of_an_uninterrupted_run(tiny_bundle, tmp_path, squares):
    """A real `finetune` process killed with SIGKILL after a checkpoint, then `--resume`: the expert
    lands with exactly the weights of a run that was never interrupted."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    x = squares(32)
    np.savez(tmp_path / "sq.npz", images=((x[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy())
    exe = str(Path(sys.executable).with_name("stepadapt"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--expert", "g1", "--data", str(tmp_path / "sq.npz"), "--iterations", "300", "--batch-size", "8",
            "--device", "cpu", "--distill", "0", "--threads", "1", "--checkpoint-every", "20"]  # fmt: skip
    runs = {}
    for name in ("whole", "killed"):
        runs[name] = tmp_path / name
        shutil.copytree(tiny_bundle, runs[name])
    before = Bundle.load(runs["killed"]).expert("g1").sha256
    job = subprocess.Popen([exe, "finetune", str(runs["killed"]), *args], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ckpt = runs["killed"] / "finetune" / "g1" / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    assert job.wait(30) == -signal.SIGKILL  # killed mid-run, not finished
    assert Bundle.load(runs["killed"]).expert("g1").sha256 == before
    from stepadapt.io import load_torch

    at = int(load_torch(ckpt)["step"])
    assert at > 0
    for name, extra in (("killed", ["--resume"]), ("whole", [])):
        r = subprocess.run([exe, "finetune", str(runs[name]), *args, *extra], env=env, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    whole, resumed = (Bundle.load(runs[n]).load_expert("g1").state_dict() for n in ("whole", "killed"))
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    assert Bundle.load(runs["killed"]).expert("g1").sha256 != before
    log, whole_log = (json.loads((runs[n] / "finetune" / "g1" / "train_log.json").read_text())
                      for n in ("killed", "whole"))  # fmt: skip
    assert log["resumed_from"] == at and whole_log["resumed_from"] == 0  # it continued, not started over
    assert log["steps"] == whole_log["steps"] > at
