"""Builders shared by tests across the repo: a tiny tokenizer + GPT-2 and small JSONL data sets.

Everything is generated from :mod:`align.jobs.quickstart` in a few seconds, offline, and saved to
disk, so tests load models through the same ``from_pretrained`` path a user's hub id takes.
The session fixtures ``tiny_model_dir`` and ``tiny_data_files`` (tests/conftest.py) wrap these.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from align.jobs import quickstart


def make_tiny_model_dir(
    out_dir: Path,
    n_reviews: int = 400,
    vocab_size: int = 400,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 2,
    n_positions: int = 64,
    seed: int = 0,
    architecture: str = "gpt2",
    tie_word_embeddings: bool = False,
) -> Path:
    """Train a byte-level BPE tokenizer on generated reviews and save a random tiny GPT-2 with it.

    Returns ``out_dir``, loadable by ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``.
    Special tokens: ``<pad>`` = 0, ``<s>`` = 1 (prepended when encoding), ``</s>`` = 2;
    padding side left.
    """
    out_dir = Path(out_dir)
    tokenizer = quickstart.train_tokenizer(quickstart.generate_reviews(n_reviews, seed), out_dir, vocab_size)
    quickstart.build_tiny_model(
        tokenizer,
        out_dir,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        seed=seed,
        architecture=architecture,
        tie_word_embeddings=tie_word_embeddings,
    )
    return out_dir


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    """Write ``rows`` one JSON object a line (the format every data loader in align reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def make_tiny_data_files(root: Path, n_train: int = 96, n_eval: int = 16, seed: int = 0) -> dict[str, Path]:
    """Small versions of the quickstart files under ``root/data``.

    Keys and columns: ``sft`` (prompt, completion), ``prompts`` (prompt), ``eval_prompts``
    (prompt), ``pairs`` (prompt, chosen, rejected), ``demos`` (prompt, demonstration).
    Completions start with a space; ``prompt + completion`` is a whole review.
    """
    return quickstart.build_corpus(Path(root), n_train=n_train, n_eval=n_eval, seed=seed)
