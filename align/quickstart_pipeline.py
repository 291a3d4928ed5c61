"""First-run preparation for ``recipes/quickstart.yaml``: corpus, tokenizer, base model, SFT.

Everything lands under the directory that holds the recipe's ``model.path`` (by default
``.cache/quickstart/``); each piece is built only if missing and published atomically, so a
second run starts RL at once and an interrupted first run leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from align.config import load_recipe

SFT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart_sft.yaml"


def prepare_quickstart(recipe) -> Path:
    from align.quickstart import ensure_quickstart_assets
    from align.recipe import Recipe
    from align.trainer import train

    sft_model = Path(recipe.model.path)
    root = sft_model.parent
    assets = ensure_quickstart_assets(root, seed=0)
    if (sft_model / "config.json").is_file():
        return sft_model
    sft = load_recipe(
        Recipe,
        SFT_RECIPE,
        [
            f"model.path={assets['base_model']}",
            f"data.train={assets['sft']}",
            f"output.dir={root / 'sft_run'}",
        ],
    )
    print(f"align: first run -- supervised fine-tuning the quickstart policy into {sft_model}")
    summary = train(sft)
    tmp = root / f".tmp-{sft_model.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(summary["final_model"], tmp)
    os.replace(tmp, sft_model)
    return sft_model
