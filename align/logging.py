"""Run logging: ``metrics.jsonl`` flushed every step, a progress bar, optional wandb."""

from __future__ import annotations

import json
import math
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
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line).get("step", 0) <= start_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept) if start_step else "")
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


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)


POSTFIX_KEYS = {"reward": "reward_mean", "kl": "kl_k1", "loss": "loss", "tok/s": "tokens_per_s"}


def postfix(record: dict) -> dict[str, str]:
    return {short: f"{record[key]:.3g}" for short, key in POSTFIX_KEYS.items() if record.get(key) is not None}
