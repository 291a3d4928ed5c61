"""Recipes: YAML files validated by pydantic schemas, with ``key=value`` overrides.

Every schema forbids unknown keys. Errors come out as one line naming the field and what was
expected (``RecipeError``); the CLI prints it and exits with code 2, before any model loads.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from align import files

Schema = TypeVar("Schema", bound=BaseModel)


class RecipeError(ValueError):
    """A recipe or override that does not fit its schema; the message is one line."""


class Strict(BaseModel):
    """Base for recipe sections: unknown keys are errors, defaults are validated too, and no float
    field takes inf or NaN (a learning rate of .inf would fail only after the models load)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=(), allow_inf_nan=False)


# a random seed every library takes (numpy's must lie in [0, 2**32))
Seed = Annotated[int, Field(ge=0, lt=2**32, description="random seed, in [0, 2**32)")]


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=VALUE`` → (["a", "b"], VALUE parsed as YAML: numbers, lists, booleans, null)."""
    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected key=value (e.g. beta=0.3 or objective.beta=0.1)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise RecipeError(f"recipe {str(path)!r}{where}: not valid YAML") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {str(path)!r}: expected a mapping of fields at the top level")
    return data


# TRL's names for a training recipe's fields (a GRPO/RLOO/DPO config's keys), and, where the
# meaning differs, how: a TRL user's key gets "did you mean" with align's field
TRL_NAMES: dict[str, tuple[str, str]] = {
    "learning_rate": ("train.lr", ""),
    "per_device_train_batch_size": (
        "train.batch_size",
        "it counts prompts, each sampled objective.k times, where TRL's counts completions",
    ),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", ""),
    "max_steps": ("train.steps", ""),
    "num_train_epochs": ("train.epochs", "offline objectives; online ones count train.steps"),
    "eval_steps": ("eval.every", ""),
    "eval_strategy": ("eval.every", "every N steps; 0 is TRL's 'no'"),
    "metric_for_best_model": ("eval.keep_best", "the best model is copied to DIR/best"),
    "greater_is_better": ("eval.greater_is_better", ""),
    "load_in_4bit": ("model.load_in_4bit", "with model.lora: QLoRA"),
    "num_generations": ("objective.k", ""),
    "num_iterations": ("train.updates_per_batch", ""),
    "beta": ("objective.beta", ""),
    "epsilon": ("objective.options.clip_low", "TRL's clip epsilon; align's options.eps is GRPO's std epsilon"),
    "importance_sampling_level": ("objective.name", "'sequence' is the objective gspo"),
    "max_completion_length": ("generation.max_new_tokens", ""),
    "max_prompt_length": ("data.max_prompt_tokens", ""),
    "temperature": ("generation.temperature", ""),
    "top_p": ("generation.top_p", ""),
    "top_k": ("generation.top_k", ""),
    "max_grad_norm": ("train.max_grad_norm", ""),
    "lr_scheduler_type": ("train.lr_scheduler", ""),
    "warmup_steps": ("train.warmup_steps", ""),
    "weight_decay": ("train.weight_decay", ""),
    "seed": ("train.seed", ""),
    "output_dir": ("output.dir", ""),
    "save_steps": ("output.save_every", ""),
    "save_total_limit": ("output.keep_last", ""),
    "report_to": ("output.report_to", ""),
    "run_name": ("output.run_name", ""),
    "model_name_or_path": ("model.path", ""),
    "gradient_checkpointing": ("train.gradient_checkpointing", "off by default here, on in TRL's configs"),
    "use_vllm": ("generation.engine", "generation.engine: vllm"),
    "vllm_mode": ("generation.engine", "colocate is generation.engine: vllm; server mode is not built yet"),
    "vllm_gpu_memory_utilization": ("generation.vllm.gpu_memory_utilization", ""),
    "vllm_importance_sampling_correction": (
        "generation.importance_correction.mode",
        "on by default with engine vllm; mode: none turns it off",
    ),
    "vllm_importance_sampling_mode": ("generation.importance_correction.mode", ""),
    "vllm_importance_sampling_cap": ("generation.importance_correction.clip_max", ""),
}


def _section_model(schema: type[BaseModel], path: list[str]) -> type[BaseModel] | None:
    """The pydantic model of the section at ``path`` (list items stepped through), or None."""
    model: Any = schema
    for part in path:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = next(
            (
                a
                for a in (field.annotation, *_args(field.annotation))
                if isinstance(a, type) and issubclass(a, BaseModel)
            ),
            None,
        )
        if model is None:
            return None
    return model


def _args(annotation: Any) -> tuple:
    out = []
    for arg in getattr(annotation, "__args__", ()) or ():
        out += [arg, *_args(arg)]
    return tuple(out)


def did_you_mean(schema: type[BaseModel], loc: list[str]) -> str:
    """``; did you mean 'x.y'?`` for an unknown key: TRL's name for a field, else a near miss among
    the section's own fields; empty when neither."""
    key, parent = loc[-1], loc[:-1]
    if key in TRL_NAMES:
        target, how = TRL_NAMES[key]
        head, _, name = target.rpartition(".")
        if head.endswith(".options"):  # an objective's option: the objective section must exist
            head, name = head.rpartition(".")[0], "options"
        section = _section_model(schema, head.split(".") if head else [])
        if section is not None and name in section.model_fields:
            return f"; did you mean {target!r}?" + (f" ({how})" if how else "")
    section = _section_model(schema, parent)
    if section is None:
        return ""
    close = difflib.get_close_matches(key, list(section.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {'.'.join([*parent, close[0]])!r}?" if close else ""


def format_validation_error(err: ValidationError, schema: type[BaseModel] | None = None) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "recipe"
    kind = first["type"]
    if kind == "extra_forbidden":
        hint = did_you_mean(schema, [str(p) for p in first["loc"]]) if schema is not None else ""
        return f"field {field!r}: unknown key{hint}"
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    got = first.get("input")
    shown = repr(got) if not isinstance(got, dict) and len(repr(got)) < 60 else None
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"field {field!r}: {msg}" + (f", got {shown}" if shown is not None else "") + more


def validate(schema: type[Schema], data: dict, source: str = "recipe") -> Schema:
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"{source}: {format_validation_error(err, schema)}") from None


def bundled_recipes_dir() -> Path:
    """The recipes shipped with align: ``align/recipes/`` inside an installed wheel (the wheel maps
    the checkout's top-level ``recipes/`` there), ``recipes/`` beside the package in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "recipes", here.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise RecipeError(f"bundled recipes: not found in {here / 'recipes'} or {here.parent / 'recipes'}")


def bundled_recipes() -> dict[str, Path]:
    """Bundled recipe name (``quickstart``, ``bandit/length_bias``) -> its YAML file."""
    root = bundled_recipes_dir()
    return {str(p.relative_to(root).with_suffix("")): p for p in sorted(root.rglob("*.yaml"))}


def find_recipe(path: str | Path) -> Path:
    """A recipe file: ``path`` itself when it exists, else the bundled recipe of that name
    (``quickstart``, ``recipes/quickstart.yaml`` and ``quickstart.yaml`` all name the same one)."""
    given = Path(path)
    if given.is_file():
        return given
    name = str(given.with_suffix("") if given.suffix in (".yaml", ".yml") else given)
    name = name[len("recipes/") :] if name.startswith("recipes/") else name
    bundled = bundled_recipes()
    if name in bundled:
        return bundled[name]
    raise RecipeError(
        f"recipe {str(path)!r}: no such file, and no bundled recipe of that name (`align recipes` lists them)"
    )


def load_recipe(schema: type[Schema], path: str | Path | None, overrides: list[str] | None = None) -> Schema:
    """Read ``path`` -- a file or a bundled recipe's name -- (or start from the schema's defaults),
    apply overrides, validate."""
    data = read_yaml(find_recipe(path)) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return validate(schema, data, source=f"recipe {str(path)!r}" if path else "recipe")


def check_output_path(path: str | Path, field: str, kind: str) -> Path:
    """``path`` can be written as a ``kind`` ("file" or "directory"), checked before any work:
    RecipeError naming ``field`` otherwise (an existing directory for a file or the other way
    round, a path under a file, a parent this process cannot write)."""
    path = Path(path)
    if path.exists() and path.is_dir() != (kind == "directory"):
        other = "directory" if path.is_dir() else "file"
        raise RecipeError(f"{field}: {str(path)!r} is an existing {other}; expected a {kind} path")
    parent = path if kind == "directory" and path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RecipeError(f"{field}: {str(path)!r} lies under the file {str(parent)!r}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RecipeError(f"{field}: {str(path)!r}: {str(parent)!r} is not writable")
    return path


def dump_recipe(recipe: BaseModel, path: str | Path) -> None:
    files.write_text(path, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
