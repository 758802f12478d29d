"""Fewer steps: the shipped experts against the base at equal compute per image, step count by step count.

A user can always take fewer steps with the base; experts pay only if, at the same MACs per image
(steps x mean MACs per step), they beat the base run with fewer steps. This scores the base and
the shipped bundle at each of ``--steps`` (DDIM, eta 0) with ``stepadapt evaluate`` (KID on TF-FID
Inception features against ``--n`` Fashion-MNIST test images, the same noise for both), for each
seed, then puts every experts' step count beside the base at the nearest compute per image.

    python -m benchmarks.steps [--steps 3,4,6,8,12,24] [--seeds 0,1] [--n 500] [--threads 2]

Each (steps, seed) lands in benchmarks/results/fewer-steps/ as evaluate's own JSON and is skipped
when present, so a killed run continues; the table goes to benchmarks/results/fewer_steps.json and
the plot to docs/images/fewer_steps.png.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

from stepadapt.bundle import Bundle
from stepadapt.io import read_json, write_json

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "stepadapt" / "weights" / "fashion-tiny"
BUNDLE = ROOT / "stepadapt" / "weights" / "fashion-tiny-experts"
RESULTS = ROOT / "benchmarks" / "results"
RAW = RESULTS / "fewer-steps"
CLI = str(Path(sys.executable).with_name("stepadapt"))


def score(steps: int, seed: int, n: int, threads: int) -> Path:
    """evaluate's report for the base and the bundle at ``steps`` (run once, then read back)."""
    out = RAW / f"steps{steps}-seed{seed}-n{n}.json"
    if not out.is_file():
        subprocess.run(
            [CLI, "evaluate", str(BASE.relative_to(ROOT)), str(BUNDLE.relative_to(ROOT)), "--n", str(n),
             "--steps", str(steps), "--seed", str(seed), "--threads", str(threads), "--device", "cpu",
             "--sampler", "ddim", "--no-jump",
             "--out", str(out)],
            check=True, cwd=ROOT,
        )  # fmt: skip
    return out


def aggregate(steps: list[int], seeds: list[int], n: int) -> list[dict]:
    """One row per (target, steps): KID mean and spread over the seeds, MACs per image from the
    bundle's own manifest at that step count (not the plan's 50)."""
    manifest = Bundle.load(BUNDLE).manifest
    rows = []
    for s in steps:
        reports = [read_json(RAW / f"steps{s}-seed{seed}-n{n}.json", "evaluate report") for seed in seeds]
        for name, path in (("base", BASE), ("experts", BUNDLE)):
            key = str(path.relative_to(ROOT))
            kids = [r["results"][key]["kid"] for r in reports]
            spread = np.std(kids, ddof=1) if len(kids) > 1 else reports[0]["results"][key]["kid_std"]
            ratio = 1.0 if name == "base" else manifest.trajectory_macs_ratio(s, "ddim")
            rows.append({
                "target": name, "steps": s, "macs_per_step": round(ratio, 4),
                "macs_per_image": round(ratio * s, 3), "kid": float(np.mean(kids)),
                "kid_std": float(spread),
                "kid_per_seed": kids, "psnr_vs_base": [r["results"][key]["psnr"] for r in reports],
                "fid_per_seed": [r["results"][key]["fid"] for r in reports],
            })  # fmt: skip
    return rows


def base_kid_at(rows: list[dict], macs: float) -> float | None:
    """The base's KID at ``macs`` per image, interpolated between the step counts measured (linear in
    log KID over log MACs, as the plot draws it); None outside them."""
    base = sorted((r["macs_per_image"], r["kid"]) for r in rows if r["target"] == "base")
    x, y = np.log([m for m, _ in base]), np.log([k for _, k in base])
    if not x[0] <= np.log(macs) <= x[-1]:
        return None
    return float(np.exp(np.interp(np.log(macs), x, y)))


def pairs(rows: list[dict]) -> list[dict]:
    """Each experts' step count beside the base at the nearest MACs per image measured (ties: fewer
    MACs) and at exactly the experts' MACs, interpolated."""
    base = [r for r in rows if r["target"] == "base"]
    out = []
    for e in (r for r in rows if r["target"] == "experts"):
        b = min(base, key=lambda r: (abs(r["macs_per_image"] - e["macs_per_image"]), r["macs_per_image"]))
        same = base_kid_at(rows, e["macs_per_image"])
        out.append({"experts_steps": e["steps"], "experts_macs": e["macs_per_image"], "experts_kid": e["kid"],
                    "base_steps": b["steps"], "base_macs": b["macs_per_image"], "base_kid": b["kid"],
                    "kid_ratio": e["kid"] / b["kid"], "base_kid_same_macs": same,
                    "kid_ratio_same_macs": e["kid"] / same if same else None})  # fmt: skip
    return out


def plot(rows: list[dict], n: int, seeds: list[int], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, color, marker in (("base", "black", "*"), ("experts", "tab:blue", "o")):
        rs = sorted((r for r in rows if r["target"] == name), key=lambda r: r["macs_per_image"])
        label = "base" if name == "base" else "shipped experts (0.5 x MACs per step at 50 steps)"
        x, y = [r["macs_per_image"] for r in rs], [r["kid"] for r in rs]
        ax.errorbar(x, y, yerr=[r["kid_std"] for r in rs], color=color, marker=marker, capsize=3, label=label)
        for r in rs:
            ax.annotate(f"{r['steps']}", (r["macs_per_image"], r["kid"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=color)  # fmt: skip
    return save_kid_plot(fig, ax, path, "MACs per image, in base-model steps (labels: DDIM steps)",
                         f"n={n} images per point and seed, mean ± std over seeds {seeds}")  # fmt: skip


def save_kid_plot(fig, ax, path: Path, xlabel: str, title: str, legend_size: int = 8) -> Path:
    """KID against MACs per image, both on log axes, written where the docs expect it."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("KID vs Fashion-MNIST test (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=legend_size, ncol=2 if legend_size < 8 else 1)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(rows: list[dict], matched: list[dict]) -> str:
    lines = ["| experts: steps | MACs / image | KID | base: steps | MACs / image | KID | experts / base "
             "| base at the experts' MACs (interpolated) | experts / that |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    kid = {(r["target"], r["steps"]): r for r in rows}
    for p in matched:
        e, b = kid[("experts", p["experts_steps"])], kid[("base", p["base_steps"])]
        cells = [p["experts_steps"], f"{p['experts_macs']:.2f}", f"{e['kid']:.4f} ± {e['kid_std']:.4f}",
                 p["base_steps"], f"{p['base_macs']:.2f}", f"{b['kid']:.4f} ± {b['kid_std']:.4f}",
                 f"{p['kid_ratio']:.2f}",
                 f"{p['base_kid_same_macs']:.4f}" if p["base_kid_same_macs"] else "outside the base's range",
                 f"{p['kid_ratio_same_macs']:.2f}" if p["kid_ratio_same_macs"] else "—"]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="3,4,6,8,12,24", help="DDIM step counts, comma-separated.")
    ap.add_argument("--seeds", default="0,1", help="Noise seeds, comma-separated.")
    ap.add_argument("--n", type=int, default=500, help="Generated and real images per KID.")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for torch.")
    a = ap.parse_args()
    steps = sorted(int(s) for s in a.steps.split(","))
    seeds = [int(s) for s in a.seeds.split(",")]
    RAW.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for s in steps:
            score(s, seed, a.n, a.threads)
    rows = aggregate(steps, seeds, a.n)
    matched = pairs(rows)
    settings = {"n": a.n, "seeds": seeds, "steps": steps, "sampler": "ddim", "eta": 0.0,
                "base": str(BASE.relative_to(ROOT)), "bundle": str(BUNDLE.relative_to(ROOT)),
                "command": "python -m benchmarks.steps " + " ".join(sys.argv[1:])}  # fmt: skip
    write_json(RESULTS / "fewer_steps.json", {"settings": settings, "rows": rows, "pairs": matched})
    print(table(rows, matched))
    print(f"plot -> {plot(rows, a.n, seeds, ROOT / 'docs' / 'images' / 'fewer_steps.png')}")


if __name__ == "__main__":
    main()
