"""Tabular policies the lab trains, S seeds at once: a K-armed bandit and a sequence policy.

Both give the objectives exactly what the LLM trainer gives them: per-token log-probs
``[B, T]`` with a mask (T = 1 for the bandit), rewards, and sequences drawn from the policy or
from a fixed sampler. Both also compute exact statistics of a policy (no sampling): the law of
its "outcome" (the arm, or the length of the sequence), KL to the reference and expected reward.

Every reward depends on the outcome only, so every fixed point the lab checks has the form
π(y) ∝ π_ref(y)·exp(f(outcome)/β) and its KL is exact (see ``align/jobs/bandit/targets.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

EOS = 0


@dataclass
class Sample:
    """n sequences per seed: ``tokens[S, n, T]``, ``mask[S, n, T]``, ``outcome[S, n]`` (arm or length − 1)."""

    tokens: Tensor
    mask: Tensor
    outcome: Tensor

    @staticmethod
    def cat(parts: list[Sample]) -> Sample:
        return Sample(*(torch.cat([getattr(p, f) for p in parts], dim=1) for f in ("tokens", "mask", "outcome")))

    def where(self, cond: Tensor, other: Sample) -> Sample:
        """Row-wise choice between two samples of the same shape: self where ``cond[S, n]``."""
        return Sample(
            torch.where(cond[..., None], self.tokens, other.tokens),
            torch.where(cond[..., None], self.mask, other.mask),
            torch.where(cond, self.outcome, other.outcome),
        )

    def take(self, index: Tensor) -> Sample:
        """Rows ``index[S, n]`` of each seed."""
        seed = torch.arange(index.shape[0])[:, None]
        return Sample(self.tokens[seed, index], self.mask[seed, index], self.outcome[seed, index])


def categorical(logits: Tensor, n: int | None, generator: torch.Generator) -> Tensor:
    """Draws from softmax(logits) over the last dim (inverse CDF): ``[..., n]``, ``[...]`` if n is None."""
    cdf = torch.softmax(logits.float(), -1).cumsum(-1)
    u = torch.rand((*cdf.shape[:-1], n or 1), generator=generator) * cdf[..., -1:]
    draws = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[-1] - 1)
    return draws if n is not None else draws[..., 0]


class Bandit:
    """K arms; a policy is logits ``[S, K]``; the outcome of a sample is its arm."""

    def __init__(self, rewards: list[float], ref_logits: list[float] | None):
        self.reward_table = torch.tensor(rewards, dtype=torch.float64)
        K = len(rewards)
        ref = torch.tensor(ref_logits if ref_logits is not None else [0.0] * K, dtype=torch.float64)
        self.ref_logits = ref.float()
        self.ref_logp = torch.log_softmax(ref, -1)
        self.num_outcomes = K

    def init_logits(self, seeds: int) -> Tensor:
        return self.ref_logits.expand(seeds, -1).clone()

    def uniform_logits(self) -> Tensor:
        return torch.zeros(self.num_outcomes)

    def sample(self, logits: Tensor, seeds: int, n: int, generator: torch.Generator) -> Sample:
        """n arms per seed from softmax(logits); logits ``[S, K]`` or ``[K]`` (shared)."""
        arms = categorical(logits.detach().expand(seeds, -1), n, generator)
        return Sample(arms[..., None], torch.ones(seeds, n, 1), arms)

    def logprobs(self, logits: Tensor, sample: Sample) -> Tensor:
        """log π(a) per sample: ``[S, n, 1]`` (differentiable in ``logits``)."""
        logp = torch.log_softmax(logits.expand(sample.tokens.shape[0], -1), -1)
        return logp.gather(1, sample.tokens[..., 0])[..., None]

    def ref_logprobs(self, sample: Sample) -> Tensor:
        return self.ref_logp.float()[sample.tokens]

    def outcome_reward(self) -> Tensor:
        return self.reward_table

    def reward(self, sample: Sample) -> Tensor:
        """r(y) per sample: ``[S, n]`` float32."""
        return self.reward_table.float()[sample.outcome]

    def ref_outcome_law(self) -> Tensor:
        return self.ref_logp.exp()

    def outcome_law(self, logits: Tensor) -> Tensor:
        """``[S, K]`` (float64)."""
        return torch.softmax(logits.detach().double(), -1)

    def kl_to_ref(self, logits: Tensor) -> Tensor:
        logp = torch.log_softmax(logits.detach().double(), -1)
        return (logp.exp() * (logp - self.ref_logp)).sum(-1)


class SequenceWorld:
    """A tabular autoregressive policy over V tokens (token 0 = EOS) up to L tokens.

    A policy is logits ``[S, L, V, V]`` indexed by (position, previous token, next token); the
    previous token at position 0 is a BOS that shares index 0 with EOS (EOS never precedes a
    live position). A sequence ends at its first EOS (EOS counted) or after L tokens. The
    outcome of a sample is its length − 1; the reward is ``length_reward · |y|``.
    """

    def __init__(self, vocab_size: int, max_length: int, ref_eos_prob: float, length_reward: float):
        V, L = vocab_size, max_length
        self.V, self.L = V, L
        probs = torch.full((V,), (1 - ref_eos_prob) / (V - 1), dtype=torch.float64)
        probs[EOS] = ref_eos_prob
        self.ref_table = probs.log().expand(L, V, V).clone()  # [L, V, V] log-probs
        self.length_reward = length_reward
        self.num_outcomes = L

    def init_logits(self, seeds: int) -> Tensor:
        return self.ref_table.float().expand(seeds, -1, -1, -1).clone()

    def uniform_logits(self) -> Tensor:
        return torch.zeros(self.L, self.V, self.V)

    def sample(self, logits: Tensor, seeds: int, n: int, generator: torch.Generator) -> Sample:
        """n sequences per seed from the policy ``logits[S, L, V, V]`` (or a shared ``[L, V, V]``)."""
        logits = logits.detach().float().expand(seeds, -1, -1, -1)
        seed_index = torch.arange(seeds)[:, None]
        tokens = torch.zeros(seeds, n, self.L, dtype=torch.long)
        mask = torch.zeros(seeds, n, self.L)
        prev = torch.zeros(seeds, n, dtype=torch.long)  # BOS
        alive = torch.ones(seeds, n, dtype=torch.bool)
        for t in range(self.L):
            tok = categorical(logits[:, t][seed_index, prev], None, generator)  # [S, n]
            tok = torch.where(alive, tok, torch.full_like(tok, EOS))
            tokens[:, :, t] = tok
            mask[:, :, t] = alive.float()
            alive = alive & (tok != EOS)
            prev = tok
        return Sample(tokens, mask, mask.sum(-1).long() - 1)

    def _gather(self, table: Tensor, sample: Sample) -> Tensor:
        """table ``[S, L, V, V]`` of log-probs at the sampled (position, previous, token): ``[S, n, L]``."""
        S, n, L = sample.tokens.shape
        prev = torch.cat([torch.zeros(S, n, 1, dtype=torch.long), sample.tokens[:, :, :-1]], dim=2)
        s = torch.arange(S)[:, None, None]
        t = torch.arange(L)[None, None, :]
        return table[s, t, prev, sample.tokens]

    def logprobs(self, logits: Tensor, sample: Sample) -> Tensor:
        return self._gather(torch.log_softmax(logits, -1), sample)

    def ref_logprobs(self, sample: Sample) -> Tensor:
        return self._gather(self.ref_table.float().expand(sample.tokens.shape[0], -1, -1, -1), sample)

    def outcome_reward(self) -> Tensor:
        return self.length_reward * torch.arange(1, self.L + 1, dtype=torch.float64)

    def reward(self, sample: Sample) -> Tensor:
        return self.outcome_reward().float()[sample.outcome]

    def _occupancy(self, logp: Tensor) -> tuple[Tensor, Tensor]:
        """Exact law of a policy ``logp[S, L, V, V]``: P(alive at t with previous token v) ``[S, L, V]``
        and P(length = t + 1) ``[S, L]``, by forward recursion."""
        S = logp.shape[0]
        p = logp.exp()
        occ = torch.zeros(S, self.L, self.V, dtype=logp.dtype)
        occ[:, 0, 0] = 1.0
        ends = torch.zeros(S, self.L, dtype=logp.dtype)
        for t in range(self.L):
            nxt = torch.einsum("sv,svw->sw", occ[:, t], p[:, t])
            if t + 1 < self.L:
                ends[:, t] = nxt[:, EOS]
                occ[:, t + 1, 1:] = nxt[:, 1:]
            else:
                ends[:, t] = occ[:, t].sum(-1)
        return occ, ends

    def ref_outcome_law(self) -> Tensor:
        return self._occupancy(self.ref_table[None])[1][0]

    def outcome_law(self, logits: Tensor) -> Tensor:
        return self._occupancy(torch.log_softmax(logits.detach().double(), -1))[1]

    def kl_to_ref(self, logits: Tensor) -> Tensor:
        """Exact sequence-level KL(π‖π_ref) = Σ_t E[KL of the next-token laws at the visited state]."""
        logp = torch.log_softmax(logits.detach().double(), -1)
        occ, _ = self._occupancy(logp)
        step_kl = (logp.exp() * (logp - self.ref_table)).sum(-1)  # [S, L, V]
        return (occ * step_kl).sum((1, 2))


World = Bandit | SequenceWorld
