"""``align``: align language models with RL and direct-alignment objectives; one subcommand per job.

Recipe errors print one line and exit with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from align.config import RecipeError
from align.signals import RunStopped

# subcommand -> (module with ``main(args)``, one-line help, what its arguments are)
RECIPE_ARGS = (
    "RECIPE is a YAML file or a bundled recipe name (`align recipes`); OVERRIDES are dotted key=value "
    "pairs that replace recipe fields (train.steps=50 objective.beta=0.1 output.dir=runs/x). Every "
    "field, its default and meaning: `align schema [JOB] [SECTION]`."
)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": (
        "align.jobs.train",
        "align a language model with the recipe's objective and reward",
        "Builds the recipe's assets (prepare:), trains, then writes report.md, final/ and summary.json "
        "in output.dir. " + RECIPE_ARGS + " Multi-process: accelerate launch -m align.cli train RECIPE.",
    ),
    "sft": (
        "align.jobs.train",
        "supervised fine-tuning on completion tokens (objective sft)",
        "The same as `align train` with objective.name=sft. " + RECIPE_ARGS,
    ),
    "recipes": ("align.jobs.train", "list the bundled recipes", "Their names work wherever a RECIPE is asked for."),
    "schema": (
        "align.jobs.schema",
        "every recipe field: type, default, meaning",
        "`align schema [JOB] [SECTION]`: JOB is train (the default; sft, sample and summarize read the same "
        "recipe), rm, compare, overopt or bandit; SECTION narrows it (align schema bandit objectives; "
        "align schema generation is the train recipe's).",
    ),
    "sample": (
        "align.jobs.sample",
        "sample from a trained policy (RUN_DIR or RECIPE) and score it: n=8 out=FILE",
        "RECIPE is a run directory (its saved policy) or a recipe (its model as it is); completions on "
        "data.eval_prompts (else the training prompts), scored by the recipe's rewards, written as JSONL "
        "(out=FILE) and shown as a table. n=COUNT prompts; other OVERRIDES change the recipe (fields: "
        "`align schema`).",
    ),
    "bandit": (
        "align.jobs.bandit.cli",
        "compare objectives on toy bandits with closed-form optima",
        "RECIPE: a bandit recipe (default: recipes/bandit/). " + RECIPE_ARGS,
    ),
    "rm": ("align.jobs.rm", "train a reward model from preference pairs (Bradley-Terry)", RECIPE_ARGS),
    "summarize": (
        "align.jobs.summarize",
        "summarisation with an entailment (NLI) reward: build, SFT, RL, report",
        RECIPE_ARGS,
    ),
    "compare": (
        "align.jobs.compare.study",
        "compare objectives on one task: same SFT policy, prompts, seeds, samples per step",
        "Every objective x seed of the recipe trains on the task's reward; its checkpoints are scored on "
        "held-out prompts (reward, gold, KL, win-rate against the SFT policy) and its cost measured; "
        "report.md/json and plots in out/, and one line per paper claim. " + RECIPE_ARGS,
    ),
    "overopt": (
        "align.jobs.overopt.study",
        "measure reward over-optimization (gold vs proxy reward against KL)",
        RECIPE_ARGS,
    ),
    "vllm-serve": (
        "align.jobs.vllm_serve",
        "start a vLLM server for generation.vllm.mode: server",
        "vLLM's own server with the endpoints the trainer uses (weight reload and version, token-in "
        "token-out generation); arguments after -- go to vLLM.",
    ),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("align")
    except PackageNotFoundError:  # a checkout on the path, not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align",
        description=__doc__.splitlines()[0],
        epilog="Recipe fields: `align schema`. Per command: `align COMMAND --help`. Recipe errors exit with code 2.",
    )
    parser.add_argument("--version", action="version", version=f"align {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text, details) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=f"{help_text}. {details}")
        p.set_defaults(module=module, recipe=None, overrides=[])
        if name == "vllm-serve":  # a model, not a recipe
            importlib.import_module(module).add_arguments(p)
            continue
        p.add_argument("recipe", nargs="?", metavar="RECIPE", help="recipe YAML or bundled name (see below)")
        p.add_argument("overrides", nargs="*", metavar="OVERRIDES", help="key=value, dotted for sections")
        if name == "train":
            p.add_argument(
                "--from-trl",
                choices=("grpo", "rloo", "dpo"),
                help="RECIPE is a TRL GRPOConfig/RLOOConfig/DPOConfig YAML: translate it (align/jobs/trl_config.py)",
            )
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
        code = int(module.main(args) or 0)
    except RecipeError as err:
        print(f"align {args.command}: {err}", file=sys.stderr)
        return 2
    except RunStopped as stop:
        print(f"align {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `align schema | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    if _leave_process_group():
        # one of several launched processes, its command finished and everything it writes written
        # and closed (metrics, checkpoints, wandb/trackio runs): skip the interpreter's teardown,
        # where the C++ threads behind the process group -- still referenced by sharded modules --
        # aborted finished FSDP2 runs ('terminate called without an active exception', SIGABRT),
        # which the launcher then reports as a failed job
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _leave_process_group() -> bool:
    """After a command succeeded, destroy the process group, as PyTorch asks; True when this
    process was one of several. Only on success: after an error another rank may still be
    inside a collective that this would hang."""
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    if not (dist.is_available() and dist.is_initialized()):
        return False
    several = dist.get_world_size() > 1
    dist.destroy_process_group()
    return several


if __name__ == "__main__":
    sys.exit(main())
