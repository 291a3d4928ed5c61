"""``sentiment``: VADER's sentiment score of the completion (Hutto & Gilbert 2014).

VADER sums valence scores of lexicon words (adjusted for negation, intensifiers, capitals and
punctuation) into ``s`` and squashes it: ``compound = s / sqrt(s² + 15)``, in [-1, 1]. Options:
``field`` picks ``compound`` (default) or one of VADER's proportions ``pos``, ``neu``, ``neg``
(in [0, 1]); ``include_prompt`` scores ``prompt + completion`` instead of the completion alone.
An empty completion scores 0 (compound, pos, neg) or 1 (neu), as VADER defines it.
"""

from __future__ import annotations

from typing import Any, Literal

from rewards.base import Reward


class Sentiment(Reward):
    name = "sentiment"

    def __init__(self, field: Literal["compound", "pos", "neu", "neg"] = "compound", include_prompt: bool = False):
        if field not in ("compound", "pos", "neu", "neg"):
            raise ValueError(f"sentiment: field must be compound, pos, neu or neg, got {field!r}")
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()
        self.field = field
        self.include_prompt = include_prompt

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions)] if self.include_prompt else completions
        return [float(self.analyzer.polarity_scores(t)[self.field]) for t in texts]
