"""SimPO: Simple Preference Optimization with a reference-free reward (Meng et al. 2024,
arXiv 2405.14734), as TRL's CPOTrainer runs it (``loss_type="simpo"``).

For a pair (y_w ≻ y_l) of the same prompt, with the length-averaged ℓ̄(y) = ℓ(y)/|y| of the policy:

    z = β·ℓ̄(y_w) − β·ℓ̄(y_l) − γ
    L = (1/P) Σ_pairs [ −(1 − ε)·log σ(z) − ε·log σ(−z) + α·(−ℓ̄(y_w)) ]

γ (``simpo_gamma``) is the target reward margin, ε (``label_smoothing``) the label noise of
conservative DPO, α (``cpo_alpha``) CPO's behaviour-cloning term on the chosen completion. The
implicit reward β·ℓ̄(y) needs no reference model: the objective is ``reference_free`` (a recipe
naming a reference is refused and none is loaded). Options are TRL's names.

Defaults: the paper's SimPO, β = 2.0, γ = 1.0 (γ/β = 0.5, the ratio its recipes use), ε = 0 and
α = 0 -- no NLL term, which is what TRL's docs ask for SimPO ("loss_type='simpo', cpo_alpha=0").
TRL's CPOConfig defaults (β = 0.1, simpo_gamma = 0.5, cpo_alpha = 1.0) are CPO's, not SimPO's.

Where this differs from TRL: with α > 0, TRL's NLL is a token mean over the chosen completions of
its micro-batch (``nn.CrossEntropyLoss``); here it is per pair, −ℓ̄(y_w) averaged over the step's
pairs, so that it has the contract's one normaliser (the number of pairs in the step). The two
coincide when every chosen completion of a micro-batch has the same length, and always at α = 0.

No bandit fixed point the lab knows: without a reference and with γ > 0 the population minimiser
over Bradley–Terry pairs is no tilt of π_ref (on a bandit, T = 1, with γ = 0 it is DPO against a
uniform reference, π ∝ exp(r/β)). Unit: pair.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from losses.base import LossBatch, Objective, sequence_logprobs


def pair_average_logprobs(batch: LossBatch, pairs: Tensor) -> tuple[Tensor, Tensor]:
    """ℓ̄(y_w) and ℓ̄(y_l) of each pair [P], the policy's length-averaged log-probs."""
    average = sequence_logprobs(batch.logprobs, batch.mask, average=True)
    return average[pairs[:, 0]], average[pairs[:, 1]]


def reward_metrics(beta: float, chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    """TRL's CPO / ORPO log names: the implicit rewards β·ℓ̄(y), their margin and accuracy, and the
    length-averaged log-probs of each side, per pair."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        "rewards/chosen": beta * chosen,
        "rewards/rejected": beta * rejected,
        "rewards/margins": beta * (chosen - rejected),
        "rewards/accuracies": (chosen > rejected).float(),
        "logps/chosen": chosen,
        "logps/rejected": rejected,
    }


class SimPO(Objective):
    name = "simpo"
    unit = "pair"
    feeds = ("offline",)
    paired = True
    preference = True
    reference_free = True
    fixed_point = None  # see the module docstring

    def __init__(
        self, beta: float = 2.0, simpo_gamma: float = 1.0, label_smoothing: float = 0.0, cpo_alpha: float = 0.0
    ):
        if not beta > 0:
            raise ValueError(f"simpo: beta must be > 0 (the reward scale), got {beta}")
        if not simpo_gamma >= 0:
            raise ValueError(f"simpo: simpo_gamma must be >= 0 (a target reward margin), got {simpo_gamma}")
        if not 0 <= label_smoothing <= 0.5:
            raise ValueError(f"simpo: label_smoothing must be in [0, 0.5], got {label_smoothing}")
        if not cpo_alpha >= 0:
            raise ValueError(f"simpo: cpo_alpha must be >= 0 (the weight of the chosen NLL), got {cpo_alpha}")
        self.beta, self.simpo_gamma = float(beta), float(simpo_gamma)
        self.label_smoothing, self.cpo_alpha = float(label_smoothing), float(cpo_alpha)

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        chosen, rejected = pair_average_logprobs(batch, self.batch_pairs(batch))
        z = self.beta * (chosen - rejected) - self.simpo_gamma
        eps = self.label_smoothing
        per_pair = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        nll = -chosen
        if self.cpo_alpha:
            per_pair = per_pair + self.cpo_alpha * nll
        return per_pair, {**reward_metrics(self.beta, chosen, rejected), "nll_loss": nll.detach()}
