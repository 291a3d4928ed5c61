"""The decode step of GPT-2 and Llama-family models written out, for the rollout's token-by-token forwards.

A decode forward through transformers' modules spends most of its time between the kernels at
rollout sizes (16 rows, a few layers: ~0.8 ms of Python per Llama layer against ~0.2 ms of
matmuls), and that is most of an RLOO step's generation. ``decode_step_for`` runs the same maths
on the same weights with fewer, larger calls: the model's own norms, projections and activations
are called, but the KV cache is a preallocated buffer written in place, the attention mask a slice
of one prepared boolean mask, and for Llama and Qwen2 q, k and v go through one matmul and gate
and up through another (the weights concatenated once per rollout), with RoPE's cos/sin computed
once for every position of the rollout by the model's own rotary module. The prefill still runs
through transformers, whose cache is copied in; the hidden states agree with transformers'
decode to float rounding (``tests/core/test_rollout.py``).

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
    """The rollout's KV cache, preallocated for every position, and its attention mask."""

    def __init__(self, cache, prompt_mask: Tensor, max_new_tokens: int):
        rows, prompt_len = prompt_mask.shape
        length = prompt_len + max_new_tokens
        self.keys, self.values = [], []
        for cached in cache.layers:
            n_kv, d = cached.keys.shape[1], cached.keys.shape[3]
            keys = cached.keys.new_zeros(rows, n_kv, length, d)
            values = torch.zeros_like(keys)
            keys[:, :, :prompt_len] = cached.keys
            values[:, :, :prompt_len] = cached.values
            self.keys.append(keys)
            self.values.append(values)
        self.mask = torch.ones(rows, 1, 1, length, dtype=torch.bool, device=prompt_mask.device)
        self.mask[:, 0, 0, :prompt_len] = prompt_mask.bool()

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, column: int, scale: float) -> Tensor:
        """Write k, v [rows, n_kv, d] at ``column``; q [rows, n_heads, d] attends to columns ≤ it."""
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, column] = k
        values[:, :, column] = v
        seen = column + 1
        out = F.scaled_dot_product_attention(
            q[:, :, None],
            keys[:, :, :seen],
            values[:, :, :seen],
            attn_mask=self.mask[..., :seen],
            scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return out.reshape(q.shape[0], -1)


class GPT2Decode:
    """GPT-2's decode step: learned positions, the blocks' own LayerNorms and Conv1D projections."""

    def __init__(self, model, cache, prompt_mask: Tensor, max_new_tokens: int):
        self.transformer = model.transformer
        self.cache = _Cache(cache, prompt_mask, max_new_tokens)
        self.n_heads = model.config.n_head

    def step(self, tokens: Tensor, positions: Tensor, column: int) -> Tensor:
        """Feed ``tokens`` [rows] at ``positions`` [rows] into cache ``column``; [rows, H]."""
        t = self.transformer
        x = t.wte(tokens) + t.wpe(positions)
        rows, hidden = x.shape
        d = hidden // self.n_heads
        for i, block in enumerate(t.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(hidden, -1)
            heads = (rows, self.n_heads, d)
            attended = self.cache.attend(i, q.view(heads), k.view(heads), v.view(heads), column, attn.scaling)
            x = x + attn.c_proj(attended)
            x = x + block.mlp.c_proj(block.mlp.act(block.mlp.c_fc(block.ln_2(x))))
        return t.ln_f(x)


class LlamaDecode:
    """Llama's and Qwen2's decode step: fused q/k/v and gate/up matmuls, RoPE from a table."""

    def __init__(self, model, cache, prompt_mask: Tensor, max_new_tokens: int):
        base, config = model.model, model.config
        self.base = base
        self.cache = _Cache(cache, prompt_mask, max_new_tokens)
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.intermediate = config.intermediate_size
        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            qkv_bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            qkv_weight = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            gate_up = torch.cat([m.gate_proj.weight, m.up_proj.weight])
            self.layers.append((layer, qkv_weight, qkv_bias, gate_up))
        length = prompt_mask.shape[1] + max_new_tokens
        probe = torch.zeros(1, dtype=base.embed_tokens.weight.dtype, device=prompt_mask.device)
        cos, sin = base.rotary_emb(probe, torch.arange(length, device=prompt_mask.device)[None])
        self.cos, self.sin = cos[0], sin[0]  # [length, head_dim]

    def step(self, tokens: Tensor, positions: Tensor, column: int) -> Tensor:
        """Feed ``tokens`` [rows] at rotary ``positions`` [rows] into cache ``column``; [rows, H]."""
        x = self.base.embed_tokens(tokens)
        rows = x.shape[0]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [rows, 1, d]
        for i, (layer, qkv_weight, qkv_bias, gate_up) in enumerate(self.layers):
            attn, mlp, d = layer.self_attn, layer.mlp, layer.self_attn.head_dim
            qkv = F.linear(layer.input_layernorm(x), qkv_weight, qkv_bias)
            q, k, v = qkv.split([self.n_heads * d, self.n_kv * d, self.n_kv * d], -1)
            q = _rope(q.view(rows, self.n_heads, d), cos, sin)
            k = _rope(k.view(rows, self.n_kv, d), cos, sin)
            attended = self.cache.attend(i, q, k, v.view(rows, self.n_kv, d), column, attn.scaling)
            x = x + attn.o_proj(attended)
            gate, up = F.linear(layer.post_attention_layernorm(x), gate_up).split(self.intermediate, -1)
            x = x + mlp.down_proj(F.silu(gate) * up)
        return self.base.norm(x)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """transformers' ``apply_rotary_pos_emb`` for one position per row: x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin
