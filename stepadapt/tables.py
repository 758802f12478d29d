"""What the commands print: plans, bundles, scores as rich tables and lines.

Kept out of the CLI so that it only parses and prints, and so that the demo and
the experiment show the same tables for the same objects.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from stepadapt.kinds import kind_of
from stepadapt.plan import Plan


def plan_table(plan: Plan) -> Table:
    table = Table(title=f"plan: {plan.allocation}, mean {plan.mean_ratio():.3f} x base MACs")
    for col in ("group", "timesteps", "SNR dB", "difficulty", "visits", "MACs / base"):
        table.add_column(col, justify="right")
    for g in plan.groups:
        label = kind_of(g.kind).label
        table.add_row(
            g.name,
            f"[{g.lo}, {g.hi})",
            f"{g.snr_db[0]:.1f} .. {g.snr_db[1]:.1f}",
            f"{g.difficulty:.3f}",
            f"{g.visit_share:.0%}",
            f"{g.macs_ratio:.3f}" + (f" ({label})" if label else ""),
        )
    return table


def gaussian_lines(plan: Plan) -> list[str]:
    """Where the Gaussian expert went and why, or why there is none."""
    choice = plan.gaussian
    if choice is None:
        return []
    if choice.rule == "none":
        return [choice.describe()]
    group = next((g for g in plan.groups if not kind_of(g.kind).sized_by_budget), None)
    lines = [choice.describe()] if group is not None else []
    if choice.rule == "auto":
        if group is None:
            return [f"no Gaussian expert: its eps error is never within {choice.tolerance} x the base's"]
        lines.append(
            f"Gaussian expert: eps error within {choice.tolerance} x the base's from t = "
            f"{choice.tolerance_from} on"
        )
        if group.lo != choice.tolerance_from:
            lines.append(f"  started at t = {group.lo} instead, so that the budget can still be spent")
    if group is not None:
        lines.append(
            f"Gaussian expert on [{group.lo}, {group.hi}): {group.visit_share:.0%} of the steps, "
            f"{group.macs_ratio:.3f} x the base's MACs"
        )
    return lines


def bundle_table(m: Any) -> Table:
    """A bundle's experts: interval, SNR range, MACs vs base, params (``m``: a Manifest)."""
    table = Table(
        title=f"{len(m.experts)} experts, trajectory mean {m.trajectory_macs_ratio():.3f} x base MACs",
        caption=None if m.conditioning.unconditional else f"conditioned on {_condition_text(m)}",
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
    return table


def _condition_text(m: Any) -> str:
    names = m.class_names or []
    text = m.conditioning.describe()
    return text + (f" ({', '.join(names)})" if names else "")


def evaluate_table(report: dict[str, Any], n: int, setting: Any, seed: int) -> Table:
    guidance = report["settings"].get("guidance_scale")
    title = f"{n} images, {setting}, seed {seed}" + (f", guidance {guidance:g}" if guidance else "")
    table = Table(title=title)
    by_class = any("kid_per_class" in r for r in report["results"].values())
    columns = ["target", "MACs/base", "KID", "FID", "PSNR vs base", "SWD", "sampling s"]
    columns += ["KID per class", "accuracy"] if by_class else []
    for col in columns:
        table.add_column(col, justify="left" if col == "target" else "right")
    for name, r in report["results"].items():
        row = [
            name, f"{r['macs_ratio']:.3f}", f"{r['kid']:.4f} ± {r['kid_std']:.4f}", f"{r['fid']:.1f}",
            f"{r['psnr']:.2f}", f"{r['swd']:.4f}", f"{r['sample_seconds']:.1f}",
        ]  # fmt: skip
        if by_class:
            acc = r.get("accuracy")
            row += [f"{r['kid_per_class']:.4f}", "—" if acc is None else f"{100 * acc:.1f}%"]
        table.add_row(*row)
    return table


def _setting_label(r: dict[str, Any]) -> str:
    return f"{r['sampler']} x{r['steps']}" + (" +jump" if r.get("jump") else "")


def tune_table(rec: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    for col in ("setting", "MACs / image", "KID"):
        table.add_column(col)
    for r in sorted(rec["rows"], key=lambda r: r["kid"]):
        table.add_row(_setting_label(r), f"{r['macs_per_image']:.2f}", f"{r['kid']:.4f} ± {r['kid_std']:.4f}")
    return table


def tune_line(rec: dict[str, Any]) -> str:
    best = rec["base_best"]
    vs = f"; the base's best within it: {_setting_label(best)}, KID {best['kid']:.4f}" if best else ""
    return (
        f"recommended: {_setting_label(rec)} ({rec['macs_per_image']:.2f} base evaluations per image), "
        f"KID {rec['kid']:.4f}{vs}"
    )
