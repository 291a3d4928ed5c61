"""The entailment reward on tiny random NLI models built here (BERT, 3 labels in shuffled orders).

Scores are checked against an independent softmax of the model's logits; windowing against a
premise ten times longer than the model's limit.
"""

from __future__ import annotations

import functools
import math
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
)

import rewards
from rewards.entailment import Entailment, pack_sentences, sentence_spans

MAX_LEN = 32
WORDS = "the cat dog sat on a mat ran in park it was sunny day big small red blue house tree".split()
LABEL_ORDERS = {
    "upper_first": {0: "ENTAILMENT", 1: "NEUTRAL", 2: "CONTRADICTION"},
    "mixed_middle": {0: "CONTRADICTION", 1: "entailment", 2: "Neutral"},
    "lower_last": {0: "neutral", 1: "contradiction", 2: "Entailment"},
}


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def build_nli(out: Path, id2label: dict[int, str], seed: int = 0) -> Path:
    """A 2-layer BERT NLI classifier with a WordLevel tokenizer, saved to ``out``."""
    rng = random.Random(seed)
    corpus = [sentence(rng, rng.randint(3, 9)) for _ in range(200)]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=MAX_LEN,
    )
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_LEN,
        num_labels=3,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        pad_token_id=tok.token_to_id("[PAD]"),
    )
    BertForSequenceClassification(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def nli_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nli")
    return {k: build_nli(root / k, v, seed=i) for i, (k, v) in enumerate(LABEL_ORDERS.items())}


@functools.cache
def load(path: Path):
    return AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path).eval()


def independent_logprob(path: Path, premise: str, hypothesis: str) -> float:
    """log p(entailment) computed without the reward's code: tokenizer, model, softmax."""
    tok, model = load(path)
    entail = next(i for i, lab in model.config.id2label.items() if lab.lower() == "entailment")
    enc = tok(premise, hypothesis, return_tensors="pt")
    assert enc["input_ids"].shape[1] <= MAX_LEN
    with torch.no_grad():
        logits = model(**enc).logits[0].double()
    return float(torch.log(torch.exp(logits[entail]) / torch.exp(logits).sum()))


SHORT = [
    ("the cat sat on a mat.", "the cat sat."),
    ("it was a sunny day in the park.", "the dog ran in the park."),
    ("a big red house.", "a small blue tree."),
]


@pytest.mark.parametrize("order", list(LABEL_ORDERS))
def test_prob_matches_independent_softmax_for_any_label_order(nli_dirs, order):
    path = nli_dirs[order]
    reward = rewards.build("entailment", model=str(path), device="cpu")
    assert reward.model.config.id2label[reward.entail_id].lower() == "entailment"
    premises, hyps = [p for p, _ in SHORT], [h for _, h in SHORT]
    probs = reward(["x"] * 3, hyps, document=premises)
    expected = [math.exp(independent_logprob(path, p, h)) for p, h in SHORT]
    assert probs == pytest.approx(expected, abs=1e-5)
    logp = rewards.build("entailment", model=str(path), output="logprob")(["x"] * 3, hyps, document=premises)
    assert logp == pytest.approx([math.log(e) for e in expected], abs=1e-5)
    lo, mid, hi = sorted(expected)
    threshold = (lo + mid) / 2  # between two scores, away from rounding
    binary = rewards.build("entailment", model=str(path), output="binary", threshold=threshold)
    assert binary(["x"] * 3, hyps, document=premises) == [float(e >= threshold) for e in expected]


def test_premise_column_option(nli_dirs):
    path = nli_dirs["mixed_middle"]
    reward = rewards.build("entailment", model=str(path), premise_column="source")
    got = reward(["x"], [SHORT[0][1]], source=[SHORT[0][0]])
    assert got == pytest.approx([math.exp(independent_logprob(path, *SHORT[0]))], abs=1e-5)
    with pytest.raises(KeyError, match="needs column 'source'"):
        reward(["x"], ["a cat."], document=["the cat."])


def test_empty_completion_gets_the_documented_score(nli_dirs):
    path = str(nli_dirs["upper_first"])
    prob = rewards.build("entailment", model=path)
    assert prob(["x", "x"], ["", "   "], document=["the cat sat.", "the dog."]) == [0.0, 0.0]
    logprob = rewards.build("entailment", model=path, output="logprob")
    assert logprob(["x"], [""], document=["the cat sat."]) == [rewards.entailment.EMPTY_LOGPROB]
    custom = rewards.build("entailment", model=path, empty_score=-1.0)
    mixed = custom(["x", "x"], ["", "the cat."], document=["the cat sat.", "the cat sat."])
    assert mixed[0] == -1.0 and 0.0 < mixed[1] < 1.0


def test_missing_entailment_label_is_a_clear_error(tmp_path):
    path = build_nli(tmp_path / "bad", {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    with pytest.raises(ValueError, match=r"no label named 'entailment'.*LABEL_0.*LABEL_2") as err:
        rewards.build("entailment", model=str(path))
    assert str(path) in str(err.value)


def long_premise(seed: int = 0) -> str:
    rng = random.Random(seed)
    text, n_tokens = [], 0
    while n_tokens < 10 * MAX_LEN:
        s = sentence(rng, rng.randint(3, 12))
        text.append(s)
        n_tokens += len(s.split()) + 1  # words plus the period
    return " ".join(text)


def assert_windows_cover(reward: Entailment, premise: str, hypothesis: str) -> list[tuple[int, int]]:
    spans = reward.window_spans(premise, hypothesis)
    offsets = reward.tokenizer(premise, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets) >= 10 * MAX_LEN
    for start, end in offsets:  # every premise token lies inside some window
        assert any(c0 <= start and end <= c1 for c0, c1 in spans), (start, end)
    hyp_len = len(reward.tokenizer(hypothesis, add_special_tokens=False)["input_ids"])
    for c0, c1 in spans:  # every window fits the model together with the hypothesis
        ids = reward.tokenizer(premise[c0:c1], hypothesis)["input_ids"]
        assert len(ids) <= MAX_LEN
        assert len(ids) == len(reward.tokenizer(premise[c0:c1], add_special_tokens=False)["input_ids"]) + hyp_len + 3
    return spans


def test_sentence_windows_cover_the_premise_with_whole_sentences(nli_dirs):
    reward = rewards.build("entailment", model=str(nli_dirs["mixed_middle"]))
    premise, hypothesis = long_premise(), "the cat sat on a mat."
    spans = assert_windows_cover(reward, premise, hypothesis)
    assert len(spans) > 10
    sentences = sentence_spans(premise)
    for s0, s1 in sentences:  # each sentence (all fit the budget) is whole in some window
        assert any(c0 <= s0 and s1 <= c1 for c0, c1 in spans)
    for c0, c1 in spans:  # windows start and end on sentence boundaries
        assert c0 in {s for s, _ in sentences} and c1 in {e for _, e in sentences}
    pairs = list(zip(spans, spans[1:]))
    assert all(a0 < b0 and a1 < b1 for (a0, a1), (b0, b1) in pairs)  # windows move forward
    assert sum(b0 < a1 for (_, a1), (b0, _) in pairs) >= len(pairs) // 2  # most share a sentence


def test_token_windows_and_long_sentences(nli_dirs):
    reward = rewards.build("entailment", model=str(nli_dirs["lower_last"]), windowing="tokens", overlap_tokens=5)
    assert_windows_cover(reward, long_premise(1), "a dog.")
    # one sentence with no full stop, longer than the budget: cut into token windows
    words = random.Random(3).choices(WORDS, k=12 * MAX_LEN)
    reward = rewards.build("entailment", model=str(nli_dirs["lower_last"]))
    spans = assert_windows_cover(reward, " ".join(words), "a dog.")
    assert len(spans) >= 12


def test_pack_sentences_on_token_counts():
    # sentences as token spans; budget 10
    sents = [(0, 4), (4, 8), (8, 11), (11, 25), (25, 27)]
    windows = pack_sentences(sents, budget=10, overlap_sentences=1, overlap_tokens=2)
    assert windows == [(0, 8), (4, 11), (11, 21), (19, 25), (25, 27)]
    assert pack_sentences(sents, budget=10, overlap_sentences=0, overlap_tokens=0)[:2] == [(0, 8), (8, 11)]


@pytest.mark.parametrize("windowing", ["sentences", "tokens"])
def test_max_and_mean_aggregate_equal_independent_window_scores(nli_dirs, windowing):
    path = nli_dirs["mixed_middle"]
    premise, hypothesis = long_premise(2), "it was a big day."
    reward = rewards.build("entailment", model=str(path), windowing=windowing, batch_size=5)
    spans = reward.window_spans(premise, hypothesis)
    window_logps = [independent_logprob(path, premise[c0:c1], hypothesis) for c0, c1 in spans]
    got = reward(["x"], [hypothesis], document=[premise])
    assert got == pytest.approx([math.exp(max(window_logps))], abs=1e-5)
    mean = rewards.build("entailment", model=str(path), windowing=windowing, aggregate="mean", output="logprob")
    expected = math.log(sum(math.exp(v) for v in window_logps) / len(window_logps))
    assert mean(["x"], [hypothesis], document=[premise]) == pytest.approx([expected], abs=1e-5)


@pytest.mark.parametrize("windowing", ["sentences", "tokens"])
def test_aggregate_on_clearly_different_window_scores(nli_dirs, windowing):
    """With a stubbed scorer, one window clearly entails (log p = -0.1) and the rest do not
    (-3, -2, -4, ...): ``max`` is that window's score, ``mean`` the log of the mean probability.

    The tiny NLI model scores all windows alike, so only distinct scores tell max from a
    log-mean-exp (here -0.1 against about -2.1)."""
    premise, hypothesis = long_premise(3), "it was a big day."
    for aggregate in ("max", "mean"):
        reward = rewards.build(
            "entailment", model=str(nli_dirs["upper_first"]), windowing=windowing, aggregate=aggregate, output="logprob"
        )
        spans = reward.window_spans(premise, hypothesis)
        assert len(spans) >= 3
        values = [-3.0, -0.1] + [-2.0 - (i % 3) for i in range(len(spans) - 2)]
        by_window = {premise[c0:c1]: v for (c0, c1), v in zip(spans, values)}
        assert len(by_window) == len(spans), "window texts must be distinct for the stub"
        reward.pair_logprobs = lambda premises, hypotheses, table=by_window: [table[p] for p in premises]
        got = reward(["x"], [hypothesis], document=[premise])[0]
        if aggregate == "max":
            assert got == pytest.approx(-0.1, abs=1e-12)
        else:
            expected = math.log(sum(math.exp(v) for v in values) / len(values))
            assert got == pytest.approx(expected, abs=1e-12)
            assert got < -1.0  # far from the max: a max-for-mean swap cannot pass


def test_batch_mixes_short_long_and_duplicate_samples(nli_dirs):
    path = nli_dirs["upper_first"]
    reward = rewards.build("entailment", model=str(path), batch_size=3)
    long = long_premise(4)
    prompts = ["x"] * 4
    completions = ["the cat sat.", "a red tree.", "the cat sat.", ""]
    docs = [SHORT[0][0], long, SHORT[0][0], long]
    got = reward(prompts, completions, document=docs)
    alone = [reward(["x"], [c], document=[d])[0] for c, d in zip(completions, docs)]
    assert got == pytest.approx(alone, abs=1e-6)
    assert got[0] == got[2] and got[3] == 0.0


def test_long_hypothesis_is_cut_to_half_the_model(nli_dirs):
    reward = rewards.build("entailment", model=str(nli_dirs["upper_first"]))
    hypothesis = " ".join(["cat"] * 100)
    cut, n = reward.fit_hypothesis(hypothesis)
    assert n == (MAX_LEN - 3) // 2 and cut == " ".join(["cat"] * n)
    (score,) = reward(["x"], [hypothesis], document=[long_premise()])
    assert 0.0 <= score <= 1.0


def test_hypothesis_is_kept_whole_when_the_pair_fits(nli_dirs):
    """A hypothesis longer than half the model is cut only when the pair does not fit."""
    path = nli_dirs["upper_first"]
    reward = rewards.build("entailment", model=str(path), output="logprob")
    premise, hypothesis = "the cat sat.", " ".join(WORDS[:20])  # 4 + 20 tokens <= 32 - 3
    assert reward.fit_hypothesis(hypothesis, premise_tokens=4) == (hypothesis, 20)
    assert reward.window_spans(premise, hypothesis) == [(0, len(premise))]
    scored, real = [], reward.pair_logprobs
    reward.pair_logprobs = lambda ps, hs: scored.extend(zip(ps, hs)) or real(ps, hs)
    (got,) = reward(["x"], [hypothesis], document=[premise])
    assert scored == [(premise, hypothesis)]  # the whole hypothesis reaches the model
    assert got == pytest.approx(independent_logprob(path, premise, hypothesis), abs=1e-5)
