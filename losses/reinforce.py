"""REINFORCE with a moving-average baseline (Williams 1992).

    R_i = r_i − β·KL_seq(y_i)                         (detached, see losses/kl.py)
    L   = −(1/N) Σ_i (R_i − b)·ℓ(y_i),   ℓ(y) = Σ_t log π(y_t | x, y_<t)

b is an exponential moving average of R over past optimizer steps (b ← m·b + (1−m)·mean R),
fixed during a step so the estimator stays unbiased. One baseline per ``stream`` (the bandit
lab runs independent seeds in one call). Unit: sequence. ``kl_from`` as RLOO's (losses/kl.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from losses.base import LossBatch, sampler_weighted, sequence_logprobs, stream_index
from losses.kl import KLEstimator, KLFrom, RewardKL


class Reinforce(RewardKL):
    name = "reinforce"
    unit = "sequence"
    feeds = ("online",)
    corrects_sampler = True
    needs = ("rewards",)

    def __init__(
        self,
        beta: float = 0.05,
        kl_estimator: KLEstimator = "k1",
        baseline_momentum: float = 0.9,
        kl_from: KLFrom = "old",
    ):
        super().__init__(beta, kl_estimator, kl_from)
        self.baseline_momentum = baseline_momentum
        self.baseline: Tensor | None = None  # [n_streams]
        self.baseline_seen: Tensor | None = None

    def _regularised(self, batch: LossBatch) -> tuple[Tensor, Tensor]:
        return self.penalised(batch, batch.rewards)

    def _baseline_for(self, stream: Tensor) -> Tensor:
        n = int(stream.max()) + 1 if stream.numel() else 1
        if self.baseline is None or self.baseline.numel() < n:
            grown = torch.zeros(n, dtype=torch.float64)
            seen = torch.zeros(n, dtype=torch.bool)
            if self.baseline is not None:
                grown[: self.baseline.numel()] = self.baseline
                seen[: self.baseline_seen.numel()] = self.baseline_seen
            self.baseline, self.baseline_seen = grown, seen
        return self.baseline.to(stream.device)[stream]

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        R, kl = self._regularised(batch)
        advantage = R - self._baseline_for(stream_index(batch)).to(R.dtype)
        logp = sequence_logprobs(sampler_weighted(batch.logprobs, batch), batch.mask)
        return -advantage * logp, {"advantage": advantage, "kl": kl, "regularised_reward": R}

    def after_step(self, batch: LossBatch) -> None:
        R, _ = self._regularised(batch)
        stream = stream_index(batch)
        self._baseline_for(stream)
        stream = stream.cpu()
        n = self.baseline.numel()
        sums = torch.zeros(n, dtype=torch.float64).index_add_(0, stream, R.detach().double().cpu())
        counts = torch.zeros(n, dtype=torch.float64).index_add_(0, stream, torch.ones(len(stream), dtype=torch.float64))
        present = counts > 0
        means = sums[present] / counts[present]
        m = self.baseline_momentum
        # the first step initialises the baseline to the batch mean instead of decaying from 0
        old = torch.where(self.baseline_seen[present], self.baseline[present], means)
        self.baseline[present] = m * old + (1 - m) * means
        self.baseline_seen[present] = True

    def state_dict(self) -> dict:
        return {"baseline": self.baseline, "baseline_seen": self.baseline_seen}

    def load_state_dict(self, state: dict) -> None:
        self.baseline = state.get("baseline")
        self.baseline_seen = state.get("baseline_seen")
