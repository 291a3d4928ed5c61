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
saved there as ``data/train.parquet``, so the run directory says what it trained on). A
module-level reward function is recorded by its module (a ``python`` reward), so the run resumes
and ``align sample`` scores it from any process; TRL's arguments are taken too: a list of rows or
a DatasetDict as ``dataset``, ``eval_dataset`` (prompts, or pairs for an offline objective) and
``peft_config``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.config import RecipeError, validate
from align.recipe import Recipe
from align.rundir import held_run, refusal


@dataclass
class TrainResult:
    model: Any  # the trained policy (final/), in eval mode; None when output.save_model is false
    tokenizer: Any
    summary: dict  # what summary.json holds
    run_dir: Path


def _as_dict(recipe: Recipe | dict) -> dict:
    return recipe.model_dump(mode="json") if isinstance(recipe, Recipe) else dict(recipe)


def save_table(table: Any, path: Path, keep_existing: bool) -> None:
    """An in-memory dataset as the run's parquet file, written atomically. ``keep_existing`` (a resumed
    run): the file the run trained on stays; a dataset with other rows is refused, not swapped in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    table.to_parquet(str(tmp))
    if keep_existing and path.exists():
        same = tmp.read_bytes() == path.read_bytes()
        tmp.unlink()
        if not same:
            raise RecipeError(
                f"dataset: the resumed run in {str(path.parent.parent)!r} trained on {path.name}, and this "
                "dataset has other rows; pass the same dataset to resume, or start a new output.dir"
            )
        return
    os.replace(tmp, path)


def as_table(value: Any, field: str):
    """What TRL users pass as a dataset, as a ``datasets.Dataset``: a Dataset, a DatasetDict (its
    ``train`` split), a list of rows, a dict of columns or a pandas DataFrame."""
    import datasets

    if isinstance(value, datasets.Dataset):
        return value
    if isinstance(value, datasets.DatasetDict):
        if "train" not in value:
            raise RecipeError(f"{field}: a DatasetDict without a 'train' split ({sorted(value)}); pass the split")
        return value["train"]
    if isinstance(value, list) and all(isinstance(row, dict) for row in value):
        return datasets.Dataset.from_list(value)
    if isinstance(value, dict):
        return datasets.Dataset.from_dict(value)
    if type(value).__name__ == "DataFrame" and hasattr(value, "to_parquet"):
        return datasets.Dataset.from_pandas(value, preserve_index=False)
    raise RecipeError(
        f"{field}: expected a datasets.Dataset, a DatasetDict, a list of rows or a dict of columns; "
        f"got {type(value).__name__}"
    )


def lora_section(peft_config: Any) -> dict:
    """A peft ``LoraConfig`` (TRL's ``peft_config=``) as the recipe's ``model.lora`` section."""
    if not all(hasattr(peft_config, name) for name in ("r", "lora_alpha", "lora_dropout", "target_modules")):
        raise RecipeError(f"peft_config: expected a peft LoraConfig, got {type(peft_config).__name__}")
    targets = peft_config.target_modules
    return {
        "r": int(peft_config.r),
        "alpha": int(peft_config.lora_alpha),
        "dropout": float(peft_config.lora_dropout),
        "target_modules": sorted(targets) if isinstance(targets, set | list | tuple) else targets,
    }


def importable(fn: Any) -> tuple[str, str] | None:
    """(module, name) where ``fn`` is a module-level function another process can import."""
    import importlib

    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or not name.isidentifier():
        return None
    try:
        return (module, name) if getattr(importlib.import_module(module), name, None) is fn else None
    except Exception:
        return None


def reward_component(fn: Any, registered: list[str]) -> dict:
    """A reward callable as a recipe's reward component. An importable function is recorded as a
    ``python`` reward naming its module, so the run resumes, and ``align sample`` scores it, from any
    process; another callable (a lambda, a closure, a ``__main__`` function) is registered for this
    call under a name that stays the same from call to call (for a resume in the same program)."""
    import rewards

    label = getattr(fn, "__name__", "reward")
    where = importable(fn)
    if where is not None:
        return {"name": "python", "label": label, "options": {"module": where[0], "function": where[1]}}
    base = "api_" + ("".join(ch if ch.isalnum() or ch == "_" else "_" for ch in label) or "reward")
    name, k = base, 2
    while name in registered:
        name, k = f"{base}_{k}", k + 1
    rewards.register(fn, name=name)
    registered.append(name)
    return {"name": name, "label": label}


def train(
    recipe: Recipe | dict,
    dataset: Any = None,
    reward_funcs: list | None = None,
    eval_dataset: Any = None,
    accelerator=None,
    peft_config: Any = None,
    on_step: Callable[[int, dict], None] | None = None,
    on_save: Callable[[Path], None] | None = None,
    on_eval: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train ``recipe`` (a Recipe or a plain dict of its fields) and return the trained model.

    ``eval_dataset``: held-out prompts for an online objective, held-out pairs for an offline one;
    ``peft_config``: a peft ``LoraConfig``, the same as the recipe's ``model.lora``;
    ``on_step(step, record)``: after each step, with the record metrics.jsonl gets;
    ``on_save(checkpoint)``: after each checkpoint is complete, with its directory;
    ``on_eval(step, metrics)``: after each evaluation of ``eval.every``, with its ``eval/`` metrics."""
    import rewards
    from align.objective import ObjectiveConfig

    raw = _as_dict(recipe)
    if peft_config is not None:
        raw["model"] = {**raw.get("model", {}), "lora": lora_section(peft_config)}
    online = validate(ObjectiveConfig, raw.get("objective", {})).online
    run_dir = Path(raw.get("output", {}).get("dir", "runs/align"))
    resuming, overwrite = raw.get("resume") is not None, bool(raw.get("output", {}).get("overwrite"))
    refused = refusal(run_dir, resuming, overwrite)
    if refused is not None:  # refused before the run's data is touched
        raise RecipeError(refused)
    held = held_run(run_dir)
    data = dict(raw.get("data", {}))
    eval_key = "eval_prompts" if online else "eval_pairs"
    for key, table, name in (("train", dataset, "dataset"), (eval_key, eval_dataset, "eval_dataset")):
        if table is not None:
            path = run_dir / "data" / f"{'train' if key == 'train' else 'eval'}.parquet"
            save_table(as_table(table, name), path, keep_existing=resuming and bool(held))
            data[key] = str(path)
    raw["data"] = data
    section = raw.get("reward") or []
    components = [section] if isinstance(section, (dict, str)) else list(section)
    registered: list[str] = []
    for fn in reward_funcs or []:
        if not rewards.registry.is_reward_function(fn):
            raise TypeError(
                f"reward_funcs: {fn!r} is not a reward function; expected f(prompts=, completions=, **columns) "
                "returning one float per completion"
            )
        components.append(reward_component(fn, registered))
    raw["reward"] = components
    from align.jobs.train import run
    from align.models import load_saved_policy, load_tokenizer

    try:
        validated = validate(Recipe, raw)
        summary = run(validated, accelerator, on_step=on_step, on_save=on_save, on_eval=on_eval)
    finally:  # the callables were this call's: leave the registry as it was
        for name in registered:
            rewards.REGISTRY.pop(name, None)
    model = None
    if summary.get("final_model"):
        model = load_saved_policy(validated, summary["final_model"], "cpu")
    return TrainResult(model=model, tokenizer=load_tokenizer(validated), summary=summary, run_dir=run_dir)
