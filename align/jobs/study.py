"""The study engine ``align overopt`` and ``align compare`` share: objectives × seeds, each run
trained by the one trainer from the same SFT policy on the same prompts, its checkpoints scored on
held-out prompts by a study's own ``evaluate(recipe, policy)``, and what each run cost, measured.

A run's cost is its training alone (evaluation excluded): wall seconds, tokens trained per second
(completion tokens over the steps' own times) and peak resident memory. The peak is the process's
high-water mark reset before the run (Linux ``/proc/self/clear_refs``), so runs one after another
in one process each get their own; without that file it is the process's peak so far (marked
``peak_rss_exact: false``).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

import losses
from align.recipe import ObjectiveConfig, Recipe


class ObjectiveSpec(ObjectiveConfig):
    label: str | None = Field(None, description="name in the report (default: NAME_betaBETA)")
    train: dict[str, Any] = Field(
        default_factory=dict, description="this run's changes to the base train section (replay, updates_per_batch)"
    )

    @property
    def effective_beta(self) -> float | None:
        if self.beta is not None:
            return self.beta
        beta = {**losses.options(self.name), **self.options}.get("beta")
        return beta if isinstance(beta, (int, float)) else None

    @property
    def run_name(self) -> str:
        if self.label:
            return self.label
        beta = self.effective_beta
        return self.name if beta is None else f"{self.name}_beta{beta:g}"

    def objective_section(self) -> dict:
        return self.model_dump(mode="json", exclude={"label", "train"}, exclude_none=True)


def mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


def read_prompts(source: str, column: str, limit: int | None = None) -> list[str]:
    from align import data as data_lib

    table = data_lib.load_table(source)
    prompts = data_lib.read_columns(source, table, [column], [column])[column]
    return prompts[:limit] if limit else prompts


@torch.no_grad()
def sample(recipe: Recipe, models, policy, prompts: list[str], seed: int, k: int, device, chunk: int = 64) -> list[str]:
    """k samples per prompt (prompt-major: prompt i's samples at i·k … i·k+k−1), keyed by seed."""
    from align.jobs.report import sample_prompts
    from align.rollout import decode_completions

    texts: list[str] = []
    for lo in range(0, len(prompts), chunk):
        rollout = sample_prompts(recipe, models, policy, prompts[lo : lo + chunk], seed, k, device, first_index=lo)
        stops = recipe.generation.stop_strings
        texts += decode_completions(rollout, models.tokenizer, stops, models.pad_token_id)
    return texts


@contextlib.contextmanager
def quiet_trainer() -> Iterator[None]:
    """The study draws one progress bar over all runs; each run's own bar is switched off."""
    from tqdm.auto import tqdm

    import align.trainer as trainer

    original = trainer.progress_bar
    trainer.progress_bar = lambda total, initial, enabled, desc: tqdm(total=total, disable=True)
    try:
        yield
    finally:
        trainer.progress_bar = original


def load_policy(path: Path, recipe: Recipe, device):
    from align.models import load_saved_policy

    return load_saved_policy(recipe, path, device)


# --------------------------------------------------------------------------------------------
# cost


_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Reset the process's resident-memory high-water mark; False where the OS does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def train_measured(recipe: Recipe, on_step: Callable[[int, dict], None] | None = None) -> tuple[dict, dict]:
    """Train one run (its own progress bar off); its summary and its measured cost."""
    from align.metrics_log import read_metrics
    from align.trainer import train

    exact = reset_peak_rss()
    start = time.perf_counter()
    with quiet_trainer():
        summary = train(recipe, on_step=on_step)
    seconds = time.perf_counter() - start
    records = read_metrics(Path(recipe.output.dir))
    tokens = math.fsum(r.get("tokens", 0.0) for r in records)
    step_seconds = math.fsum(r.get("step_s", 0.0) for r in records)
    cost = {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / step_seconds if step_seconds else float("nan"),
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_exact": exact,
    }
    return summary, cost


# --------------------------------------------------------------------------------------------
# the grid


def train_and_evaluate(
    recipe: Recipe,
    evaluate: Callable[[Any], dict],
    initial: dict,
    device,
    bar,
    keep_checkpoints: bool = False,
) -> tuple[list[dict], dict]:
    """Train one run, then score step 0 (``initial``, shared by the runs of a seed) and each of its
    checkpoints with ``evaluate(policy)``; writes ``eval.json`` beside the run's metrics."""
    from align.checkpoint import list_checkpoints

    out = Path(recipe.output.dir)
    shutil.rmtree(out, ignore_errors=True)
    summary, cost = train_measured(recipe, on_step=lambda step, record: bar.update(1))
    if summary.get("stopped_by"):  # the trainer saved and returned on SIGINT/SIGTERM: the study stops too
        raise KeyboardInterrupt
    records = [{"step": 0, **initial}]
    for checkpoint in list_checkpoints(out):
        step = int(checkpoint.name.split("-")[1])
        policy = load_policy(checkpoint / "model", recipe, device)
        records.append({"step": step, **evaluate(policy)})
        del policy
        bar.update(1)
    (out / "eval.json").write_text(json.dumps({"records": records, "cost": cost}, indent=2))
    if not keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return records, cost


def checkpoint_output(run_dir: Path, steps: int, every: int) -> dict:
    """The output section of a study run: a checkpoint every ``every`` steps, all of them kept
    until they are scored, no report or final model of its own."""
    return {
        "dir": str(run_dir),
        "save_every": every,
        "keep_last": steps // every + 1,
        "sample_every": 0,
        "report": False,
        "save_model": False,
    }


def eval_steps(recipe: Recipe, every: int) -> list[int]:
    """Step 0 (the initial policy), every ``every`` steps, and the last step."""
    steps = list(range(0, recipe.train.steps, every))
    return steps + [recipe.train.steps]


def quiet_libraries() -> None:
    """Per-checkpoint load reports and accelerate's shared-tensor warning, once per save, are noise here."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
