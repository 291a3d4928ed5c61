"""`align bandit [RECIPE.yaml] [key=value ...]`: train every objective of the recipe, write the report."""

from __future__ import annotations

import argparse
import time

from rich.console import Console

from align.config import check_output_path, dump_recipe, load_recipe
from align.jobs.bandit.config import BanditRecipe
from align.jobs.bandit.lab import run
from align.jobs.bandit.report import plot, table, write_json


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(BanditRecipe, args.recipe, args.overrides)
    console = Console(stderr=True)
    out = check_output_path(recipe.out, "out", "directory")  # before the study, not after it
    start = time.perf_counter()
    results = run(recipe, progress=lambda label: console.print(f"[dim]training {label} ...[/dim]"))
    results["seconds"] = round(time.perf_counter() - start, 2)
    write_json(results, out)
    dump_recipe(recipe, out / "recipe.yaml")
    png = plot(results, out)
    table(results)
    console.print(f"wrote {out / 'results.json'} and {png} in {results['seconds']} s")
    return 0
