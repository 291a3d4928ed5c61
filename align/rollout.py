"""Rollout: k completions per prompt with a KV cache, left-padded prompts, EOS and stop strings.

Why a loop of our own rather than ``model.generate``: (1) each prompt is encoded once and its
KV cache repeated for its k samples; (2) sampling is keyed by (seed, step, prompt, sample,
position) through a counter-based hash and inverse-CDF sampling, so a prompt's completions do
not depend on which other prompts share its batch or process -- 2 processes produce exactly
the samples 1 process does, and a resumed run the samples of an uninterrupted one; (3) no
per-step logits-processor machinery on the hot path.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x·c) mod 2³² for x < 2³² held in int64, without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    return (((hi * c) & 0xFFFF) << 16) + lo * c & _M32


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's finaliser: a bijective avalanche mix of 32-bit integers."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def sample_keys(seed: int, step: int, prompt_ids: Tensor, k: int) -> Tensor:
    """One 32-bit key per (prompt, sample): [N·k]. ``prompt_ids`` are global dataset indices."""
    base = _fmix32(torch.tensor([(seed * 1_000_003 + step) & _M32], dtype=torch.long))
    per_prompt = _fmix32((_mul32(prompt_ids.long() & _M32, 0x9E3779B1) ^ base) & _M32)
    sample = torch.arange(k, dtype=torch.long)
    return _fmix32((per_prompt[:, None] + _mul32(sample + 1, 0x27D4EB2D)) & _M32).reshape(-1)


def uniforms(keys: Tensor, position: int | Tensor) -> Tensor:
    """A uniform in (0, 1) per key for this position, float64: [K] for an int position, [K, n]
    for a tensor of n positions (the same values, elementwise integer arithmetic)."""
    if isinstance(position, Tensor):
        keys, position = keys[:, None], position.to(keys)[None, :]
    else:
        position = torch.full_like(keys, position)
    h = _fmix32((keys ^ _mul32(position + 1, 0x165667B1)) & _M32)
    h = _fmix32((h + keys) & _M32)
    return (h.double() + 0.5) / 2**32


def filter_logits(scores: Tensor, top_k: int, top_p: float) -> Tensor:
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the first always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def _forward_kwargs(model) -> tuple[str, bool]:
    """The KV-cache argument's name ('cache' in transformers ≥ 5.2x, 'past_key_values' before)
    and whether ``logits_to_keep`` is supported (only the last position's logits are needed)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@dataclass
class Rollout:
    prompt_ids: Tensor  # [N·k, P] left-padded, each prompt repeated k times
    prompt_mask: Tensor  # [N·k, P]
    completion_ids: Tensor  # [N·k, T] right-padded with pad_id
    completion_mask: Tensor  # [N·k, T] 1 on generated tokens up to and including EOS / stop string


@torch.no_grad()
def generate(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    keys: Tensor,
    *,
    k: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
) -> Rollout:
    """Sample k completions for each of N left-padded prompts; ``keys`` from ``sample_keys``."""
    device = prompt_ids.device
    eos = torch.tensor(
        [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
        device=device,
        dtype=torch.long,
    )
    cache_arg, last_only = _forward_kwargs(model)
    extra = {"logits_to_keep": 1} if last_only else {}
    position = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position, use_cache=True, **extra)
    cache = _cache_of(out)
    if k > 1:
        cache.batch_repeat_interleave(k)
    logits = out.logits[:, -1].repeat_interleave(k, 0)
    attention = prompt_mask.repeat_interleave(k, 0)
    next_position = attention.long().sum(-1)
    rows = attention.shape[0]
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    # all positions' uniforms at once (a score of small integer ops per step fewer), float32 like the cdf
    u_all = uniforms(keys, torch.arange(max_new_tokens)).to(device=device, dtype=torch.float32)
    tokens, masks = [], []
    for t in range(max_new_tokens):
        scores = logits.float()  # a fresh copy, or this step's model output: ours to change in place
        if temperature != 1.0:  # x / 1 is x: skipping it changes no bit
            scores = scores / temperature
        if t < min_new_tokens and eos.numel():
            scores[:, eos] = float("-inf")
        scores = filter_logits(scores, top_k, top_p)
        cdf = scores.softmax(-1).cumsum(-1)
        u = u_all[:, t : t + 1] * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        masks.append(~finished)
        if eos.numel():
            finished = finished | torch.isin(token, eos)
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=attention,
            position_ids=next_position[:, None],
            use_cache=True,
            **{cache_arg: cache},
        )
        cache = _cache_of(out)
        logits = out.logits[:, -1]
        next_position = next_position + 1
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(k, 0),
        prompt_mask=prompt_mask.repeat_interleave(k, 0),
        completion_ids=torch.stack(tokens, 1),
        completion_mask=torch.stack(masks, 1).long(),
    )


def generate_with(model, prompt_ids: Tensor, prompt_mask: Tensor, keys: Tensor, k: int, gen, models) -> Rollout:
    """``generate`` with a recipe's ``generation`` section and the loaded models' EOS and padding ids."""
    return generate(
        model,
        prompt_ids,
        prompt_mask,
        keys,
        k=k,
        max_new_tokens=gen.max_new_tokens,
        min_new_tokens=gen.min_new_tokens,
        temperature=gen.temperature,
        top_k=gen.top_k,
        top_p=gen.top_p,
        eos_token_id=models.eos_token_id,
        pad_token_id=models.pad_token_id,
    )


def decode_completions(rollout: Rollout, tokenizer, stop_strings: list[str], pad_token_id: int) -> list[str]:
    """Decode completions, cutting each after the token that completes its first stop string.

    Only rows whose decoded text contains a stop string pay for the prefix search.
    """
    ids, mask = rollout.completion_ids, rollout.completion_mask
    lengths = mask.sum(-1).tolist()
    rows = [ids[i, : lengths[i]].tolist() for i in range(ids.shape[0])]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    if not stop_strings:
        return texts
    for i, text in enumerate(texts):
        hits = [text.find(s) + len(s) for s in stop_strings if s in text]
        if not hits:
            continue
        end = min(hits)
        lo, hi = 1, lengths[i]
        while lo < hi:  # shortest token prefix whose text reaches the stop string's end
            mid = (lo + hi) // 2
            if len(tokenizer.decode(rows[i][:mid], skip_special_tokens=True)) >= end:
                hi = mid
            else:
                lo = mid + 1
        mask[i, lo:] = 0
        ids[i, lo:] = pad_token_id
        texts[i] = tokenizer.decode(rows[i][:lo], skip_special_tokens=True)
    return texts
