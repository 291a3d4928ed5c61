"""Per-token log-probabilities of completions, one batched forward for the whole batch.

Sequences are laid out as ``[left-padded prompt | right-padded completion]`` so every
completion starts at the same column P; the logits at columns P−1 … P+T−2 score the T
completion tokens. Log-probs use ``logits / temperature`` -- the distribution the samples were
drawn from -- or the policy gradient is biased (trl#4159).
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T)[tokens] without materialising the full log-softmax."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def completion_logprobs(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """[B, T] log π(y_t | x, y_<t) on completion tokens (0 on padding)."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    position = (attention.long().cumsum(-1) - 1).clamp(min=0)
    P = prompt_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position, use_cache=False).logits
    scored = logits[:, P - 1 : -1]
    return token_logprobs(scored, completion_ids, temperature) * completion_mask
