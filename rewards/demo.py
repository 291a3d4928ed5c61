"""Rewards of demonstrations for RCfD (Rita et al. 2024), each scored once.

RCfD's calibrated reward (losses/rcfd.py: −(r − r_d)² for one reward, whitened squared gaps
summed for several) needs the reward of every prompt's demonstration y_d, component by
component. Demonstrations are fixed, so ``DemoRewardCache`` scores each unique (prompt,
demonstration, key columns) once and remembers the raw scores: in memory, and in a JSON file if
``path`` is given (reloaded by the next run; ignored if it was written for a different reward,
by comparing the reward's description).

Called like a reward, ``cache(prompts, demonstrations, **columns)`` returns, per sample:
a list of C raw component scores (shape [N, C], components in ``CombinedReward.names`` order,
the same as ``score_components``) when it wraps a ``CombinedReward``, or one float (shape [N])
when it wraps a single reward callable. Raw means before whitening and clipping, like the
policy's components the trainer pairs them with. ``key_columns`` (default: every column given)
are the columns whose values enter the cache key, because rewards such as ``rouge`` or
``entailment`` read them. ``trl``: the same ``TRLView`` the policy's samples are scored with (the
prompts as messages and each demonstration as one assistant message on conversational data), so a
reward written for TRL reads demonstrations exactly as it reads samples.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rewards.base import RewardFn, TRLView, call_reward
from rewards.combined import CombinedReward


class DemoRewardCache:
    def __init__(
        self,
        reward: CombinedReward | RewardFn,
        path: str | Path | None = None,
        key_columns: Sequence[str] | None = None,
        name: str | None = None,
    ):
        self.reward = reward
        self.combined = isinstance(reward, CombinedReward)
        self.name = name or getattr(reward, "name", None) or getattr(reward, "__name__", None) or "reward"
        self.path = Path(path) if path is not None else None
        self.key_columns = None if key_columns is None else list(key_columns)
        self.scores: dict[str, list[float]] = {}
        self.calls = 0  # reward calls made (one per cache miss batch)
        self.scored = 0  # demonstrations scored
        description = reward.describe() if self.combined else {"reward": self.name}
        self.fingerprint = json.dumps(description, sort_keys=True, default=str)
        if self.path is not None and self.path.is_file():
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            if saved.get("fingerprint") == self.fingerprint:
                self.scores.update(saved.get("scores", {}))

    def key(self, prompt: str, demonstration: str, columns: dict[str, Any], i: int) -> str:
        keys = sorted(columns) if self.key_columns is None else self.key_columns
        row = [prompt, demonstration, [[k, columns[k][i]] for k in keys if k in columns]]
        return hashlib.sha1(json.dumps(row, default=str, ensure_ascii=False).encode("utf-8")).hexdigest()

    def _score(
        self, prompts: list[str], demos: list[str], columns: dict[str, Any], trl: TRLView | None
    ) -> list[list[float]]:
        self.calls += 1
        self.scored += len(demos)
        if self.combined:
            by_name = self.reward.raw_scores(prompts, demos, trl=trl, **columns)
            return [list(row) for row in zip(*(by_name[n] for n in self.reward.names))]
        return [[s] for s in call_reward(self.name, self.reward, prompts, demos, trl=trl, **columns)]

    def __call__(
        self, prompts: Sequence[str], demonstrations: Sequence[str], trl: TRLView | None = None, **columns: Any
    ) -> list[Any]:
        prompts, demonstrations = list(prompts), list(demonstrations)
        if len(prompts) != len(demonstrations):
            raise ValueError(f"demo rewards: {len(prompts)} prompts for {len(demonstrations)} demonstrations")
        keys = [self.key(p, d, columns, i) for i, (p, d) in enumerate(zip(prompts, demonstrations))]
        todo: dict[str, int] = {}  # missing key -> first row holding it
        for i, k in enumerate(keys):
            if k not in self.scores and k not in todo:
                todo[k] = i
        if todo:
            rows = list(todo.values())
            sub = {name: [values[i] for i in rows] for name, values in columns.items()}
            scored = self._score(
                [prompts[i] for i in rows], [demonstrations[i] for i in rows], sub, _rows_of(trl, rows)
            )
            self.scores.update(zip(todo, scored))
            self.save()
        if self.combined:
            return [list(self.scores[k]) for k in keys]
        return [self.scores[k][0] for k in keys]

    def save(self) -> None:
        """Write the cache to ``path`` (atomically), if one was given."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "scores": self.scores}), encoding="utf-8")
        os.replace(tmp, self.path)


def _rows_of(trl: TRLView | None, rows: list[int]) -> TRLView | None:
    """The view of ``rows`` only (the cache misses being scored)."""
    if trl is None:
        return None
    pick = lambda values: None if values is None else [values[i] for i in rows]  # noqa: E731
    return replace(
        trl, prompts=pick(trl.prompts), completions=pick(trl.completions), completion_ids=pick(trl.completion_ids)
    )
