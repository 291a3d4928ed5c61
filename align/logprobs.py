"""Per-token log-probabilities of completions, one batched forward for the whole batch.

Sequences are laid out as ``[left-padded prompt | right-padded completion]`` so every
completion starts at the same column P; the hidden states at columns P−1 … P+T−2 score the T
completion tokens. Log-probs use ``logits / temperature`` -- the distribution the samples were
drawn from -- or the policy gradient is biased (trl#4159).

The vocabulary-sized LM head dominates small models' log-prob cost (a 30k × 64 head is most of a
2-layer GPT-2's compute and all of its memory traffic). Where the model allows it
(``fused_head_weight``) the head runs inside ``head_logprobs``, a fused autograd function: the
model is called (through its own ``__call__``, so DDP's gradient hooks still fire) for its last
hidden states with no logits at all; only the positions of real completion tokens go through the
head (padding is often a third of a DPO batch); the forward keeps one [N, V] buffer, the softmax,
which the backward turns into the logits' gradient in place -- no log-softmax, gather or slice
gradient buffers of [N, V]. Without gradients (the reference) the head runs in row chunks and
keeps nothing. Every other model takes the plain path (logits → ``token_logprobs``).
"""

from __future__ import annotations

import functools
import inspect
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T)[tokens] without materialising the full log-softmax."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    # cross_entropy's fused log-softmax + NLL: fewer [.., V] passes and buffers than gather − logsumexp
    return -F.cross_entropy(logits.flatten(0, -2), tokens.flatten(), reduction="none").view(tokens.shape)


_CHUNK_ELEMENTS = 1 << 24  # rows of at most 64 MiB of fp32 logits per LM-head matmul


def _chunk_rows(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // vocab)


def _head_chunk(hidden: Tensor, weight: Tensor, tokens: Tensor, temperature: float, probs: Tensor) -> Tensor:
    """Log-probs of one chunk of rows; ``probs`` ([rows, V] fp32) receives their softmax.

    Both paths (with and without gradients) run exactly this on exactly the same chunks, so one
    model's log-probs are bitwise the same either way (a LoRA policy at step 0 has KL 0 to its
    adapter-free reference, not 1e-8).
    """
    cpu = probs.device.type == "cpu"
    if cpu and weight.dtype == torch.float32:
        torch.mm(hidden, weight.t(), out=probs)  # F.linear's own kernel, straight into the buffer
    else:
        probs.copy_(F.linear(hidden, weight))  # exactly the model's lm_head, then fp32
    if temperature != 1.0:
        probs.div_(temperature)
    picked = probs.gather(-1, tokens[:, None])
    top = probs.amax(-1, keepdim=True)
    # torch's fused softmax kernel is faster than exp(x − max) alone; its largest entry,
    # exp(top − logsumexp) ≥ 1/V, gives logsumexp without underflow
    if cpu:  # in place: the kernel reads each element before it writes it
        torch._softmax(probs, -1, False, out=probs)
    else:
        probs.copy_(torch.softmax(probs, -1))
    return (picked - top + probs.amax(-1, keepdim=True).log()).squeeze(-1)


class _HeadLogprobs(torch.autograd.Function):
    """log softmax(hidden · Wᵀ / T)[tokens] for [N, H] hidden, [V, H] weight, [N] tokens."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, tokens: Tensor, temperature: float) -> Tensor:
        probs = hidden.new_empty((hidden.shape[0], weight.shape[0]), dtype=torch.float32)  # the one [N, V] buffer
        out = hidden.new_empty(tokens.shape, dtype=torch.float32)
        rows = _chunk_rows(weight.shape[0])
        for lo in range(0, hidden.shape[0], rows):
            part = slice(lo, lo + rows)
            out[part] = _head_chunk(hidden[part], weight, tokens[part], temperature, probs[part])
        ctx.save_for_backward(hidden, weight, tokens, probs)
        ctx.temperature = temperature
        ctx.spent = False
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        if ctx.spent:
            raise RuntimeError("head_logprobs: the saved buffer is reused in place; backward runs once")
        ctx.spent = True
        hidden, weight, tokens, probs = ctx.saved_tensors
        grad = grad[:, None].float() / ctx.temperature
        # d logp / d logits = onehot − softmax, formed in the softmax's buffer
        grad_logits = probs.mul_(-grad).scatter_add_(-1, tokens[:, None], grad).to(weight.dtype)
        grad_hidden = grad_logits @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.t() @ hidden if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None


def head_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """[..] log softmax(hidden · Wᵀ / T)[tokens] for [.., H] hidden and [..] tokens, LM head fused.

    With gradients: one [N, V] fp32 buffer, reused in place by the backward. Without: one buffer
    of at most 64 MiB, reused chunk after chunk, so a long reference forward holds no [N, V].
    """
    shape = tokens.shape
    hidden, tokens = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _HeadLogprobs.apply(hidden, weight, tokens, temperature).view(shape)
    with torch.no_grad():
        rows = _chunk_rows(weight.shape[0])
        buffer = hidden.new_empty((min(rows, hidden.shape[0]), weight.shape[0]), dtype=torch.float32)
        out = hidden.new_empty(tokens.shape, dtype=torch.float32)
        for lo in range(0, hidden.shape[0], rows):
            part = slice(lo, lo + rows)
            n = len(tokens[part])
            out[part] = _head_chunk(hidden[part], weight, tokens[part], temperature, buffer[:n])
        return out.view(shape)


@functools.cache
def _signature_has_logits_to_keep(forward) -> bool:
    return "logits_to_keep" in inspect.signature(forward).parameters


def _base_model(model):
    """The transformers model under a DDP wrapper and/or a peft wrapper."""
    base = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return base.get_base_model() if hasattr(base, "get_base_model") else base


def _supports_logits_to_keep(model) -> bool:
    base = model
    for attr in ("module", "get_base_model"):  # DDP wrapper, then peft
        if attr == "module" and hasattr(base, "module"):
            base = base.module
        elif attr == "get_base_model" and hasattr(base, "get_base_model"):
            base = base.get_base_model()
    return _signature_has_logits_to_keep(type(base).forward)


_FUSED_HEAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fused_head_weight(model) -> Tensor | None:
    """The LM head weight when ``head_logprobs`` on the model's last hidden state reproduces its
    logits exactly as the plain path would see them; else None (plain path).

    Decided once per model object: a plain ``nn.Linear`` head without bias (no peft layer on it,
    no quantisation), unsharded weights (no FSDP, DeepSpeed or other wrapper than DDP), a forward
    that takes ``logits_to_keep`` -- and, on a 3-token input, ``lm_head(hidden_states[-1])``
    equal to the logits, which rules out soft-capping, logit scaling and pre-norm hidden states.
    """
    try:
        decided = _FUSED_HEAD.get(model)
    except TypeError:  # not weak-referenceable
        return None
    if decided is None:
        decided = _FUSED_HEAD[model] = _check_fused_head(model)
    return _base_model(model).get_output_embeddings().weight if decided else None


def _check_fused_head(model) -> bool:
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if hasattr(inner, "module"):  # FSDP, DeepSpeed or another wrapper: weights may be sharded
        return False
    base = _base_model(model)
    if not hasattr(base, "get_output_embeddings") or not _signature_has_logits_to_keep(type(base).forward):
        return False
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return False
    weight = head.weight
    if type(weight) is not torch.nn.Parameter or weight.numel() == 0 or weight.is_meta:
        return False
    device = weight.device
    ids = torch.arange(3, device=device)[None] % weight.shape[0]
    modes = {module: module.training for module in inner.modules()}
    inner.eval()  # no dropout: the check consumes no random numbers
    try:
        with torch.no_grad():
            mask = torch.ones_like(ids)
            full = inner(input_ids=ids, attention_mask=mask, use_cache=False).logits
            out = inner(
                input_ids=ids,
                attention_mask=mask,
                use_cache=False,
                output_hidden_states=True,
                logits_to_keep=torch.empty(0, dtype=torch.long, device=device),
            )
            hidden = out.hidden_states[-1] if out.hidden_states else None
            if hidden is None or out.logits.shape[1] != 0 or hidden.shape[:2] != full.shape[:2]:
                return False
            mine = F.linear(hidden, weight).float()
            return bool(torch.allclose(mine, full.float(), rtol=1e-4, atol=1e-4))
    except Exception:  # any model this path does not fit: the plain path
        return False
    finally:
        for module, training in modes.items():
            module.training = training


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
    inputs = dict(input_ids=input_ids, attention_mask=attention, position_ids=position, use_cache=False)
    weight = fused_head_weight(model)
    if weight is not None:
        out = model(
            **inputs,
            output_hidden_states=True,
            logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device),  # no logits at all
        )
        hidden = out.hidden_states[-1][:, -(T + 1) : -1]
        real = completion_mask.bool()
        if bool(real.all()):
            return head_logprobs(hidden, weight, completion_ids, temperature)
        # padding positions never reach the head: with ragged completions (DPO pairs, early
        # EOS) that is a third or more of its matmuls
        logprobs = hidden.new_zeros(completion_ids.shape, dtype=torch.float32)
        logprobs[real] = head_logprobs(hidden[real], weight, completion_ids[real], temperature)
        return logprobs
    # only the T positions that score completion tokens need the (vocabulary-sized) LM head:
    # with long prompts this is most of the forward's memory and much of its time
    extra = {"logits_to_keep": T + 1} if _supports_logits_to_keep(model) else {}
    logits = model(**inputs, **extra).logits
    scored = logits[:, -(T + 1) : -1]
    return token_logprobs(scored, completion_ids, temperature) * completion_mask
