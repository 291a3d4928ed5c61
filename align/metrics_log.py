"""Run logging: ``metrics.jsonl`` flushed every step, a progress bar, and the trackers a recipe
names (``output.report_to``: wandb, tensorboard, trackio), each imported only when asked for."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from align import files


class MetricsLog:
    """Appends one JSON object per step to ``metrics.jsonl``; on resume, drops steps after ``start``."""

    def __init__(
        self,
        run_dir: Path,
        start_step: int,
        enabled: bool,
        report_to: list[str],
        config: dict,
        project: str | None,
        run_name: str | None = None,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.trackers: list = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            records, torn = _parse_lines(self.path) if not self.path.is_symlink() else ([], 0)
            if torn:
                print(f"{self.path}: {torn} torn line(s) dropped (an interrupted write)")
            # on resume, the steps after the checkpoint are logged again: drop them once; never
            # truncate-then-write the only copy, never write through a link planted there
            kept = [r for r in records if start_step and r.get("step", 0) <= start_step]
            files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.handle = files.open_append(self.path)
        name = run_name or Path(run_dir).resolve().name
        project = project or os.environ.get("WANDB_PROJECT") or "align"  # the recipe's, else the environment's
        self.trackers = [TRACKERS[kind](Path(run_dir), name, project, config) for kind in report_to]

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.handle.write(json.dumps(clean) + "\n")
        self.handle.flush()
        scalars = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and k != "step"}
        for tracker in self.trackers:
            tracker.log(record["step"], scalars, record.get("samples"))

    def close(self) -> None:
        if self.enabled:
            self.handle.close()
            for tracker in self.trackers:
                tracker.close()


class _Wandb:
    def __init__(self, run_dir: Path, name: str, project: str, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, config=config, dir=str(run_dir), resume="allow")

    def log(self, step: int, scalars: dict, samples: list | None) -> None:
        data: dict[str, Any] = dict(scalars)
        if samples:
            table = self.wandb.Table(columns=["prompt", "completion"])
            for s in samples:
                table.add_data(s["prompt"], s["completion"])
            data["samples"] = table
        self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()


class _TensorBoard:
    def __init__(self, run_dir: Path, name: str, project: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard" / name))
        self.writer.add_text("recipe", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, step: int, scalars: dict, samples: list | None) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        if samples:
            rows = "\n".join(f"| {s['prompt']} | {s['completion']} |" for s in samples)
            self.writer.add_text("samples", "| prompt | completion |\n|---|---|\n" + rows, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Trackio:
    def __init__(self, run_dir: Path, name: str, project: str, config: dict):
        import trackio

        self.trackio = trackio
        trackio.init(project=project, name=name, config=config)

    def log(self, step: int, scalars: dict, samples: list | None) -> None:
        data: dict[str, Any] = dict(scalars)
        if samples:
            data["samples"] = self.trackio.Table(
                columns=["prompt", "completion"], data=[[s["prompt"], s["completion"]] for s in samples]
            )
        self.trackio.log(data, step=step)

    def close(self) -> None:
        self.trackio.finish()


TRACKERS = {"wandb": _Wandb, "tensorboard": _TensorBoard, "trackio": _Trackio}
TRACKER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "trackio": "trackio"}


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
