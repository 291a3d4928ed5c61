"""Rollout: the two-level inverse-CDF sampler against a flat float64 search and the distribution it
draws from; ``generate`` against the model's own next-token distribution, with the LM head split
off or not, whatever the batch around a prompt, with EOS masked then stopping."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM

import align.native_engine as engine_lib
from align.decode import decode_step_for
from align.rollout import SamplingSettings
from align.sampling import inverse_cdf_sample, sample_keys


def generate(model, ids, mask, keys, *, k, keep_probs=False, eos_token_id=None, **sampling):
    """The native engine's ``generate`` with sampling settings given as keywords."""
    eos = () if eos_token_id is None else (eos_token_id,)
    settings = SamplingSettings(eos_token_ids=eos, **sampling)
    return engine_lib.generate(model, ids, mask, keys, k=k, sampling=settings, keep_probs=keep_probs)


def _flat_search(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Independent: the whole-vocabulary cumulative sum in float64."""
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, u.double()[:, None] * cdf[:, -1:], right=True).squeeze(1)


def test_two_level_sampler_picks_the_flat_search_token():
    g = torch.Generator().manual_seed(0)
    rows, vocab = 4096, 1000 + 37  # not a multiple of the block: the last block is padded
    probs = torch.softmax(torch.randn(rows, vocab, generator=g) * 3, -1)
    probs[:, 5] = 0.0  # a masked token (EOS before min_new_tokens)
    u = torch.rand(rows, generator=g)
    mine, exact = inverse_cdf_sample(probs, u), _flat_search(probs, u)
    # float32 block sums vs a float64 cumsum can only disagree on a boundary within rounding
    assert (mine != exact).sum() <= 2
    assert not (mine == 5).any()


@pytest.mark.parametrize("vocab", [600, 512, 100])  # a partial last block, whole blocks, one partial block
def test_two_level_sampler_draws_the_distribution_and_never_a_zero(vocab):
    g = torch.Generator().manual_seed(1)
    draws = 200_000
    weights = torch.rand(vocab, generator=g) ** 4 * 7  # skewed, unnormalised
    weights[::7] = 0.0
    weights[-30:] = 0.0  # the tail, in the padded last block
    tokens = inverse_cdf_sample(weights.expand(draws, -1), torch.rand(draws, generator=g))
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[weights == 0].sum() == 0
    expected = weights.double() / weights.sum() * draws
    keep = expected > 0
    chi2 = (((counts - expected)[keep] ** 2) / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5  # ~5 standard deviations of a chi-square


def test_draws_at_the_ends_of_the_unit_interval_land_on_tokens_with_weight():
    probs = torch.zeros(4, 700)
    probs[:, 10:20] = 1.0
    probs[2, 650] = 1e-30  # a tiny last token
    u = torch.tensor([1e-9, 1 - 1e-7, 1 - 1e-7, 1.0])  # 1.0: a target that rounding put at the total
    tokens = inverse_cdf_sample(probs, u).tolist()
    assert tokens[0] == 10 and tokens[1] == 19 and tokens[2] in (19, 650) and tokens[3] == 19


def _model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_first_tokens_follow_the_models_softmax(arch_model_dir):
    model = _model(arch_model_dir)
    prompt = torch.tensor([[5, 17, 42, 9]])
    n = 20_000
    keys = sample_keys(0, 0, torch.tensor([0]), n)
    out = generate(model, prompt, torch.ones_like(prompt), keys, k=n, max_new_tokens=1)
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=prompt).logits[0, -1].double(), -1)
    counts = torch.bincount(out.completion_ids[:, 0], minlength=probs.shape[0]).double()
    expected = probs * n
    keep = expected > 5
    chi2 = (((counts - expected)[keep] ** 2) / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5
    assert counts[~keep].sum() < 3 * expected[~keep].sum() + 20


def _prompts():
    ids = torch.tensor([[0, 0, 0, 7, 8], [3, 4, 5, 6, 7], [0, 0, 11, 12, 13]])
    return ids, (ids != 0).long() | torch.tensor([[0, 0, 0, 1, 1], [1] * 5, [0, 0, 1, 1, 1]])


def test_split_head_decoding_samples_what_the_models_own_logits_sample(arch_model_dir, monkeypatch):
    model = _model(arch_model_dir)
    ids, mask = _prompts()
    keys = sample_keys(3, 1, torch.arange(3), 4)
    split = generate(model, ids, mask, keys, k=4, max_new_tokens=12, temperature=0.8)
    monkeypatch.setattr(engine_lib, "fused_head_weight", lambda model: None)
    plain = generate(model, ids, mask, keys, k=4, max_new_tokens=12, temperature=0.8)
    assert torch.equal(split.completion_ids, plain.completion_ids)


def test_a_prompts_samples_do_not_depend_on_its_batch(arch_model_dir):
    model = _model(arch_model_dir)
    ids, mask = _prompts()
    keys = sample_keys(3, 1, torch.arange(3), 2)
    together = generate(model, ids, mask, keys, k=2, max_new_tokens=10).completion_ids
    alone = generate(model, ids[2:, 2:], mask[2:, 2:], keys[4:], k=2, max_new_tokens=10).completion_ids
    assert torch.equal(together[4:], alone)


def test_eos_is_masked_until_min_new_tokens_then_stops_and_pads(arch_model_dir):
    model = _model(arch_model_dir)
    ids, mask = _prompts()
    with torch.no_grad():  # make EOS likely everywhere: its head row along the mean last hidden state
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        mean = hidden[mask.bool()].mean(0)
        model.lm_head.weight[1] = 8.0 * mean / mean.norm() ** 2
    keys = sample_keys(0, 0, torch.arange(3), 4)
    out = generate(model, ids, mask, keys, k=4, max_new_tokens=8, min_new_tokens=3, eos_token_id=1, pad_token_id=0)
    tokens, keep = out.completion_ids, out.completion_mask.bool()
    assert not (tokens[:, :3] == 1).any()
    assert (tokens == 1).any()
    for row, row_keep in zip(tokens, keep):
        hits = (row == 1).nonzero()
        if len(hits):
            end = int(hits[0]) + 1
            assert row_keep[:end].all() and not row_keep[end:].any()
            assert (row[end:] == 0).all()


def _full_forward_probs(model, rollout, temperature):
    """Independent: one forward over prompt + completion, softmax of the positions that drew each token."""
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position).logits.double()
    P, T = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    return torch.softmax(logits[:, P - 1 : P + T - 1] / temperature, -1).transpose(0, 1)  # [T, R, V]


def test_kept_probs_are_the_models_unfiltered_distribution_and_change_no_sample(arch_model_dir):
    model = _model(arch_model_dir)
    ids, mask = _prompts()
    keys = sample_keys(5, 2, torch.arange(3), 2)
    for top_k in (0, 20):
        options = dict(k=2, max_new_tokens=6, min_new_tokens=3, eos_token_id=1, temperature=0.7, top_k=top_k)
        plain = generate(model, ids, mask, keys, **options)
        kept = generate(model, ids, mask, keys, keep_probs=True, **options)
        assert plain.probs is None
        assert torch.equal(plain.completion_ids, kept.completion_ids)
        T, R = kept.completion_ids.shape[1], kept.completion_ids.shape[0]
        assert kept.probs.shape == (T, R, model.config.vocab_size)
        expected = _full_forward_probs(model, kept, 0.7)
        real = kept.completion_mask.t().bool()  # positions after EOS hold padding, not samples
        assert torch.allclose(kept.probs[real].double(), expected[real], atol=1e-5)
        assert (kept.probs[:, :, 1] > 0).all()  # EOS keeps its mass: masking was for sampling only
        assert ((kept.probs[real] > 0).sum(-1) > 20).all()  # not the top-k filtered distribution
        # the sampler's log-prob of each token: under the distribution it was drawn from (EOS
        # masked before min_new_tokens, top-k renormalised), 0 past the completion
        drawn = expected.clone()
        drawn[:3, :, 1] = 0.0
        if top_k:
            kth = drawn.topk(top_k, -1).values[..., -1:]
            drawn = torch.where(drawn >= kth, drawn, torch.zeros_like(drawn))
        drawn = drawn / drawn.sum(-1, keepdim=True)
        picked = drawn.gather(-1, kept.completion_ids.t()[..., None])[..., 0].log().t()
        assert torch.allclose(kept.sampler_logprobs[real.t()].double(), picked[real.t()], atol=1e-4)
        assert (kept.sampler_logprobs[~real.t()] == 0).all()
        assert torch.equal(plain.sampler_logprobs, kept.sampler_logprobs)


def _written_out_against_transformers(model, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(written-out, transformers) last hidden states of ``steps`` decode steps after a prefill of
    the left-padded prompts, both fed the same tokens at the same positions."""
    ids, mask = _prompts()
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    pairs = []
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        fast = decode_step_for(model, cache, mask, max_new_tokens=steps + 1)
        assert fast is not None
        tokens, attention, next_position = ids[:, -1], mask, mask.sum(-1)
        # the KV-cache argument is 'cache' in transformers >= 5.2x, 'past_key_values' before
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        for t in range(steps):
            tokens = (tokens * 7 + t) % model.config.vocab_size
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)
            expected = model(
                input_ids=tokens[:, None],
                attention_mask=attention,
                position_ids=next_position[:, None],
                **{cache_arg: cache},
                use_cache=True,
                output_hidden_states=True,
            ).hidden_states[-1][:, -1]
            pairs.append((fast.step(tokens, next_position, ids.shape[1] + t), expected))
            next_position = next_position + 1
    return pairs


def test_written_out_decode_in_bf16_follows_the_models_own_casts(arch_model_dir):
    """In bf16 the RMSNorm is not folded into the matmuls (the module runs with its own casts):
    each step's hidden states stay within bf16 rounding of transformers' decode."""
    for got, expected in _written_out_against_transformers(_model(arch_model_dir).to(torch.bfloat16), steps=3):
        assert got.dtype == torch.bfloat16
        error = float((got.float() - expected.float()).abs().max() / expected.float().abs().max())
        assert error < 3e-2, error


def test_written_out_decode_equals_transformers_decode(arch_model_dir, monkeypatch):
    """align/decode.py on GPT-2, Llama and Qwen2: step by step over left-padded prompts, its last
    hidden states equal transformers' own decode forward to float rounding, and generate samples
    the same tokens with it or without it; a peft-wrapped model or one with dropout active is
    not taken."""
    model = _model(arch_model_dir)
    for got, expected in _written_out_against_transformers(model, steps=5):
        assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())
    ids, mask = _prompts()
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    keys = sample_keys(3, 1, torch.arange(3), 4)
    with_step = generate(model, ids, mask, keys, k=4, max_new_tokens=12, temperature=0.8)
    monkeypatch.setattr(engine_lib, "decode_step_for", lambda *args: None)
    without = generate(model, ids, mask, keys, k=4, max_new_tokens=12, temperature=0.8)
    assert torch.equal(with_step.completion_ids, without.completion_ids)
    monkeypatch.undo()

    def taken(candidate) -> bool:
        with torch.inference_mode():
            out = candidate(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True)
            fresh = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            return decode_step_for(candidate, fresh, mask, max_new_tokens=6) is not None

    assert taken(model)
    training = AutoModelForCausalLM.from_pretrained(arch_model_dir).train()
    dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in training.modules())
    assert taken(training) != dropout  # GPT-2's dropout would draw random numbers; Llama's has none
    peft = pytest.importorskip("peft")
    target = "c_attn" if model.config.model_type == "gpt2" else "q_proj"
    assert not taken(peft.get_peft_model(_model(arch_model_dir), peft.LoraConfig(r=2, target_modules=[target])))
