"""Quality at equal compute: step-adaptive experts vs one uniformly pruned model vs the base at fewer steps.

On the shipped Fashion-MNIST base, every arm in one run, in priority order (the headline arms first, so
a run cut short still answers the main question):
- ``base-steps``: the base at 10, 12, 20, 25, 40 and 50 DDIM steps (the competitor a user already has);
- ``uniform``: one uniformly pruned model at the plan's mean MACs, with the default recovery
  (distillation from the base);
- ``default``: today's defaults of ``analyze`` / ``prune`` / ``finetune`` (the closed-form Gaussian expert
  on the noisy end, its saved budget spent on U-Net experts pruned independently from the base, each
  fine-tuned alone on its interval, distilled from the base);
- ``no-gaussian``: the previous default (U-Net experts on every interval);
- ``uniform+gaussian``: one uniform U-Net below the Gaussian's cut-off (is it the sizes or the Gaussian?);
- ``shared``: the default before ``no-gaussian`` (nested experts trained together as slices of one network);
- ``snr-old``: the default without distillation;
- ablations at 0.5 x, one change to the default each (``nested``, ``relative``, ``visited``, ``damage``).
Every trained arm gets the same fine-tuning images (``--iterations`` x ``--batch-size``). Each arm is
scored at 25 and 50 DDIM steps against ``--n`` real test images (KID on TF-FID Inception features,
FID, PSNR against the base at the same steps and noise); headline arms run with 2 seeds (the seed
changes the proxy sets, the training order and the sampling noise).

    python -m benchmarks.experiment [--out runs/experiment] [--iterations 2400] [--n 500]

Analysis, pruning and fine-tuning run in this process through the stage functions the CLI runs
(``stepadapt.analyze.analyze``, ``stepadapt.compress.prune``, ``stepadapt.finetune.finetune``), each from
one options object, so the experiment cannot drift from ``stepadapt analyze/prune/finetune``; commands.json
logs each stage with the equivalent command line, its options as JSON (:func:`logged_options` rebuilds
them) and its wall time. Scores land in benchmarks/results/experiment_scores.json one by one and every
finished score rewrites benchmarks/results/experiment.json and the plot, so a killed run continues where
it stopped (in a later session too: what is scored and committed is skipped) and a partial run is already
a result. ``--only ARM-sSEED,...`` runs just those jobs; several such processes can run side by side (one
thread each uses 2 cores better than one process with two), merging into the same results files under a
lock.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import os
import platform
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepadapt.analyze import AnalyzeOptions, analyze
from stepadapt.compress import PruneOptions, prune
from stepadapt.finetune import FinetuneOptions, finetune
from stepadapt.io import read_json, write_json
from stepadapt.options import Options
from stepadapt.train import CHECKPOINT_NAME

BASE = Path(__file__).resolve().parents[1] / "stepadapt" / "weights" / "fashion-tiny"
BASE_STEPS = (10, 12, 20, 25, 40, 50)
HEADLINE = ("uniform", "default")
OPTIONS: dict[str, type[Options]] = {
    "analyze": AnalyzeOptions,
    "prune": PruneOptions,
    "finetune": FinetuneOptions,
}


def flag_words(cls: type[Options], name: str, value: Any) -> list[str]:
    """One option as ``stepadapt`` spells it on the command line: what the log shows a reader and what
    the cache keys were made of when the experiment still ran the CLI."""
    meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == name)
    if value is None:
        return []
    if meta.get("argument"):
        return [str(value)]
    decl = (list(meta.get("flags", ())) or [meta.get("flag") or "--" + name.replace("_", "-")])[0]
    if isinstance(value, bool):
        on, _, off = decl.partition("/")
        return [on] if value else [off or "--no-" + on.removeprefix("--")]
    if isinstance(value, tuple | list):
        if meta.get("repeat"):
            return [w for v in value for w in (decl, str(v))]
        value = ",".join(map(str, value))
    return [decl, str(value)]


def _key_words(cls: type[Options], overrides: dict[str, Any]) -> list[str]:
    return [w.strip("-") for k, v in overrides.items() for w in flag_words(cls, k, v)]


@dataclass(frozen=True)
class Arm:
    """One recipe: the options it sets beyond the ones every arm shares, per stage (field names of
    AnalyzeOptions / PruneOptions / FinetuneOptions; insertion order is the order of the cache keys)."""

    name: str
    kind: str
    budget: float
    analyze: dict[str, Any] = field(default_factory=dict)  # beyond out, groups=4 and the budget
    prune: dict[str, Any] = field(default_factory=dict)  # beyond plan, out and seed
    finetune: dict[str, Any] = field(default_factory=dict)  # beyond the run's iterations, batch, seed
    seeds: tuple[int, ...] = (0,)
    note: str = ""

    @property
    def plan_key(self) -> str:
        """Arms that analyze alike share the plan (directory names that outlive a session: stable)."""
        return "-".join([str(self.budget), *_key_words(AnalyzeOptions, self.analyze)])

    @property
    def pruned_key(self) -> str:
        """Arms that analyze and prune alike share the pruned bundle."""
        extra = _key_words(PruneOptions, {k: v for k, v in self.prune.items() if k != "uniform"})
        return "-".join(["u" if self.prune.get("uniform") else "e", *extra, self.plan_key])


# Every arm says whether it has the Gaussian expert, so its plan (and the plan's cache key) does not
# follow the stage's default; arms scored before the option existed ran what is now OFF.
AUTO, OFF = {"gaussian": "auto"}, {"gaussian": "off"}
ARMS = (
    Arm("uniform-0.5", "uniform", 0.5, analyze=OFF, prune={"uniform": True}, seeds=(0, 1),
        note="one model, the default recovery (0.7 distillation from the base)"),
    Arm("default-0.5", "default", 0.5, analyze=AUTO, seeds=(0, 1),
        note="Gaussian expert on the noisy end (auto cut-off), its budget to independent U-Net experts, "
             "each fine-tuned alone on its interval, 0.7 distillation"),
    Arm("nogauss-0.5", "no-gaussian", 0.5, analyze=OFF, seeds=(0, 1),
        note="U-Net experts on every interval, no Gaussian expert (the default until the Gaussian expert; "
             "run as default-0.5)"),
    Arm("uniform-gauss-0.5", "uniform+gaussian", 0.5, analyze={"groups": 2, **AUTO},
        note="one uniformly pruned U-Net below the Gaussian's cut-off, the Gaussian above it"),
    Arm("shared-0.5", "shared", 0.5, analyze=OFF, prune={"nested": True}, finetune={"mode": "shared"},
        note="nested experts trained together on shared weights (the default before no-gaussian)"),
    Arm("snr-old-0.5", "snr-old", 0.5, analyze=OFF, finetune={"distill": 0},
        note="no-gaussian without distillation"),
    Arm("nested-0.5", "nested", 0.5, analyze=AUTO, prune={"nested": True}, note="default, experts nested"),
    Arm("relative-0.5", "relative", 0.5, analyze=AUTO, finetune={"distill": 1, "loss_weight": "relative"},
        note="default, the base's eps only, each t's loss over the base's own"),
    Arm("visited-0.5", "visited", 0.5, analyze=AUTO,
        finetune={"timestep_sampler": "visited", "visit_steps": 50},
        note="default, trained only on the timesteps 50 (and so 25) DDIM steps visit"),
    Arm("damage-0.5", "damage", 0.5, analyze={**AUTO, "measure": "damage"},
        note="default, sizes by measured damage (knapsack)"),
    Arm("uniform-0.8", "uniform", 0.8, analyze=OFF, prune={"uniform": True}),
    Arm("default-0.8", "default", 0.8, analyze=AUTO),
)  # fmt: skip


@dataclass(frozen=True)
class Stage:
    """One stage of one job. ``parts`` are merged in order into the options (a later part wins, as a
    later flag does) and spelled in order on the command line, so the logged text reads as it always has."""

    name: str  # analyze, prune or finetune
    parts: tuple[dict[str, Any], ...]

    @property
    def options(self) -> Options:
        merged: dict[str, Any] = {}
        for part in self.parts:
            merged.update(part)
        return OPTIONS[self.name](**merged)

    @property
    def command(self) -> str:
        cls = OPTIONS[self.name]
        words = [w for part in self.parts for k, v in part.items() for w in flag_words(cls, k, v)]
        return " ".join(["stepadapt", self.name, *words])

    def run(self, log=print) -> Any:
        # looked up when called, not bound at import: a test can watch what runs
        fn = {"analyze": analyze, "prune": prune, "finetune": finetune}[self.name]
        if self.name == "prune":  # the bundle's provenance records the command that made it
            return fn(self.options, log=log, command=self.command)
        return fn(self.options, log=log)


def arm_stages(
    a: Arm, out: Path, seed: int, iterations: int, batch_size: int, threads: int
) -> tuple[Stage, Stage, Stage]:
    """The analyze, prune and finetune stages of arm ``a`` at ``seed``: the settings every arm shares,
    then the arm's own options (which win where they set the same one)."""
    plan = out / f"plan-{a.plan_key}.json"
    pruned = out / "pruned" / f"{a.pruned_key}-s{seed}"
    tuned = out / "arms" / f"{a.name}-s{seed}"
    return (
        Stage("analyze", ({"out": plan, "groups": 4, "budget": a.budget}, a.analyze)),
        Stage("prune", ({"plan": plan, "out": pruned, "seed": seed}, a.prune)),
        Stage("finetune", (
            {"bundle": tuned, "iterations": iterations, "batch_size": batch_size, "seed": seed},
            a.finetune, {"threads": threads},
        )),
    )  # fmt: skip


def train_arm(stages: tuple[Stage, Stage, Stage], log: list[dict], log_path: Path) -> tuple[Path, float]:
    """Analyze, prune and fine-tune (each stage skipped where its output is there, a killed fine-tune
    resumed from its checkpoints); the trained bundle and its fine-tuning seconds."""
    analyze_, prune_, finetune_ = stages
    plan, pruned, arm = analyze_.options.out, prune_.options.out, finetune_.options.bundle
    run_stage(analyze_, log, log_path, plan)
    run_stage(prune_, log, log_path, pruned / "manifest.json")
    done = arm / "finetune.done"
    resume = any(arm.glob(f"finetune/*/{CHECKPOINT_NAME}"))  # a killed fine-tune goes on from there
    if not done.exists() and not resume:
        shutil.rmtree(arm, ignore_errors=True)
        shutil.copytree(pruned, arm)
    if resume:
        finetune_ = dataclasses.replace(finetune_, parts=(*finetune_.parts, {"resume": True}))
    seconds = run_stage(finetune_, log, log_path, done)
    done.touch()
    return arm, seconds


def logged_options(entry: dict) -> Options:
    """The options of a stage logged in commands.json: run ``analyze(logged_options(entry))`` (or prune,
    finetune) to make the same thing again. Entries from before the experiment ran in process have none."""
    if "options" not in entry:
        raise ValueError(f"{entry['command']!r} was logged before stages recorded their options")
    return OPTIONS[entry["stage"]].from_dict(entry["options"])


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive use of ``path`` among experiment processes (``--only`` runs side by side)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def merge_log(log: list[dict], log_path: Path, *new: dict) -> None:
    """``log`` := the log on disk (another process may have added to it), then ours, then ``new``."""
    with locked(log_path):
        on_disk = read_json(log_path) if log_path.exists() else []
        seen = {(c["command"], c["seconds"]) for c in on_disk}  # a note added on disk is the same entry
        log[:] = [*on_disk, *[c for c in log if (c["command"], c["seconds"]) not in seen], *new]
        if new:
            write_json(log_path, log)


def run_stage(stage: Stage, log: list[dict], log_path: Path, done: Path | None = None) -> float:
    """Run one stage in this process (unless ``done`` exists); log its command line, options and wall
    time in ``log_path``. A stage already done answers with the seconds it took when it ran."""
    text = stage.command
    if done is not None and done.exists():
        prior = next((c for c in log if c["command"] == text), None)
        return prior["seconds"] if prior else float("nan")
    options = stage.options  # a bad option is said before anything loads
    print(f"$ {text}", flush=True)
    t0 = time.perf_counter()
    stage.run(log=lambda line: print(line, flush=True))
    seconds = round(time.perf_counter() - t0, 1)
    entry = {"command": text, "seconds": seconds, "stage": stage.name, "options": options.to_dict()}
    merge_log(log, log_path, entry)
    return seconds


class Scorer:
    """Scores images against real test images and the base's images from the same noise, with caches."""

    def __init__(self, out: Path, n: int):
        from stepadapt.evaluate import InceptionFeatures, load_target

        self.out, self.n = out, n
        self.net = InceptionFeatures()
        base = load_target(BASE)
        self.base, self.sched, self.shape = base.denoiser, base.scheduler, base.shape
        self.real: dict[int, tuple] = {}

    def reference(self, steps: int, seed: int) -> np.ndarray:
        from stepadapt.evaluate import generate

        path = self.out / "reference" / f"base-{steps}-{seed}.npz"
        if path.is_file():
            return np.load(path)["images"]
        from stepadapt.sampling import save_npz

        images = generate(self.base, self.sched, self.shape, self.n, steps, seed)
        save_npz(images, path)
        return images

    def __call__(self, denoiser, steps: int, seed: int, grid: Path | None) -> dict:
        from stepadapt.evaluate import generate, real_set, score
        from stepadapt.sampling import save_grid

        if seed not in self.real:
            self.real[seed] = real_set(
                self.net, "fashion-mnist", self.n, self.shape[1], self.shape[0], seed=seed
            )
        reference = self.reference(steps, seed)
        t0 = time.perf_counter()
        images = (
            reference if denoiser is None else generate(denoiser, self.sched, self.shape, self.n, steps, seed)
        )
        seconds = time.perf_counter() - t0
        if grid is not None:
            save_grid(images[:16], grid)
        r = score(self.net, images, *self.real[seed], reference)
        return {**r, "sample_seconds": round(seconds, 1)}


def aggregate(arms: dict[str, dict], scores: dict[str, dict], settings: dict) -> list[dict]:
    """One row per (arm, steps): KID mean and std over seeds (one seed: the subset std)."""
    rows = []
    for name, a in arms.items():
        for steps in a["steps"]:
            got = [scores[k] for s in a["seeds"] if (k := f"{name}|{s}|{steps}") in scores]
            if not got:
                continue
            kids = np.array([g["kid"] for g in got])
            macs = a["macs_per_step"].get(str(steps), a["budget"])
            rows.append({
                "arm": name, "kind": a["kind"], "budget": round(macs, 4), "steps": steps,
                "macs_per_image": round(macs * steps, 2), "finetune_images": a["finetune_images"],
                "finetune_seconds": a.get("finetune_seconds"),
                "kid": float(kids.mean()),
                "kid_std": float(kids.std(ddof=1)) if len(got) > 1 else got[0]["kid_std"],
                "kid_std_over": "seeds" if len(got) > 1 else "subsets",
                "seeds": [s for s in a["seeds"] if f"{name}|{s}|{steps}" in scores],
                "n": settings["n"],
                "fid": float(np.mean([g["fid"] for g in got])),
                "psnr": float(np.mean([g["psnr"] for g in got])) if "psnr" in got[0] else None,
                "grid": a.get("grids", {}).get(str(steps)), "note": a.get("note", ""),
            })  # fmt: skip
    return rows


def own_rows(results: dict) -> list[dict]:
    """This experiment's rows. benchmarks.solvers keeps its rows (other solvers, marked with their
    ``source``) in the same file and draws them in its own plot; they have no budget, grid or fine-tuning."""
    return [r for r in results["rows"] if "source" not in r]


def table(results: dict) -> str:
    """The rows as a markdown table (what docs/results.md shows), grouped by arm."""
    lines = [
        "| arm | kind | MACs / step | steps | MACs / image | fine-tuning images | KID ↓ (± std) | seeds "
        "| PSNR vs base |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in own_rows(results):
        std = f"± {r['kid_std']:.4f}" + ("" if r["kid_std_over"] == "seeds" else " (subsets)")
        psnr = "—" if r["kind"] in ("base", "base-steps") or r["psnr"] is None else f"{r['psnr']:.1f} dB"
        lines.append(
            f"| {r['arm']} | {r['kind']} | {r['budget']:.3f} | {r['steps']} | {r['macs_per_image']:.1f} | "
            f"{r['finetune_images']:,} | {r['kid']:.4f} {std} | {len(r['seeds'])} | {psnr} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    """KID against MACs per image: the base at fewer steps as a curve, the pruned arms on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = own_rows(results)
    fig, ax = plt.subplots(figsize=(8, 5))
    base = sorted((r for r in rows if r["kind"] in ("base", "base-steps")), key=lambda r: r["macs_per_image"])
    if base:
        ax.errorbar([r["macs_per_image"] for r in base], [r["kid"] for r in base],
                    yerr=[r["kid_std"] for r in base], color="black", marker="*", capsize=3,
                    label="base, 10-50 DDIM steps")  # fmt: skip
        for r in base:
            ax.annotate(f"{r['steps']}", (r["macs_per_image"], r["kid"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)  # fmt: skip
    style = {
        "uniform": ("tab:red", "s"), "default": ("tab:blue", "o"), "snr-old": ("tab:gray", "v"),
        "shared": ("tab:purple", "D"), "no-gaussian": ("tab:olive", "^"),
        "uniform+gaussian": ("tab:orange", "P"),
    }  # fmt: skip
    for r in rows:
        if r["kind"] in ("base", "base-steps"):
            continue
        color, marker = style.get(r["kind"], ("tab:green", "^"))
        ax.errorbar(r["macs_per_image"], r["kid"], yerr=r["kid_std"], color=color, marker=marker, capsize=3,
                    linestyle="none", markersize=7 if r["kind"] in HEADLINE else 4)  # fmt: skip
        ax.annotate(f"{r['arm']} @{r['steps']}", (r["macs_per_image"], r["kid"]), textcoords="offset points",
                    xytext=(5, -8), fontsize=6, color=color)  # fmt: skip
    ax.set_xlabel("MACs per image, in base-model steps (steps x mean MACs per step / base)")
    ax.set_ylabel("KID vs Fashion-MNIST test (lower is better)")
    ax.set_yscale("log")  # the arms near the base differ by percent, the others by multiples
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper right", fontsize=8)
    s = results["settings"]
    ax.set_title(f"n={s['n']} images per arm and seed, {s['iterations']} x {s['batch_size']} fine-tuning "
                 "images per trained arm", fontsize=9)  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_figure(grids: dict[str, str], path: Path) -> Path:
    """The arms' 16-image grids (same seed, so the same initial noise) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    grids = {k: v for k, v in grids.items() if Path(v).is_file()}
    cols = 4
    rows = max(1, -(-len(grids) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, grid) in zip(axes.flat, grids.items(), strict=False):
        ax.imshow(Image.open(grid), cmap="gray")
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def why(out: Path, arms: list[str], n: int, path: Path, seed: int = 0, steps: int = 50) -> dict:
    """Where is quality lost? For each group of the first arm's plan, sample with the base everywhere
    except that group's interval, which goes to the arm's model (its expert for the interval, or the
    uniform model). The damage each interval's model does, alone, then compares interval by interval.
    """
    from stepadapt.bundle import Bundle
    from stepadapt.sampling import swapped_in

    scorer = Scorer(out, n)
    T = int(scorer.sched["num_train_timesteps"])
    groups = Bundle.load(out / "arms" / arms[0]).experts
    rows: dict[str, dict] = {}
    for arm in arms:
        owner = Bundle.load(out / "arms" / arm).router()
        for g in groups:
            r = scorer(swapped_in(scorer.base, owner, g.lo, g.hi, T), steps, seed, None)
            rows[f"{arm} on [{g.lo},{g.hi})"] = {"arm": arm, "lo": g.lo, "hi": g.hi, **r}
            print(f"{arm} only on [{g.lo},{g.hi}): KID {r['kid']:.4f}, PSNR {r['psnr']:.2f}", flush=True)
    write_json(path, {"n": n, "seed": seed, "steps": steps, "rows": rows})
    return rows


def gaussian(out: Path, n: int, lows: list[int], arms: list[str], steps: list[int], path: Path) -> dict:
    """The closed-form Gaussian denoiser (stepadapt.gaussian) on [lo, T), the base or an arm elsewhere.

    Its eps error against the truth and against the base per timestep, then KID and PSNR (same
    noise as every arm) with it swapped into the base's trajectory, and into trained arms' at the
    arm's own noisiest boundary. Scores land in ``path`` one by one.
    """
    from stepadapt.bundle import Bundle
    from stepadapt.data import load_dataset
    from stepadapt.gaussian import fit_gaussian
    from stepadapt.sampling import swapped_in

    scorer = Scorer(out, n)
    T = int(scorer.sched["num_train_timesteps"])
    den = fit_gaussian(load_dataset("fashion-mnist", "train", 32, 1), scorer.sched)
    res = read_json(path) if path.exists() else {}
    rows = {}
    for t, x_t, tt, noise in noised_test_images(scorer.sched):
        e_base, e_g = scorer.base(x_t, tt), den(x_t, tt)
        rows[t] = {"base_vs_truth": float(((e_base - noise) ** 2).mean()),
                   "gaussian_vs_truth": float(((e_g - noise) ** 2).mean()),
                   "gaussian_vs_base": float(((e_g - e_base) ** 2).mean())}  # fmt: skip
        print(f"t={t}: " + ", ".join(f"{k} {v:.2e}" for k, v in rows[t].items()), flush=True)
    res["errors"], res["macs_per_image"] = rows, den.macs
    targets = {f"base+gaussian[{lo},{T})": (scorer.base, lo) for lo in lows}
    for arm in arms:
        b = Bundle.load(out / "arms" / arm)
        targets[f"{arm}+gaussian[{b.experts[-1].lo},{T})"] = (b.router(), b.experts[-1].lo)
    for name, (inner, lo) in targets.items():
        for st in steps:
            key = f"{name}@{st}"
            if key not in res:
                r = scorer(swapped_in(inner, den, lo, T, T), st, 0, out / "samples" / f"{name}-{st}.png")
                res[key] = {"lo": lo, "steps": st, **r}
                print(f"{key}: KID {r['kid']:.4f} ± {r['kid_std']:.4f}, PSNR {r['psnr']:.2f}", flush=True)
                write_json(path, res)
    write_json(path, res)
    return res


ERROR_TIMESTEPS = (40, 100, 200, 300, 400, 500, 600, 700, 800, 900, 980)


def noised_test_images(
    scheduler_cfg: dict, n: int = 128, seed: int = 0
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(t, x_t, t as a batch, noise) at each of ERROR_TIMESTEPS: the same test images and noise for
    every model compared (--errors, --gaussian)."""
    from stepadapt.data import load_dataset
    from stepadapt.schedule import make_scheduler

    sched = make_scheduler("ddpm", scheduler_cfg)
    x = load_dataset("fashion-mnist", "test", 32, 1, limit=n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for t in ERROR_TIMESTEPS:
        noise, tt = torch.randn(x.shape, generator=g), torch.full((len(x),), t)
        yield t, sched.add_noise(x, noise, tt), tt, noise


def errors(bundles: list[Path], n: int = 128, seed: int = 0) -> dict[str, dict[int, dict[str, float]]]:
    """How far each bundle's eps is from the base's, per timestep, in units of the base's own loss.

    ``ratio`` = E|eps_arm - eps_base|^2 / E|eps_base - eps|^2 on real test images noised to t (the same
    images and noise for every arm); 1 means the arm is as far from the base as the base is from the
    truth. ``dc`` is the mean of eps_arm - eps_base (x 1e3): a bias that shifts every pixel.
    """
    from stepadapt.bundle import Bundle
    from stepadapt.models import load_base

    base, sched_cfg = load_base(BASE)
    out: dict[str, dict[int, dict[str, float]]] = {}
    for path in bundles:
        router, rows = Bundle.load(path).router(), {}
        for t, x_t, tt, noise in noised_test_images(sched_cfg, n, seed):
            with torch.no_grad():
                e_base = base(x_t, tt).sample
                d = router(x_t, tt) - e_base
            rows[t] = {"ratio": float((d**2).mean() / ((e_base - noise) ** 2).mean()),
                       "dc": float(d.mean() * 1e3)}  # fmt: skip
        out[str(path)] = rows
        print(f"{path}: " + " ".join(f"{t}:{r['ratio']:.2f}/{r['dc']:+.1f}" for t, r in rows.items()))
    return out


def ship(out: Path, arm: str, results: Path, dest: Path) -> Path:
    """Copy a trained arm's bundle into the package (fp16 weights, no checkpoints) with its card."""
    from stepadapt.bundle import Bundle

    name, _, seed = arm.rpartition("-s")
    res = read_json(results)
    scores = read_json(results.with_name("experiment_scores.json"))
    settings = res["settings"]
    # Only the experts and the manifest travel (no checkpoints, no exports), neighbouring copies of the
    # base stored once; the old package copy is swapped out in one rename, never left half-written.
    b = Bundle.load(out / "arms" / arm).copy_to(dest)
    b.cast_weights(torch.float16)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    tuned = next(  # the latest: an arm's name may have served another recipe in an earlier session
        c
        for c in reversed(res["commands"])
        if c["command"].startswith("stepadapt finetune") and f"arms/{arm} " in c["command"]
    )
    made = f"python -m benchmarks.experiment --out {out} --iterations {settings['iterations']}"
    made += f" --n {settings['n']} --threads 1 --only {arm}"

    def kid(key: str) -> str:
        r = scores.get(key)
        return f"{r['kid']:.4f} ± {r['kid_std']:.4f}" if r else "not measured"

    m = b.manifest
    rows = [
        f"| {e.name} | [{e.lo}, {e.hi}) | {e.macs / m.base_macs:.3f} | {e.params / 1e6:.3f} M "
        f"| {e.parent or '-'} | {(e.training or {}).get('mode', f'none: {b.describe(e.name)}')} |"
        for e in b.experts
    ]
    psnr = scores.get(f"{name}|{seed}|50", {}).get("psnr", float("nan"))
    tuned_cfg = next(e.training for e in b.experts if e.training)
    how = "nested (each cut from the next larger one)" if any(e.parent for e in b.experts) else "pruned"
    together = {"shared": "together on shared weights", "separate": "each alone on its own interval"}
    card = [
        "# fashion-tiny-experts: the shipped step-adaptive bundle",
        "",
        f"Experts {how} from the base [fashion-tiny](../fashion-tiny/MODEL_CARD.md) at a budget of 0.5 x the",
        "base's MACs per DDIM step (mean over the 50 steps a sample visits: "
        f"{m.trajectory_macs_ratio():.3f}; over 25 steps: {m.trajectory_macs_ratio(25):.3f}), fine-tuned",
        f"{together[tuned_cfg['mode']]} with {tuned_cfg['distill']} x the base's eps in the target",
        f"(arm `{name}` of the experiment: {res['arms'][name]['note']}). `make demo` serves it. Weights are",
        f"float16 safetensors ({size / 1e6:.1f} MB in all) and load as float32.",
        "",
        "| expert | timesteps | MACs / base | params | cut from | fine-tuning |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "| | |",
        "|---|---|",
        f"| made by | `{made}` (arm `{arm}`), "
        f"then `python -m benchmarks.experiment --out {out} --ship {arm}` |",
        f"| fine-tuning | `{tuned['command']}`: {settings['iterations']} x {settings['batch_size']} images, "
        f"{tuned['seconds'] / 60:.1f} min |",
        f"| machine | {res['machine']}, shared with other work |",
        f"| KID, 50 DDIM steps (n = {settings['n']}, seed {seed}) | {kid(f'{name}|{seed}|50')} "
        f"(the base: {kid(f'base-50|{seed}|50')}) |",
        f"| KID, 25 DDIM steps | {kid(f'{name}|{seed}|25')} (the base: {kid(f'base-25|{seed}|25')}; "
        f"at 12 steps, the same MACs per image: {kid(f'base-12|{seed}|12')}) |",
        f"| PSNR to the base's images, same noise, 50 steps | {psnr:.2f} dB |",
        "| the other seeds of the same recipe, KID at 50 / 25 steps | "
        + "; ".join(
            f"seed {s}: {kid(f'{name}|{s}|50')} / {kid(f'{name}|{s}|25')}"
            for s in res["arms"][name]["seeds"]
            if str(s) != seed
        )
        + " |",
        "",
        "How it compares with one uniformly pruned model and with fewer steps of the base:",
        "[docs/results.md](../../../docs/results.md#quality-at-equal-compute-issue-11).",
    ]
    (dest / "MODEL_CARD.md").write_text("\n".join(card) + "\n")
    return dest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/experiment"))
    ap.add_argument("--iterations", type=int, default=2400, help="fine-tuning iterations per trained arm")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--n", type=int, default=500, help="generated (and real) images per arm and seed")
    ap.add_argument("--steps", default="25,50", help="DDIM steps each trained arm is scored at")
    ap.add_argument("--arms", default=None, help="comma-separated arm names (default: all, in order)")
    ap.add_argument(
        "--first", default=None, help="comma-separated arms to run right after the headline seed 0"
    )
    ap.add_argument(
        "--only", default=None,
        help="comma-separated jobs ARM-sSEED or base-sSEED, nothing else; several processes may run at once",
    )  # fmt: skip
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/experiment.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/images/experiment.png"))
    ap.add_argument(
        "--replot", action="store_true", help="only print the table and redraw --plot from --results"
    )
    ap.add_argument("--ship", default=None, help="copy a trained arm (e.g. default-0.5-s0) into the package")
    ap.add_argument(
        "--why", default=None, help="comma-separated arms: each alone on each group, base elsewhere"
    )
    ap.add_argument(
        "--errors", default=None,
        help="comma-separated bundle dirs: their eps error against the base per timestep (no training)",
    )  # fmt: skip
    ap.add_argument(
        "--gaussian", default=None,
        help="comma-separated LO: the Gaussian denoiser on [LO, T), the base elsewhere (and on the "
        "noisiest group of the --arms given), scored at --steps",
    )  # fmt: skip
    return ap.parse_args(argv)


def one_off(args: argparse.Namespace) -> bool:
    """The modes that only read trained arms or the results (no schedule); whether one of them ran."""
    if args.gaussian:
        lows = [int(v) for v in args.gaussian.split(",")]
        arms = args.arms.split(",") if args.arms else []
        steps = [int(v) for v in args.steps.split(",")]
        gaussian(args.out, args.n, lows, arms, steps, args.results.with_name("experiment_gaussian.json"))
    elif args.errors:
        rows = errors([Path(p) for p in args.errors.split(",")])
        path = args.results.with_name("experiment_errors.json")
        write_json(path, {**(read_json(path) if path.exists() else {}), **rows})
    elif args.why:
        why(args.out, args.why.split(","), args.n, args.results.with_name("experiment_why.json"))
    elif args.ship:
        dest = Path(__file__).resolve().parents[1] / "stepadapt" / "weights" / "fashion-tiny-experts"
        print(f"shipped -> {ship(args.out, args.ship, args.results, dest)}")
    elif args.replot:
        results = read_json(args.results)
        print(table(results))
        print(plot(results, args.plot))
    else:
        return False
    return True


class Run:
    """The scheduled run: jobs train arms and score them, one score at a time.

    Scores and the results file are committed, so a later session on a fresh machine skips what is
    scored; every score is published at once (merged under a lock with what parallel ``--only``
    processes wrote), so a killed run is already a result.
    """

    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "commands.json"
        self.scores_path = args.results.with_name("experiment_scores.json")
        prior = read_json(args.results) if args.results.exists() else {}
        on_disk = self.log_path.exists()
        self.log: list[dict] = read_json(self.log_path) if on_disk else prior.get("commands", [])
        self.scores: dict[str, dict] = read_json(self.scores_path) if self.scores_path.exists() else {}
        self.steps = [int(s) for s in args.steps.split(",")]
        self.chosen = [a for a in ARMS if args.arms is None or a.name in args.arms.split(",")]
        self.settings = {
            "n": args.n, "iterations": args.iterations, "batch_size": args.batch_size,
            "sampler": "ddim eta=0", "data": "fashion-mnist", "base": str(BASE.name),
        }  # fmt: skip
        self.arms: dict[str, dict] = {
            f"base-{s}": {"kind": "base" if s == 50 else "base-steps", "budget": 1.0, "steps": [s],
                          "seeds": [0, 1], "macs_per_step": {str(s): 1.0}, "finetune_images": 0}
            for s in BASE_STEPS
        }  # fmt: skip
        for a in self.chosen:
            self.arms[a.name] = prior.get("arms", {}).get(a.name) or self.fresh(a)
        # arms this process trained or scored: its metadata wins over the file's
        self.touched: set[str] = set()
        self._scorer: Scorer | None = None

    @property
    def scorer(self) -> Scorer:
        """Built on first use: Inception and the base load only when something is scored."""
        if self._scorer is None:
            self._scorer = Scorer(self.out, self.args.n)
        return self._scorer

    def fresh(self, a: Arm) -> dict:
        """An arm's metadata before anything of it ran (its own options, to re-run it from)."""
        return {"kind": a.kind, "budget": a.budget, "steps": self.steps, "seeds": list(a.seeds),
                "macs_per_step": {}, "finetune_images": self.args.iterations * self.args.batch_size,
                "analyze": dict(a.analyze), "prune": dict(a.prune), "finetune": dict(a.finetune),
                "note": a.note}  # fmt: skip

    def publish(self) -> None:
        args = self.args
        with locked(self.scores_path):  # merge with what a parallel --only process has written meanwhile
            if self.scores_path.exists():
                self.scores.update(
                    {k: v for k, v in read_json(self.scores_path).items() if k not in self.scores}
                )
            write_json(self.scores_path, self.scores)
            on_disk = read_json(args.results) if args.results.exists() else {}
            for name, a in on_disk.get("arms", {}).items():
                if name not in self.touched:
                    self.arms[name] = a
            merge_log(self.log, self.log_path)
            results = {
                **on_disk,  # what other scripts keep there (benchmarks.solvers' rows) stays
                "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores, "
                           f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
                "settings": self.settings, "commands": self.log, "arms": self.arms,
                "rows": [*aggregate(self.arms, self.scores, self.settings),
                         *[r for r in on_disk.get("rows", []) if "source" in r]],
            }  # fmt: skip
            write_json(args.results, results)
        plot(results, args.plot)
        grids = {
            f"{r['arm']} @{r['steps']}": r["grid"]
            for r in own_rows(results)
            if r["grid"]
            and r["steps"] in (12, 25, 50)
            and r["kind"] in ("base", "base-steps", *HEADLINE, "no-gaussian")
        }
        sample_figure(grids, args.plot.with_name("experiment_samples.png"))

    def score_once(self, name: str, seed: int, steps: int, denoiser) -> None:
        key = f"{name}|{seed}|{steps}"
        grid = self.out / "samples" / f"{name}-{steps}.png"
        self.arms[name].setdefault("grids", {})[str(steps)] = str(grid)
        if key in self.scores:
            if denoiser is None and seed == 0 and not grid.is_file():  # the base's grid: from its references
                from stepadapt.sampling import save_grid

                save_grid(self.scorer.reference(steps, seed)[:16], grid)
            return
        self.touched.add(name)
        r = self.scorer(denoiser, steps, seed, grid if seed == 0 else None)
        self.scores[key] = r
        print(f"{key}: KID {r['kid']:.4f} ± {r['kid_std']:.4f}, PSNR {r.get('psnr', 0):.2f}", flush=True)
        self.publish()

    def base_job(self, seed: int, steps: tuple[int, ...]) -> None:
        for st in steps:
            self.score_once(f"base-{st}", seed, st, None)  # None: the base's own (reference) images

    def train(self, a: Arm, seed: int) -> tuple[Path, float]:
        """Analyze, prune and fine-tune arm ``a`` (each stage skipped when its output is there; plans
        and pruned bundles shared between arms by their keys); the trained bundle and its fine-tuning
        seconds."""
        args = self.args
        stages = arm_stages(a, self.out, seed, args.iterations, args.batch_size, args.threads)
        return train_arm(stages, self.log, self.log_path)

    def arm_job(self, a: Arm, seed: int) -> None:
        from stepadapt.bundle import Bundle

        if all(f"{a.name}|{seed}|{st}" in self.scores for st in self.steps):
            return  # scored (maybe in an earlier session): its metadata came with the prior results
        arm, seconds = self.train(a, seed)
        self.touched.add(a.name)
        info = self.arms[a.name]
        info.setdefault("finetune_seconds_per_seed", {})[str(seed)] = seconds
        info["finetune_seconds"] = float(np.nanmean(list(info["finetune_seconds_per_seed"].values())))
        b = Bundle.load(arm)
        info["macs_per_step"] = {str(s): b.manifest.trajectory_macs_ratio(s) for s in self.steps}
        base_macs = b.manifest.base_macs
        info["experts"] = [
            {"name": e.name, "timesteps": list(e.timesteps), "macs_ratio": round(e.macs / base_macs, 4)}
            for e in b.experts
        ]
        router = b.router()
        for steps in self.steps:
            self.score_once(a.name, seed, steps, router)

    def only(self, jobs: str) -> None:
        """Exactly these jobs, e.g. one process per arm side by side."""
        by_name = {a.name: a for a in ARMS}
        for job in jobs.split(","):
            name, _, seed = job.rpartition("-s")
            if name == "base":
                self.base_job(int(seed), BASE_STEPS if int(seed) == 0 else (12, 25, 50))
            elif name in by_name and name in self.arms:
                self.arm_job(by_name[name], int(seed))
            else:
                raise SystemExit(f"--only: unknown job {job!r} (ARM-sSEED or base-sSEED)")
        self.publish()

    def schedule(self) -> None:
        """Interleaved by priority: the bar, the headline arms (seed 0), their second seeds, the rest."""
        chosen, first = self.chosen, (self.args.first or "").split(",")
        headline = [a for a in chosen if a.kind in HEADLINE and a.budget == 0.5]
        self.base_job(0, BASE_STEPS)
        for a in headline:
            self.arm_job(a, 0)
        for a in chosen:  # arms asked for first: before the second seeds
            if a.name in first:
                self.arm_job(a, a.seeds[0])
        self.base_job(1, (12, 25, 50))
        for a in headline:
            for seed in a.seeds[1:]:
                self.arm_job(a, seed)
        for a in chosen:
            if a not in headline:
                for seed in a.seeds:
                    self.arm_job(a, seed)
        self.publish()
        print(f"results -> {self.args.results}, plot -> {self.args.plot}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # the stages run in this process: they share its threads
    if one_off(args):
        return
    run = Run(args)
    if args.only:
        run.only(args.only)
    else:
        run.schedule()


if __name__ == "__main__":
    main()
