"""Log-probs of completions: the fused LM-head path against an independent log-softmax, values and
gradients, with padding and a temperature; models the fused path does not fit fall back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import align.logprobs as lp_lib
from align.logprobs import completion_logprobs, fused_head_weight, head_logprobs, token_logprobs


def _model(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _batch(vocab: int, seed: int = 0):
    """Left-padded prompts, right-padded completions of unequal lengths."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (4, 5), generator=g)
    prompt_mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    prompt_ids = prompt_ids * prompt_mask
    completion_ids = torch.randint(3, vocab, (4, 6), generator=g)
    completion_mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    completion_ids = completion_ids * completion_mask
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def _reference_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature):
    """Independent: full logits of the whole sequence, explicit log_softmax, gather."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=False).logits
    P, T = prompt_ids.shape[1], completion_ids.shape[1]
    logp = torch.log_softmax(logits[:, P - 1 : P + T - 1].double() / temperature, -1)
    return logp.gather(-1, completion_ids[..., None]).squeeze(-1).float() * completion_mask


def test_token_logprobs_is_log_softmax_gather():
    logits = torch.randn(3, 5, 50) * 4
    tokens = torch.randint(0, 50, (3, 5))
    for temperature in (1.0, 0.7):
        expected = torch.log_softmax(logits.double() / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
        assert torch.allclose(token_logprobs(logits, tokens, temperature).double(), expected, atol=2e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_equals_log_softmax_values_and_gradients(arch_model_dir, temperature):
    model = _model(arch_model_dir)
    assert fused_head_weight(model) is model.lm_head.weight  # tied to the embedding (GPT-2, Qwen2) or not (Llama)
    batch = _batch(model.config.vocab_size)
    weights = torch.linspace(-1, 1, batch[2].numel()).view(batch[2].shape)  # an uneven upstream gradient

    def values_and_grads(fn):
        model.zero_grad(set_to_none=True)
        values = fn(model, *batch, temperature)
        (values * weights).sum().backward()
        return values.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fused, fused_grads = values_and_grads(completion_logprobs)
    plain, plain_grads = values_and_grads(_reference_logprobs)
    assert torch.allclose(fused, plain, atol=1e-5)
    assert (fused[batch[3] == 0] == 0).all()
    assert fused_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        assert torch.allclose(fused_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4), name
    assert model.lm_head.weight.grad.abs().sum() > 0
    with torch.no_grad():  # the reference's path: chunked, nothing kept
        assert torch.allclose(completion_logprobs(model, *batch, temperature), fused, atol=1e-5)


def test_plain_path_matches_fused_path(arch_model_dir, monkeypatch):
    model = _model(arch_model_dir)
    batch = _batch(model.config.vocab_size, seed=1)
    fused = completion_logprobs(model, *batch, 0.8)
    monkeypatch.setattr(lp_lib, "fused_head_weight", lambda model: None)
    plain = completion_logprobs(model, *batch, 0.8)
    assert torch.allclose(fused, plain, atol=1e-5)


def test_chunked_head_grad_and_no_grad_paths_agree_bitwise(monkeypatch):
    monkeypatch.setattr(lp_lib, "_CHUNK_ELEMENTS", 3 * 50)  # 3 rows a chunk, the last one 1 row
    hidden, weight = torch.randn(2, 5, 8), torch.randn(50, 8)
    tokens = torch.randint(0, 50, (2, 5))
    logits = (hidden.double() @ weight.double().t()) / 0.9
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    with torch.no_grad():
        no_grad = head_logprobs(hidden, weight, tokens, 0.9)
    leaf = hidden.clone().requires_grad_()
    with_grad = head_logprobs(leaf, weight, tokens, 0.9)
    assert torch.allclose(no_grad.double(), expected, atol=1e-5)
    assert torch.equal(with_grad.detach(), no_grad)  # the same model's log-probs: bitwise, with or without grad
    with_grad.sum().backward()
    probs = torch.softmax(logits, -1)
    onehot = F.one_hot(tokens, 50).double()
    assert torch.allclose(leaf.grad.double(), ((onehot - probs) / 0.9) @ weight.double(), atol=1e-5)


def test_tokens_whose_probability_underflows_keep_an_exact_log_prob():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(4, 8, generator=g), torch.randn(50, 8, generator=g)
    hidden[:, 0], weight[7] = 3.0, torch.tensor([-40.0] + [0.0] * 7)  # token 7: logit ≈ −120, far below the rest
    tokens = torch.tensor([7, 7, 3, 7])
    expected = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert expected[0] < -80  # exp of it underflows float32's normal range: log(softmax) would be wrong
    leaf = hidden.clone().requires_grad_()
    with_grad = head_logprobs(leaf, weight, tokens)
    with torch.no_grad():
        no_grad = head_logprobs(hidden, weight, tokens)
    assert torch.allclose(with_grad.double(), expected, rtol=1e-6, atol=1e-5)
    assert torch.equal(with_grad.detach(), no_grad)
    with_grad.sum().backward()
    assert torch.isfinite(leaf.grad).all()


def test_bf16_head_matches_the_fp32_computation_of_its_bf16_logits():
    hidden = torch.randn(6, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.bfloat16, requires_grad=True)
    tokens = torch.randint(0, 50, (6,))
    out = head_logprobs(hidden, weight, tokens, 0.5)
    logits = F.linear(hidden, weight).float() / 0.5  # the plain path: bf16 logits, fp32 log-softmax
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-5)
    upstream = torch.linspace(-1, 1, 6)  # rows of either sign: the backward's row factor −g
    (out * upstream).sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    # the gradients of the plain path's bf16 logits, to bf16's precision
    plain_hidden, plain_weight = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    plain = torch.log_softmax(F.linear(plain_hidden, plain_weight) / 0.5, -1).gather(-1, tokens[:, None]).squeeze(-1)
    (plain * upstream).sum().backward()
    for mine, theirs in ((hidden.grad, plain_hidden.grad), (weight.grad, plain_weight.grad)):
        assert torch.allclose(mine.float(), theirs, atol=2e-2 * float(theirs.abs().max()), rtol=2e-2)


def test_fused_backward_runs_once():
    hidden = torch.randn(4, 8, requires_grad=True)
    out = head_logprobs(hidden, torch.randn(50, 8), torch.randint(0, 50, (4,)))
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        out.sum().backward()


def test_heads_the_fused_path_does_not_fit_fall_back(tiny_model_dir):
    model = _model(tiny_model_dir)
    batch = _batch(model.config.vocab_size)
    expected = _reference_logprobs(model, *batch, 1.0)

    biased = _model(tiny_model_dir)
    biased.lm_head = torch.nn.Linear(biased.config.n_embd, biased.config.vocab_size, bias=True)
    assert fused_head_weight(biased) is None

    scaled = _model(tiny_model_dir)  # a model that changes its head's output (soft-capping, scaling)
    scaled.lm_head.register_forward_hook(lambda module, args, out: out * 2)
    assert fused_head_weight(scaled) is None
    with torch.no_grad():
        got = completion_logprobs(scaled, *batch)
        assert torch.allclose(got, _reference_logprobs(scaled, *batch, 1.0), atol=1e-5)
        assert not torch.allclose(got, expected, atol=1e-3)

    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(_model(tiny_model_dir), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    assert fused_head_weight(lora) is None
    with torch.no_grad():
        assert torch.allclose(completion_logprobs(lora, *batch), expected, atol=1e-5)  # LoRA B starts at 0


def test_lora_model_uses_the_fused_head(tiny_model_dir):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(_model(tiny_model_dir), peft.LoraConfig(r=2, target_modules=["c_attn"]))
    assert fused_head_weight(lora) is not None
    batch = _batch(lora.config.vocab_size)
    values = completion_logprobs(lora, *batch)
    values.sum().backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)
    with lora.disable_adapter(), torch.no_grad():
        assert torch.allclose(completion_logprobs(lora, *batch), values.detach(), atol=1e-5)


def test_check_leaves_training_mode_and_random_state(tiny_model_dir):
    model = _model(tiny_model_dir).train()
    state = torch.random.get_rng_state()
    assert fused_head_weight(model) is not None
    assert model.training and torch.equal(torch.random.get_rng_state(), state)


def test_ddp_wrapped_model_uses_the_fused_head(tiny_model_dir, tmp_path):
    """Through DDP's own __call__ (its gradient hooks fire), the same gradients as the bare model."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        bare, wrapped = _model(tiny_model_dir), torch.nn.parallel.DistributedDataParallel(_model(tiny_model_dir))
        assert fused_head_weight(wrapped) is wrapped.module.lm_head.weight
        batch = _batch(bare.config.vocab_size)
        for model in (bare, wrapped):
            completion_logprobs(model, *batch, 0.9).sum().backward()
        for (name, a), b in zip(bare.named_parameters(), wrapped.module.parameters()):
            assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    finally:
        dist.destroy_process_group()


def test_cpu_linear_and_decode_head_equal_torchs_linear_and_can_be_switched_off(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 16, generator=g), torch.randn(300, 16, generator=g)
    expected = F.linear(x, w)
    if torch.backends.mkldnn.is_available():
        assert lp_lib._onednn_linear_available()  # the path this machine takes
    assert torch.allclose(lp_lib.linear(x, w), expected, atol=1e-5)
    assert torch.allclose(lp_lib.linear(x, w.t().contiguous().t()), expected, atol=1e-5)  # a strided weight
    assert torch.allclose(lp_lib.linear(x.t().contiguous().t(), w), expected, atol=1e-5)  # a strided input
    narrow = w[:40]  # under _NARROW output features: oneDNN on every CPU, as a small model's hidden gradient
    assert torch.allclose(lp_lib.linear(x, narrow), F.linear(x, narrow), atol=1e-5)
    monkeypatch.setenv("ALIGN_ONEDNN", "1")  # forced: the wide matmul through oneDNN on Intel too
    assert lp_lib._onednn_for(300) and torch.allclose(lp_lib.linear(x, w), expected, atol=1e-5)
    monkeypatch.delenv("ALIGN_ONEDNN")
    assert torch.allclose(lp_lib.DecodeHead(w, 37)(x), expected, atol=1e-5)
    assert torch.allclose(lp_lib.DecodeHead(w, 4)(x[:3]), expected[:3], atol=1e-5)  # packed for 4 rows, used with 3
    leaf = x.clone().requires_grad_()
    out = lp_lib.linear(leaf, w)  # with autograd: torch's own op, so the gradient exists
    out.sum().backward()
    assert torch.allclose(leaf.grad, w.sum(0).expand_as(x), atol=1e-5)
    monkeypatch.setenv("ALIGN_ONEDNN", "0")
    lp_lib._onednn_linear_available.cache_clear()
    try:
        assert not lp_lib._onednn_linear_available()
        assert lp_lib.DecodeHead(w, 37).packed is None
        assert torch.allclose(lp_lib.linear(x, w), expected, atol=1e-5)
    finally:
        monkeypatch.delenv("ALIGN_ONEDNN")
        lp_lib._onednn_linear_available.cache_clear()
