"""What a resume may change: fields that alter the meaning of the trajectory are refused, the
ones a user may legitimately change are applied and recorded in ``DIR/recipe_history.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from align import files
from align.config import RecipeError

# changeable on resume; every other field (objective, model, reference, data, reward, generation,
# batch sizes, seed, optimizer, schedule shape, clipping) is part of what the earlier steps meant
CHANGEABLE = ("description", "prepare", "resume", "train.steps", "train.lr", "train.max_bad_steps", "output.")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def recipe_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted field → (saved, current) for every field that differs."""
    old, new = _flat(saved), _flat(current)
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def _as_validated(recipe, saved: dict) -> dict:
    """The saved recipe as today's schema reads it: a field whose value validation fills (β from the
    objective's default, a new field's default) is not a change; one that no longer validates is
    compared as it was saved."""
    try:
        return type(recipe).model_validate(saved).model_dump(mode="json")
    except ValueError:
        return saved


def check_resume(recipe, checkpoint: Path) -> dict[str, tuple[Any, Any]]:
    """Refuse a resume that changes the trajectory; return the (allowed) changes to apply and record.

    Runs before any model loads: it reads only ``trainer_state.pt`` (plain types)."""
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    if recipe.train.steps < state["step"]:
        raise RecipeError(f"train.steps: {recipe.train.steps} is below the checkpoint's step {state['step']}")
    saved = state.get("recipe")
    if saved is None:  # a checkpoint from before recipes were stored in it
        print(f"resume: {checkpoint} holds no recipe; the recipe's fields cannot be checked")
        return {}
    changes = recipe_changes(_as_validated(recipe, json.loads(saved)), recipe.model_dump(mode="json"))
    refused = [k for k in changes if not any(k == c or (c.endswith(".") and k.startswith(c)) for c in CHANGEABLE)]
    if refused:
        raise RecipeError(
            f"resume: {checkpoint} was trained with other {', '.join(refused)}; a resume may change only "
            "train.steps (up), train.lr, train.max_bad_steps and output.* -- start a new run for the rest"
        )
    return changes


def record_changes(run_dir: Path, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append the resume's changes, with the step they apply from, to the run's recipe history."""
    changes = {k: v for k, v in changes.items() if k != "resume"}
    if not changes:
        return
    entry = {"from_step": step, "changes": {k: {"was": old, "now": new} for k, (old, new) in changes.items()}}
    files.append_line(run_dir / "recipe_history.jsonl", json.dumps(entry))
