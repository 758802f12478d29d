"""The step-adaptive vs uniform experiment, driven through the CLI so every step is a command you can rerun.

On the shipped Fashion-MNIST base, 50 DDIM steps:
- base;
- uniform-pruned (one model, `prune --uniform`) vs step-adaptive experts (4 SNR groups), at the same
  trajectory-mean MACs (0.5 x and 0.8 x base), each fine-tuned with the same number of iterations
  and images;
- the timestep-sampler ablation (uniform / curriculum / adaptive / loss-moment) for the step-adaptive
  experts at 0.5 x.
Every arm is then scored by `stepadapt evaluate` (KID, FID, fidelity PSNR to the base, SWD) in one call,
so they share the real features and the base's reference images.

    python -m benchmarks.experiment [--out runs/experiment] [--iterations 1200] [--n 300]

Each stage is skipped when its output exists, so a killed run continues where it stopped.
Results: OUT/eval.json and benchmarks/results/experiment.json (commands, timings, metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from stepadapt.io import read_json, write_json

CLI = [str(Path(sys.executable).with_name("stepadapt"))]
BASE = Path(__file__).resolve().parents[1] / "stepadapt" / "weights" / "fashion-tiny"


def run(cmd: list[str], log: list[dict], log_path: Path, done: Path | None = None) -> float:
    """Run one CLI command (unless ``done`` exists); record it with its wall time in ``log_path``."""
    text = " ".join(["stepadapt", *cmd])
    if done is not None and done.exists():
        print(f"skip (done): {text}", flush=True)
        prior = next((c for c in log if c["command"] == text), None)
        return prior["seconds"] if prior else float("nan")
    print(f"$ {text}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([*CLI, *cmd], check=True)
    seconds = round(time.perf_counter() - t0, 1)
    log.append({"command": text, "seconds": seconds})
    write_json(log_path, log)
    return seconds


def plot(results: dict, path: Path) -> Path:
    """KID and fidelity against trajectory MACs, one marker per arm; sample grids beside it in the docs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = results["arms"]
    style = {"base": ("black", "*"), "uniform": ("tab:red", "s"), "sa": ("tab:blue", "o")}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "kid", "KID (lower is better)"), (axes[1], "psnr", "PSNR vs base, dB")):
        for name, a in arms.items():
            if key == "psnr" and a["kind"] == "base":
                continue
            color, marker = style[a["kind"]]
            ax.errorbar(a["macs_ratio"], a[key], yerr=a["kid_std"] if key == "kid" else None, color=color,
                        marker=marker, capsize=3, linestyle="none")  # fmt: skip
            ax.annotate(
                name, (a["macs_ratio"], a[key]), textcoords="offset points", xytext=(5, 3), fontsize=7
            )
        ax.set_xlabel("mean MACs per DDIM step / base")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    s = results["settings"]
    fig.suptitle(
        f"uniform-pruned (red) vs step-adaptive (blue), {s['iterations']} fine-tuning iterations each, "
        f"n={s['n']} images, {s['steps']} DDIM steps"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_figure(samples: Path, names: list[str], path: Path) -> Path:
    """The arms' 16-image grids (same seed, so the same initial noise) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    names = [n for n in names if (samples / f"{n}.png").is_file()]
    cols = 4
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        ax.imshow(Image.open(samples / f"{name}.png"), cmap="gray")
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def figures(results: dict, samples: Path, plot_path: Path) -> str:
    """Both pictures of a results file: metrics against MACs, and the arms' sample grids."""
    grids = sample_figure(samples, list(results["arms"]), plot_path.with_name("experiment_samples.png"))
    return f"plot -> {plot(results, plot_path)}, samples -> {grids}"


def why(out: Path, arms: list[str], n: int, path: Path, seed: int = 0) -> dict:
    """Where is quality lost? For each group of the step-adaptive plan, sample with the base everywhere
    except that group's interval, which goes to the arm's model (its expert for the interval, or the
    uniform model). The damage each interval's model does, alone, then compares interval by interval.
    """
    from stepadapt.bundle import Bundle
    from stepadapt.evaluate import InceptionFeatures, generate, load_target, real_set, score
    from stepadapt.sampling import Router

    base, sched, shape, _ = load_target(BASE)
    net = InceptionFeatures()
    real_images, real_feats = real_set(net, "fashion-mnist", n, shape[1], shape[0], seed=seed)
    reference = generate(base, sched, shape, n, 50, seed)
    groups = Bundle.load(out / "arms" / arms[0]).experts  # the step-adaptive intervals
    rows: dict[str, dict] = {}
    for arm in arms:
        owner = Bundle.load(out / "arms" / arm).router()
        for g in groups:
            bounds = sorted({0, g.lo, g.hi, int(sched["num_train_timesteps"])})
            hybrid = Router(bounds, [owner if lo == g.lo else base for lo in bounds[:-1]])
            images = generate(hybrid, sched, shape, n, 50, seed)
            r = score(net, images, real_images, real_feats, reference)
            rows[f"{arm} on [{g.lo},{g.hi})"] = {"arm": arm, "lo": g.lo, "hi": g.hi, **r}
            print(f"{arm} only on [{g.lo},{g.hi}): KID {r['kid']:.4f}, PSNR {r['psnr']:.2f}", flush=True)
    write_json(path, {"n": n, "seed": seed, "rows": rows})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/experiment"))
    ap.add_argument(
        "--iterations", type=int, default=1200, help="fine-tuning iterations per arm (all experts)"
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--n", type=int, default=300, help="generated (and real) images per arm for the metrics")
    ap.add_argument("--budgets", default="0.5,0.8")
    ap.add_argument("--samplers", default="uniform,curriculum,adaptive,loss-moment")
    ap.add_argument("--clusters", type=int, default=5, help="curriculum clusters (short budgets: few)")
    ap.add_argument("--patience", type=int, default=20, help="curriculum plateau length")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/experiment.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/images/experiment.png"))
    ap.add_argument("--replot", action="store_true", help="only redraw --plot from --results")
    ap.add_argument(
        "--why", default=None, help="comma-separated arms: each alone on each group, base elsewhere"
    )
    args = ap.parse_args()
    if args.why:
        why(args.out, args.why.split(","), args.n, args.results.with_name("experiment_why.json"))
        return
    if args.replot:
        print(figures(read_json(args.results), args.out / "samples", args.plot))
        return

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "commands.json"
    log: list[dict] = read_json(log_path) if log_path.exists() else []
    threads = ["--threads", str(args.threads)]
    budgets = [b.strip() for b in args.budgets.split(",")]
    samplers = [s.strip() for s in args.samplers.split(",")]
    arms: dict[str, dict] = {}

    for b in budgets:
        plan = out / f"plan-{b}.json"
        run(["analyze", "--out", str(plan), "--groups", "4", "--budget", b], log, log_path, plan)
        for kind, extra in (("sa", []), ("uniform", ["--uniform"])):
            pruned = out / "pruned" / f"{kind}-{b}"
            cmd = ["prune", "--plan", str(plan), "--out", str(pruned), *extra]
            run(cmd, log, log_path, pruned / "manifest.json")
        # the same fine-tuning budget for both shapes; the sampler ablation only for step-adaptive at 0.5
        wanted = [("uniform", "uniform")] + [
            ("sa", s) for s in (samplers if b == budgets[0] else ["uniform"])
        ]
        for kind, sampler in wanted:
            name = f"{kind}-{b}" + ("" if sampler == "uniform" else f"-{sampler}")
            arm = out / "arms" / name
            done = arm / "finetune.done"
            if not done.exists():
                shutil.rmtree(arm, ignore_errors=True)
                shutil.copytree(out / "pruned" / f"{kind}-{b}", arm)
            cmd = ["finetune", str(arm), "--iterations", str(args.iterations), "--batch-size",
                   str(args.batch_size), "--sampler", sampler, *threads]  # fmt: skip
            if sampler == "curriculum":
                cmd += ["--clusters", str(args.clusters), "--patience", str(args.patience)]
            seconds = run(cmd, log, log_path, done)
            done.touch()
            arms[name] = {"kind": kind, "budget": float(b), "sampler": sampler, "finetune_seconds": seconds}
            grid = out / "samples" / f"{name}.png"
            run(["sample", "--bundle", str(arm), "--n", "16", "--out", str(grid)], log, log_path, grid)

    grid = out / "samples" / "base.png"
    run(["sample", "--base", str(BASE), "--n", "16", "--out", str(grid)], log, log_path, grid)
    report = out / "eval.json"
    targets = [str(BASE)] + [str(out / "arms" / name) for name in arms]
    run(["evaluate", *targets, "--base", str(BASE), "--n", str(args.n), "--out", str(report), *threads], log,
        log_path, report)  # fmt: skip

    metrics = read_json(report)
    rows = {"base": {"kind": "base", "budget": 1.0, "sampler": "-", "finetune_seconds": 0.0,
                     **metrics["results"][str(BASE)]}}  # fmt: skip
    for name, a in arms.items():
        rows[name] = {**a, **metrics["results"][str(out / "arms" / name)]}
    results = {
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores, "
                       f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
            "settings": {**metrics["settings"], "iterations": args.iterations, "batch_size": args.batch_size,
                         "clusters": args.clusters, "patience": args.patience},
            "commands": log,
            "arms": rows,
    }  # fmt: skip
    write_json(args.results, results)
    print(json.dumps(rows, indent=1))
    print(f"results -> {args.results}, {figures(results, out / 'samples', args.plot)}")


if __name__ == "__main__":
    main()
