"""fashion-tiny-t2i: the text-to-image base against its experts at equal MACs per image.

Each arm samples ``n`` images (``n / 10`` per class prompt "a photo of <class>") through
:class:`stepadapt.api.StepAdaptivePipeline` -- the prompts through the text encoder, guidance at
``--guidance``, the latents through the VAE -- and is scored by KID against ``n`` held-out
Fashion-MNIST images and by the shipped classifier's accuracy on the class each prompt asked for.
The experts run at the step count whose MACs per image match the base's (their trajectory mean is
below 1, so they take more steps); the base at half its steps is the "fewer steps" competitor.
Scores are kept per (arm, seed, steps) in ``--scores``, so a re-run only adds what is missing.

    python -m benchmarks.t2i --base stepadapt/weights/fashion-tiny-t2i \
        --experts stepadapt/weights/fashion-tiny-t2i-experts --seeds 0,1 --n 500
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.experiment import locked
from stepadapt.io import read_json, write_json

RESULTS = Path(__file__).parent / "results"
SCORES = RESULTS / "t2i_scores.json"


def arms(base: Path, experts: list[Path], steps: int, sampler: str) -> list[tuple[str, Path, int, float]]:
    """(name, path, steps, MACs per image in base evaluations): the base at ``steps`` and at half,
    each experts bundle at the most steps that cost no more than the base at ``steps`` (named
    ``experts PATH``: bundles made by other recipes keep their own scores)."""
    from stepadapt.bundle import Bundle
    from stepadapt.models import load_base
    from stepadapt.plan import visited_timesteps

    sched = load_base(base)[1]
    base_cost = float(len(visited_timesteps(sampler, steps, sched)))
    half = steps // 2
    out = [
        ("base", base, steps, base_cost),
        ("base", base, half, float(len(visited_timesteps(sampler, half, sched)))),
    ]
    for path in experts:
        m = Bundle.load(path).manifest
        fits = [s for s in range(steps, 4 * steps + 1) if m.macs_per_image(s, sampler) <= base_cost + 1e-9]
        if not fits:
            raise SystemExit(f"{path}: {steps} steps cost more than the base's at {steps}; no equal-MACs arm")
        fit = max(fits)
        out.append((f"experts {path}", path, fit, m.macs_per_image(fit, sampler)))
    return out


def sample(path: Path, kind: str, steps: int, n: int, seed: int, guidance: float, sampler: str) -> tuple:
    """``n`` images, ``n / 10`` per class prompt, and the class each was asked for."""
    from stepadapt.api import StepAdaptivePipeline
    from stepadapt.captions import class_prompt

    load = StepAdaptivePipeline.from_base if kind == "base" else StepAdaptivePipeline.from_bundle
    pipe = load(path)
    per = n // 10
    prompts = [class_prompt(c) for c in range(10)]
    g = torch.Generator().manual_seed(seed)
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=per,
               generator=g, sampler=sampler, output_type="uint8")  # fmt: skip
    return out.images, np.repeat(np.arange(10), per)


def score_arm(net, classifier, real, arm: tuple, args: argparse.Namespace, seed: int) -> dict:
    from stepadapt.classifier import class_accuracy
    from stepadapt.evaluate import features, kid
    from stepadapt.sampling import save_grid

    name, path, steps, macs = arm
    t0 = time.perf_counter()
    images, labels = sample(path, name, steps, args.n, seed, args.guidance, args.sampler)
    seconds = time.perf_counter() - t0
    if seed == 0:
        per = args.n // 10
        save_grid(images[np.arange(10) * per][:, ...], args.out / f"{slug(name)}-{steps}.png")
    k, k_std = kid(real, features(net, images))
    return {"arm": name, "seed": seed, "steps": steps, "macs_per_image": round(macs, 3), "kid": k,
            "kid_std": k_std, "accuracy": class_accuracy(classifier, images, labels),
            "sample_seconds": round(seconds, 1), "n": args.n, "guidance": args.guidance,
            "sampler": args.sampler}  # fmt: skip


def table(rows: list[dict]) -> str:
    """Mean ± std over seeds per (arm, steps)."""
    out = ["| arm | steps | MACs / image (base evals) | KID (mean ± std over seeds) | accuracy | seeds |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["steps"]), []).append(r)
    for (arm, steps), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] == "base", kv[0][0], -kv[0][1])):
        k, a = np.array([r["kid"] for r in rs]), np.array([r["accuracy"] for r in rs])
        out.append(f"| {arm} | {steps} | {rs[0]['macs_per_image']:.2f} | {k.mean():.4f} ± {k.std():.4f} | "
                   f"{100 * a.mean():.1f} % ± {100 * a.std():.1f} | {len(rs)} |")  # fmt: skip
    return "\n".join(out)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name).strip("-")


def ship(src: Path, dst: Path) -> Path:
    """A pipeline directory stored again in float16 (half the size; it loads back into float32)."""
    from stepadapt.models import load_base
    from stepadapt.pipeline import surround_of, write_pipeline

    unet, sched = load_base(src)
    return write_pipeline(dst, unet, sched, surround_of(src), dtype=torch.float16)


def main(argv: list[str] | None = None) -> None:
    from stepadapt.classifier import load_classifier
    from stepadapt.evaluate import InceptionFeatures, real_set

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--experts", type=Path, nargs="*", default=[],
                   help="Bundles to compare, each its own arm (left out: the base's arms only).")  # fmt: skip
    p.add_argument("--ship", type=Path, help="Write --base as a float16 pipeline here, and stop.")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=12, help="The base's steps (the equal-MACs point).")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sampler", default="unipc")
    p.add_argument("--out", type=Path, default=Path("runs/t2i-eval"))
    p.add_argument("--scores", type=Path, default=SCORES)
    args = p.parse_args(argv)
    if args.ship is not None:
        print(f"shipped -> {ship(args.base, args.ship)}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    scores = read_json(args.scores) if args.scores.is_file() else {}
    net, classifier = InceptionFeatures(), load_classifier()
    for seed in map(int, args.seeds.split(",")):
        _, real = real_set(net, "fashion-mnist", args.n, 32, 1, seed=seed)
        for arm in arms(args.base, args.experts, args.steps, args.sampler):
            key = f"{arm[0]}|{seed}|{arm[2]}|g{args.guidance:g}|{args.sampler}|{args.n}"
            if key not in scores:
                scores[key] = score_arm(net, classifier, real, arm, args, seed)
                with locked(args.scores):  # another run (the base's arms) may write beside this one
                    scores = {**(read_json(args.scores) if args.scores.is_file() else {}), **scores}
                    write_json(args.scores, scores)
            r = scores[key]
            print(
                f"{key}: KID {r['kid']:.4f} ± {r['kid_std']:.4f}, accuracy {100 * r['accuracy']:.1f} %",
                flush=True,
            )
    same = {"guidance": args.guidance, "sampler": args.sampler, "n": args.n}  # other runs' rows stay out
    rows = [r for r in scores.values() if all(r.get(k) == v for k, v in same.items())]
    command = "python -m benchmarks.t2i " + " ".join(argv or sys.argv[1:])
    write_json(RESULTS / "t2i.json", {"machine": platform.processor() or platform.machine(), "rows": rows,
                                      "command": command})  # fmt: skip
    print(table(rows))
    print(json.dumps({"written": str(RESULTS / "t2i.json")}))


if __name__ == "__main__":
    main()
