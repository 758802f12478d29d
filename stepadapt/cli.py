"""The `stepadapt` command line: parses, calls the library, prints."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console

from stepadapt import StepadaptError
from stepadapt.models import DEFAULT_BASE

app = typer.Typer(
    help="Compress a diffusion U-Net into step-adaptive expert denoisers and serve them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out = Console()

BaseOpt = Annotated[Path, typer.Option("--base", help="Base model dir (diffusers UNet2DModel).")]


def _fail(e: Exception) -> None:
    console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(2)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StepadaptError("--device cuda asked for, but no CUDA device is available")
    return name


@app.command("train-base")
def train_base(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Run directory (checkpoint, samples, model/).")
    ] = Path("runs/base"),
    data: Annotated[
        str, typer.Option(help="'fashion-mnist', an image folder, or an .npz file.")
    ] = "fashion-mnist",
    config: Annotated[str, typer.Option(help="Model config: tiny or ddpm-cifar10.")] = "tiny",
    iterations: Annotated[int, typer.Option(help="Optimizer steps.")] = 6000,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 128,
    lr: Annotated[
        float, typer.Option(help="Peak learning rate (cosine decay after warm-up).")
    ] = 2e-3,
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the shipped weights.")] = 0.999,
    limit: Annotated[
        int | None, typer.Option(help="Use a deterministic subset of N images.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for init, batches, timesteps and noise.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint period in steps.")] = 500,
    sample_every: Annotated[int, typer.Option(help="Sample-grid period in steps.")] = 1000,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.pt exactly.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
) -> None:
    """Train a base U-Net (epsilon prediction, AdamW, EMA, grad clipping).

    Writes OUT/checkpoint.pt (resumable), OUT/samples/step_*.png and, at the end,
    OUT/model/ (diffusers format, safetensors) with the EMA weights.
    """
    from stepadapt.data import load_dataset
    from stepadapt.models import CONFIGS, build_unet, save_base
    from stepadapt.schedule import DEFAULT_SCHEDULER
    from stepadapt.train import TrainConfig, train

    try:
        if threads:
            torch.set_num_threads(threads)
        dev = _device(device)
        if config not in CONFIGS:
            raise StepadaptError(f"unknown config {config!r}; choose one of {', '.join(CONFIGS)}")
        size = CONFIGS[config]["sample_size"]
        x = load_dataset(
            data,
            "train",
            size=size,
            channels=CONFIGS[config]["in_channels"],
            limit=limit,
            seed=seed,
        )
        console.print(f"data: {data} -> {tuple(x.shape)}")
        model = build_unet(config, seed=seed)
        cfg = TrainConfig(
            iterations=iterations,
            batch_size=batch_size,
            lr=lr,
            ema_decay=ema_decay,
            seed=seed,
            checkpoint_every=checkpoint_every,
            sample_every=sample_every,
        )

        def on_sample(step: int, ema) -> None:
            path = _sample_grid(
                ema, DEFAULT_SCHEDULER, out_dir / "samples" / f"step_{step:06d}.png"
            )
            console.print(f"step {step}: samples -> {path}")

        ema, res = train(
            model,
            x,
            DEFAULT_SCHEDULER,
            cfg,
            out_dir,
            resume=resume,
            on_sample=on_sample,
            device=dev,
        )
        save_base(ema.cpu(), out_dir / "model", DEFAULT_SCHEDULER)
    except StepadaptError as e:
        _fail(e)
    out.print(
        f"trained {res.steps} steps, final loss {res.final_loss:.4f}, "
        f"{res.images_per_second:.0f} img/s; model -> {out_dir / 'model'}"
    )


def _sample_grid(
    model, scheduler_cfg, path: Path, n: int = 16, steps: int = 50, seed: int = 0
) -> Path:
    from stepadapt.sampling import initial_noise, module_denoiser, sample, save_grid, to_uint8
    from stepadapt.schedule import make_scheduler

    shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    device = next(model.parameters()).device
    x_t, gen = initial_noise(n, shape, seed)
    den = module_denoiser(model)
    x = sample(
        lambda x, t: den(x.to(device), t.to(device)).cpu(),
        make_scheduler("ddim", scheduler_cfg),
        x_t,
        steps,
        generator=gen,
    )
    return save_grid(to_uint8(x), path)


@app.command()
def sample(
    out_path: Annotated[
        Path, typer.Option("--out", help="PNG grid to write (an .npz lands beside it).")
    ] = Path("samples.png"),
    base: BaseOpt = DEFAULT_BASE,
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 16,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 50,
    sampler: Annotated[str, typer.Option(help="ddim or ddpm.")] = "ddim",
    eta: Annotated[float, typer.Option(help="DDIM eta (0 = deterministic).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise and DDPM noise.")] = 0,
    batch: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
) -> None:
    """Sample images from a base model with DDPM or DDIM."""
    from tqdm.auto import tqdm

    from stepadapt.models import load_base
    from stepadapt.sampling import (
        initial_noise,
        module_denoiser,
        save_grid,
        save_npz,
        to_uint8,
        validate_request,
    )
    from stepadapt.sampling import sample as run_sample
    from stepadapt.schedule import make_scheduler

    try:
        model, sched_cfg = load_base(base)
        validate_request(steps, n, eta, 100000, sched_cfg["num_train_timesteps"])
        shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
        x_t, gen = initial_noise(n, shape, seed)
        den = module_denoiser(model)
        chunks = []
        with tqdm(
            total=steps * ((n + batch - 1) // batch), unit="step", disable=not sys.stderr.isatty()
        ) as bar:
            for lo in range(0, n, batch):
                chunks.append(
                    run_sample(
                        den,
                        make_scheduler(sampler, sched_cfg),
                        x_t[lo : lo + batch],
                        steps,
                        eta=eta,
                        generator=gen,
                        callback=lambda i, t, x: bar.update(1),
                    )
                )
        images = to_uint8(torch.cat(chunks))
        save_grid(images, out_path)
        save_npz(images, out_path.with_suffix(".npz"))
    except StepadaptError as e:
        _fail(e)
    out.print(f"{n} images -> {out_path} and {out_path.with_suffix('.npz')}")


@app.command()
def demo(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where the demo writes its results.")
    ] = Path("demo-out"),
    base: BaseOpt = DEFAULT_BASE,
) -> None:
    """Run the main job on the shipped default base (Fashion-MNIST, tiny U-Net)."""
    from stepadapt.models import load_base

    try:
        model, sched_cfg = load_base(base)
        path = _sample_grid(model, sched_cfg, out_dir / "base_samples.png", n=36)
    except StepadaptError as e:
        _fail(e)
    out.print(f"base samples (DDIM, 50 steps) -> {path}")


def main() -> None:  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
