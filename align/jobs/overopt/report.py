"""The over-optimization report: ``report.json`` (every number), ``report.md``, plots, a rich table.

``report.json``::

    seconds, seeds, proxy {pairs, eval_accuracy, ...}, initial {gold, proxy, kl, ...}
    objectives: {NAME: {objective, steps,
                        kl, kl_k3, sqrt_kl, gold, proxy, ... (means over seeds, one per checkpoint),
                        std {kl, gold, proxy, ...}, per_seed {SEED: {kl, gold, proxy, ...}},
                        peak_gold, peak_step, kl_at_peak, final_gold, final_proxy, final_kl, final_kl_k3,
                        final {distinct_1, distinct_2, sft_logprob, length, ...},
                        gao_fit {alpha, gamma, rmse, d_peak, kl_peak, gold_peak}  (gold − initial gold),
                        divergence {step, kl, gold_drop, proxy_gain, final_gold_se, final_proxy_se, significant} | null,
                        overoptimized}}
    best_of_n: {n, kl, sqrt_kl, gold, proxy (means over seeds), std, gao_fit}
    findings: {overoptimization_run, overoptimized, rcfd_run, rcfd_final_gold, rloo_final_gold,
               rcfd_at_or_above}

Curves are means over seeds at each checkpoint; ``std`` holds the seed standard deviations
(the bands of the plots). NAME says the settings (``rloo_beta0.01``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from align.jobs.overopt.metrics import divergence, fit_gao_bon, fit_gao_rl, gao_bon, gao_rl, peak, sqrt_kl
from align.jobs.report import save_figure


def _scalar_keys(records: list[dict]) -> list[str]:
    first = records[0]
    return [k for k, v in first.items() if isinstance(v, (int, float)) and k != "step"]


def summarize_objective(per_seed: dict[int, list[dict]], objective: dict | None = None) -> dict[str, Any]:
    """Means and standard deviations over seeds of every checkpoint metric, the peak, the final
    point, Gao's fit of the gold gain against d = √KL and the divergence point."""
    seeds = sorted(per_seed)
    steps = [r["step"] for r in per_seed[seeds[0]]]
    for seed in seeds:
        if [r["step"] for r in per_seed[seed]] != steps:
            raise ValueError(f"seed {seed}: checkpoints {[r['step'] for r in per_seed[seed]]} differ from {steps}")
    keys = _scalar_keys(per_seed[seeds[0]])
    values = {k: np.array([[r[k] for r in per_seed[s]] for s in seeds], dtype=float) for k in keys}  # [S, C]
    out: dict[str, Any] = {"objective": objective or {}, "steps": steps, "seeds": seeds}
    for key in keys:
        out[key] = values[key].mean(0).tolist()
    out["sqrt_kl"] = [sqrt_kl(k) for k in out["kl"]]
    out["std"] = {key: values[key].std(0).tolist() for key in keys}
    out["per_seed"] = {str(s): {k: values[k][i].tolist() for k in keys} for i, s in enumerate(seeds)}
    i = peak(out["gold"])
    last = len(steps) - 1
    out.update(
        peak_gold=out["gold"][i],
        peak_step=steps[i],
        kl_at_peak=out["kl"][i],
        final_gold=out["gold"][last],
        final_proxy=out["proxy"][last],
        final_kl=out["kl"][last],
        final_kl_k3=out["kl_k3"][last] if "kl_k3" in out else None,
        final={k: out[k][last] for k in keys},
    )
    d = np.sqrt(np.clip(values["kl"], 0, None)).reshape(-1)
    gain = (values["gold"] - values["gold"][:, :1]).reshape(-1)  # relative to each seed's initial policy
    out["gao_fit"] = fit_gao_rl(d, gain)
    j = divergence(out["gold"], out["proxy"])
    if j is None:
        out["divergence"] = None
    else:

        def final_se(key: str) -> float:
            return float(values[key][:, last].std(ddof=1) / math.sqrt(len(seeds))) if len(seeds) > 1 else 0.0

        drop = out["gold"][j] - out["gold"][last]
        proxy_gain = out["proxy"][last] - out["proxy"][j]
        # over-optimization needs both halves to be real: the gold falls AND the proxy still rises
        out["divergence"] = {
            "step": steps[j],
            "kl": out["kl"][j],
            "gold_drop": drop,
            "proxy_gain": proxy_gain,
            "final_gold_se": final_se("gold"),
            "final_proxy_se": final_se("proxy"),
            "significant": bool(len(seeds) > 1 and drop > 2 * final_se("gold") and proxy_gain > 2 * final_se("proxy")),
        }
    out["overoptimized"] = bool(out["divergence"] and out["divergence"]["significant"])
    return out


def summarize_bon(per_seed: dict[int, dict]) -> dict[str, Any]:
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    out: dict[str, Any] = {"n": first["n"], "kl": first["kl"], "sqrt_kl": [math.sqrt(k) for k in first["kl"]]}
    out["std"] = {}
    for key in ("gold", "proxy"):
        arr = np.array([per_seed[s][key] for s in seeds], dtype=float)
        out[key] = arr.mean(0).tolist()
        out["std"][key] = arr.std(0).tolist()
    out["per_seed"] = {str(s): {k: per_seed[s][k] for k in ("gold", "proxy")} for s in seeds}
    gain = np.array([np.array(per_seed[s]["gold"]) - per_seed[s]["gold"][0] for s in seeds]).reshape(-1)
    d = np.tile(np.array(out["sqrt_kl"]), len(seeds))
    out["gao_fit"] = fit_gao_bon(d, gain) if first["n"][0] == 1 else None
    return out


def findings(objectives: dict[str, dict]) -> dict[str, Any]:
    """The acceptance questions: does RLOO with the smallest KL coefficient over-optimise, and does
    RCfD end at or above it in gold?"""
    rloo = {n: o for n, o in objectives.items() if o["objective"].get("name") == "rloo"}
    rcfd = {n: o for n, o in objectives.items() if o["objective"].get("name") == "rcfd"}
    out: dict[str, Any] = {}
    if rloo:
        name = min(rloo, key=lambda n: rloo[n]["objective"].get("beta") or 0.0)
        out.update(overoptimization_run=name, overoptimized=rloo[name]["overoptimized"])
        out["rloo_final_gold"] = rloo[name]["final_gold"]
        if rcfd:
            best = max(rcfd, key=lambda n: rcfd[n]["final_gold"])
            out.update(rcfd_run=best, rcfd_final_gold=rcfd[best]["final_gold"])
            out["rcfd_at_or_above"] = bool(rcfd[best]["final_gold"] >= rloo[name]["final_gold"])
    return out


def build_report(
    study, results: dict[str, dict[int, list[dict]]], bon: dict[int, dict], proxy: dict, seconds: float
) -> dict[str, Any]:
    """Everything the study measured, summarised (see the module docstring for the layout)."""
    specs = {spec.run_name: spec for spec in study.objectives}
    objectives = {}
    for name, per_seed in results.items():
        spec = specs[name]
        settings = {**spec.model_dump(mode="json", exclude={"label"}), "beta": spec.effective_beta}
        objectives[name] = summarize_objective(per_seed, settings)
    first = next(iter(results.values()))
    seeds = sorted(first)
    initial = {k: float(np.mean([first[s][0][k] for s in seeds])) for k in _scalar_keys(first[seeds[0]])}
    report: dict[str, Any] = {
        "description": study.description,
        "seconds": seconds,
        "seeds": seeds,
        "proxy": proxy,
        "gold": [c.model_dump(mode="json", exclude_none=True) for c in study.gold],
        "initial": initial,
        "objectives": objectives,
        "best_of_n": summarize_bon(bon) if bon else None,
    }
    report["findings"] = findings(objectives)
    return report


# --------------------------------------------------------------------------------------------
# output


def finding_lines(found: dict) -> list[str]:
    """The study's verdicts in words, for the Markdown report and the terminal alike."""
    lines = []
    if "overoptimization_run" in found:
        verdict = "reproduced" if found["overoptimized"] else "not reproduced"
        lines.append(f"Over-optimization with {found['overoptimization_run']}: {verdict}.")
    if "rcfd_run" in found:
        lines.append(
            f"{found['rcfd_run']} final gold {_fmt(found['rcfd_final_gold'])} vs "
            f"{found['overoptimization_run']} {_fmt(found['rloo_final_gold'])}: "
            + ("at or above." if found["rcfd_at_or_above"] else "below.")
        )
    return lines


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


TABLE_HEADER = [
    "objective",
    "peak gold (KL)",
    "final gold ± sd",
    "final proxy",
    "final KL",
    "distinct-1/2",
    "SFT log-lik/token",
    "length",
    "proxy-score KL to demos",
]


def table_rows(report: dict) -> list[list[str]]:
    ini = report["initial"]
    rows = [
        [
            "initial (SFT)",
            "",
            _fmt(ini["gold"]),
            _fmt(ini["proxy"]),
            "0",
            f"{_fmt(ini['distinct_1'], 2)}/{_fmt(ini['distinct_2'], 2)}",
            _fmt(ini["sft_logprob"], 2),
            _fmt(ini["length"], 1),
            _fmt(ini.get("proxy_hist_kl"), 2),
        ]
    ]
    for name, o in report["objectives"].items():
        final = o["final"]
        sd = o["std"]["gold"][-1]
        rows.append(
            [
                name,
                f"{_fmt(o['peak_gold'])} ({_fmt(o['kl_at_peak'], 1)})",
                f"{_fmt(o['final_gold'])} ± {_fmt(sd)}",
                _fmt(o["final_proxy"]),
                _fmt(o["final_kl"], 2),
                f"{_fmt(final['distinct_1'], 2)}/{_fmt(final['distinct_2'], 2)}",
                _fmt(final["sft_logprob"], 2),
                _fmt(final["length"], 1),
                _fmt(final.get("proxy_hist_kl"), 2),
            ]
        )
    bon = report.get("best_of_n")
    if bon:
        rows.append(
            [
                f"best-of-{bon['n'][-1]}",
                "",
                _fmt(bon["gold"][-1]),
                _fmt(bon["proxy"][-1]),
                _fmt(bon["kl"][-1], 2),
                "",
                "",
                "",
                "",
            ]
        )
    return rows


def markdown(report: dict) -> str:
    seeds = report["seeds"]
    gold = ", ".join(f"{c.get('weight', 1.0):g}·{c['name']}" for c in report["gold"])
    lines = [
        "# Reward over-optimization study",
        "",
        report.get("description", "").strip(),
        "",
        f"Seeds {seeds}; proxy: reward model trained on {report['proxy']['pairs']} gold-labelled pairs "
        f"({report['proxy']['labels']} labels), held-out accuracy {_fmt(report['proxy'].get('eval_accuracy'))}. "
        f"Gold: {gold}. "
        f"Wall time {report['seconds'] / 60:.1f} min.",
        "",
        "![gold and proxy against sqrt KL](gold_proxy_vs_kl.png)",
        "",
        "![curves against step](curves_vs_step.png)",
        "",
        "## Final checkpoint, means over seeds",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    lines += [
        "",
        "KL is the k1 estimate of KL(π‖π_ref) in nats per completion on held-out prompts; peak gold is the "
        "highest mean gold over checkpoints, with the KL there. Proxy-score KL to demos: KL between the "
        "histograms of the demonstrations' and the samples' proxy scores (RCfD's metric; 0: scores like "
        "the demonstrations).",
        "",
        "## Gao et al. fit and divergence",
        "",
        "Gold gain over the initial policy against d = √KL, fitted with R(d) = d(α − γ·log d) on every "
        "(seed, checkpoint) point. Divergence: the checkpoint after which the gold never gets back above "
        "its value while the proxy ends higher than there; *significant* when the gold's drop from it to "
        "the last checkpoint and the proxy's gain over the same span both exceed twice their standard "
        "error over seeds.",
        "",
        "| objective | α | γ | fit rmse | fitted peak KL | fitted peak gain | divergence step (KL) | gold drop "
        "| proxy gain after | over-optimized |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, o in report["objectives"].items():
        fit, div = o["gao_fit"], o["divergence"]
        lines.append(
            f"| {name} | {_fmt(fit['alpha'])} | {_fmt(fit['gamma'])} | {_fmt(fit['rmse'])} | {_fmt(fit['kl_peak'], 2)} "
            f"| {_fmt(fit['gold_peak'])} | "
            + (
                f"{div['step']} ({_fmt(div['kl'], 2)}) | {_fmt(div['gold_drop'])} | {_fmt(div['proxy_gain'])} | "
                if div
                else "– | – | – | "
            )
            + ("yes" if o["overoptimized"] else "no")
            + " |"
        )
    bon = report.get("best_of_n")
    if bon:
        lines += [
            "",
            "## Best-of-n (select by proxy, report gold)",
            "",
            "| n | KL_bon = log n − (n−1)/n | gold | proxy |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {n} | {_fmt(k)} | {_fmt(g)} | {_fmt(p)} |"
            for n, k, g, p in zip(bon["n"], bon["kl"], bon["gold"], bon["proxy"])
        ]
        if bon.get("gao_fit"):
            fit = bon["gao_fit"]
            lines += ["", f"Fit R(d) = d(α − γ·d): α = {_fmt(fit['alpha'])}, γ = {_fmt(fit['gamma'])}."]
    findings_text = finding_lines(report.get("findings") or {})
    if findings_text:
        lines += ["", "## Findings", ""] + [f"- {line}" for line in findings_text]
    lines += ["", "## Curves (means over seeds)", ""]
    for name, o in report["objectives"].items():
        lines += [f"**{name}**", "", "| step | KL | gold | proxy |", "|---|---|---|---|"]
        lines += [
            f"| {s} | {_fmt(k, 2)} | {_fmt(g)} | {_fmt(p)} |"
            for s, k, g, p in zip(o["steps"], o["kl"], o["gold"], o["proxy"])
        ]
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    initial_gold = report["initial"]["gold"]
    for idx, (name, o) in enumerate(report["objectives"].items()):
        color = colors[idx % len(colors)]
        d = np.array(o["sqrt_kl"])
        order = np.argsort(d)
        for ax, key in zip(axes, ("gold", "proxy")):
            mean, std = np.array(o[key]), np.array(o["std"][key])
            ax.plot(d, mean, "o-", color=color, label=name, ms=3)
            ax.fill_between(d[order], (mean - std)[order], (mean + std)[order], color=color, alpha=0.15)
        fit = o["gao_fit"]
        grid = np.linspace(0, max(d.max(), 1e-3), 100)
        axes[0].plot(grid, initial_gold + gao_rl(grid, fit["alpha"], fit["gamma"]), "--", color=color, lw=0.8)
    bon = report.get("best_of_n")
    if bon:
        for ax, key in zip(axes, ("gold", "proxy")):
            ax.plot(bon["sqrt_kl"], bon[key], "s-", color="black", label="best-of-n", ms=3)
        if bon.get("gao_fit"):
            grid = np.linspace(0, max(bon["sqrt_kl"]), 100)
            fit = bon["gao_fit"]
            axes[0].plot(grid, bon["gold"][0] + gao_bon(grid, fit["alpha"], fit["gamma"]), ":", color="black", lw=0.8)
    for ax, key in zip(axes, ("gold", "proxy")):
        ax.set_xlabel("d = √KL(π‖π_ref)")
        ax.set_ylabel(f"{key} reward")
        ax.set_title(f"{key} (mean ± sd over seeds)" + ("; dashed: Gao fit" if key == "gold" else ""))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    first = save_figure(fig, out / "gold_proxy_vs_kl.png")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for idx, (name, o) in enumerate(report["objectives"].items()):
        color = colors[idx % len(colors)]
        for ax, key in zip(axes, ("gold", "proxy", "kl")):
            mean, std = np.array(o[key]), np.array(o["std"][key])
            ax.plot(o["steps"], mean, color=color, label=name)
            ax.fill_between(o["steps"], mean - std, mean + std, color=color, alpha=0.15)
    for ax, key in zip(axes, ("gold", "proxy", "KL (k1)")):
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return [first, save_figure(fig, out / "curves_vs_step.png")]


def write_report(report: dict, out: Path) -> list[Path]:
    """``report.json``, ``report.md`` and the two PNG plots in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    return [out / "report.json", out / "report.md", *plot(report, out)]


def print_summary(report: dict) -> None:
    """The table and the findings in the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"reward over-optimization, {len(report['seeds'])} seeds (final checkpoint)")
    for column in TABLE_HEADER:
        table.add_column(column)
    for row in table_rows(report):
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # a log file gets the whole table, not an 80-column squeeze
    console.print(table)
    for line in finding_lines(report.get("findings") or {}):
        console.print(line)
