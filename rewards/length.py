"""``length``: how far the completion's length is from a target.

With ``n`` the length of the completion in ``unit`` (``words``: whitespace-separated words,
``chars``: characters) and ``d = max(0, |n − target| − tolerance)`` the deviation beyond a
free band of ``tolerance`` units:

- ``shape: linear``    (default)  reward = −scale · d
- ``shape: squared``              reward = −scale · d²

so the best score is 0, reached for any length within ``target ± tolerance``. An empty
completion has length 0 (reward −scale·max(0, target − tolerance) in the linear shape).
"""

from __future__ import annotations

from typing import Any, Literal

from rewards.base import Reward


def text_length(text: str, unit: str) -> int:
    """Words (``str.split``) or characters in ``text``."""
    return len(text.split()) if unit == "words" else len(text)


class Length(Reward):
    name = "length"

    def __init__(
        self,
        target: float,
        unit: Literal["words", "chars"] = "words",
        scale: float = 1.0,
        shape: Literal["linear", "squared"] = "linear",
        tolerance: float = 0.0,
    ):
        if unit not in ("words", "chars"):
            raise ValueError(f"length: unit must be 'words' or 'chars', got {unit!r}")
        if shape not in ("linear", "squared"):
            raise ValueError(f"length: shape must be 'linear' or 'squared', got {shape!r}")
        if target < 0 or tolerance < 0:
            raise ValueError(f"length: target and tolerance must be >= 0, got {target} and {tolerance}")
        self.target, self.unit, self.scale, self.shape, self.tolerance = (
            float(target),
            unit,
            float(scale),
            shape,
            float(tolerance),
        )

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        out = []
        for text in completions:
            d = max(0.0, abs(text_length(text, self.unit) - self.target) - self.tolerance)
            out.append(0.0 - self.scale * (d if self.shape == "linear" else d * d))  # 0.0, not -0.0
        return out
