"""``align`` command line: one subcommand per job; each module parses its own arguments.

Recipe errors print one line and exit with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from align.config import RecipeError

# subcommand -> (module with ``main(args)``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("align.jobs.train", "align a language model with the recipe's objective and reward"),
    "sft": ("align.jobs.train", "supervised fine-tuning on completion tokens (objective sft)"),
    "recipes": ("align.jobs.train", "list the bundled recipes"),
    "sample": ("align.jobs.sample", "sample from a trained policy (RUN_DIR or RECIPE) and score it: n=8 out=FILE"),
    "bandit": ("align.jobs.bandit.cli", "compare objectives on toy bandits with closed-form optima"),
    "rm": ("align.jobs.rm", "train a reward model from preference pairs (Bradley-Terry)"),
    "summarize": ("align.jobs.summarize", "summarisation with an entailment (NLI) reward: build, SFT, RL, report"),
    "overopt": ("align.jobs.overopt.study", "measure reward over-optimization (gold vs proxy reward against KL)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("recipe", nargs="?", help="recipe YAML (bundled default if omitted)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, dotted for sections")
        p.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # `align bandit beta=0.3` with no recipe: the first positional is an override
    if args.recipe is not None and "=" in args.recipe and not args.recipe.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.recipe)
        args.recipe = None
    try:
        module = importlib.import_module(args.module)
        return int(module.main(args) or 0)
    except RecipeError as err:
        print(f"align {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
