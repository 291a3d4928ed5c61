"""GSPO: Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071).

GRPO (losses/grpo.py) with one importance ratio per sequence instead of one per token: the
geometric mean of the token ratios, so its scale does not grow with the length. k samples per
prompt, group-normalised advantages Â_i exactly as GRPO's (``scale_rewards``, ``kl``), and with
π_old the policy that sampled:

    s_i  = exp( (1/|y_i|) Σ_t log π(y_it)/π_old(y_it) )            (one ratio per sequence)
    ℓ_i  = −min(s_i·Â_i, clip(s_i, 1 − clip_low, 1 + clip_high)·Â_i)
    ℓ_it = ℓ_i  on every completion token of y_i  [+ β·k3_it if kl = "loss"]
    L    = aggregate(ℓ, aggregation)                                 (losses/aggregation.py)

This is TRL's GRPOTrainer with ``importance_sampling_level="sequence"``: its ``_compute_loss``
keeps the sequence term as one [B, 1] column, broadcasts it over the tokens when it adds the
per-token k3 KL and the sampler-mismatch weights, and aggregates with ``loss_type``
(``seq_mean_token_mean`` is TRL's ``grpo``, what the paper optimises: with it each sequence
counts ℓ_i once; ``token_mean``, TRL's ``dapo``, weights ℓ_i by |y_i|, which TRL warns about).
benchmarks/step0_policy_gradients.py checks loss and gradient against TRL's. Defaults are the
paper's (§5.1) as TRL's paper index gives them: clip 3e-4 / 4e-4 (TRL's ``epsilon`` /
``epsilon_high``: the sequence ratio moves far less than a token's) and no KL (β = 0).

The GSPO-token variant (s_it = sg(s_i)·π(y_it)/sg(π(y_it)), TRL's experimental GSPO-token) is
not offered: with one advantage per sequence -- every advantage here -- its value, clipping and
gradient equal GSPO's (the paper's Eqs. 11 and 18), so it would be the same objective again.

Fixed point: on a bandit (T = 1) the sequence ratio is the token ratio, s_i = ρ_i, and GSPO is
GRPO term for term, so it declares what GRPO declares with the same options (``reward`` with
kl = "reward" and no std scaling; ``reverse_kl`` with a k3 loss term and no std scaling; none
with std scaling). On-policy (ρ = 1) the clip never acts and on sequences the gradient is GRPO's
with the tokens of a sequence weighted equally; bandit-tested (tests/losses/test_new_policy_gradients.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from losses.base import LossBatch, with_defaults
from losses.grpo import GRPO, clipped_surrogate


def sequence_ratio(logprobs: Tensor, old: Tensor, mask: Tensor) -> Tensor:
    """[B, 1] s_i = exp(mean over completion tokens of log π − log π_old); padding never enters."""
    log_ratio = torch.where(mask > 0, logprobs - old, torch.zeros_like(logprobs))
    return torch.exp(log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1))


class GSPO(GRPO):
    name = "gspo"
    __init__ = with_defaults(GRPO.__init__, beta=0.0, clip_low=3e-4, clip_high=4e-4)

    def policy_terms(self, batch: LossBatch, old: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
        """One column [B, 1] per sequence (broadcast over its tokens), and whether its clip is active."""
        return clipped_surrogate(sequence_ratio(batch.logprobs, old, batch.mask), A, self.clip_low, self.clip_high)
