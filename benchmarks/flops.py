"""FLOP counts of an RL or DPO step from the model's shapes (the benchmarks' yardstick).

A matmul of [m, k] by [k, n] is 2·m·k·n FLOPs. Per token and layer, with H hidden, n_q query
heads and n_kv key/value heads of size d, I the MLP width:

    projections   2·H·(n_q·d) + 2·2·H·(n_kv·d) + 2·(n_q·d)·H          (q, k and v, o; GQA: n_kv < n_q)
    attention     2·2·n_q·d·C                                         (QKᵀ and AV over C keys)
    MLP           GPT-2: 2·2·H·I;  Llama / Qwen2 (gated): 3·2·H·I
    LM head       2·H·V on each position that is scored

C is what the kernels compute, not the causal half: a prefill or training forward over L
positions attends L keys at every position (SDPA with a mask does the whole L×L), a decode step
attends the cache so far. A backward costs two forwards (input and weight gradients), so a
training forward and backward is 3× the forward. ``tests/test_flops.py`` checks ``forward`` against
torch's own FLOP counter on GPT-2, Llama and Qwen2 models.

    RLOO step  = generation (prefill of P prompt tokens, T decode steps, the head on each new token)
               + policy forward and backward over P + T positions (the head on the T completion ones)
               + reference forward over the same
    DPO step   = policy forward and backward over 2 sequences per pair (+ the reference forward,
                 unless its log-probs are cached)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated: bool  # Llama / Qwen2 SwiGLU: three MLP matrices

    @classmethod
    def of(cls, config) -> Shape:
        """From a transformers config (GPT-2, Llama, Qwen2 and their relatives)."""
        get = lambda *names: next(getattr(config, n) for n in names if getattr(config, n, None) is not None)  # noqa: E731
        hidden = get("hidden_size", "n_embd")
        heads = get("num_attention_heads", "n_head")
        gated = getattr(config, "model_type", "") != "gpt2"
        intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
        return cls(
            layers=get("num_hidden_layers", "n_layer"),
            hidden=hidden,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or hidden // heads,
            intermediate=intermediate,
            vocab=config.vocab_size,
            gated=gated,
        )

    def per_token(self) -> int:
        """Projections and MLP of one token through every layer (no attention scores, no head)."""
        H, d = self.hidden, self.head_dim
        projections = 2 * H * self.heads * d + 2 * 2 * H * self.kv_heads * d + 2 * self.heads * d * H
        mlp = (3 if self.gated else 2) * 2 * H * self.intermediate
        return self.layers * (projections + mlp)

    def attention(self, queries: int, keys: int) -> int:
        return self.layers * 2 * 2 * self.heads * self.head_dim * queries * keys

    def head(self, positions: int) -> int:
        return 2 * self.hidden * self.vocab * positions


def forward(shape: Shape, rows: int, length: int, scored: int) -> int:
    """One forward of ``rows`` sequences of ``length`` positions, the LM head on ``scored`` of each."""
    return rows * (length * shape.per_token() + shape.attention(length, length) + shape.head(scored))


def generation(shape: Shape, rows: int, prompt: int, new_tokens: int) -> int:
    """KV-cache sampling: a prefill over the prompt (head on its last position), then one decode
    step per further token, each attending the cache so far."""
    total = forward(shape, rows, prompt, 1)
    for t in range(1, new_tokens):
        total += rows * (shape.per_token() + shape.attention(1, prompt + t) + shape.head(1))
    return total


def rloo_step(shape: Shape, rows: int, prompt: int, new_tokens: int) -> dict[str, int]:
    length = prompt + new_tokens
    parts = {
        "generation": generation(shape, rows, prompt, new_tokens),
        "policy": 3 * forward(shape, rows, length, new_tokens),
        "reference": forward(shape, rows, length, new_tokens),
    }
    parts["total"] = sum(parts.values())
    return parts


def dpo_step(shape: Shape, pairs: int, length: int, completion: int, reference: bool = True) -> dict[str, int]:
    parts = {"policy": 3 * forward(shape, 2 * pairs, length, completion)}
    parts["reference"] = forward(shape, 2 * pairs, length, completion) if reference else 0
    parts["total"] = sum(parts.values())
    return parts


def describe(parts: dict[str, int], seconds: float, peak_flops: float | None) -> str:
    """'205.1 GFLOP (generation 45.0, policy 110.2, reference 49.9); 79 GFLOP/s, 54 % of peak'."""
    detail = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in parts.items() if k != "total")
    rate = parts["total"] / seconds
    line = f"{parts['total'] / 1e9:.1f} GFLOP/step ({detail}); {rate / 1e9:.1f} GFLOP/s"
    if peak_flops:
        line += f", {100 * rate / peak_flops:.0f} % of the measured fp32 GEMM peak"
    return line
