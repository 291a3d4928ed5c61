"""Shared test set-up: no hub access, deterministic CPU threads."""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# after the environment above: the helpers load transformers
from helpers import make_tiny_data_files, make_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Directory of a random 2-layer GPT-2 (n_embd 32, vocab 400) and its tokenizer, built once."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_data_files(tmp_path_factory):
    """Small sft / prompts / eval_prompts / pairs / demos JSONL files: name -> path (read-only)."""
    return make_tiny_data_files(tmp_path_factory.mktemp("tiny_data"))
