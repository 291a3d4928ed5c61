"""Outputs of a lab run: results.json, a PNG of the curves with seed bands, a rich table."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

PANELS = [
    ("kl_to_target", "KL(π ‖ target)", "log"),
    ("expected_reward", "E_π[r]", "linear"),
    ("kl_to_ref", "KL(π ‖ π_ref)", "linear"),
    ("mean_length", "mean length |y|", "linear"),
]


def write_json(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1))
    return path


def plot(results: dict[str, Any], out: Path) -> Path:
    runs = results["objectives"]
    panels = [p for p in PANELS if any(p[0] in run["curves"] for run in runs.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    colors = {label: f"C{i % 10}" for i, label in enumerate(runs)}
    for ax, (key, title, scale) in zip(axes[0], panels):
        for label, run in runs.items():
            curves = run["curves"]
            if key not in curves:
                continue
            steps, mean, std = curves["step"], curves[key], curves[key + "_std"]
            lo = [m - s for m, s in zip(mean, std)]
            hi = [m + s for m, s in zip(mean, std)]
            if scale == "log":  # floor at 1e-6; a band never reaches below a tenth of the mean
                mean = [max(m, 1e-6) for m in mean]
                lo = [max(v, m / 10) for v, m in zip(lo, mean)]
                hi = [max(v, 1e-6) for v in hi]
            ax.plot(steps, mean, color=colors[label], label=label)
            ax.fill_between(steps, lo, hi, color=colors[label], alpha=0.2, linewidth=0)
            twin = run.get("lag0", {}).get("curves", {})
            if key in twin:  # the same objective at lag 0, dashed
                values = [max(m, 1e-6) for m in twin[key]] if scale == "log" else twin[key]
                ax.plot(twin["step"], values, color=colors[label], linestyle="--", linewidth=0.8)
        ax.set_yscale(scale)
        ax.set_title(title)
        ax.set_xlabel("step")
    handles = [plt.Line2D([], [], color=colors[label], label=label) for label in runs]
    axes[0][-1].legend(handles=handles, fontsize=8)
    lag = f", lag {results['lag']} (dashed: lag 0)" if results.get("lag") else ""
    fig.suptitle(f"{results['mode']} lab, β = {results['beta']}, {results['seeds']} seeds (mean ± std){lag}")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean_std(values: list[float]) -> str:
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def _kl(values: list[float]) -> str:
    """A KL to target (it spans 1 down to rounding, 1e-15): mean ± std in scientific notation."""
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1e} ± {std:.0e}"


def _steps(run: dict[str, Any]) -> str:
    """Steps to target: "n/a" without a target, "never" when it was not reached."""
    if "kl_to_target" not in run["final"]:
        return "n/a"
    return "never" if run.get("steps_to_target") is None else str(run["steps_to_target"])


def table(results: dict[str, Any], console: Console | None = None) -> None:
    sequence = results["mode"] == "sequence"
    lag = results.get("lag")
    twins = any("lag0" in run for run in results["objectives"].values())
    title = f"align bandit ({results['mode']}, β = {results['beta']}, {results['seeds']} seeds"
    title += f", lag {lag})" if lag is not None else ")"
    title += f"\nsteps: the first logged step with KL to target ≤ {results.get('converged_kl', 1e-3):g}"
    t = Table(title=title)
    # under a lag every objective samples the (lagged) policy: no data column
    columns = ["objective"] + (["data"] if lag is None else []) + ["KL to target", "steps"]
    columns += ["lag 0: KL", "lag 0: steps"] if twins else []
    columns += ["expected reward", "KL to ref"] + (["mean length"] if sequence else [])
    for column in columns:
        t.add_column(column, justify="left" if column in ("objective", "data") else "right")
    for label, run in results["objectives"].items():
        final = run["final"]
        row = [label] + ([run["data"]] if lag is None else [])
        row += [_kl(final["kl_to_target"]) if "kl_to_target" in final else "n/a", _steps(run)]
        if twins:
            twin = run.get("lag0")
            kl = None if twin is None else twin["final"].get("kl_to_target")
            row += [_kl(kl) if kl else "n/a", _steps(twin) if twin else "n/a"]
        row += [f"{statistics.fmean(final['expected_reward']):.4f}", f"{statistics.fmean(final['kl_to_ref']):.4f}"]
        if sequence:
            row.append(f"{statistics.fmean(final['mean_length']):.3f}")
        t.add_row(*row)
    (console or Console()).print(t)
