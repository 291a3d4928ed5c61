"""Writes into a run directory that never go through a link planted there, and never leave half a
file: a whole file is written to a fresh temporary file (created exclusively) and renamed over its
name, which replaces a link rather than following it; an appended log is opened without following
one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text(path: str | Path, text: str) -> None:
    """``text`` as the file ``path``: a fresh temporary file beside it, then a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would have made it, not mkstemp's 0600
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_append(path: str | Path):
    """``path`` opened to append text; an OSError (ELOOP) where it is a link."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    return os.fdopen(fd, "a", encoding="utf-8")


def append_line(path: str | Path, line: str) -> None:
    """One line added to a small log file (recipe history): the file rewritten whole, a link replaced."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.is_file() and not path.is_symlink() else ""
    write_text(path, old + line + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
