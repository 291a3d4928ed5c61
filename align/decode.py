"""The decode step of Llama-family models written out, for the rollout's token-by-token forwards.

A decode forward through transformers' modules spends most of its time between the kernels at
rollout sizes (16 rows, a few layers: ~0.8 ms of Python per Llama layer against ~0.2 ms of
matmuls), and that is most of an RLOO step's generation. ``LlamaDecode`` runs the same maths on
the same weights with fewer, larger calls: q, k and v in one matmul and gate and up in another
(the weights concatenated once per rollout), RoPE's cos/sin computed once for every position of
the rollout by the model's own rotary module, the KV cache a preallocated buffer written in
place, and the attention mask a slice of one prepared boolean mask. The prefill still runs through
transformers, whose cache is copied in; the hidden states agree with transformers' decode to
float rounding (``tests/core/test_rollout.py``).

It is taken only where it computes exactly what the model would: a plain (or DDP-wrapped)
``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` with plain ``nn.Linear`` projections (no peft
adapters, no quantisation), SiLU MLPs without bias, a position-independent RoPE, no sliding
window, no attention dropout in training mode. Everything else decodes through transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_FAMILIES = {"LlamaForCausalLM": "LlamaDecoderLayer", "Qwen2ForCausalLM": "Qwen2DecoderLayer"}
_STATIC_ROPE = {"default", "linear", "llama3"}  # inv_freq does not depend on the sequence length


def _eligible(model) -> bool:
    layer_type = _FAMILIES.get(type(model).__name__)
    if layer_type is None or hasattr(model, "peft_config"):
        return False
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
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed
        return True
    return not isinstance(base.layers[0].self_attn.q_proj.weight, DTensor)  # not a sharded parameter


class LlamaDecode:
    """One rollout's decode steps: ``step(tokens, positions, column)`` → the last hidden states."""

    def __init__(self, model, cache, prompt_mask: Tensor, max_new_tokens: int):
        base = model.model
        config = model.config
        rows, prompt_len = prompt_mask.shape
        length = prompt_len + max_new_tokens
        self.base, self.prompt_len = base, prompt_len
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.layers = []
        for layer, cached in zip(base.layers, cache.layers):
            a, m = layer.self_attn, layer.mlp
            qkv_bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            keys = cached.keys.new_zeros(rows, self.n_kv, length, a.head_dim)
            values = torch.zeros_like(keys)
            keys[:, :, :prompt_len] = cached.keys
            values[:, :, :prompt_len] = cached.values
            self.layers.append(
                (
                    layer.input_layernorm,
                    torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                    qkv_bias,
                    a.o_proj,
                    layer.post_attention_layernorm,
                    torch.cat([m.gate_proj.weight, m.up_proj.weight]),
                    m.down_proj,
                    keys,
                    values,
                    a.scaling,
                    a.head_dim,
                )
            )
        self.intermediate = config.intermediate_size
        dtype = base.embed_tokens.weight.dtype
        probe = torch.zeros(1, dtype=dtype, device=prompt_mask.device)
        cos, sin = base.rotary_emb(probe, torch.arange(length, device=prompt_mask.device)[None])
        self.cos, self.sin = cos[0], sin[0]  # [length, head_dim]
        self.mask = torch.ones(rows, 1, 1, length, dtype=torch.bool, device=prompt_mask.device)
        self.mask[:, 0, 0, :prompt_len] = prompt_mask.bool()

    @classmethod
    def build(cls, model, cache, prompt_mask: Tensor, max_new_tokens: int) -> LlamaDecode | None:
        """The written-out decode for ``model`` after its prefill into ``cache``, or None where it
        would not compute exactly what the model does."""
        model = getattr(model, "module", model)  # DDP
        if not _eligible(model):
            return None
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != len(model.model.layers):
            return None
        if any(getattr(c, "keys", None) is None or c.keys.shape[2] != prompt_mask.shape[1] for c in layers):
            return None
        return cls(model, cache, prompt_mask, max_new_tokens)

    def step(self, tokens: Tensor, positions: Tensor, column: int) -> Tensor:
        """Feed ``tokens`` [rows] at rotary ``positions`` [rows] into cache ``column``; [rows, H]."""
        x = self.base.embed_tokens(tokens)
        rows = x.shape[0]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [rows, 1, d]
        seen = column + 1
        mask = self.mask[..., :seen]
        for norm1, qkv_weight, qkv_bias, o_proj, norm2, gate_up, down, keys, values, scaling, d in self.layers:
            qkv = F.linear(norm1(x), qkv_weight, qkv_bias)
            q, k, v = qkv.split([self.n_heads * d, self.n_kv * d, self.n_kv * d], -1)
            q = _rope(q.view(rows, self.n_heads, d), cos, sin)
            keys[:, :, column] = _rope(k.view(rows, self.n_kv, d), cos, sin)
            values[:, :, column] = v.view(rows, self.n_kv, d)
            attended = F.scaled_dot_product_attention(
                q[:, :, None],
                keys[:, :, :seen],
                values[:, :, :seen],
                attn_mask=mask,
                scale=scaling,
                enable_gqa=self.n_kv != self.n_heads,
            )
            x = x + o_proj(attended.reshape(rows, self.n_heads * d))
            gate, up = F.linear(norm2(x), gate_up).split([self.intermediate, self.intermediate], -1)
            x = x + down(F.silu(gate) * up)
        return self.base.norm(x)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """transformers' ``apply_rotary_pos_emb`` for one position per row: x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin
