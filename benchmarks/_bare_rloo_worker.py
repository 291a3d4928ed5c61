"""The machine's floor for an RLOO step: a bare PyTorch loop, no framework (floor.py's other side).

    .venv/bin/python benchmarks/_bare_rloo_worker.py MODEL_DIR PROMPTS.jsonl NEW_TOKENS STEPS LR

Per step, the same compute as align's RLOO step: 4 prompts encoded once, their KV cache
repeated for k = 4 samples, exactly NEW_TOKENS sampled tokens (EOS masked), decode, length
reward, one policy forward + backward and one reference forward on [prompt | completion],
the RLOO loss with β·KL in the reward, gradient clipping, one AdamW step.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULT_PREFIX, length_reward  # noqa: E402

K, PROMPTS_PER_STEP, BETA = 4, 4, 0.05


@torch.no_grad()
def sample(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, eos: int) -> torch.Tensor:
    """[N·K, new_tokens] sampled ids; EOS can never be drawn (min = max new tokens)."""
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    cache.batch_repeat_interleave(K)
    logits = out.logits[:, -1].repeat_interleave(K, 0)
    attention = mask.repeat_interleave(K, 0)
    next_position = attention.sum(-1, keepdim=True)
    tokens = []
    for t in range(new_tokens):
        logits[:, eos] = float("-inf")
        # inverse CDF with one uniform per row: torch.multinomial (and any per-element noise such as
        # Gumbel-max) costs ~10 ms per call over a 30k vocabulary on CPU, 16 uniforms cost nothing
        cdf = logits.softmax(-1).cumsum(-1)
        u = torch.rand(cdf.shape[0], 1) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)
        tokens.append(token)
        if t == new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones_like(token)], 1)
        out = model(input_ids=token, attention_mask=attention, position_ids=next_position, cache=cache)
        logits, next_position = out.logits[:, -1], next_position + 1
    return torch.cat(tokens, 1)


def logprobs(model, ids: torch.Tensor, mask: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    full = torch.cat([ids, completion], 1)
    attention = torch.cat([mask, torch.ones_like(completion)], 1)
    position = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=full, attention_mask=attention, position_ids=position).logits[:, ids.shape[1] - 1 : -1]
    return logits.gather(-1, completion[..., None]).squeeze(-1) - logits.logsumexp(-1)


def main(argv: list[str]) -> int:
    model_dir, prompts_path, new_tokens, steps, lr = argv
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir).requires_grad_(False).eval()
    for module in policy.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    optimizer = torch.optim.AdamW(policy.parameters(), lr=float(lr))
    prompts = [json.loads(line)["prompt"] for line in Path(prompts_path).read_text().splitlines()]
    rng = random.Random(0)
    step_s = []
    for _ in range(int(steps)):
        started = time.perf_counter()
        batch = tokenizer(rng.sample(prompts, PROMPTS_PER_STEP), return_tensors="pt", padding=True)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        completion = sample(policy, ids, mask, int(new_tokens), tokenizer.eos_token_id)
        rewards = torch.tensor(length_reward(tokenizer.batch_decode(completion, skip_special_tokens=True)))
        ids, mask = ids.repeat_interleave(K, 0), mask.repeat_interleave(K, 0)
        policy_lp = logprobs(policy, ids, mask, completion)
        with torch.no_grad():
            ref_lp = logprobs(reference, ids, mask, completion)
        ell = policy_lp.sum(-1)
        regularised = (rewards - BETA * (ell.detach() - ref_lp.sum(-1))).view(PROMPTS_PER_STEP, K)
        baseline = (regularised.sum(-1, keepdim=True) - regularised) / (K - 1)
        loss = -((regularised - baseline).view(-1) * ell).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - started)
    print(RESULT_PREFIX + json.dumps({"step_s": step_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
