"""The Python API: ``from align import Recipe, train``.

    from align import Recipe, train

    result = train(
        {"model": {"path": "Qwen/Qwen2.5-0.5B-Instruct"}, "objective": {"name": "rloo", "k": 4}},
        dataset=my_datasets_Dataset,            # or data.train in the recipe: a file or hub name
        reward_funcs=[my_reward],               # TRL-convention callables: f(prompts=, completions=, **columns)
    )
    result.model, result.tokenizer, result.summary, result.run_dir

The same run as ``align train``: the recipe is validated first (a bad field is a RecipeError
naming it), its assets prepared, the run written to ``output.dir`` (an in-memory dataset is
saved there as ``data/train.parquet``, so the run directory says what it trained on).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.config import validate
from align.recipe import Recipe


@dataclass
class TrainResult:
    model: Any  # the trained policy (final/), in eval mode; None when output.save_model is false
    tokenizer: Any
    summary: dict  # what summary.json holds
    run_dir: Path


def _as_dict(recipe: Recipe | dict) -> dict:
    return recipe.model_dump(mode="json") if isinstance(recipe, Recipe) else dict(recipe)


def train(
    recipe: Recipe | dict,
    dataset: Any = None,
    reward_funcs: list | None = None,
    eval_dataset: Any = None,
    accelerator=None,
) -> TrainResult:
    """Train ``recipe`` (a Recipe or a plain dict of its fields) and return the trained model."""
    import rewards

    raw = _as_dict(recipe)
    run_dir = Path(raw.get("output", {}).get("dir", "runs/align"))
    data = dict(raw.get("data", {}))
    for key, table, name in (("train", dataset, "train"), ("eval_prompts", eval_dataset, "eval")):
        if table is not None:
            path = run_dir / "data" / f"{name}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            table.to_parquet(str(path))
            data[key] = str(path)
    raw["data"] = data
    section = raw.get("reward") or []
    components = [section] if isinstance(section, (dict, str)) else list(section)
    registered = []
    for fn in reward_funcs or []:
        if not rewards.registry.is_reward_function(fn):
            raise TypeError(
                f"reward_funcs: {fn!r} is not a reward function; expected f(prompts=, completions=, **columns) "
                "returning one float per completion"
            )
        name = f"api_{getattr(fn, '__name__', 'reward')}_{id(fn):x}"
        rewards.register(fn, name=name)
        registered.append(name)
        components.append({"name": name, "label": getattr(fn, "__name__", name)})
    raw["reward"] = components
    from align.jobs.train import run
    from align.models import load_saved_policy, load_tokenizer

    try:
        validated = validate(Recipe, raw)
        summary = run(validated, accelerator)
    finally:  # the callables were this call's: leave the registry as it was
        for name in registered:
            rewards.REGISTRY.pop(name, None)
    model = None
    if summary.get("final_model"):
        model = load_saved_policy(validated, summary["final_model"], "cpu")
    return TrainResult(model=model, tokenizer=load_tokenizer(validated), summary=summary, run_dir=run_dir)
