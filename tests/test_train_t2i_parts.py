import json
import warnings

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from stepadapt import Notice, StepadaptError
from stepadapt.captions import load_captioned
from stepadapt.data import FASHION_MNIST_DIR, load_dataset
from stepadapt.sampling import to_uint8
from stepadapt.train_text import TrainTextOptions, tokenize, train_text_encoder
from stepadapt.train_vae import TrainVaeOptions, latent_means, train_vae

needs_fmnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
LONG = "a very long caption with far more words than the few tokens this tiny encoder reads"
PLACES = ("left", "right", "top", "bottom")


@pytest.fixture
def captioned(tmp_path, squares):
    """A folder of 24 grey PNGs (a bright square at a random place) with captions in metadata.jsonl;
    the last caption is longer than the tokens the tests allow."""
    d = tmp_path / "captioned"
    d.mkdir()
    rows = []
    for i, img in enumerate(to_uint8(squares(24))):
        Image.fromarray(img[..., 0]).save(d / f"{i:02d}.png")
        text = LONG if i == 23 else f"a Square on the {PLACES[i % 4]}"
        rows.append(json.dumps({"file_name": f"{i:02d}.png", "text": text}))
    (d / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return d


def _vae(data, out, **kw) -> TrainVaeOptions:
    kw = (
        dict(widths=(8, 16), iterations=4, batch_size=4, checkpoint_every=2, eval_limit=32, device="cpu") | kw
    )
    return TrainVaeOptions(out=out, data=str(data), **kw)


def _text(data, out, **kw) -> TrainTextOptions:
    kw = dict(hidden=16, layers=1, heads=2, max_length=8, iterations=4, batch_size=8, checkpoint_every=2) | kw
    return TrainTextOptions(out=out, data=str(data), device="cpu", **kw)


def _weights_equal(a, b) -> None:
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@needs_fmnist
def test_vae_run_writes_a_loadable_vae_with_its_scaling_factor(tmp_path):
    lines = []
    o = _vae("fashion-mnist", tmp_path / "run", limit=64)
    result, path = train_vae(o, lines.append)
    vae = AutoencoderKL.from_pretrained(path, use_safetensors=True).eval()
    x = load_dataset("fashion-mnist", "train", 32, 1, limit=64, seed=0)
    means = latent_means(vae, x)
    assert means.shape[1:] == result.latent_shape == (4, 16, 16)  # two levels: one halving
    # the stored factor is 1 / std of the training latents' means, as SD's 0.18215
    assert vae.config.scaling_factor == pytest.approx(1 / float(means.std()), rel=1e-4)
    assert result.scaling_factor == vae.config.scaling_factor
    assert result.test_images == 32 and 0 < result.psnr < 60
    assert 0 <= result.classifier_accuracy <= 1 and result.classifier_accuracy_originals >= 0.8
    grid = Image.open(tmp_path / "run" / "reconstructions.png")
    assert grid.size == (2 * (8 * 34 + 2 + 4), 2 * (4 * 34 + 2 + 4))  # 2 x (originals over reconstructions)
    modes = {f.name: f.stat().st_mode & 0o777 for f in path.iterdir()}
    assert modes["diffusion_pytorch_model.safetensors"] == modes["config.json"], modes  # not 0600
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert TrainVaeOptions.from_dict(saved["options"]) == o
    assert any("classifier accuracy" in line for line in lines)


def test_vae_resume_continues_exactly(captioned, tmp_path):
    whole, _ = train_vae(_vae(captioned, tmp_path / "a"))
    _, path = train_vae(_vae(captioned, tmp_path / "b", iterations=2))
    before = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    resumed, _ = train_vae(_vae(captioned, tmp_path / "b", resume=True))
    assert (whole.resumed_from, resumed.resumed_from, resumed.steps) == (0, 2, 4)
    _weights_equal(
        tmp_path / "a/vae/diffusion_pytorch_model.safetensors", path / "diffusion_pytorch_model.safetensors"
    )
    assert not all(torch.equal(v, load_file(str(path / "diffusion_pytorch_model.safetensors"))[k])
                   for k, v in before.items())  # fmt: skip
    assert resumed.scaling_factor == whole.scaling_factor and resumed.psnr == whole.psnr


def test_resume_refuses_what_would_change_the_run(captioned, tmp_path):
    with pytest.raises(StepadaptError, match="nothing to resume"):
        train_vae(_vae(captioned, tmp_path, resume=True))
    train_vae(_vae(captioned, tmp_path, iterations=2))
    with pytest.raises(StepadaptError, match=r"options differ from the checkpoint \(kl_weight\)"):
        train_vae(_vae(captioned, tmp_path, kl_weight=1e-3, resume=True))
    with pytest.raises(StepadaptError, match="past --iterations 1"):
        train_vae(_vae(captioned, tmp_path, iterations=1, resume=True))
    Image.new("L", (32, 32), 255).save(captioned / "00.png")  # the same options, other images
    with pytest.raises(StepadaptError, match="training data differ"):
        train_vae(_vae(captioned, tmp_path, resume=True))
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    with pytest.raises(StepadaptError, match="corrupt or unreadable"):
        train_vae(_vae(captioned, tmp_path, resume=True))


def test_text_run_writes_a_loadable_tokenizer_and_encoder(captioned, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, path = train_text_encoder(_text(captioned, tmp_path / "run"))
    assert any(
        isinstance(w.message, Notice) and "longer than --max-length 8" in str(w.message) for w in caught
    )
    tok = CLIPTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    assert tok.model_max_length == 8 and len(tok) == result.vocab_size <= 256
    _, captions = load_captioned(captioned, "train")
    assert result.truncated_captions == captions.count(LONG) == 1
    assert result.unique_captions == len(set(captions)) and result.zero_shot_accuracy is None
    ids = tok("A square on the LEFT", padding="max_length", max_length=8, truncation=True).input_ids
    words = ["a</w>", "square</w>", "on</w>", "the</w>", "left</w>"]
    assert tok.convert_ids_to_tokens(ids) == [tok.bos_token, *words, tok.eos_token, tok.eos_token]
    assert tok.pad_token_id == tok.eos_token_id != tok.bos_token_id  # CLIP pads with the end token
    cut = tok(LONG, padding="max_length", truncation=True).input_ids
    assert len(cut) == 8 and cut[-1] == tok.eos_token_id and tok.eos_token_id not in cut[1:-1]
    unseen = tok("zebra 42").input_ids  # words never seen split into known pieces, not the unknown token
    assert tok.decode(unseen, skip_special_tokens=True).replace(" ", "") == "zebra42"
    assert tok.eos_token_id not in unseen[1:-1]

    model = CLIPTextModel.from_pretrained(path, use_safetensors=True).eval()
    assert (path / "model.safetensors").stat().st_mode == (path / "config.json").stat().st_mode
    assert model.config.max_position_embeddings == 8 and model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    batch = tokenize(tok, ["a square on the top", "a square"])
    with torch.no_grad():
        out = model(input_ids=batch)
    first_eos = (batch == tok.eos_token_id).int().argmax(1)
    assert torch.equal(out.pooler_output, out.last_hidden_state[torch.arange(2), first_eos])


def test_text_resume_continues_exactly(captioned, tmp_path):
    train_text_encoder(_text(captioned, tmp_path / "a"))
    train_text_encoder(_text(captioned, tmp_path / "b", iterations=2))
    result, path = train_text_encoder(_text(captioned, tmp_path / "b", resume=True))
    assert (result.resumed_from, result.steps) == (2, 4)
    _weights_equal(tmp_path / "a/text_encoder/model.safetensors", path / "model.safetensors")
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=True) for r in "ab")
    for k, v in a["model"].items():  # the image tower and temperature too, not only what is shipped
        assert torch.equal(v, b["model"][k]), k
    with pytest.raises(StepadaptError, match=r"options differ from the checkpoint \(hidden\)"):
        train_text_encoder(_text(captioned, tmp_path / "b", hidden=8, resume=True))


@needs_fmnist
def test_text_on_fashion_scores_zero_shot_with_whole_word_prompts(tmp_path):
    result, _ = train_text_encoder(_text("fashion-mnist", tmp_path, limit=256, max_length=16, eval_limit=50))
    assert result.test_images == 50 and 0 <= result.zero_shot_accuracy <= 1
    assert result.unique_captions <= 40 and result.truncated_captions == 0
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    ids = tok("a photo of an ankle boot", padding="max_length", max_length=16, truncation=True).input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[:8] == [tok.bos_token, "a</w>", "photo</w>", "of</w>", "an</w>", "ankle</w>", "boot</w>",
                          tok.eos_token]  # fmt: skip
    assert len(ids) == 16 and set(ids[7:]) == {tok.eos_token_id}


@needs_fmnist
def test_text_encoder_learns_the_classes(tmp_path):
    o = _text("fashion-mnist", tmp_path, hidden=32, max_length=16, limit=4000, eval_limit=1000,
              iterations=150, batch_size=64, checkpoint_every=1000, threads=1)  # fmt: skip
    result, _ = train_text_encoder(o)
    assert result.zero_shot_accuracy > 0.4  # chance is 0.1


@needs_fmnist
def test_vae_learns_to_reconstruct(tmp_path):
    o = _vae("fashion-mnist", tmp_path, limit=2000, eval_limit=500, iterations=200, batch_size=16, threads=1,
             checkpoint_every=1000)  # fmt: skip
    result, _ = train_vae(o)
    # an untrained one: about 6 dB, and the classifier at chance (0.1)
    assert result.psnr > 15 and result.classifier_accuracy > 0.5


def test_data_without_captions_is_a_one_line_error(tmp_path, squares):
    plain = tmp_path / "plain"
    plain.mkdir()
    for i, img in enumerate(to_uint8(squares(4))):
        Image.fromarray(img[..., 0]).save(plain / f"{i}.png")
    npz = tmp_path / "x.npz"
    np.savez(npz, images=to_uint8(squares(4))[..., 0])
    for data, match in (
        (plain, "has no caption"),
        (npz, "has no captions"),
        (tmp_path / "nowhere", "not found"),
    ):
        with pytest.raises(StepadaptError, match=match) as e:
            train_text_encoder(_text(data, tmp_path / "out"))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: TrainVaeOptions(iterations=0), "--iterations must be at least 1"),
        (lambda: TrainVaeOptions(lr=float("nan")), "--lr"),
        (lambda: TrainVaeOptions(kl_weight=-1.0), "--kl-weight"),
        (lambda: TrainVaeOptions(widths=()), "--widths"),
        (lambda: TrainVaeOptions(size=30), "does not halve 2 times"),
        (lambda: TrainVaeOptions(channels=2), "--channels"),
        (lambda: TrainVaeOptions(limit=0), "--limit"),
        (lambda: TrainVaeOptions(device="tpu"), "--device"),
        (lambda: TrainVaeOptions.from_dict({"widths": "wide"}), "widths"),
        (lambda: TrainTextOptions(hidden=64, heads=3), "--heads 3 does not divide --hidden 64"),
        (lambda: TrainTextOptions(vocab_size=100), "--vocab-size must be at least"),
        (lambda: TrainTextOptions(batch_size=1), "--batch-size must be at least 2"),
        (lambda: TrainTextOptions(max_length=2), "--max-length"),
        (lambda: TrainTextOptions(seed=-1), "--seed"),
        (lambda: TrainTextOptions.from_dict({"layer": 2}), "unknown option"),
    ],
)
def test_nonsense_options_are_one_line_errors(make, match):
    with pytest.raises(StepadaptError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


def test_options_round_trip_through_json():
    v = TrainVaeOptions(widths=(16, 32), kl_weight=1e-4, limit=10)
    t = TrainTextOptions(vocab_size=300, max_length=12)
    assert TrainVaeOptions.from_json(v.to_json()) == v and TrainTextOptions.from_json(t.to_json()) == t
