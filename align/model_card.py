"""The model card of ``final/``: a README.md with Hugging Face metadata (library_name, base_model,
tags) and what the run was -- recipe, objective, reward, steps, final metrics -- so a pushed or
shared model says how it was made. LoRA adapters record an absolute (or hub) base path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from align.recipe import Recipe


def _base_model(path: str) -> str:
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path  # a hub id stays as it is


def write_model_card(final: Path, recipe: Recipe, summary: dict, last_metrics: dict, merged: bool = False) -> None:
    """``final/README.md``; ``merged``: the card of ``final_merged/`` (the adapters merged into the base)."""
    lora = recipe.model.lora is not None and not merged
    base = _base_model(recipe.model.path)
    objective = recipe.objective
    meta = {
        "library_name": "peft" if lora else "transformers",
        "base_model": base,
        "tags": ["align", objective.name, "reinforcement-learning" if objective.online else "alignment"],
        "pipeline_tag": "text-generation",
    }
    # β's one home after validation (given as beta or options.beta, else the objective's default)
    about = [f"`{objective.label}`"] if objective.label else []
    about += [f"β = {objective.beta:g}"] if objective.beta is not None else []
    rewards = ", ".join(c.label or c.name for c in recipe.reward) or "none (offline data)"
    # a metric logged as null (NaN, or nothing scored) has no value to show
    shown = {
        k: v
        for k in ("reward_mean", "kl_k1", "loss", "completion_length")
        if isinstance(v := last_metrics.get(k), int | float) and math.isfinite(v)
    }
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {Path(recipe.output.dir).name}",
        "",
        f"Trained with align from `{base}`: objective `{objective.name}`"
        + (f" ({', '.join(about)})" if about else "")
        + f", reward: {rewards}, {summary.get('steps')} steps"
        + (" (LoRA adapters)" if lora else "")
        + (" (LoRA adapters merged into the base weights)" if merged else "")
        + ".",
        "",
        "Final step: " + (", ".join(f"{k} {v:.4g}" for k, v in shown.items()) if shown else "no metrics logged") + ".",
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False).strip(),
        "```",
        "",
    ]
    (final / "README.md").write_text("\n".join(lines))
    adapter = final / "adapter_config.json"
    if adapter.is_file():  # peft wrote the recipe's (maybe relative) path: elsewhere it would not resolve
        config = json.loads(adapter.read_text())
        config["base_model_name_or_path"] = base
        adapter.write_text(json.dumps(config, indent=2))
