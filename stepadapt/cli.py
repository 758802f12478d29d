"""The `stepadapt` command line: parses, calls the library, prints."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console

from stepadapt import Notice, StepadaptError
from stepadapt.devices import resolve_device, resolve_precision
from stepadapt.finetune import DEFAULT_BATCH, DEFAULT_LR, DEFAULT_MODE
from stepadapt.models import DEFAULT_BASE
from stepadapt.serving.repository import RepositoryOptions
from stepadapt.train import DEFAULT_DISTILL
from stepadapt.tune import TUNE_SAMPLERS, TUNE_STEPS

app = typer.Typer(
    help="Compress a diffusion U-Net into step-adaptive expert denoisers and serve them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 140)


def _show_notice(message, category, *args, _default=warnings.showwarning, **kwargs) -> None:
    """The library's notices (stepadapt.Notice) as one line each; other warnings as Python shows them."""
    if issubclass(category, Notice):
        console.print(f"[yellow]note:[/] {message}")
    else:
        _default(message, category, *args, **kwargs)


warnings.showwarning = _show_notice

BaseOpt = Annotated[Path, typer.Option("--base", help="Base model dir (diffusers UNet2DModel).")]


def _fail(e: Exception) -> None:
    console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(2)


SAMPLER_HELP = (
    "Timestep sampler: uniform, curriculum (easy-to-hard clusters), adaptive (REINFORCE policy), "
    "loss-moment (improved-DDPM importance sampling, unbiased weights), visited (only the timesteps "
    "a --visit-steps DDIM run visits: for a fixed serving step count)."
)


DEVICE_HELP = "auto (CUDA where there is one), cpu or cuda."
SOLVER_HELP = (
    "Solver, as NAME[:OPTION,...]: ddim, ddpm, dpm++2m, dpm++3m, dpm++2m-sde, dpm++sde, unipc, euler, "
    "euler-a, heun, pndm, lms; options thresholding (dynamic, max 1.0), karras, clip, no-clip, "
    "spacing=leading|trailing|linspace, eta=X (ddim). E.g. 'dpm++2m:thresholding'. Default: the "
    "bundle's recommended setting ('stepadapt tune'), else ddim."
)
STEPS_HELP = "Solver steps (default: the bundle's recommended, else 50)."
JUMP_HELP = (
    "Carry x_T in closed form over the Gaussian expert's interval (its exact flow) and spend every "
    "step below it (bundles with a Gaussian expert; default: the bundle's recommendation)."
)
PRECISION_HELP = (
    "Forward passes in mixed precision: auto (bf16 on a GPU that has it, else fp16 with loss scaling; "
    "fp32 on a CPU), fp32, bf16 or fp16. Weights, optimizer and EMA stay fp32."
)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


@app.command("train-base")
def train_base(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Run directory (checkpoint, samples, model/).")
    ] = Path("runs/base"),
    data: Annotated[
        str, typer.Option(help="'fashion-mnist', an image folder, or an .npz file.")
    ] = "fashion-mnist",
    config: Annotated[str, typer.Option(help="Model config: tiny or ddpm-cifar10.")] = "tiny",
    channels: Annotated[
        int | None, typer.Option(help="Image channels (1 or 3); default: the data's own.")
    ] = None,
    size: Annotated[
        int | None, typer.Option(help="Image side; default: the data's own (else the config's).")
    ] = None,
    iterations: Annotated[int, typer.Option(help="Optimizer steps.")] = 6000,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine decay after warm-up).")] = 2e-3,
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the shipped weights.")] = 0.999,
    limit: Annotated[int | None, typer.Option(help="Use a deterministic subset of N images.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for init, batches, timesteps and noise.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint period in steps.")] = 500,
    sample_every: Annotated[int, typer.Option(help="Sample-grid period in steps.")] = 1000,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.pt exactly.")] = False,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    sampler: Annotated[str, typer.Option(help=SAMPLER_HELP)] = "uniform",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
) -> None:
    """Train a base U-Net (epsilon prediction, AdamW, EMA, grad clipping).

    Writes OUT/checkpoint.pt (resumable), OUT/samples/step_*.png and, at the end,
    OUT/model/ (diffusers format, safetensors) with the EMA weights. Under
    `torchrun --nproc_per_node N` it trains with DDP (the batch is split over N).
    """
    from stepadapt import distributed
    from stepadapt.data import load_dataset, native_size
    from stepadapt.models import CONFIGS, build_unet, save_base
    from stepadapt.schedule import DEFAULT_SCHEDULER
    from stepadapt.train import TrainConfig, train

    try:
        if threads:
            torch.set_num_threads(threads)
        dev = resolve_device(device)
        resolve_precision(precision, dev)  # a bad --precision is said before the data loads
        distributed.init_from_env()
        if config not in CONFIGS:
            raise StepadaptError(f"unknown config {config!r}; choose one of {', '.join(CONFIGS)}")
        if channels not in (None, 1, 3):
            raise StepadaptError(f"--channels must be 1 or 3, got {channels}")
        side = size or native_size(data)
        default = CONFIGS[config]["sample_size"]
        if side is None:
            side = default
            warnings.warn(Notice(f"{data} has no single image size; training at {side} (set --size)"),
                          stacklevel=1)  # fmt: skip
        elif size is None and side != default:
            warnings.warn(Notice(f"training {config} at {side} x {side}, the data's size (--size to choose)"),
                          stacklevel=1)  # fmt: skip
        x = load_dataset(data, "train", size=side, channels=channels, limit=limit, seed=seed)
        console.print(f"data: {data} -> {tuple(x.shape)}")
        model = build_unet(config, in_channels=x.shape[1], seed=seed, sample_size=side)
        cfg = TrainConfig(
            iterations=iterations,
            batch_size=batch_size,
            lr=lr,
            ema_decay=ema_decay,
            seed=seed,
            checkpoint_every=checkpoint_every,
            sample_every=sample_every,
            sampler=sampler,
            precision=precision,
        )

        def on_sample(step: int, ema) -> None:
            path = _sample_grid(ema, DEFAULT_SCHEDULER, out_dir / "samples" / f"step_{step:06d}.png")
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
        if distributed.is_main():
            save_base(ema.cpu(), out_dir / "model", DEFAULT_SCHEDULER)
    except StepadaptError as e:
        _fail(e)
    if distributed.is_main():
        out.print(
            f"trained {res.steps} steps, final loss {res.final_loss:.4f}, "
            f"{res.images_per_second:.0f} img/s; model -> {out_dir / 'model'}"
        )


def _model_denoiser(model) -> tuple:
    """A base/EMA model as (denoiser, sample shape); it runs on the model's own device."""
    from stepadapt.sampling import module_denoiser

    return module_denoiser(model), (
        model.config.in_channels,
        model.config.sample_size,
        model.config.sample_size,
    )


def _sample_grid(model, scheduler_cfg, path: Path, n: int = 16, steps: int = 50, seed: int = 0) -> Path:
    from stepadapt.sampling import sample_images, save_grid

    den, shape = _model_denoiser(model)
    return save_grid(sample_images(den, scheduler_cfg, shape, n, steps=steps, seed=seed), path)


@app.command()
def sample(
    out_path: Annotated[
        Path, typer.Option("--out", help="PNG grid to write (an .npz lands beside it).")
    ] = Path("samples.png"),
    base: BaseOpt = DEFAULT_BASE,
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 16,
    steps: Annotated[int | None, typer.Option(help=STEPS_HELP)] = None,
    sampler: Annotated[str | None, typer.Option(help=SOLVER_HELP)] = None,
    jump: Annotated[bool | None, typer.Option("--jump/--no-jump", help=JUMP_HELP)] = None,
    eta: Annotated[
        float | None, typer.Option(help="DDIM eta (0 = deterministic); same as ddim:eta=X.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise and of the solver's noise.")] = 0,
    batch: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    bundle: Annotated[
        Path | None, typer.Option(help="Sample from an expert bundle (each step routed) instead of --base.")
    ] = None,
    backend: Annotated[
        str, typer.Option(help="With --bundle: torch, or onnxruntime (needs 'stepadapt export').")
    ] = "torch",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
) -> None:
    """Sample images from a base model, or from a bundle's experts with per-step routing."""
    from stepadapt.models import load_base
    from stepadapt.plan import visited_timesteps
    from stepadapt.progress import progress
    from stepadapt.sampling import sample_images, save_grid, save_npz
    from stepadapt.solvers import resolve_setting

    try:
        rec, j = None, None
        if bundle is not None:
            from stepadapt.bundle import Bundle

            b = Bundle.load(bundle)
            den, sched_cfg, shape = (
                _bundle_router(b, backend, device),
                b.manifest.scheduler,
                b.manifest.sample_shape,
            )
            rec = b.manifest.recommended
        else:
            model, sched_cfg = load_base(base)
            den, shape = _model_denoiser(model.to(resolve_device(device)))
        setting = resolve_setting(rec, sampler, steps, jump, eta)
        if setting.jump:
            if bundle is None:
                raise StepadaptError("--jump needs a --bundle with a Gaussian expert on the noisy end")
            j = b.jump()
        per_chunk = len(visited_timesteps(setting.sampler, setting.steps, sched_cfg))
        with progress(total=per_chunk * -(-n // batch), unit="eval", disable=not sys.stderr.isatty()) as bar:
            images = sample_images(
                den, sched_cfg, shape, n, steps=setting.steps, sampler=setting.sampler, seed=seed,
                batch=batch, callback=lambda i, t, x: bar.update(1), jump=j,
            )  # fmt: skip
        save_grid(images, out_path)
        save_npz(images, out_path.with_suffix(".npz"))
    except StepadaptError as e:
        _fail(e)
    out.print(f"{n} images ({setting}) -> {out_path} and {out_path.with_suffix('.npz')}")


def _bundle_router(b, backend: str, device: str = "auto"):
    if backend == "torch":
        return b.router(resolve_device(device))
    if backend == "onnxruntime":
        from stepadapt.export.onnx import onnx_router

        return onnx_router(b, device=device)
    raise StepadaptError(f"unknown backend {backend!r}; choose torch or onnxruntime")


def _parse_list(text: str | None, what: str, kind: type = int) -> list | None:
    if text is None:
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise StepadaptError(f"{what} must be comma-separated {kind.__name__}s, got {text!r}") from None


def _parse_ints(text: str | None, what: str) -> list[int] | None:
    return _parse_list(text, what, int)


def _parse_floats(text: str | None, what: str) -> list[float] | None:
    return _parse_list(text, what, float)


@app.command()
def analyze(
    out_path: Annotated[
        Path, typer.Option("--out", help="plan.json to write (a PNG plot lands beside it).")
    ] = Path("plan.json"),
    base: BaseOpt = DEFAULT_BASE,
    data: Annotated[
        str, typer.Option(help="Proxy data: 'fashion-mnist', an image folder or .npz.")
    ] = "fashion-mnist",
    measure: Annotated[
        str,
        typer.Option(
            help="What sizes the groups: snr or loss (a difficulty proxy), or damage (each of --sizes "
            "pruned, recovered briefly and swapped into the base's trajectory; a knapsack picks under "
            "--budget)."
        ),
    ] = "snr",
    sizes: Annotated[
        str, typer.Option(help="damage: sizes to try per group (MACs / base).")
    ] = "0.25,0.4,0.55,0.7",
    recover_iterations: Annotated[
        int, typer.Option(help="damage: distilled fine-tuning iterations per tried size.")
    ] = 100,
    groups: Annotated[
        int,
        typer.Option(
            help="Number of timestep groups, the Gaussian's included; neighbouring groups that both get "
            "the whole base become one expert."
        ),
    ] = 4,
    partition: Annotated[str, typer.Option(help="uniform (in t), snr (equal SNR-dB width) or mass.")] = "snr",
    boundaries: Annotated[
        str | None, typer.Option(help="Explicit boundaries, e.g. 0,250,500,1000 (overrides --groups).")
    ] = None,
    budget: Annotated[
        float | None, typer.Option(help="Target mean MACs per sampling step, as a fraction of the base.")
    ] = 0.5,
    tdc: Annotated[
        bool, typer.Option("--tdc", help="Use the TDC rule (i/N + (N-i)/N*k) instead of --budget.")
    ] = False,
    tdc_k: Annotated[float, typer.Option(help="k of the TDC rule.")] = 0.5,
    sampler: Annotated[
        str,
        typer.Option(
            help="Solver whose model evaluations define the mean (any of sample's --sampler, e.g. unipc; "
            "Heun's two evaluations per step count twice)."
        ),
    ] = "ddim",
    steps: Annotated[int, typer.Option(help="Solver steps the mean is taken over.")] = 50,
    proxy_size: Annotated[int, typer.Option(help="Images in the proxy batch for the loss profile.")] = 128,
    gaussian: Annotated[
        str,
        typer.Option(
            help="The noisy end goes to a closed-form Gaussian denoiser (the training images' mean and "
            "covariance: 2 x pixels^2 MACs, 0.022 x the shipped base's) as the last of --groups, and "
            "what it saves of --budget to the U-Net groups: auto (from where its eps error on the "
            "proxy is within --gaussian-tolerance of the base's; later if the budget needs it; none "
            "for images where it would cost over 0.25 x the base), a timestep to start at, or off. "
            "With --boundaries, the groups above its start merge into it."
        ),
    ] = "auto",
    gaussian_tolerance: Annotated[
        float,
        typer.Option(help="auto: the factor by which the Gaussian's eps error may exceed the base's (1.1)."),
    ] = 1.1,
    seed: Annotated[int, typer.Option(help="Seed of the proxy batch and noise.")] = 0,
    device: Annotated[
        str, typer.Option(help=DEVICE_HELP + " The base's device (the Gaussian fits on CPU).")
    ] = "auto",
) -> None:
    """Difficulty per timestep -> groups and a MAC budget per group (plan.json + plot)."""
    from stepadapt.analyze import analyze_base
    from stepadapt.data import load_dataset, proxy_sets
    from stepadapt.models import load_base
    from stepadapt.plots import plot_plan

    try:
        dev = resolve_device(device)
        model, sched_cfg = load_base(base)
        model = model.to(dev)
        c, size = model.config.in_channels, model.config.sample_size
        proxy = load_dataset(data, "test", size, c, limit=proxy_size, seed=seed)
        damage = None
        if measure == "damage":
            proxy_train, proxy_val = proxy_sets(data, proxy_size, size, c, seed)
            damage = {
                "data": load_dataset(data, "train", size, c, seed=seed), "proxy_train": proxy_train,
                "proxy_val": proxy_val, "sizes": _parse_floats(sizes, "--sizes"),
                "recover_iterations": recover_iterations, "log": console.print,
            }  # fmt: skip
        g_from = _parse_gaussian(gaussian)
        g_model = _gaussian_for(g_from, data, model, sched_cfg)
        plan, profiles = analyze_base(
            model, sched_cfg, proxy, measure=measure, groups=groups, partition=partition,
            boundaries=_parse_ints(boundaries, "--boundaries"), budget=None if tdc else budget,
            tdc_k=tdc_k, sampler=sampler, steps=steps, seed=seed, damage=damage, gaussian=g_model,
            gaussian_from=None if g_from in ("auto", "off") else g_from, tolerance=gaussian_tolerance,
        )  # fmt: skip
        if plan.gaussian:
            plan.gaussian["data"] = data  # prune fits the same Gaussian again from the same images
            _print_gaussian(plan)
        plan.save(out_path)
        png = plot_plan(plan, profiles, out_path.with_suffix(".png"))
    except StepadaptError as e:
        _fail(e)
    _print_plan(plan)
    out.print(f"plan -> {out_path}, plot -> {png}")


def _parse_gaussian(text: str) -> str | int:
    if text in ("auto", "off"):
        return text
    try:
        return int(text)
    except ValueError:
        raise StepadaptError(f"--gaussian must be auto, off or a timestep, got {text!r}") from None


def _gaussian_for(choice: str | int, data: str, model, sched_cfg: dict):
    """The fitted Gaussian expert, or None: off, or auto where it cannot pay (said in one line)."""
    from stepadapt.gaussian import gaussian_for

    if choice == "off":
        return None
    try:
        return gaussian_for(model, sched_cfg, data)
    except StepadaptError as e:
        if choice != "auto":
            raise StepadaptError(f"Gaussian expert ({choice}): {e}") from None
        console.print(f"no Gaussian expert: {e}")
    return None


def _print_gaussian(plan) -> None:
    g = plan.gaussian
    group = next((x for x in plan.groups if x.kind == "gaussian"), None)
    if g["rule"] == "auto":
        found = g["tolerance_from"]
        if group is None:
            out.print(f"no Gaussian expert: its eps error is never within {g['tolerance']} x the base's")
            return
        out.print(f"Gaussian expert: eps error within {g['tolerance']} x the base's from t = {found} on")
        if group.lo != found:
            out.print(f"  started at t = {group.lo} instead, so that the budget can still be spent")
    out.print(f"Gaussian expert on [{group.lo}, {group.hi}): {group.visit_share:.0%} of the steps, "
              f"{group.macs_ratio:.3f} x the base's MACs")  # fmt: skip


def _print_plan(plan) -> None:
    from rich.table import Table

    table = Table(title=f"plan: {plan.allocation}, mean {plan.mean_ratio():.3f} x base MACs")
    for col in ("group", "timesteps", "SNR dB", "difficulty", "visits", "MACs / base"):
        table.add_column(col, justify="right")
    for g in plan.groups:
        table.add_row(
            g.name,
            f"[{g.lo}, {g.hi})",
            f"{g.snr_db[0]:.1f} .. {g.snr_db[1]:.1f}",
            f"{g.difficulty:.3f}",
            f"{g.visit_share:.0%}",
            f"{g.macs_ratio:.3f}" + (" (Gaussian)" if g.kind == "gaussian" else ""),
        )
    out.print(table)


@app.command()
def prune(
    out_dir: Annotated[Path, typer.Option("--out", help="Bundle directory to write.")] = Path("bundle"),
    plan_path: Annotated[Path, typer.Option("--plan", help="plan.json from 'stepadapt analyze'.")] = Path(
        "plan.json"
    ),
    base: BaseOpt = DEFAULT_BASE,
    data: Annotated[
        str,
        typer.Option(
            help="Proxy data for importance and candidate scoring (its training split also fits a "
            "Gaussian expert, when the plan has one)."
        ),
    ] = "fashion-mnist",
    proxy_size: Annotated[int, typer.Option(help="Images per proxy set (importance / held-out).")] = 128,
    candidates: Annotated[
        str, typer.Option(help="Candidate structures: importance/scope, comma-separated.")
    ] = "taylor/local,taylor/global,magnitude/local",
    uniform: Annotated[
        bool, typer.Option("--uniform", help="One expert for all t at the plan's mean MACs (the baseline).")
    ] = False,
    memory: Annotated[
        Path | None, typer.Option(help="Memory bank of tried candidates (default: OUT.memory.json).")
    ] = None,
    nested: Annotated[
        bool,
        typer.Option(
            "--nested/--independent",
            help="Independent (default): each expert is pruned from the base for its own timesteps. "
            "Nested: each is cut from the next larger one, so their channels nest and they share "
            "weights coherently under 'finetune --mode shared'.",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of proxy sets and random importance.")] = 0,
    device: Annotated[
        str, typer.Option(help=DEVICE_HELP + " Where importance and candidates are scored.")
    ] = "auto",
) -> None:
    """Prune one expert per plan group (candidate search by proxy loss) -> bundle.

    A Gaussian group gets the closed-form denoiser fitted to --data's training
    images instead; neighbouring groups that both keep the whole base are one expert.
    """
    from stepadapt.compress import compress
    from stepadapt.data import proxy_sets
    from stepadapt.importance import Candidate, Memory
    from stepadapt.models import load_base
    from stepadapt.plan import Plan, uniform_plan

    try:
        dev = resolve_device(device)
        model, sched_cfg = load_base(base)
        model = model.to(dev)
        plan = Plan.load(plan_path)
        if uniform:
            plan = uniform_plan(plan, sched_cfg)
        cands = [Candidate.parse(c) for c in candidates.split(",")]
        train, val = proxy_sets(data, proxy_size, model.config.sample_size, model.config.in_channels, seed)
        mem = Memory(memory or out_dir.with_name(out_dir.name + ".memory.json"))
        fitted = None
        if plan.fixed_ratios():
            chosen_on = (plan.gaussian or {}).get("data", data)
            if chosen_on != data:
                raise StepadaptError(
                    f"the plan's Gaussian expert was chosen on --data {chosen_on}; prune with the same data"
                )
            fitted = _gaussian_for("in the plan", data, model, sched_cfg)
        manifest = compress(
            model, sched_cfg, plan, train, val, out_dir, candidates=tuple(cands), memory=mem, seed=seed,
            nested=nested, gaussian=fitted, log=console.print,
        )  # fmt: skip
    except StepadaptError as e:
        _fail(e)
    _print_info(manifest)
    out.print(f"bundle -> {out_dir}")


def _print_info(m) -> None:
    from rich.table import Table

    table = Table(
        title=f"{len(m.experts)} experts, trajectory mean {m.trajectory_macs_ratio():.3f} x base MACs"
    )
    for col in ("expert", "timesteps", "SNR dB", "MACs", "vs base", "target", "params", "importance"):
        table.add_column(col, justify="right")
    for e in m.experts:
        table.add_row(
            e.name,
            f"[{e.lo}, {e.hi})",
            f"{e.snr_db[0]:.1f} .. {e.snr_db[1]:.1f}",
            f"{e.macs / 1e6:.2f}M",
            f"{e.macs / m.base_macs:.3f}",
            f"{e.target_macs / m.base_macs:.3f}",
            f"{e.params / 1e6:.3f}M",
            e.importance,
        )
    table.add_row("base", "", "", f"{m.base_macs / 1e6:.2f}M", "1.000", "", f"{m.base_params / 1e6:.3f}M", "")
    out.print(table)


@app.command()
def info(bundle: Annotated[Path, typer.Argument(help="Bundle directory.")]) -> None:
    """Table of a bundle's experts: interval, SNR range, MACs vs base, params."""
    from stepadapt.bundle import Bundle

    try:
        b = Bundle.load(bundle)
    except StepadaptError as e:
        _fail(e)
    _print_info(b.manifest)


@app.command()
def finetune(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (weights are replaced in place).")],
    data: Annotated[
        str, typer.Option(help="'fashion-mnist', an image folder, or an .npz file.")
    ] = "fashion-mnist",
    iterations: Annotated[int, typer.Option(help="Total iterations (both phases, all experts).")] = 2000,
    mode: Annotated[
        str,
        typer.Option(
            help="separate: each expert alone on its interval, iterations split by interval length; "
            "shared: all pruned experts at once as slices of one network (every update reaches every "
            "expert; measured worse on the shipped base, see docs/results.md)."
        ),
    ] = DEFAULT_MODE,
    specialize: Annotated[
        float, typer.Option(help="shared: fraction of the iterations for a separate phase afterwards.")
    ] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = DEFAULT_BATCH,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = DEFAULT_LR,
    loss_weight: Annotated[
        str,
        typer.Option(
            help="none, min-snr, or relative: each timestep's loss over the base's own loss there, so "
            "the noisy steps (small eps errors, large image errors) are not neglected."
        ),
    ] = "none",
    min_snr_gamma: Annotated[float, typer.Option(help="gamma of min-SNR weighting.")] = 5.0,
    distill: Annotated[
        float, typer.Option(help="Weight of the base's eps in the target (0..1); the rest is the true noise.")
    ] = DEFAULT_DISTILL,
    teacher: Annotated[
        Path,
        typer.Option(
            help="The base the bundle was pruned from: teacher for --distill, start of --mode shared."
        ),
    ] = DEFAULT_BASE,
    expert: Annotated[list[str] | None, typer.Option(help="Only this expert (repeatable; separate).")] = None,
    limit: Annotated[int | None, typer.Option(help="Use a deterministic subset of N images.")] = None,
    seed: Annotated[int, typer.Option(help="Seed (expert i uses seed + i).")] = 0,
    resume: Annotated[
        bool, typer.Option(help="Continue from BUNDLE/finetune/ checkpoints (after a crash or kill).")
    ] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint period in steps.")] = 250,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    sampler: Annotated[str, typer.Option(help=SAMPLER_HELP)] = "uniform",
    clusters: Annotated[int, typer.Option(help="curriculum: clusters per interval.")] = 20,
    patience: Annotated[int, typer.Option(help="curriculum: flat-loss updates before the next stage.")] = 200,
    visit_steps: Annotated[int, typer.Option(help="visited: the DDIM step count served.")] = 25,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
) -> None:
    """Fine-tune the pruned experts on their own timesteps; the EMA weights replace the pruned ones.

    By default all pruned experts train together as slices of one shared
    network, distilled from the base; experts the base already fits are the
    base and stay untouched. Under `torchrun --nproc_per_node N` training uses
    DDP (the batch is split over N processes; rank 0 writes the bundle).
    """
    from stepadapt import distributed
    from stepadapt.bundle import Bundle
    from stepadapt.data import load_dataset
    from stepadapt.finetune import finetune_bundle, finetune_config
    from stepadapt.models import load_base

    try:
        dev = resolve_device(device)
        resolve_precision(precision, dev)
        if threads:
            torch.set_num_threads(threads)
        distributed.init_from_env()
        b = Bundle.load(bundle)
        c, size = b.manifest.sample_shape[0], b.manifest.sample_shape[1]
        x = load_dataset(data, "train", size, c, limit=limit, seed=seed)
        template = finetune_config(
            iterations, batch_size=batch_size, lr=lr, seed=seed, loss_weight=loss_weight,
            min_snr_gamma=min_snr_gamma, distill=distill, sampler=sampler, clusters=clusters,
            patience=patience, visit_steps=visit_steps, checkpoint_every=checkpoint_every,
            precision=precision,
        )  # fmt: skip
        t_model = (
            load_base(teacher)[0] if distill > 0 or mode == "shared" or loss_weight == "relative" else None
        )
        results = finetune_bundle(
            b, x, template, iterations, mode=mode, specialize=specialize, experts=expert, teacher=t_model,
            resume=resume, log=console.print, device=dev,
        )  # fmt: skip
    except StepadaptError as e:
        _fail(e)
    if not distributed.is_main():
        return
    for name, r in results.items():
        out.print(f"{name}: {r.steps} steps, final loss {r.final_loss:.4f}, {r.images_per_second:.0f} img/s")
    out.print(f"bundle updated: {bundle} (re-run 'stepadapt export' before serving)")


@app.command()
def evaluate(
    targets: Annotated[
        list[Path],
        typer.Argument(help="Bundles and/or base model dirs to score (each as named by its path)."),
    ],
    base: Annotated[Path, typer.Option(help="Base model: the fidelity reference.")] = DEFAULT_BASE,
    n: Annotated[int, typer.Option(help="Generated images per target.")] = 200,
    n_real: Annotated[int | None, typer.Option(help="Real test images (default: --n).")] = None,
    steps: Annotated[int | None, typer.Option(help=STEPS_HELP)] = None,
    sampler: Annotated[str | None, typer.Option(help=SOLVER_HELP + " The same for every target.")] = None,
    jump: Annotated[
        bool | None, typer.Option("--jump/--no-jump", help=JUMP_HELP + " Base models never jump.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Noise seed, the same for every target.")] = 0,
    data: Annotated[str, typer.Option(help="Real data: 'fashion-mnist' (test split), a folder or .npz.")] = (
        "fashion-mnist"
    ),
    kid_subsets: Annotated[int, typer.Option(help="Random subsets for KID's mean and std.")] = 100,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Real-feature cache (default ~/.cache/stepadapt).")
    ] = None,
    out_path: Annotated[Path, typer.Option("--out", help="JSON report.")] = Path("eval.json"),
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    device: Annotated[
        str, typer.Option(help=DEVICE_HELP + " The models' device (Inception stays on CPU).")
    ] = "auto",
) -> None:
    """Score sample quality: KID and FID (Inception-v3 features), fidelity to the base (same noise, PSNR),
    sliced Wasserstein distance on pixels.

    FID at a few hundred images is biased upwards; compare numbers only at the same --n.
    """
    from rich.table import Table

    from stepadapt.evaluate import evaluate_targets
    from stepadapt.io import write_json
    from stepadapt.solvers import resolve_setting
    from stepadapt.tune import recommended_of

    try:
        dev = resolve_device(device)
        if threads:
            torch.set_num_threads(threads)
        if n < 2 or (n_real is not None and n_real < 2):
            raise StepadaptError("--n and --n-real must be at least 2")
        setting = resolve_setting(recommended_of(targets), sampler, steps, jump)
        console.print(f"sampling with {setting}")
        report = evaluate_targets(
            {str(t): t for t in targets}, base, n=n, n_real=n_real, steps=setting.steps, seed=seed, data=data,
            cache_dir=cache_dir, kid_subsets=kid_subsets, log=console.print, device=dev,
            sampler=setting.sampler, jump=setting.jump,
        )  # fmt: skip
        write_json(out_path, report)
    except StepadaptError as e:
        _fail(e)
    table = Table(title=f"{n} images, {steps} DDIM steps, seed {seed}")
    for col in ("target", "MACs/base", "KID", "FID", "PSNR vs base", "SWD", "sampling s"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for name, r in report["results"].items():
        table.add_row(
            name, f"{r['macs_ratio']:.3f}", f"{r['kid']:.4f} ± {r['kid_std']:.4f}", f"{r['fid']:.1f}",
            f"{r['psnr']:.2f}", f"{r['swd']:.4f}", f"{r['sample_seconds']:.1f}",
        )  # fmt: skip
    out.print(table)
    out.print(f"report -> {out_path}")


@app.command()
def tune(
    bundle: Annotated[Path, typer.Argument(help="Bundle whose manifest gets the recommendation.")],
    max_macs_per_image: Annotated[
        float, typer.Option(help="Budget: MACs per image, in base evaluations (e.g. 4 = four base steps).")
    ],
    base: Annotated[
        Path | None, typer.Option(help="Also score this base model's own best setting within the budget.")
    ] = None,
    samplers: Annotated[
        str, typer.Option(help="Solvers to try, comma-separated specs (see 'sample --help').")
    ] = ",".join(TUNE_SAMPLERS),
    steps: Annotated[str, typer.Option(help="Step counts to try, comma-separated.")] = ",".join(
        map(str, TUNE_STEPS)
    ),
    base_samplers: Annotated[
        str | None, typer.Option(help="Solvers to try on --base (default: --samplers).")
    ] = None,
    jump: Annotated[
        bool | None,
        typer.Option("--jump/--no-jump", help="Also try the analytic jump (default: where it exists)."),
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Generated and real images per KID.")] = 500,
    seeds: Annotated[str, typer.Option(help="Noise seeds, comma-separated; KID is their mean.")] = "0,1",
    data: Annotated[str, typer.Option(help="Real data: 'fashion-mnist' (test split), a folder or .npz.")] = (
        "fashion-mnist"
    ),
    store: Annotated[
        Path | None,
        typer.Option(help="Where scores are kept and reused (default ~/.cache/stepadapt/scores)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the settings within the budget; score none.")
    ] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
) -> None:
    """Measure how to sample a bundle: every solver setting within a MAC budget per image is scored
    (KID, mean over --seeds) and the best becomes the bundle's default for sample, evaluate, the
    endpoint and the demo. Settings cost what their model evaluations cost (Heun's two per step)."""
    from rich.table import Table

    from stepadapt.evaluate import load_target
    from stepadapt.tune import candidates
    from stepadapt.tune import tune as run_tune

    try:
        dev = resolve_device(device)
        if threads:
            torch.set_num_threads(threads)
        spec_list = [s.strip() for s in _parse_list(samplers, "--samplers", str) if s.strip()]
        step_list, seed_list = _parse_ints(steps, "--steps"), _parse_ints(seeds, "--seeds")
        if dry_run:
            target = load_target(bundle, dev)
            want_jump = target.bundle is not None and target.bundle.experts[-1].kind == "gaussian"
            options = candidates(
                target, max_macs_per_image, spec_list, step_list, want_jump if jump is None else jump
            )
            for setting, macs in options:
                out.print(f"{setting}: {macs:.2f} base evaluations per image")
            out.print(f"{len(options)} settings within {max_macs_per_image} base evaluations per image")
            return
        rec = run_tune(
            bundle, max_macs_per_image, base=base, samplers=spec_list, steps=step_list, jump=jump, n=n,
            seeds=seed_list, data=data, store=store, device=dev, log=console.print,
            command=" ".join(["stepadapt", *sys.argv[1:]]),
            base_samplers=_parse_list(base_samplers, "--base-samplers", str),
        )  # fmt: skip
    except StepadaptError as e:
        _fail(e)
    table = Table(title=f"{bundle}: KID at n={n}, mean over seeds {seed_list}")
    for col in ("setting", "MACs / image", "KID"):
        table.add_column(col)
    for r in sorted(rec["rows"], key=lambda r: r["kid"]):
        label = f"{r['sampler']} x{r['steps']}" + (" +jump" if r["jump"] else "")
        table.add_row(label, f"{r['macs_per_image']:.2f}", f"{r['kid']:.4f} ± {r['kid_std']:.4f}")
    console.print(table)
    best = rec["base_best"]
    vs = (
        f"; the base's best within it: {best['sampler']} x{best['steps']}, KID {best['kid']:.4f}"
        if best
        else ""
    )
    out.print(
        f"recommended: {rec['sampler']} x{rec['steps']}{' +jump' if rec['jump'] else ''} "
        f"({rec['macs_per_image']:.2f} base evaluations per image), KID {rec['kid']:.4f}{vs} "
        f"-> {bundle}/manifest.json"
    )


@app.command()
def export(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    atol: Annotated[float, typer.Option(help="Max abs error allowed vs PyTorch (fp32).")] = 1e-4,
    trt: Annotated[
        bool, typer.Option("--trt", help="Also build TensorRT engines (needs TensorRT + GPU).")
    ] = False,
) -> None:
    """Export every expert to ONNX (parity-checked in onnxruntime); optionally TensorRT."""
    from stepadapt.bundle import Bundle
    from stepadapt.export.onnx import export_bundle

    try:
        b = Bundle.load(bundle)
        if trt:
            from stepadapt.export.tensorrt import require

            require()  # fail before spending time on ONNX
        reports = export_bundle(b, opset=opset, atol=atol, log=console.print)
        if trt:
            from stepadapt.export import MAX_BATCH
            from stepadapt.export.tensorrt import build_engine, parity
            from stepadapt.io import sha256_file

            for e in b.experts:
                plan = build_engine(b.path / e.onnx["path"], b.path / "trt" / f"{e.name}.plan",
                                    timing_cache=b.path / "trt" / "timing.cache")  # fmt: skip
                err = parity(plan, b.path / e.onnx["path"], e.lo, e.hi, b.manifest.sample_shape)
                if err > atol * 10:
                    raise StepadaptError(f"expert {e.name}: TensorRT parity failed (max abs error {err:.2e})")
                trt = {"path": f"trt/{plan.name}", "sha256": sha256_file(plan), "max_abs_err": err,
                       "max_batch": MAX_BATCH}  # fmt: skip
                b.update_experts({e.name: {"trt": trt}})
    except StepadaptError as e:
        _fail(e)
    for r in reports:
        out.print(f"{r.name}: {r.path} (max abs err {r.max_abs_err:.1e}, {r.seconds:.1f}s)")


@app.command()
def serve(
    bundle: Annotated[Path, typer.Argument(help="Exported bundle directory.")],
    repo: Annotated[
        Path | None, typer.Option(help="Where to write the model repository (default BUNDLE/triton).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps it local.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    layout: Annotated[
        str,
        typer.Option(
            help="fused: the experts run inside the router, concurrent requests share each step's "
            "batch (fastest on CPU, docs/benchmarks.md). bls: each expert is a Triton model called "
            "once per step (for a full Triton's GPU backends)."
        ),
    ] = "fused",
    threads: Annotated[int, typer.Option(help="onnxruntime threads per session.")] = 1,
    instances: Annotated[
        int, typer.Option(help="Copies of the sampler (fused) or of each expert (bls) running at once.")
    ] = 2,
    max_images: Annotated[
        int,
        typer.Option(help="Most images one request may ask for (= expert max batch, = TensorRT's profile)."),
    ] = RepositoryOptions.max_batch,
    max_queue: Annotated[
        int, typer.Option(help="Requests that may wait beyond those running; more are refused at once.")
    ] = RepositoryOptions.max_queue,
    queue_timeout: Annotated[
        float, typer.Option(help="Seconds a request may wait in the queue before it is refused.")
    ] = RepositoryOptions.queue_timeout_s,
    max_seconds: Annotated[
        float,
        typer.Option(
            help="Seconds a request may run before it is stopped with an error (bounds work an HTTP "
            "client abandoned: only gRPC can cancel)."
        ),
    ] = RepositoryOptions.max_seconds,
    model_config_name: Annotated[
        str | None,
        typer.Option(help="'gpu' selects the TensorRT/ONNX Runtime GPU configs (full Triton only)."),
    ] = None,
    tritonserver: Annotated[
        Path | None,
        typer.Option(
            help="An installed full Triton's tritonserver (e.g. /opt/tritonserver/bin/tritonserver in NGC's "
            "container; backends from ../backends). Default: the python-backend-only one in the "
            "nvidia-pytriton wheel."
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(help="onnxruntime's device: auto (CUDA where onnxruntime-gpu is installed), cpu, cuda."),
    ] = "auto",
    log: Annotated[Path | None, typer.Option(help="Triton log file (default BUNDLE/triton.log).")] = None,
) -> None:
    """Write the Triton model repository for BUNDLE and run tritonserver until Ctrl-C / SIGTERM.

    Stopping takes a few seconds even with requests in flight: they end with an error.
    """
    import signal
    import threading

    from stepadapt.bundle import Bundle
    from stepadapt.export.runtime import providers
    from stepadapt.serving.repository import write_repository
    from stepadapt.serving.server import TritonServer

    try:
        providers(device)  # a bad --device is said here, not as a model that fails to load
        b = Bundle.load(bundle)
        opts = RepositoryOptions(
            threads=threads, instances=instances, max_batch=max_images, layout=layout, max_queue=max_queue,
            queue_timeout_s=queue_timeout, max_seconds=max_seconds, device=device,
        )  # fmt: skip
        repo_path = write_repository(b, repo or b.path / "triton", opts)
        server = TritonServer(
            repo_path, host=host, http_port=http_port, grpc_port=grpc_port,
            log_path=log or b.path / "triton.log", model_config_name=model_config_name, binary=tritonserver,
        )  # fmt: skip
        console.print(f"starting tritonserver on {host} (repository {repo_path}) ...")
        signal.signal(signal.SIGTERM, _interrupt)  # while starting: stop it like Ctrl-C does
        server.start()
    except StepadaptError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("stopped before tritonserver was ready")
        raise typer.Exit(130) from None
    out.print(
        f"HTTP  http://{server.http_url}  (POST /v2/models/generate/infer, "
        "/v2/models/generate_stream/generate_stream)"
    )
    out.print(f"gRPC  {server.grpc_url}")
    out.print(f"try:  stepadapt generate --url {server.http_url} --n 16 --out grid.png")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored (`&`)
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            if server.proc is None or server.proc.poll() is not None:
                console.print(f"tritonserver exited; see {server.log_path}")
                raise typer.Exit(1)
    finally:
        console.print("stopping tritonserver ...")
        server.stop()


@app.command()
def bench(
    bundles: Annotated[
        list[Path] | None, typer.Argument(help="Bundle directories to measure (none: only --docs).")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="A small run (CI): batches 1 and 8, 10 steps, few requests.")
    ] = False,
    sections: Annotated[
        str, typer.Option(help="Comma-separated: flops, latency, trajectory, serving.")
    ] = "flops,latency,trajectory,serving",
    base: Annotated[
        Path | None, typer.Option(help="Base model dir for the base arm (default: the architecture, fresh).")
    ] = None,
    results: Annotated[Path, typer.Option(help="Where bench-<name>.json goes.")] = Path("benchmarks/results"),
    docs: Annotated[
        Path | None, typer.Option(help="Regenerate this page (and its plots) from the reports in --results.")
    ] = None,
    work: Annotated[Path, typer.Option(help="Exported arms and Triton repositories (reused).")] = Path(
        "runs/bench-work"
    ),
    concurrency: Annotated[str | None, typer.Option(help="Concurrency levels, e.g. 1,2,4,8,16.")] = None,
    requests: Annotated[int | None, typer.Option(help="Requests per concurrency level.")] = None,
    layouts: Annotated[str | None, typer.Option(help="Repository layouts to serve: fused,bls.")] = None,
    backends: Annotated[
        str | None,
        typer.Option(
            help="In-process backends to time: torch, onnxruntime-t1, onnxruntime-t2, onnxruntime-basic-t2 "
            "and, on a GPU, torch-cuda, torch-cuda-bf16, onnxruntime-cuda (default: all this machine has)."
        ),
    ] = None,
    sampler: Annotated[
        str, typer.Option(help="Solver spec of every timed trajectory and request (see 'sample --help').")
    ] = "ddim",
) -> None:
    """Latency/FLOP benchmark: MACs per expert and per image, latency per step per backend beside the
    MAC ratio, time per image in process and through the endpoint, and serving under concurrency.

    Writes RESULTS/bench-<bundle name>.json (machine, versions, commit, settings, raw samples). With
    --docs, renders every report in RESULTS into that page with PNG plots.
    """
    import dataclasses
    import shlex
    import sys

    from stepadapt.benchmarks.bench import BenchSettings, run_bench, write_report
    from stepadapt.solvers import Solver

    try:
        settings = BenchSettings.quick_run() if quick else BenchSettings()
        changes: dict = {"sections": tuple(x.strip() for x in sections.split(",") if x.strip())}
        changes["sampler"] = str(Solver.parse(sampler))
        if concurrency:
            changes["concurrency"] = tuple(_parse_ints(concurrency, "--concurrency"))
        if requests:
            changes["requests"] = requests
        if layouts:
            changes["layouts"] = tuple(x.strip() for x in layouts.split(","))
        if backends:
            changes["backends"] = tuple(x.strip() for x in backends.split(",") if x.strip())
        settings = dataclasses.replace(settings, **changes)
        if not bundles and not docs:
            raise StepadaptError("nothing to do: name a bundle to measure, or --docs to render the reports")
        command = "stepadapt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        for b in bundles or []:
            report = run_bench(b, settings, work=work / b.name, base=base, command=command, log=console.print)
            out.print(f"report -> {write_report(report, results)}")
        if docs:
            out.print(f"page -> {_render_docs(results, docs)}")
    except StepadaptError as e:
        _fail(e)


def _render_docs(results: Path, docs: Path) -> Path:
    from stepadapt.benchmarks.report import render
    from stepadapt.io import read_json

    reports = [read_json(p, "bench report") for p in sorted(results.glob("bench-*.json"))]
    return render(reports, docs)


@app.command()
def generate(
    url: Annotated[
        str, typer.Option(help="host:port of Triton (HTTP port, or gRPC port with --grpc/--stream).")
    ] = ("127.0.0.1:8000"),
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 16,
    steps: Annotated[
        int | None, typer.Option(help="Solver steps (default: the served bundle's recommended).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise.")] = 0,
    sampler: Annotated[str | None, typer.Option(help=SOLVER_HELP)] = None,
    eta: Annotated[float | None, typer.Option(help="DDIM eta.")] = None,
    jump: Annotated[bool | None, typer.Option("--jump/--no-jump", help=JUMP_HELP)] = None,
    grpc: Annotated[bool, typer.Option("--grpc", help="Use gRPC instead of HTTP.")] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Stream per-step progress (gRPC).")] = False,
    out_path: Annotated[Path, typer.Option("--out", help="PNG grid to write (.npz beside it).")] = Path(
        "grid.png"
    ),
) -> None:
    """Ask a running endpoint for images and save them as a grid."""
    from stepadapt.progress import progress
    from stepadapt.sampling import save_grid, save_npz
    from stepadapt.serving.client import GenerateRequest, generate_stream
    from stepadapt.serving.client import generate as call

    req = GenerateRequest(num_images=n, steps=steps, seed=seed, sampler=sampler, eta=eta, jump=jump)
    try:
        if stream:
            with progress(total=None, unit="eval") as bar:

                def on_step(i: int, t: int, expert: str) -> None:
                    bar.set_postfix(t=t, expert=expert, refresh=False)
                    bar.update(1)

                images = generate_stream(url, req, on_step)
        else:
            images = call(url, req, protocol="grpc" if grpc else "http")
        save_grid(images, out_path)
        save_npz(images, out_path.with_suffix(".npz"))
    except StepadaptError as e:
        _fail(e)
    out.print(f"{len(images)} images -> {out_path}")


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where the demo writes its results.")] = Path(
        "demo-out"
    ),
    base: BaseOpt = DEFAULT_BASE,
    budget: Annotated[float, typer.Option(help="Target mean MACs per step, fraction of the base.")] = 0.5,
    groups: Annotated[int, typer.Option(help="Number of experts.")] = 4,
    gaussian: Annotated[
        bool,
        typer.Option(
            "--gaussian/--no-gaussian",
            help="The closed-form Gaussian expert on the noisy end (as analyze --gaussian auto).",
        ),
    ] = True,
    n: Annotated[int, typer.Option("--n", help="Images per sample grid.")] = 36,
    finetune_iterations: Annotated[
        int, typer.Option(help="Fine-tuning iterations for this run's bundle (0 skips fine-tuning).")
    ] = 300,
    kid_images: Annotated[int, typer.Option(help="Images per KID (0 skips the KID stage).")] = 128,
    serve_shipped: Annotated[
        bool,
        typer.Option(
            "--serve-shipped/--serve-own",
            help="Serve the shipped, longer fine-tuned bundle (default), or the one this run made.",
        ),
    ] = True,
    device: Annotated[str, typer.Option(help=DEVICE_HELP + " The PyTorch stages' device.")] = "auto",
) -> None:
    """The main job on the shipped default base: analyze -> prune -> fine-tune -> KID -> export -> serve.

    Writes OUT/base_samples.png, OUT/plan.json + plan.png, OUT/bundle/ (this
    run's experts), OUT/bundle_samples.png (pruned only), OUT/finetuned_samples.png,
    OUT/served/ (the bundle served: the shipped one, fine-tuned longer by the same
    commands), OUT/endpoint_samples.png (from a real tritonserver on 127.0.0.1) and
    OUT/base_vs_experts.png. Every grid uses the same seed, so they compare 1:1.
    """
    from stepadapt.serving.demo import SHIPPED_BUNDLE, Demo

    try:
        shipped = SHIPPED_BUNDLE if serve_shipped else out_dir / "bundle"
        result = Demo(
            out_dir, base_dir=base, budget=budget, groups=groups, gaussian=gaussian, n=n,
            kid_images=kid_images, finetune_iterations=finetune_iterations, shipped=shipped,
            log=console.print, device=resolve_device(device),
        ).run()  # fmt: skip
    except StepadaptError as e:
        _fail(e)
    for name, (k, sd) in result["kid"].items():
        out.print(f"KID {name}: {k:.4f} ± {sd:.4f}")
    out.print(f"done: see {out_dir}/ (base_vs_experts.png, plan.png, *_samples.png, bundle/, served/)")


def main() -> None:  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
