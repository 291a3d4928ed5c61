"""``align compare RECIPE.yaml``: objectives side by side on one task, as a researcher choosing one
needs them -- the same SFT policy, prompts, seeds and samples per step for every objective.

1. Every objective × seed trains on the task's reward (``reward``) through the one trainer,
   ``samples_per_step / k`` prompts per step, a checkpoint every ``eval.every`` steps.
2. At step 0 and every checkpoint, one sample per held-out prompt (the keyed sampler of
   ``align.evaluation.evaluate_policy``): KL k1/k3 to the reference, the task's reward, the gold
   reward (``gold``, default the task's reward) and the win-rate against the SFT policy's sample of
   the same prompt under the gold (ties count half).
3. Each run's cost, measured while it trains (``align.jobs.study.train_measured``): wall seconds,
   tokens/s, peak resident memory.
With a ``preferences`` section, offline objectives (DPO, IPO, SimPO, KTO, ORPO ...) train too, on
one preference set the study builds first from the SFT policy's samples (``preferences.py``), and
are scored exactly as the online runs are.

4. The report (``align/jobs/compare/report.py``): curves with seed bands, the gold-vs-KL frontier,
   a table, and one line per paper claim with its numbers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from align.jobs import study as engine
from align.jobs.compare.config import CompareRecipe, run_recipe
from align.jobs.compare.preferences import build_preferences
from align.recipe import Recipe


class Judge:
    """The task's reward and the gold, scoring one sample per prompt (no running statistics)."""

    def __init__(self, study: CompareRecipe, device):
        from align.rewards_adapter import build_reward

        self.reward = build_reward(study.reward, device)
        self.gold = build_reward(study.gold, device) if study.gold else self.reward

    def __call__(self, prompts: list[str], texts: list[str]) -> dict[str, list[float]]:
        reward = self.reward.score(prompts, texts, {}, update=False).total.tolist()
        gold = reward if self.gold is self.reward else self.gold.score(prompts, texts, {}, update=False).total.tolist()
        return {"reward": reward, "gold": gold}


def win_rate(gold: list[float], sft_gold: list[float]) -> float:
    """How often the policy's sample beats the SFT policy's sample of the same prompt (ties: ½)."""
    wins = [1.0 if g > s else 0.5 if g == s else 0.0 for g, s in zip(gold, sft_gold)]
    return engine.mean(wins)


@torch.no_grad()
def evaluate(recipe: Recipe, models, policy, prompts: list[str], judge: Judge, device, sft_gold: list[float] | None):
    """One sample per held-out prompt: KL to the reference, reward, gold, win-rate against the SFT
    policy; with ``sft_gold`` None (the SFT policy itself) the per-prompt gold is returned too."""
    from align.evaluation import evaluate_policy

    policy.eval()
    sampled = evaluate_policy(recipe, models, policy, prompts, None, device)
    scores = judge(prompts, sampled["texts"])
    out = {
        "kl": sampled["kl_k1"],
        "kl_k3": sampled["kl_k3"],
        "length": sampled["length"],
        "reward": engine.mean(scores["reward"]),
        "gold": engine.mean(scores["gold"]),
        "win_rate": win_rate(scores["gold"], sft_gold if sft_gold is not None else scores["gold"]),
    }
    return out, scores["gold"]


def run_study(study: CompareRecipe, progress: bool = True) -> dict:
    """Train and evaluate every objective × seed; returns the report (also written to ``out``)."""
    from tqdm.auto import tqdm

    from align.jobs.compare.report import build_report, write_report
    from align.run_setup import load_run_data

    start = time.perf_counter()
    first, models, device = engine.start_study(study)
    judge = Judge(study, device)
    preference_stats = None
    if any(not spec.online for spec in study.objectives):
        preference_stats = build_preferences(study, first, models, models.policy, judge, device)
        for spec in study.objectives:  # the set is written: each offline run's data read once, here
            if not spec.online:
                load_run_data(run_recipe(study, spec, study.seeds[0]))
    source = study.eval.prompts or first.data.eval_prompts
    prompts = engine.read_prompts(source, first.data.prompt_column, study.eval.n_prompts)

    runs = study.runs()
    per_run = [len(engine.eval_steps(run_recipe(study, s, seed), study.eval.every)) - 1 for s, seed in runs]
    total = sum(n + run_recipe(study, s, seed).train.steps for n, (s, seed) in zip(per_run, runs))
    bar = tqdm(total=total, desc="compare", unit="step", dynamic_ncols=True, disable=not progress)
    initial: dict[int, tuple[dict, list[float]]] = {}
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for spec, seed in runs:
        recipe = run_recipe(study, spec, seed)
        if seed not in initial:
            initial[seed] = evaluate(recipe, models, models.policy, prompts, judge, device, None)
        sft_gold = initial[seed][1]
        bar.set_description(f"{spec.run_name} seed {seed}")

        def score(policy, recipe=recipe, sft_gold=sft_gold) -> dict:
            return evaluate(recipe, models, policy, prompts, judge, device, sft_gold)[0]

        records, cost = engine.train_and_evaluate(
            recipe, score, initial[seed][0], device, bar, study.keep_checkpoints, study.threads
        )
        results.setdefault(spec.run_name, {})[seed] = {"records": records, "cost": cost, "spec": spec}
    bar.close()
    report = build_report(study, results, seconds=time.perf_counter() - start, preferences=preference_stats)
    write_report(report, Path(study.out))
    return report


def main(args: Any) -> int:
    from align.jobs.compare.report import print_summary

    return engine.main(args, CompareRecipe, run_study, print_summary)
