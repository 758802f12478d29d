"""benchmarks/sd15.py: the SD 1.5-architecture benchmark's whole chain (base, the real analyze and
prune, the checks, ONNX export with parity, interleaved onnxruntime timing, the report and its
section of the page) on a scaled-down SD-like U-Net; and the two pieces a model of SD's size needs
that a small one never reaches: the head check that stops a broken bundle, and ONNX weights in one
external data file (protobuf stops at 2 GiB)."""

import json

import numpy as np
import onnx
import pytest
import torch
from diffusers import UNet2DConditionModel
from stepadapt.benchmarks import sd15

from stepadapt.io import read_json

# SD 1.5's blocks (cross-attention levels, a plain level, 77-token text) at toy widths and one level
# fewer: each extra level costs seconds in every DepGraph trace and ONNX export.
TEST_CONFIG = {
    **sd15.QUICK_CONFIG,
    "sample_size": 8,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """One run in this process (the chain's CLI stages still run as subprocesses), its report
    written as main() writes it and its section put into a page twice. One thread everywhere: a toy
    model's ops are too small for two, and on a busy 2-core machine two threads wait on each other
    (measured: prune_once 10 x slower)."""
    root = tmp_path_factory.mktemp("sd15")
    s = sd15.Sd15Settings.quick_run(str(root / "work"))
    s.config, s.isolate, s.repeats = dict(TEST_CONFIG), False, 2
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        try:
            report = sd15.run(s, "python -m benchmarks.sd15 --test", log=lambda _: None)
        finally:
            torch.set_num_threads(threads)
    out = root / "sd15.json"
    out.write_text(json.dumps(report))
    docs = root / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## ddpm-cifar10-experts\n\nkept\n")
    sd15.main(["--docs-only", "--out-json", str(out), "--docs", str(docs)])
    sd15.main(["--docs-only", "--out-json", str(out), "--docs", str(docs)])  # replaces, never appends
    return s, read_json(out), docs.read_text()


@pytest.mark.slow
def test_prunes_into_four_experts_at_half_the_macs_with_whole_heads(ran):
    s, r, _ = ran
    c = r["checks"]
    assert c["experts"] == 4 and c["experts_ok"] and c["mean_ok"]
    assert abs(r["trajectory"]["mac_ratio"] - 0.5) <= 0.05 * 0.5
    assert c["attention_problems"] == []
    pruned = [x for x in c["per_expert"] if not x["is_base"]]
    assert pruned and all(x["attention"]["cross"] >= 2 and x["attention"]["narrowed"] > 0 for x in pruned)
    assert sum(e["visit_share"] for e in r["experts"]) == pytest.approx(1.0)
    assert all(0 < e["mac_ratio"] <= 1 and 0 < e["mac_ratio_77"] <= 1 for e in r["experts"])


@pytest.mark.slow
def test_experts_pass_onnx_parity_and_are_timed_against_the_base(ran):
    s, r, _ = ran
    p = r["parity"]
    assert set(p["experts"]) == {e["name"] for e in r["experts"]}
    assert all(v["max_abs_err"] <= p["atol"] for v in p["experts"].values())
    for e in r["experts"]:
        lat = e["latency"]["t1"]
        assert lat["median_ms"] > 0 and 0 < lat["round_ratio_min"] <= lat["round_ratio_max"]
        if e["is_base"]:
            assert lat["latency_ratio"] == 1.0  # the base itself: timed once, as the base
    assert len(r["base"]["latency"]["t1"]) and r["trajectory"]["latency_ratio"]["t1"] > 0
    assert set(r["stages"]) == {"base", "analyze", "prune", "check", "export", "time"}
    assert all(v["wall_s"] >= 0 and v["peak_rss_gb"] > 0 for v in r["stages"].values())
    assert r["machine"]["cpu"] and r["machine"]["cores"]
    assert r["command"].startswith("python -m benchmarks.sd15")


@pytest.mark.slow
def test_the_section_names_its_command_and_machine_once(ran):
    s, r, page = ran
    assert page.startswith("# Benchmarks\n\n## ddpm-cifar10-experts\n\nkept\n")
    assert page.count(sd15.BEGIN) == 1 and page.count(sd15.END) == 1 and page.count(sd15.TITLE) == 1
    section = page.split(sd15.BEGIN)[1]
    assert r["command"] in section and r["machine"]["cpu"] in section
    assert ("not run: no GPU lent" in section) == (not torch.cuda.is_available())
    assert "trajectory mean" in section and f"{r['trajectory']['latency_ratio']['t1']:.3f}" in section


def test_a_rerun_reuses_the_stages_made_with_the_same_settings(tmp_path):
    s = sd15.Sd15Settings.quick_run(str(tmp_path))
    work = sd15.Work(tmp_path)
    work.reset_if_changed(s)
    (work.stages).mkdir()
    work.stage("prune").write_text("{}")
    work.reset_if_changed(s)
    assert work.stage("prune").is_file()
    s.proxy_size += 1
    work.reset_if_changed(s)
    assert not work.stage("prune").exists()


def _text_unet() -> UNet2DConditionModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel(**{**TEST_CONFIG, "sample_size": 8}).eval()


def test_the_head_check_names_what_pruning_broke():
    base = _text_unet()
    heads = sd15.attention_of(base)
    problems, counts = sd15.attention_problems(heads, base, 32)
    assert problems == [] and counts["attentions"] == 2 * counts["cross"] > 0 and counts["narrowed"] == 0
    name, attn = next((n, m) for n, m in base.named_modules() if getattr(m, "is_cross_attention", False))
    attn.to_k = torch.nn.Linear(16, attn.to_k.out_features, bias=False)  # a text width pruned away
    attn.heads = 2
    problems, _ = sd15.attention_problems(heads, base, 32)
    assert len(problems) == 1 and problems[0].startswith(f"{name}: 2 heads (base 4)")


def test_weights_in_per_tensor_files_gather_into_one_data_file(tmp_path):
    """What torch's exporter writes for a model over 2 GiB (a file per tensor) becomes the graph
    and one ``.onnx.data`` file that onnxruntime runs as before."""
    from stepadapt.export.onnx import _gather_external_data, export_model, external_data_path
    from stepadapt.export.runtime import session

    model = _text_unet()
    whole = export_model(model, tmp_path / "whole.onnx")
    assert not external_data_path(whole).exists()
    scattered = tmp_path / "scattered" / "m.onnx"
    scattered.parent.mkdir()
    onnx.save_model(onnx.load(str(whole)), str(scattered), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)  # fmt: skip
    assert len(list(scattered.parent.iterdir())) > 10
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    _gather_external_data(scattered, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert out.stat().st_size < whole.stat().st_size / 4
    onnx.checker.check_model(str(out))
    feed = {"sample": np.ones((2, 4, 8, 8), np.float32), "timestep": np.array([3.0, 900.0], np.float32),
            "encoder_hidden_states": np.ones((2, 5, 32), np.float32)}  # fmt: skip
    ref, got = (session(p, 1, device="cpu").run(["eps"], feed)[0] for p in (whole, out))
    np.testing.assert_array_equal(got, ref)
