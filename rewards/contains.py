"""``contains``: does the completion contain the given keywords?

- ``mode: any`` (default): ``match_reward`` if at least one keyword occurs, else ``miss_reward``
- ``mode: all``: ``match_reward`` if every keyword occurs, else ``miss_reward``
- ``mode: fraction``: the fraction of keywords that occur, in [0, 1]

Matching ignores case unless ``case_sensitive``; with ``whole_word`` (default) a keyword must
stand as its own word(s) (``\\b`` boundaries: "good" is not found in "goodbye"), otherwise any
substring counts. An empty completion contains nothing.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from rewards.base import Reward


class Contains(Reward):
    name = "contains"

    def __init__(
        self,
        keywords: list[str],
        mode: Literal["any", "all", "fraction"] = "any",
        match_reward: float = 1.0,
        miss_reward: float = 0.0,
        case_sensitive: bool = False,
        whole_word: bool = True,
    ):
        if isinstance(keywords, str):
            keywords = [keywords]
        if not keywords or not all(isinstance(k, str) and k for k in keywords):
            raise ValueError(f"contains: keywords must be a non-empty list of non-empty strings, got {keywords!r}")
        if mode not in ("any", "all", "fraction"):
            raise ValueError(f"contains: mode must be 'any', 'all' or 'fraction', got {mode!r}")
        flags = 0 if case_sensitive else re.IGNORECASE
        wrap = (lambda k: rf"(?<!\w){re.escape(k)}(?!\w)") if whole_word else re.escape
        self.patterns = [re.compile(wrap(k), flags) for k in keywords]
        self.mode, self.match_reward, self.miss_reward = mode, float(match_reward), float(miss_reward)

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        out = []
        for text in completions:
            found = [p.search(text) is not None for p in self.patterns]
            if self.mode == "fraction":
                out.append(sum(found) / len(found))
            else:
                hit = any(found) if self.mode == "any" else all(found)
                out.append(self.match_reward if hit else self.miss_reward)
        return out
