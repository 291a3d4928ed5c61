"""Where the lab's samples come from, besides the current policy.

``PairSource``: pairs (y, y′) with Bradley–Terry labels from the recipe's sampler -- a fixed law,
a fixed dataset of pairs, the policy, or a replay buffer of its past policies.
``LaggedPolicy``: the policy of ``lag`` optimizer steps ago (``sampler: {lag: N}``), which every
objective of the recipe samples from instead of the current one -- the LLM trainer's
``train.async`` ``fixed`` mode (align/async_rollouts.py).
"""

from __future__ import annotations

import copy
from collections import deque

import torch
from torch import Tensor

from align.jobs.bandit.config import BanditRecipe, LagSampler, PairSampler, ReplaySampler
from align.jobs.bandit.worlds import Sample, World


class PairSource:
    """Pairs (y, y′) with a Bradley–Terry label ``first_wins = [y ≻ y′]``, from the recipe's sampler.

    ``uniform`` / ``ref``: both from the uniform or the reference policy; ``policy``: both from the
    current policy (``{lag: N}``: the lagged one, which ``make_batch`` passes); ``{mu1, mu2}``:
    y ~ mu1, y′ ~ mu2 over the arms. With ``dataset_size`` the pairs and their labels are drawn once
    per seed (the same data for every objective) and each step samples ``n`` of them with replacement.
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
        elif spec == "policy" or isinstance(spec, LagSampler):  # the policy's pairs (lagged: make_batch)
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


class LaggedPolicy:
    """A ring buffer of the last ``lag + 1`` policies (their logits, detached copies, per seed).

    ``push`` is called once per step with the weights about to be trained, version v (v optimizer
    steps applied) and returns the sampler's: version max(0, v − lag), the initial policy while
    v < lag. lag 0 returns a copy of the current logits: its samples are exactly the policy's.
    """

    def __init__(self, lag: int):
        if lag < 0:
            raise ValueError(f"lag: expected an integer >= 0, got {lag}")
        self.tables: deque[Tensor] = deque(maxlen=lag + 1)

    def push(self, logits: Tensor) -> Tensor:
        self.tables.append(logits.detach().clone())
        return self.tables[0]
