"""Shared test set-up: no hub access, deterministic CPU threads."""

import json
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # parallel workers (pytest -n 2): one intra-op thread each, so two workers share the cores
    # rather than four threads contending for two; launched processes already run on one
    import torch

    torch.set_num_threads(1)

# after the environment above: the helpers load transformers
from helpers import make_tiny_data_files, make_tiny_model_dir, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Directory of a random 2-layer GPT-2 (n_embd 32, vocab 400) and its tokenizer, built once."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_data_files(tmp_path_factory):
    """Small sft / prompts / eval_prompts / pairs / demos JSONL files, and ``unpaired``: TRL's unpaired
    preference rows (prompt, completion, label), each pair's chosen (true) then rejected (false)
    -- name -> path (read-only)."""
    files = make_tiny_data_files(tmp_path_factory.mktemp("tiny_data"))
    pairs = [json.loads(line) for line in files["pairs"].read_text().splitlines() if line.strip()]
    rows = [
        {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
        for p in pairs
        for side in ("chosen", "rejected")
    ]
    return {**files, "unpaired": write_jsonl(files["pairs"].parent / "unpaired.jsonl", rows)}


ARCHITECTURES = {  # the benchmarked families: GPT-2 (tied), Llama (GQA, untied head), Qwen2 (GQA, tied head)
    "gpt2": {},
    "llama": {"architecture": "llama", "n_head": 4},
    "qwen2": {"architecture": "qwen2", "n_head": 4, "tie_word_embeddings": True},
}


@pytest.fixture(scope="session", params=list(ARCHITECTURES))
def arch_model_dir(request, tmp_path_factory):
    """A tiny random model of each benchmarked architecture, with its tokenizer, built once each."""
    if request.param == "gpt2":
        return request.getfixturevalue("tiny_model_dir")
    return make_tiny_model_dir(tmp_path_factory.mktemp(f"tiny_{request.param}"), **ARCHITECTURES[request.param])
