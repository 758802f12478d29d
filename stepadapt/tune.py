"""How to sample a bundle: score sampling settings under a MAC budget per image, keep the best.

A setting is a solver spec, a step count and whether to take the analytic jump over the Gaussian
expert's interval. Its cost is counted per model evaluation (Heun's two per step, the jump's one
Gaussian), in base evaluations per image; its quality is KID on TF-FID Inception features against
real held-out images, averaged over seeds. The solver changes the answer more than anything else
measured on the shipped bundle (docs/results.md), so the choice is measured, not assumed, and lands
in the manifest as the bundle's default way to sample.

Every score is stored (one JSON file per target weights, setting, n, seed and data), so a re-run, a
killed run and the solver benchmark share what was measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stepadapt import StepadaptError
from stepadapt.evaluate import (
    InceptionFeatures,
    Target,
    default_cache_dir,
    generate,
    load_target,
    real_set,
    score,
)
from stepadapt.io import read_json, write_json
from stepadapt.solvers import Setting, Solver

# What `tune` tries by default: the solvers that scored best on the shipped base and bundle, each
# with and without dynamic thresholding where it changed the base's ranking, and DDIM as the old default.
TUNE_SAMPLERS = ("unipc", "dpm++2m", "dpm++2m:thresholding", "unipc:thresholding", "ddim")
TUNE_STEPS = (4, 5, 6, 8, 10, 12, 16, 20, 25)


def recommended_of(paths: Iterable[str | os.PathLike]) -> dict[str, Any] | None:
    """The recommendation of the first bundle among ``paths`` that has one (evaluate's default)."""
    for p in paths:
        manifest = Path(p) / "manifest.json"
        if manifest.is_file():
            rec = read_json(manifest, "bundle manifest").get("recommended")
            if rec:
                return rec
    return None


def candidates(
    target: Target,
    max_macs_per_image: float,
    samplers: Iterable[str] = TUNE_SAMPLERS,
    steps: Iterable[int] = TUNE_STEPS,
    jump: bool = False,
) -> list[tuple[Setting, float]]:
    """Every setting costing at most ``max_macs_per_image`` base evaluations, with its cost."""
    out = []
    for spec in samplers:
        for n in steps:
            for j in (False, True) if jump and Solver.parse(spec).jumps else (False,):
                s = Setting(spec, n, j)
                macs = target.macs_per_image(s.steps, s.sampler, s.jump)
                if macs <= max_macs_per_image + 1e-9:
                    out.append((s, macs))
    return out


class Scorer:
    """KID of a target sampled with a setting, stored once per (weights, setting, n, seed, data)."""

    def __init__(
        self,
        data: str = "fashion-mnist",
        n: int = 500,
        store: str | os.PathLike | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.data, self.n, self.log = data, n, log
        self.store = Path(store) if store else default_cache_dir() / "scores"
        self._net: InceptionFeatures | None = None
        self._real: dict[tuple, tuple] = {}

    def _key(self, target: Target, setting: Setting, seed: int) -> Path:
        key = json.dumps([target.fingerprint(), setting.to_dict(), self.n, seed, str(self.data)])
        name = f"{setting.sampler}-{setting.steps}{'-jump' if setting.jump else ''}-s{seed}"
        name = re.sub(r"[^A-Za-z0-9+.-]", "_", name)
        return self.store / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"

    def score(self, target: Target, setting: Setting, seed: int) -> dict[str, Any]:
        path = self._key(target, setting, seed)
        if path.is_file():
            return read_json(path, "stored score")
        if self._net is None:
            self._net = InceptionFeatures()
        shape = tuple(target.shape)
        real_key = (shape, seed)
        if real_key not in self._real:
            self._real[real_key] = real_set(self._net, self.data, self.n, shape[1], shape[0], seed=seed)
        real_images, real_feats = self._real[real_key]
        t0 = time.perf_counter()
        images = generate(
            target.denoiser, target.scheduler, shape, self.n, setting.steps, seed, setting.sampler,
            target.jump(setting.jump),
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        r = score(self._net, images, real_images, real_feats)
        out = {
            "target": str(target.path), "fingerprint": target.fingerprint(), **setting.to_dict(),
            "seed": seed, "n": self.n, "data": str(self.data),
            "macs_per_image": target.macs_per_image(setting.steps, setting.sampler, setting.jump),
            "kid": r["kid"], "kid_std": r["kid_std"], "fid": r["fid"], "sample_seconds": round(seconds, 1),
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
        }  # fmt: skip
        write_json(path, out)
        if self.log:
            cost = f"{out['macs_per_image']:.2f} MACs/image"
            self.log(f"{target.path.name}: {setting} seed {seed}: KID {r['kid']:.4f} ({cost})")
        return out

    def mean(self, target: Target, setting: Setting, seeds: Sequence[int]) -> dict[str, Any]:
        """KID averaged over ``seeds``; its spread is the std over seeds (over KID subsets for one)."""
        runs = [self.score(target, setting, s) for s in seeds]
        kids = [r["kid"] for r in runs]
        spread = float(np.std(kids, ddof=1)) if len(kids) > 1 else runs[0]["kid_std"]
        return {**setting.to_dict(), "macs_per_image": runs[0]["macs_per_image"], "kid": float(np.mean(kids)),
                "kid_std": spread, "kid_per_seed": kids, "seeds": list(seeds), "n": self.n}  # fmt: skip


def best(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The lowest KID (ties: fewer MACs per image)."""
    return min(rows, key=lambda r: (r["kid"], r["macs_per_image"])) if rows else None


def tune(
    bundle: str | os.PathLike,
    max_macs_per_image: float,
    *,
    base: str | os.PathLike | None = None,
    samplers: Sequence[str] = TUNE_SAMPLERS,
    steps: Sequence[int] = TUNE_STEPS,
    jump: bool | None = None,
    base_samplers: Sequence[str] | None = None,
    n: int = 500,
    seeds: Sequence[int] = (0, 1),
    data: str = "fashion-mnist",
    store: str | os.PathLike | None = None,
    device: str = "cpu",
    write: bool = True,
    command: str = "",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score every setting of ``bundle`` within the budget, and with ``base`` the base's own best
    within it (over ``base_samplers``, by default the same: the base may need other options, e.g.
    dynamic thresholding); the best bundle setting becomes the manifest's ``recommended`` (``write``)."""
    target = load_target(bundle, device)
    if target.bundle is None:
        raise StepadaptError(f"{bundle} is not a bundle (tune writes into a bundle's manifest)")
    if not target.conditioning.unconditional:
        raise StepadaptError(
            f"{bundle} is conditional: tune scores unconditional bundles only so far "
            "(python -m benchmarks.conditional measures conditional ones)"
        )
    if jump is None:  # try it wherever it exists
        jump = target.can_jump
    options = candidates(target, max_macs_per_image, samplers, steps, jump)
    if not options:
        raise StepadaptError(
            f"no setting of {bundle} costs at most {max_macs_per_image} base evaluations per image"
        )
    scorer = Scorer(data, n, store, log)
    rows = [scorer.mean(target, s, seeds) for s, _ in options]
    base_row = None
    if base is not None:
        ref = load_target(base, device)
        options = candidates(ref, max_macs_per_image, base_samplers or samplers, steps)
        base_rows = [scorer.mean(ref, s, seeds) for s, _ in options]
        base_row = best(base_rows)
    top = best(rows)
    rec = {
        **Setting.from_dict(top).to_dict(),
        "macs_per_image": round(top["macs_per_image"], 3), "kid": top["kid"], "kid_std": top["kid_std"],
        "n": n, "seeds": list(seeds), "data": str(data), "max_macs_per_image": max_macs_per_image,
        "base_best": None if base_row is None else {
            k: base_row[k] for k in ("sampler", "steps", "macs_per_image", "kid", "kid_std")},
        "tried": len(rows), "command": command,
        "measured": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
    }  # fmt: skip
    if write:
        target.bundle.set_recommended(rec)
    rec["rows"] = rows
    return rec
