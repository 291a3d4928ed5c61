"""Evaluation during training (``eval.every``, TRL's ``eval_strategy="steps"``): every N steps the
policy is measured on held-out data through the functions the end-of-run report uses
(align/evaluation.py), and the numbers go into that step's record under ``eval/`` (so into
metrics.jsonl and every tracker of ``output.report_to``).

- online objectives: one keyed sample per held-out prompt (``data.eval_prompts``, else the first
  training prompts): ``eval/reward``, ``eval/kl_k1``, ``eval/kl_k3``, ``eval/length``, and
  ``eval/win_rate``: how often the policy's sample outscores the reference's (the SFT policy's) on
  the same prompt and key, ties counting half;
- offline pair objectives: the held-out pairs (``data.eval_pairs`` / ``eval_fraction``) as TRL's
  DPO logs them: ``eval/reward_accuracy``, ``eval/reward_margin``, ``eval/chosen_logp``,
  ``eval/rejected_logp``, ``eval/loglik_accuracy``.

``eval.keep_best: METRIC`` saves a checkpoint at each evaluation that improves on the best so far
(``eval.greater_is_better``) and copies its model to ``RUN/best/`` (``best.json`` says which step
and value; a resumed run reads it back).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from align import files
from align.evaluation import EVAL_SEED_OFFSET, evaluate_pairs, evaluate_policy, models_in_eval, sample_prompts
from align.models import reference_model


@dataclass
class PeriodicEval:
    """What the evaluations of one run share: the held-out prompts, the reference's rewards on them
    (sampled once), the best value so far."""

    every: int
    keep_best: str | None
    greater_is_better: bool
    prompts: list[str]
    columns: dict
    messages: list | None
    reference_scores: list[float] | None = None
    best: float | None = None

    def improved(self, record: dict) -> bool:
        """Whether this evaluation's ``keep_best`` metric beats the best so far (and is now the best)."""
        value = record.get(f"eval/{self.keep_best}")
        if self.keep_best is None or value is None or value != value:  # absent or NaN: nothing to keep
            return False
        better = self.best is None or (value > self.best if self.greater_is_better else value < self.best)
        if better:
            self.best = value
        return better


def evaluate_step(evaluator: PeriodicEval, run, accelerator) -> dict[str, float]:
    """The ``eval/`` metrics of the policy as it stands (every process computes them: the same
    prompts and keys give the same numbers; the main process logs them)."""
    models, recipe, device = run.models, run.recipe, accelerator.device
    policy = accelerator.unwrap_model(models.policy)
    with models_in_eval(policy):
        if not recipe.objective.online:
            pairs = evaluate_pairs(recipe, models, policy, run.dataset.held_out, device)
            keys = ("reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp", "loglik_accuracy")
            return {f"eval/{key}": pairs[key] for key in keys}
        has_reference = models.reference is not None or models.adapters
        args = (recipe, models, policy, evaluator.prompts, run.reward, device, evaluator.columns, evaluator.messages)
        sampled = evaluate_policy(*args, with_reference=has_reference)
        out = {f"eval/{key}": sampled[key] for key in ("reward", "kl_k1", "kl_k3", "length") if key in sampled}
        if has_reference and "scores" in sampled:
            out["eval/win_rate"] = win_rate(sampled["scores"], reference_scores(evaluator, run, accelerator))
    return out


def reference_scores(evaluator: PeriodicEval, run, accelerator) -> list[float]:
    """The reference's sample on each held-out prompt, scored once (the same keys as the policy's)."""
    if evaluator.reference_scores is None:
        recipe, models = run.recipe, run.models
        seed = recipe.train.seed + EVAL_SEED_OFFSET
        with reference_model(models, accelerator) as reference:
            rollout = sample_prompts(recipe, models, reference, evaluator.prompts, seed, 1, accelerator.device)
        scores = run.reward.score(
            evaluator.prompts, list(rollout.texts), evaluator.columns, update=False, messages=evaluator.messages
        )
        evaluator.reference_scores = scores.total.float().tolist()
    return evaluator.reference_scores


def win_rate(policy: list[float], reference: list[float]) -> float:
    """How often the policy's score beats the reference's on the same prompt, ties counting half
    (pairs either reward left unscored are left out)."""
    pairs = [(p, r) for p, r in zip(policy, reference) if p == p and r == r]
    if not pairs:
        return float("nan")
    return sum(1.0 if p > r else 0.5 if p == r else 0.0 for p, r in pairs) / len(pairs)


def keep_best(checkpoint: Path, run_dir: Path, step: int, metric: str, value: float) -> None:
    """The checkpoint's model copied to ``run_dir/best`` (atomically: a temporary copy renamed over
    the old one) with ``best.json`` naming the step, metric and value."""
    tmp = run_dir / ".tmp-best"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint / "model", tmp)
    files.write_text(tmp / "best.json", json.dumps({"step": step, "metric": metric, "value": value}) + "\n")
    old = run_dir / ".del-best"
    if (run_dir / "best").exists():
        os.replace(run_dir / "best", old)
    os.replace(tmp, run_dir / "best")
    shutil.rmtree(old, ignore_errors=True)


def best_so_far(run_dir: Path, metric: str | None) -> float | None:
    """A resumed run's best value of ``metric`` (from ``best/best.json``), None without one."""
    try:
        saved = json.loads((run_dir / "best" / "best.json").read_text())
    except (OSError, ValueError):
        return None
    return saved.get("value") if saved.get("metric") == metric else None
