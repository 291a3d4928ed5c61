"""End-of-run report: reward before and after on held-out prompts, KL, samples, plots; for
offline pair objectives, preference accuracy and margin on held-out pairs."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

import losses
from align import data as data_lib
from align import formats
from align.distributed import loading_whole_models
from align.logprobs import completion_logprobs
from align.metrics_log import read_metrics
from align.models import load_reference, load_saved_policy, reference_model
from align.rollout import decode_completions, generate_with, sample_keys

EVAL_SEED_OFFSET = 10_007  # evaluation samples never reuse a training step's keys


@torch.no_grad()
def sample_prompts(recipe, models, policy, prompts: list[str], seed: int, k: int, device, first_index: int = 0):
    """k keyed samples per prompt (prompt i of the list is sample index ``first_index + i``): the same
    prompts, seed and index always draw the same completions."""
    ids = data_lib.encode_prompts(models.tokenizer, prompts, recipe.data.max_prompt_tokens)
    prompt_ids, prompt_mask = data_lib.pad(ids, models.pad_token_id, "left", device)
    keys = sample_keys(seed, 0, torch.arange(first_index, first_index + len(prompts)), k)
    return generate_with(policy, prompt_ids, prompt_mask, keys, k, recipe.generation, models)


@torch.no_grad()
def evaluate_policy(
    recipe,
    models,
    policy,
    prompts: list[str],
    reward,
    device,
    columns: dict | None = None,
    messages: list | None = None,
) -> dict:
    """One sample per prompt from ``policy``; its reward and its KL to the reference (k1, k3)."""
    gen = recipe.generation
    rollout = sample_prompts(recipe, models, policy, prompts, recipe.train.seed + EVAL_SEED_OFFSET, 1, device)
    texts = decode_completions(rollout, models.tokenizer, gen.stop_strings, models.pad_token_id)
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask, gen.temperature)
    logp = completion_logprobs(policy, *args)
    with reference_model(models) as ref:
        ref_logp = completion_logprobs(ref, *args)
    mask = rollout.completion_mask
    out = {
        "kl_k1": float(losses.sequence_kl(logp, ref_logp, mask, "k1").mean()),
        "kl_k3": float(losses.sequence_kl(logp, ref_logp, mask, "k3").mean()),
        "length": float(rollout.completion_mask.sum(-1).float().mean()),
        "texts": texts,
    }
    if reward is not None:
        scores, components = reward.score(prompts, texts, columns or {}, update=False, messages=messages)
        out["reward"] = float(scores.float().nanmean())  # over the samples some reward scored
        out["components"] = {k: float(torch.tensor(v).nanmean()) for k, v in components.items()}
    return out


@torch.no_grad()
def evaluate_pairs(recipe, models, policy, held_out, device) -> dict:
    """Held-out pairs (chosen, rejected) under the policy and the reference, as TRL's DPO logs them:
    the implicit reward β·(ℓ_π(y) − ℓ_ref(y)) of each side (ℓ summed over the completion's
    tokens), their mean margin and how often chosen's is higher (``reward_accuracy``); and how often
    each model alone gives chosen the higher log-likelihood (``loglik_accuracy``)."""
    beta = float(getattr(recipe.build_objective(), "beta", 0.0) or 0.0)
    chunk = max(1, recipe.train.batch_size)
    n = len(held_out)
    sums: dict[str, list[torch.Tensor]] = {"policy": [], "reference": []}
    with reference_model(models) as reference:
        for lo in range(0, n, chunk):
            rows = list(range(lo, min(lo + chunk, n)))
            p_ids, p_mask = data_lib.pad(
                [held_out.prompt_ids[i] for _ in range(2) for i in rows], models.pad_token_id, "left", device
            )
            c_ids, c_mask = data_lib.pad(
                [held_out.completion_ids[t][i] for t in range(2) for i in rows], models.pad_token_id, "right", device
            )
            for name, model in (("policy", policy), ("reference", reference)):
                lp = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask)
                sums[name].append(losses.sequence_logprobs(lp, c_mask.to(lp.dtype)).double().view(2, -1).cpu())
    policy_lp, ref_lp = torch.cat(sums["policy"], 1), torch.cat(sums["reference"], 1)
    implicit = beta * (policy_lp - ref_lp)  # [2, P]: chosen, rejected
    margin = implicit[0] - implicit[1]
    return {
        "pairs": n,
        "beta": beta,
        "reward_margin": float(margin.mean()),
        "reward_accuracy": float((margin > 0).double().mean()),
        "loglik_accuracy": float((policy_lp[0] > policy_lp[1]).double().mean()),
        "loglik_accuracy_reference": float((ref_lp[0] > ref_lp[1]).double().mean()),
        "chosen_logp": float(policy_lp[0].mean()),
        "rejected_logp": float(policy_lp[1].mean()),
    }


def eval_prompts(recipe, dataset, tokenizer, limit: int = 64) -> tuple[list[str], dict[str, list], str, list]:
    """(prompts, their rows' other columns, what they are, their chat messages for TRL rewards --
    None unless the data's prompts are messages): the
    held-out ``data.eval_prompts`` rendered like training prompts (template, chat template, TRL's
    formats), else the first training prompts."""
    cfg = recipe.data
    if cfg.eval_prompts:
        table = data_lib.load_table(cfg.eval_prompts)
        table = formats.normalise(table.select(range(min(limit, len(table)))), cfg, "online", cfg.eval_prompts)
        columns = data_lib.read_columns(cfg.eval_prompts, table, list(table.column_names), [])
        prompts, _, messages = data_lib.prompt_rows(tokenizer, columns, cfg, cfg.eval_prompts)
        conversational = data_lib.is_conversational(columns, cfg)
        columns.pop(cfg.prompt_column, None)
        return prompts, columns, "held-out prompts", messages if conversational else None
    if dataset is None:
        return [], {}, "", None
    columns = {name: values[:limit] for name, values in dataset.columns.items()}
    messages = dataset.messages[:limit] if dataset.conversational else None
    return dataset.prompts[:limit], columns, "training prompts (no data.eval_prompts)", messages


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
        (run.run_dir / "report.md").write_text(f"# align run report\n\nThe report failed: {reason}\n")
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
        if not models.has_reference:  # β = 0: the run loaded none; before/after needs the start
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
        out["before"] = {k: v for k, v in before.items() if k != "texts"}
        out["after"] = {k: v for k, v in after.items() if k != "texts"}
        out["samples"] = [
            {"prompt": p, "before": b, "after": a}
            for p, b, a in list(zip(prompts, before["texts"], after["texts"]))[:8]
        ]
    (run_dir / "report.json").write_text(json.dumps(out, indent=2))
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
        lines += [
            f"## Held-out pairs ({pairs['pairs']})",
            "",
            "| | log-likelihood accuracy | implicit-reward accuracy | implicit-reward margin |",
            "|---|---|---|---|",
            f"| reference | {pairs['loglik_accuracy_reference']:.3f} | - | 0 |",
            f"| policy | {pairs['loglik_accuracy']:.3f} | {pairs['reward_accuracy']:.3f} "
            f"| {pairs['reward_margin']:.4f} |",
            "",
            f"Implicit reward β·(log π(y) − log π_ref(y)), β = {pairs['beta']:g}; accuracy: how often the "
            "chosen completion scores higher.",
        ]
        print(
            f"held-out pairs ({pairs['pairs']}): accuracy {pairs['reward_accuracy']:.3f}, "
            f"margin {pairs['reward_margin']:.4f}, log-likelihood accuracy {pairs['loglik_accuracy_reference']:.3f}"
            f" -> {pairs['loglik_accuracy']:.3f}",
            file=sys.stderr,
        )
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    keep = ("before", "after", "held_out_pairs")
    return {"report": str(run_dir / "report.md"), **{k: out[k] for k in keep if k in out}}


class models_in_eval:
    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
