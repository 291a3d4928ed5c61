"""``align train`` / ``align sft`` / ``align recipes``."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from align.config import RecipeError, load_recipe, read_yaml

BUNDLED = Path(__file__).resolve().parent.parent / "recipes"


def run_train(args) -> int:
    from align.recipe import Recipe

    if args.recipe is None:
        raise RecipeError("recipe: a recipe YAML is required (see `align recipes`)")
    overrides = list(args.overrides)
    if args.command == "sft" and not any(o.startswith("objective.name=") for o in overrides):
        overrides.append("objective.name=sft")
    recipe = load_recipe(Recipe, args.recipe, overrides)
    from align.checkpoint import CheckpointError
    from align.trainer import TrainingError, train

    try:
        summary = train(recipe)
    except (TrainingError, CheckpointError) as err:
        print(f"align {args.command}: {err}", file=sys.stderr)
        return 1
    if summary.get("stopped_by"):
        print(
            f"align: stopped by {summary['stopped_by']} at step {summary['steps']}; "
            f"checkpoint {summary['checkpoint']} (resume with resume=latest)"
        )
        # the shell convention for a signal stop, so schedulers and `&&` chains see it did not finish
        return 128 + signal.Signals[summary["stopped_by"]].value
    else:
        print(f"align: done, {summary['steps']} steps; run directory {recipe.output.dir}")
    return 0


def list_recipes(args) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bundled recipes", show_lines=False)
    table.add_column("recipe")
    table.add_column("what it does")
    roots = [BUNDLED] if BUNDLED.is_dir() else []
    for root in roots:
        for path in sorted(root.rglob("*.yaml")):
            try:
                text = read_yaml(path).get("description", "")
            except RecipeError:
                text = "(unreadable)"
            table.add_row(str(path.relative_to(root.parent)), str(text).strip().splitlines()[0] if text else "")
    Console().print(table)
    return 0


def main(args) -> int:
    if args.command == "recipes":
        return list_recipes(args)
    return run_train(args)
