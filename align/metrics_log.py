"""Run logging: ``metrics.jsonl`` flushed every step, a progress bar, optional wandb."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per step to ``metrics.jsonl``; on resume, drops steps after ``start``."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool, report_to: list[str], config: dict, project: str):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            records, torn = _parse_lines(self.path)
            if torn:
                print(f"{self.path}: {torn} torn line(s) dropped (an interrupted write)")
            # on resume, the steps after the checkpoint are logged again: drop them once
            kept = [r for r in records if start_step and r.get("step", 0) <= start_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)  # never truncate-then-write the only copy
        self.handle = open(self.path, "a")
        if "wandb" in report_to:
            import wandb

            self.wandb = wandb.init(project=project, config=config, dir=str(run_dir), resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.handle.write(json.dumps(clean) + "\n")
        self.handle.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def close(self) -> None:
        if self.enabled:
            self.handle.close()
            if self.wandb is not None:
                self.wandb.finish()


def _parse_lines(path: Path) -> tuple[list[dict], int]:
    """The JSON records of ``path`` and how many lines could not be read (a torn last append)."""
    records, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    return records, torn


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return _parse_lines(path)[0]


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)


POSTFIX_KEYS = {"reward": "reward_mean", "kl": "kl_k1", "loss": "loss", "tok/s": "tokens_per_s"}


def postfix(record: dict) -> dict[str, str]:
    return {short: f"{record[key]:.3g}" for short, key in POSTFIX_KEYS.items() if record.get(key) is not None}
