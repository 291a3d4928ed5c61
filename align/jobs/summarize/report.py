"""The report: SFT policy (before) against RL policy (after) on held-out documents, and the
``align summarize`` job that runs prepare → RL → report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from align.jobs.quickstart.corpus import read_jsonl
from align.jobs.summarize.corpus import document_from_json, gold_judgement
from align.jobs.summarize.grammar import Document
from align.jobs.summarize.nli import mean_of
from align.jobs.summarize.pipeline import RL_RECIPE, Setup, log_progress, prepare_summarize, torch_threads

# ---------------------------------------------------------------------------------------------
# The report: SFT policy (before) against RL policy (after) on held-out documents
# ---------------------------------------------------------------------------------------------

GOLD_VERDICTS = ("faithful", "contradicted", "unsupported", "unparsed")  # corpus.gold_judgement's
REPORT_METRICS = (
    ("entailment_rate", "entailment rate", "{:.3f}"),
    ("entailment_prob", "mean P(entail)", "{:.3f}"),
    *((f"gold_{verdict}_rate", f"gold {verdict}", "{:.3f}") for verdict in GOLD_VERDICTS),
    ("false_entailment_rate", "NLI entailed, gold not", "{:.3f}"),
    ("rougeL", "ROUGE-L", "{:.3f}"),
    ("length_tokens", "length (tokens)", "{:.1f}"),
    ("length_words", "length (words)", "{:.1f}"),
    ("kl_k1", "KL k1", "{:.3f}"),
    ("kl_k3", "KL k3", "{:.3f}"),
)


def score_summaries(
    documents: list[Document], texts: list[str], references: list[str], nli_model: str | Path
) -> dict[str, Any]:
    """Per-sample NLI, gold and ROUGE-L scores of ``texts`` (one per document) and their means."""
    import rewards

    nli = rewards.build("entailment", model=str(nli_model), premise_column="document", device="cpu")
    premises = [d.text for d in documents]
    probs = nli(["" for _ in texts], texts, document=premises)
    rouge = rewards.build("rouge", rouge_type="rougeL")(["" for _ in texts], texts, reference=references)
    gold = [gold_judgement(d, t) for d, t in zip(documents, texts)]
    out = {
        "entailment_rate": mean_of([float(p > 0.5) for p in probs]),
        "entailment_prob": mean_of(probs),
        "rougeL": mean_of(rouge),
        "length_words": mean_of([len(t.split()) for t in texts]),
    }
    for verdict in GOLD_VERDICTS:
        out[f"gold_{verdict}_rate"] = mean_of([float(g == verdict) for g in gold])
    # where the reward and the truth disagree: the room a policy has to hack the NLI model
    out["false_entailment_rate"] = mean_of([float(p > 0.5 and g != "faithful") for p, g in zip(probs, gold)])
    out["per_sample"] = {"entailment_prob": probs, "rougeL": rouge, "gold": gold}
    return out


def evaluate_summaries(
    recipe, policy_dir: str | Path, reference_dir: str | Path, eval_rows: list[dict], nli_model: str | Path
) -> dict[str, dict]:
    """Sample one summary per held-out document from the reference (SFT) policy and from
    ``policy_dir`` with the recipe's generation settings (align.evaluation.evaluate_policy, which
    also gives the KL to the reference) and score both."""
    import torch

    from align.evaluation import evaluate_policy
    from align.models import load_models

    device = torch.device("cpu")
    loaded = recipe.model_copy(
        update={"model": recipe.model.model_copy(update={"path": str(policy_dir)}), "reference": str(reference_dir)}
    )
    models = load_models(loaded, device, need_reference=True)
    models.policy.eval()
    prompts = [r["prompt"] for r in eval_rows]
    documents = [document_from_json(r["facts"]) for r in eval_rows]
    references = [r["reference"] for r in eval_rows]
    out = {}
    for name, model in (("before", models.reference), ("after", models.policy)):
        sampled = evaluate_policy(loaded, models, model, prompts, None, device)
        scores = score_summaries(documents, sampled["texts"], references, nli_model)
        out[name] = {
            **{k: v for k, v in scores.items() if k != "per_sample"},
            "length_tokens": sampled["length"],
            "kl_k1": sampled["kl_k1"],
            "kl_k3": sampled["kl_k3"],
            "texts": sampled["texts"],
            "per_sample": scores["per_sample"],
        }
    return out


def write_summarize_report(run_dir: Path, results: dict[str, dict], eval_rows: list[dict], extra: dict) -> dict:
    """report.json and report.md in ``run_dir``, a table on the terminal; returns report.json's content."""
    from rich.console import Console
    from rich.table import Table

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    headline = {name: {k: results[name][k] for k, _, _ in REPORT_METRICS} for name in ("before", "after")}
    samples = []
    for i, row in enumerate(eval_rows[:12]):
        sample = {"document": row["document"], "reference": row["reference"]}
        for name in ("before", "after"):
            per = results[name]["per_sample"]
            sample[name] = {
                "text": results[name]["texts"][i],
                "entailment_prob": per["entailment_prob"][i],
                "gold": per["gold"][i],
            }
        samples.append(sample)
    report = {**headline, "n_eval": len(eval_rows), **extra, "samples": samples}
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))

    title = f"summarisation with an entailment reward: SFT (before) vs RL (after), {len(eval_rows)} held-out documents"
    table = Table(title=title)
    for col in ("metric", "before", "after"):
        table.add_column(col)
    lines = [f"# {title}", "", "| metric | before | after |", "|---|---|---|"]
    for key, label, fmt in REPORT_METRICS:
        cells = [fmt.format(headline["before"][key]), fmt.format(headline["after"][key])]
        table.add_row(label, *cells)
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "entailment rate: share of summaries with P(entailment) > 0.5 under the NLI model (premise = the "
        "document); gold: each summary parsed with the corpus grammar and checked against the document's "
        "facts, independent of the NLI model; NLI entailed, gold not: share of summaries the reward "
        "passes that are not faithful; ROUGE-L against the reference summary; KL to the SFT policy.",
    ]
    if "nli_eval_accuracy" in extra:
        lines.append(f"NLI model held-out accuracy: {extra['nli_eval_accuracy']:.3f}.")
    lines += ["", "## Samples", ""]
    for s in samples:
        lines.append(f"- **{s['document']}**")
        lines.append(f"  - reference: `{s['reference']}`")
        for name in ("before", "after"):
            b = s[name]
            lines.append(f"  - {name}: `{b['text'].strip()}` (P(entail) {b['entailment_prob']:.2f}, gold {b['gold']})")
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    console = Console()
    console.print(table)
    for s in samples[:3]:
        console.print(f"[bold]{s['document']}[/bold]")
        for name in ("before", "after"):
            console.print(f"  {name}: {s[name]['text'].strip()!r} ({s[name]['gold']})")
    return report


def run_summarize(recipe, setup: Setup | None = None, eval_limit: int | None = None) -> dict:
    """Prepare (if needed), RL-train with ``recipe``, then write the before/after report."""
    from align.trainer import train

    setup = setup or Setup(seed=recipe.train.seed)
    start = time.perf_counter()
    assets = prepare_summarize(recipe, setup)
    prepared_s = time.perf_counter() - start
    rl_start = time.perf_counter()
    with torch_threads(setup.threads):
        summary = train(recipe.model_copy(update={"prepare": None}))
    rl_s = time.perf_counter() - rl_start
    if summary.get("stopped_by"):
        log_progress(f"stopped by {summary['stopped_by']} at step {summary['steps']}; no report")
        return {"summary": summary}
    eval_rows = read_jsonl(assets["data"] / "eval.jsonl")[:eval_limit]
    with torch_threads(setup.threads):
        results = evaluate_summaries(recipe, summary["final_model"], recipe.model.path, eval_rows, assets["nli_model"])
    nli_metrics_file = Path(assets["nli_model"]) / "metrics.json"
    extra: dict[str, Any] = {"rl_steps": summary["steps"], "prepare_s": round(prepared_s, 1), "rl_s": round(rl_s, 1)}
    if nli_metrics_file.is_file():
        extra["nli_eval_accuracy"] = json.loads(nli_metrics_file.read_text())["eval_accuracy"]
    extra["seconds"] = round(time.perf_counter() - start, 1)
    report = write_summarize_report(Path(recipe.output.dir), results, eval_rows, extra)
    return {"summary": summary, "report": report}


def main(args) -> int:
    """``align summarize [RECIPE] [key=value ...]``: prepare, RL-train and report."""
    from align.config import load_recipe
    from align.recipe import Recipe

    recipe = load_recipe(Recipe, args.recipe or RL_RECIPE, list(args.overrides))
    if recipe.prepare not in (None, "summarize"):
        log_progress(f"recipe prepares {recipe.prepare!r}, not summarize")
        return 2
    out = run_summarize(recipe)
    if "report" not in out:
        return 1
    print(f"align summarize: report in {Path(recipe.output.dir) / 'report.md'}")
    return 0
