"""Recipes: YAML files validated by pydantic schemas, with ``key=value`` overrides.

Every schema forbids unknown keys. Errors come out as one line naming the field and what was
expected (``RecipeError``); the CLI prints it and exits with code 2, before any model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

Schema = TypeVar("Schema", bound=BaseModel)


class RecipeError(ValueError):
    """A recipe or override that does not fit its schema; the message is one line."""


class Strict(BaseModel):
    """Base for recipe sections: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())


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


def format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "recipe"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"field {field!r}: unknown key"
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
        raise RecipeError(f"{source}: {format_validation_error(err)}") from None


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


def dump_recipe(recipe: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
