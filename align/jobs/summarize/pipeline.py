"""The pipeline: each piece (corpus, base model, NLI model, SFT policy) built only if missing,
in a temporary directory renamed into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from align.jobs.quickstart.corpus import atomic_dir, read_jsonl
from align.jobs.quickstart.pipeline import LAUNCH_VARIABLES
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


def log_progress(message: str) -> None:
    print(f"align summarize: {message}", file=sys.stderr, flush=True)


def ensure_corpus(root: Path, setup: Setup) -> Path:
    """``root/data`` (the corpus files of the module docstring)."""
    target = Path(root) / "data"
    if not target.is_dir():
        log_progress(f"writing the synthetic corpus to {target}")
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
    ``metrics.json``. Its training run (metrics.jsonl, checkpoints) is ``TARGET_run`` beside it:
    a run stopped by SIGINT/SIGTERM continues there the next time."""
    target = Path(target)
    if target.is_dir():
        return target
    run_dir = target.with_name(f"{target.name}_run")

    def build(out: Path) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # the launch's process group belongs to the run that asked for the model (and the other
            # processes wait on the prepare lock): train as one process of its own, as sft_once does
            launch = [k for k in os.environ if k in LAUNCH_VARIABLES or k.startswith("ACCELERATE_")]
            env = {k: v for k, v in os.environ.items() if k not in launch}
            argv = [str(data_dir), str(out), str(run_dir), json.dumps(asdict(setup.nli))]
            subprocess.run([sys.executable, "-c", _NLI_PROCESS, *argv], env=env, check=True)
        else:
            build_nli(Path(data_dir), out, run_dir, setup.nli)

    return atomic_dir(target, build)


_NLI_PROCESS = "import sys; from align.jobs.summarize.pipeline import nli_process; nli_process(sys.argv[1:])"


def nli_process(argv: list[str]) -> None:
    """``build_nli`` in a process of its own: DATA_DIR OUT RUN_DIR NLI_CONFIG_JSON."""
    data_dir, out, run_dir, cfg = argv
    build_nli(Path(data_dir), Path(out), Path(run_dir), NLITrainConfig(**json.loads(cfg)))


def build_nli(data_dir: Path, out: Path, run_dir: Path, cfg: NLITrainConfig) -> None:
    """Tokenizer and trained NLI model into ``out``; the run in ``run_dir``, continued if stopped."""
    from align.supervised import ResumeMismatch

    train_rows = read_jsonl(data_dir / "nli_train.jsonl")
    eval_rows = read_jsonl(data_dir / "nli_eval.jsonl")
    log_progress(f"training the NLI model on {len(train_rows)} statements into {out} (run: {run_dir})")
    tokenizer = train_nli_tokenizer(corpus_texts(data_dir), out)
    try:
        metrics = train_nli(train_rows, eval_rows, tokenizer, out, cfg, run_dir=run_dir, resume="latest")
    except ResumeMismatch as err:  # checkpoints of other settings: the run directory is ours to rebuild
        log_progress(f"{err}; starting the NLI training over")
        shutil.rmtree(run_dir)
        metrics = train_nli(train_rows, eval_rows, tokenizer, out, cfg, run_dir=run_dir)
    if metrics.get("stopped_by"):
        stop = f"NLI training stopped by {metrics['stopped_by']} at step {metrics['steps']}"
        log_progress(f"{stop}; the next run continues from {metrics['checkpoint']}")
        raise KeyboardInterrupt  # the CLI's clean exit; atomic_dir removes the half-built directory
    log_progress(
        f"NLI held-out accuracy {metrics['eval_accuracy']:.3f} on {metrics['eval']['n']} statements "
        f"({metrics['seconds']:.0f} s)"
    )


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
    return sft_once(SFT_RECIPE, overrides, sft_model, log_progress)


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
