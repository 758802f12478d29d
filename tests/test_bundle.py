import json
import shutil

import pytest
import torch

from stepadapt import StepadaptError
from stepadapt.bundle import Bundle
from stepadapt.importance import Memory
from stepadapt.models import build_unet
from stepadapt.prune import count_macs


@pytest.fixture
def bundle_dir(tiny_bundle):
    return tiny_bundle


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_bundle_round_trip_is_exact(bundle_dir):
    b = Bundle.load(bundle_dir)
    assert [e.name for e in b.experts] == ["g0", "g1", "g2", "g3"]
    assert [e.kind for e in b.experts] == ["unet"] * 3 + ["gaussian"]
    assert b.manifest.boundaries[0] == 0 and b.manifest.boundaries[-1] == 1000
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([5, 10])
    for e in b.experts[:3]:
        m1, m2 = b.load_expert(e.name), Bundle.load(bundle_dir).load_expert(e.name)
        with torch.no_grad():
            y1, y2 = m1(x, t).sample, m2(x, t).sample
        assert y1.shape == x.shape and torch.equal(y1, y2)
        assert count_macs(m1)[0] == e.macs
    # Experts really differ in size: the hardest group keeps the most compute.
    macs = [e.macs for e in b.experts]
    assert macs[0] > macs[2] > macs[3] == 2 * 1024**2


def test_gaussian_expert_round_trips_and_its_budget_goes_to_the_unets(bundle_dir):
    """The Gaussian's 2% leaves the U-Nets more than the 0.45 budget on average."""
    b = Bundle.load(bundle_dir)
    g = b.expert("g3")
    assert g.timesteps == (700, 1000) and not b.is_pruned("g3")
    with pytest.raises(StepadaptError, match="no pruning structure"):
        b.structure("g3")
    den = b.load_expert("g3")
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([700, 850, 999])
    assert torch.equal(b.router()(x, t), den(x, t))
    m = b.manifest
    assert m.trajectory_macs_ratio() == pytest.approx(0.45, abs=0.03)
    shares = m.visit_shares()
    unet_mean = sum(s * e.macs for s, e in zip(shares[:3], b.experts[:3], strict=True)) / sum(shares[:3])
    assert unet_mean / m.base_macs > 0.45 + 0.2 * shares[3]


def test_unknown_expert_kind_is_refused(bundle_dir, tmp_path):
    d = _copy(bundle_dir, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["experts"][3]["kind"] = "oracle"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        StepadaptError,
        match=r"experts\[3\]\.kind must be one of unet, gaussian, class-gaussian, got 'oracle'",
    ):
        Bundle.load(d)


def test_router_from_bundle_runs_every_step(bundle_dir):
    r = Bundle.load(bundle_dir).router()
    y = r(torch.randn(3, 1, 32, 32), torch.tensor([0, 500, 999]))
    assert y.shape == (3, 1, 32, 32) and torch.isfinite(y).all()


def test_gap_and_overlap_are_refused(bundle_dir, tmp_path):
    d = _copy(bundle_dir, tmp_path)
    man = json.loads((d / "manifest.json").read_text())
    man["experts"][1]["timesteps"][0] += 5
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StepadaptError, match="no expert covers"):
        Bundle.load(d)
    man["experts"][1]["timesteps"][0] -= 10
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StepadaptError, match="overlap"):
        Bundle.load(d)


def test_checksum_and_missing_file_are_refused(bundle_dir, tmp_path):
    d = _copy(bundle_dir, tmp_path)
    w = d / "experts" / "g1.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(StepadaptError, match="checksum"):
        Bundle.load(d)
    w.unlink()
    with pytest.raises(StepadaptError, match="missing"):
        Bundle.load(d)


def test_weights_that_do_not_fit_the_structure_are_refused(bundle_dir, tmp_path):
    d = _copy(bundle_dir, tmp_path)
    shutil.copy(d / "experts" / "g2.safetensors", d / "experts" / "g0.safetensors")
    b = Bundle.load(d, verify=False)
    with pytest.raises(StepadaptError, match="do not match its structure"):
        b.load_expert("g0")


def test_not_a_bundle(tmp_path):
    with pytest.raises(StepadaptError, match="not found"):
        Bundle.load(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(StepadaptError, match="not a stepadapt bundle"):
        Bundle.load(tmp_path)


@pytest.mark.slow
def test_memory_bank_makes_reruns_cheap(bundle_dir, tiny, tmp_path, monkeypatch):
    import stepadapt.importance as imp
    from stepadapt.prune import count_macs
    from stepadapt.schedule import DEFAULT_SCHEDULER

    assert len(Memory(bundle_dir.with_name("memory.json")).entries) == 3  # one per group, on disk
    x = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cand = (imp.Candidate("magnitude", False),)
    target = 0.6 * count_macs(tiny)[0]

    def search(base, data):
        return imp.search_group(base, DEFAULT_SCHEDULER, 0, 500, target, data, data, candidates=cand,
                                memory=Memory(tmp_path / "memory.json"))  # fmt: skip

    first = search(tiny, x)
    pruned = []
    real = imp.prune_to_macs
    monkeypatch.setattr(imp, "prune_to_macs", lambda *a, **k: pruned.append(1) or real(*a, **k))
    again = search(tiny, x)
    assert pruned == [], "a rerun must come from the memory bank, not prune again"
    assert again.best.history == first.best.history and again.proxy_loss == first.proxy_loss
    search(tiny, -x)  # same count, other images: not the same search
    assert pruned == [1]
    changed = build_unet("tiny", seed=0).eval()
    with torch.no_grad():
        changed.conv_out.weight.view(-1)[-1] += 1.0  # far past any tensor's first values
    search(changed, x)
    assert pruned == [1, 1]


def test_half_precision_weights_load_back_as_float32(tiny_bundle, tmp_path):
    d = tmp_path / "b"
    shutil.copytree(tiny_bundle, d)
    full = Bundle.load(d).load_expert("g1").state_dict()
    size = (d / Bundle.load(d).expert("g1").weights).stat().st_size
    b = Bundle.load(d)
    b.cast_weights(torch.float16)
    again = Bundle.load(d)  # checksums were updated
    assert (d / again.expert("g1").weights).stat().st_size < 0.6 * size
    half = again.load_expert("g1").state_dict()
    for k, v in full.items():
        assert half[k].dtype == torch.float32
        assert torch.allclose(half[k], v, rtol=1e-3, atol=1e-4)


def test_neighbouring_copies_of_one_network_are_stored_once(tiny, tmp_path):
    """Two groups that both got the whole base become one expert over both intervals."""
    from stepadapt.bundle import ExpertDraft, Manifest, save_bundle
    from stepadapt.models import clean_config
    from stepadapt.schedule import DEFAULT_SCHEDULER

    def spec(name, lo, hi):
        return ExpertDraft(
            name=name, timesteps=(lo, hi), snr_db=(float(-hi), float(-lo)), target_macs=1, macs=1, params=1
        )

    other = type(tiny)(**tiny.config)  # same structure, other weights: must stay apart
    experts = [spec("a", 0, 100), spec("b", 100, 400), spec("c", 400, 1000)]
    m = Manifest(
        base_config=clean_config(tiny), scheduler=dict(DEFAULT_SCHEDULER), sample_shape=(1, 32, 32),
        base_macs=1, base_params=1, experts=[],
    )  # fmt: skip
    save_bundle(tmp_path / "b", m, experts, {"a": (tiny, []), "b": (tiny, []), "c": (other, [])})
    b = Bundle.load(tmp_path / "b")
    assert [(e.name, e.timesteps) for e in b.experts] == [("a", (0, 400)), ("c", (400, 1000))]
    assert b.experts[0].snr_db == (-400.0, -0.0)
    assert sorted(p.name for p in (tmp_path / "b" / "experts").glob("*.safetensors")) == [
        "a.safetensors", "c.safetensors"]  # fmt: skip


def _set(m, path, value):
    *head, last = path
    for k in head:
        m = m[k]
    if value is DELETE:
        del m[last]
    else:
        m[last] = value


DELETE = object()


@pytest.mark.parametrize("path, value, message", [
    (("experts", 1, "weights"), "../../etc/passwd", r"experts\[1\]\.weights must be a relative path inside"),
    (("experts", 1, "weights"), "/etc/passwd", r"experts\[1\]\.weights must be a relative path inside"),
    (("experts", 0, "structure"), "experts/../../x.json", r"experts\[0\]\.structure must be a relative path"),
    (("experts", 2, "onnx"), {"path": "/tmp/x.onnx", "sha256": "0" * 64}, r"onnx\.path must be"),
    (("experts", 2, "trt"), {"path": "trt/x.plan", "sha256": "nope"}, r"trt\.sha256 must be"),
    (("experts", 1, "name"), 'g1"\ninput [', r"experts\[1\]\.name must be 1-64 of"),
    (("experts", 1, "name"), "../g1", r"experts\[1\]\.name must be 1-64 of"),
    (("experts", 0, "timesteps"), [5], r"experts\[0\]\.timesteps must be two integers 0 <= lo < hi <= 1000"),
    (("experts", 0, "timesteps"), ["0", "187"], r"experts\[0\]\.timesteps must be two integers"),
    (("experts", 0, "macs"), "many", r"experts\[0\]\.macs must be an integer >= 0"),
    (("scheduler", "num_train_timesteps"), DELETE, r"scheduler\.num_train_timesteps must be an integer >= 2"),
    (("sample_shape",), [1, 32], r"sample_shape must be three positive integers"),
    (("experts",), {}, r"experts must be a list"),
])  # fmt: skip
def test_a_manifest_is_untrusted_input(bundle_dir, tmp_path, path, value, message):
    """Every violation is refused in one line naming the field, before any file is touched."""
    d = _copy(bundle_dir, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    _set(m, path, value)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StepadaptError, match=message) as e:
        Bundle.load(d)
    assert "\n" not in str(e.value) and str(e.value).startswith("bundle manifest: ")


def test_a_symlink_out_of_the_bundle_is_refused(bundle_dir, tmp_path):
    d = _copy(bundle_dir, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    target = d / m["experts"][1]["weights"]
    outside = tmp_path / "outside.safetensors"
    target.rename(outside)
    target.symlink_to(outside)
    with pytest.raises(StepadaptError, match="points outside the bundle"):
        Bundle.load(d)
