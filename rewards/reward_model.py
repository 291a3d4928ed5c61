"""``reward_model``: the scalar output of a learned reward model r(x, y).

Any ``AutoModelForSequenceClassification`` with one output logit (``num_labels = 1``, e.g. one
trained by ``align rm``), by hub id or local path. The text scored is the plain concatenation
``prompt + separator + completion`` (no chat template: use the same formatting the model was
trained on); ``align rm`` writes its ``separator``, ``max_length`` and ``truncation_side`` to
``align_rm.json`` next to the weights and this reward reads them as its defaults.

Texts longer than ``max_length`` tokens (default: the model's limit) are truncated on the
``truncation_side``: ``left`` (default) drops the start of the prompt and keeps the completion,
which is what the reward is about; ``right`` drops the end. Scores are computed in batches of
``batch_size`` under ``torch.no_grad()``; an empty completion is scored like any other text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

from rewards.base import Reward, load_pretrained, resolve_device
from rewards.entailment import model_max_length

FORMAT_FILE = "align_rm.json"


def join_texts(prompts: list[str], completions: list[str], separator: str = "") -> list[str]:
    """What a reward model reads: ``prompt + separator + completion`` for each sample."""
    return [p + separator + c for p, c in zip(prompts, completions)]


def ensure_padding(tokenizer: Any, model: Any | None = None) -> None:
    """Give the tokenizer a pad token (its EOS, else UNK) and the model's config its id.

    Sequence classifiers over decoder models (GPT-2 style) read the last non-pad token, so
    ``config.pad_token_id`` must be set for batches of different lengths.
    """
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError("reward model: the tokenizer has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    if model is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def saved_format(model: str) -> dict[str, Any]:
    """The text format ``align rm`` saved next to a model (empty for other models)."""
    path = Path(model) / FORMAT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


class RewardModel(Reward):
    name = "reward_model"

    def __init__(
        self,
        model: str,
        separator: str | None = None,
        max_length: int | None = None,
        truncation_side: Literal["left", "right"] | None = None,
        batch_size: int = 16,
        tokenizer: str | None = None,
        device: str | None = None,
    ):
        saved = saved_format(model)
        self.separator = separator if separator is not None else saved.get("separator", "")
        side = truncation_side or saved.get("truncation_side", "left")
        if side not in ("left", "right"):
            raise ValueError(f"reward_model: truncation_side must be left or right, got {side!r}")
        self.device = resolve_device(device)
        self.tokenizer, self.model = load_pretrained(
            model, tokenizer, "AutoModelForSequenceClassification", self.device
        )
        self.tokenizer.truncation_side = side
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"reward_model: {model!r} has {self.model.config.num_labels} output labels "
                f"{self.model.config.id2label}; a scalar reward model has exactly one"
            )
        ensure_padding(self.tokenizer, self.model)
        self.max_length = max_length or saved.get("max_length") or model_max_length(self.tokenizer, self.model.config)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> list[float]:
        out: list[float] = []
        for lo in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[lo : lo + self.batch_size],
                truncation=self.max_length is not None,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            out += self.model(**enc).logits[:, 0].float().tolist()
        return out

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return self.score_texts(join_texts(prompts, completions, self.separator))
