"""``rouge``: ROUGE of the completion against a reference column (Lin 2004, ``rouge-score``).

``rouge1`` / ``rouge2`` count overlapping unigrams / bigrams, ``rougeL`` the longest common
subsequence; the reward is their F-measure (``measure: fmeasure``, default) or ``precision`` /
``recall``, in [0, 1]. The reference comes from the column ``reference_column`` (default
``reference``); a sample whose reference is a list of strings scores the best of them.
``use_stemmer`` applies the Porter stemmer. An empty completion (or reference) scores 0.
"""

from __future__ import annotations

from typing import Any, Literal

from rewards.base import Reward, column


class Rouge(Reward):
    name = "rouge"

    def __init__(
        self,
        rouge_type: Literal["rouge1", "rouge2", "rougeL"] = "rougeL",
        measure: Literal["fmeasure", "precision", "recall"] = "fmeasure",
        reference_column: str = "reference",
        use_stemmer: bool = False,
    ):
        if rouge_type not in ("rouge1", "rouge2", "rougeL"):
            raise ValueError(f"rouge: rouge_type must be rouge1, rouge2 or rougeL, got {rouge_type!r}")
        if measure not in ("fmeasure", "precision", "recall"):
            raise ValueError(f"rouge: measure must be fmeasure, precision or recall, got {measure!r}")
        from rouge_score import rouge_scorer

        self.scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=use_stemmer)
        self.rouge_type, self.measure, self.reference_column = rouge_type, measure, reference_column

    def score(self, reference: str, completion: str) -> float:
        return float(getattr(self.scorer.score(reference, completion)[self.rouge_type], self.measure))

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        references = column(columns, self.reference_column, len(completions), self.name)
        out = []
        for ref, text in zip(references, completions):
            refs = [ref] if isinstance(ref, str) else list(ref)
            out.append(max((self.score(r, text) for r in refs), default=0.0))
        return out
