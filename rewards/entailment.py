"""``entailment``: does the source document entail the completion? (Roit et al. 2023)

An NLI classifier (any ``AutoModelForSequenceClassification`` with an entailment class, e.g.
``microsoft/deberta-large-mnli`` or ``cross-encoder/nli-deberta-v3-base``, by hub id or local
path) reads the pair (premise = the sample's ``premise_column``, default ``document``;
hypothesis = the completion). With ``e`` the index of the label named "entailment" in the
model's ``config.id2label`` (any case, any position):

    log p(entail | premise, hypothesis) = log_softmax(logits)[e]

**Long premises.** A premise longer than the model allows is split into windows: the budget per
window is ``max_length − special tokens − |hypothesis|`` tokens, where ``max_length`` is the
smaller of the tokenizer's ``model_max_length`` and the model's position limit (or the
``max_length`` option). ``windowing: sentences`` (default) packs whole sentences greedily into
each window, consecutive windows sharing ``overlap_sentences`` sentences; a sentence longer than
the budget alone is cut into token windows of the budget with ``overlap_tokens`` tokens shared
between neighbours (default a quarter of the budget). ``windowing: tokens`` uses token windows
throughout. Together the windows cover every premise token. The window scores are aggregated
(``aggregate``) in log space: ``max`` (default, Roit et al.: the document entails the summary if
some part of it does) or ``mean`` (log of the mean probability). A hypothesis is kept whole when
it fits beside the premise; otherwise, if longer than half the model's limit, it is cut to its
first half-limit tokens so each window keeps room for premise.

**Output.** ``output: prob`` (default) is p(entail) in [0, 1]; ``logprob`` is its log;
``binary`` is 1.0 if p(entail) ≥ ``threshold`` (default 0.5) else 0.0.

**Empty completion.** A completion that is empty or only whitespace is not sent to the model
(an empty claim is trivially "entailed" and would be a free reward); it scores ``empty_score``
if given, else the worst value of the output: 0.0 for ``prob`` and ``binary``, and
``EMPTY_LOGPROB`` (−20, i.e. p ≈ 2e-9) for ``logprob``.

Windowing needs a fast tokenizer (character offsets), which every ``tokenizers``-backed
tokenizer provides. Identical (premise window, hypothesis) pairs in a call are scored once.
"""

from __future__ import annotations

import bisect
import math
import re
from typing import Any, Literal

import torch

from rewards.base import Reward, column, load_pretrained, resolve_device

ENTAILMENT_LABELS = ("entailment", "entails", "entailed")
EMPTY_LOGPROB = -20.0
# models whose learned positions start after the padding index (usable = max_positions − pad − 1)
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer"}
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")


def entailment_index(id2label: dict[int, str], model: str = "model") -> int:
    """Index of the entailment class in ``id2label``, whatever its position or case."""
    found = [int(i) for i, label in id2label.items() if str(label).strip().lower() in ENTAILMENT_LABELS]
    if len(found) != 1:
        what = "no label" if not found else "several labels"
        raise ValueError(
            f"entailment: model {model!r} has {what} named 'entailment' in config.id2label "
            f"{dict(sorted(id2label.items()))}; use an NLI model or fix its config.json id2label"
        )
    return found[0]


def model_max_length(tokenizer: Any, config: Any) -> int | None:
    """Longest input the model takes: min(tokenizer.model_max_length, position limit)."""
    limits = []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max and tok_max < 1_000_000:  # transformers' "unset" value is 1e30
        limits.append(int(tok_max))
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        if getattr(config, "model_type", "") in _OFFSET_POSITIONS:
            positions -= (getattr(config, "pad_token_id", None) or 0) + 1
        limits.append(int(positions))
    return min(limits) if limits else None


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text`` (split after . ! ? and at line breaks)."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if m.start() > start:
            spans.append((start, m.start()))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def token_windows(start: int, end: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Windows of ``size`` tokens over [start, end), neighbours sharing ``overlap`` tokens."""
    stride = max(1, size - overlap)
    out, s = [], start
    while True:
        e = min(s + size, end)
        out.append((s, e))
        if e >= end:
            return out
        s += stride


def pack_sentences(
    sentences: list[tuple[int, int]], budget: int, overlap_sentences: int, overlap_tokens: int
) -> list[tuple[int, int]]:
    """Token windows made of whole consecutive sentences (``sentences``: token spans, in order).

    Each window holds as many sentences as fit in ``budget`` tokens; the next one starts
    ``overlap_sentences`` sentences before the previous end (if that adds a new sentence). A
    sentence longer than ``budget`` is cut into token windows.
    """
    windows: list[tuple[int, int]] = []
    i, done = 0, 0  # next sentence to start from; sentences [0, done) are all covered
    n = len(sentences)
    while i < n:
        first = sentences[i]
        if first[1] - first[0] > budget:
            windows += token_windows(first[0], first[1], budget, overlap_tokens)
            i = done = i + 1
            continue
        j = i + 1
        while j < n and sentences[j][1] - first[0] <= budget:
            j += 1
        if j <= done:  # the overlap left no room for a new sentence: start afresh
            i = done
            continue
        windows.append((first[0], sentences[j - 1][1]))
        done = j
        i = max(i + 1, j - overlap_sentences)
        if j >= n:
            break
    return windows


class Entailment(Reward):
    name = "entailment"

    def __init__(
        self,
        model: str,
        premise_column: str = "document",
        output: Literal["prob", "logprob", "binary"] = "prob",
        threshold: float = 0.5,
        aggregate: Literal["max", "mean"] = "max",
        windowing: Literal["sentences", "tokens"] = "sentences",
        overlap_sentences: int = 1,
        overlap_tokens: int | None = None,
        max_length: int | None = None,
        batch_size: int = 16,
        empty_score: float | None = None,
        tokenizer: str | None = None,
        device: str | None = None,
    ):
        if output not in ("prob", "logprob", "binary"):
            raise ValueError(f"entailment: output must be prob, logprob or binary, got {output!r}")
        if aggregate not in ("max", "mean"):
            raise ValueError(f"entailment: aggregate must be max or mean, got {aggregate!r}")
        if windowing not in ("sentences", "tokens"):
            raise ValueError(f"entailment: windowing must be sentences or tokens, got {windowing!r}")
        self.device = resolve_device(device)
        self.tokenizer, self.model = load_pretrained(
            model, tokenizer, "AutoModelForSequenceClassification", self.device
        )
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"entailment: the tokenizer of {model!r} is not a fast tokenizer (no offsets)")
        self.entail_id = entailment_index(self.model.config.id2label, model)
        self.max_length = max_length or model_max_length(self.tokenizer, self.model.config)
        if not self.max_length:
            raise ValueError(f"entailment: cannot tell the maximum input length of {model!r}; set max_length")
        self.specials = self.tokenizer.num_special_tokens_to_add(pair=True)
        if self.max_length - self.specials < 4:
            raise ValueError(f"entailment: max_length {self.max_length} leaves no room for text")
        self.premise_column, self.output, self.threshold = premise_column, output, float(threshold)
        self.aggregate, self.windowing = aggregate, windowing
        self.overlap_sentences, self.overlap_tokens = max(0, int(overlap_sentences)), overlap_tokens
        self.batch_size = int(batch_size)
        if empty_score is None:
            empty_score = EMPTY_LOGPROB if output == "logprob" else 0.0
        self.empty_score = float(empty_score)

    # -- windows ---------------------------------------------------------------------------------

    def _offsets(self, text: str) -> list[tuple[int, int]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(o) for o in enc["offset_mapping"]]

    def fit_hypothesis(self, hypothesis: str, premise_tokens: int | None = None) -> tuple[str, int]:
        """The hypothesis and its length in tokens: whole when it fits beside the premise
        (``premise_tokens``), else cut to half the model's room so each window keeps the rest."""
        offsets = self._offsets(hypothesis)
        room = self.max_length - self.specials
        if premise_tokens is not None and premise_tokens + len(offsets) <= room:
            return hypothesis, len(offsets)
        if len(offsets) > room // 2:
            return hypothesis[: offsets[room // 2 - 1][1]], room // 2
        return hypothesis, len(offsets)

    def window_spans(self, premise: str, hypothesis: str) -> list[tuple[int, int]]:
        """Character spans of ``premise`` scored against ``hypothesis`` (one span if it fits)."""
        _, hyp_len = self.fit_hypothesis(hypothesis, len(self._offsets(premise)))
        return self._window_spans(premise, self.max_length - self.specials - hyp_len)

    def _window_spans(self, premise: str, budget: int) -> list[tuple[int, int]]:
        offsets = self._offsets(premise)
        if len(offsets) <= budget:
            return [(0, len(premise))]
        overlap = budget // 4 if self.overlap_tokens is None else min(max(0, self.overlap_tokens), budget - 1)
        if self.windowing == "tokens":
            spans = token_windows(0, len(offsets), budget, overlap)
        else:
            # sentence k = the tokens starting after sentence k-1 ends and before sentence k ends
            # (a token starting in the whitespace between two sentences joins the next one)
            starts = [o[0] for o in offsets]
            ends = sorted({bisect.bisect_left(starts, c1) for _, c1 in sentence_spans(premise)} | {len(offsets)})
            sentences = [(a, b) for a, b in zip([0, *ends], ends) if b > a]
            spans = pack_sentences(sentences, budget, self.overlap_sentences, overlap)
        return [(offsets[t0][0], offsets[t1 - 1][1]) for t0, t1 in spans]

    # -- scoring ---------------------------------------------------------------------------------

    @torch.no_grad()
    def pair_logprobs(self, premises: list[str], hypotheses: list[str]) -> list[float]:
        """log p(entail) of each (premise, hypothesis) pair, each assumed to fit the model."""
        out: list[float] = []
        for lo in range(0, len(premises), self.batch_size):
            enc = self.tokenizer(
                premises[lo : lo + self.batch_size],
                hypotheses[lo : lo + self.batch_size],
                truncation="only_first",
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**enc).logits.float()
            out += torch.log_softmax(logits, dim=-1)[:, self.entail_id].tolist()
        return out

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        premises = column(columns, self.premise_column, len(completions), self.name)
        pairs: dict[tuple[str, str], int] = {}  # unique (window text, hypothesis) -> row
        per_sample: list[list[int] | None] = []
        windows_cache: dict[tuple[str, int], list[tuple[int, int]]] = {}
        premise_tokens: dict[str, int] = {}
        for premise, completion in zip(premises, completions):
            if not completion.strip():
                per_sample.append(None)
                continue
            premise = "" if premise is None else str(premise)
            if premise not in premise_tokens:
                premise_tokens[premise] = len(self._offsets(premise))
            hypothesis, hyp_len = self.fit_hypothesis(completion, premise_tokens[premise])
            budget = self.max_length - self.specials - hyp_len
            key = (premise, budget)
            if key not in windows_cache:
                windows_cache[key] = self._window_spans(premise, budget)
            rows = [pairs.setdefault((premise[c0:c1], hypothesis), len(pairs)) for c0, c1 in windows_cache[key]]
            per_sample.append(rows)
        logps = self.pair_logprobs([p for p, _ in pairs], [h for _, h in pairs]) if pairs else []
        scores = []
        for rows in per_sample:
            if rows is None:
                scores.append(self.empty_score)
                continue
            values = [logps[r] for r in rows]
            if self.aggregate == "max":
                agg = max(values)
            else:
                agg = float(torch.logsumexp(torch.tensor(values, dtype=torch.float64), 0)) - math.log(len(values))
            if self.output == "logprob":
                scores.append(agg)
            elif self.output == "prob":
                scores.append(math.exp(agg))
            else:
                scores.append(1.0 if math.exp(agg) >= self.threshold else 0.0)
        return scores
