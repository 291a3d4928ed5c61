"""The preference set direct-alignment runs of ``align compare`` train on, built from the task.

Human preference data prefers longer answers more often than their quality warrants; the set
reproduces that confound so a study can see which objectives follow it. For each of the first
``preferences.prompts`` training prompts the SFT policy samples two completions (keyed by
``preferences.seed``: every study with the same seed gets the same set); a labeller scores each

    s(y) = gold(y) + length_bonus · |y| / max_new_tokens        (|y| in tokens)

and prefers the higher score (equal scores, equal texts or an empty completion: no pair). The set
is written in TRL's formats under the study directory: ``pairs.jsonl`` (prompt, chosen, rejected:
DPO, IPO, SimPO, ORPO, ...) and ``unpaired.jsonl`` (prompt, completion, label: the same pairs as
KTO's unpaired rows), with ``stats.json``: how often the preferred completion is the longer one and
how often the labeller agrees with the gold alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from align.config import Strict

PAIRS, UNPAIRED = "pairs.jsonl", "unpaired.jsonl"


class PreferenceSet(Strict):
    prompts: int = Field(256, gt=0, description="training prompts sampled twice by the SFT policy (the first N)")
    length_bonus: float = Field(
        0.5, ge=0, description="the labeller's bonus per unit of |y| / max_new_tokens: the length confound"
    )
    seed: int = Field(0, ge=0, description="seed of the two samples per prompt")


def preference_dir(out: str | Path) -> Path:
    return Path(out) / "preferences"


def data_file(out: str | Path, paired: bool) -> str:
    """Where a direct-alignment run's training rows are: pairs, or unpaired labelled rows."""
    return str(preference_dir(out) / (PAIRS if paired else UNPAIRED))


def order_pairs(
    prompts: list[str], texts: list[str], lengths: list[int], gold: list[float], length_bonus: float, budget: int
) -> tuple[list[dict], dict[str, Any]]:
    """Prompt i's two samples are rows 2i, 2i+1. Returns the preference rows (prompt, chosen,
    rejected) and the set's statistics."""
    rows, longer, agrees, ties = [], 0, 0, 0
    for i, prompt in enumerate(prompts):
        a, b = 2 * i, 2 * i + 1
        score_a, score_b = (gold[j] + length_bonus * lengths[j] / budget for j in (a, b))
        if score_a == score_b or texts[a] == texts[b] or not texts[a].strip() or not texts[b].strip():
            ties += 1
            continue
        w, lose = (a, b) if score_a > score_b else (b, a)
        rows.append({"prompt": prompt, "chosen": texts[w], "rejected": texts[lose]})
        longer += lengths[w] > lengths[lose]
        agrees += gold[w] > gold[lose]
    n = len(rows)
    stats = {
        "pairs": n,
        "dropped": ties,
        "chosen_longer_fraction": longer / n if n else math.nan,
        "gold_agrees_fraction": agrees / n if n else math.nan,
        "length_bonus": length_bonus,
    }
    return rows, stats


@torch.no_grad()
def build_preferences(study, recipe, models, policy, judge, device) -> dict[str, Any]:
    """Sample, label and write the study's preference set (``preference_dir(study.out)``); returns its stats."""
    from align import files
    from align.evaluation import sample_prompts
    from align.jobs.study import read_prompts

    spec: PreferenceSet = study.preferences
    source = study.base["data"]["train"]  # the task's prompts (an offline run's data.train is this set)
    prompts = read_prompts(source, recipe.data.prompt_column, spec.prompts)
    texts: list[str] = []
    lengths: list[int] = []
    for lo in range(0, len(prompts), 64):
        rollout = sample_prompts(recipe, models, policy, prompts[lo : lo + 64], spec.seed, 2, device, first_index=lo)
        texts += list(rollout.texts)
        lengths += rollout.completion_mask.sum(-1).tolist()
    gold = judge([p for p in prompts for _ in range(2)], texts)["gold"]
    rows, stats = order_pairs(prompts, texts, lengths, gold, spec.length_bonus, recipe.generation.max_new_tokens)
    if not rows:
        raise RuntimeError("preferences: every pair tied; raise preferences.prompts or length_bonus")
    stats["mean_length"] = {
        "chosen": sum(len(r["chosen"]) for r in rows) / len(rows),
        "rejected": sum(len(r["rejected"]) for r in rows) / len(rows),
        "unit": "characters",
    }
    out = preference_dir(study.out)
    out.mkdir(parents=True, exist_ok=True)
    files.write_text(out / PAIRS, "".join(json.dumps(r) + "\n" for r in rows))
    unpaired = [
        {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
        for r in rows
        for side in ("chosen", "rejected")
    ]
    files.write_text(out / UNPAIRED, "".join(json.dumps(r) + "\n" for r in unpaired))
    files.write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats
