"""The decode step of GPT-2 and Llama-family models written out, for the rollout's token-by-token forwards.

A decode forward through transformers' modules spends most of its time between the kernels at
rollout sizes (16 rows, a few layers: ~0.8 ms of Python per Llama layer against ~0.2 ms of
matmuls), and that is most of an RLOO step's generation. ``decode_step_for`` runs the same maths
on the same weights in fewer, larger calls, with everything that does not change during a
rollout prepared once per rollout: the projection weights concatenated (q/k/v in one matmul,
gate/up in another) and transposed so each projection is one ``mm``/``addmm`` (the residual add
included); the attention scale folded into the query rows; for fp32 Llama/Qwen2 the RMSNorm
scale folded into the following matmul's rows, which leaves 1/rms a row factor on its output;
RoPE's cos/sin for every position from the model's own rotary module, the sign of rotate_half
in the sin table, q and k rotated together; a preallocated KV cache written in place, keys held
transposed, and the padding an additive bias. Query heads that share a key/value head are rows
of one attention matmul (no repeated keys). The prefill still runs through transformers, whose
cache is copied in; the hidden states agree with transformers' decode to float rounding
(``tests/core/test_rollout.py``).

It is taken only where it computes exactly what the model would: a plain (or DDP-wrapped)
``GPT2LMHeadModel``, ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` with the stock layer types (no
peft adapters, no quantisation), no dropout active (the policy in training mode with dropout
decodes through transformers, drawing the same random numbers), and for Llama/Qwen2 SiLU MLPs
without bias, a position-independent RoPE and no sliding window. Everything else decodes through
transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_LLAMA_FAMILY = {"LlamaForCausalLM": "LlamaDecoderLayer", "Qwen2ForCausalLM": "Qwen2DecoderLayer"}
_STATIC_ROPE = {"default", "linear", "llama3"}  # inv_freq does not depend on the sequence length


def _dropout_active(model) -> bool:
    return model.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def _unsharded(weight: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed
        return True
    return not isinstance(weight, DTensor)


def _gpt2_eligible(model) -> bool:
    from transformers.pytorch_utils import Conv1D

    config = model.config
    if getattr(config, "add_cross_attention", False) or getattr(config, "reorder_and_upcast_attn", False):
        return False
    for block in model.transformer.h:
        if type(block).__name__ != "GPT2Block":
            return False
        convs = (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
        if any(type(c) is not Conv1D for c in convs):
            return False
    return _unsharded(model.transformer.h[0].attn.c_attn.weight)


def _llama_eligible(model) -> bool:
    layer_type = _LLAMA_FAMILY[type(model).__name__]
    config, base = model.config, model.model
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "mlp_bias", False):
        return False
    if getattr(config, "use_sliding_window", False) or getattr(base.rotary_emb, "rope_type", None) not in _STATIC_ROPE:
        return False
    if model.training and getattr(config, "attention_dropout", 0.0):
        return False
    for layer in base.layers:
        if type(layer).__name__ != layer_type:
            return False
        a, m = layer.self_attn, layer.mlp
        linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
        if any(type(x) is not torch.nn.Linear for x in linears):
            return False
        if (a.q_proj.bias is None) != (a.k_proj.bias is None) or (a.k_proj.bias is None) != (a.v_proj.bias is None):
            return False
    return _unsharded(base.layers[0].self_attn.q_proj.weight)


def decode_step_for(model, cache, prompt_mask: Tensor, max_new_tokens: int) -> LlamaDecode | GPT2Decode | None:
    """The written-out decode for ``model`` after its prefill into ``cache`` (``prompt_mask`` the
    rows' [rows, P] attention), or None where it would not compute exactly what the model does."""
    model = getattr(model, "module", model)  # DDP
    name = type(model).__name__
    if hasattr(model, "peft_config") or _dropout_active(model):
        return None
    if name == "GPT2LMHeadModel":
        decode, layers = GPT2Decode, model.transformer.h
        if not _gpt2_eligible(model):
            return None
    elif name in _LLAMA_FAMILY:
        decode, layers = LlamaDecode, model.model.layers
        if not _llama_eligible(model):
            return None
    else:
        return None
    cached = getattr(cache, "layers", None)
    if cached is None or len(cached) != len(layers):
        return None
    if any(getattr(c, "keys", None) is None or c.keys.shape[2] != prompt_mask.shape[1] for c in cached):
        return None
    return decode(model, cache, prompt_mask, max_new_tokens)


class _Cache:
    """The rollout's KV cache, preallocated for every position, and its attention mask.

    Keys are held transposed ([rows, n_kv, d, length]) so a step's scores are one batched matmul
    on the cache as it is; padding is an additive -inf bias on the scores.
    """

    def __init__(self, cache, prompt_mask: Tensor, max_new_tokens: int):
        rows, prompt_len = prompt_mask.shape
        length = prompt_len + max_new_tokens
        self.keys_t, self.values = [], []
        for cached in cache.layers:
            n_kv, d = cached.keys.shape[1], cached.keys.shape[3]
            keys_t = cached.keys.new_zeros(rows, n_kv, d, length)
            values = cached.values.new_zeros(rows, n_kv, length, d)
            keys_t[..., :prompt_len] = cached.keys.transpose(-1, -2)
            values[:, :, :prompt_len] = cached.values
            self.keys_t.append(keys_t)
            self.values.append(values)
        dtype = cache.layers[0].keys.dtype
        self.bias = torch.zeros(rows, 1, 1, length, dtype=dtype, device=prompt_mask.device)
        self.bias[:, 0, 0, :prompt_len].masked_fill_(~prompt_mask.bool(), float("-inf"))

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, column: int) -> Tensor:
        """Write k, v [rows, n_kv, d] at ``column``; q [rows, n_heads, d], already scaled, attends
        to the columns ≤ it. [rows, n_heads · d].

        The n_heads / n_kv query heads that share a key/value head (GQA) are that head's rows of
        one matmul -- no repeated keys -- in transformers' order (query head h reads kv head
        h // group)."""
        keys_t, values = self.keys_t[layer], self.values[layer]
        keys_t[..., column] = k
        values[:, :, column] = v
        seen = column + 1
        rows, n_kv, d = k.shape
        scores = torch.matmul(q.view(rows, n_kv, -1, d), keys_t[..., :seen]).add_(self.bias[..., :seen])
        weights = torch.softmax(scores, -1)
        return torch.matmul(weights, values[:, :, :seen]).view(rows, -1)


class GPT2Decode:
    """GPT-2's decode step: learned positions, LayerNorms, Conv1D projections ([in, out] weights,
    so each is one addmm), the attention scale folded into the query columns."""

    def __init__(self, model, cache, prompt_mask: Tensor, max_new_tokens: int):
        t = model.transformer
        self.wte, self.wpe = t.wte.weight, t.wpe.weight
        self.cache = _Cache(cache, prompt_mask, max_new_tokens)
        self.n_heads = model.config.n_head
        self.blocks = []
        for block in t.h:
            attn, mlp = block.attn, block.mlp
            hidden = attn.c_attn.weight.shape[0]
            scale = torch.ones(3 * hidden, dtype=attn.c_attn.weight.dtype, device=attn.c_attn.weight.device)
            scale[:hidden] = attn.scaling
            ln1, ln2 = block.ln_1, block.ln_2
            self.blocks.append(
                (
                    (ln1.weight, ln1.bias, ln1.eps),
                    attn.c_attn.weight * scale,
                    attn.c_attn.bias * scale,
                    attn.c_proj.weight,
                    attn.c_proj.bias,
                    (ln2.weight, ln2.bias, ln2.eps),
                    mlp.c_fc.weight,
                    mlp.c_fc.bias,
                    mlp.act,
                    mlp.c_proj.weight,
                    mlp.c_proj.bias,
                )
            )
        self.ln_f = t.ln_f

    def step(self, tokens: Tensor, positions: Tensor, column: int) -> Tensor:
        """Feed ``tokens`` [rows] at ``positions`` [rows] into cache ``column``; [rows, H]."""
        x = F.embedding(tokens, self.wte) + F.embedding(positions, self.wpe)
        rows, hidden = x.shape
        heads = (rows, self.n_heads, hidden // self.n_heads)
        for i, (ln1, qkv_w, qkv_b, o_w, o_b, ln2, fc_w, fc_b, act, proj_w, proj_b) in enumerate(self.blocks):
            q, k, v = torch.addmm(qkv_b, F.layer_norm(x, (hidden,), *ln1), qkv_w).split(hidden, -1)
            attended = self.cache.attend(i, q.reshape(heads), k.reshape(heads), v.reshape(heads), column)
            x = torch.addmm(o_b, attended, o_w).add_(x)
            x = torch.addmm(proj_b, act(torch.addmm(fc_b, F.layer_norm(x, (hidden,), *ln2), fc_w)), proj_w).add_(x)
        return self.ln_f(x)


def _normed_matmul(norm, weight: Tensor) -> tuple:
    """(f, weight) with f(x, weight) = RMSNorm(x) · weight for a [H, out] weight.

    In fp32 the norm's scale s and √H are folded into the weight's rows and 1/√(Σx² + H·ε)
    applied to the matmul's rows -- (x · s / rms(x)) W = (x (√H · diag(s) W)) / √(Σx² + H·ε) --
    five small ops instead of the norm's dozen; other dtypes keep the module's own casts."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
    if norm.weight.dtype != torch.float32 or eps is None:
        return (lambda x, w: torch.mm(norm(x), w)), weight
    hidden = weight.shape[0]
    floor = hidden * eps

    def normed_matmul(x: Tensor, w: Tensor) -> Tensor:
        return torch.mm(x, w).mul_((x * x).sum(-1, keepdim=True).add_(floor).rsqrt_())

    return normed_matmul, (hidden**0.5 * norm.weight[:, None]) * weight


class LlamaDecode:
    """Llama's and Qwen2's decode step: one matmul for q/k/v (the attention scale folded into the
    query rows) and one for gate/up, weights transposed once per rollout, RoPE on q and k together
    from a table."""

    def __init__(self, model, cache, prompt_mask: Tensor, max_new_tokens: int):
        base, config = model.model, model.config
        self.embed = base.embed_tokens.weight
        self.cache = _Cache(cache, prompt_mask, max_new_tokens)
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.intermediate = config.intermediate_size
        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            s = a.scaling
            qkv = torch.cat([a.q_proj.weight * s, a.k_proj.weight, a.v_proj.weight]).t().contiguous()
            qkv_bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias * s, a.k_proj.bias, a.v_proj.bias])
            gate_up = torch.cat([m.gate_proj.weight, m.up_proj.weight]).t().contiguous()
            o, down = a.o_proj.weight.t().contiguous(), m.down_proj.weight.t().contiguous()
            attend_in, qkv = _normed_matmul(layer.input_layernorm, qkv)
            mlp_in, gate_up = _normed_matmul(layer.post_attention_layernorm, gate_up)
            self.layers.append((attend_in, qkv, qkv_bias, o, mlp_in, gate_up, down))
        self.norm = base.norm
        self.head_dim = base.layers[0].self_attn.head_dim
        length = prompt_mask.shape[1] + max_new_tokens
        probe = torch.zeros(1, dtype=self.embed.dtype, device=prompt_mask.device)
        cos, sin = base.rotary_emb(probe, torch.arange(length, device=prompt_mask.device)[None])
        half = self.head_dim // 2
        # rotate_half(x) = [-x₂, x₁] = roll(x, half)·[-1 … 1]: the sign goes into the sin table,
        # one table [length, 2, d] so a step gathers both with one index
        sign = torch.ones(self.head_dim, dtype=sin.dtype, device=sin.device)
        sign[:half] = -1
        self.rope = torch.stack([cos[0], sin[0] * sign], 1)

    def step(self, tokens: Tensor, positions: Tensor, column: int) -> Tensor:
        """Feed ``tokens`` [rows] at rotary ``positions`` [rows] into cache ``column``; [rows, H]."""
        x = F.embedding(tokens, self.embed)
        rows, d, n_heads, n_kv = x.shape[0], self.head_dim, self.n_heads, self.n_kv
        cos, sin = self.rope[positions][:, None].unbind(2)  # [rows, 1, d] each
        half, qk = d // 2, (n_heads + n_kv) * d
        for i, (attend_in, qkv_w, qkv_b, o_w, mlp_in, gate_up_w, down_w) in enumerate(self.layers):
            qkv = attend_in(x, qkv_w)
            if qkv_b is not None:
                qkv = qkv.add_(qkv_b)
            q_k = qkv[:, :qk].view(rows, n_heads + n_kv, d)
            q_k = torch.addcmul(q_k * cos, q_k.roll(half, -1), sin)
            v = qkv[:, qk:].view(rows, n_kv, d)
            attended = self.cache.attend(i, q_k[:, :n_heads], q_k[:, n_heads:], v, column)
            x = torch.addmm(x, attended, o_w)
            gate, up = mlp_in(x, gate_up_w).split(self.intermediate, -1)
            x = torch.addmm(x, F.silu(gate).mul_(up), down_w)
        return self.norm(x)
