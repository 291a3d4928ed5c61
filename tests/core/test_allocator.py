"""Host-memory allocator tuning (align/allocator.py), checked by what glibc does with a 64 MiB block
in a fresh interpreter: by default it is its own mmap, given back on free; tuned, it comes from the
heap and stays mapped after free -- on the first call, on later calls, and when applied again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Runs in a clean interpreter: the tuning is process-wide and cached once per process, so the
# test process (whose trainer tests already tuned it) cannot show a before and an after.
PROBE = r"""
import ctypes, json, sys

from align import allocator

libc = ctypes.CDLL("libc.so.6")
FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]


libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
BLOCK = 64 << 20  # above glibc's largest dynamic mmap threshold (32 MiB): mmapped by default


def probe():
    before = libc.mallinfo2()
    block = libc.malloc(BLOCK)
    held = libc.mallinfo2()
    libc.free(block)
    after = libc.mallinfo2()
    return {
        "mmapped": held.hblkhd - before.hblkhd >= BLOCK,  # served by its own mmap
        "from_heap": held.uordblks - before.uordblks >= BLOCK,  # served from the heap
        "kept": after.fordblks >= BLOCK,  # freed, and still mapped as free heap (not trimmed)
        "lean": held.arena - before.arena < 2 * BLOCK,  # the heap grew by the block at most, not a padding
    }


out = {"default": probe(), "first": allocator.tune_allocator()}
out["tuned"] = probe()
out["second"] = allocator.tune_allocator()
out["applied_again"] = allocator._apply()
out["tuned_again"] = probe()
json.dump(out, sys.stdout)
"""


def _run_probe(**env: str) -> dict:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD", "ALIGN_MALLOC_TUNING"))
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env={**clean, **env}, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _glibc_with_mallinfo2() -> bool:
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        return False
    return version.startswith("glibc") and tuple(map(int, version.split()[1].split(".")[:2])) >= (2, 33)


DEFAULT = {"mmapped": True, "from_heap": False, "kept": False, "lean": True}  # glibc's own behaviour
TUNED = {"mmapped": False, "from_heap": True, "kept": True, "lean": True}
needs_glibc = pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="allocator tuning is glibc-only (mallinfo2)")


@needs_glibc
def test_tune_allocator_is_idempotent():
    """The tuning takes effect (a 64 MiB block comes from the heap and stays mapped after free, where
    by default it is mmapped and given back), says so, and applying it again changes nothing."""
    out = _run_probe()
    assert out["default"] == DEFAULT, out  # the probe sees glibc's default
    assert out["first"] is True and out["tuned"] == TUNED, out
    assert out["second"] is True and out["applied_again"] is True and out["tuned_again"] == TUNED, out


@needs_glibc
def test_tune_allocator_leaves_a_user_opt_out_alone():
    """ALIGN_MALLOC_TUNING=0: nothing applied, glibc's default behaviour stays."""
    out = _run_probe(ALIGN_MALLOC_TUNING="0")
    assert out["first"] is False and out["second"] is False and out["applied_again"] is False, out
    assert out["default"] == out["tuned"] == out["tuned_again"] == DEFAULT, out
