"""A pipeline bundle's text encoder and VAE decoder -> ONNX, each with an onnxruntime parity check.

What serves prompts needs them beside the experts: the text encoder runs once per request
(``input_ids`` [B, L] int64 -> ``last_hidden_state`` [B, L, E]) and the VAE decoder once per image
(``latents`` [B, C, h, w], already divided by the scaling factor -> ``images`` [B, C, H, W] in
[-1, 1]). Both are written to a staging directory and moved in, with one manifest update, only when
both pass, as the experts' exports are.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from stepadapt.export.runtime import session

from stepadapt import StepadaptError
from stepadapt.bundle import Bundle
from stepadapt.io import sha256_file
from stepadapt.pipeline import Surround

# What each export takes and gives, as the manifest records it.
IO = {
    "text_encoder": {
        "inputs": {"input_ids": "int64[B,L]"},
        "outputs": {"last_hidden_state": "float32[B,L,E]"},
    },
    "vae_decoder": {"inputs": {"latents": "float32[B,C,h,w]"}, "outputs": {"images": "float32[B,C,H,W]"}},
}
# Each part's one input and one output, by name: what a server feeds it and reads back.
NAMES = {part: (next(iter(io["inputs"])), next(iter(io["outputs"]))) for part, io in IO.items()}


class _Text(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state


class _Decoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample


def _specs(
    bundle: Bundle, s: Surround | None
) -> dict[str, tuple[torch.nn.Module, str, str, Callable[[int, torch.Generator], torch.Tensor]]]:
    """part -> (module, input name, output name, random input of a batch)."""
    if s is None:
        return {}
    out = {}
    if s.text_model is not None:
        vocab, length = s.text_model.config.vocab_size, s.text.max_length
        out["text_encoder"] = (_Text(s.text_model), "input_ids", "last_hidden_state",
                               lambda b, g: torch.randint(0, vocab, (b, length), generator=g))  # fmt: skip
    if s.vae is not None:
        shape = (s.vae.config.latent_channels, *bundle.manifest.sample_shape[1:])
        out["vae_decoder"] = (
            _Decoder(s.vae),
            "latents",
            "images",
            lambda b, g: torch.randn(b, *shape, generator=g),
        )
    return out


def _export(
    module: torch.nn.Module, example: torch.Tensor, name_in: str, name_out: str, path: Path, opset: int
) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), (example,), str(path), input_names=[name_in], output_names=[name_out],
            dynamic_axes={name_in: {0: "batch"}, name_out: {0: "batch"}}, opset_version=opset, dynamo=False,
        )  # fmt: skip
    onnx.checker.check_model(str(path))


def export_surround(
    bundle: Bundle, opset: int, atol: float, log: Callable[[str], None] | None = None
) -> dict[str, dict]:
    """Export a pipeline bundle's text encoder and VAE decoder (nothing for a bare U-Net's bundle);
    returns the manifest records written."""
    surround = bundle.surround()
    specs = _specs(bundle, surround)
    if not specs:
        return {}
    try:
        stage = Path(tempfile.mkdtemp(prefix=".onnx-surround.", dir=bundle.path))
    except OSError as e:
        raise StepadaptError(f"cannot write into bundle {bundle.path}: {e.strerror}") from None
    records = {}
    try:
        for part, (module, name_in, name_out, example) in specs.items():
            g = torch.Generator().manual_seed(0)
            path = stage / f"{part}.onnx"
            _export(module, example(2, g), name_in, name_out, path, opset)
            sess, worst = session(path, threads=1, device="cpu"), 0.0
            for b in (1, 3):
                x = example(b, g)
                with torch.no_grad():
                    ref = module(x).numpy()
                worst = max(worst, float(np.abs(sess.run([name_out], {name_in: x.numpy()})[0] - ref).max()))
            if not np.isfinite(worst) or worst > atol:
                raise StepadaptError(f"{part}: ONNX parity failed (max abs error {worst:.2e} > {atol:.0e})")
            records[part] = {"path": f"onnx/{part}.onnx", "max_abs_err": worst, "opset": opset, **IO[part]}
            if part == "vae_decoder":  # what the server divides latents by before decoding
                records[part]["scaling_factor"] = float(surround.vae.config.scaling_factor)
            if log:
                log(f"  {part}: onnx ok, max abs err {worst:.2e}")
        (bundle.path / "onnx").mkdir(exist_ok=True)
        for part, r in records.items():
            os.replace(stage / f"{part}.onnx", bundle.path / r["path"])
            r["sha256"] = sha256_file(bundle.path / r["path"])
        bundle.set_surround_onnx(records)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return records
