"""The pipeline: each piece (corpus, base model, NLI model, SFT policy) built only if missing,
in a temporary directory renamed into place."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from align.jobs.quickstart.corpus import atomic_dir, read_jsonl
from align.jobs.summarize.corpus import CorpusSizes, corpus_texts, write_corpus
from align.jobs.summarize.nli import NLITrainConfig, train_nli, train_nli_tokenizer, train_policy_tokenizer

# bundled recipe names (align.config.find_recipe): found in a checkout and in an installed wheel
RL_RECIPE = "summarize/entailment_rloo"
SFT_RECIPE = "summarize/sft"

# ---------------------------------------------------------------------------------------------
# The pipeline: each piece built only if missing, in a temp dir renamed into place
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicySize:
    """The tiny GPT-2 policy: a prompt is at most ~50 tokens and a summary ~30."""

    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 128
    vocab_size: int = 1024


@dataclass(frozen=True)
class Setup:
    """Everything ``prepare_summarize`` builds besides what the recipes say (sizes, NLI training)."""

    seed: int = 0
    sizes: CorpusSizes = field(default_factory=CorpusSizes)
    policy: PolicySize = field(default_factory=PolicySize)
    nli: NLITrainConfig = field(default_factory=NLITrainConfig)
    sft_overrides: tuple[str, ...] = ()  # key=value overrides of recipes/summarize/sft.yaml
    # torch CPU threads while building, training and evaluating (None: torch's default). These
    # models are tiny: one thread is about as fast as two on an idle machine, and several times
    # faster when other jobs share the cores (threads that wait on each other stall).
    threads: int | None = 1


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch CPU threads, then restore the previous setting."""
    import torch

    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _log(message: str) -> None:
    print(f"align summarize: {message}", file=sys.stderr, flush=True)


def ensure_corpus(root: Path, setup: Setup) -> Path:
    """``root/data`` (the corpus files of the module docstring)."""
    target = Path(root) / "data"
    if not target.is_dir():
        _log(f"writing the synthetic corpus to {target}")
    return atomic_dir(target, lambda d: write_corpus(d, setup.seed, setup.sizes))


def ensure_base_model(root: Path, data_dir: Path, setup: Setup) -> Path:
    """``root/base_model``: the untrained tiny GPT-2 and its tokenizer (quickstart's builders)."""
    from align.jobs.quickstart.corpus import build_tiny_model

    size = setup.policy

    def build(out: Path) -> None:
        tokenizer = train_policy_tokenizer(corpus_texts(data_dir), out, size.vocab_size)
        tokenizer.model_max_length = size.n_positions
        build_tiny_model(
            tokenizer,
            out,
            n_layer=size.n_layer,
            n_embd=size.n_embd,
            n_head=size.n_head,
            n_positions=size.n_positions,
            seed=setup.seed,
        )

    return atomic_dir(Path(root) / "base_model", build)


def nli_model_dir(recipe) -> Path:
    """Where the recipe's entailment reward loads its model from (``root/nli_model`` if it has none)."""
    for component in recipe.reward:
        if component.name == "entailment" and "model" in component.options:
            return Path(component.options["model"])
    return Path(recipe.model.path).parent / "nli_model"


def ensure_nli_model(target: Path, data_dir: Path, setup: Setup) -> Path:
    """``target`` (by default ``root/nli_model``): the trained NLI classifier, its tokenizer and
    ``metrics.json``."""
    target = Path(target)
    if target.is_dir():
        return target

    def build(out: Path) -> None:
        train_rows = read_jsonl(Path(data_dir) / "nli_train.jsonl")
        eval_rows = read_jsonl(Path(data_dir) / "nli_eval.jsonl")
        _log(f"training the NLI model on {len(train_rows)} statements into {target}")
        tokenizer = train_nli_tokenizer(corpus_texts(data_dir), out)
        metrics = train_nli(train_rows, eval_rows, tokenizer, out, setup.nli)
        _log(
            f"NLI held-out accuracy {metrics['eval_accuracy']:.3f} on {metrics['eval']['n']} statements "
            f"({metrics['seconds']:.0f} s)"
        )

    return atomic_dir(target, build)


def ensure_sft_model(sft_model: Path, base_model: Path, data_dir: Path, setup: Setup) -> Path:
    """The SFT policy, trained by ``recipes/summarize/sft.yaml`` through the trainer (``align sft``)."""
    from align.jobs.quickstart.pipeline import sft_once

    sft_model = Path(sft_model)
    overrides = [
        f"model.path={base_model}",
        f"data.train={Path(data_dir) / 'sft.jsonl'}",
        f"output.dir={sft_model.parent / 'sft_run'}",
        *setup.sft_overrides,
    ]
    return sft_once(SFT_RECIPE, overrides, sft_model, _log)


def prepare_summarize(recipe, setup: Setup | None = None) -> dict[str, Path]:
    """Build what the RL recipe needs under the directory holding its ``model.path``.

    Returns ``root``, ``data``, ``base_model``, ``nli_model`` and ``sft_model``. The NLI model
    is built where the recipe's entailment reward loads it from (its ``model`` option).
    """
    setup = setup or Setup(seed=recipe.train.seed)
    sft_model = Path(recipe.model.path)
    root = sft_model.parent
    with torch_threads(setup.threads):
        data_dir = ensure_corpus(root, setup)
        base = ensure_base_model(root, data_dir, setup)
        nli = ensure_nli_model(nli_model_dir(recipe), data_dir, setup)
        sft = ensure_sft_model(sft_model, base, data_dir, setup)
    return {"root": root, "data": data_dir, "base_model": base, "nli_model": nli, "sft_model": sft}
