"""``align train`` / ``align sft`` / ``align recipes``: a recipe's assets, the core trainer, the report."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path

from align.config import RecipeError, bundled_recipes, load_recipe, read_yaml
from align.recipe import Recipe


def prepare_assets(recipe: Recipe) -> None:
    """Build what ``prepare:`` names if missing (corpus, tokenizer, NLI model, SFT policy).

    Every process of a launch calls this; the first to take the lock builds, the others wait and
    find the assets there."""
    if recipe.prepare is None:
        return
    import fcntl

    root = Path(recipe.model.path).parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if recipe.prepare == "quickstart":
            from align.jobs.quickstart.pipeline import prepare_quickstart

            prepare_quickstart(recipe)
        elif recipe.prepare == "summarize":
            from align.jobs.summarize.pipeline import prepare_summarize

            prepare_summarize(recipe)


def run(
    recipe: Recipe,
    accelerator=None,
    on_step: Callable[[int, dict], None] | None = None,
    on_save: Callable[[Path], None] | None = None,
    on_eval: Callable[[int, dict], None] | None = None,
) -> dict:
    """What ``align train RECIPE`` runs: prepare the assets, train, report (``output.report``)."""
    from align.jobs.report import report_on_end
    from align.trainer import train

    check_push(recipe)
    prepare_assets(recipe)
    on_end = report_on_end if recipe.output.report else None
    summary = train(recipe, accelerator, on_step, on_end=on_end, on_save=on_save, on_eval=on_eval)
    if recipe.output.push_to_hub and summary.get("final_model") and summary.get("stopped_by") is None:
        summary.update(push(recipe.output.push_to_hub, Path(summary["final_model"])))
    return summary


def check_push(recipe: Recipe) -> None:
    """output.push_to_hub with the hub unreachable by configuration: one line now, not after the run."""
    import os

    if recipe.output.push_to_hub and os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false"):
        raise RecipeError(
            f"output.push_to_hub: {recipe.output.push_to_hub!r} cannot be reached with HF_HUB_OFFLINE set; "
            "unset it, or remove push_to_hub and upload final/ later (`hf upload REPO DIR/final`)"
        )


def push(repo: str, folder: Path) -> dict:
    """Upload final/ (its model card included); a failure is one line, the run stays complete."""
    try:
        from huggingface_hub import create_repo, upload_folder

        create_repo(repo, exist_ok=True)
        upload_folder(repo_id=repo, folder_path=str(folder), commit_message="align: trained model")
    except Exception as err:  # network, auth, permissions: the trained model is on disk either way
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"align: push to {repo!r} failed ({reason}); final/ is at {folder}", file=sys.stderr)
        return {"push_error": reason}
    return {"pushed_to": repo}


def run_train(args) -> int:
    if args.recipe is None:
        raise RecipeError("recipe: a recipe YAML or a bundled recipe name is required (see `align recipes`)")
    overrides = list(args.overrides)
    if args.command == "sft" and not any(o.startswith("objective.name=") for o in overrides):
        overrides.append("objective.name=sft")
    if getattr(args, "from_trl", None):
        from align.config import apply_overrides, find_recipe, validate
        from align.jobs.trl_config import from_trl

        translated = apply_overrides(from_trl(read_yaml(find_recipe(args.recipe)), args.from_trl), overrides)
        recipe = validate(Recipe, translated, source=f"TRL config {args.recipe!r}")
    else:
        recipe = load_recipe(Recipe, args.recipe, overrides)
    try:
        summary = run(recipe)
    except Exception as err:  # MemoryError and torch's OutOfMemoryError included
        line = late_failure(err, recipe.output.dir)
        if line is None:  # not a failure of the run's inputs or resources: a bug, its traceback is the report
            raise
        print(f"align {args.command}: {line}", file=sys.stderr)
        return 1
    if summary.get("stopped_by"):
        print(
            f"align: stopped by {summary['stopped_by']} at step {summary['steps']}; "
            f"checkpoint {summary['checkpoint']} (resume with resume=latest)"
        )
        # the shell convention for a signal stop, so schedulers and `&&` chains see it did not finish
        return 128 + signal.Signals[summary["stopped_by"]].value
    print(f"align: done, {summary['steps']} steps; run directory {recipe.output.dir}")
    return 0


def late_failure(err: BaseException, run_dir: str) -> str | None:
    """The one place a failure after the run started becomes one line: what failed, the last good
    checkpoint (kept) and what to do. None for anything else (a bug: its traceback is the report)."""
    from align.checkpoint import CheckpointError, list_checkpoints
    from align.trainer import TrainingError
    from rewards import RewardError

    if isinstance(err, (TrainingError, CheckpointError)):
        return str(err)
    saved = list_checkpoints(run_dir)
    if isinstance(err, RewardError):
        return f"{err}; last checkpoint {saved[-1]} (fix the reward, then resume=latest)" if saved else str(err)
    if out_of_memory(err):
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        where = f"; last checkpoint {saved[-1]} (resume=latest)" if saved else "; no checkpoint was saved yet"
        return (
            f"out of memory ({reason}); lower train.batch_size, generation.max_new_tokens or generation.batch_size, "
            f"or raise train.gradient_accumulation_steps{where}"
        )
    return None


def out_of_memory(err: BaseException) -> bool:
    """An allocation that failed: Python's MemoryError, torch's OutOfMemoryError (CUDA), or the CPU
    allocator's RuntimeError."""
    import torch

    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and ("can't allocate memory" in str(err) or "out of memory" in str(err))


def list_recipes(args) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bundled recipes (align train NAME, or a path to your own)", show_lines=False)
    table.add_column("name")
    table.add_column("what it does")
    for name, path in bundled_recipes().items():
        try:
            text = read_yaml(path).get("description", "")
        except RecipeError:
            text = "(unreadable)"
        table.add_row(name, str(text).strip().splitlines()[0] if text else "")
    Console().print(table)
    return 0


def main(args) -> int:
    if args.command == "recipes":
        return list_recipes(args)
    return run_train(args)
