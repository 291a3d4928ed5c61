"""The ``native`` rollout engine: a keyed decode loop on the training weights themselves.

Why a loop of our own rather than ``model.generate``: (1) each prompt is encoded once and its
KV cache repeated for its k samples; (2) sampling is keyed by (seed, step, prompt, sample,
position) (align/sampling.py), so a prompt's completions do not depend on which other prompts
share its batch or process -- 2 processes produce exactly the samples 1 process does, and a
resumed run the samples of an uninterrupted one; (3) no per-step logits-processor machinery on
the hot path; (4) where the model's LM head can be split off (``fused_head_weight``) the model
returns only hidden states and the head runs on the last position with its weight packed once
per rollout (``DecodeHead``); (5) a token is drawn by a two-level inverse CDF
(``inverse_cdf_sample``), not a cumulative sum over the whole vocabulary.
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import torch
from torch import Tensor

from align import data as data_lib
from align.decode import decode_step_for
from align.distributed import gathered_for_generation
from align.logprobs import DecodeHead, fused_head_weight, softmax_
from align.rollout import Rollout, SamplingSettings, concat_rollouts
from align.sampling import filter_logits, inverse_cdf_sample, uniforms


class NativeEngine:
    """Rollouts from the policy being trained (whole weights gathered once per rollout under
    FSDP2 / ZeRO-3). ``keep_probs``: keep each step's softmax for the training forward of the same
    weights (``Rollout.probs``; only when the rollout is one generate call)."""

    def __init__(self, model, tokenizer, accelerator, keep_probs: bool = False):
        self.model, self.tokenizer, self.accelerator, self.keep_probs = model, tokenizer, accelerator, keep_probs

    def generate(
        self, prompts: list[list[int]], keys: Tensor, k: int, sampling: SamplingSettings, policy_version: int
    ) -> Rollout:
        chunk = sampling.prompts_per_call or len(prompts)
        device = self.accelerator.device
        parts = []
        with gathered_for_generation(self.model, self.accelerator) as policy:  # whole weights once per rollout
            for lo in range(0, len(prompts), chunk):
                ids, mask = data_lib.pad(prompts[lo : lo + chunk], sampling.pad_token_id, "left", device)
                part_keys = keys[lo * k : (lo + chunk) * k]
                parts.append(generate(policy, ids, mask, part_keys, k=k, sampling=sampling, keep_probs=self.keep_probs))
        rollout = concat_rollouts(parts, sampling.pad_token_id)
        return replace(decode_completions(rollout, self.tokenizer, sampling), policy_version=policy_version)


@torch.no_grad()
def generate(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    keys: Tensor,
    *,
    k: int,
    sampling: SamplingSettings,
    keep_probs: bool = False,
) -> Rollout:
    """Sample k completions for each of N left-padded prompts; ``keys`` from ``sample_keys``.
    Texts are not decoded here (``decode_completions``).

    ``keep_probs``: keep each step's softmax in ``Rollout.probs`` (one [T, N·k, V] fp32 buffer) for
    the training forward of the same weights, which then skips its LM head. The samples are the
    same bits either way.
    """
    device, steps = prompt_ids.device, sampling.max_new_tokens
    eos = torch.tensor(sampling.eos_token_ids, device=device, dtype=torch.long)
    # inference mode skips autograd's view and version bookkeeping on each of the decode steps'
    # small ops (7-9 % of a rollout here); the outputs are re-made outside it as normal tensors
    with torch.inference_mode():
        decoder = _Decoder(model, prompt_ids.shape[0] * k, device)
        logits = decoder.prefill(prompt_ids, prompt_mask, k, steps)
        finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
        # all positions' uniforms at once (a score of small integer ops per step fewer), float32 like the cdf
        u_all = uniforms(keys, torch.arange(steps)).to(device=device, dtype=torch.float32)
        kept = None
        if keep_probs:  # a normal tensor: the training backward consumes it in place, outside inference mode
            with torch.inference_mode(False):
                kept = logits.new_empty((steps, logits.shape[0], logits.shape[-1]), dtype=torch.float32)
        tokens, masks, logprobs = [], [], []
        for t in range(steps):
            out = None if kept is None else kept[t]
            token, logprob = draw_token(
                logits, u_all[:, t], sampling, eos if t < sampling.min_new_tokens else None, out
            )
            token = torch.where(finished, torch.full_like(token, sampling.pad_token_id), token)
            tokens.append(token)
            masks.append(~finished)
            logprobs.append(logprob.masked_fill(finished, 0.0))
            if eos.numel():
                finished = finished | torch.isin(token, eos)
            if bool(finished.all()) or t == steps - 1:
                break
            logits = decoder.next_logits(token, t)
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(k, 0),
        prompt_mask=prompt_mask.repeat_interleave(k, 0),
        completion_ids=torch.stack(tokens, 1),
        completion_mask=torch.stack(masks, 1).long(),
        group=torch.arange(prompt_ids.shape[0], device=device).repeat_interleave(k),
        sampler_logprobs=torch.stack(logprobs, 1).clone(),
        probs=None if kept is None else kept[: len(tokens)],
    )


def draw_token(
    logits: Tensor, u: Tensor, sampling: SamplingSettings, banned: Tensor | None, kept: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One token per row from softmax(logits / temperature), filtered by top-k / top-p, with the
    ``banned`` ids (EOS before ``min_new_tokens``) given no mass; and its log-probability under the
    distribution it was drawn from. ``kept``: where the unfiltered softmax is written (else in
    place: this step's logits are ours and are not needed again)."""
    scores = logits.float()  # this step's own logits (fresh, or the model's output): ours to overwrite
    if sampling.temperature != 1.0:  # x / 1 is x: skipping it changes no bit
        scores = scores / sampling.temperature
    masked = banned is not None and banned.numel() > 0
    filtering = bool(sampling.top_k) or sampling.top_p < 1.0
    if kept is not None:
        probs = softmax_(scores, out=kept)
    elif not filtering:
        probs = softmax_(scores)
    if filtering:
        if masked:
            scores[:, banned] = float("-inf")
        dist = filter_logits(scores, sampling.top_k, sampling.top_p).softmax(-1)
        token = inverse_cdf_sample(dist, u)
        return token, dist.gather(1, token[:, None]).squeeze(1).log()
    if masked:  # EOS gets no mass; a kept softmax gets its values back
        banned_probs = probs[:, banned].clone()
        probs[:, banned] = 0.0
        token = inverse_cdf_sample(probs, u)
        logprob = probs.gather(1, token[:, None]).squeeze(1).log() - probs.sum(-1).log()
        probs[:, banned] = banned_probs
        return token, logprob
    token = inverse_cdf_sample(probs, u)
    return token, probs.gather(1, token[:, None]).squeeze(1).log()


class _Decoder:
    """The model's next-token logits: a prefill of the prompts, then one decode step per token, through
    the written-out step (align/decode.py) for GPT-2 and Llama-family models, else the model's forward."""

    def __init__(self, model, rows: int, device: torch.device):
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        # the KV-cache argument is 'cache' in transformers ≥ 5.2x, 'past_key_values' before
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        head_weight = fused_head_weight(model)
        self.head = None if head_weight is None else DecodeHead(head_weight, rows)
        if self.head is not None:  # hidden states only; the head on the last position
            self.extra = {
                "logits_to_keep": torch.empty(0, dtype=torch.long, device=device),
                "output_hidden_states": True,
            }
        else:  # only the last position's logits are needed, where the model can be told so
            self.extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _last_logits(self, out) -> Tensor:
        return out.logits[:, -1] if self.head is None else self.head(out.hidden_states[-1][:, -1])

    def prefill(self, prompt_ids: Tensor, prompt_mask: Tensor, k: int, max_new_tokens: int) -> Tensor:
        position = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
        extra = self.extra
        out = self.model(
            input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position, use_cache=True, **extra
        )
        self.cache = _cache_of(out)
        if k > 1:
            self.cache.batch_repeat_interleave(k)
        self.attention = prompt_mask.repeat_interleave(k, 0)
        self.next_position = self.attention.long().sum(-1)
        self.prompt_len = self.attention.shape[1]
        fast = self.head is not None
        self.fast = decode_step_for(self.model, self.cache, self.attention, max_new_tokens) if fast else None
        return self._last_logits(out).repeat_interleave(k, 0)

    def next_logits(self, token: Tensor, t: int) -> Tensor:
        """Logits after ``token``, the ``t``-th generated one."""
        if self.fast is not None:
            logits = self.head(self.fast.step(token, self.next_position, self.prompt_len + t))
        else:
            self.attention = torch.cat([self.attention, torch.ones_like(self.attention[:, :1])], dim=1)
            out = self.model(
                input_ids=token[:, None],
                attention_mask=self.attention,
                position_ids=self.next_position[:, None],
                use_cache=True,
                **{self.cache_arg: self.cache},
                **self.extra,
            )
            self.cache = _cache_of(out)
            logits = self._last_logits(out)
        self.next_position = self.next_position + 1
        return logits


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def decode_completions(rollout: Rollout, tokenizer, sampling: SamplingSettings) -> Rollout:
    """The rollout with its texts, each completion cut after the token that completes its first
    stop string (ids padded, mask and log-probs zeroed after it). Only rows whose decoded text
    contains a stop string pay for the prefix search."""
    ids, mask = rollout.completion_ids.clone(), rollout.completion_mask.clone()
    lengths = mask.sum(-1).tolist()
    rows = [ids[i, : lengths[i]].tolist() for i in range(ids.shape[0])]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    for i, text in enumerate(texts):
        hits = [text.find(s) + len(s) for s in sampling.stop_strings if s in text]
        if not hits:
            continue
        end, lo, hi = min(hits), 1, lengths[i]
        while lo < hi:  # shortest token prefix whose text reaches the stop string's end
            mid = (lo + hi) // 2
            if len(tokenizer.decode(rows[i][:mid], skip_special_tokens=True)) >= end:
                hi = mid
            else:
                lo = mid + 1
        mask[i, lo:] = 0
        ids[i, lo:] = sampling.pad_token_id
        texts[i] = tokenizer.decode(rows[i][:lo], skip_special_tokens=True)
    logprobs = rollout.sampler_logprobs
    logprobs = None if logprobs is None else logprobs * mask.to(logprobs.dtype)
    return replace(rollout, completion_ids=ids, completion_mask=mask, sampler_logprobs=logprobs, texts=tuple(texts))
