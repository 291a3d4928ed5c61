"""First-run preparation for ``recipes/quickstart.yaml``: corpus, tokenizer, base model, SFT.

Everything lands under the directory that holds the recipe's ``model.path`` (by default
``.cache/quickstart/``); each piece is built only if missing and published atomically, so a
second run starts RL at once and an interrupted first run leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from align.config import load_recipe

LAUNCH_VARIABLES = {
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
}
SFT_RECIPE = "quickstart_sft"  # a bundled recipe (align.config.find_recipe)


def prepare_quickstart(recipe) -> Path:
    from align.jobs.quickstart.corpus import ensure_quickstart_assets

    sft_model = Path(recipe.model.path)
    root = sft_model.parent
    assets = ensure_quickstart_assets(root, seed=0)
    overrides = [f"model.path={assets['base_model']}", f"data.train={assets['sft']}", f"output.dir={root / 'sft_run'}"]
    return sft_once(SFT_RECIPE, overrides, sft_model, lambda message: print(f"align: first run -- {message}"))


def sft_once(sft_recipe: str | Path, overrides: list[str], sft_model: Path, log: Callable[[str], None]) -> Path:
    """The policy at ``sft_model``, supervised-fine-tuned once by ``sft_recipe`` (with ``overrides``)
    through the trainer and published atomically. A finished one (it has a ``config.json``) is
    reused; a leftover directory without one is replaced."""
    from align.jobs.quickstart.corpus import atomic_dir
    from align.recipe import Recipe
    from align.signals import RunStopped
    from align.trainer import train

    sft_model = Path(sft_model)
    if (sft_model / "config.json").is_file():
        return sft_model
    # the SFT run directory is ours to rebuild: a leftover from an interrupted first run is replaced
    recipe = load_recipe(Recipe, sft_recipe, [*overrides, "output.overwrite=true"])
    log(f"supervised fine-tuning ({Path(sft_recipe).name}) into {sft_model}")

    def build(out: Path) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # under a multi-process launch the SFT runs once, as its own single process (the
            # launch's process group belongs to the run that asked for it)
            env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("ACCELERATE_")}
            argv = ["train", str(sft_recipe), *overrides, "output.overwrite=true"]
            code = subprocess.run([sys.executable, "-m", "align.cli", *argv], env=env).returncode
            if code > 128 and code - 128 in {s.value for s in signal.Signals}:
                raise stopped(signal.Signals(code - 128).name)
            if code:
                raise subprocess.CalledProcessError(code, argv)
            final = Path(recipe.output.dir) / "final"
        else:
            summary = train(recipe)
            if summary.get("stopped_by"):  # no final model: the policy is not built
                raise stopped(summary["stopped_by"])
            final = summary["final_model"]
        shutil.copytree(final, out, dirs_exist_ok=True)

    def stopped(name: str) -> RunStopped:
        return RunStopped(
            name,
            f"stopped by {name} during the supervised fine-tuning into {sft_model}; the same command starts it over",
        )

    shutil.rmtree(sft_model, ignore_errors=True)
    return atomic_dir(sft_model, build)
