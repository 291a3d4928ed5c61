"""``regex``: ``match_reward`` if the completion matches a regular expression, else ``miss_reward``.

``mode: search`` (default) looks for the pattern anywhere (``re.search``); ``mode: fullmatch``
needs the whole completion to match. ``ignore_case``, ``multiline`` and ``dotall`` set the
usual ``re`` flags. The pattern is compiled once, in ``__init__``, so a bad pattern fails when
the reward is built, not mid-training. An empty completion is matched like any other string.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from rewards.base import Reward


class Regex(Reward):
    name = "regex"

    def __init__(
        self,
        pattern: str,
        match_reward: float = 1.0,
        miss_reward: float = 0.0,
        mode: Literal["search", "fullmatch"] = "search",
        ignore_case: bool = False,
        multiline: bool = False,
        dotall: bool = False,
    ):
        if mode not in ("search", "fullmatch"):
            raise ValueError(f"regex: mode must be 'search' or 'fullmatch', got {mode!r}")
        flags = (
            (re.IGNORECASE if ignore_case else 0) | (re.MULTILINE if multiline else 0) | (re.DOTALL if dotall else 0)
        )
        try:
            self.regex = re.compile(pattern, flags)
        except re.error as err:
            raise ValueError(f"regex: invalid pattern {pattern!r}: {err}") from None
        self.match = self.regex.search if mode == "search" else self.regex.fullmatch
        self.match_reward, self.miss_reward = float(match_reward), float(miss_reward)

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return [self.match_reward if self.match(text) else self.miss_reward for text in completions]
