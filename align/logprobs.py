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
which the backward turns into softmax − onehot in place by one write per row (the logits'
gradient up to a row factor, applied on the [N, H] sides of its two matmuls) -- no log-softmax,
gather or slice gradient buffers of [N, V], and no pass over the buffer. Without gradients (the
reference) the head runs in row chunks and keeps nothing. Every other model takes the plain path
(logits → ``token_logprobs``).

On CPU the few-row matmuls of decoding go through oneDNN with the weight packed once per rollout
(``DecodeHead``): 2–3× faster than MKL's sgemm on AMD EPYC, 1.1× on Intel Xeon. The head's large
matmuls (``linear``) take oneDNN off Intel -- MKL is Intel's own library and takes slower paths
on AMD, where oneDNN is 1.3–1.5× faster on the head's shapes -- and on Intel only for narrow
outputs: on an AVX-512 Xeon MKL is 10–13 % faster on the head's forward and 8–23 % on the
hidden-state gradient of a 256-wide model, oneDNN 30 % faster on that gradient 64 wide
(``benchmarks/README.md``). ``ALIGN_ONEDNN=1`` / ``0`` forces either way.
"""

from __future__ import annotations

import functools
import inspect
import os
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


@functools.cache
def _onednn_linear_available() -> bool:
    """oneDNN's fp32 linear (the op torch.compile's CPU backend emits) is present and agrees with
    ``F.linear``; off with ALIGN_ONEDNN=0. Probed once per process, on a tiny input."""
    if os.environ.get("ALIGN_ONEDNN", "1") == "0":
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        generator = torch.Generator().manual_seed(0)
        x, w = torch.randn(5, 8, generator=generator), torch.randn(7, 8, generator=generator)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 5)
        expected = F.linear(x, w)
        return all(
            torch.allclose(torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], ""), expected, atol=1e-5)
            for weight in (w, w.t().contiguous().t(), packed)
        )
    except Exception:  # a build without oneDNN, or an op that changed: the plain matmul
        return False


@functools.cache
def _intel_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:  # not Linux
        return False


_NARROW = 128  # output features below which oneDNN beats MKL on Intel too


def _onednn_for(out_features: int) -> bool:
    """oneDNN for one of ``linear``'s matmuls: forced by ALIGN_ONEDNN=1, else off Intel CPUs or
    for narrow outputs (the hidden-state gradient of a small model)."""
    return os.environ.get("ALIGN_ONEDNN") == "1" or not _intel_cpu() or out_features < _NARROW


def _onednn(x: Tensor, weight: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))  # the op has no autograd
        and _onednn_linear_available()
    )


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x · weightᵀ as a fresh fp32 tensor ([N, H] x, [V, H] weight, either may be a strided view)."""
    if _onednn(x, weight) and _onednn_for(weight.shape[0]):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, None, "none", [], "")
    return F.linear(x, weight).float()


class DecodeHead:
    """The LM head for a rollout's decode steps: logits of the last position only, the weight
    packed once in oneDNN's blocked layout for ``rows``-row inputs (the weight does not change
    during a rollout; packing costs about one matmul and holds one copy of the head)."""

    def __init__(self, weight: Tensor, rows: int):
        self.weight = weight.detach()
        self.packed = None
        if _onednn(self.weight[:1], self.weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows)

    def __call__(self, hidden: Tensor) -> Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(hidden.contiguous(), self.packed, None, "none", [], "")
        return linear(hidden, self.weight)


_CHUNK_ELEMENTS = 1 << 24  # rows of at most 64 MiB of fp32 logits per LM-head matmul


def _chunk_rows(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // vocab)


def _head_chunk(hidden: Tensor, weight: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Log-probs of one chunk of rows, and their softmax ([rows, V] fp32, a fresh tensor).

    Both paths (with and without gradients) run exactly this on exactly the same chunks, so one
    model's log-probs are bitwise the same either way (a LoRA policy at step 0 has KL 0 to its
    adapter-free reference, not 1e-8).
    """
    probs = linear(hidden, weight.detach())  # exactly the model's lm_head, in fp32
    if temperature != 1.0:
        probs.div_(temperature)
    probs = softmax_(probs)
    return _picked_logprobs(hidden, weight, tokens, temperature, probs), probs


def softmax_(logits: Tensor, out: Tensor | None = None) -> Tensor:
    """softmax over the last dimension into ``out`` (default: in place, ``logits`` itself)."""
    out = logits if out is None else out
    if logits.device.type == "cpu":  # torch's fused kernel reads each element before it writes it
        torch._softmax(logits, -1, False, out=out)
    else:
        out.copy_(torch.softmax(logits, -1))
    return out


def _picked_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, temperature: float, probs: Tensor) -> Tensor:
    """log probs[tokens]; exact to a few ulps while the probability is a normal float, and a token
    of probability below 1e-30 (the reference on unlikely offline text) is redone from its row's
    logits in log space."""
    picked = probs.gather(-1, tokens[:, None]).squeeze(-1)
    logprobs = picked.log()
    far = (picked < _SMALLEST_EXACT).nonzero().flatten()
    if len(far):
        logits = linear(hidden[far].detach(), weight.detach()) / temperature
        logprobs[far] = logits.gather(-1, tokens[far, None]).squeeze(-1) - logits.logsumexp(-1)
    return logprobs


_SMALLEST_EXACT = 1e-30


class _HeadLogprobs(torch.autograd.Function):
    """log softmax(hidden · Wᵀ / T)[tokens] for [N, H] hidden, [V, H] weight, [N] tokens."""

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, tokens: Tensor, temperature: float, probs: Tensor | None
    ) -> Tensor:
        rows = _chunk_rows(weight.shape[0])
        if probs is not None:  # the sampler's softmax of these very logits: no head forward at all
            out = _picked_logprobs(hidden, weight, tokens, temperature, probs)
        elif hidden.shape[0] <= rows:  # one chunk: its softmax is the one [N, V] buffer
            out, probs = _head_chunk(hidden, weight, tokens, temperature)
        else:
            probs = hidden.new_empty((hidden.shape[0], weight.shape[0]), dtype=torch.float32)
            out = hidden.new_empty(tokens.shape, dtype=torch.float32)
            for lo in range(0, hidden.shape[0], rows):
                part = slice(lo, lo + rows)
                out[part], probs[part] = _head_chunk(hidden[part], weight, tokens[part], temperature)
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
        # d loss / d logits = g·(onehot − softmax) = (softmax − onehot)·(−g): the difference is formed in
        # the softmax's buffer by one write per row (p_y − 1, exact), and the row factor −g is applied
        # on the [N, H] sides of the two matmuls -- not a multiply over all [N, V] of the buffer
        factor = (grad.float() / -ctx.temperature)[:, None].to(weight.dtype)
        minus_one = probs.new_full((probs.shape[0], 1), -1.0)
        diff = probs.scatter_add_(-1, tokens[:, None], minus_one).to(weight.dtype)
        grad_hidden = linear(diff, weight.detach().t()).mul_(factor) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # as ((−g·h)ᵀ · diff)ᵀ: the [H, V] product is the faster layout for the BLAS than diffᵀ · h
            grad_weight = torch.mm((hidden * factor).t(), diff).t()
        return grad_hidden, grad_weight, None, None, None


def head_logprobs(
    hidden: Tensor, weight: Tensor, tokens: Tensor, temperature: float = 1.0, probs: Tensor | None = None
) -> Tensor:
    """[..] log softmax(hidden · Wᵀ / T)[tokens] for [.., H] hidden and [..] tokens, LM head fused.

    With gradients: one [N, V] fp32 buffer, reused in place by the backward. Without: one chunk
    of at most 64 MiB at a time, so a long reference forward holds no [N, V]. ``probs`` ([N, V]
    fp32, consumed by the backward): softmax(hidden · Wᵀ / T) already computed by the sampler
    with the same weights, so the head's forward matmul is skipped.
    """
    shape = tokens.shape
    hidden, tokens = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    if probs is not None and probs.shape != (hidden.shape[0], weight.shape[0]):
        expected = (hidden.shape[0], weight.shape[0])
        raise ValueError(f"head_logprobs: probs has shape {tuple(probs.shape)}, expected {expected}")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _HeadLogprobs.apply(hidden, weight, tokens, temperature, probs).view(shape)
    if probs is not None:
        with torch.no_grad():
            return _picked_logprobs(hidden, weight, tokens, temperature, probs).view(shape)
    with torch.no_grad():
        rows = _chunk_rows(weight.shape[0])
        out = hidden.new_empty(tokens.shape, dtype=torch.float32)
        for lo in range(0, hidden.shape[0], rows):
            part = slice(lo, lo + rows)
            out[part] = _head_chunk(hidden[part], weight, tokens[part], temperature)[0]
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


def _is_dtensor(tensor: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor) or isinstance(getattr(tensor, "data", None), DTensor)


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
    # sharded weights (FSDP2 DTensors, ZeRO-3 partitions) are whole only inside the module's own
    # forward: the plain path there (align/distributed.py states the rule)
    if _is_dtensor(weight) or hasattr(weight, "ds_id"):
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
    sampler_probs: Tensor | None = None,
) -> Tensor:
    """[B, T] log π(y_t | x, y_<t) on completion tokens (0 on padding).

    ``sampler_probs``: [T, B, V] softmax(logits / T) the rollout computed at each step with these
    same weights (``generate(keep_probs=True)``); the fused head then skips its forward matmul and
    softmax, and its backward consumes the buffer. Ignored by models without the fused head.
    """
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
        if sampler_probs is not None:
            return _logprobs_from_sampler(hidden, weight, completion_ids, completion_mask, temperature, sampler_probs)
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


def _logprobs_from_sampler(
    hidden: Tensor, weight: Tensor, tokens: Tensor, mask: Tensor, temperature: float, sampler_probs: Tensor
) -> Tensor:
    """The fused head on [B, T] positions with the rollout's [T, B, V] softmax: rows in (step, row)
    order, the buffer's own, so with no padding the buffer is used as it is (a view, no copy)."""
    B, T = tokens.shape
    if sampler_probs.shape[:2] != (T, B):
        raise ValueError(f"sampler_probs has shape {tuple(sampler_probs.shape)}, expected ({T}, {B}, V)")
    flat_probs = sampler_probs.reshape(T * B, -1)
    flat_hidden = hidden.transpose(0, 1).reshape(T * B, -1)
    flat_tokens = tokens.t().reshape(-1)
    real = mask.t().reshape(-1).bool()
    if bool(real.all()):
        flat = head_logprobs(flat_hidden, weight, flat_tokens, temperature, flat_probs)
    else:
        index = real.nonzero().flatten()
        flat = flat_hidden.new_zeros(T * B, dtype=torch.float32)
        flat[index] = head_logprobs(
            flat_hidden[index], weight, flat_tokens[index], temperature, flat_probs.index_select(0, index)
        )
    return flat.view(T, B).t().contiguous()
