"""The conditioning path: conditions travel beside (x, t), the Router slices them, guidance stacks the
conditional and unconditional rows into one call, labelled data and label dropout in training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stepadapt import StepadaptError
from stepadapt.conditioning import (
    CLASS_LABELS,
    GUIDANCE,
    Conditioning,
    cat,
    conditioning_of,
    drop_labels,
    guided,
    labels_cond,
    sampling_condition,
)
from stepadapt.models import build_unet
from stepadapt.sampling import Router, max_pixel_diff, module_denoiser, sample_images, sample_together
from stepadapt.schedule import DEFAULT_SCHEDULER, make_scheduler


@pytest.fixture(scope="module")
def cond_unet():
    """A random class-conditional tiny U-Net (3 classes + null) whose class embedding matters."""
    m = build_unet("tiny", classes=3, seed=1)
    with torch.no_grad():
        m.class_embedding.weight.normal_(0, 1.0)
    return m.eval()


def test_conditioning_is_read_from_the_config(cond_unet):
    c = conditioning_of(cond_unet.config)
    assert (c.classes, c.null_label, c.text_dim) == (3, 3, 0)
    assert conditioning_of(build_unet("tiny").config).unconditional
    assert conditioning_of({"cross_attention_dim": 24}).inputs == ("encoder_hidden_states",)
    assert Conditioning.from_dict(c.to_dict()) == c


def test_check_names_each_bad_condition():
    c = Conditioning(classes=3)
    c.check(labels_cond([0, 3], 2.0), 2)  # the null label is a label too
    with pytest.raises(StepadaptError, match="label 4 is out of range"):
        c.check(labels_cond([0, 4]), 2)
    with pytest.raises(StepadaptError, match="2 rows for 3 images"):
        c.check(labels_cond([0, 1]), 3)
    with pytest.raises(StepadaptError, match="not class-conditional"):
        Conditioning().check(labels_cond([0]), 1)
    with pytest.raises(StepadaptError, match="finite"):
        c.check(labels_cond([0], float("nan")), 1)


def _counting(denoiser):
    calls = []

    def run(x, t, cond):
        calls.append(len(x))
        return denoiser(x, t, cond)

    return run, calls


def test_guidance_is_one_call_per_expert_and_equals_the_two_call_form(cond_unet):
    den = module_denoiser(cond_unet)
    spies = [_counting(den), _counting(den)]
    router = Router([0, 500, 1000], [s[0] for s in spies])
    g = guided(router, null_label=3)
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700, 200, 900])
    labels = torch.tensor([0, 1, 2, 1])
    cond = {CLASS_LABELS: labels, GUIDANCE: torch.tensor([3.0, 3.0, 1.0, 5.0])}
    out = g(x, t, cond)
    # each expert once: its conditional rows and the unconditional rows of those guided
    assert [c for c in spies[0][1]] == [3] and [c for c in spies[1][1]] == [4]
    e_c = den(x, t, {CLASS_LABELS: labels})
    e_u = den(x, t, {CLASS_LABELS: torch.full_like(labels, 3)})
    s = cond[GUIDANCE].view(-1, 1, 1, 1)
    torch.testing.assert_close(out, e_u + s * (e_c - e_u), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2], e_c[2], atol=1e-5, rtol=1e-5)  # scale 1: the conditional answer


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_guiding_the_output_guides_eps_for_every_prediction_type(prediction, cond_unet):
    """The guided output, converted to eps, is the guided eps: the conversion is affine with the
    same coefficients in both branches, so one combination serves eps, v and x0 models."""
    sched = make_scheduler("ddpm", {**DEFAULT_SCHEDULER, "prediction_type": prediction})
    a = sched.alphas_cumprod[torch.tensor([300, 300])].view(-1, 1, 1, 1)
    x = torch.randn(2, 1, 32, 32)
    t = torch.tensor([300, 300])

    def to_eps(out):
        if prediction == "epsilon":
            return out
        if prediction == "v_prediction":
            return a.sqrt() * out + (1 - a).sqrt() * x
        return (x - a.sqrt() * out) / (1 - a).sqrt()

    den = module_denoiser(cond_unet)
    cond = labels_cond([1, 2], 4.0)
    guided_eps = to_eps(guided(den, 3)(x, t, cond))
    e_c, e_u = to_eps(den(x, t, {CLASS_LABELS: cond[CLASS_LABELS]})), to_eps(den(x, t, labels_cond([3, 3])))
    torch.testing.assert_close(guided_eps, e_u + 4.0 * (e_c - e_u), atol=1e-4, rtol=1e-4)


def test_router_slices_the_condition_with_its_rows():
    seen = []

    def expert(k):
        def f(x, t, cond):
            seen.append((k, cond[CLASS_LABELS].tolist()))
            return x

        return f

    r = Router([0, 500, 1000], [expert(0), expert(1)])
    r(torch.zeros(4, 1, 2, 2), torch.tensor([10, 700, 20, 900]), labels_cond([5, 6, 7, 8]))
    assert seen == [(0, [5, 7]), (1, [6, 8])]


def test_requests_with_other_labels_batch_together_and_get_their_solo_images(cond_unet):
    den = guided(module_denoiser(cond_unet), 3)
    shape, sched = (1, 32, 32), DEFAULT_SCHEDULER
    a = labels_cond([0, 1], 3.0)
    b = labels_cond([2], 1.0)
    together = sample_together(den, sched, shape, [(2, 7, a), (1, 8, b)], steps=3)
    # within rounding: a convolution's arithmetic may depend on how many rows share the call
    assert max_pixel_diff(together[0], sample_images(den, sched, shape, 2, steps=3, seed=7, cond=a)) <= 2
    assert max_pixel_diff(together[1], sample_images(den, sched, shape, 1, steps=3, seed=8, cond=b)) <= 2
    other = sample_images(den, sched, shape, 2, steps=3, seed=7, cond=labels_cond([2, 2], 3.0))
    assert max_pixel_diff(together[0], other) > 2  # the labels decide the images


def test_a_batch_without_a_scale_counts_as_scale_one():
    c = cat([labels_cond([1], 2.0), labels_cond([0, 2])])
    assert c[GUIDANCE].tolist() == [2.0, 1.0, 1.0] and c[CLASS_LABELS].tolist() == [1, 0, 2]
    with pytest.raises(StepadaptError, match="different conditions"):
        cat([labels_cond([1]), {}])


def test_sampling_condition_cycles_labels_and_refuses_them_for_unconditional_models():
    c = sampling_condition(Conditioning(classes=4), 5, [0, 3], 2.0)
    assert c[CLASS_LABELS].tolist() == [0, 3, 0, 3, 0] and c[GUIDANCE].tolist() == [2.0] * 5
    assert sampling_condition(Conditioning(classes=3), 4, None)[CLASS_LABELS].tolist() == [0, 1, 2, 0]
    assert sampling_condition(Conditioning(), 4, None) is None
    with pytest.raises(StepadaptError, match="not class-conditional"):
        sampling_condition(Conditioning(), 2, [1])
    with pytest.raises(StepadaptError, match="out of range"):
        sampling_condition(Conditioning(classes=3), 2, [7])


def test_label_dropout_draws_the_null_class_at_its_rate():
    g = torch.Generator().manual_seed(0)
    y = drop_labels(torch.zeros(20000, dtype=torch.long), 0.1, 9, g)
    assert set(y.unique().tolist()) == {0, 9}
    assert abs(float((y == 9).float().mean()) - 0.1) < 0.01
    assert torch.equal(
        drop_labels(torch.ones(5, dtype=torch.long), 0.0, 9, g), torch.ones(5, dtype=torch.long)
    )


def test_training_with_labels_moves_the_class_embedding_and_refuses_mismatches(tmp_path, cond_unet):
    from stepadapt.train import TrainConfig, train

    x = torch.rand(16, 1, 32, 32) * 2 - 1
    y = torch.arange(16) % 3
    model = build_unet("tiny", classes=3, seed=0)
    before = model.class_embedding.weight.detach().clone()
    cfg = TrainConfig(iterations=2, batch_size=4, checkpoint_every=10, sample_every=10, warmup=0)
    train(model, x, DEFAULT_SCHEDULER, cfg, tmp_path / "a", progress=False, labels=y)
    assert not torch.equal(model.class_embedding.weight, before)
    with pytest.raises(StepadaptError, match="needs labelled data"):
        train(build_unet("tiny", classes=3), x, DEFAULT_SCHEDULER, cfg, tmp_path / "b", progress=False)
    with pytest.raises(StepadaptError, match="not class-conditional"):
        train(build_unet("tiny"), x, DEFAULT_SCHEDULER, cfg, tmp_path / "c", progress=False, labels=y)
    with pytest.raises(StepadaptError, match="labels span"):
        train(build_unet("tiny", classes=3), x, DEFAULT_SCHEDULER, cfg, tmp_path / "d", progress=False,
              labels=y + 3)  # fmt: skip


def test_labelled_data_from_fashion_mnist_folders_and_npz(tmp_path):
    from PIL import Image

    from stepadapt.data import class_names, load_labelled

    x, y = load_labelled("fashion-mnist", "test", limit=50)
    assert x.shape == (50, 1, 32, 32) and y.dtype == torch.long and 0 <= int(y.min()) <= int(y.max()) <= 9
    assert class_names("fashion-mnist")[9] == "Ankle boot"
    for split in ("train", "test"):
        for k, cls in enumerate(("cat", "dog")):
            (tmp_path / "f" / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8), 40 * k + i, np.uint8)).save(
                    tmp_path / "f" / split / cls / f"{i}.png"
                )
    x, y = load_labelled(str(tmp_path / "f"), "test", size=8)
    assert class_names(str(tmp_path / "f")) == ("cat", "dog") and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert (x[y == 1].mean() > x[y == 0].mean()).item()
    np.savez(tmp_path / "a.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 1, 2]))
    _, y = load_labelled(str(tmp_path / "a.npz"), "train", size=8, holdout=0.0)
    assert y.tolist() == [0, 1, 1, 2]
    np.savez(tmp_path / "b.npz", images=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(StepadaptError, match="no labels"):
        load_labelled(str(tmp_path / "b.npz"), "train", size=8)
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(StepadaptError, match="one subfolder per class"):
        class_names(str(tmp_path / "flat"))


def test_a_conditional_base_from_init_starts_as_the_unconditional_one(tmp_path):
    """--init: the class embedding the shipped base has not got starts at zero, so every label
    answers as the base does until training teaches it otherwise."""
    from stepadapt.models import DEFAULT_BASE, load_base
    from stepadapt.train_base import TrainBaseOptions, initial_model

    base, _ = load_base(DEFAULT_BASE)
    model = initial_model(TrainBaseOptions(init=DEFAULT_BASE, conditional=True), 1, 32, 10).eval()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 600])
    with torch.no_grad():
        want = base(x, t).sample
        for labels in ([0, 9], [10, 10]):
            torch.testing.assert_close(model(x, t, class_labels=torch.tensor(labels)).sample, want)
    with pytest.raises(StepadaptError, match="does not fit config"):
        initial_model(TrainBaseOptions(init=DEFAULT_BASE, config="ddpm-cifar10"), 1, 32, 0)


def test_the_class_embedding_can_learn_at_its_own_rate():
    """class_lr_scale puts the class embedding in its own optimizer group at lr x scale; at 1 there
    is one group, as before."""
    from stepadapt.train import TrainConfig, _param_groups

    model = build_unet("tiny", classes=3)
    one = _param_groups(model, TrainConfig(lr=1e-3))
    assert len(one) == 1 and len(one[0]["params"]) == len(list(model.parameters()))
    two = _param_groups(model, TrainConfig(lr=1e-3, class_lr_scale=30.0))
    assert two[1]["lr"] == pytest.approx(0.03) and two[1]["params"] == [model.class_embedding.weight]
    with pytest.raises(StepadaptError, match="LR scale must be positive"):
        TrainConfig(class_lr_scale=0.0).validate()


def test_a_text_model_unconditional_guidance_and_bad_manifests_are_one_line_errors(tmp_path):
    """What cannot run is said before any work: sampling a text-conditioned model without its text
    encoder (a bare U-Net, not a pipeline), guidance for an unconditional model, a manifest whose
    conditioning is not numbers."""
    import json

    from stepadapt.bundle import Bundle
    from stepadapt.evaluate import class_scoring

    with pytest.raises(StepadaptError, match="needs its text encoder"):
        sampling_condition(Conditioning(text_dim=24), 2, None)
    with pytest.raises(StepadaptError, match="text encoder"):
        class_scoring(Conditioning(text_dim=24), 20, 1.0, "fashion-mnist", 20, 0, 0.1, None)
    with pytest.raises(StepadaptError, match="for conditional models"):
        class_scoring(Conditioning(), 20, 3.0, "fashion-mnist", 20, 0, 0.1, None)
    with pytest.raises(StepadaptError, match="fewer than 2 images per class"):
        class_scoring(Conditioning(classes=10), 15, 3.0, "fashion-mnist", 15, 0, 0.1, None)
    with pytest.raises(StepadaptError, match="finite"):
        class_scoring(Conditioning(classes=10), 20, float("inf"), "fashion-mnist", 20, 0, 0.1, None)
    with pytest.raises(StepadaptError, match="this one is unconditional"):
        Conditioning().check({GUIDANCE: torch.tensor([2.0])}, 1)
    shipped = Path(__file__).resolve().parents[1] / "stepadapt" / "weights" / "fashion-tiny-cond-experts"
    for bad in ("x", 1, [3]):
        d = tmp_path / f"b{bad!s}"
        Bundle.load(shipped).copy_to(d)
        m = json.loads((d / "manifest.json").read_text())
        m["base_config"]["num_class_embeds"] = bad
        (d / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(StepadaptError, match="num_class_embeds must be null or an integer >= 2"):
            Bundle.load(d)
