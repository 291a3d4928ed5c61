"""Rewards by name: ``build("sentiment")`` or ``build("length", target=50, unit="chars")``.

A registry entry is a factory: a ``Reward`` class, or any function whose keyword arguments are
the reward's options and which returns a reward callable. Its signature is the list of options
``build`` accepts, so a typo in a recipe is an error that names the allowed options.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from rewards.base import RewardFn
from rewards.contains import Contains
from rewards.entailment import Entailment
from rewards.fluency import Fluency
from rewards.length import Length
from rewards.python import PythonReward
from rewards.regex import Regex
from rewards.reward_model import RewardModel
from rewards.rouge import Rouge
from rewards.sentiment import Sentiment

Factory = Callable[..., RewardFn]

REGISTRY: dict[str, Factory] = {
    cls.name: cls for cls in (Entailment, RewardModel, Sentiment, Length, Regex, Contains, Rouge, Fluency, PythonReward)
}


def is_reward_function(fn: Any) -> bool:
    """A plain function written for TRL (``def f(completions, **kwargs)``): a reward itself, not a factory."""
    if inspect.isclass(fn) or not callable(fn):
        return False
    try:
        return "completions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def register(factory: Factory, name: str | None = None) -> Factory:
    """Add a reward: a factory (a class with a ``name`` attribute, or a function whose keyword
    arguments are the options), or a plain reward function with TRL's convention
    (``def f(prompts, completions, **kwargs)``), registered under ``name`` or its own name.

    Usable as a decorator: ``@rewards.register`` over ``class MyReward(Reward): name = ...`` or over
    ``def my_reward(completions, **kwargs)``.
    """
    key = name or getattr(factory, "name", None) or factory.__name__
    if is_reward_function(factory):
        fn = factory

        def no_options() -> RewardFn:
            return fn

        no_options.__name__ = key
        REGISTRY[key] = no_options
    else:
        REGISTRY[key] = factory
    return factory


def options(name: str) -> dict[str, Any]:
    """The options of reward ``name`` with their defaults (``inspect.Parameter.empty``: required)."""
    if name not in REGISTRY:
        raise ValueError(f"reward: unknown name {name!r}; expected one of {sorted(REGISTRY)}")
    factory = REGISTRY[name]
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = inspect.signature(target).parameters
    return {
        k: p.default
        for k, p in params.items()
        if k != "self" and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def check_options(name: str, kwargs: dict[str, Any]) -> None:
    """The reward's name, its unknown and missing options, and each option against the type hint
    of the reward's own signature: a ValueError naming what is expected (the one place that checks)."""
    allowed = options(name)
    unknown = set(kwargs) - set(allowed)
    if unknown:
        raise ValueError(f"reward {name!r}: unknown option(s) {sorted(unknown)}; expected {sorted(allowed)}")
    missing = [k for k, v in allowed.items() if v is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ValueError(f"reward {name!r}: missing required option(s) {missing}")
    _check_option_types(REGISTRY[name], kwargs)
    check = getattr(REGISTRY[name], "check_options", None)
    if check is not None:  # the reward's own checks that need no model (e.g. a python reward resolves)
        check(**kwargs)


def _check_option_types(factory: Factory, kwargs: dict[str, Any]) -> None:
    import typing

    from pydantic import TypeAdapter
    from pydantic import ValidationError as PydanticError

    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: the reward checks its own options
        return
    for key, value in kwargs.items():
        if key not in hints:
            continue
        try:
            TypeAdapter(hints[key]).validate_python(value, strict=False)
        except PydanticError as err:
            expected = getattr(hints[key], "__name__", str(hints[key]))
            reason = err.errors()[0]["msg"] if err.errors() else "invalid"
            raise ValueError(f"options.{key}: expected {expected}, got {value!r} ({reason})") from None
        except Exception:  # a hint pydantic cannot build a validator for
            continue


def build(name: str, **kwargs: Any) -> RewardFn:
    """The reward ``name`` built with its options; unknown names or options are a ValueError."""
    check_options(name, kwargs)
    return REGISTRY[name](**kwargs)
