"""PPO with a learned value function (Schulman et al. 2017, arXiv 1707.06347), as RLHF runs it
(Ziegler et al. 2019; Ouyang et al. 2022; TRL's PPOTrainer): the KL to the reference is a per-token
reward, advantages come from GAE, and a critic V is trained beside the policy.

With π_old the policy that sampled and V_old its critic (the detached current ones when each
batch gets one update, where ρ = 1 and the value clip is inactive):

    r_t     = −β·k1_t = −β·(log π_old(y_t) − log π_ref(y_t))   (+ r(y) on the last token)
    δ_t     = r_t + γ·V_old(s_{t+1}) − V_old(s_t)              (V_old = 0 after the last token)
    A_t     = Σ_{l≥0} (γλ)^l δ_{t+l}                           (GAE)
    G_t     = A_t + V_old(s_t)                                  (the value target)
    Â_t     = (A_t − mean A) / sqrt(var A + 1e-8)               (whiten_advantages; TRL, verl)
    ρ_t     = exp(log π(y_t) − log π_old(y_t))
    ℓ_t     = −min(ρ_t·Â_t, clip(ρ_t, 1 ± clip)·Â_t)
            + vf_coef · ½·max((V − G_t)², (V_old + clip(V − V_old, ±value_clip) − G_t)²)
    L       = Σ_i Σ_t m_it·ℓ_it / Σ_i Σ_t m_it                  (unit: token, TRL's masked mean)

V(s_t) is the critic's value of the state before token t (``values[B, T]``, with grad). The KL
enters the reward, not the loss, so the expected policy gradient is ∇(E[r] − β·KL(π ‖ π_ref))
whenever the advantage is unbiased -- always for γ = λ = 1, and for λ < 1 once V is the policy's
value. Its fixed point is π_ref·exp(r/β) (``reward``; bandit-tested, where T = 1 and GAE reduces
to A = r − β·k1 − V).

Whitening (``whiten_advantages``, on by default as in TRL's PPOTrainer and verl): mean and unbiased
variance over every completion token of the whole rollout batch and every process, padding
excluded (``batch_stats``; the trainer sums them once, before the first optimizer step, from π_old,
the reference and V_old), so micro-batching, mini-batches and the process count do not change them
and the update does not scale with the reward. The value target G_t stays unwhitened. Subtracting
the mean is a constant baseline and dividing by the std a positive step size, so the fixed point is
unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losses.base import LossBatch, Objective, clip_active, moment_sums, sampler_weighted, stream_index, whiten
from losses.kl import KLEstimator, reward_kl_estimator, token_kl


def token_rewards(rewards: Tensor, logprobs: Tensor, ref_logprobs: Tensor | None, mask: Tensor, beta: float) -> Tensor:
    """[B, T] per-token rewards: −β·k1 on every completion token, the sequence reward on the last."""
    out = torch.zeros_like(mask, dtype=logprobs.dtype)
    if beta and ref_logprobs is not None:
        out = -beta * token_kl(logprobs.detach(), ref_logprobs.detach(), "k1") * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rows = torch.arange(mask.shape[0], device=mask.device)
    sequence = rewards if rewards.dim() == 1 else rewards.sum(-1)
    out[rows, last] += sequence.to(out.dtype) * (mask[rows, last] > 0)
    return out


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """[B, T] generalised advantage estimates over right-padded completions (Schulman et al. 2016)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        advantages[:, t] = running
        next_value = values[:, t] * m
    return advantages


class PPO(Objective):
    name = "ppo"
    unit = "token"
    feeds = ("online",)
    corrects_sampler = True
    needs = ("rewards", "values")  # values: the trainer loads a critic (recipe section ``critic``)

    def __init__(
        self,
        beta: float = 0.05,
        gamma: float = 1.0,
        lam: float = 0.95,
        clip: float = 0.2,
        value_clip: float | None = 0.2,
        vf_coef: float = 0.1,
        kl_estimator: KLEstimator = "k1",
        whiten_advantages: bool = True,
    ):
        if not 0 <= gamma <= 1 or not 0 <= lam <= 1:
            raise ValueError(f"gamma, lam: expected values in [0, 1], got {gamma}, {lam}")
        if clip < 0 or (value_clip is not None and value_clip < 0) or vf_coef < 0:
            raise ValueError("clip, value_clip, vf_coef: expected >= 0")
        self.beta, self.gamma, self.lam = beta, gamma, lam
        self.clip, self.value_clip, self.vf_coef = clip, value_clip, vf_coef
        self.kl_estimator = reward_kl_estimator(kl_estimator)
        self.whiten_advantages = bool(whiten_advantages)

    @property
    def sampling_logprobs(self) -> bool:
        return True  # ratios and the per-token KL reward read π_old

    @property
    def stats_read(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("rewards", "old_logprobs", "ref_logprobs", "old_values") if self.whiten_advantages else ()

    def _advantages(self, batch: LossBatch) -> tuple[Tensor, Tensor, Tensor]:
        """(A, V_old, π_old's log-probs): GAE over the rollout's rewards and values, unwhitened."""
        old = batch.old_logprobs if batch.old_logprobs is not None else batch.logprobs.detach()
        values = batch.values if batch.values is not None else batch.old_values
        old_values = (batch.old_values if batch.old_values is not None else values.detach()).to(old.dtype)
        rewards = token_rewards(batch.rewards, old, batch.ref_logprobs, batch.mask, self.beta)
        return gae(rewards, old_values * batch.mask, batch.mask, self.gamma, self.lam), old_values, old

    def batch_stats(self, batch: LossBatch) -> dict[str, Tensor]:
        if not self.whiten_advantages:
            return {}
        advantages, _, _ = self._advantages(batch)
        return moment_sums(advantages, batch.mask, stream_index(batch))

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        mask = batch.mask
        values = batch.values.to(batch.logprobs.dtype)
        advantages, old_values, old = self._advantages(batch)
        returns = advantages + old_values
        if self.whiten_advantages:
            stream = stream_index(batch)
            stats = batch.stats if batch.stats else moment_sums(advantages, mask, stream)
            advantages = whiten(advantages, stats, stream) * mask
        ratio = torch.exp(batch.logprobs - old)
        clipped = torch.clamp(ratio, 1 - self.clip, 1 + self.clip)
        policy_loss = sampler_weighted(-torch.minimum(ratio * advantages, clipped * advantages), batch)
        value_loss = (values - returns) ** 2
        if self.value_clip is not None:
            clipped_values = old_values + torch.clamp(values - old_values, -self.value_clip, self.value_clip)
            value_loss = torch.maximum(value_loss, (clipped_values - returns) ** 2)
        per_token = (policy_loss + self.vf_coef * 0.5 * value_loss) * mask
        metrics = {  # per token: merged over completion tokens (losses/base.py)
            "advantage": advantages.detach(),
            "value_loss": 0.5 * value_loss.detach(),
            "value": old_values,
            "clip_fraction": clip_active(ratio.detach(), advantages.detach(), self.clip, self.clip).to(mask.dtype),
        }
        if batch.ref_logprobs is not None:
            metrics["kl"] = (token_kl(old, batch.ref_logprobs.detach(), "k1") * mask).sum(-1)
        return per_token, metrics
