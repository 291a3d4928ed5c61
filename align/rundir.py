"""A run directory belongs to one run: refuse to mix two runs, or a new run with an old one.

``claim_run_dir`` runs before any model loads. It takes ``DIR/.lock`` (the owner's pid and host;
taken over only from a dead owner on the same host) and refuses a new run into a directory that
already holds one unless ``output.overwrite`` says to replace it or ``resume`` says to continue it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from align import files
from align.checkpoint import sweep_leftovers
from align.config import RecipeError, check_output_path

LOCK = ".lock"
RUN_ENTRIES = ("checkpoints", "metrics.jsonl", "recipe.yaml", "summary.json", "final", "best")
# written when a run takes its directory: what output.overwrite may replace is an align run's, never
# files of the same generic names that something else put there
MARKER = ".align-run"


class RunLock:
    def __init__(self, path: Path | None, created: bool = False):
        self.path = path
        self.created = created  # the directory did not exist before this run

    def release(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            run_dir = self.path.parent
            if self.created and all(p.name == MARKER for p in run_dir.iterdir()):
                (run_dir / MARKER).unlink(missing_ok=True)
                run_dir.rmdir()  # a run refused before writing anything leaves nothing behind
            self.path = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


STALE_EMPTY_LOCK_S = 10.0  # an empty lock this old was left by a crash between create and write


def _process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _stale(path: Path, owner: dict) -> str | None:
    """Why the lock at ``path`` no longer holds (said when taking it over), or None while it does."""
    pid, host, started = owner.get("pid"), owner.get("host"), owner.get("started")
    if not isinstance(pid, int) or not isinstance(host, str):
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return "it is gone"
        # a run writes its lock right after creating it: an empty or foreign one this old is stale
        return f"it holds no owner ({age:.0f} s old)" if age > STALE_EMPTY_LOCK_S else None
    if host != socket.gethostname():
        return None  # another machine's process: not ours to judge
    if not _alive(pid):
        return f"its process {pid} is dead"
    now = _process_start(pid)
    if started is not None and now is not None and now != started:
        return f"pid {pid} now belongs to another process"
    return None


def _take_lock(run_dir: Path) -> Path:
    check_output_path(run_dir, "output.dir", "directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RecipeError(f"output.dir: {str(run_dir)!r} cannot be made ({os.strerror(err.errno or 0)})") from None
    path = run_dir / LOCK
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid())})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                owner = {}
            owner = owner if isinstance(owner, dict) else {}
            why = _stale(path, owner)
            if why is not None:
                print(f"output.dir: {run_dir}: taking over {path} ({why})")
                path.unlink(missing_ok=True)
                continue
            raise RecipeError(
                f"output.dir: {str(run_dir)!r} is in use by another run (pid {owner.get('pid')} on "
                f"{owner.get('host')}, {path}); wait for it to end or choose another output.dir "
                f"(if no run uses it, remove {path})"
            ) from None
        with os.fdopen(fd, "w") as handle:
            handle.write(me)
        return path
    raise RecipeError(f"output.dir: {str(run_dir)!r}: could not take {LOCK}")


def held_run(run_dir: Path) -> list[str]:
    """What of a run ``run_dir`` holds (empty: no run there)."""
    return [name for name in RUN_ENTRIES if (run_dir / name).exists()]


def is_align_run(run_dir: Path) -> bool:
    """``run_dir`` holds an align run: its marker, or (a run from before the marker) a checkpoint
    with a trainer state, or a metrics log whose first line is a step's record."""
    if (run_dir / MARKER).is_file():
        return True
    if any((p / "trainer_state.pt").is_file() for p in (run_dir / "checkpoints").glob("step-*")):
        return True
    try:
        with open(run_dir / "metrics.jsonl", encoding="utf-8") as handle:
            first = json.loads(handle.readline())
        return isinstance(first, dict) and "step" in first
    except (OSError, ValueError):
        return False


def never_saved(run_dir: Path) -> bool:
    """An align run there stopped before its first checkpoint (a crash, out of memory, a reward that
    failed at step 1): nothing to continue, so the same command may start it over without
    output.overwrite."""
    saved = any((run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").is_dir() else False
    return is_align_run(run_dir) and not saved and not (run_dir / "final").exists()


def refusal(run_dir: Path, resuming: bool, overwrite: bool) -> str | None:
    """Why a run may not take ``run_dir`` (None: it may): files of a run's names that no align run
    wrote, or an align run there that is neither continued nor to be replaced."""
    held = held_run(run_dir)
    if held and not is_align_run(run_dir):
        return (
            f"output.dir: {str(run_dir)!r} holds {', '.join(held)}, which no align run wrote; align replaces or "
            "continues only its own runs: choose another output.dir"
        )
    if held and not resuming and not overwrite and not never_saved(run_dir):
        return (
            f"output.dir: {str(run_dir)!r} already holds a run ({', '.join(held)}); continue it with "
            "resume=latest, or replace it with output.overwrite=true"
        )
    return None


def _check_and_take(run_dir: Path, resuming: bool, overwrite: bool) -> Path:
    lock = _take_lock(run_dir)
    refused = refusal(run_dir, resuming, overwrite)
    if refused is not None:
        lock.unlink(missing_ok=True)
        raise RecipeError(refused)
    swept = sweep_leftovers(run_dir)
    if swept:
        print(f"output.dir: {run_dir}: removed leftovers of an interrupted save or prune: {', '.join(swept)}")
    held = held_run(run_dir)
    if held and not resuming and not overwrite:
        print(f"output.dir: {run_dir}: starting over a run that stopped before its first checkpoint")
    if held and not resuming:  # output.overwrite (or a run that never saved): the old run goes, whole
        for name in held:
            entry = run_dir / name
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if not (run_dir / MARKER).is_file():
        files.write_text(run_dir / MARKER, json.dumps({"pid": os.getpid(), "started": time.time()}) + "\n")
    return lock


def claim_run_dir(run_dir: str | Path, resuming: bool, overwrite: bool, accelerator) -> RunLock:
    """Take the run directory for this run (process 0 decides, every process gets the verdict)."""
    run_dir = Path(run_dir)
    error, lock, created = None, None, not run_dir.exists()
    if accelerator.is_main_process:
        try:
            lock = _check_and_take(run_dir, resuming, overwrite)
        except RecipeError as err:
            error = str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        raise RecipeError(error)
    return RunLock(lock, created)
