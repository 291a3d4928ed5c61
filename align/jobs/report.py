"""End-of-run report: reward before and after on held-out prompts, KL, samples, plots; for
offline pair objectives, preference accuracy and margin on held-out pairs. The numbers come from
``align.evaluation``; this module writes them (report.json, report.md, metrics.png)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from align import files
from align.distributed import loading_whole_models
from align.evaluation import eval_prompts, evaluate_pairs, evaluate_policy, models_in_eval
from align.metrics_log import read_metrics
from align.models import load_reference, load_saved_policy, reference_model


def save_figure(fig, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (PNG, 110 dpi) and close it; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metrics(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("reward_mean", "kl_k1", "loss", "completion_length") if any(k in r for r in records)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(list(axes) if len(keys) > 1 else [axes], keys):
        steps = [r["step"] for r in records if r.get(key) is not None]
        ax.plot(steps, [r[key] for r in records if r.get(key) is not None])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def report_on_end(run) -> dict:
    """The trainer's ``on_end`` hook (``align.trainer.FinishedRun``): the end-of-run report.

    It runs on the main process alone; when the live models hold shards (FSDP2, ZeRO-3) a call
    into them would wait for the other processes, so the report loads the saved policy (the last
    checkpoint's whole ``model/``) and the reference itself. A report that fails is one line on
    stderr and in report.md: the run finished, so its exit code stays 0."""
    try:
        models = run.models
        with loading_whole_models(run.accelerator):
            if run.sharded:
                device = run.accelerator.device
                policy = load_saved_policy(run.recipe, run.checkpoint / "model", device)
                adapters = run.recipe.model.lora is not None
                models = dataclasses.replace(models, policy=policy, reference=None, adapters=adapters)
            return write_report(
                run.recipe, models, run.prompts, run.reward, run.run_dir, run.accelerator, held_out=run.held_out
            )
    except Exception as err:  # any failure here must leave the finished run intact
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        print(f"align: the end-of-run report failed ({reason}); the run and final/ are complete", file=sys.stderr)
        files.write_text(run.run_dir / "report.md", f"# align run report\n\nThe report failed: {reason}\n")
        return {"report_error": reason}


def write_report(recipe, models, dataset, reward, run_dir: Path, accelerator, held_out=None) -> dict:
    """report.json, report.md and metrics.png in the run dir; returns the headline numbers."""
    from rich.console import Console
    from rich.table import Table

    records = [r for r in read_metrics(run_dir) if "skipped" not in r]
    plot_metrics(records, run_dir / "metrics.png")
    out: dict = {"plot": str(run_dir / "metrics.png")}
    prompts, columns, label, messages = eval_prompts(recipe, dataset, models.tokenizer)
    if (prompts and recipe.objective.online) or held_out is not None:
        policy = accelerator.unwrap_model(models.policy)
        reference_free = recipe.build_objective().reference_free  # SimPO, ORPO: no reference at all
        if not models.has_reference and not reference_free:  # β = 0: the run loaded none; before/after needs the start
            models = dataclasses.replace(models, reference=load_reference(recipe, accelerator.device))
    if held_out is not None:
        with models_in_eval(policy):
            out["held_out_pairs"] = evaluate_pairs(recipe, models, policy, held_out, accelerator.device)
    if prompts and recipe.objective.online:
        with models_in_eval(policy):
            with reference_model(models, accelerator) as reference:
                before = evaluate_policy(
                    recipe, models, reference, prompts, reward, accelerator.device, columns, messages
                )
            after = evaluate_policy(recipe, models, policy, prompts, reward, accelerator.device, columns, messages)
        out["before"] = {k: v for k, v in before.items() if k not in ("texts", "scores")}
        out["after"] = {k: v for k, v in after.items() if k not in ("texts", "scores")}
        out["samples"] = [
            {"prompt": p, "before": b, "after": a}
            for p, b, a in list(zip(prompts, before["texts"], after["texts"]))[:8]
        ]
    files.write_text(run_dir / "report.json", json.dumps(out, indent=2))
    lines = [f"# align run report: {recipe.objective.name}", "", "![metrics](metrics.png)", ""]
    if "before" in out:
        table = Table(title=f"{recipe.objective.name}: {label} ({len(prompts)})")
        lines += [f"Before and after on {label} ({len(prompts)}).", ""]
        for col in ("", "reward", "KL k1", "KL k3", "length"):
            table.add_column(col)
        lines += ["| | reward | KL k1 | KL k3 | length |", "|---|---|---|---|---|"]
        for name in ("before", "after"):
            row = out[name]
            cells = [
                f"{row.get('reward', float('nan')):.3f}",
                f"{row['kl_k1']:.3f}",
                f"{row['kl_k3']:.3f}",
                f"{row['length']:.1f}",
            ]
            table.add_row(name, *cells)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "## Samples", ""]
        for s in out["samples"]:
            lines += [f"- **{s['prompt']}** → before: `{s['before']}` → after: `{s['after']}`"]
        Console(stderr=True).print(table)
        for s in out["samples"][:4]:
            Console(stderr=True).print(f"[bold]{s['prompt']}[/bold] | before: {s['before']!r} | after: {s['after']!r}")
    if "held_out_pairs" in out:
        pairs = out["held_out_pairs"]
        start = pairs.get("loglik_accuracy_reference")  # None: a reference-free objective ran none
        lines += [
            f"## Held-out pairs ({pairs['pairs']})",
            "",
            "| | log-likelihood accuracy | implicit-reward accuracy | implicit-reward margin |",
            "|---|---|---|---|",
            *([f"| reference | {start:.3f} | - | 0 |"] if start is not None else []),
            f"| policy | {pairs['loglik_accuracy']:.3f} | {pairs['reward_accuracy']:.3f} "
            f"| {pairs['reward_margin']:.4f} |",
            "",
            f"Implicit reward β·(log π(y) − log π_ref(y)), β = {pairs['beta']:g}"
            + (" (reference-free: log π_ref taken as 0)" if start is None else "")
            + "; accuracy: how often the chosen completion scores higher.",
        ]
        print(
            f"held-out pairs ({pairs['pairs']}): accuracy {pairs['reward_accuracy']:.3f}, "
            f"margin {pairs['reward_margin']:.4f}, log-likelihood accuracy "
            + (f"{start:.3f} -> " if start is not None else "")
            + f"{pairs['loglik_accuracy']:.3f}",
            file=sys.stderr,
        )
    files.write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    keep = ("before", "after", "held_out_pairs")
    return {"report": str(run_dir / "report.md"), **{k: out[k] for k in keep if k in out}}
