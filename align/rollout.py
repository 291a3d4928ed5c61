"""Rollout: k completions per prompt with a KV cache, left-padded prompts, EOS and stop strings.

Why a loop of our own rather than ``model.generate``: (1) each prompt is encoded once and its
KV cache repeated for its k samples; (2) sampling is keyed by (seed, step, prompt, sample,
position) through a counter-based hash and inverse-CDF sampling, so a prompt's completions do
not depend on which other prompts share its batch or process -- 2 processes produce exactly
the samples 1 process does, and a resumed run the samples of an uninterrupted one; (3) no
per-step logits-processor machinery on the hot path; (4) where the model's LM head can be split
off (``fused_head_weight``) the model returns only hidden states and the head runs on the last
position with its weight packed once per rollout (``DecodeHead``); (5) a token is drawn by a
two-level inverse CDF (``inverse_cdf_sample``), not a cumulative sum over the whole vocabulary.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

from align.decode import decode_step_for
from align.logprobs import DecodeHead, fused_head_weight, softmax_

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


_BLOCK = 256


def inverse_cdf_sample(probs: Tensor, u: Tensor) -> Tensor:
    """Per row, the token where the cumulative mass first exceeds u · total: [R] from [R, V]
    non-negative (not necessarily normalised) weights with a positive total and [R] uniforms in (0, 1).

    Two levels -- block sums of 256 tokens, the block by a search over their cumulative sums, then
    the token by a cumulative sum inside that one block -- so each draw runs one pass over [R, V]
    (the block sums) instead of a full cumulative sum. Zero-weight tokens are never drawn, and
    nothing here waits on the device.
    """
    rows, vocab = probs.shape
    n_full = vocab // _BLOCK
    sums = [probs[:, : n_full * _BLOCK].reshape(rows, n_full, _BLOCK).sum(-1)]  # a view: no padded copy
    if vocab % _BLOCK:
        sums.append(probs[:, n_full * _BLOCK :].sum(-1, keepdim=True))
    block_cdf = (torch.cat(sums, 1) if len(sums) > 1 else sums[0]).cumsum(-1)  # [R, B]
    # strictly below the total (u < 1, but u · total may round up to it): right=True then lands on a
    # block with mass, and inside it on a token with weight -- it skips flat stretches of the cdf
    target = _below(u.to(block_cdf.dtype)[:, None] * block_cdf[:, -1:], block_cdf[:, -1:])
    block = torch.searchsorted(block_cdf, target, right=True)  # [R, 1]
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(target))
    index = block * _BLOCK + torch.arange(_BLOCK, device=probs.device)  # [R, 256]
    inner = probs.gather(1, index.clamp(max=vocab - 1)).masked_fill_(index >= vocab, 0.0).cumsum(-1)
    # the block's own sum may round below its share of the block cdf: stay inside the block
    offset = torch.searchsorted(inner, _below(target - before, inner[:, -1:]), right=True)
    return (block * _BLOCK + offset).squeeze(1)


def _below(x: Tensor, limit: Tensor) -> Tensor:
    """x, or the largest float below ``limit`` where x would reach it."""
    return torch.minimum(x, torch.nextafter(limit, torch.zeros_like(limit)))


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
    # [T, N·k, V] fp32 softmax(logits / temperature) of every step, before EOS masking or top-k/top-p
    # (the model's distribution, the one log-probs are taken under); only with keep_probs=True
    probs: Tensor | None = None


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
    keep_probs: bool = False,
) -> Rollout:
    """Sample k completions for each of N left-padded prompts; ``keys`` from ``sample_keys``.

    ``keep_probs``: keep each step's softmax in ``Rollout.probs`` (one [T, N·k, V] fp32 buffer) for
    the training forward of the same weights, which then skips its LM head. The samples are the
    same bits either way.
    """
    device = prompt_ids.device
    eos = torch.tensor(
        [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
        device=device,
        dtype=torch.long,
    )
    cache_arg, last_only = _forward_kwargs(model)
    head_weight = fused_head_weight(model)
    # inference mode skips autograd's view and version bookkeeping on each of the decode steps'
    # small ops (7-9 % of a rollout here); the outputs are re-made outside it as normal tensors
    with torch.inference_mode():
        rows = prompt_ids.shape[0] * k
        if head_weight is not None:  # hidden states only; the head on the last position, below
            head = DecodeHead(head_weight, rows)
            extra = {"logits_to_keep": torch.empty(0, dtype=torch.long, device=device), "output_hidden_states": True}

            def last_logits(out) -> Tensor:
                return head(out.hidden_states[-1][:, -1])
        else:
            extra = {"logits_to_keep": 1} if last_only else {}

            def last_logits(out) -> Tensor:
                return out.logits[:, -1]

        position = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position, use_cache=True, **extra)
        cache = _cache_of(out)
        if k > 1:
            cache.batch_repeat_interleave(k)
        logits = last_logits(out).repeat_interleave(k, 0)
        attention = prompt_mask.repeat_interleave(k, 0)
        next_position = attention.long().sum(-1)
        # GPT-2 and Llama-family models decode through the written-out step (align/decode.py)
        fast = None if head_weight is None else decode_step_for(model, cache, attention, max_new_tokens)
        prompt_len = attention.shape[1]
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        # all positions' uniforms at once (a score of small integer ops per step fewer), float32 like the cdf
        u_all = uniforms(keys, torch.arange(max_new_tokens)).to(device=device, dtype=torch.float32)
        kept = None
        if keep_probs:  # a normal tensor: the training backward consumes it in place, outside inference mode
            with torch.inference_mode(False):
                kept = logits.new_empty((max_new_tokens, rows, logits.shape[-1]), dtype=torch.float32)
        filtering = bool(top_k) or top_p < 1.0
        tokens, masks = [], []
        for t in range(max_new_tokens):
            scores = logits.float()  # this step's own logits (fresh, or the model's output): ours to overwrite
            if temperature != 1.0:  # x / 1 is x: skipping it changes no bit
                scores = scores / temperature
            masked = t < min_new_tokens and eos.numel() > 0
            if kept is not None:
                probs = softmax_(scores, out=kept[t])
            elif not filtering:
                probs = softmax_(scores)  # in place: this step's logits are not needed again
            if filtering:
                if masked:
                    scores[:, eos] = float("-inf")
                token = inverse_cdf_sample(filter_logits(scores, top_k, top_p).softmax(-1), u_all[:, t])
            elif masked:  # EOS gets no mass; the kept softmax gets its values back
                eos_probs = probs[:, eos].clone()
                probs[:, eos] = 0.0
                token = inverse_cdf_sample(probs, u_all[:, t])
                probs[:, eos] = eos_probs
            else:
                token = inverse_cdf_sample(probs, u_all[:, t])
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            tokens.append(token)
            masks.append(~finished)
            if eos.numel():
                finished = finished | torch.isin(token, eos)
            if bool(finished.all()) or t == max_new_tokens - 1:
                break
            if fast is not None:
                logits = head(fast.step(token, next_position, prompt_len + t))
                next_position = next_position + 1
                continue
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            out = model(
                input_ids=token[:, None],
                attention_mask=attention,
                position_ids=next_position[:, None],
                use_cache=True,
                **{cache_arg: cache},
                **extra,
            )
            cache = _cache_of(out)
            logits = last_logits(out)
            next_position = next_position + 1
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(k, 0),
        prompt_mask=prompt_mask.repeat_interleave(k, 0),
        completion_ids=torch.stack(tokens, 1),
        completion_mask=torch.stack(masks, 1).long(),
        probs=None if kept is None else kept[: len(tokens)],
    )


def generate_with(
    model, prompt_ids: Tensor, prompt_mask: Tensor, keys: Tensor, k: int, gen, models, keep_probs: bool = False
) -> Rollout:
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
        keep_probs=keep_probs,
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
