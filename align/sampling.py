"""Keyed sampling: every random draw of a rollout is a pure function of (seed, step, prompt,
sample, position), through a counter-based hash, and a token is drawn by a two-level inverse CDF.

So a prompt's completions do not depend on which other prompts share its batch or process -- 2
processes produce exactly the samples 1 process does, and a resumed run the samples of an
uninterrupted one -- and any rollout engine given the same keys can be checked against another.
"""

from __future__ import annotations

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
