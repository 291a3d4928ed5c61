"""``fluency``: how likely a language model finds the completion, per token.

With a causal LM p (typically the SFT policy, by hub id or local path) and the completion's
tokens y_1..y_T encoded after the prompt x (plus the EOS token when ``append_eos``):

    fluency(x, y) = (1/T') Σ_t log p(y_t | x, y_<t)          (``reduction: mean``, default)
    fluency(x, y) =        Σ_t log p(y_t | x, y_<t)          (``reduction: sum``)

T' = T (+1 with EOS). Appending EOS scores whether the text is a plausible *whole* completion:
a run-on or truncated sample pays for the end-of-text the model did not expect. An empty
completion is scored on EOS alone (or gets ``empty_score`` without EOS). Degenerate text --
repetition, word salad, piled-up adjectives -- has a low per-token log-likelihood under the SFT
model, so ``sentiment + w·fluency`` is a gold reward that a sentiment-only proxy can be made to
over-optimise (``align overopt``). Scored in batches under ``torch.no_grad()``, temperature 1.
The first scored token needs a context: with a tokenizer that adds no BOS, an empty prompt leaves
the completion's first token unscored. Sequences longer than the model's positions lose the start
of the prompt first, then the end of the completion.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from rewards.base import Reward, load_pretrained, resolve_device


class Fluency(Reward):
    name = "fluency"

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        reduction: Literal["mean", "sum"] = "mean",
        append_eos: bool = True,
        empty_score: float = -20.0,
        batch_size: int = 64,
        device: str | None = None,
    ):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"fluency: reduction must be 'mean' or 'sum', got {reduction!r}")
        self.device = resolve_device(device)
        self.tokenizer, self.model = load_pretrained(model, tokenizer, "AutoModelForCausalLM", self.device)
        self.reduction = reduction
        self.append_eos = bool(append_eos) and self.tokenizer.eos_token_id is not None
        self.empty_score = float(empty_score)
        self.batch_size = int(batch_size)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self.max_length = getattr(self.model.config, "n_positions", None) or getattr(
            self.model.config, "max_position_embeddings", None
        )

    def encode(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """(context ids, scored ids): the prompt as the model would see it, then the completion."""
        context = self.tokenizer(prompt)["input_ids"]
        scored = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
        if self.append_eos:
            scored = scored + [self.tokenizer.eos_token_id]
        if self.max_length is not None and len(context) + len(scored) > self.max_length:
            keep = max(self.max_length - len(scored), 1)  # cut the prompt's start, then the completion's end
            context = context[-keep:]
            scored = scored[: self.max_length - len(context)]
        return context, scored

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        out: list[float] = []
        for lo in range(0, len(completions), self.batch_size):
            chunk = slice(lo, lo + self.batch_size)
            rows = [self.encode(p, c) for p, c in zip(prompts[chunk], completions[chunk])]
            width = max(len(c) + len(s) for c, s in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros_like(ids)
            scored = torch.zeros_like(ids, dtype=torch.bool)
            for i, (context, target) in enumerate(rows):
                n = len(context) + len(target)
                ids[i, :n] = torch.tensor(context + target)
                attention[i, :n] = 1
                scored[i, len(context) : n] = True
            ids, attention, scored = ids.to(self.device), attention.to(self.device), scored.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
            logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            mask = scored[:, 1:].float()
            total = (logp * mask).sum(-1)
            count = mask.sum(-1)
            for value, n in zip(total.tolist(), count.tolist()):
                if n == 0:
                    out.append(self.empty_score)
                else:
                    out.append(value / n if self.reduction == "mean" else value)
        return out
