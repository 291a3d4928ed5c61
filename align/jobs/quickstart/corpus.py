"""Self-contained quickstart assets: a movie-review corpus, a tokenizer and a tiny GPT-2, built offline.

``align train recipes/quickstart.yaml`` must work on a laptop with no model hub and no dataset hub,
and finish SFT + RL in a few CPU minutes. So everything it needs is generated here, from code:

* a templated grammar of short movie reviews (film nouns, adjectives of both polarities,
  intensifiers, negations, verb phrases) whose VADER sentiment is balanced between positive and
  negative, so that an SFT model starts near a mean compound of 0 and RL toward positive
  sentiment has room to move;
* a byte-level BPE tokenizer trained on that corpus with the ``tokenizers`` library;
* a randomly initialised 2-layer GPT-2 sized for it.

Layout under ``root`` (see :func:`ensure_quickstart_assets`)::

    root/data/sft.jsonl           prompt, completion          (supervised fine-tuning)
    root/data/prompts.jsonl       prompt                      (online RL, train split)
    root/data/eval_prompts.jsonl  prompt                      (held-out reviews' prompts)
    root/data/pairs.jsonl         prompt, chosen, rejected    (DPO / IPO / offline CoPG)
    root/data/demos.jsonl         prompt, demonstration       (RCfD)
    root/base_model/              config, generation config, safetensors weights, tokenizer

Text conventions, relied on by the trainer:

* reviews are lower case with punctuation as separate words: ``the plot was dull .``;
* ``prompt`` is the first 2-4 words, with no trailing space; ``completion`` / ``chosen`` /
  ``rejected`` / ``demonstration`` start with a single space, so ``prompt + completion`` is the
  review verbatim (this matches byte-level BPE, where a word carries its leading space);
* completions do not contain the EOS token: whoever trains on them appends ``tokenizer.eos_token``;
* a prompt stops before the first sentiment-bearing word of its review, so the sentiment is always
  the policy's choice, never the prompt's.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import string
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

# ---------------------------------------------------------------------------------------------
# Vocabulary. Polar adjectives are all in the VADER lexicon (so RL gets a signal from them);
# "neutral" words are checked to be absent from it.
# ---------------------------------------------------------------------------------------------

# fmt: off
# (noun phrase, plural?)
NOUNS: list[tuple[str, bool]] = [
    ("acting", False), ("plot", False), ("story", False), ("script", False), ("dialogue", False),
    ("soundtrack", False), ("music", False), ("ending", False), ("pacing", False), ("cast", False),
    ("director", False), ("camera work", False), ("lead actor", False), ("setting", False),
    ("editing", False), ("tone", False), ("final act", False), ("first half", False),
    ("premise", False), ("characters", True), ("visual effects", True), ("costumes", True),
    ("action scenes", True), ("songs", True),
]
POSITIVE_ADJ = [
    "wonderful", "brilliant", "great", "excellent", "superb", "beautiful", "charming", "delightful",
    "fantastic", "lovely", "clever", "fun", "amazing", "perfect", "good", "nice", "impressive",
    "funny", "smart", "powerful", "enjoyable",
]
NEGATIVE_ADJ = [
    "awful", "terrible", "boring", "dull", "bad", "horrible", "weak", "painful", "stupid",
    "disappointing", "poor", "lame", "ugly", "annoying", "messy",
]
NEUTRAL_ADJ = [
    "long", "short", "slow", "quiet", "loud", "simple", "familiar", "dark", "unusual", "ordinary",
    "typical", "predictable", "different", "plain",
]
# All VADER boosters (they scale the next polar word), none polar themselves.
INTENSIFIERS = ["very", "really", "incredibly", "extremely", "totally", "quite", "so", "somewhat"]
POSITIVE_VP = [
    "made me laugh", "made me smile", "won me over", "impressed me", "made me happy",
    "was a joy to watch", "was a real treat",
]
NEGATIVE_VP = [
    "bored me", "wasted my time", "lost me early", "annoyed me", "was a mess", "made me sad",
    "failed to land",
]
NEUTRAL_VP = ["took its time", "ran long", "was as expected", "felt familiar", "went on", "was there"]
POSITIVE_VERB = ["loved", "enjoyed", "liked", "adored", "admired"]
NEGATIVE_VERB = ["hated", "despised", "disliked"]
NEUTRAL_VERB = ["watched", "noticed", "remembered"]
# fmt: on

# Words that carry sentiment for VADER or flip it; a prompt never reaches one of these.
NEGATIONS = ["not", "never"]
_POLAR_WORDS = frozenset(
    w for group in (POSITIVE_ADJ, NEGATIVE_ADJ, POSITIVE_VERB, NEGATIVE_VERB, NEGATIONS, ["but"]) for w in group
) | frozenset(w for vp in POSITIVE_VP + NEGATIVE_VP for w in vp.split())

# Sentence polarity targets: positive, negative, neutral. The neutral share plus the mixed
# "x but y" template keep the SFT distribution's mean VADER compound close to 0.
POLARITY_WEIGHTS = {"pos": 0.41, "neg": 0.43, "neu": 0.16}


def _adj(rng: random.Random, polarity: str) -> str:
    return rng.choice({"pos": POSITIVE_ADJ, "neg": NEGATIVE_ADJ, "neu": NEUTRAL_ADJ}[polarity])


def _adj_phrase(rng: random.Random, polarity: str) -> str:
    """An adjective phrase of the requested polarity: plain, intensified, negated or coordinated."""
    if polarity == "neu":
        return (rng.choice(INTENSIFIERS) + " " if rng.random() < 0.4 else "") + _adj(rng, "neu")
    form = rng.random()
    if form < 0.35:
        return _adj(rng, polarity)
    if form < 0.65:
        return f"{rng.choice(INTENSIFIERS)} {_adj(rng, polarity)}"
    if form < 0.82:
        # VADER flips (and damps) a negated word: "not good" is negative.
        flipped = "neg" if polarity == "pos" else "pos"
        return f"{rng.choice(NEGATIONS)} {_adj(rng, flipped)}"
    first, second = rng.sample({"pos": POSITIVE_ADJ, "neg": NEGATIVE_ADJ}[polarity], 2)
    return f"{first} and {second}"


def _verb_phrase(rng: random.Random, polarity: str) -> str:
    return rng.choice({"pos": POSITIVE_VP, "neg": NEGATIVE_VP, "neu": NEUTRAL_VP}[polarity])


def _noun(rng: random.Random) -> tuple[str, str]:
    """A noun phrase and its past-tense copula."""
    noun, plural = rng.choice(NOUNS)
    return noun, "were" if plural else "was"


# The sentence templates, one drawn per review. Slots: {n1} {was1} {n2} {was2} two distinct nouns
# and their copulas; {adj} an adjective phrase and {vp} a verb phrase of the review's polarity;
# {contrast} an adjective phrase of another polarity; {verb} a verb of the review's polarity;
# {neutral} a neutral adjective. Slots are filled left to right, each drawing as it is reached.
REVIEW_TEMPLATES = (
    "the {n1} {was1} {adj} .",
    "the {n1} {was1} {adj} and the {n2} {vp} .",
    # VADER weighs the clause after "but" more: the second clause sets the polarity.
    "the {n1} {was1} {contrast} but the {n2} {was2} {adj} .",
    "the {n1} {vp} .",
    "i thought the {n1} {was1} {adj} .",
    "for me , the {n1} {was1} {adj} .",
    "this movie was {adj} , and the {n1} {vp} .",
    "in the end i {verb} the {n1} .",
    "overall , the film was {adj} .",
    "the {n1} {was1} {adj} , and the {n2} {was2} {neutral} .",
)


def _review(rng: random.Random) -> str:
    polarity = rng.choices(list(POLARITY_WEIGHTS), weights=list(POLARITY_WEIGHTS.values()))[0]
    other = rng.choice([p for p in ("pos", "neg", "neu") if p != polarity])
    n1, was1 = _noun(rng)
    n2, was2 = _noun(rng)
    while n2 == n1:
        n2, was2 = _noun(rng)
    fill = {
        "n1": lambda: n1,
        "was1": lambda: was1,
        "n2": lambda: n2,
        "was2": lambda: was2,
        "adj": lambda: _adj_phrase(rng, polarity),
        "contrast": lambda: _adj_phrase(rng, other),
        "vp": lambda: _verb_phrase(rng, polarity),
        "verb": lambda: rng.choice({"pos": POSITIVE_VERB, "neg": NEGATIVE_VERB, "neu": NEUTRAL_VERB}[polarity]),
        "neutral": lambda: _adj(rng, "neu"),
    }
    template = REVIEW_TEMPLATES[rng.randrange(len(REVIEW_TEMPLATES))]
    return "".join(text + (fill[slot]() if slot else "") for text, slot, _, _ in string.Formatter().parse(template))


def generate_reviews(n: int, seed: int = 0) -> list[str]:
    """``n`` short movie-review sentences, deterministic for ``seed``.

    About 40 % positive and 40 % negative under VADER (compound beyond ±0.05), the rest neutral,
    mean compound near 0: the SFT policy starts unbiased and positive reviews are reachable.
    """
    rng = random.Random(seed)
    return [_review(rng) for _ in range(n)]


def split_review(review: str, rng: random.Random) -> tuple[str, str]:
    """(prompt, completion) with ``prompt + completion == review``.

    The prompt is the first 2-4 words, cut before the first sentiment-bearing word (or negation)
    so that it never decides the sentiment, and leaving at least two words before the final
    period; the completion keeps its leading space.
    """
    words = review.split(" ")
    first_polar = next((i for i, w in enumerate(words) if w in _POLAR_WORDS), len(words) - 1)
    k = max(2, min(rng.randint(2, 4), first_polar, len(words) - 3))  # completion: >= 2 words + "."
    prompt = " ".join(words[:k])
    return prompt, review[len(prompt) :]


# ---------------------------------------------------------------------------------------------
# Corpus files
# ---------------------------------------------------------------------------------------------

CORPUS_FILES = ("sft", "prompts", "eval_prompts", "pairs", "demos")


def vader_compound(texts: Iterable[str]) -> list[float]:
    """VADER compound score in [-1, 1] for each text (the quickstart's reward)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(t)["compound"] for t in texts]


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _preference_pairs(split: list[tuple[str, str]], scores: list[float], rng: random.Random) -> list[dict]:
    """Pair completions that share a prompt; the one VADER scores higher is ``chosen``.

    Within each prompt the completions are shuffled and paired two by two; ties are dropped
    because a pair with no preference teaches DPO/IPO nothing.
    """
    by_prompt: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for (prompt, completion), score in zip(split, scores):
        by_prompt[prompt].append((completion, score))
    pairs = []
    for prompt in sorted(by_prompt):
        items = by_prompt[prompt]
        rng.shuffle(items)
        for (c1, s1), (c2, s2) in zip(items[0::2], items[1::2]):
            if s1 == s2:
                continue
            (chosen, _), (rejected, _) = sorted([(c1, s1), (c2, s2)], key=lambda item: -item[1])
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    rng.shuffle(pairs)
    return pairs


def _write_corpus(data_dir: Path, n_train: int, n_eval: int, seed: int) -> None:
    rng = random.Random(seed + 1)
    train = [split_review(r, rng) for r in generate_reviews(n_train, seed)]
    # Held-out reviews come from an independent stream; with a small grammar the short prompts
    # recur, but the reviews (and thus the demonstrations a policy could copy) differ.
    held_out = [split_review(r, rng) for r in generate_reviews(n_eval, seed + 10_007)]
    scores = vader_compound(p + c for p, c in train)

    write_jsonl(data_dir / "sft.jsonl", ({"prompt": p, "completion": c} for p, c in train))
    write_jsonl(data_dir / "prompts.jsonl", ({"prompt": p} for p, _ in train))
    write_jsonl(data_dir / "eval_prompts.jsonl", ({"prompt": p} for p, _ in held_out))
    write_jsonl(data_dir / "pairs.jsonl", _preference_pairs(train, scores, rng))
    write_jsonl(data_dir / "demos.jsonl", ({"prompt": p, "demonstration": c} for p, c in train))


def atomic_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory in a sibling temp dir, then rename it into place.

    A crash leaves only a ``.tmp-*`` sibling (removed here on error), never a half-written
    ``target``. If another process wins the race the rename fails on the non-empty target and
    its copy is kept: builds are deterministic, so both are identical.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_corpus(root: Path, n_train: int = 4000, n_eval: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write the quickstart JSONL files under ``root/data`` (atomically; reused if present).

    Returns ``{"sft", "prompts", "eval_prompts", "pairs", "demos"} -> path``.
    """
    data_dir = atomic_dir(Path(root) / "data", lambda d: _write_corpus(d, n_train, n_eval, seed))
    return {name: data_dir / f"{name}.jsonl" for name in CORPUS_FILES}


# ---------------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------------

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and save it to ``out_dir``.

    Byte-level means any string encodes (no ``<unk>`` in practice) and ``decode(encode(x)) == x``
    exactly once special tokens are skipped. Encoding prepends ``<s>`` (like Llama tokenizers) so
    generation from a 2-word prompt has a fixed start-of-text anchor; pass
    ``add_special_tokens=False`` when encoding a completion on its own. ``<pad>`` is distinct
    from ``</s>`` so that padding never reads as the end of a completion, and padding is on the
    left, as batched generation needs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = [PAD, BOS, EOS, UNK]  # ids 0..3, stable across corpora
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=64,
        clean_up_tokenization_spaces=False,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return wrapped


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    out_dir: Path,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 64,
    seed: int = 0,
    architecture: str = "gpt2",
    tie_word_embeddings: bool = False,
    intermediate_size: int | None = None,
) -> PreTrainedModel:
    """A randomly initialised GPT-2 (or ``architecture="llama"`` / ``"qwen2"``: rotary positions,
    RMSNorm, SwiGLU (``intermediate_size``, default 2·n_embd), grouped KV heads, an untied head unless
    ``tie_word_embeddings``) sized to ``tokenizer``, saved with it to ``out_dir``.

    Special-token ids go in both the model config and the generation config, so ``generate``
    stops on ``</s>`` and pads with ``<pad>`` without any argument — the same as a hub model.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, LlamaConfig, Qwen2Config

    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if architecture == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head, **ids
        )
    elif architecture in ("llama", "qwen2"):
        family = LlamaConfig if architecture == "llama" else Qwen2Config
        config = family(
            vocab_size=len(tokenizer),
            hidden_size=n_embd,
            intermediate_size=intermediate_size or 2 * n_embd,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=max(1, n_head // 2),
            max_position_embeddings=n_positions,
            tie_word_embeddings=tie_word_embeddings,
            **ids,
        )
    else:
        raise ValueError(f"architecture: expected gpt2, llama or qwen2, got {architecture!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    save_quietly(model, tokenizer, Path(out_dir))
    return model


def save_quietly(model, tokenizer, out_dir: Path) -> None:
    """``save_pretrained`` (safetensors) of a small model and its tokenizer, without the
    "Writing model shards" progress bar a model of a few hundred kB does not need."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out_dir)


def _build_base_model(out_dir: Path, sft_path: Path, seed: int) -> None:
    rows = read_jsonl(sft_path)
    tokenizer = train_tokenizer([r["prompt"] + r["completion"] for r in rows], out_dir)
    build_tiny_model(tokenizer, out_dir, seed=seed)


def ensure_quickstart_assets(root: Path, seed: int = 0) -> dict[str, Path]:
    """Build the quickstart corpus, tokenizer and untrained base model under ``root`` if missing.

    Idempotent and crash-safe: each of ``root/data`` and ``root/base_model`` is built in a temp
    dir and renamed into place, and an existing one is reused as is. Safe to call from every
    process of a distributed launch. Returns the corpus paths plus ``data`` and ``base_model``
    (a directory for ``from_pretrained``, tokenizer included).
    """
    root = Path(root)
    paths = build_corpus(root, seed=seed)
    base = atomic_dir(root / "base_model", lambda d: _build_base_model(d, paths["sft"], seed))
    return {**paths, "data": root / "data", "base_model": base}
