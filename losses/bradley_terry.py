"""Bradley–Terry: the reward-model loss on preference pairs (the `align rm` job, the over-optimization
study's proxy).

    P(y_w ≻ y_l) = σ(r(y_w) − r(y_l)),    L = −(1/P) Σ_pairs log σ(r(y_w) − r(y_l))

Not a policy objective: it trains a scalar scorer r, so it is a plain function of the scores.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """−mean log σ(r_w − r_l) over a batch of pairs (both [P])."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()
