"""Checkpoints: written atomically (temp dir, then rename), resumed exactly.

A checkpoint directory ``checkpoints/step-000040/`` holds
- ``model/``: the policy in HF format (``save_pretrained``, safetensors; LoRA adapters as peft
  saves them) plus the tokenizer, loadable by ``from_pretrained`` as is;
- ``state/``: ``accelerator.save_state`` (model, optimizer, scheduler, every RNG state; works
  for DDP, DeepSpeed and FSDP shards);
- ``trainer_state.pt``: step, skipped-step count, LR-scheduler, objective and reward state
  (baselines, running whitening), as tensors and plain types (loaded with ``weights_only=True``);
- ``manifest.json``: every other file's size and SHA-256, written last; ``resume=latest`` takes
  the newest checkpoint that matches its manifest, and says which damaged ones it passed over.
The data position is the step itself: step batches are a pure function of (seed, step).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from align.distributed import full_state_dict

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str | None, run_dir: str | Path, accelerator=None) -> Path | None:
    """The checkpoint to resume from: ``latest`` is the newest one that is whole (a damaged one is
    passed over, with a line saying why); a named one must be whole. Checked on the main process."""
    from align.config import RecipeError

    if resume is None:
        return None
    if resume != "latest":
        path = Path(resume)
        if not (path / "trainer_state.pt").is_file():
            raise RecipeError(f"field 'resume': {resume!r} is not a checkpoint directory (no trainer_state.pt)")
        problem = _agreed(accelerator, checkpoint_problem, path)
        if problem is not None:
            raise RecipeError(f"field 'resume': {resume!r} is damaged ({problem}); name another checkpoint")
        return path
    found = list_checkpoints(run_dir)
    for path in reversed(found):
        problem = _agreed(accelerator, checkpoint_problem, path)
        if problem is None:
            return path
        if accelerator is None or accelerator.is_main_process:
            print(f"resume: {path} is damaged ({problem}); trying the checkpoint before it")
    if found:
        raise RecipeError(
            f"field 'resume': every checkpoint in {checkpoint_root(run_dir)} is damaged; start over with "
            "output.overwrite=true"
        )
    return None


def checkpoint_problem(path: Path) -> str | None:
    """None when the checkpoint is whole; else what is wrong with it, in a few words. A checkpoint
    written before manifests existed is checked for its parts only."""
    for part in ("trainer_state.pt", "state", "model"):
        if not (path / part).exists():
            return f"{part} is missing"
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return f"{MANIFEST} cannot be read"
    for name, (size, digest) in sorted(entries.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
        if _sha256(file) != digest:
            return f"{name} differs from what was written"
    return None


def write_manifest(path: Path) -> None:
    """Every file's size and SHA-256, so a resume can tell a damaged checkpoint from a whole one."""
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.name != MANIFEST)
    entries = {str(f.relative_to(path)): [f.stat().st_size, _sha256(f)] for f in files}
    (path / MANIFEST).write_text(json.dumps(entries, indent=0))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _agreed(accelerator, check, path: Path):
    """``check(path)`` on the main process, its answer on every process."""
    if accelerator is None or accelerator.num_processes == 1:
        return check(path)
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([check(path) if accelerator.is_main_process else None])[0]


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (full disk, I/O error); the message names the path."""


# what a failed write raises: the OS's errors, torch's zip writer ("unexpected pos ..."), and
# safetensors' own error type (a full disk there is a SafetensorError, neither of the others)
WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError, SafetensorError)


def save_checkpoint(
    accelerator, model, tokenizer, trainer_state: dict, run_dir: str | Path, keep_last: int, critic=None
) -> Path:
    """Write ``checkpoints/step-N`` atomically; every process must call this. With a ``critic``
    (align/critic.py) its whole weights go to ``critic/`` beside ``model/`` (``state/`` holds both
    models' training state either way).

    A failed write (ENOSPC, EIO, ...) removes the temporary directory and raises one line that
    names the path and the space needed; the previous checkpoint is left as it was."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{trainer_state['step']:06d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    failure = None
    try:
        accelerator.save_state(str(tmp / "state"))  # sharded where the launch config shards
        state_dict = full_state_dict(accelerator, model)  # collective: every process takes part
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.save_pretrained(tmp / "model", state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp / "model")
            torch.save(trainer_state, tmp / "trainer_state.pt")
        if critic is not None:
            from align.critic import save_critic

            critic_state = full_state_dict(accelerator, critic)
            if accelerator.is_main_process:
                save_critic(critic_state, accelerator.unwrap_model(critic).backbone.config, tmp / "critic")
    except WRITE_ERRORS as err:
        failure = _reason(err)
    # every process learns whether any failed, so none waits forever for a rank that gave up
    failures = [f for f in _all_ranks(accelerator, failure) if f is not None]
    if not failures:  # every process's shards are written: make them durable before the rename
        try:
            if accelerator.is_main_process:
                write_manifest(tmp)
                _fsync_tree(tmp)
        except OSError as err:
            failure = _reason(err)
        failures = [f for f in _all_ranks(accelerator, failure) if f is not None]
    if failures:
        written = _tree_bytes(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(run_dir)
        needed = max(written, _tree_bytes(previous[-1]) if previous else 0)
        free = shutil.disk_usage(root).free
        kept = f"; {previous[-1].name} is intact" if previous else ""
        raise CheckpointError(
            f"checkpoint: writing {tmp} failed ({failures[0]}); {free / 2**20:.0f} MiB free on that disk, "
            f"a checkpoint needs about {needed / 2**20:.0f} MiB{kept}"
        )
    if accelerator.is_main_process:
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


def _reason(err: BaseException) -> str:
    # torch's zip writer reports a full disk as "unexpected pos ..." (a RuntimeError)
    if isinstance(err, OSError) and err.errno:
        return os.strerror(err.errno)
    return str(err).splitlines()[0]


def _all_ranks(accelerator, value):
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


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
