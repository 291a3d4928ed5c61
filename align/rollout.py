"""The rollout seam: what a rollout engine returns (``Rollout``), what it is asked for
(``SamplingSettings``, keys, k) and the one interface every engine implements (``RolloutEngine``).

The trainer asks an engine for k completions of each of its prompts and gets back token ids,
masks, texts, each sample's group (its prompt) and the sampler's own per-token log-probs; nothing
below the trainer knows which engine made a rollout. Today's engine is ``native``
(align/native_engine.py: a keyed decode loop on the training weights). A serving engine (vLLM,
colocated or a server beside training) plugs in here: it receives the same prompt token ids,
keys and settings, reports the ``policy_version`` whose weights sampled (a generator running
ahead of training samples with older weights), and returns its log-probs so the trainer can
measure or correct the mismatch between sampler and trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled, resolved from the recipe's ``generation`` section and the tokenizer."""

    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    prompts_per_call: int | None = None  # prompts per generate call (None: all at once)


@dataclass(frozen=True)
class Rollout:
    """k completions for each of N prompts, prompt-major (prompt i's samples at rows i·k … i·k+k−1)."""

    prompt_ids: Tensor  # [N·k, P] left-padded, each prompt repeated k times
    prompt_mask: Tensor  # [N·k, P]
    completion_ids: Tensor  # [N·k, T] right-padded with the pad id
    completion_mask: Tensor  # [N·k, T] 1 on generated tokens up to and including EOS / a stop string
    group: Tensor  # [N·k] the index of each row's prompt in the request
    # [N·k, T] log-probability of each sampled token under the distribution the sampler drew it
    # from (softmax(logits / temperature), after any filter); 0 past the completion
    sampler_logprobs: Tensor | None = None
    texts: tuple[str, ...] = ()  # decoded completions, cut after their first stop string
    policy_version: int = 0  # the training step whose weights sampled
    # [T, N·k, V] fp32 softmax(logits / temperature) of every step: the native engine keeps it on
    # request for the training forward of the same weights, which then skips its LM head
    probs: Tensor | None = None


def sampling_settings(generation, eos_token_id: int | list[int] | None, pad_token_id: int) -> SamplingSettings:
    """A recipe's ``generation`` section with the tokenizer's EOS and padding ids."""
    eos = () if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    return SamplingSettings(
        max_new_tokens=generation.max_new_tokens,
        min_new_tokens=generation.min_new_tokens,
        temperature=generation.temperature,
        top_k=generation.top_k,
        top_p=generation.top_p,
        stop_strings=tuple(generation.stop_strings),
        eos_token_ids=eos,
        pad_token_id=pad_token_id,
        prompts_per_call=generation.batch_size,
    )


class EngineUnavailable(RuntimeError):
    """The rollout engine stopped answering (a vLLM server that died): the trainer saves a
    checkpoint and stops with this message, on every process together."""


class RolloutEngine(Protocol):
    """Anything that turns prompts into sampled completions."""

    def generate(
        self, prompts: list[list[int]], keys: Tensor, k: int, sampling: SamplingSettings, policy_version: int
    ) -> Rollout:
        """k completions for each prompt (token ids, no padding); ``keys``: one per (prompt,
        sample), from ``align.sampling.sample_keys``."""
        ...


def trim_left(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Left-padded rows re-padded as short as they can be."""
    keep = int(mask.sum(-1).max())
    return ids[:, ids.shape[1] - keep :], mask[:, mask.shape[1] - keep :]


def pad_to(x: Tensor, width: int, value: float = 0, left: bool = False) -> Tensor:
    """[B, T] padded on the right (or left) to ``width`` columns."""
    return torch.nn.functional.pad(x, (width - x.shape[1], 0) if left else (0, width - x.shape[1]), value=value)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts stacked row-wise: prompts re-padded on the left, completions on the right."""
    if len(parts) == 1:
        return parts[0]
    P = max(p.prompt_ids.shape[1] for p in parts)
    T = max(p.completion_ids.shape[1] for p in parts)
    logprobs = [p.sampler_logprobs for p in parts]
    return Rollout(
        prompt_ids=torch.cat([pad_to(p.prompt_ids, P, pad_id, left=True) for p in parts]),
        prompt_mask=torch.cat([pad_to(p.prompt_mask, P, 0, left=True) for p in parts]),
        completion_ids=torch.cat([pad_to(p.completion_ids, T, pad_id) for p in parts]),
        completion_mask=torch.cat([pad_to(p.completion_mask, T, 0) for p in parts]),
        group=torch.cat([p.group + offset for p, offset in zip(parts, _offsets(parts))]),
        sampler_logprobs=None if None in logprobs else torch.cat([pad_to(x, T) for x in logprobs]),
        texts=tuple(t for p in parts for t in p.texts),
        policy_version=parts[0].policy_version,
    )


def _offsets(parts: list[Rollout]) -> list[int]:
    """Each part's first group id in the concatenation."""
    out, start = [], 0
    for part in parts:
        out.append(start)
        start += int(part.group.max()) + 1 if part.group.numel() else 0
    return out
