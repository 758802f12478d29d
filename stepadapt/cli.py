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
from rich.markup import escape

from stepadapt import Notice, StepadaptError
from stepadapt.analyze import AnalyzeOptions
from stepadapt.classifier import ClassifierOptions
from stepadapt.compress import PruneOptions
from stepadapt.data import DEFAULT_HOLDOUT, HOLDOUT_HELP
from stepadapt.devices import DEVICE_HELP, resolve_device
from stepadapt.export.stage import ExportOptions
from stepadapt.finetune import FinetuneOptions
from stepadapt.flags import command
from stepadapt.models import DEFAULT_BASE
from stepadapt.serving.demo import DemoOptions
from stepadapt.serving.stage import ServeOptions
from stepadapt.train_base import TrainBaseOptions
from stepadapt.train_text import TrainTextOptions
from stepadapt.train_vae import TrainVaeOptions
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
    console.print(f"[bold red]error:[/] {escape(str(e))}")  # a message may hold brackets: not markup
    raise typer.Exit(2)


SOLVER_HELP = (
    "Solver, as NAME[:OPTION,...]: ddim, ddpm, dpm++2m, dpm++3m, dpm++2m-sde, dpm++sde, unipc, euler, "
    "euler-a, heun, pndm, lms; options thresholding (dynamic, max 1.0), karras, clip, no-clip, "
    "spacing=leading|trailing|linspace, eta=X (ddim). E.g. 'dpm++2m:thresholding'. Default: the "
    "bundle's recommended setting ('stepadapt tune'), else ddim."
)
STEPS_HELP = "Solver steps (default: the bundle's recommended, else 50)."
REAL_DATA_HELP = "Real data: 'fashion-mnist', a folder or .npz (its held-out part)."
JUMP_HELP = (
    "Carry x_T in closed form over the Gaussian expert's interval (its exact flow) and spend every "
    "step below it (bundles with a Gaussian expert; default: the bundle's recommendation)."
)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _command() -> str:
    """This command line, as a bundle's provenance records it."""
    import shlex

    return " ".join(["stepadapt", *map(shlex.quote, sys.argv[1:])])


def _renamed(opts, old: str | None, default: str):
    """The old spelling --sampler of --timestep-sampler still works, with a one-line notice; both at
    once (with different values) is refused rather than one silently winning."""
    if old is None:
        return opts
    if opts.timestep_sampler not in (default, old):
        raise StepadaptError("--sampler is the old name of --timestep-sampler: give only one of them")
    warnings.warn(Notice("--sampler here is now --timestep-sampler (the timestep sampler)"), stacklevel=2)
    return opts.replace(timestep_sampler=old)


OldSamplerOpt = Annotated[str | None, typer.Option("--sampler", hidden=True, help="Old --timestep-sampler.")]


@app.command("train-base")
@command(TrainBaseOptions, _fail)
def train_base(opts: TrainBaseOptions, sampler: OldSamplerOpt = None) -> None:
    """Train a base U-Net (epsilon prediction, AdamW, EMA, grad clipping).

    Writes OUT/checkpoint.pt (resumable), OUT/samples/step_*.png and, at the end,
    OUT/model/ (diffusers format, safetensors) with the EMA weights. Under
    `torchrun --nproc_per_node N` it trains with DDP (the batch is split over N).
    """
    from stepadapt import distributed
    from stepadapt.train_base import train_base as run

    try:
        opts = _renamed(opts, sampler, "uniform")
        res, model_dir = run(opts, log=console.print)
    except StepadaptError as e:
        _fail(e)
    if distributed.is_main():
        out.print(
            f"trained {res.steps} steps, final loss {res.final_loss:.4f}, "
            f"{res.images_per_second:.0f} img/s; model -> {model_dir}"
        )


@app.command("train-classifier")
@command(ClassifierOptions, _fail)
def train_classifier(opts: ClassifierOptions) -> None:
    """Train the image classifier whose accuracy on generated images `evaluate` reports for
    class-conditional models (a small CNN; OUT/model.safetensors + OUT/config.json)."""
    from stepadapt.classifier import train_classifier as run

    try:
        res, path = run(opts, log=console.print)
    except StepadaptError as e:
        _fail(e)
    acc = "no test part" if res.test_accuracy is None else f"{100 * res.test_accuracy:.2f}%"
    out.print(f"trained {res.iterations} steps in {res.seconds:.0f} s; test accuracy {acc}; -> {path}")


@app.command("train-vae")
@command(TrainVaeOptions, _fail)
def train_vae(opts: TrainVaeOptions) -> None:
    """Train the small VAE of a latent text-to-image pipeline (diffusers AutoencoderKL; its
    scaling_factor measured on the training latents). Writes OUT/vae/, OUT/reconstructions.png and a
    resumable OUT/checkpoint.pt; give OUT (with a text encoder beside it) to train-base --surround."""
    from stepadapt.train_vae import train_vae as run

    try:
        res, path = run(opts, log=console.print)
    except StepadaptError as e:
        _fail(e)
    psnr = "no held-out part" if res.psnr is None else f"held-out PSNR {res.psnr:.1f} dB"
    out.print(
        f"trained {res.steps} steps in {res.seconds:.0f} s; latents {res.latent_shape}, {psnr}; -> {path}"
    )


@app.command("train-text-encoder")
@command(TrainTextOptions, _fail)
def train_text_encoder(opts: TrainTextOptions) -> None:
    """Train a BPE tokenizer on the data's captions and a small CLIP text encoder against the
    images (contrastive, CLIP's loss). Writes OUT/tokenizer/ and OUT/text_encoder/ (safetensors)."""
    from stepadapt.train_text import train_text_encoder as run

    try:
        res, path = run(opts, log=console.print)
    except StepadaptError as e:
        _fail(e)
    acc = (
        "" if res.zero_shot_accuracy is None else f", zero-shot accuracy {100 * res.zero_shot_accuracy:.1f}%"
    )
    out.print(
        f"trained {res.steps} steps in {res.seconds:.0f} s; vocabulary {res.vocab_size}{acc}; -> {path}"
    )


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
    class_labels: Annotated[
        str | None,
        typer.Option(
            help="Class-conditional models: comma-separated labels, cycled over the --n images "
            "(default: every class in turn)."
        ),
    ] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option(help="Classifier-free guidance scale (1 = none; default 1, or 7.5 for text models)."),
    ] = None,
    prompt: Annotated[
        str | None, typer.Option(help="Text-to-image pipelines: the prompt of all --n images.")
    ] = None,
    negative_prompt: Annotated[
        str | None, typer.Option(help="Text-to-image pipelines: what guidance steers away from.")
    ] = None,
) -> None:
    """Sample images from a base model (a U-Net or a diffusers pipeline directory), or from a
    bundle's experts with per-step routing. A text-to-image pipeline samples as diffusers'
    StableDiffusionPipeline does (same seed, same images)."""
    from stepadapt.api import StepAdaptivePipeline
    from stepadapt.conditioning import conditioning_of, for_model, sampling_condition
    from stepadapt.kinds import UNET
    from stepadapt.models import load_base
    from stepadapt.pipeline import surround_of
    from stepadapt.plan import visited_timesteps
    from stepadapt.progress import progress
    from stepadapt.sampling import module_denoiser, sample_images, save_grid, save_npz
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
            rec, conditioning = b.manifest.recommended, b.manifest.conditioning
            surround = b.surround()
        else:
            model, sched_cfg = load_base(base)
            den, shape = module_denoiser(model.to(resolve_device(device))), UNET.sample_shape(model)
            conditioning, surround = conditioning_of(model.config), surround_of(base)
        labels = _parse_ints(class_labels, "--class-labels")
        setting = resolve_setting(rec, sampler, steps, jump, eta)
        if setting.jump:
            if bundle is None:
                raise StepadaptError("--jump needs a --bundle with a Gaussian expert on the noisy end")
            j = b.jump()
        per_chunk = len(visited_timesteps(setting.sampler, setting.steps, sched_cfg))
        with progress(total=per_chunk * -(-n // batch), unit="eval", disable=not sys.stderr.isatty()) as bar:
            if surround is not None:  # a pipeline: its text encoder and VAE around the denoiser
                pipe = StepAdaptivePipeline(den, sched_cfg, shape, conditioning, surround, rec, j)
                res = pipe(
                    prompt, negative_prompt, class_labels=labels, num_inference_steps=setting.steps,
                    guidance_scale=guidance_scale, num_images_per_prompt=n, sampler=setting.sampler,
                    generator=torch.Generator().manual_seed(seed), output_type="uint8",
                    callback=lambda i, t, x: bar.update(1),
                )  # fmt: skip
                images = res.images
                if any(res.truncated):
                    console.print("[yellow]note:[/] the prompt is longer than the tokenizer's limit: cut")
            else:
                if prompt is not None or negative_prompt is not None:
                    raise StepadaptError("--prompt is for text-to-image pipelines; this model takes no text")
                scale = 1.0 if guidance_scale is None else guidance_scale
                cond = sampling_condition(conditioning, n, labels, scale)
                images = sample_images(
                    for_model(den, conditioning), sched_cfg, shape, n, steps=setting.steps,
                    sampler=setting.sampler, seed=seed, batch=batch, callback=lambda i, t, x: bar.update(1),
                    jump=j, cond=cond,
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


@app.command()
@command(AnalyzeOptions, _fail)
def analyze(opts: AnalyzeOptions) -> None:
    """Difficulty per timestep -> groups and a MAC budget per group (plan.json + plot)."""
    from stepadapt.analyze import analyze as run
    from stepadapt.tables import gaussian_lines, plan_table

    try:
        result = run(opts, log=console.print)
    except StepadaptError as e:
        _fail(e)
    if result.note:
        console.print(f"no Gaussian expert: {result.note}")
    for line in gaussian_lines(result.plan):
        out.print(line)
    out.print(plan_table(result.plan))
    out.print(f"plan -> {opts.out}, plot -> {result.plot}")


@app.command()
@command(PruneOptions, _fail)
def prune(opts: PruneOptions) -> None:
    """Prune one expert per plan group (candidate search by proxy loss) -> bundle.

    A Gaussian group gets the closed-form denoiser analyze fitted (kept beside
    the plan) instead; neighbouring groups that both keep the whole base are one expert.
    """
    from stepadapt.compress import prune as run
    from stepadapt.tables import bundle_table

    try:
        manifest = run(opts, log=console.print, command=_command())
    except StepadaptError as e:
        _fail(e)
    out.print(bundle_table(manifest))
    out.print(f"bundle -> {opts.out}")


@app.command()
def info(bundle: Annotated[Path, typer.Argument(help="Bundle directory.")]) -> None:
    """Table of a bundle's experts: interval, SNR range, MACs vs base, params."""
    from stepadapt.bundle import Bundle
    from stepadapt.tables import bundle_table

    try:
        b = Bundle.load(bundle)
    except StepadaptError as e:
        _fail(e)
    out.print(bundle_table(b.manifest))


@app.command()
@command(FinetuneOptions, _fail)
def finetune(opts: FinetuneOptions, sampler: OldSamplerOpt = None) -> None:
    """Fine-tune the pruned experts on their own timesteps; the EMA weights replace the pruned ones.

    Each pruned expert trains alone on its interval (or all together with --mode
    shared), distilled from the base the bundle records; experts the base already
    fits are the base and stay untouched. Under `torchrun --nproc_per_node N`
    training uses DDP (the batch is split over N processes; rank 0 writes the bundle).
    """
    from stepadapt import distributed
    from stepadapt.finetune import finetune as run

    try:
        opts = _renamed(opts, sampler, "uniform")
        results = run(opts, log=console.print)
    except StepadaptError as e:
        _fail(e)
    if not distributed.is_main():
        return
    for name, r in results.items():
        out.print(f"{name}: {r.steps} steps, final loss {r.final_loss:.4f}, {r.images_per_second:.0f} img/s")
    out.print(f"bundle updated: {opts.bundle} (re-run 'stepadapt export' before serving)")


@app.command()
def evaluate(
    targets: Annotated[
        list[Path],
        typer.Argument(help="Bundles and/or base model dirs to score (each as named by its path)."),
    ],
    base: Annotated[
        Path | None,
        typer.Option(
            help="Base model: the fidelity reference (default: the base the bundles record; for bases "
            "alone, the first)."
        ),
    ] = None,
    allow_other_base: Annotated[
        bool, typer.Option("--allow-other-base", help="Take a --base of other weights than the recorded.")
    ] = False,
    n: Annotated[int, typer.Option(help="Generated images per target.")] = 200,
    n_real: Annotated[int | None, typer.Option(help="Real test images (default: --n).")] = None,
    steps: Annotated[int | None, typer.Option(help=STEPS_HELP)] = None,
    sampler: Annotated[str | None, typer.Option(help=SOLVER_HELP + " The same for every target.")] = None,
    jump: Annotated[
        bool | None, typer.Option("--jump/--no-jump", help=JUMP_HELP + " Base models never jump.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Noise seed, the same for every target.")] = 0,
    data: Annotated[str, typer.Option(help=REAL_DATA_HELP)] = "fashion-mnist",
    holdout: Annotated[float, typer.Option(help=HOLDOUT_HELP)] = DEFAULT_HOLDOUT,
    kid_subsets: Annotated[int, typer.Option(help="Random subsets for KID's mean and std.")] = 100,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Real-feature cache (default ~/.cache/stepadapt).")
    ] = None,
    out_path: Annotated[Path, typer.Option("--out", help="JSON report.")] = Path("eval.json"),
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    device: Annotated[
        str, typer.Option(help=DEVICE_HELP + " The models' device (Inception stays on CPU).")
    ] = "auto",
    guidance_scale: Annotated[
        float | None,
        typer.Option(
            help="Conditional models: classifier-free guidance scale (1 = none; default 1, or 7.5 for "
            "text models)."
        ),
    ] = None,
    classifier: Annotated[
        Path | None,
        typer.Option(
            help="Conditional models: the classifier whose accuracy on the generated images is "
            "reported (default: the shipped one, for Fashion-MNIST; see 'train-classifier')."
        ),
    ] = None,
) -> None:
    """Score sample quality: KID and FID (Inception-v3 features), fidelity to the base (same noise, PSNR),
    sliced Wasserstein distance on pixels.

    A text model (a pipeline directory, or a bundle pruned from one) draws each image from the caption
    of one of the held-out images it is scored against; on Fashion-MNIST the classifier reads whether
    each image is of its caption's class.

    FID at a few hundred images is biased upwards; compare numbers only at the same --n.
    """
    from stepadapt.evaluate import evaluate_targets
    from stepadapt.io import write_json
    from stepadapt.solvers import resolve_setting
    from stepadapt.tables import evaluate_table
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
            {str(t): t for t in targets}, base, allow_other_base=allow_other_base,
            n=n, n_real=n_real, steps=setting.steps, seed=seed, data=data,
            cache_dir=cache_dir, kid_subsets=kid_subsets, log=console.print, device=dev,
            sampler=setting.sampler, jump=setting.jump, holdout=holdout,
            guidance_scale=guidance_scale, classifier=classifier,
        )  # fmt: skip
        write_json(out_path, report)
    except StepadaptError as e:
        _fail(e)
    out.print(evaluate_table(report, n, setting, seed))
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
    data: Annotated[str, typer.Option(help=REAL_DATA_HELP)] = "fashion-mnist",
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
    from stepadapt.evaluate import load_target
    from stepadapt.tables import tune_line, tune_table
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
            options = candidates(
                target, max_macs_per_image, spec_list, step_list, target.can_jump if jump is None else jump
            )
            for setting, macs in options:
                out.print(f"{setting}: {macs:.2f} base evaluations per image")
            out.print(f"{len(options)} settings within {max_macs_per_image} base evaluations per image")
            return
        rec = run_tune(
            bundle, max_macs_per_image, base=base, samplers=spec_list, steps=step_list, jump=jump, n=n,
            seeds=seed_list, data=data, store=store, device=dev, log=console.print,
            command=_command(),
            base_samplers=_parse_list(base_samplers, "--base-samplers", str),
        )  # fmt: skip
    except StepadaptError as e:
        _fail(e)
    console.print(tune_table(rec, f"{bundle}: KID at n={n}, mean over seeds {seed_list}"))
    out.print(f"{tune_line(rec)} -> {bundle}/manifest.json")


@app.command()
@command(ExportOptions, _fail)
def export(opts: ExportOptions) -> None:
    """Export every expert to ONNX (parity-checked in onnxruntime); optionally TensorRT."""
    from stepadapt.export.stage import export as run

    try:
        result = run(opts, log=console.print)
    except StepadaptError as e:
        _fail(e)
    for r in result.onnx:
        out.print(f"{r.name}: {r.path} (max abs err {r.max_abs_err:.1e}, {r.seconds:.1f}s)")
    for name, rec in result.trt.items():
        out.print(f"{name}: {rec['path']} (TensorRT, max abs err {rec['max_abs_err']:.1e})")


@app.command()
@command(ServeOptions, _fail)
def serve(opts: ServeOptions) -> None:
    """Write the Triton model repository for BUNDLES and run tritonserver until Ctrl-C / SIGTERM.

    Several bundles of one base (e.g. base=runs/base experts=runs/experts) are served side by side:
    a request's budget picks one. With --slo-ms the server predicts when each request would finish
    and serves one that would miss it cheaper (degrade) or refuses it at once (reject).

    Stopping takes a few seconds even with requests in flight: they end with an error.
    """
    import signal
    import threading

    from stepadapt.serving.stage import start

    try:
        signal.signal(signal.SIGTERM, _interrupt)  # while starting: stop it like Ctrl-C does
        server = start(opts, log=console.print)
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
    if server.metrics_url:
        out.print(f"metrics  {server.metrics_url}")
    names = list(opts.served())
    if len(names) > 1:
        out.print(f"budgets  {', '.join(names)} (the first is the default)")
    if opts.slo() is not None:
        slo = opts.slo()
        out.print(f"SLO  {slo.ms:g} ms per {slo.per}, {slo.policy} what would miss it")
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
        str,
        typer.Option(help="Comma-separated: flops, latency, trajectory, serving, load (open-loop arrivals)."),
    ] = "flops,latency,trajectory,serving,load",
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
    MAC ratio, time per image in process and through the endpoint, serving under concurrency, and
    open-loop load (Poisson arrivals: the base alone, lockstep, the step engine, the engine with an SLO).

    Writes RESULTS/bench-<bundle name>.json (machine, versions, commit, settings, raw samples). With
    --docs, renders every report in RESULTS into that page with PNG plots.
    """
    import dataclasses

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
        command = _command()
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
    class_labels: Annotated[
        str | None,
        typer.Option(help="Class-conditional bundles: comma-separated labels, cycled over the --n images."),
    ] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option(help="Classifier-free guidance (1 = none; default 1, or 7.5 for text bundles)."),
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(help="Which served bundle (serve NAME=DIR ...); default: the server's first."),
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="Text-to-image bundles: the prompt.")] = None,
    negative_prompt: Annotated[
        str | None, typer.Option(help="Text-to-image bundles: what guidance steers away from.")
    ] = None,
) -> None:
    """Ask a running endpoint for images and save them as a grid; says what served them (a server
    with an SLO may have given fewer steps or a smaller bundle than asked)."""
    from stepadapt.progress import progress
    from stepadapt.sampling import save_grid, save_npz
    from stepadapt.serving.client import Endpoint, GenerateRequest, generate_stream

    try:
        labels = _parse_ints(class_labels, "--class-labels")
        req = GenerateRequest(
            num_images=n, steps=steps, seed=seed, sampler=sampler, eta=eta, jump=jump,
            class_labels=[labels[i % len(labels)] for i in range(n)] if labels else None,
            guidance_scale=guidance_scale, budget=budget, prompt=prompt, negative_prompt=negative_prompt,
        )  # fmt: skip
        served = None
        if stream:
            with progress(total=None, unit="eval") as bar:

                def on_step(i: int, t: int, expert: str) -> None:
                    bar.set_postfix(t=t, expert=expert, refresh=False)
                    bar.update(1)

                images = generate_stream(url, req, on_step)
        else:
            with Endpoint(url, "grpc" if grpc else "http") as endpoint:
                served = endpoint.infer(req)
            images = served.images
        save_grid(images, out_path)
        save_npz(images, out_path.with_suffix(".npz"))
    except StepadaptError as e:
        _fail(e)
    out.print(f"{len(images)} images -> {out_path}")
    if served is not None:
        how = " (degraded by the server's SLO)" if served.degraded else ""
        out.print(f"served by {served.bundle}: {served.sampler} x{served.steps}{how}")
        if served.truncated:
            console.print("[yellow]note:[/] the prompt was longer than the tokenizer's limit and was cut")


@app.command()
@command(DemoOptions, _fail)
def demo(opts: DemoOptions) -> None:
    """The main job on the shipped default base: analyze -> prune -> fine-tune -> KID -> export -> serve.

    Writes OUT/base_samples.png, OUT/plan.json + plan.png, OUT/bundle/ (this
    run's experts), OUT/bundle_samples.png (pruned only), OUT/finetuned_samples.png,
    OUT/served/ (the bundle served: the shipped one, fine-tuned longer by the same
    commands), OUT/endpoint_samples.png (from a real tritonserver on 127.0.0.1) and
    OUT/base_vs_experts.png. Every grid uses the same seed, so they compare 1:1.
    """
    from stepadapt.serving.demo import run_demo

    try:
        result = run_demo(opts, log=console.print)
    except StepadaptError as e:
        _fail(e)
    for name, (k, sd) in result["kid"].items():
        out.print(f"KID {name}: {k:.4f} ± {sd:.4f}")
    out.print(f"done: see {opts.out}/ (base_vs_experts.png, plan.png, *_samples.png, bundle/, served/)")


def main() -> None:  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
