"""``python``: your own reward function, named in a recipe -- this runs that code.

    reward:
      - name: python
        options: {path: my_rewards.py, function: score}     # a file, relative to the working directory
      - name: python
        options: {module: my_pkg.rewards, function: score}  # or an importable module

The function follows TRL's convention and is called with keyword arguments: ``prompts=`` and
``completions=`` (message lists for conversational data, strings otherwise), ``completion_ids=``
and ``trainer_state=`` (when it takes them or ``**kwargs``), plus the dataset's other columns by
name; it returns one float per completion, or None where it does not score a sample (in
training: dropped from the loss and counted). The function is resolved once, and a missing file, module or function is
one line when the recipe is checked, before any model loads.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from rewards.base import Reward


def _resolve(path: str | None, module: str | None, function: str):
    if (path is None) == (module is None):
        raise ValueError("python: give exactly one of options.path (a .py file) or options.module")
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ValueError(f"python: options.path {path!r}: no such file")
        name = f"align_user_reward_{abs(hash(str(file.resolve())))}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, file)
            loaded = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(loaded)
            except Exception as err:
                raise ValueError(
                    f"python: options.path {path!r} failed to import ({type(err).__name__}: {err})"
                ) from None
            sys.modules[name] = loaded
        source, where = sys.modules[name], f"file {path!r}"
    else:
        try:
            source = importlib.import_module(module)
        except Exception as err:
            raise ValueError(
                f"python: options.module {module!r} failed to import ({type(err).__name__}: {err})"
            ) from None
        where = f"module {module!r}"
    fn = getattr(source, function, None)
    if not callable(fn):
        raise ValueError(f"python: {where} has no function {function!r}")
    return fn


class PythonReward(Reward):
    name = "python"
    trl_convention = True

    def __init__(self, path: str | None = None, module: str | None = None, function: str = "reward"):
        self.fn = _resolve(path, module, function)
        self.label = function

    @staticmethod
    def check_options(path: str | None = None, module: str | None = None, function: str = "reward") -> None:
        _resolve(path, module, function)

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        return self.fn(prompts=prompts, completions=completions, **columns)
