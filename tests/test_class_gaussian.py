"""The class-conditional Gaussian expert: one low-rank Gaussian per class, the pooled one for the
null class, each row denoised under its own label's, stored, loaded and exported like any expert."""

import numpy as np
import pytest
import torch

from stepadapt import StepadaptError
from stepadapt.conditioning import Conditioning, guided, labels_cond
from stepadapt.gaussian import ClassGaussianDenoiser, fit_class_gaussian, fit_low_rank
from stepadapt.kinds import CLASS_GAUSSIAN, BuildContext, kind_of, kind_of_model
from stepadapt.models import build_unet
from stepadapt.sampling import module_denoiser
from stepadapt.schedule import DEFAULT_SCHEDULER, make_scheduler

SHAPE = (1, 4, 4)


def _labelled(n: int = 3000, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``classes`` Gaussians of 16 pixels, each its own mean and mixing: labels that matter."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    mixes = torch.randn(classes, 16, 16, generator=torch.Generator().manual_seed(9)) * 0.3
    means = torch.randn(classes, 16, generator=torch.Generator().manual_seed(8)) * 0.5
    x = torch.einsum("nd,nde->ne", torch.randn(n, 16, generator=g), mixes[y]) + means[y]
    return x.reshape(n, *SHAPE), y


def _constructed(classes: int = 2, k: int = 3, seed: int = 0):
    """Per label (the null one last): mean, orthonormal basis, variances, isotropic rest, and the
    covariance written out as a D x D matrix."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(classes + 1):
        basis, _ = torch.linalg.qr(torch.randn(16, k, generator=g, dtype=torch.float64))
        lam = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
        rest, mean = float(torch.rand(1, generator=g)) * 0.1 + 0.01, torch.randn(16, generator=g).double()
        cov = basis @ torch.diag(lam) @ basis.T + rest * (
            torch.eye(16, dtype=torch.float64) - basis @ basis.T
        )
        parts.append((mean, basis, lam, rest, cov))
    return parts


def test_each_row_is_the_exact_posterior_mean_under_its_own_class():
    """Built from constructed per-class low-rank Gaussians, a batch of mixed labels (the null one
    included) answers, row by row, what the D x D closed form of that row's class answers."""
    parts = _constructed()
    ac = make_scheduler("ddpm", DEFAULT_SCHEDULER).alphas_cumprod
    den = ClassGaussianDenoiser(
        torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]),
        torch.stack([p[2] for p in parts]), torch.tensor([p[3] for p in parts]), ac, SHAPE,
    )  # fmt: skip
    x = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([3, 100, 400, 700, 950, 999]), torch.tensor([2, 0, 1, 1, 2, 0])
    out = den(x, t, y).reshape(6, -1).double()
    ab = ac.double()[t]
    for i in range(6):
        mean, _, _, _, cov = parts[int(y[i])]
        a, s2 = ab[i].sqrt(), 1 - ab[i]
        x0 = mean + a * cov @ torch.linalg.solve(a * a * cov + s2 * torch.eye(16, dtype=torch.float64),
                                                 x[i].reshape(-1).double() - a * mean)  # fmt: skip
        assert torch.allclose(out[i], (x[i].reshape(-1).double() - a * x0) / s2.sqrt(), atol=2e-4), i
    assert den.classes == 2 and den.rank == 3 and den.macs == 2 * 16 * 3 + 16
    assert den.conditioning == Conditioning(classes=2)


def test_rows_pick_their_class_and_the_null_class_is_all_images_pooled():
    x, y = _labelled()
    den = fit_class_gaussian(x, y, 3, DEFAULT_SCHEDULER, rank=4)
    probe, t = torch.randn(8, *SHAPE), torch.tensor([900, 10, 500, 999, 0, 250, 640, 700])
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    out = den(probe, t, labels)
    for i in range(8):  # the batched gather gives each row what its own Gaussian gives it alone
        alone = den.gaussian(int(labels[i]))(probe[i : i + 1], t[i : i + 1])
        assert torch.allclose(out[i : i + 1], alone, atol=1e-6), i
    for c in range(3):  # each class's Gaussian is the one fitted to that class's images alone
        own = fit_low_rank(x[y == c], DEFAULT_SCHEDULER, rank=4)
        assert torch.allclose(den.gaussian(c)(probe, t), own(probe, t), atol=1e-5)
    pooled = fit_low_rank(x, DEFAULT_SCHEDULER, rank=4)
    assert torch.allclose(den.gaussian(3)(probe, t), pooled(probe, t), atol=1e-5)
    assert not torch.allclose(
        den(probe, t, torch.zeros(8, dtype=torch.long)), den(probe, t, torch.ones(8, dtype=torch.long))
    )


def test_the_condition_is_kept_a_class_gaussian_beats_the_pooled_one_on_its_own_class():
    """The point of it: on held-out images of a class, its own Gaussian is nearer the truth than the
    unconditional one (which would erase the label on the noisy steps)."""
    x, y = _labelled()
    den = fit_class_gaussian(x, y, 3, DEFAULT_SCHEDULER, rank=6)
    test, ty = _labelled(600, seed=5)
    sched = make_scheduler("ddpm", DEFAULT_SCHEDULER)
    noise = torch.randn(test.shape, generator=torch.Generator().manual_seed(2))
    t = torch.full((len(test),), 600)
    x_t = sched.add_noise(test, noise, t)
    own = float(((den(x_t, t, ty) - noise) ** 2).mean())
    null = float(((den(x_t, t, torch.full_like(ty, 3)) - noise) ** 2).mean())
    assert own < 0.9 * null


def test_rank_from_explained_variance_is_one_for_all_classes_and_bad_labels_are_one_line():
    from stepadapt.gaussian import spectrum

    x, y = _labelled()
    den = fit_class_gaussian(x, y, 3, DEFAULT_SCHEDULER, explained=0.8)
    flat = x.reshape(len(x), -1)
    needed = [spectrum(flat[y == c]).rank_for(0.8) for c in range(3)] + [spectrum(flat).rank_for(0.8)]
    assert den.rank == max(needed)
    assert fit_class_gaussian(x, y, 3, DEFAULT_SCHEDULER, explained=0.8, rank_cap=2).rank == 2
    cases = [
        ((x, y + 1, 3), "labels span 1..3; the model knows 0..2"),
        ((x, y[:-1], 3), "2999 labels for 3000 images"),
        ((x[:4], torch.tensor([0, 0, 0, 1]), 2), "class 1 has 1 training images"),
        ((x[:6], torch.tensor([0, 0, 0, 1, 1, 1]), 2), "rank 5 is out of reach"),
    ]
    for (data, labels, classes), msg in cases:
        with pytest.raises(StepadaptError, match=msg) as e:
            fit_class_gaussian(data, labels, classes, DEFAULT_SCHEDULER, rank=5 if "rank" in msg else None)
        assert "\n" not in str(e.value)
    with pytest.raises(StepadaptError, match=r"class label 4 is out of range: this Gaussian knows 0..2"):
        den(torch.zeros(2, *SHAPE), torch.tensor([5, 5]), torch.tensor([1, 4]))
    with pytest.raises(StepadaptError, match="needs class_labels"):
        den(torch.zeros(2, *SHAPE), torch.tensor([5, 5]))
    with pytest.raises(StepadaptError, match="3 class labels for 2 images"):
        den(torch.zeros(2, *SHAPE), torch.tensor([5, 5]), torch.tensor([0, 1, 2]))


def test_it_is_a_kind_that_guides_and_routes_like_a_class_conditional_unet():
    x, y = _labelled()
    den = fit_class_gaussian(x, y, 3, DEFAULT_SCHEDULER, rank=3)
    assert kind_of_model(den) is CLASS_GAUSSIAN and kind_of("class-gaussian") is CLASS_GAUSSIAN
    assert not CLASS_GAUSSIAN.jumps and not CLASS_GAUSSIAN.sized_by_budget
    assert CLASS_GAUSSIAN.conditioning(den).inputs == ("class_labels",)
    probe, t = torch.randn(4, *SHAPE), torch.full((4,), 800)
    cond = labels_cond([0, 1, 2, 0], guidance_scale=3.0)
    out = guided(module_denoiser(den), null_label=3)(probe, t, cond)
    c, u = den(probe, t, cond["class_labels"]), den(probe, t, torch.full((4,), 3))
    assert torch.allclose(out, u + 3.0 * (c - u), atol=1e-5)
    base = build_unet("tiny", classes=3)
    built = CLASS_GAUSSIAN.build(
        type("G", (), {"lo": 600, "hi": 1000})(), 0.0, BuildContext(base, DEFAULT_SCHEDULER, gaussian=den)
    )
    assert built.macs == den.macs and built.params == den.params
    with pytest.raises(StepadaptError, match="cannot stand in for a base taking 5 classes"):
        CLASS_GAUSSIAN.build(
            type("G", (), {"lo": 600, "hi": 1000})(), 0.0,
            BuildContext(build_unet("tiny", classes=5), DEFAULT_SCHEDULER, gaussian=den),
        )  # fmt: skip


def test_tensors_round_trip_through_safetensors_with_shape_checks(tmp_path):
    from safetensors.torch import load_file

    x, y = _labelled()
    den = fit_class_gaussian(x, y, 3, DEFAULT_SCHEDULER, rank=3)
    written = CLASS_GAUSSIAN.write(tmp_path / "experts", "g9", den)
    tensors = load_file(str(tmp_path / written["weights"]))
    assert sorted(tensors) == ["bases", "eigenvalues", "means", "remainders"]
    again = CLASS_GAUSSIAN.from_tensors(tensors, SHAPE, DEFAULT_SCHEDULER, Conditioning(classes=3))
    probe, t, labels = torch.randn(4, *SHAPE), torch.tensor([1, 300, 700, 999]), torch.tensor([0, 3, 2, 1])
    assert torch.equal(den(probe, t, labels), again(probe, t, labels))
    with pytest.raises(StepadaptError, match="knows 3 classes, the model it serves 4"):
        CLASS_GAUSSIAN.from_tensors(tensors, SHAPE, DEFAULT_SCHEDULER, Conditioning(classes=4))
    with pytest.raises(StepadaptError, match="serves class-conditional models only"):
        CLASS_GAUSSIAN.from_tensors(tensors, SHAPE, DEFAULT_SCHEDULER, Conditioning())
    with pytest.raises(StepadaptError, match="do not fit"):
        CLASS_GAUSSIAN.from_tensors(tensors, (1, 8, 8), DEFAULT_SCHEDULER, Conditioning(classes=3))
    short = {**tensors, "remainders": tensors["remainders"][:3]}
    with pytest.raises(StepadaptError, match="remainders \\(3,\\)"):
        CLASS_GAUSSIAN.from_tensors(short, SHAPE, DEFAULT_SCHEDULER, Conditioning(classes=3))
    with pytest.raises(StepadaptError, match="lack remainders"):
        CLASS_GAUSSIAN.from_tensors({k: v for k, v in tensors.items() if k != "remainders"}, SHAPE,
                                    DEFAULT_SCHEDULER, Conditioning(classes=3))  # fmt: skip


def test_onnx_export_takes_class_labels_and_matches_pytorch(tmp_path):
    """Exported through the one export path: inputs sample, timestep, class_labels; parity with
    PyTorch within 1e-4 on mixed labels (the null one included) and fractional timesteps."""
    pytest.importorskip("onnxruntime")
    from stepadapt.export.onnx import OnnxDenoiser, export_model, parity

    x, y = _labelled()
    den = fit_class_gaussian(x, y, 3, DEFAULT_SCHEDULER, rank=3)
    path = export_model(den, tmp_path / "g.onnx")
    onnx_den = OnnxDenoiser(path, threads=1)
    assert onnx_den.condition == ["class_labels"]
    assert parity(den, onnx_den, 500, 1000) <= 1e-4
    probe, t, labels = (
        torch.randn(5, *SHAPE),
        torch.tensor([600, 700.5, 800, 999, 650]),
        torch.tensor([3, 0, 1, 2, 3]),
    )
    ref = den(probe, t, labels)
    assert (onnx_den(probe, t, {"class_labels": labels}) - ref).abs().max() <= 1e-4


def _labelled_npz(path, n: int = 240, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    patterns = rng.integers(30, 220, (classes, 8, 8))
    images = np.clip(patterns[y] + rng.normal(0, 25, (n, 8, 8)), 0, 255).astype(np.uint8)
    np.savez(path, images=images, labels=y.astype(np.int64))
    return str(path)


@pytest.mark.slow
def test_analyze_and_prune_a_class_conditional_base(tmp_path, monkeypatch):
    """The class-conditional chain's compression half: Taylor importance and candidate judging on
    the conditional loss (labelled proxy batches, some dropped to the null class), the bundle's
    Gaussian the per-class fit kept beside the plan, class names in the manifest; a plan for
    another class count is refused in one line."""
    from safetensors.torch import load_file

    import stepadapt.importance as imp
    from stepadapt.analyze import AnalyzeOptions, analyze
    from stepadapt.bundle import Bundle
    from stepadapt.compress import PruneOptions, prune
    from stepadapt.models import save_base
    from stepadapt.space import DataSpace

    data = _labelled_npz(tmp_path / "d.npz")
    base = save_base(
        build_unet("tiny", sample_size=8, classes=3), tmp_path / "base", class_names=("x", "y", "z")
    )
    common = {"base": base, "data": data, "device": "cpu"}
    plan = analyze(
        AnalyzeOptions(out=tmp_path / "plan.json", groups=3, proxy_size=8, gaussian="700", **common)
    ).plan
    batches = []
    real = imp.group_gradients
    monkeypatch.setattr(
        imp, "group_gradients", lambda m, s, b, chunk=64: batches.append(b) or real(m, s, b, chunk)
    )
    manifest = prune(PruneOptions(out=tmp_path / "b", plan=tmp_path / "plan.json", proxy_size=8,
                                  candidates=("taylor/local",), **common))  # fmt: skip
    assert manifest.class_names == ["x", "y", "z"] and manifest.conditioning.classes == 3
    (train, train_y), _ = DataSpace.of(build_unet("tiny", sample_size=8, classes=3).config).proxy_sets(
        data, 8
    )
    assert batches and all(torch.equal(b.x0, train) for b in batches)
    for b in batches:  # the proxy's own labels, a share dropped to the null class (3) as in training
        y = b.cond["class_labels"]
        assert torch.equal(y[y != 3], train_y[y != 3])
    b = Bundle.load(tmp_path / "b")
    top = b.experts[-1]
    assert top.kind == "class-gaussian" and top.lo == 700 and not b.manifest.can_jump
    den = b.load_expert(top.name)
    assert torch.equal(den.means, load_file(str(tmp_path / plan.gaussian.weights))["means"])
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([100, 800, 900, 999]), torch.tensor([0, 1, 2, 3])
    out = b.router()(x, t, {"class_labels": y})
    assert torch.allclose(out[1:], den(x[1:], t[1:], y[1:]))
    five = save_base(build_unet("tiny", sample_size=8, classes=5), tmp_path / "five")
    with pytest.raises(StepadaptError, match="the plan's Gaussian knows 3 classes, the base 5") as e:
        prune(PruneOptions(out=tmp_path / "b5", plan=tmp_path / "plan.json", proxy_size=8,
                           candidates=("magnitude/local",), **{**common, "base": five}))  # fmt: skip
    assert "\n" not in str(e.value)


def test_a_manifest_refuses_a_class_gaussian_without_classes_and_class_names_of_another_count():
    import copy
    import json
    from pathlib import Path

    from stepadapt.schema import validate_manifest

    shipped = Path(__file__).resolve().parents[1] / "stepadapt" / "weights" / "fashion-tiny-experts"
    m = json.loads((shipped / "manifest.json").read_text())
    bad = copy.deepcopy(m)
    bad["experts"][-1]["kind"] = "class-gaussian"
    with pytest.raises(
        StepadaptError, match=r"experts\[2\]\.kind must be one of unet, gaussian \(the base has no"
    ):
        validate_manifest(bad)
    bad = copy.deepcopy(m)
    bad["base_config"]["num_class_embeds"], bad["class_names"] = 4, ["a", "b"]
    with pytest.raises(StepadaptError, match=r"class_names must be 3 names \(the base's classes\)"):
        validate_manifest(bad)
