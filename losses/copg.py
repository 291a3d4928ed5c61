"""CoPG: Contrastive Policy Gradient (Flet-Berliac et al. 2024, arXiv 2406.19185).

Pairs (y, y′) of the same prompt drawn from ANY sampling distribution μ -- on-policy samples
(all pairs within a group of k), a replay buffer, a fixed dataset:

    h(y) = r(y) − β(ℓ(y) − ℓ_ref(y))
    L    = (1/P) Σ_pairs (h(y) − h(y′))² / (2β)
    ∇L   = −(1/P) Σ_pairs (h(y) − h(y′))·(∇ℓ(y) − ∇ℓ(y′))

The β·log-ratio inside h stays differentiable: detaching it turns the loss into a plain
off-policy policy gradient that converges to the wrong temperature. L is zero exactly when
h is constant, i.e. π ∝ π_ref·exp(r/β), whatever μ (with full support): off-policy without
importance weights. With r(y_w) − r(y_l) ≡ ½ it is IPO at the same β (loss scaled by β/2):
(½ − βΔ)²/(2β) = (β/2)(Δ − 1/(2β))². On-policy, with all k(k−1)/2 pairs of each group of k
and the 1/P normaliser, its gradient is exactly 2× RLOO's (k1 KL) at every k: Σ_{i<j}(h_i − h_j)
(∇ℓ_i − ∇ℓ_j) = k·Σ_i (h_i − h̄)∇ℓ_i and RLOO's advantage is k/(k−1)·(h_i − h̄), with P = N(k−1)/2
pairs against N sequences. Unit: pair.
"""

from __future__ import annotations

from torch import Tensor

from losses.base import LossBatch, Objective, sequence_logprobs


class CoPG(Objective):
    name = "copg"
    unit = "pair"
    feeds = ("online", "offline")  # on-policy pairs by default; a fixed pair/row file is the offline variant
    min_k = 2
    needs = ("rewards", "ref_logprobs")
    paired = True

    def __init__(self, beta: float = 0.1):
        if beta <= 0:
            raise ValueError(f"copg: beta must be > 0, got {beta}")
        self.beta = beta

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        pairs = self.batch_pairs(batch)
        log_ratio = sequence_logprobs(batch.logprobs, batch.mask) - sequence_logprobs(batch.ref_logprobs, batch.mask)
        h = batch.rewards - self.beta * log_ratio
        gap = h[pairs[:, 0]] - h[pairs[:, 1]]
        return gap**2 / (2 * self.beta), {"h_gap": gap.detach().abs(), "log_ratio": log_ratio.detach()}
