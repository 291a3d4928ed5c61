"""What every reward shares: the calling convention, the safety wrapper and small helpers.

A reward is a callable ``(prompts, completions, **columns) -> list[float]`` (TRL's convention):
``prompts[i]`` and ``completions[i]`` are one sample, and every extra dataset column arrives as a
keyword list with one value per sample (``document=[...]``, ``reference=[...]``). Rewards that
run a model load it once, in ``__init__``, and score under ``torch.no_grad()``; they never see
the policy.

``call_reward`` is the one door through which composites and trainers call a reward: whatever goes
wrong inside (an exception, the wrong number of scores, a string, a NaN) comes out as a
``RewardError`` whose message names the reward.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

RewardFn = Callable[..., Sequence[float]]


class RewardError(RuntimeError):
    """A reward failed or returned something that is not one finite number per completion."""


@dataclass
class TRLView:
    """What a reward written for TRL is called with besides the columns: ``prompts`` and
    ``completions`` as message lists for conversational data (strings otherwise),
    ``completion_ids`` (the sampled token ids, no padding) and ``trainer_state`` (an object with
    ``global_step`` and ``max_steps``). A field left None is not passed."""

    prompts: list | None = None
    completions: list | None = None
    completion_ids: list[list[int]] | None = None
    trainer_state: Any = None


class Reward:
    """Base class of the bundled rewards: a ``name`` for the registry and the call signature.

    Subclasses take their options as keyword arguments of ``__init__`` (that signature is what
    ``rewards.options(name)`` reports and what ``rewards.build`` checks) and implement
    ``__call__``. Bundled rewards read text: they get ``prompts`` and ``completions`` as strings
    even for conversational data. A subclass that sets ``trl_convention = True`` is called like
    a TRL reward function instead (see ``TRLView``).
    """

    name: ClassVar[str] = "reward"
    trl_convention: ClassVar[bool] = False

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        raise RewardError(f"reward {self.name!r} does not implement __call__")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def resolve_device(device: str | None) -> str:
    """``device`` as given, else ``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    if device:
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pretrained(model: str, tokenizer: str | None, auto_class: str, device: str | None = None, **kwargs: Any):
    """(tokenizer, model) of a model-backed reward, loaded once from a hub id or a local directory:
    ``auto_class`` names the transformers Auto class (``AutoModelForSequenceClassification``,
    ``AutoModelForCausalLM``); the model is moved to ``device`` and put in eval mode."""
    import transformers

    loaded_tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer or model)
    loaded = getattr(transformers, auto_class).from_pretrained(model, **kwargs)
    return loaded_tokenizer, loaded.to(resolve_device(device)).eval()


def column(columns: dict[str, Any], key: str, n: int, reward: str) -> list[Any]:
    """The per-sample values of column ``key``, with an error naming the reward if it is absent."""
    if key not in columns:
        raise KeyError(f"reward {reward!r} needs column {key!r}; got columns {sorted(columns)}")
    values = list(columns[key])
    if len(values) != n:
        raise ValueError(f"reward {reward!r}: column {key!r} has {len(values)} values for {n} completions")
    return values


def _as_float(value: Any) -> float | None:
    """A real number as float, else None (strings, None, complex, containers)."""
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalar
        item = value.item()
        return float(item) if isinstance(item, numbers.Real) else None
    return None


def trl_convention(fn: Any) -> bool:
    """Whether ``fn`` is called as TRL calls a reward function (message lists for conversational
    data, ``completion_ids=``, ``trainer_state=``): any callable that is not a bundled text reward."""
    return bool(getattr(fn, "trl_convention", not isinstance(fn, Reward)))


def _accepts(fn: Any, keyword: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD or p.name == keyword for p in params)


def call_reward(
    name: str,
    fn: RewardFn,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    allow_non_finite: bool = False,
    allow_none: bool = False,
    trl: TRLView | None = None,
    **columns: Any,
) -> list[float | None]:
    """Call ``fn`` and check it returned one finite number per completion.

    Raises ``RewardError`` naming ``name`` if the reward raises, returns a different number of
    scores than completions, or returns a non-numeric or non-finite (NaN, ±inf) value. With
    ``allow_non_finite`` NaN/±inf pass through: the trainer skips and counts such steps instead
    of stopping the run (one bad score should not end a long job). With ``allow_none`` a None
    score passes through as None: TRL's "this reward does not score this sample". ``trl``: what a
    TRL-convention function (``trl_convention(fn)``) gets instead of the text prompts and
    completions, and the extra keywords it accepts.
    """
    prompts, completions = list(prompts), list(completions)
    n = len(completions)
    if len(prompts) != n:
        raise RewardError(f"reward {name!r}: {len(prompts)} prompts for {n} completions")
    for key, values in columns.items():
        try:
            size = len(values)
        except TypeError:
            raise RewardError(f"reward {name!r}: column {key!r} is not a list (one value per sample)") from None
        if size != n:
            raise RewardError(f"reward {name!r}: column {key!r} has {size} values for {n} completions")
    call_prompts, call_completions, extra = prompts, completions, {}
    if trl is not None and trl_convention(fn):
        call_prompts = trl.prompts if trl.prompts is not None else prompts
        call_completions = trl.completions if trl.completions is not None else completions
        for key in ("completion_ids", "trainer_state"):
            value = getattr(trl, key)
            if value is not None and key not in columns and _accepts(fn, key):
                extra[key] = value
    try:
        # TRL's keyword convention
        scores = fn(prompts=call_prompts, completions=call_completions, **columns, **extra)
        if inspect.isawaitable(scores):  # an ``async def`` reward, as TRL accepts
            scores = _wait_for(scores)
    except RewardError:
        raise
    except SystemExit as err:  # it would end the run with its code, silently, without a checkpoint
        raise RewardError(f"reward {name!r} called sys.exit({err.code!r}); a reward returns its scores") from None
    except Exception as err:
        raise RewardError(f"reward {name!r} raised {type(err).__name__}: {err}") from err
    if hasattr(scores, "tolist") and not isinstance(scores, (list, tuple)):
        scores = scores.tolist()  # a tensor or an array
    if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence):
        raise RewardError(f"reward {name!r} returned {type(scores).__name__}, expected a list of {n} floats")
    if len(scores) != n:
        raise RewardError(f"reward {name!r} returned {len(scores)} scores for {n} completions")
    out: list[float | None] = []
    for i, value in enumerate(scores):
        if value is None and allow_none:
            out.append(None)
            continue
        number = _as_float(value)
        if number is None:
            raise RewardError(f"reward {name!r} returned a non-numeric score {value!r} for completion {i}")
        if not math.isfinite(number) and not allow_non_finite:
            raise RewardError(f"reward {name!r} returned a non-finite score {number} for completion {i}")
        out.append(number)
    return out


def _wait_for(awaitable):
    """The result of an async reward: run on a loop of its own (in a thread where the caller is
    inside a running loop already, as in a notebook)."""
    import asyncio

    async def wrapped():
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wrapped())
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, wrapped()).result()
