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


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (full disk, I/O error); the message names the path."""


def save_checkpoint(accelerator, model, tokenizer, trainer_state: dict, run_dir: str | Path, keep_last: int) -> Path:
    """Write ``checkpoints/step-N`` atomically; every process must call this.

    A failed write (ENOSPC, EIO, ...) removes the temporary directory and raises one line that
    names the path and the space needed; the previous checkpoint is left as it was."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{trainer_state['step']:06d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
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
    except (OSError, RuntimeError) as err:
        # torch's zip writer reports a full disk as "unexpected pos ..." (a RuntimeError)
        written = _tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(run_dir)
        needed = max(written, _tree_bytes(previous[-1]) if previous else 0)
        free = shutil.disk_usage(root).free
        reason = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else str(err).splitlines()[0]
        kept = f"; {previous[-1].name} is intact" if previous else ""
        raise CheckpointError(
            f"checkpoint: writing {tmp} failed ({reason}); {free / 2**20:.0f} MiB free on that disk, "
            f"a checkpoint needs about {needed / 2**20:.0f} MiB{kept}"
        ) from None
    if accelerator.is_main_process:
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


def _remove(path: Path) -> None:
    """Rename first, then delete: a kill mid-delete leaves a ``.del-*`` that the next start sweeps,
    never a half-deleted checkpoint that still looks like one."""
    doomed = path.with_name(f".del-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def sweep_leftovers(run_dir: str | Path) -> list[str]:
    """Remove the ``.tmp-*`` (interrupted saves) and ``.del-*`` (interrupted prunes) of earlier runs."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    swept = [p for p in root.iterdir() if p.name.startswith((".tmp-", ".del-"))]
    for path in swept:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return [p.name for p in swept]


def _tree_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


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
