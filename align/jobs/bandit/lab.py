"""The lab: train tabular policies with the SAME ``losses/`` objectives the LLM trainer uses.

Every step draws a fresh stochastic batch -- samples of the policy in groups of k, or pairs from
the sampler -- exactly as the trainer would, never the population loss. S seeds run in one
tensor: their rows are concatenated in one ``LossBatch`` (group ids and pair indices offset per
seed, ``stream`` = seed) and the loss is called with ``num_units`` = the units of ONE seed, so
the loss is the sum over seeds of per-seed means and each seed's logits get exactly their own
gradient. Adam is elementwise, so the seeds stay independent.

``sampler: {lag: N}`` trains step t on samples of the policy of step t − N (``samplers.LaggedPolicy``)
with π_old = the current policy, as the trainer's ``train.async`` fixed mode does; the lab then also
trains each objective at lag 0 on the same seeds and reports the steps each took to its target.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

import losses
from align.jobs.bandit.config import BanditRecipe, LagSampler, averaged, source
from align.jobs.bandit.samplers import LaggedPolicy, PairSource
from align.jobs.bandit.targets import kl_to_tilt, target_tilt, tilt_law
from align.jobs.bandit.worlds import Bandit, Sample, SequenceWorld, World
from align.objective import ObjectiveConfig
from align.schedule import lr_scheduler
from losses.correction import Correction

__all__ = ["PairSource", "World", "build_world", "make_batch", "run", "steps_to_target", "train_objective"]


def build_world(recipe: BanditRecipe) -> World:
    if recipe.mode == "sequence":
        s = recipe.sequence
        return SequenceWorld(s.vocab_size, s.max_length, s.ref_eos_prob, s.length_reward)
    return Bandit(recipe.rewards, recipe.ref_logits)


def make_batch(
    entry: ObjectiveConfig,
    objective: losses.Objective,
    recipe: BanditRecipe,
    world: World,
    logits: Tensor,
    pairs: PairSource,
    generator: torch.Generator,
    value_table: Tensor | None = None,
    sampler_logits: Tensor | None = None,
    correction: Correction | None = None,
) -> tuple[losses.LossBatch, int]:
    """One step's batch for all seeds, and the number of loss units of one seed. ``value_table``
    [S, T]: the critic of objectives that need ``values``, one learned value per seed and position.
    ``sampler_logits``: the (lagged) policy that draws what would come from the policy (None: ``logits``);
    ``correction``: its weights π_old/π_sampler, given to an objective that declares ``corrects_sampler``."""
    S, k = recipe.seeds, entry.k  # the recipe's k where the entry gives none (BanditRecipe)
    from_policy = source(entry, recipe.sampler) == "policy"
    drawn = logits if sampler_logits is None else sampler_logits
    pair_local = None
    sampler_logprobs = None  # [S, n, T] π_old where a fixed sampler drew the batch (None: the policy did)
    if from_policy and "online" in objective.feeds:
        # G groups of k samples of the policy; CoPG pairs every two samples of a group
        groups = max(1, recipe.batch_size // k)
        sample = world.sample(drawn, S, groups * k, generator)
        group_local = torch.arange(groups * k) // k
        if objective.paired:
            tri = torch.triu_indices(k, k, offset=1).T  # [k(k-1)/2, 2]
            pair_local = (torch.arange(groups)[:, None, None] * k + tri[None]).reshape(-1, 2)
    else:
        # P pairs from the sampler (or from the policy for dpo/ipo with sampler: policy)
        P = recipe.batch_size
        y, y2, first = pairs.draw(drawn if from_policy or pairs.logits is None else None, P, generator)
        if objective.sampling_logprobs and not from_policy and pairs.logits is not None and not objective.preference:
            # the sampler's log-probs as π_old: a KL penalty fixed at sampling reads μ1, μ2
            sampler_logprobs = torch.cat(
                [world.logprobs(table.expand(S, *table.shape), part) for table, part in zip(pairs.logits, (y, y2))], 1
            )
        if objective.preference:
            y, y2 = y.where(first, y2), y2.where(first, y)  # (chosen, rejected)
        sample = Sample.cat([y, y2])
        if objective.paired:
            pair_local = torch.stack([torch.arange(P), torch.arange(P) + P], dim=1)
        # sequence-level objectives see the pair rows without importance weights: each pair is
        # a group of two (k >= 2), or every row stands alone (k = 1: no baseline)
        group_local = torch.arange(P).repeat(2) if k >= 2 else torch.arange(2 * P)

    logprobs = world.logprobs(logits, sample)  # [S, n, T], with grad
    n, T = logprobs.shape[1:]
    seed = torch.arange(S)
    weights = None  # π_old/π_sampler with π_old the current policy (the trainer's micro_batch_backward)
    if correction is not None and sampler_logits is not None and objective.corrects_sampler:
        lagged = world.logprobs(sampler_logits, sample).reshape(S * n, T)
        weights, _ = correction.weights(logprobs.detach().reshape(S * n, T), lagged, sample.mask.reshape(S * n, T))
    batch = losses.LossBatch(
        logprobs=logprobs.reshape(S * n, T),
        mask=sample.mask.reshape(S * n, T),
        ref_logprobs=world.ref_logprobs(sample).reshape(S * n, T),
        rewards=world.reward(sample).reshape(-1),
        group=(group_local[None] + seed[:, None] * (int(group_local.max()) + 1)).reshape(-1),
        pairs=None if pair_local is None else (pair_local[None] + seed[:, None, None] * n).reshape(-1, 2),
        demo_rewards=torch.full((S * n,), recipe.demo_reward),
        stream=seed.repeat_interleave(n),
        values=None if value_table is None else value_table.repeat_interleave(n, 0)[:, :T],
        old_logprobs=None if sampler_logprobs is None else sampler_logprobs.reshape(S * n, T).to(logprobs.dtype),
        sampler_weights=weights,
    )
    return batch, objective.count_units(batch) // S


class Evaluator:
    """Exact statistics of the S policies: KL to target and to reference, expected reward, length."""

    def __init__(self, world: World, beta: float, tilt: Tensor | None):
        self.world, self.beta, self.tilt = world, beta, tilt
        self.ref_law = world.ref_outcome_law()
        self.reward = world.outcome_reward()
        self.target_law = None if tilt is None else tilt_law(self.ref_law, tilt, beta)

    def __call__(self, logits: Tensor) -> dict[str, Tensor]:
        law = self.world.outcome_law(logits)  # [S, X]
        kl_ref = self.world.kl_to_ref(logits)
        stats = {"expected_reward": law @ self.reward, "kl_to_ref": kl_ref}
        if self.tilt is not None:
            stats["kl_to_target"] = kl_to_tilt(kl_ref, law, self.ref_law, self.tilt, self.beta).clamp(min=0)
        if isinstance(self.world, SequenceWorld):
            stats["mean_length"] = law @ torch.arange(1, self.world.L + 1, dtype=law.dtype)
        return stats


def train_objective(
    entry: ObjectiveConfig, recipe: BanditRecipe, world: World, pairs: PairSource, index: int
) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(recipe.seed * 1000 + 1 + index)
    objective = entry.build()  # β: the entry's own, the recipe's where it gave none (BanditRecipe)
    beta = float(objective.beta)
    sequence = isinstance(world, SequenceWorld)
    from_policy = source(entry, recipe.sampler) == "policy" or pairs.laws is None
    tilt = target_tilt(
        objective.fixed_point,
        averaged(entry),
        sequence,
        world.outcome_reward(),
        world.ref_outcome_law(),
        beta,
        recipe.demo_reward,
        None if from_policy else pairs.laws,
        entry.k,
    )
    evaluate = Evaluator(world, beta, tilt)

    logits = world.init_logits(recipe.seeds).requires_grad_(True)
    value_table = None
    if "values" in objective.needs:  # a tabular critic: a value per seed and position, trained by the loss
        value_table = torch.zeros(recipe.seeds, world.L if sequence else 1, requires_grad=True)
    optimizer = torch.optim.Adam([logits] + ([value_table] if value_table is not None else []), lr=recipe.lr)
    schedule = lr_scheduler(optimizer, recipe.steps, recipe.lr_schedule, final_ratio=recipe.final_lr_ratio)
    curves: dict[str, list[float]] = {"step": []}
    lag = recipe.sampler if isinstance(recipe.sampler, LagSampler) else None
    lagged = None if lag is None else LaggedPolicy(lag.lag)
    chosen = None if lag is None else lag.importance_correction
    correction = None
    if chosen is not None and chosen.mode != "none" and objective.corrects_sampler:
        correction = Correction(chosen.mode, chosen.clip_max, chosen.clip_min)

    def log(step: int) -> None:
        curves["step"].append(step)
        for key, value in evaluate(logits).items():
            curves.setdefault(key, []).append(float(value.mean()))
            curves.setdefault(key + "_std", []).append(float(value.std()) if value.numel() > 1 else 0.0)

    log(0)
    for step in range(1, recipe.steps + 1):
        sampler_logits = None if lagged is None else lagged.push(logits)  # the weights of step − 1 − lag
        batch, units = make_batch(
            entry, objective, recipe, world, logits, pairs, generator, value_table, sampler_logits, correction
        )
        loss, _ = objective(batch, num_units=units)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        objective.after_step(replace(batch, logprobs=batch.logprobs.detach()))
        if step % recipe.log_every == 0 or step == recipe.steps:
            log(step)

    final = {key: value.tolist() for key, value in evaluate(logits).items()}
    law = world.outcome_law(logits)
    result: dict[str, Any] = {
        "name": entry.name,
        "options": entry.options,
        "data": source(entry, recipe.sampler),
        "beta": beta,
        "final": final,
        "steps_to_target": None if tilt is None else steps_to_target(curves, recipe.converged_kl),
        "curves": curves,
    }
    target = None if evaluate.target_law is None else evaluate.target_law.tolist()
    if sequence:
        lengths = torch.arange(1, world.L + 1, dtype=torch.float64)
        result["target_length_dist"] = target
        result["target_mean_length"] = None if target is None else float(evaluate.target_law @ lengths)
        result["final_length_dist"] = law.tolist()
    else:
        result["target_policy"] = target
        result["final_policy"] = law.tolist()
    return result


def steps_to_target(curves: dict[str, list[float]], threshold: float) -> int | None:
    """The first logged step whose seed-mean KL to target is at most ``threshold`` (None: none was)."""
    for step, kl in zip(curves["step"], curves.get("kl_to_target", [])):
        if kl <= threshold:
            return int(step)
    return None


def run(recipe: BanditRecipe, progress: Any = None) -> dict[str, Any]:
    """Train every objective of the recipe; returns the content of results.json."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: intra-op threads cost more than they save
    try:
        return _run(recipe, progress)
    finally:
        torch.set_num_threads(threads)


def _run(recipe: BanditRecipe, progress: Any) -> dict[str, Any]:
    world = build_world(recipe)
    pairs = PairSource(recipe, world, torch.Generator().manual_seed(recipe.seed * 1000))
    results: dict[str, Any] = {
        "mode": recipe.mode,
        "beta": recipe.beta,
        "seeds": recipe.seeds,
        "converged_kl": recipe.converged_kl,
        "objectives": {},
    }
    lag = recipe.sampler if isinstance(recipe.sampler, LagSampler) else None
    twin = None  # the same recipe at lag 0: same seeds, same draws until the policies differ
    if lag is not None:
        results["lag"] = lag.lag
        if lag.lag > 0 and lag.compare_lag0:
            twin = recipe.model_copy(update={"sampler": lag.model_copy(update={"lag": 0})})
    ref_law = world.ref_outcome_law().tolist()
    if recipe.mode == "sequence":
        results["ref_length_dist"] = ref_law
    else:
        results["pi_ref"] = ref_law
        results["rewards"] = list(recipe.rewards)
    for index, entry in enumerate(recipe.objectives):
        if progress is not None:
            progress(entry.label)
        result = train_objective(entry, recipe, world, pairs.for_objective(), index)
        if twin is not None:
            if progress is not None:
                progress(f"{entry.label} at lag 0")
            base = train_objective(entry, twin, world, pairs.for_objective(), index)
            result["lag0"] = {key: base[key] for key in ("steps_to_target", "final", "curves")}
        results["objectives"][entry.label] = result
    return results
