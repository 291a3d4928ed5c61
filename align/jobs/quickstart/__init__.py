"""The quickstart job's assets: ``corpus.py`` generates the review corpus, tokenizer and tiny GPT-2
(offline, from code); ``pipeline.py`` prepares them and the SFT policy on a recipe's first run."""

from align.jobs.quickstart.corpus import (
    CORPUS_FILES,
    atomic_dir,
    build_corpus,
    build_tiny_model,
    ensure_quickstart_assets,
    generate_reviews,
    read_jsonl,
    save_quietly,
    split_review,
    train_tokenizer,
    vader_compound,
)
from align.jobs.quickstart.pipeline import prepare_quickstart, sft_once

__all__ = [
    "CORPUS_FILES",
    "atomic_dir",
    "build_corpus",
    "build_tiny_model",
    "ensure_quickstart_assets",
    "generate_reviews",
    "prepare_quickstart",
    "read_jsonl",
    "save_quietly",
    "sft_once",
    "split_review",
    "train_tokenizer",
    "vader_compound",
]
