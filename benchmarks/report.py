"""Bench reports (bench-<name>.json) -> docs/benchmarks.md and its plots.

The page is generated, never edited by hand: every figure on it comes from a
report, and each report carries the command, machine, versions and commit
that produced it.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stepadapt.benchmarks import load as load_report

from stepadapt.io import atomic_path
from stepadapt.kinds import kind_of

# What issue 12 asks of the ddpm-cifar10 experts on a CPU.
ORT_SLACK, TORCH_SLACK, IMAGE_SLACK, OVERHEAD_MS, CEILING_SHARE = 0.05, 0.10, 0.05, 0.5, 0.9


def _f(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ms(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.2f} ms" if x < 100 else f"{x:.0f} ms"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def _cells(r: dict, **match) -> list[dict]:
    return [c for c in r.get("latency", {}).get("cells", []) if all(c[k] == v for k, v in match.items())]


def _pruned(r: dict) -> list[dict]:
    """The experts' cells whose width the budget chose: latency following MACs is a claim about pruned
    networks (the base itself is not timed twice; a closed-form expert's cost is set by the image)."""
    return [c for c in _cells(r, arm="experts") if kind_of(c["kind"]).sized_by_budget]


def _find(rows: list[dict], arm: str, backend: str, steps: int) -> dict | None:
    return next((x for x in rows if (x["arm"], x["backend"], x["steps"]) == (arm, backend, steps)), None)


def _image_row(r: dict, arm: str, backend: str, steps: int) -> dict | None:
    rows = r.get("trajectory", {}).get("rows", []) + r.get("serving", {}).get("trajectory_rows", [])
    return _find(rows, arm, backend, steps)


def _overhead(r: dict, layout: str, steps: int) -> float | None:
    for o in r.get("serving", {}).get("router_overhead", []):
        if o["arm"] == "experts" and o["layout"] == layout and o["steps"] == steps:
            return o["router_overhead_ms_per_step"]
    return None


def _overhead_ci(r: dict, o: dict, draws: int = 2000) -> tuple[float, float] | None:
    """95% bootstrap interval of a router overhead from the raw endpoint and in-process samples."""
    import random

    rows = r.get("serving", {}).get("trajectory_rows", [])
    be = f"onnxruntime-t{r['serving'].get('threads', 1)}"
    e = _find(rows, o["arm"], f"endpoint-{o['layout']}", o["steps"])
    loc = _find(rows, o["arm"], be, o["steps"])
    if not e or not loc or len(e["samples_s"]) < 3:
        return None
    e, loc = e["samples_s"], loc["samples_s"]
    rng = random.Random(0)
    boots = sorted(
        (statistics.median(rng.choices(e, k=len(e))) - statistics.median(rng.choices(loc, k=len(loc))))
        * 1e3
        / o["steps"]
        for _ in range(draws)
    )
    return boots[int(0.025 * draws)], boots[int(0.975 * draws) - 1]


def _level(r: dict, layout: str, c: int) -> dict | None:
    levels = r.get("serving", {}).get("layouts", {}).get(layout, {}).get("levels", [])
    return next((x for x in levels if x["concurrency"] == c), None)


def _ceiling(r: dict, c: int) -> dict | None:
    return next((x for x in r.get("serving", {}).get("ceiling", []) if x["concurrency"] == c), None)


def headline(r: dict) -> dict[str, Any]:
    """The figures the README shows, for one report."""
    steps = r["settings"]["serving_steps"]
    traj = next((t for t in r.get("flops", {}).get("trajectory", []) if t["arm"] == "experts"), None)
    img = {be: _image_row(r, "experts", be, steps) for be in ("onnxruntime-t1", "onnxruntime-t2", "torch")}
    c1, c8 = _level(r, "fused", 1), _level(r, "fused", 8)
    return {
        "mac_ratio": traj and traj["mac_ratio"],
        "image_time_ratio": {be: x["time_ratio"] for be, x in img.items() if x and x["time_ratio"]},
        "router_overhead_ms": {lay: _overhead(r, lay, steps) for lay in r["settings"]["layouts"]},
        "images_per_s": {"1": c1 and c1["images_per_s"], "8": c8 and c8["images_per_s"]},
    }


def targets(r: dict) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for the checks the issue set; met is None where not measured."""
    out = []
    for be, slack, batches in (("onnxruntime-t2", ORT_SLACK, (1, 8)), ("onnxruntime-t1", ORT_SLACK, (1, 8)),
                               ("torch", TORCH_SLACK, (1, 8))):  # fmt: skip
        for b in batches:
            cells = [c for c in _pruned(r) if c["backend"] == be and c["batch"] == b]
            if not cells:
                continue
            worst = max(cells, key=lambda c: c["latency_ratio"] - c["mac_ratio"])
            gap = worst["latency_ratio"] - worst["mac_ratio"]
            out.append((
                f"{be} batch {b}: latency ratio ≤ MAC ratio + {slack:.2f} for every expert",
                f"worst {worst['model']}: {worst['latency_ratio']:.3f} vs {worst['mac_ratio']:.3f} "
                f"({gap:+.3f})",
                gap <= slack,
            ))  # fmt: skip
    steps = r["settings"]["serving_steps"]
    traj = next((t for t in r.get("flops", {}).get("trajectory", []) if t["arm"] == "experts"
                 and t["steps"] == steps), None)  # fmt: skip
    for be in ("onnxruntime-t1", "onnxruntime-t2"):
        row = _image_row(r, "experts", be, steps)
        if row and traj and row["time_ratio"]:
            out.append((
                f"whole image ({steps} steps, {be} router) ≤ trajectory MAC ratio + {IMAGE_SLACK:.2f}",
                f"{row['time_ratio']:.3f} vs {traj['mac_ratio']:.3f}",
                row["time_ratio"] <= traj["mac_ratio"] + IMAGE_SLACK,
            ))  # fmt: skip
    for lay in r["settings"]["layouts"]:
        o = _overhead(r, lay, steps)
        if o is not None:
            out.append((f"router overhead ≤ {OVERHEAD_MS} ms per step ({lay} layout, concurrency 1)",
                        f"{o:.3f} ms", o <= OVERHEAD_MS))  # fmt: skip
    for lay in r["settings"]["layouts"]:
        c8, ceil = _level(r, lay, 8), _ceiling(r, 8)
        if c8 and ceil:
            share = c8["images_per_s"] / ceil["images_per_s"]
            out.append((
                f"endpoint images/s at concurrency 8 ≥ {CEILING_SHARE} × in-process onnxruntime "
                f"at batch 8 ({lay})",
                f"{c8['images_per_s']:.2f} vs {ceil['images_per_s']:.2f} ({share:.2f} ×)",
                share >= CEILING_SHARE,
            ))  # fmt: skip
    if r.get("load"):
        out += load_report.targets(r["load"])
    return out


def _section(r: dict, images: dict[str, str]) -> list[str]:
    s, m = r["settings"], r["machine"]
    out = [f"## {r['name']}", ""]
    out += [
        f"- Command: `{r.get('command') or 'stepadapt bench ' + r['bundle']}`",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; GPU: {m['gpu'] or 'none'}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        f"- Commit: `{r.get('commit')}`, {r['created']}; weights: {r['weights']}",
        f"- Settings: {s['repeats']} repeats after {s['warmup']} warm-up per cell, arms interleaved in a "
        "shuffled order per repeat; median shown; raw samples in "
        f"`benchmarks/results/bench-{r['name']}.json`",
        "",
    ]
    fl = r.get("flops")
    if fl:
        out += ["### FLOPs", ""]
        out += _table(
            ["arm", "model", "kind", "timesteps", "MACs", "params", "MAC ratio"],
            [[x["arm"], x["name"], x["kind"], f"[{x['timesteps'][0]}, {x['timesteps'][1]})",
              f"{x['macs'] / 1e6:.1f} M", f"{x['params'] / 1e6:.3f} M", _f(x["mac_ratio"])]
             for x in fl["models"]],
        )  # fmt: skip
        rows = [[x["arm"], f"{x['sampler']} {x['steps']}", f"{x['macs_per_image'] / 1e9:.2f} G",
                 _f(x["mac_ratio"])] for x in fl["trajectory"]]  # fmt: skip
        if fl.get("tdc_rule"):
            t = fl["tdc_rule"]
            rows.append([f"TDC rule (k = {t['k']}, {t['groups']} groups, the plan's visit shares)", "", "",
                         _f(t["mac_ratio"])])  # fmt: skip
        rows += [[x["system"], "published", "", _f(x["mac_ratio"])] for x in fl["references"]]
        out += ["MACs per image along the sampler's trajectory:", ""]
        out += _table(["arm", "sampler, steps", "MACs per image", "ratio to the base"], rows)
    if r.get("latency"):
        out += ["### Latency per step", ""]
        out += [
            "One denoiser call at its interval's middle timestep. The ratio is to the base on the same "
            "backend and batch, measured in the same run.",
            "",
        ]
        backends = s["backends"]
        for b in s["batches"]:
            rows = []
            models = sorted({(c["arm"], c["model"], c["mac_ratio"]) for c in _cells(r, batch=b)},
                            key=lambda x: -x[2])  # fmt: skip
            for arm, name, mac in models:
                row = [f"{arm}/{name}", _f(mac)]
                for be in backends:
                    c = next(iter(_cells(r, batch=b, arm=arm, model=name, backend=be)), None)
                    row.append(f"{_ms(c['median_ms'])} ({_f(c['latency_ratio'])})" if c else "—")
                rows.append(row)
            out += [f"Batch {b}: median time (latency ratio)", ""]
            out += _table(["model", "MAC ratio", *backends], rows)
        if "latency" in images:
            out += [f"![latency ratio vs MAC ratio]({images['latency']})", ""]
    rows = r.get("trajectory", {}).get("rows", []) + r.get("serving", {}).get("trajectory_rows", [])
    if rows:
        out += ["### Trajectory: time per image (batch 1)", ""]
        keys = sorted({(x["backend"], x["steps"]) for x in rows}, key=lambda k: (-k[1], k[0]))
        table = []
        for be, n in keys:
            row = [be, n]
            for arm in ("base", "uniform", "experts"):
                x = next(
                    (y for y in rows if y["arm"] == arm and y["backend"] == be and y["steps"] == n), None
                )
                ratio = f" ({_f(x['time_ratio'])})" if x and x["time_ratio"] else ""
                row.append(f"{_ms(x['median_s'] * 1e3)}{ratio}" if x else "—")
            table.append(row)
        out += ["Median time per image (time ratio to the base on the same backend).", ""]
        out += _table(["backend", "steps", "base", "uniform", "experts"], table)
    sv = r.get("serving")
    if sv:
        out += ["### Serving", ""]
        out += [
            f"One-image requests of {sv['steps']} DDIM steps from concurrent clients (one connection "
            f"each) to a real Triton server on 127.0.0.1. Layouts: `fused` (experts inside the router "
            f"process, concurrent requests stepped together) and `bls` (each expert a Triton model, a BLS "
            f"call per step). onnxruntime {s['threads']} thread(s) per session, {s['instances']} "
            f"router/expert instance(s). Ceiling: the same requests stepped together in process.",
            "",
        ]
        table = []
        for c in s["concurrency"]:
            ceil = _ceiling(r, c)
            row = [c]
            for lay in s["layouts"]:
                lv = _level(r, lay, c)
                row.append(f"{lv['images_per_s']:.2f} ({_ms(lv['p50_ms'])} / {_ms(lv['p99_ms'])}, "
                           f"n = {lv['requests']})" if lv else "—")  # fmt: skip
            row.append(f"{ceil['images_per_s']:.2f} (t{ceil['threads']})" if ceil else "—")
            table.append(row)
        heads = [f"{lay}: images/s (p50 / p99)" for lay in s["layouts"]]
        out += _table(["concurrency", *heads, "in-process ceiling"], table)
        rows = []
        for o in sv["router_overhead"]:
            ci = _overhead_ci(r, o)
            served = _find(sv["trajectory_rows"], o["arm"], f"endpoint-{o['layout']}", o["steps"])
            n = len(served["samples_s"])
            rows.append([o["arm"], o["layout"], o["steps"], n, _ms(o["endpoint_ms"]), _ms(o["in_process_ms"]),
                         f"{o['router_overhead_ms_per_step']:.3f} ms",
                         f"{ci[0]:.2f} .. {ci[1]:.2f} ms" if ci else "—"])  # fmt: skip
        out += [
            "Router overhead per step = (endpoint median − in-process median for the same one-image "
            "requests, interleaved) / steps; 95% bootstrap interval beside it.",
            "",
        ]
        heads = ["arm", "layout", "steps", "pairs", "endpoint", "in process", "router overhead per step"]
        out += _table([*heads, "95% interval"], rows)
        if "serving" in images:
            out += [f"![serving]({images['serving']})", ""]
    if r.get("load"):
        out += load_report.render(r["load"], images.get("load"), r.get("section_runs", {}).get("load"), r)
    t = targets(r)
    if t:
        out += ["### Targets", ""]
        out += _table(["target", "measured", "met"], [[a, b, "yes" if ok else "**no**"] for a, b, ok in t])
    if r.get("skipped"):
        out += ["### Not run on this machine", ""] + [f"- {k}: {v}" for k, v in r["skipped"].items()] + [""]
    return out


def plot(r: dict, out_dir: Path) -> dict[str, str]:
    """PNG plots for one report; returns {kind: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    if r.get("latency"):
        nb = len(r["settings"]["batches"])
        fig, axes = plt.subplots(1, nb, figsize=(4 * nb, 3.6), squeeze=False, sharey=True)
        for ax, b in zip(axes[0], r["settings"]["batches"], strict=True):
            for be in r["settings"]["backends"]:
                cells = [c for c in _cells(r, batch=b, backend=be) if c["arm"] != "base"]
                ax.scatter(
                    [c["mac_ratio"] for c in cells], [c["latency_ratio"] for c in cells], label=be, s=22
                )
            ax.plot([0, 1], [0, 1], "k--", lw=0.8)
            ax.set(title=f"batch {b}", xlabel="MAC ratio", xlim=(0, 1.05), ylim=(0, None))
        axes[0][0].set_ylabel("latency ratio")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{r['name']}: latency vs MACs (dashed: time follows MACs)", fontsize=10)
        files["latency"] = _save(fig, out_dir / f"bench-{r['name']}-latency.png")
        plt.close(fig)
    sv = r.get("serving")
    if sv and sv.get("layouts"):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for lay, d in sv["layouts"].items():
            lv = d["levels"]
            ax.plot([x["concurrency"] for x in lv], [x["images_per_s"] for x in lv], "o-", label=lay)
        ce = sv["ceiling"]
        ax.plot([x["concurrency"] for x in ce], [x["images_per_s"] for x in ce], "k--", label="in-process")
        ax.set(xscale="log", xlabel="concurrent clients", ylabel="images/s", title=f"{r['name']}: throughput")
        ax.set_xticks(r["settings"]["concurrency"], [str(c) for c in r["settings"]["concurrency"]])
        ax.legend(fontsize=8)
        files["serving"] = _save(fig, out_dir / f"bench-{r['name']}-serving.png")
        plt.close(fig)
    if r.get("load"):
        fig = load_report.plot(r["load"], r["name"])
        files["load"] = _save(fig, out_dir / f"bench-{r['name']}-load.png")
        plt.close(fig)
    return files


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path.name


def render(
    reports: Sequence[dict], docs: str | os.PathLike, images_dir: str | os.PathLike | None = None
) -> Path:
    """Write the benchmarks page (and plots beside it in ``images_dir``)."""
    docs = Path(docs)
    images_dir = Path(images_dir) if images_dir else docs.parent / "images"
    rel = os.path.relpath(images_dir, docs.parent)
    lines = [
        "# Benchmarks",
        "",
        "Generated by `stepadapt bench` from the reports in `benchmarks/results/bench-*.json` "
        "(`make bench` reruns all of it); do not edit by hand.",
        "",
        "## Headline",
        "",
    ]
    rows = []
    for r in reports:
        h = headline(r)
        rows.append([
            r["name"], _f(h["mac_ratio"]),
            ", ".join(f"{be} {_f(v)}" for be, v in h["image_time_ratio"].items()) or "—",
            ", ".join(f"{k} {_f(v)} ms" for k, v in h["router_overhead_ms"].items() if v is not None) or "—",
            f"{_f(h['images_per_s']['1'], 2)} / {_f(h['images_per_s']['8'], 2)}",
        ])  # fmt: skip
    lines += _table(["bundle", "trajectory MAC ratio", "image time ratio", "router overhead per step",
                     "images/s at concurrency 1 / 8 (fused)"], rows)  # fmt: skip
    for r in reports:
        files = {k: f"{rel}/{v}" for k, v in plot(r, images_dir).items()}
        lines += _section(r, files)
    with atomic_path(docs) as tmp:
        tmp.write_text("\n".join(lines).rstrip() + "\n")
    return docs
