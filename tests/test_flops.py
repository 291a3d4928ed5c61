"""benchmarks/flops.py against torch's FLOP counter: the formula the benchmarks divide by is the
matmul work the models really do (eager attention, so the counter sees the score matmuls), on
GPT-2, Llama with grouped-query attention and an untied head, and Qwen2 with a tied head."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from flops import Shape, forward, generation  # noqa: E402


def _config(kind: str):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=101, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if kind == "gpt2":
        return GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, **common)
    cls = LlamaConfig if kind == "llama" else Qwen2Config
    return cls(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        tie_word_embeddings=kind == "qwen2",
        **common,
    )


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_forward_backward_and_generation_flops_are_counted_exactly(kind):
    from transformers import AutoModelForCausalLM

    config = _config(kind)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    shape = Shape.of(config)
    assert (shape.kv_heads, shape.gated) == ((4, False) if kind == "gpt2" else (2, True))
    ids = torch.randint(2, 101, (3, 17))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.sum().backward()
    assert counter.get_total_flops() == 3 * forward(shape, 3, 17, 17)
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=1)
    assert out.shape[1] == 17 + 6
    assert counter.get_total_flops() == generation(shape, 3, 17, 6)
