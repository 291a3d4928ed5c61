"""The layers: leaves (losses/, rewards/) import nothing of align; the core (align/ outside
align/jobs/ and the CLI) imports no job; no import cycle anywhere; no package file over 500 lines.

Imports are read from the source (every ``import``, including the lazy ones inside functions),
so a cycle hidden behind a function-level import is caught as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("align", "losses", "rewards")
MAX_LINES = 500


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(filter(None, (resolve(a.name) for a in node.names)))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    target = full if full in mods else resolve(base)
                    if target:
                        deps.add(target)
        deps.discard(name)
        graph[name] = deps
    return graph


def layer(module: str) -> str:
    if module.split(".")[0] in ("losses", "rewards"):
        return "leaf"
    if module.startswith("align.jobs") or module in ("align.cli", "align.api", "align"):
        return "job"  # the CLI, the Python API and the package root that exposes it
    return "core"


def test_arrows_point_down_only() -> None:
    allowed = {"leaf": {"leaf"}, "core": {"core", "leaf"}, "job": {"job", "core", "leaf"}}
    wrong = [
        f"{module} ({layer(module)}) imports {dep} ({layer(dep)})"
        for module, deps in import_graph().items()
        for dep in sorted(deps)
        if layer(dep) not in allowed[layer(module)]
    ]
    assert not wrong, "\n".join(wrong)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycle() -> None:
    assert find_cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]


def test_no_package_file_over_500_lines() -> None:
    lines = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in modules().values()}
    long = {path: n for path, n in lines.items() if n > MAX_LINES}
    assert not long, long


def _project_modules_imported(tree: ast.AST) -> dict[str, str]:
    """Local name -> project module, for every ``import align.x as m`` / ``from align import x``."""
    mods = modules()
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in mods and alias.asname:
                    names[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in mods:
                    names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def private_imports(path: Path) -> list[str]:
    """Every private name (``_x``, not dunder) this file takes from another project module."""
    mods, tree = modules(), ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in mods and not node.level:
            found += [f"from {node.module} import {a.name}" for a in node.names if _private(a.name)]
    aliases = _project_modules_imported(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if _private(node.attr):
                found.append(f"{aliases[node.value.id]}.{node.attr}")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_imports_another_modules_private_name() -> None:
    wrong = [f"{path.relative_to(ROOT)}: {use}" for path in modules().values() for use in private_imports(path)]
    assert not wrong, "\n".join(wrong)


def test_the_private_import_finder_finds_both_forms(tmp_path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import align.step as s\nfrom align.batches import _zero_where\ns._no_sync_unless\ns.public\n")
    assert private_imports(source) == ["from align.batches import _zero_where", "align.step._no_sync_unless"]


# the values one step passes between its stages: made by their constructors, never written after
BATCH_CLASSES = {
    "align.rollout": ["Rollout"],
    "align.scoring": ["RolloutScores"],
    "align.batches": ["StepBatch", "KeptLogprobs"],
    "losses.base": ["LossBatch"],
}


def batch_field_names() -> set[str]:
    import dataclasses
    import importlib

    names: set[str] = set()
    for module, classes in BATCH_CLASSES.items():
        for name in classes:
            cls = getattr(importlib.import_module(module), name)
            assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, f"{name} is not frozen"
            names |= {f.name for f in dataclasses.fields(cls)}
    return names


def batch_writes(path: Path, fields: set[str]) -> list[str]:
    """Every ``x.field = …`` / ``x.field[…] = …`` / ``x.field += …`` / ``setattr(x, …)`` on a batch
    field outside ``self`` (a class's own constructor)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            found.append(f"line {node.lineno}: setattr")
        targets = [t for target in targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
        for target in targets:
            base = target.value if isinstance(target, ast.Subscript) else target
            if (
                isinstance(base, ast.Attribute)
                and base.attr in fields
                and not (isinstance(base.value, ast.Name) and base.value.id == "self")
            ):
                found.append(f"line {node.lineno}: {ast.unparse(target)}")
    return found


def test_no_batch_is_written_outside_its_constructor() -> None:
    """A batch (a rollout, its scores, a step batch, what a step keeps, an objective's view) is a
    value: nothing in align/ or losses/ assigns to its fields after it is made."""
    fields = batch_field_names()
    wrong = [
        f"{path.relative_to(ROOT)} {write}"
        for name, path in modules().items()
        if name.split(".")[0] in ("align", "losses")
        for write in batch_writes(path, fields)
    ]
    assert not wrong, "\n".join(wrong)


def test_the_batch_write_finder_finds_each_form(tmp_path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "batch.old_logprobs = x\nbatch.metrics['a'] = 1\nmicro.stats = s\nbatch.rewards += 1\n"
        "setattr(out, name, v)\nself.rewards = r\nrun.step = 1\n"
    )
    assert batch_writes(source, {"old_logprobs", "metrics", "stats", "rewards"}) == [
        "line 1: batch.old_logprobs",
        "line 2: batch.metrics['a']",
        "line 3: micro.stats",
        "line 4: batch.rewards",
        "line 5: setattr",
    ]


# the functions every step passes through stay short enough to read at once
SHORT_FUNCTIONS = {"align/step.py": ["optimizer_step", "train_on_batch"], "align/native_engine.py": ["generate"]}


def test_the_step_and_the_decode_loop_fit_on_a_screen() -> None:
    long = []
    for file, names in SHORT_FUNCTIONS.items():
        tree = ast.parse((ROOT / file).read_text())
        found = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        for name in names:
            node = found[name]
            lines = node.end_lineno - min([node.lineno, *(d.lineno for d in node.decorator_list)]) + 1
            if lines > 60:
                long.append(f"{file}:{name} is {lines} lines")
    assert not long, "\n".join(long)
