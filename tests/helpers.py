"""Builders shared by tests across the repo: a tiny tokenizer + GPT-2 and small JSONL data sets.

Everything is generated from :mod:`align.jobs.quickstart` in a few seconds, offline, and saved to
disk, so tests load models through the same ``from_pretrained`` path a user's hub id takes.
The session fixtures ``tiny_model_dir`` and ``tiny_data_files`` (tests/conftest.py) wrap these.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from align.jobs import quickstart

if TYPE_CHECKING:  # imported where used: conftest loads this module, and the fast tier needs no torch
    import torch

    from align.recipe import Recipe


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


# Training runs on the tiny model: a recipe per objective, its final weights and logged metrics.
# Used by the trainer's tests in tests/core (test_step, test_loop, test_scoring, ...).

# SGD step sizes that move the tiny model by ~1e-3 in two steps (loss scales differ by objective)
SGD_LR = {
    "sft": 0.5,
    "dpo": 2.0,
    "dpo_avg": 20.0,
    "ipo": 0.02,
    "copg_offline": 0.05,
    "rloo": 0.05,
    "rloo_whitened": 0.05,
    "reinforce": 0.05,
    "copg": 0.05,
    "rcfd": 0.005,
    "rcfd_two": 0.05,
    "vanilla_pg": 0.02,
    "grpo": 1.0,
    "grpo_token": 1.0,
    "dr_grpo": 0.2,
    "gspo": 1.0,
    "cispo": 1.0,
    "reinforce_pp": 0.5,
    "ppo": 0.5,
    "online_dpo": 2.0,
    "simpo": 1.0,
    "orpo": 1.0,
    "kto": 4.0,
}
LENGTH = [{"name": "length", "options": {"target": 12, "unit": "chars"}}]
TARGET_4 = {"name": "length", "options": {"target": 4, "unit": "chars"}, "weight": 2.0}
WHITENED = [{"name": "length", "options": {"target": 12, "unit": "chars"}, "normalize": True}]

# objective section, data file key, extra recipe fields
OBJECTIVES = {
    "sft": ({"name": "sft"}, "sft", {}),
    "dpo": ({"name": "dpo", "beta": 0.1}, "pairs", {}),
    "dpo_avg": ({"name": "dpo", "beta": 0.1, "options": {"average_logprobs": True}}, "pairs", {}),
    "ipo": ({"name": "ipo", "beta": 0.5}, "pairs", {}),
    "copg_offline": ({"name": "copg", "beta": 0.5, "mode": "offline"}, "pairs", {}),
    "rloo": ({"name": "rloo", "beta": 0.05, "k": 2}, "prompts", {"reward": LENGTH}),
    "rloo_whitened": ({"name": "rloo", "beta": 0.05, "k": 2}, "prompts", {"reward": WHITENED}),
    "reinforce": ({"name": "reinforce", "beta": 0.05, "k": 2}, "prompts", {"reward": LENGTH}),
    "copg": ({"name": "copg", "beta": 0.5, "k": 2}, "prompts", {"reward": LENGTH}),
    "rcfd": ({"name": "rcfd", "beta": 0.05, "k": 2}, "demos", {"reward": LENGTH}),
    # two components: each squared gap whitened over the whole batch and every process
    "rcfd_two": ({"name": "rcfd", "beta": 0.05, "k": 2}, "demos", {"reward": LENGTH + [TARGET_4]}),
    "vanilla_pg": ({"name": "vanilla_pg", "beta": 0.05, "k": 2}, "prompts", {"reward": LENGTH}),
    "grpo": ({"name": "grpo", "beta": 0.04, "k": 2}, "prompts", {"reward": LENGTH}),
    "grpo_token": (
        {"name": "grpo", "beta": 0.04, "k": 2, "options": {"aggregation": "token_mean", "clip_high": 0.28}},
        "prompts",
        {"reward": LENGTH},
    ),
    "dr_grpo": ({"name": "dr_grpo", "beta": 0.04, "k": 2}, "prompts", {"reward": LENGTH}),
    "gspo": ({"name": "gspo", "beta": 0.04, "k": 2}, "prompts", {"reward": LENGTH}),
    "cispo": ({"name": "cispo", "beta": 0.04, "k": 2}, "prompts", {"reward": LENGTH}),
    # returns whitened over the whole batch and every process, the group mean subtracted first
    "reinforce_pp": (
        {"name": "reinforce_pp", "beta": 0.05, "k": 2, "options": {"baseline": "group"}},
        "prompts",
        {"reward": LENGTH},
    ),
    "ppo": ({"name": "ppo", "beta": 0.05, "k": 2, "options": {"lam": 0.9}}, "prompts", {"reward": LENGTH}),
    "online_dpo": ({"name": "online_dpo", "beta": 0.1, "k": 2}, "prompts", {"reward": LENGTH}),
    "simpo": ({"name": "simpo", "beta": 2.0, "options": {"simpo_gamma": 0.5, "cpo_alpha": 0.5}}, "pairs", {}),
    "orpo": ({"name": "orpo", "beta": 0.5}, "pairs", {}),
    # unpaired (prompt, completion, label) rows; z₀ from mismatched rows of the whole step
    "kto": ({"name": "kto", "beta": 0.1, "options": {"undesirable_weight": 1.5}}, "unpaired", {}),
}
GENERATION = {"max_new_tokens": 8, "stop_strings": ["e"]}  # "e" cuts completions at unequal lengths


def make_recipe(
    model_dir, data_files, run_dir, key: str, model: dict | None = None, generation: dict | None = None, **train_fields
) -> Recipe:
    from align.config import validate
    from align.recipe import Recipe

    objective, data_key, extra = OBJECTIVES[key]
    data = {"train": str(data_files[data_key])}
    raw = {
        "model": {"path": str(model_dir), **(model or {})},
        "data": data,
        "objective": objective,
        "generation": {**GENERATION, **(generation or {})},
        "train": {"steps": 2, "batch_size": 8, "lr": 5e-3, "lr_scheduler": "linear", "seed": 3, **train_fields},
        "output": {"dir": str(run_dir), "report": False, "sample_every": 0},
        **extra,
    }
    return validate(Recipe, raw)


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final policy's weights, and the critic's (``critic.*``) where the objective trains one."""
    from safetensors.torch import load_file

    params = load_file(str(run_dir / "final" / "model.safetensors"))
    if (run_dir / "final_critic").is_dir():
        critic = load_file(str(run_dir / "final_critic" / "model.safetensors"))
        params.update({f"critic.{k}": v for k, v in critic.items()})
    return params


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def run_metrics(run: Path) -> list[dict]:
    """The records of ``run/metrics.jsonl``, one dict a step."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align.cli", *argv], capture_output=True, text=True, timeout=120)


def register_test_reward(name: str, scores_for_call):
    """A reward whose n-th call returns ``scores_for_call(n, completions)``."""
    import rewards

    calls = {"n": 0}

    def factory():
        def reward(prompts, completions, **columns):
            calls["n"] += 1
            return scores_for_call(calls["n"], completions)

        return reward

    rewards.register(factory, name=name)
    return calls


def with_rewards(recipe, *names: str):
    """The recipe with its reward section made of these registered rewards (validated as a recipe's)."""
    from align.config import validate
    from align.recipe import Recipe

    minimal = {"model": {"path": "m"}, "data": {"train": "d"}, "objective": {"name": "rloo"}, "reward": list(names)}
    return recipe.model_copy(update={"reward": validate(Recipe, minimal).reward})


def stop_at(step: int):
    """An ``on_step`` hook that sends this process SIGTERM after ``step`` (the run saves and stops)."""
    import os
    import signal

    def hook(at: int, record: dict) -> None:
        if at == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def free_port() -> int:
    """A port free now on loopback, for a launch's rendezvous or a server: tests may run in parallel
    workers (pytest-xdist), so no port is derived from a fixed base."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
