"""ORPO: Monolithic Preference Optimization without Reference Model (Hong et al. 2024,
arXiv 2403.07691), as TRL's ORPOTrainer runs it.

For a pair (y_w ≻ y_l) of the same prompt, with the policy's length-averaged ℓ̄(y) = ℓ(y)/|y|
(so p(y) = exp ℓ̄(y), the paper's length-normalised likelihood, Eq. 4):

    log odds(y) = log(p/(1 − p)) = ℓ̄(y) − log(1 − exp ℓ̄(y))
    L = (1/P) Σ_pairs [ −ℓ̄(y_w) − λ·log σ(log odds(y_w) − log odds(y_l)) ]

the supervised term L_SFT (Eq. 2: the chosen completion's NLL, averaged over its tokens) plus λ
times the odds-ratio term L_OR (Eq. 7). λ is TRL ORPOConfig's ``beta`` (default 0.1, as TRL's).
log(1 − exp x) is computed as TRL's ``log1mexp``. No reference model: the objective is
``reference_free`` (a recipe naming one is refused and none is loaded).

Where this differs from TRL: TRL's NLL is ``nn.CrossEntropyLoss`` over the chosen half of its
micro-batch -- a token mean over every token of the chosen sequences, PROMPT tokens included
("orpo chosen nll loss is computed over the full prompt and response"). An objective sees only
completion tokens, and the contract wants one normaliser (the number of pairs in the step,
whatever the micro-batching), so L_SFT here is the paper's per-pair form: each pair's chosen
completion NLL averaged over its tokens, then averaged over pairs. The two coincide on a batch
whose prompts are one token (the first token is never predicted) and whose chosen completions all
have the same length; in general TRL's NLL also trains the prompt and weighs long chosen
completions more. The odds-ratio term is TRL's exactly.

No bandit fixed point the lab knows (no reference, an NLL on the chosen arm and the odds of a
probability, not of a log-ratio). Unit: pair.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from losses.base import LossBatch, Objective
from losses.simpo import pair_average_logprobs, reward_metrics

_LOG_HALF = -math.log(2.0)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp x) for x ≤ 0, without cancellation (the branch at −log 2, as TRL's)."""
    return torch.where(x < _LOG_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ORPO(Objective):
    name = "orpo"
    unit = "pair"
    feeds = ("offline",)
    paired = True
    preference = True
    reference_free = True
    fixed_point = None  # see the module docstring

    def __init__(self, beta: float = 0.1):
        if not beta > 0:
            raise ValueError(f"orpo: beta must be > 0 (λ, the weight of the odds-ratio term), got {beta}")
        self.beta = float(beta)

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        chosen, rejected = pair_average_logprobs(batch, self.batch_pairs(batch))
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        nll = -chosen
        return nll - self.beta * ratio, {
            **reward_metrics(self.beta, chosen, rejected),
            "nll_loss": nll.detach(),
            "log_odds_ratio": ratio.detach(),  # TRL's names: mean log σ(log-odds ratio), mean log-odds ratio
            "log_odds_chosen": log_odds.detach(),
        }
