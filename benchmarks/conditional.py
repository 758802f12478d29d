"""The conditional arms of the experiment (issue 24): class-conditional experts vs the base at fewer steps.

On the class-conditional base ``fashion-tiny-cond``, at guidance 1 (no classifier-free guidance) and 3:
- ``base``: the base at 4, 6, 8, 12 and 25 steps;
- ``cond-uniform-0.5``: one uniformly pruned model at 0.5 x the base's MACs;
- ``cond-default-0.5``: the default experts at 0.5 x (the per-class Gaussian expert on the noisy end);
- ``cond-nogauss-0.5``: the experts without a Gaussian.
Every trained arm gets the same fine-tuning images (``--iterations`` x ``--batch-size``, labels dropped to
the null class at 0.1, distilled from the base on the same labels). Every arm samples with UniPC, the
solvers issue's best for the experts and, at these step counts, within the noise of the base's best
(benchmarks/results/solver-scores). Each image set is ``--n`` images, every class alike (50 per class
at 500), scored by KID against the held-out test images, the KID of each class averaged, and the
accuracy of the shipped classifier on them; 2 seeds for the base and the default experts. Guidance 3
is scored everywhere, guidance 1 for the base and the default experts' first seed (``UNGUIDED``):
on 2 CPU cores a score of 500 images costs minutes.

    python -m benchmarks.conditional [--only JOB,...] [--iterations 800] [--n 500] [--threads 1]
    python -m benchmarks.conditional --report          # table + plot from the stored scores
    python -m benchmarks.conditional --ship cond-default-0.5-s0

The stages run in process through the same stage functions as ``stepadapt analyze/prune/finetune``
(see benchmarks.experiment); scores land one by one in
benchmarks/results/experiment_conditional_scores.json, so a killed run goes on where it stopped, and
the rows join benchmarks/results/experiment.json marked ``"source": "conditional"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.experiment import AUTO, OFF, Arm, arm_stages, locked, train_arm
from stepadapt.io import atomic_path, read_json, write_json

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "stepadapt" / "weights" / "fashion-tiny-cond"
RESULTS = ROOT / "benchmarks" / "results" / "experiment.json"
SCORES = RESULTS.with_name("experiment_conditional_scores.json")
PLOT = ROOT / "docs" / "images" / "experiment_conditional.png"
SOURCE = "conditional"
SOLVER = "unipc"
GUIDANCE = (1.0, 3.0)
BASE_STEPS = (4, 6, 8, 12, 25)
ARM_STEPS = (8, 25)
# On 2 CPU cores every score costs minutes (500 images, Inception): guidance 3 everywhere, guidance 1
# for the base and the default experts' first seed at the arms' step counts.
UNGUIDED = {"base-s0", "cond-default-0.5-s0"}
SECOND_SEED_STEPS = (4, 6, 12)  # the base's second seed: where the bars compare the experts with it
ARMS = (
    Arm("cond-default-0.5", "default", 0.5, analyze={**AUTO, "gaussian_rank": "64"}, seeds=(0, 1),
        note="per-class Gaussian expert on the noisy end, U-Net experts below, each fine-tuned alone"),
    Arm("cond-uniform-0.5", "uniform", 0.5, analyze=OFF, prune={"uniform": True},
        note="one uniformly pruned model, the same recovery"),
    Arm("cond-nogauss-0.5", "no-gaussian", 0.5, analyze=OFF, note="U-Net experts on every interval"),
)  # fmt: skip


def stages(a: Arm, out: Path, seed: int, iterations: int, batch_size: int, threads: int) -> tuple:
    """The experiment's stages of arm ``a``, on the conditional base (the teacher is the base the
    bundle records)."""
    return tuple(
        dataclasses.replace(s, parts=({**s.parts[0], "base": BASE}, *s.parts[1:]))
        if s.name in ("analyze", "prune")
        else s
        for s in arm_stages(a, out, seed, iterations, batch_size, threads)
    )


class Scorer:
    """Images of one target at (steps, guidance, seed), scored by KID, per-class KID and accuracy
    against real held-out images; the base's images at the same settings are the PSNR reference."""

    def __init__(self, n: int, out: Path):
        from stepadapt.evaluate import InceptionFeatures, load_target

        self.n, self.out = n, out
        self.net = InceptionFeatures()
        self.base = load_target(BASE)
        self.real: dict[int, tuple] = {}

    def images(self, target, steps: int, guidance: float, seed: int, by_class) -> np.ndarray:
        from stepadapt.evaluate import generate

        return generate(
            target.denoiser, target.scheduler, target.shape, self.n, steps, seed, SOLVER, cond=by_class.cond
        )

    def __call__(self, target, steps: int, guidance: float, seed: int) -> dict[str, Any]:
        from stepadapt.evaluate import class_scoring, real_set, score
        from stepadapt.sampling import save_grid, save_npz

        c, size = self.base.shape[0], self.base.shape[1]
        if seed not in self.real:
            self.real[seed] = real_set(self.net, "fashion-mnist", self.n, size, c, seed=seed)
        by_class = class_scoring(
            self.base.conditioning, self.n, guidance, "fashion-mnist", self.n, seed, 0.1, None
        )
        ref_path = self.out / "reference" / f"base-{steps}-g{guidance:g}-{seed}.npz"
        if ref_path.is_file():
            reference = np.load(ref_path)["images"]
        else:
            reference = self.images(self.base, steps, guidance, seed, by_class)
            save_npz(reference, ref_path)
        t0 = time.perf_counter()
        images = reference if target is self.base else self.images(target, steps, guidance, seed, by_class)
        seconds = time.perf_counter() - t0
        if seed == 0:
            name = "base" if target is self.base else target.path.name.rpartition("-s")[0]
            save_grid(images[:20], self.out / "samples" / f"{name}-{steps}-g{guidance:g}.png")
        r = score(self.net, images, *self.real[seed], reference, by_class=by_class)
        return {**r, "sample_seconds": round(seconds, 1)}


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "commands.json"
        self.log: list[dict] = read_json(self.log_path) if self.log_path.exists() else []
        self.scores: dict[str, dict] = read_json(SCORES) if SCORES.exists() else {}
        self._scorer: Scorer | None = None

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            self._scorer = Scorer(self.args.n, self.out)
        return self._scorer

    def score(self, name: str, target, seed: int, steps: int, guidance: float, macs: float) -> None:
        key = f"{name}|{seed}|{steps}|g{guidance:g}"
        if key in self.scores:
            return
        r = self.scorer(target or self.scorer.base, steps, guidance, seed)
        self.scores[key] = {**r, "macs_per_image": macs}
        print(f"{key}: KID {r['kid']:.4f} ± {r['kid_std']:.4f}, per class {r['kid_per_class']:.4f}, "
              f"accuracy {r.get('accuracy', float('nan')):.3f}", flush=True)  # fmt: skip
        with locked(SCORES):
            on_disk = read_json(SCORES) if SCORES.exists() else {}
            self.scores = {**on_disk, **self.scores}
            write_json(SCORES, self.scores)
        publish(self.scores, self.args)

    def base_job(self, seed: int) -> None:
        from stepadapt.plan import visited_timesteps

        sched = self.scorer.base.scheduler
        for guidance in sorted(GUIDANCE, reverse=True):  # the headline guidance first
            if guidance != 3.0 and f"base-s{seed}" not in UNGUIDED:
                continue
            for steps in (BASE_STEPS if seed == 0 else SECOND_SEED_STEPS) if guidance == 3.0 else ARM_STEPS:
                macs = float(len(visited_timesteps(SOLVER, steps, sched)))
                self.score("base", None, seed, steps, guidance, macs)

    def train(self, a: Arm, seed: int) -> Path:
        args = self.args
        stages_ = stages(a, self.out, seed, args.iterations, args.batch_size, args.threads)
        return train_arm(stages_, self.log, self.log_path)[0]

    def arm_job(self, a: Arm, seed: int) -> None:
        from stepadapt.evaluate import load_target

        guidances = (3.0, 1.0) if f"{a.name}-s{seed}" in UNGUIDED else (3.0,)  # the headline first
        if all(f"{a.name}|{seed}|{s}|g{g:g}" in self.scores for s in ARM_STEPS for g in guidances):
            return
        target = load_target(self.train(a, seed))
        for guidance in guidances:
            for steps in ARM_STEPS:
                macs = target.macs_per_image(steps, SOLVER)
                self.score(a.name, target, seed, steps, guidance, macs)

    def run(self, jobs: list[str]) -> None:
        by_name = {a.name: a for a in ARMS}
        for job in jobs:
            name, _, seed = job.rpartition("-s")
            if name == "base":
                self.base_job(int(seed))
            elif name in by_name:
                self.arm_job(by_name[name], int(seed))
            else:
                raise SystemExit(
                    f"unknown job {job!r}: base-sSEED or one of {', '.join(by_name)} with -sSEED"
                )


def rows(scores: dict[str, dict]) -> list[dict]:
    """One row per (arm, steps, guidance): means over seeds, the std over seeds where there are two."""
    groups: dict[tuple, list] = {}
    for key, r in scores.items():
        name, seed, steps, g = key.split("|")
        groups.setdefault((name, int(steps), float(g[1:])), []).append((int(seed), r))
    out = []
    for (name, steps, g), got in sorted(groups.items()):
        kids = np.array([r["kid"] for _, r in got])
        acc = [r["accuracy"] for _, r in got if "accuracy" in r]
        out.append({
            "source": SOURCE, "arm": name, "steps": steps, "guidance": g, "solver": SOLVER,
            "macs_per_image": round(got[0][1]["macs_per_image"], 2), "seeds": sorted(s for s, _ in got),
            "kid": float(kids.mean()),
            "kid_std": float(kids.std(ddof=1)) if len(got) > 1 else got[0][1]["kid_std"],
            "kid_std_over": "seeds" if len(got) > 1 else "subsets",
            "kid_per_class": float(np.mean([r["kid_per_class"] for _, r in got])),
            "accuracy": float(np.mean(acc)) if acc else None,
            "accuracy_std": float(np.std(acc, ddof=1)) if len(acc) > 1 else None,
            "psnr": float(np.mean([r["psnr"] for _, r in got])) if name != "base" else None,
            "n": got[0][1]["n"],
        })  # fmt: skip
    return out


def publish(scores: dict[str, dict], args: argparse.Namespace) -> None:
    """Our rows into experiment.json (other rows and keys kept), and the plot."""
    with locked(RESULTS):
        results = read_json(RESULTS) if RESULTS.exists() else {"rows": []}
        results["rows"] = [r for r in results.get("rows", []) if r.get("source") != SOURCE] + rows(scores)
        results["conditional"] = {
            "base": BASE.name, "solver": SOLVER, "n": args.n, "iterations": args.iterations,
            "batch_size": args.batch_size, "guidance": list(GUIDANCE),
            "arms": {a.name: {"kind": a.kind, "budget": a.budget, "note": a.note, "analyze": a.analyze,
                              "prune": a.prune, "finetune": a.finetune} for a in ARMS},
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores, GPU: "
                       f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
        }  # fmt: skip
        write_json(RESULTS, results)
    plot(rows(scores), PLOT)


def plot(data: list[dict], path: Path) -> Path:
    """KID and class accuracy against MACs per image, guidance 3 solid and 1 dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    colours = {"base": "black", "cond-default-0.5": "tab:red", "cond-uniform-0.5": "tab:blue",
               "cond-nogauss-0.5": "tab:olive"}  # fmt: skip
    for (name, g), group in _by_arm(data).items():
        group.sort(key=lambda r: r["macs_per_image"])
        style = dict(color=colours.get(name, "grey"), ls="-" if g == 3 else "--", marker="o", ms=4,
                     label=f"{name}, guidance {g:g}")  # fmt: skip
        x = [r["macs_per_image"] for r in group]
        axes[0].errorbar(x, [r["kid"] for r in group], yerr=[r["kid_std"] for r in group], capsize=2, **style)
        axes[1].plot(x, [100 * (r["accuracy"] or np.nan) for r in group], **style)
    for ax, label in zip(axes, ("KID ↓", "class accuracy % ↑"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("MACs per image (base evaluations)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")  # the arms that fail sit an order of magnitude above the rest
    axes[0].legend(fontsize=7)
    fig.suptitle("fashion-tiny-cond: experts vs the base at fewer steps (UniPC, n = 500, 50 per class)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _by_arm(data: list[dict]) -> dict[tuple, list]:
    out: dict[tuple, list] = {}
    for r in data:
        out.setdefault((r["arm"], r["guidance"]), []).append(r)
    return out


def table(data: list[dict]) -> str:
    lines = [
        "| arm | guidance | steps | MACs / image | KID ↓ (± std) | per-class KID ↓ | accuracy ↑ | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(data, key=lambda r: (r["guidance"], r["arm"] != "base", r["arm"], r["steps"])):
        std = f"± {r['kid_std']:.4f}" + ("" if r["kid_std_over"] == "seeds" else " (subsets)")
        acc = "—" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        lines.append(
            f"| {r['arm']} | {r['guidance']:g} | {r['steps']} | {r['macs_per_image']:.2f} "
            f"| {r['kid']:.4f} {std} | {r['kid_per_class']:.4f} | {acc} | {len(r['seeds'])} |"
        )
    return "\n".join(lines)


def ship(out: Path, arm: str) -> Path:
    """A trained arm into the package (fp16 weights, no checkpoints) with its card: how it was made and
    what it scored."""
    from stepadapt.bundle import Bundle

    dest = ROOT / "stepadapt" / "weights" / "fashion-tiny-cond-experts"
    name, _, seed = arm.rpartition("-s")
    a = next(x for x in ARMS if x.name == name)
    analyze_, prune_, finetune_ = stages(a, out, int(seed), 0, 0, 1)
    paths = [str(analyze_.options.out), str(prune_.options.out), str(finetune_.options.bundle)]
    made = [c for c in read_json(out / "commands.json") if any(p + " " in c["command"] + " " for p in paths)]
    b = Bundle.load(out / "arms" / arm).copy_to(dest)
    b.cast_weights(torch.float16)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    m = b.manifest
    card = [
        "# fashion-tiny-cond-experts: the shipped class-conditional expert bundle",
        "",
        f"Experts cut from [fashion-tiny-cond](../fashion-tiny-cond/MODEL_CARD.md) at 0.5 x its MACs per "
        f"step (arm `{name}` of `python -m benchmarks.conditional`: {a.note}); {_recovery(b)}; float16 "
        f"safetensors, {size / 1e6:.1f} MB in all.",
        "",
        "| expert | kind | timesteps | MACs / base | params |",
        "|---|---|---|---|---|",
        *[f"| {e.name} | {e.kind} | [{e.lo}, {e.hi}) | {e.macs / m.base_macs:.3f} | {e.params / 1e6:.3f} M |"
          for e in b.experts],
        "",
        f"Made by `python -m benchmarks.conditional --only {arm} --threads 1`, then `--ship {arm}`, on "
        f"{platform.node()} ({os.cpu_count()} CPU cores, no GPU, shared with other work); its stages:",
        "",
        *[f"- `{c['command']}` ({c['seconds'] / 60:.1f} min)" for c in made],
        "",
        *_scored(name, int(seed)),
        "",
        "Every arm, both seeds: [docs/results.md](../../../docs/results.md#conditional-generation-issue-24).",
    ]  # fmt: skip
    with atomic_path(dest / "MODEL_CARD.md") as tmp:
        tmp.write_text("\n".join(card) + "\n")
    return dest


def _recovery(b) -> str:
    if any(b.is_pruned(e.name) for e in b.experts):
        return ("the pruned experts fine-tuned on Fashion-MNIST with its labels (10 % dropped to the null "
                "class, distilled from the base on the same labels)")  # fmt: skip
    return (
        "the budget bought the unpruned base below the Gaussian's start and the class Gaussian above it, "
        "so nothing was left to prune or fine-tune"
    )


def _scored(name: str, seed: int) -> list[str]:
    """What the arm scored beside the base at the same settings (UniPC, n images, this seed)."""
    scores = read_json(SCORES)
    lines = ["| setting | experts: KID, accuracy, MACs / image | base: KID, accuracy, MACs / image |",
             "|---|---|---|"]  # fmt: skip
    for g in GUIDANCE:
        for steps in ARM_STEPS:
            r, b = scores.get(f"{name}|{seed}|{steps}|g{g:g}"), scores.get(f"base|{seed}|{steps}|g{g:g}")
            if r and b:
                lines.append(
                    f"| UniPC x {steps}, guidance {g:g}, n = {r['n']} | {r['kid']:.4f} ± {r['kid_std']:.4f}, "
                    f"{100 * r['accuracy']:.1f} %, {r['macs_per_image']:.2f} | {b['kid']:.4f} ± "
                    f"{b['kid_std']:.4f}, {100 * b['accuracy']:.1f} %, {b['macs_per_image']:.0f} |"
                )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/experiment-cond"))
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated jobs: base-s0, cond-default-0.5-s1, ...")
    ap.add_argument("--report", action="store_true", help="print the table and redraw the plot")
    ap.add_argument("--ship", default=None, help="copy a trained arm (cond-default-0.5-s0) into the package")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.ship:
        print(f"shipped -> {ship(args.out, args.ship)}")
        return
    if args.report:
        scores = read_json(SCORES) if SCORES.exists() else {}
        print(table(rows(scores)))
        print(plot(rows(scores), PLOT))
        return
    jobs = args.only.split(",") if args.only else [
        "base-s0", "cond-default-0.5-s0", "cond-nogauss-0.5-s0", "cond-uniform-0.5-s0", "base-s1",
        "cond-default-0.5-s1",
    ]  # fmt: skip
    Run(args).run(jobs)


if __name__ == "__main__":
    main()
