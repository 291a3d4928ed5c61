"""``align schema [JOB] [SECTION]``: every field of a job's recipe, with its type, default and meaning.

JOB is train (the default; also sft, sample and summarize, which read training recipes), rm,
compare, overopt or bandit. Read from the pydantic models each recipe is validated with, so it
cannot drift from them.
"""

from __future__ import annotations

import importlib
import sys
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from align.config import RecipeError

# job -> (module, class) of the model its recipe is validated with; imported only when asked for
RECIPE_SCHEMAS: dict[str, tuple[str, str]] = {
    "train": ("align.recipe", "Recipe"),
    "sft": ("align.recipe", "Recipe"),
    "sample": ("align.recipe", "Recipe"),
    "summarize": ("align.recipe", "Recipe"),
    "rm": ("align.jobs.rm", "RMRecipe"),
    "compare": ("align.jobs.compare.config", "CompareRecipe"),
    "overopt": ("align.jobs.overopt.config", "OveroptRecipe"),
    "bandit": ("align.jobs.bandit.config", "BanditRecipe"),
}


def _type_name(annotation: Any) -> str:
    """A field's type as a reader writes it: ``list[str]``, ``float | None``, constraints left out."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "Literal[" + ", ".join(repr(a) for a in args) + "]"
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _section(model: type[BaseModel]) -> type[BaseModel] | None:
    for arg in (model, *getattr(model, "__args__", ())):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def field_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) of every field, sections expanded."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"  # the key a recipe writes (train.async, not async_)
        nested = _section(field.annotation)
        if nested is not None and nested is not model:
            rows.append((key, "section", "", field.description or (nested.__doc__ or "").strip().split("\n")[0]))
            rows.extend(field_rows(nested, key + "."))
            continue
        if field.default is PydanticUndefined and field.default_factory is None:
            default = "(required)"
        elif field.default_factory is not None:
            default = repr(field.default_factory())
        else:
            default = repr(field.default)
        rows.append((key, _type_name(field.annotation), default, field.description or ""))
    return rows


def recipe_schema(job: str) -> type[BaseModel]:
    """The model ``job``'s recipe is validated with."""
    module, name = RECIPE_SCHEMAS[job]
    return getattr(importlib.import_module(module), name)


def job_and_section(args: list[str]) -> tuple[str, str | None]:
    """``[JOB] [SECTION]`` -> (job, section): a first word that is no job is a section of the train
    recipe (``align schema generation``), as before jobs were named."""
    if len(args) > 2:
        raise RecipeError(f"schema: expected [JOB] [SECTION], got {' '.join(args)!r}")
    if args and args[0] in RECIPE_SCHEMAS:
        return args[0], args[1] if len(args) > 1 else None
    if len(args) > 1:
        raise RecipeError(f"schema: no job {args[0]!r}; expected one of {sorted(RECIPE_SCHEMAS)}")
    return "train", args[0] if args else None


def option_rows(kind: str) -> list[tuple[str, str, str, str]]:
    """Every objective's (``kind`` "objective") or reward's ("reward") options, from the
    constructors they are built with: ``objective.options.<option>`` under each name."""
    import inspect

    if kind == "objective":
        import losses

        names, options, doc = sorted(losses.REGISTRY), losses.options, lambda n: losses.REGISTRY[n].__doc__
    else:
        import rewards

        names, options = sorted(rewards.REGISTRY), rewards.registry.options
        doc = lambda n: rewards.REGISTRY[n].__doc__  # noqa: E731

    rows = []
    for name in names:
        first = (doc(name) or "").strip().split("\n")[0]
        rows.append((f"{kind} {name}", "section", "", first))
        for option, default in options(name).items():
            required = default is inspect.Parameter.empty
            shown = "(required)" if required else repr(default)
            rows.append((f"{kind}.options.{option}", "" if required else type(default).__name__, shown, f"({name})"))
    return rows


def main(args) -> int:
    job, section = job_and_section([a for a in (args.recipe, *args.overrides) if a is not None])
    every = field_rows(recipe_schema(job))
    if section in ("objective.options", "reward.options") and any(r[0] == section for r in every):
        rows = option_rows(section.split(".")[0])
    else:
        rows = every
        if section:
            rows = [r for r in every if r[0] == section or r[0].startswith(section + ".")]
            if not rows:
                sections = sorted({r[0].split(".")[0] for r in every})
                raise RecipeError(f"schema: no {job} recipe section {section!r}; expected one of {sections}")
    title = f"{job} recipe fields (YAML keys; on the command line: dotted key=value)"
    if not sys.stdout.isatty():  # piped: one plain line a field, nothing wrapped
        print(title)
        for row in rows:
            print("  ".join(cell for cell in row if cell))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption="each objective's and reward's options: align schema objective.options")
    for column in ("field", "type", "default", "meaning"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    return 0
