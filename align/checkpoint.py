"""Checkpoints: written atomically (temp dir, then rename), resumed exactly.

A checkpoint directory ``checkpoints/step-000040/`` holds
- ``model/``: the policy in HF format (``save_pretrained``, safetensors; LoRA adapters as peft
  saves them) plus the tokenizer, loadable by ``from_pretrained`` as is;
- ``state/``: ``accelerator.save_state`` (model, optimizer, scheduler, every RNG state; works
  for DDP, DeepSpeed and FSDP shards);
- ``trainer_state.pt``: step, skipped-step count, LR-scheduler, objective and reward state
  (baselines, running whitening), as tensors and plain types (loaded with ``weights_only=True``).
The data position is the step itself: step batches are a pure function of (seed, step).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.pt").is_file():
        from align.config import RecipeError

        raise RecipeError(f"field 'resume': {resume!r} is not a checkpoint directory (no trainer_state.pt)")
    return path


def save_checkpoint(accelerator, model, tokenizer, trainer_state: dict, run_dir: str | Path, keep_last: int) -> Path:
    """Write ``checkpoints/step-N`` atomically; every process must call this."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{trainer_state['step']:06d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        tmp / "model",
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model),
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(tmp / "model")
        torch.save(trainer_state, tmp / "trainer_state.pt")
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> dict:
    accelerator.load_state(str(path / "state"))
    # plain types and tensors only: a forged checkpoint cannot run code on resume
    return torch.load(path / "trainer_state.pt", weights_only=True)


def _fsync_tree(path: Path) -> None:
    """Flush file contents to disk before the rename makes the checkpoint visible."""
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
