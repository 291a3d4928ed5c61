"""The lab: train tabular policies with the SAME ``losses/`` objectives the LLM trainer uses.

Every step draws a fresh stochastic batch -- samples of the policy in groups of k, or pairs from
the sampler -- exactly as the trainer would, never the population loss. S seeds run in one
tensor: their rows are concatenated in one ``LossBatch`` (group ids and pair indices offset per
seed, ``stream`` = seed) and the loss is called with ``num_units`` = the units of ONE seed, so
the loss is the sum over seeds of per-seed means and each seed's logits get exactly their own
gradient. Adam is elementwise, so the seeds stay independent.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

import losses
from align.jobs.bandit.config import BanditRecipe, PairSampler, ReplaySampler, averaged, source
from align.jobs.bandit.targets import kl_to_tilt, target_tilt, tilt_law
from align.jobs.bandit.worlds import Bandit, Sample, SequenceWorld
from align.objective import ObjectiveConfig
from align.schedule import lr_scheduler

World = Bandit | SequenceWorld


def build_world(recipe: BanditRecipe) -> World:
    if recipe.mode == "sequence":
        s = recipe.sequence
        return SequenceWorld(s.vocab_size, s.max_length, s.ref_eos_prob, s.length_reward)
    return Bandit(recipe.rewards, recipe.ref_logits)


class PairSource:
    """Pairs (y, y′) with a Bradley–Terry label ``first_wins = [y ≻ y′]``, from the recipe's sampler.

    ``uniform`` / ``ref``: both from the uniform or the reference policy; ``policy``: both from the
    current policy; ``{mu1, mu2}``: y ~ mu1, y′ ~ mu2 over the arms. With ``dataset_size`` the
    pairs and their labels are drawn once per seed (the same data for every objective) and each
    step samples ``n`` of them with replacement.
    """

    def __init__(self, recipe: BanditRecipe, world: World, generator: torch.Generator):
        self.world, self.seeds = world, recipe.seeds
        spec = recipe.sampler
        self.dataset: tuple[Sample, Sample, Tensor] | None = None
        if isinstance(spec, PairSampler):
            mu2 = spec.mu2 if spec.mu2 is not None else spec.mu1
            self.laws: tuple[Tensor, Tensor] | None = (
                torch.tensor(spec.mu1).double(),
                torch.tensor(mu2).double(),
            )
            self.logits = tuple(law.log().float() for law in self.laws)
            if spec.dataset_size is not None:
                self.dataset = self._fresh(None, spec.dataset_size, generator)
        elif isinstance(spec, ReplaySampler):  # the policy's own past samples
            self.laws, self.logits = None, None
            self.replay: deque[Tensor] = deque(maxlen=spec.replay_steps)
            self.mix = spec.mix
        elif spec == "policy":
            self.laws, self.logits = None, None
        else:
            table = world.uniform_logits() if spec == "uniform" else world.init_logits(1)[0]
            self.logits = (table, table)
            law = world.outcome_law(table[None])[0]
            self.laws = (law, law)

    def for_objective(self) -> PairSource:
        """This source for one objective: a replay buffer holds that objective's own past policies."""
        if getattr(self, "replay", None) is None:
            return self
        out = copy.copy(self)
        out.replay = deque(maxlen=self.replay.maxlen)
        return out

    def _fresh(self, policy_logits: Tensor | None, n: int, generator: torch.Generator) -> tuple[Sample, Sample, Tensor]:
        first_logits, second_logits = (policy_logits, policy_logits) if policy_logits is not None else self.logits
        y = self.world.sample(first_logits, self.seeds, n, generator)
        y2 = self.world.sample(second_logits, self.seeds, n, generator)
        p_first = torch.sigmoid(self.world.reward(y) - self.world.reward(y2))
        return y, y2, torch.rand(p_first.shape, generator=generator) < p_first

    def draw(self, policy_logits: Tensor | None, n: int, generator: torch.Generator) -> tuple[Sample, Sample, Tensor]:
        """n pairs per seed; from the policy when ``policy_logits`` is given."""
        if policy_logits is None and self.logits is None:
            raise ValueError("sampler: policy needs the policy's logits")
        if self.dataset is not None and policy_logits is None:
            y, y2, first = self.dataset
            index = torch.randint(first.shape[1], (self.seeds, n), generator=generator)
            return y.take(index), y2.take(index), first[torch.arange(self.seeds)[:, None], index]
        if getattr(self, "replay", None) is not None:
            return self._replayed(policy_logits, n, generator)
        return self._fresh(policy_logits, n, generator)

    def _replayed(self, policy_logits: Tensor, n: int, generator: torch.Generator) -> tuple[Sample, Sample, Tensor]:
        """Each element of a pair from the policy of a random step among the last ``replay_steps``
        (this one included); with ``mix``, that fraction of first elements fresh from this step's."""
        self.replay.append(policy_logits.detach().clone())

        def pick() -> tuple[Sample, Sample]:  # (a buffered sample, this step's) per row
            draws = [self.world.sample(table, self.seeds, n, generator) for table in self.replay]
            which = torch.randint(len(draws), (self.seeds, n), generator=generator)
            out = draws[0]
            for i, draw in enumerate(draws[1:], start=1):
                out = draw.where(which == i, out)
            return out, draws[-1]

        (y, fresh_y), (y2, _) = pick(), pick()
        if self.mix:
            fresh = torch.rand(self.seeds, n, generator=generator) < self.mix
            y = fresh_y.where(fresh, y)
        p_first = torch.sigmoid(self.world.reward(y) - self.world.reward(y2))
        return y, y2, torch.rand(p_first.shape, generator=generator) < p_first


def make_batch(
    entry: ObjectiveConfig,
    objective: losses.Objective,
    recipe: BanditRecipe,
    world: World,
    logits: Tensor,
    pairs: PairSource,
    generator: torch.Generator,
    value_table: Tensor | None = None,
) -> tuple[losses.LossBatch, int]:
    """One step's batch for all seeds, and the number of loss units of one seed. ``value_table``
    [S, T]: the critic of objectives that need ``values``, one learned value per seed and position."""
    S, k = recipe.seeds, entry.k  # the recipe's k where the entry gives none (BanditRecipe)
    from_policy = source(entry, recipe.sampler) == "policy"
    pair_local = None
    sampler_logprobs = None  # [S, n, T] π_old where a fixed sampler drew the batch (None: the policy did)
    if from_policy and "online" in objective.feeds:
        # G groups of k samples of the policy; CoPG pairs every two samples of a group
        groups = max(1, recipe.batch_size // k)
        sample = world.sample(logits, S, groups * k, generator)
        group_local = torch.arange(groups * k) // k
        if objective.paired:
            tri = torch.triu_indices(k, k, offset=1).T  # [k(k-1)/2, 2]
            pair_local = (torch.arange(groups)[:, None, None] * k + tri[None]).reshape(-1, 2)
    else:
        # P pairs from the sampler (or from the policy for dpo/ipo with sampler: policy)
        P = recipe.batch_size
        y, y2, first = pairs.draw(logits if from_policy or pairs.logits is None else None, P, generator)
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

    def log(step: int) -> None:
        curves["step"].append(step)
        for key, value in evaluate(logits).items():
            curves.setdefault(key, []).append(float(value.mean()))
            curves.setdefault(key + "_std", []).append(float(value.std()) if value.numel() > 1 else 0.0)

    log(0)
    for step in range(1, recipe.steps + 1):
        batch, units = make_batch(entry, objective, recipe, world, logits, pairs, generator, value_table)
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
        "objectives": {},
    }
    ref_law = world.ref_outcome_law().tolist()
    if recipe.mode == "sequence":
        results["ref_length_dist"] = ref_law
    else:
        results["pi_ref"] = ref_law
        results["rewards"] = list(recipe.rewards)
    for index, entry in enumerate(recipe.objectives):
        if progress is not None:
            progress(entry.label)
        results["objectives"][entry.label] = train_objective(entry, recipe, world, pairs.for_objective(), index)
    return results
