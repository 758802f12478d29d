"""The chain as library stages: options that round-trip, a plan that hands its Gaussian forward, a
bundle that knows its base, held-out data that stays held out, and the shipped images unchanged."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stepadapt import StepadaptError
from stepadapt.analyze import AnalyzeOptions, analyze
from stepadapt.bundle import Bundle
from stepadapt.compress import PruneOptions, prune
from stepadapt.finetune import FinetuneOptions, finetune
from stepadapt.models import build_unet, save_base, weights_sha256
from stepadapt.train_base import TrainBaseOptions

DATA = Path(__file__).parent / "data"
SHIPPED = Path(__file__).resolve().parents[1] / "stepadapt" / "weights" / "fashion-tiny-experts"


def _npz(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, images=rng.integers(0, 256, (n, 32, 32), dtype=np.uint8))
    return path


@pytest.mark.parametrize(
    "options",
    [
        AnalyzeOptions(boundaries=(0, 300, 1000), sizes=(0.3,), gaussian="600"),
        PruneOptions(out=Path("b"), memory=Path("m.json"), candidates=("magnitude/local",)),
        FinetuneOptions(bundle=Path("b"), expert=("g0", "g1"), teacher=Path("t"), timestep_sampler="visited"),
        TrainBaseOptions(size=16, channels=3, limit=100),
    ],
    ids=lambda o: type(o).__name__,
)
def test_stage_options_round_trip_through_json(options):
    again = type(options).from_json(options.to_json())
    assert again == options and again.to_dict() == options.to_dict()


def test_options_refuse_what_they_cannot_run():
    with pytest.raises(StepadaptError, match="--gaussian must be"):
        AnalyzeOptions(gaussian="soon")
    with pytest.raises(StepadaptError, match="unknown measure"):
        AnalyzeOptions(measure="vibes")
    with pytest.raises(StepadaptError, match="bad candidate"):
        PruneOptions(candidates=("taylor/sideways",))
    with pytest.raises(StepadaptError, match="unknown fine-tuning mode"):
        FinetuneOptions(bundle=Path("b"), mode="both")
    with pytest.raises(StepadaptError, match="unknown option"):
        AnalyzeOptions.from_dict({"budgett": 0.5})
    assert FinetuneOptions(bundle=Path("b"), distill=0.0).needs_teacher is False
    assert FinetuneOptions(bundle=Path("b"), distill=0.0, mode="shared").needs_teacher is True


@pytest.mark.slow
def test_analyze_and_prune_fit_the_gaussian_once_and_the_bundle_records_its_base(tmp_path, tiny, monkeypatch):
    """analyze fits the Gaussian to the training part, keeps it beside the plan; prune builds the
    bundle from that fit (no second fit), and the manifest names the base's weights and the data."""
    import stepadapt.analyze as analyze_module

    fits = []
    real_fit = analyze_module.fit_gaussian
    monkeypatch.setattr(analyze_module, "fit_gaussian", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    save_base(tiny, tmp_path / "base")
    data = _npz(tmp_path / "d.npz", 1400)
    common = {"base": tmp_path / "base", "data": str(data), "device": "cpu"}
    plan_path = tmp_path / "plan.json"
    result = analyze(
        AnalyzeOptions(out=plan_path, groups=3, budget=0.5, proxy_size=8, gaussian="700", **common)
    )
    choice = result.plan.gaussian
    assert choice is not None and choice.start == 700 and (tmp_path / choice.weights).is_file()
    manifest = prune(
        PruneOptions(
            out=tmp_path / "b", plan=plan_path, proxy_size=4, candidates=("magnitude/local",), **common
        )
    )
    assert len(fits) == 1
    assert manifest.base["sha256"] == weights_sha256(tiny) and manifest.data["sha256"] == choice.data_sha256
    assert manifest.provenance["options"]["prune"]["plan"] == str(plan_path)
    b = Bundle.load(tmp_path / "b")
    top = b.load_expert(b.experts[-1].name)  # the bundle's Gaussian is the fit kept beside the plan
    assert torch.equal(load_file(str(tmp_path / choice.weights))["mean"], top.mean)
    (tmp_path / choice.weights).write_bytes(b"changed")
    with pytest.raises(StepadaptError, match="missing or was changed"):
        prune(PruneOptions(out=tmp_path / "b2", plan=plan_path, proxy_size=4, **common))
    other = _npz(tmp_path / "other.npz", 1400, seed=1)
    with pytest.raises(StepadaptError, match="fitted to --data"):
        prune(PruneOptions(out=tmp_path / "b3", plan=plan_path, **{**common, "data": str(other)}))


@pytest.mark.slow
def test_finetune_refuses_a_teacher_of_other_weights(tmp_path, tiny):
    save_base(tiny, tmp_path / "base")
    save_base(build_unet("tiny", seed=1), tmp_path / "other")  # the same architecture, other weights
    data = _npz(tmp_path / "d.npz", 64)
    common = {"base": tmp_path / "base", "data": str(data), "device": "cpu"}
    analyze(
        AnalyzeOptions(
            out=tmp_path / "plan.json", groups=2, budget=0.6, proxy_size=8, gaussian="off", **common
        )
    )
    prune(PruneOptions(out=tmp_path / "b", plan=tmp_path / "plan.json", proxy_size=4,
                       candidates=("magnitude/local",), **common))  # fmt: skip
    opts = FinetuneOptions(bundle=tmp_path / "b", data=str(data), iterations=2, batch_size=4, device="cpu")
    with pytest.raises(StepadaptError) as e:
        finetune(opts.replace(teacher=tmp_path / "other"))
    msg = str(e.value)
    assert "\n" not in msg and weights_sha256(tiny)[:16] in msg and "--allow-other-base" in msg
    assert weights_sha256(build_unet("tiny", seed=1))[:16] in msg
    assert finetune(opts)  # the recorded base is the default teacher
    assert finetune(opts.replace(teacher=tmp_path / "other", allow_other_base=True, resume=False))


@pytest.mark.slow
def test_the_gaussian_cut_off_is_judged_on_held_out_images(tmp_path, tiny, monkeypatch):
    """On an image folder, the images the cut-off is judged on are none of those the Gaussian was
    fitted to (the folder's hash split)."""
    import stepadapt.analyze as analyze_module
    from stepadapt.data import load_dataset

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1300):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / f"{i}.png")
    seen = {}
    real_cutoff, real_fit = analyze_module.gaussian_cutoff, analyze_module.fit_gaussian

    def cutoff(model, gaussian, sched, held_out, **kw):
        seen["judged"] = held_out.clone()
        return real_cutoff(model, gaussian, sched, held_out, **kw)

    def fit(data, sched):
        seen["fitted"] = data.clone()
        return real_fit(data, sched)

    monkeypatch.setattr(analyze_module, "gaussian_cutoff", cutoff)
    monkeypatch.setattr(analyze_module, "fit_gaussian", fit)
    save_base(tiny, tmp_path / "base")
    analyze(AnalyzeOptions(out=tmp_path / "plan.json", base=tmp_path / "base", data=str(folder),
                           proxy_size=64, device="cpu"))  # fmt: skip
    judged, fitted = seen["judged"].flatten(1), seen["fitted"].flatten(1)
    assert len(judged) == 64 and len(fitted) > 1000
    assert torch.cdist(judged, fitted).min() > 1.0  # no judged image is a fitted one
    train = load_dataset(str(folder), "train", 32, 1)
    assert len(fitted) == len(train)


@pytest.mark.slow
def test_the_shipped_bundle_samples_the_images_it_sampled_before(tmp_path):
    """Same uint8 images as the code before the refactor (tests/data/README.md says how they were
    made), through the PyTorch experts and through onnxruntime."""
    from stepadapt.export.onnx import onnx_router
    from stepadapt.export.stage import ExportOptions, export

    from stepadapt.sampling import sample_images
    from stepadapt.solvers import resolve_setting

    torch.set_num_threads(1)
    before = np.load(DATA / "shipped_before.npz")
    d = tmp_path / "b"
    shutil.copytree(SHIPPED, d, ignore=shutil.ignore_patterns("onnx", "triton"))
    export(ExportOptions(bundle=d))
    b = Bundle.load(d)
    rec = resolve_setting(b.manifest.recommended)
    m = b.manifest
    for backend, den in (("torch", b.router()), ("onnxruntime", onnx_router(b, threads=1))):
        images = sample_images(den, m.scheduler, m.sample_shape, 6, steps=rec.steps, sampler=rec.sampler,
                               seed=0, jump=b.jump() if rec.jump else None)  # fmt: skip
        assert np.array_equal(images, before[f"{backend}_recommended"]), backend
        images = sample_images(den, m.scheduler, m.sample_shape, 6, steps=10, sampler="ddim", seed=1)
        assert np.array_equal(images, before[f"{backend}_ddim10"]), backend


@pytest.mark.slow
def test_evaluate_refuses_a_reference_of_other_weights_before_sampling(tmp_path, tiny_bundle, monkeypatch):
    """A bundle that records its base is scored against that base (the default) and refuses a
    --base of the same architecture but other weights, before Inception or any sampling starts."""
    from dataclasses import replace

    import stepadapt.evaluate as evaluate_module
    from stepadapt.bundle import save_bundle
    from stepadapt.evaluate import evaluate_targets, reference_base

    b = Bundle.load(tiny_bundle)
    save_base(build_unet("tiny", seed=0), tmp_path / "base")  # the base tiny_bundle was cut from
    save_base(build_unet("tiny", seed=1), tmp_path / "other")
    record = {"path": str(tmp_path / "base"), "sha256": weights_sha256(build_unet("tiny", seed=0))}
    save_bundle(tmp_path / "b", replace(b.manifest, base=record), [e.draft() for e in b.experts], b.models())
    assert reference_base({"b": tmp_path / "b"}, None) == tmp_path / "base"

    def no_inception():
        raise AssertionError("Inception was loaded before the base was checked")

    monkeypatch.setattr(evaluate_module, "InceptionFeatures", no_inception)
    with pytest.raises(StepadaptError, match="--allow-other-base") as e:
        evaluate_targets({"b": tmp_path / "b"}, tmp_path / "other")
    assert record["sha256"][:16] in str(e.value)
    with pytest.raises(AssertionError, match="Inception was loaded"):  # the recorded base passes the check
        evaluate_targets({"b": tmp_path / "b"})


def test_options_from_json_refuse_values_of_the_wrong_type():
    for d, field in (({"gaussian": 300}, "gaussian"), ({"boundaries": "0,250,1000"}, "boundaries"),
                     ({"groups": "4"}, "groups"), ({"tdc": 1}, "tdc")):  # fmt: skip
        with pytest.raises(StepadaptError, match=f"AnalyzeOptions.{field}: expected"):
            AnalyzeOptions.from_dict(d)
    assert AnalyzeOptions.from_dict({"budget": 1}).budget == 1  # an integer is a number


def test_cli_errors_with_brackets_and_both_sampler_spellings_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from stepadapt.cli import app

    r = CliRunner().invoke(app, ["prune", "--candidates", "bogus", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "IMPORTANCE[/local|/global]" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(
        app, ["finetune", str(tmp_path / "none"), "--timestep-sampler", "adaptive", "--sampler", "visited"]
    )
    assert r.exit_code == 2 and "give only one of them" in r.output


def test_a_recorded_base_that_is_not_here_is_said_not_replaced(tmp_path, tiny_bundle):
    from dataclasses import replace

    from stepadapt.bundle import save_bundle

    b = Bundle.load(tiny_bundle)
    record = {"path": str(tmp_path / "gone"), "sha256": weights_sha256(build_unet("tiny", seed=0))}
    save_bundle(tmp_path / "b", replace(b.manifest, base=record), [e.draft() for e in b.experts], b.models())
    with pytest.raises(StepadaptError, match="which is not here: pass --teacher"):
        finetune(FinetuneOptions(bundle=tmp_path / "b", iterations=2, device="cpu"))


def _labelled_npz(path: Path, n: int, classes: int = 3, seed: int = 0) -> Path:
    """Images whose class decides their brightness and where a bar lies: classes a model can learn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, (n, 32, 32)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 4 + 9 * c : 10 + 9 * c, :] = 120 + 60 * c
    np.savez(path, images=images, labels=labels)
    return path


@pytest.mark.slow
def test_the_class_conditional_chain_serves_what_it_samples(tmp_path):
    """train-base --conditional -> analyze -> prune -> finetune -> export -> serve -> generate with
    labels and guidance: every stage takes the labels, the bundle has a per-class Gaussian on its noisy
    end, and the endpoint's images are the in-process sampler's for the same labels and seed, in both
    repository layouts."""
    from stepadapt.export.stage import ExportOptions, export
    from stepadapt.serving.client import GenerateRequest, generate
    from stepadapt.serving.repository import RepositoryOptions, write_repository
    from stepadapt.serving.server import TritonServer

    from stepadapt.conditioning import guided, labels_cond
    from stepadapt.sampling import max_pixel_diff, sample_images
    from stepadapt.train_base import train_base

    data = str(_labelled_npz(tmp_path / "d.npz", 1200))
    trained = TrainBaseOptions(out=tmp_path / "run", data=data, conditional=True, iterations=6, batch_size=16,
                               checkpoint_every=100, sample_every=100, device="cpu")  # fmt: skip
    _, base = train_base(trained)
    common = {"base": base, "data": data, "device": "cpu"}
    analyze(AnalyzeOptions(out=tmp_path / "plan.json", groups=3, budget=0.5, proxy_size=8, gaussian="700",
                           gaussian_rank="8", **common))  # fmt: skip
    prune(PruneOptions(out=tmp_path / "b", plan=tmp_path / "plan.json", proxy_size=8,
                       candidates=("taylor/local",), **common))  # fmt: skip
    finetune(FinetuneOptions(bundle=tmp_path / "b", data=data, iterations=4, batch_size=8, device="cpu"))
    export(ExportOptions(bundle=tmp_path / "b"))
    b = Bundle.load(tmp_path / "b")
    m = b.manifest
    assert m.conditioning.classes == 3 and m.class_names == ["0", "1", "2"]
    assert m.experts[-1].kind == "class-gaussian" and m.experts[-1].onnx["inputs"].get("class_labels")
    assert any(e.training for e in b.experts if b.is_pruned(e.name))
    labels = [0, 2, 1, 2]
    want = sample_images(guided(b.router(), 3), m.scheduler, m.sample_shape, 4, steps=6, seed=3,
                         sampler="unipc", cond=labels_cond(labels, 2.0))  # fmt: skip
    other = sample_images(guided(b.router(), 3), m.scheduler, m.sample_shape, 4, steps=6, seed=3,
                          sampler="unipc", cond=labels_cond([1, 1, 1, 1], 2.0))  # fmt: skip
    assert max_pixel_diff(want, other) > 2  # the labels decide the images
    req = GenerateRequest(
        num_images=4, seed=3, steps=6, sampler="unipc", class_labels=labels, guidance_scale=2.0
    )
    for layout in ("fused", "bls"):
        repo = write_repository(b, tmp_path / f"repo-{layout}", RepositoryOptions(layout=layout, instances=1))
        with TritonServer(repo, log_path=tmp_path / f"{layout}.log") as server:
            got = generate(server.http_url, req)
        assert max_pixel_diff(got, want) <= 2, layout
