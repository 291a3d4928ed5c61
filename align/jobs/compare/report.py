"""The comparison report: ``report.json`` (every number), ``report.md``, plots, a printed table.

``report.json``::

    seconds, seeds, samples_per_step, initial {gold, reward, kl, ...} (mean over seeds)
    objectives: {NAME: {objective, train, k, prompts_per_step, steps,
                        kl, kl_k3, gold, reward, win_rate, length   (means over seeds, one per checkpoint),
                        std {...}, per_seed {SEED: {...}},
                        final {kl, gold, reward, win_rate, ...}, final_std {...},
                        regularised (final reward − β·KL), cost {seconds, tokens_per_s, peak_rss_mib} (seed means)}}
    matched_kl, gold_at_matched_kl {NAME: gold}       the frontier at the largest KL every run reached
    claims: [{claim, reproduces: true | false | null, line}]

A claim whose runs are missing is ``null`` and says which runs it needs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from align.jobs.compare.staleness import staleness_lines, staleness_report
from align.jobs.report import save_figure

CURVE_KEYS = ("kl", "kl_k3", "gold", "reward", "win_rate", "length")
COST_KEYS = ("seconds", "wall_seconds", "tokens_per_s", "peak_rss_mib")
CLOSE = 0.2  # "≈": within 20 % of the on-policy run's gain in the regularised objective


def summarize_objective(per_seed: dict[int, dict]) -> dict[str, Any]:
    seeds = sorted(per_seed)
    spec = per_seed[seeds[0]]["spec"]
    steps = [r["step"] for r in per_seed[seeds[0]]["records"]]
    values = {k: np.array([[r[k] for r in per_seed[s]["records"]] for s in seeds], dtype=float) for k in CURVE_KEYS}
    out: dict[str, Any] = {
        "objective": spec.objective_section(),
        "train": dict(spec.train),
        "k": spec.k,
        "generation": dict(spec.generation),
        "steps": steps,
        "seeds": seeds,
    }
    for key in CURVE_KEYS:
        out[key] = values[key].mean(0).tolist()
    out["std"] = {key: values[key].std(0).tolist() for key in CURVE_KEYS}
    out["per_seed"] = {str(s): {k: values[k][i].tolist() for k in CURVE_KEYS} for i, s in enumerate(seeds)}
    out["final"] = {k: out[k][-1] for k in CURVE_KEYS}
    out["final_std"] = {k: out["std"][k][-1] for k in CURVE_KEYS}
    beta = spec.effective_beta or 0.0
    out["beta"] = beta
    out["regularised"] = out["final"]["reward"] - beta * out["final"]["kl"]
    costs = [per_seed[s]["cost"] for s in seeds]
    out["cost"] = {k: float(np.mean([c[k] for c in costs])) for k in COST_KEYS}
    return out


def gold_at_kl(summary: dict, kl: float, key: str = "gold") -> float:
    """The mean ``key``-vs-KL curve (checkpoints sorted by KL; gold by default) read at ``kl`` by
    linear interpolation."""
    order = np.argsort(summary["kl"])
    return float(np.interp(kl, np.array(summary["kl"])[order], np.array(summary[key])[order]))


def _find(objectives: dict[str, dict], name: str, replay: bool, k: int | None = None) -> str | None:
    """The run of objective ``name`` with (or without) a replay buffer; the largest k unless given."""
    found = [
        n
        for n, o in objectives.items()
        if o["objective"]["name"] == name and bool(o["train"].get("replay")) == replay and (k is None or o["k"] == k)
    ]
    return max(found, key=lambda n: objectives[n]["k"]) if found else None


def _cheaper_line(a: dict, b: dict) -> str:
    return (
        f"{a['cost']['seconds']:.1f} s vs {b['cost']['seconds']:.1f} s of training per run, "
        f"{a['cost']['peak_rss_mib']:.0f} vs {b['cost']['peak_rss_mib']:.0f} MiB peak"
    )


def claims(objectives: dict[str, dict], initial: dict) -> list[dict[str, Any]]:
    out = []
    if any(not o["online"] for o in objectives.values()):
        out.append(length_drift_claim(objectives, initial))
    if not any(o["online"] for o in objectives.values()):  # a direct-alignment study: no online claim to judge
        return out
    claim = "Back to Basics: RLOO >= PPO in reward at matched KL, and cheaper"
    rloo, ppo = _find(objectives, "rloo", False), _find(objectives, "ppo", False)
    if rloo and ppo:
        a, b = objectives[rloo], objectives[ppo]
        kl = min(max(a["kl"]), max(b["kl"]))
        ga, gb = gold_at_kl(a, kl), gold_at_kl(b, kl)
        cheaper = a["cost"]["seconds"] < b["cost"]["seconds"]
        holds = ga >= gb and cheaper
        line = (
            f"{claim}: {'reproduces' if holds else 'does not reproduce'} here -- {rloo} gold {ga:.3f} vs "
            f"{ppo} {gb:.3f} at KL {kl:.3f}; {_cheaper_line(a, b)}"
        )
        out.append({"claim": claim, "reproduces": holds, "line": line, "matched_kl": kl})
    else:
        out.append({"claim": claim, "reproduces": None, "line": f"{claim}: not measured (needs rloo and ppo runs)"})
    out.append(stale_samples_claim(objectives, initial))
    return out


def _averaged_pair(objectives: dict[str, dict], name: str) -> tuple[str, str] | None:
    """The runs of ``name`` with summed and with length-averaged log-likelihoods, if both ran."""
    found = {}
    for n, o in objectives.items():
        if o["objective"]["name"] == name:
            found.setdefault(bool(o["objective"].get("options", {}).get("average_logprobs")), n)
    return (found[False], found[True]) if len(found) == 2 else None


def length_drift_claim(objectives: dict[str, dict], initial: dict) -> dict[str, Any]:
    """Averaging log-likelihoods in direct alignment (Grinsztajn et al. 2024): trained on the same
    length-confounded preferences, DPO and IPO with length-averaged log-likelihoods drift less toward
    long completions than their summed forms. Each family is read at the largest KL both of its runs
    reached (length − step 0's), so a run that simply moved less is not credited."""
    claim = "Averaging log-likelihoods: length-averaged DPO/IPO drift less toward length than summed DPO/IPO"
    parts, holds = [], []
    for family in ("dpo", "ipo"):
        pair = _averaged_pair(objectives, family)
        if pair is None:
            continue
        summed, averaged = objectives[pair[0]], objectives[pair[1]]
        kl = min(max(summed["kl"]), max(averaged["kl"]))
        drift = [gold_at_kl(o, kl, "length") - initial["length"] for o in (summed, averaged)]
        gold = [gold_at_kl(o, kl) for o in (summed, averaged)]
        holds.append(drift[1] < drift[0])
        parts.append(
            f"{family}: length {drift[0]:+.2f} summed vs {drift[1]:+.2f} averaged tokens at KL {kl:.3f} "
            f"(gold {gold[0]:.3f} vs {gold[1]:.3f}; final length {summed['final']['length']:.1f} vs "
            f"{averaged['final']['length']:.1f})"
        )
    if not parts:
        line = f"{claim}: not measured (needs dpo or ipo runs with and without average_logprobs)"
        return {"claim": claim, "reproduces": None, "line": line}
    verdict = all(holds)
    line = (
        f"{claim}: {'reproduces' if verdict else 'does not reproduce'} here -- from length "
        f"{initial['length']:.2f} at step 0: " + "; ".join(parts)
    )
    return {"claim": claim, "reproduces": verdict, "line": line}


STALE_CONTROLS = ("rloo", "vanilla_pg")  # policy gradients with the KL fixed at sampling time


def stale_samples_claim(objectives: dict[str, dict], initial: dict) -> dict[str, Any]:
    """CoPG learns from stale samples about as it does on-policy; the policy gradients whose KL
    penalty and advantages are fixed at sampling (RLOO, vanilla PG; TRL's way) do not. Each is
    compared with its own on-policy run at the same k, on reward − β·KL gained from step 0."""
    claim = "CoPG: from stale samples ~ on-policy, while RLOO and vanilla PG on the same stale samples are not"
    pairs = {}
    for name in ("copg", *STALE_CONTROLS):
        stale = _find(objectives, name, True)
        fresh = _find(objectives, name, False, objectives[stale]["k"]) if stale else None
        if stale and fresh:
            pairs[name] = (stale, fresh)
    if "copg" not in pairs or not any(name in pairs for name in STALE_CONTROLS):
        line = f"{claim}: not measured (needs copg and rloo or vanilla_pg runs, with and without train.replay)"
        return {"claim": claim, "reproduces": None, "line": line}
    J0 = initial["reward"]
    close, parts = {}, []
    for name, (stale, fresh) in pairs.items():
        js, jf = objectives[stale]["regularised"], objectives[fresh]["regularised"]
        close[name] = abs(js - jf) <= CLOSE * abs(jf - J0)
        where = "within" if close[name] else "outside"
        parts.append(f"{name} {jf:.3f} on-policy vs {js:.3f} from the buffer ({where} {CLOSE:.0%} of the gain)")
    holds = close["copg"] and not any(close[name] for name in STALE_CONTROLS if name in close)
    line = (
        f"{claim}: {'reproduces' if holds else 'does not reproduce'} here -- reward − β·KL from {J0:.3f} "
        f"at step 0: " + "; ".join(parts)
    )
    return {"claim": claim, "reproduces": holds, "line": line}


def build_report(
    study, results: dict[str, dict[int, dict]], seconds: float, preferences: dict | None = None
) -> dict[str, Any]:
    objectives = {name: summarize_objective(per_seed) for name, per_seed in results.items()}
    first = next(iter(results.values()))
    keys = ("gold", "reward", "kl", "length")
    initial = {k: float(np.mean([first[s]["records"][0][k] for s in sorted(first)])) for k in keys}
    for name, summary in objectives.items():
        spec = next(iter(results[name].values()))["spec"]
        summary["online"] = spec.online
        summary["prompts_per_step"] = study.run_train(spec)["batch_size"]  # offline: pairs or rows
    matched = min(max(o["kl"]) for o in objectives.values())
    staleness, staleness_claims = staleness_report(objectives, initial, gold_at_kl)
    return {
        "seconds": seconds,
        "seeds": list(study.seeds),
        "samples_per_step": study.samples_per_step,
        "preferences": preferences,
        "initial": initial,
        "objectives": objectives,
        "matched_kl": matched,
        "gold_at_matched_kl": {n: gold_at_kl(o, matched) for n, o in objectives.items()},
        "claims": claims(objectives, initial) + staleness_claims,
        "staleness": staleness,
    }


def _pm(mean: float, std: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for name, o in report["objectives"].items():
        f, s, c = o["final"], o["final_std"], o["cost"]
        rows.append(
            [
                name,
                str(o["k"]) if o["online"] else "–",
                str(o["prompts_per_step"]),
                _pm(f["gold"], s["gold"]),
                _pm(f["kl"], s["kl"]),
                _pm(f["win_rate"], s["win_rate"], 2),
                _pm(f["length"], s["length"], 1),
                f"{report['gold_at_matched_kl'][name]:.3f}",
                f"{c['seconds']:.1f}",
                f"{c['tokens_per_s']:.0f}",
                f"{c['peak_rss_mib']:.0f}",
            ]
        )
    return rows


HEADER = [
    "objective",
    "k",
    "prompts/step",
    "final gold",
    "final KL",
    "win-rate vs SFT",
    "final length",
    "gold at matched KL",
    "train s/run",
    "tokens/s",
    "peak RSS MiB",
]


def markdown(report: dict) -> str:
    lines = [
        "# align compare",
        "",
        f"{len(report['objectives'])} objectives × seeds {report['seeds']}, {report['samples_per_step']} samples "
        f"per step each; {report['seconds']:.0f} s in all. Step 0 (the SFT policy): gold "
        f"{report['initial']['gold']:.3f}. Finals are the last checkpoint, mean ± sd over seeds; "
        f"'gold at matched KL' reads each run's gold-vs-KL curve at KL {report['matched_kl']:.3f}, the "
        "largest every run reached; cost is training alone, each run in a process of its own (seconds of "
        "training steps per run, completion tokens per second of them, the process's peak resident memory).",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    prefs = report.get("preferences")
    if prefs:
        lines += [
            "",
            f"Offline objectives trained on {prefs['pairs']} preference pairs of SFT samples (prompts/step: pairs, "
            f"or unpaired rows for KTO), labelled by gold + {prefs['length_bonus']} × length / budget: the "
            f"preferred completion is the longer in {prefs['chosen_longer_fraction']:.0%} of pairs, the gold alone "
            f"agrees with the label in {prefs['gold_agrees_fraction']:.0%}.",
        ]
    if report.get("staleness"):
        lines += ["", "## What staleness cost (gold at each objective's matched KL, change from N = 0)", ""]
        lines += [f"- {line}" for line in staleness_lines(report["staleness"])]
    lines += ["", "## The papers' claims, here", ""]
    lines += [f"- {c['line']}" for c in report["claims"]]
    lines += ["", "![curves](curves_vs_step.png)", "", "![frontier](gold_vs_kl.png)", ""]
    return "\n".join(lines)


def plot(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, o in report["objectives"].items():
        for ax, key in zip(axes, ("gold", "kl", "win_rate")):
            mean, std = np.array(o[key]), np.array(o["std"][key])
            (line,) = ax.plot(o["steps"], mean, label=name)
            ax.fill_between(o["steps"], mean - std, mean + std, color=line.get_color(), alpha=0.15)
    axes[1].set_yscale("symlog", linthresh=1.0)
    for ax, title in zip(axes, ("gold reward", "KL(π ‖ π_ref)", "win-rate vs SFT")):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    curves = save_figure(fig, out / "curves_vs_step.png")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, o in report["objectives"].items():
        order = np.argsort(o["kl"])
        (line,) = ax.plot(np.array(o["kl"])[order], np.array(o["gold"])[order], marker="o", ms=3, label=name)
        for seed in o["per_seed"].values():
            ax.scatter(seed["kl"], seed["gold"], s=6, color=line.get_color(), alpha=0.3)
    ax.axvline(report["matched_kl"], color="grey", ls=":", lw=1)
    ax.set_xscale("symlog", linthresh=1.0)  # one runaway objective must not flatten the others
    ax.set_xlabel("KL(π ‖ π_ref)")
    ax.set_ylabel("gold reward")
    ax.set_title("reward-KL frontier (checkpoints; dots: seeds)")
    ax.legend(fontsize=7)
    return [curves, save_figure(fig, out / "gold_vs_kl.png")]


def write_report(report: dict, out: Path) -> list[Path]:
    def finite(x):  # JSON has no NaN
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, list):
            return [finite(v) for v in x]
        return x

    (out / "report.json").write_text(json.dumps(finite(report), indent=2))
    (out / "report.md").write_text(markdown(report))
    return [out / "report.json", out / "report.md", *plot(report, out)]


def print_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="align compare")
    for column in HEADER:
        table.add_column(column)
    for row in table_rows(report):
        table.add_row(*row)
    console = Console(width=max(Console().width, 150))
    console.print(table)
    for line in staleness_lines(report.get("staleness") or {}):
        console.print(line, soft_wrap=True)
    for claim in report["claims"]:
        console.print(claim["line"], soft_wrap=True)
