"""Per-token log-probabilities of completions, one batched forward for the whole batch.

Sequences are laid out as ``[left-padded prompt | right-padded completion]`` so every
completion starts at the same column P; the logits at columns P−1 … P+T−2 score the T
completion tokens. Log-probs use ``logits / temperature`` -- the distribution the samples were
drawn from -- or the policy gradient is biased (trl#4159).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T)[tokens] without materialising the full log-softmax."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@functools.cache
def _signature_has_logits_to_keep(forward) -> bool:
    return "logits_to_keep" in inspect.signature(forward).parameters


def _supports_logits_to_keep(model) -> bool:
    base = model
    for attr in ("module", "get_base_model"):  # DDP wrapper, then peft
        if attr == "module" and hasattr(base, "module"):
            base = base.module
        elif attr == "get_base_model" and hasattr(base, "get_base_model"):
            base = base.get_base_model()
    return _signature_has_logits_to_keep(type(base).forward)


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
    T = completion_ids.shape[1]
    # only the T positions that score completion tokens need the (vocabulary-sized) LM head:
    # with long prompts this is most of the forward's memory and much of its time
    extra = {"logits_to_keep": T + 1} if _supports_logits_to_keep(model) else {}
    logits = model(
        input_ids=input_ids, attention_mask=attention, position_ids=position, use_cache=False, **extra
    ).logits
    scored = logits[:, -(T + 1) : -1]
    return token_logprobs(scored, completion_ids, temperature) * completion_mask
