"""``align schema [SECTION]``: every recipe field, with its type, default and meaning.

Read from the pydantic models the recipe is validated with, so it cannot drift from them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from align.config import RecipeError
from align.recipe import Recipe


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    return text or str(annotation).replace("typing.", "")


def _section(model: type[BaseModel]) -> type[BaseModel] | None:
    for arg in (model, *getattr(model, "__args__", ())):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def field_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) of every field, sections expanded."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
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


def main(args) -> int:
    from rich.console import Console
    from rich.table import Table

    rows = field_rows(Recipe)
    section = args.recipe
    if section:
        rows = [r for r in rows if r[0] == section or r[0].startswith(section + ".")]
        if not rows:
            sections = sorted({r[0].split(".")[0] for r in field_rows(Recipe)})
            raise RecipeError(f"schema: no recipe section {section!r}; expected one of {sections}")
    table = Table(title="recipe fields (YAML keys; on the command line: dotted key=value)")
    for column in ("field", "type", "default", "meaning"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    return 0
