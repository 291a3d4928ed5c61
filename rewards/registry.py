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
from rewards.regex import Regex
from rewards.reward_model import RewardModel
from rewards.rouge import Rouge
from rewards.sentiment import Sentiment

Factory = Callable[..., RewardFn]

REGISTRY: dict[str, Factory] = {
    cls.name: cls for cls in (Entailment, RewardModel, Sentiment, Length, Regex, Contains, Rouge, Fluency)
}


def register(factory: Factory, name: str | None = None) -> Factory:
    """Add a reward factory (a class with a ``name`` attribute, or a function and a ``name``).

    Usable as a class decorator: ``@rewards.register`` over ``class MyReward(Reward): name = ...``.
    """
    key = name or getattr(factory, "name", None) or factory.__name__
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
