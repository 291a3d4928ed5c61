"""``align overopt RECIPE.yaml``: measure reward over-optimization (Gao et al. 2022) on one machine.

The protocol, in the order it runs:

1. **Gold.** The recipe's ``gold`` reward (components as in a training recipe, e.g. VADER
   sentiment plus 0.5 × the mean token log-likelihood under the SFT model, ``fluency``) stands in
   for human judgement. It is never optimised directly.
2. **Proxy.** ``proxy.pairs`` prompts each get two samples of the initial (SFT) policy; the gold
   labels each pair (``hard``: the higher gold is chosen; ``bradley_terry``: chosen with
   probability σ((g_a − g_b)/temperature)); ``align rm``'s trainer fits a scalar reward model on
   them (Bradley–Terry). Few pairs make a proxy that is right on the SFT distribution and
   exploitable off it.
3. **RL against the proxy.** Every objective of ``objectives`` × every seed of ``seeds`` trains
   from the same SFT policy on the same prompts (``base``: a training recipe without objective,
   reward or output), saving a checkpoint every ``eval.every`` steps.
4. **Evaluation.** At step 0 and at every checkpoint, one fresh sample per held-out prompt
   (``align.evaluation.evaluate_policy``: the keyed sampler, KL k1 and k3 to the reference) is scored
   by the gold and the proxy; also distinct-1/2, the samples' mean token log-likelihood under the
   SFT model and their length.
5. **Best-of-n.** n samples of the SFT policy per held-out prompt, the proxy picks one, the gold
   scores it; KL_bon = log n − (n−1)/n.
6. **Report** (``align/jobs/overopt/report.py``): curves of gold and proxy against d = √KL with
   seed bands, Gao's fit R(d) = d(α − γ log d) of the gold gain, peak gold and KL at the peak,
   the divergence point, a table per objective; ``report.json``, ``report.md``, PNG plots.

Everything is written under ``out``: ``proxy/`` (pairs and reward model), ``runs/NAME/seedS/``
(each training run: metrics.jsonl, recipe.yaml, and ``eval.json`` with its checkpoint scores).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align.config import RecipeError, validate
from align.jobs import study as engine
from align.jobs.overopt.config import (  # noqa: F401 -- re-exported: the study's recipe API
    BON_SEED_OFFSET,
    PAIR_SEED_OFFSET,
    ObjectiveSpec,
    OveroptRecipe,
    eval_steps,
    load_study,
    proxy_dir,
    run_recipe,
)
from align.jobs.overopt.metrics import bon_kl, distinct_n, histogram_kl
from align.jobs.study import load_policy, mean, read_prompts, sample  # noqa: F401 -- load_policy re-exported
from align.recipe import Recipe

# --------------------------------------------------------------------------------------------
# scoring


@dataclass
class Scorers:
    """Everything a sample is judged by: gold (components), proxy, log-likelihood under the SFT model."""

    gold: Any  # rewards.CombinedReward
    proxy: Callable[..., list[float]]
    sft_loglik: Callable[..., list[float]]

    def score(self, prompts: list[str], texts: list[str]) -> dict[str, list[float]]:
        components = self.gold.score_components(prompts, texts)
        out = {"gold": self.gold.combine(components, update=False), "proxy": list(self.proxy(prompts, texts))}
        out["sft_logprob"] = list(self.sft_loglik(prompts, texts))
        out.update({f"gold/{name}": list(values) for name, values in components.items()})
        return out


def build_gold(study: OveroptRecipe, device: torch.device):
    import rewards

    specs = [c.model_dump(exclude_none=True) for c in study.gold]
    return rewards.build_combined(specs, device=str(device))


def build_scorers(study: OveroptRecipe, recipe: Recipe, device: torch.device) -> Scorers:
    import rewards

    reference = recipe.reference or recipe.model.path
    sft = rewards.build("fluency", model=reference, tokenizer=recipe.model.tokenizer, device=str(device))
    proxy = rewards.build("reward_model", model=str(proxy_dir(study)), device=str(device))
    return Scorers(gold=build_gold(study, device), proxy=proxy, sft_loglik=sft)


@torch.no_grad()
def evaluate_checkpoint(
    recipe: Recipe,
    models,
    policy,
    prompts: list[str],
    scorers: Scorers,
    device,
    demo_proxy: list[float] | None = None,
) -> dict:
    """One sample per prompt from ``policy``: KL k1/k3 to the reference, gold, proxy, diversity, and
    (given the demonstrations' proxy scores) the KL between the two proxy-score histograms."""
    from align.evaluation import evaluate_policy

    policy.eval()
    sampled = evaluate_policy(recipe, models, policy, prompts, None, device)
    texts = sampled["texts"]
    scores = scorers.score(prompts, texts)
    out = {"kl": sampled["kl_k1"], "kl_k3": sampled["kl_k3"], "length": sampled["length"]}
    out.update({name: mean(values) for name, values in scores.items()})
    out["distinct_1"] = distinct_n(texts, 1)
    out["distinct_2"] = distinct_n(texts, 2)
    if demo_proxy:
        out["proxy_hist_kl"] = histogram_kl(demo_proxy, scores["proxy"])
    out["samples"] = [{"prompt": p, "completion": t} for p, t in list(zip(prompts, texts))[:4]]
    return out


# --------------------------------------------------------------------------------------------
# data


def held_out_prompts(study: OveroptRecipe, recipe: Recipe, limit: int) -> list[str]:
    return read_prompts(study.eval.prompts or recipe.data.eval_prompts, recipe.data.prompt_column, limit)


def demonstration_scores(recipe: Recipe, scorers: Scorers, limit: int) -> list[float] | None:
    """Proxy scores of the first ``limit`` demonstrations of the training data, if it has them."""
    from align import data as data_lib

    cfg = recipe.data
    table = data_lib.load_table(cfg.train, cfg.split, cfg.subset)
    if cfg.demonstration_column not in table.column_names or cfg.prompt_template:
        return None
    columns = [cfg.prompt_column, cfg.demonstration_column]
    rows = data_lib.read_columns(cfg.train, table, columns, columns)
    prompts, demos = rows[cfg.prompt_column][:limit], rows[cfg.demonstration_column][:limit]
    return list(scorers.proxy(prompts, [data_lib.message_text(d) for d in demos]))


# --------------------------------------------------------------------------------------------
# proxy


def label_pairs(
    prompts: list[str], texts: list[str], gold: list[float], labels: str, temperature: float, seed: int
) -> list[dict[str, str]]:
    """(prompt, chosen, rejected) rows from two samples per prompt and their gold scores.

    Identical samples and (for ``hard``) gold ties are dropped: they carry no preference.
    """
    rng = random.Random(seed)
    rows = []
    for i, prompt in enumerate(prompts):
        a, b = texts[2 * i], texts[2 * i + 1]
        ga, gb = gold[2 * i], gold[2 * i + 1]
        if a == b or (labels == "hard" and ga == gb):
            continue
        if labels == "hard":
            a_wins = ga > gb
        else:
            a_wins = rng.random() < 1.0 / (1.0 + math.exp(-(ga - gb) / temperature))
        chosen, rejected = (a, b) if a_wins else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def train_proxy(study: OveroptRecipe, recipe: Recipe, models, gold, device) -> dict[str, Any]:
    """Gold-labelled pairs of SFT samples → ``align rm`` → the proxy reward model."""
    from align.jobs.rm import RMRecipe, train_reward_model
    from align.run_data import OnlineData

    root = proxy_dir(study).parent
    root.mkdir(parents=True, exist_ok=True)
    prompts = OnlineData(recipe, models.tokenizer).prompts
    random.Random(study.proxy.seed).shuffle(prompts)
    prompts = prompts[: study.proxy.pairs]
    texts = sample(recipe, models, models.policy, prompts, study.proxy.seed + PAIR_SEED_OFFSET, 2, device)
    doubled = [p for p in prompts for _ in range(2)]
    gold_scores = gold.combine(gold.score_components(doubled, texts), update=False)
    cfg = study.proxy
    rows = label_pairs(prompts, texts, gold_scores, cfg.labels, cfg.temperature, cfg.seed)
    if len(rows) < 2:
        raise RecipeError(f"proxy: only {len(rows)} usable pairs out of {len(prompts)}; raise proxy.pairs")
    pairs_file = root / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    rm = validate(
        RMRecipe,
        {
            "model": cfg.model or recipe.model.path,
            "tokenizer": None if cfg.model else recipe.model.tokenizer,
            "data": {"path": str(pairs_file), "eval_fraction": cfg.eval_fraction},
            "train": cfg.train.model_dump(mode="json"),
            "output_dir": str(proxy_dir(study)),
            "overwrite": True,  # the proxy is retrained on every study run
        },
        source="proxy",
    )
    metrics = train_reward_model(rm, log=lambda line: None)
    return {
        "pairs": len(rows),
        "n_train": metrics["n_train"],
        "n_eval": metrics["n_eval"],
        "eval_accuracy": metrics.get("eval_accuracy"),
        "labels": cfg.labels,
        "path": str(proxy_dir(study)),
        "seconds": metrics["seconds"],
    }


# --------------------------------------------------------------------------------------------
# best-of-n


def best_of_n(ns: list[int], proxy: list[list[float]], gold: list[list[float]]) -> dict[str, list[float]]:
    """Best-of-n from a pool of max(ns) samples per prompt: the pool is cut into max(ns)/n groups
    of n, the proxy's favourite of each group is kept, and its gold and proxy are averaged."""
    pool = max(ns)
    out: dict[str, list[float]] = {"n": list(ns), "kl": [], "gold": [], "proxy": []}
    for n in ns:
        picked_gold, picked_proxy = [], []
        for p_row, g_row in zip(proxy, gold):
            for lo in range(0, pool, n):
                best = max(range(lo, lo + n), key=lambda j: p_row[j])
                picked_gold.append(g_row[best])
                picked_proxy.append(p_row[best])
        out["kl"].append(bon_kl(n))
        out["gold"].append(mean(picked_gold))
        out["proxy"].append(mean(picked_proxy))
    return out


def run_best_of_n(study: OveroptRecipe, recipe: Recipe, models, scorers: Scorers, seed: int, device) -> dict:
    prompts = held_out_prompts(study, recipe, study.bon.n_prompts)
    pool = max(study.bon.n)
    texts = sample(recipe, models, models.policy, prompts, seed + BON_SEED_OFFSET, pool, device)
    doubled = [p for p in prompts for _ in range(pool)]
    proxy = list(scorers.proxy(doubled, texts))
    gold = scorers.gold.combine(scorers.gold.score_components(doubled, texts), update=False)
    rows = lambda values: [values[i * pool : (i + 1) * pool] for i in range(len(prompts))]  # noqa: E731
    return best_of_n(study.bon.n, rows(proxy), rows(gold))


# --------------------------------------------------------------------------------------------
# the study


def train_and_evaluate(
    study: OveroptRecipe,
    spec: ObjectiveSpec,
    seed: int,
    models,
    scorers: Scorers,
    prompts: list[str],
    initial: dict,
    device,
    bar,
    demo_proxy: list[float] | None = None,
) -> list[dict]:
    """Train one run against the proxy, then score step 0 (shared) and each of its checkpoints."""
    recipe = run_recipe(study, spec, seed)
    bar.set_description(f"{spec.run_name} seed {seed}")

    def evaluate(policy) -> dict:
        return evaluate_checkpoint(recipe, models, policy, prompts, scorers, device, demo_proxy)

    records, _ = engine.train_and_evaluate(
        recipe, evaluate, initial, device, bar, study.keep_checkpoints, study.threads
    )
    return records


def run_study(study: OveroptRecipe, progress: bool = True) -> dict:
    """Run the whole protocol; returns the report (also written to ``out``)."""
    from tqdm.auto import tqdm

    from align.jobs.overopt.report import build_report, write_report

    start = time.perf_counter()
    first, models, device = engine.start_study(study)
    gold = build_gold(study, device)
    proxy_info = train_proxy(study, first, models, gold, device)
    scorers = build_scorers(study, first, device)
    prompts = held_out_prompts(study, first, study.eval.n_prompts)
    demo_proxy = demonstration_scores(first, scorers, study.eval.n_prompts)

    runs = study.runs()
    per_run = len(eval_steps(first, study.eval.every)) - 1 + first.train.steps
    bar = tqdm(total=len(runs) * per_run, desc="overopt", unit="step", dynamic_ncols=True, disable=not progress)
    initial: dict[int, dict] = {}
    bon: dict[int, dict] = {}
    results: dict[str, dict[int, list[dict]]] = {}
    for spec, seed in runs:
        if seed not in initial:
            recipe = run_recipe(study, spec, seed)
            initial[seed] = evaluate_checkpoint(recipe, models, models.policy, prompts, scorers, device, demo_proxy)
            if study.bon.n:
                bon[seed] = run_best_of_n(study, recipe, models, scorers, seed, device)
        records = train_and_evaluate(
            study, spec, seed, models, scorers, prompts, initial[seed], device, bar, demo_proxy
        )
        results.setdefault(spec.run_name, {})[seed] = records
    bar.close()
    report = build_report(study, results, bon, proxy_info, seconds=time.perf_counter() - start)
    write_report(report, Path(study.out))
    return report


def main(args: Any) -> int:
    from align.jobs.overopt.report import print_summary

    return engine.main(args, OveroptRecipe, run_study, print_summary)
