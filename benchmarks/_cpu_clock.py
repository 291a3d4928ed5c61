"""Run a script or a module with ``time.perf_counter`` reading this process's CPU time.

    python benchmarks/_cpu_clock.py SCRIPT.py ARGS...      python benchmarks/_cpu_clock.py -m MODULE ARGS...

Both sides' step timers (align's ``step_s``, the TRL workers' callbacks, the bare loop) use
``time.perf_counter``; under this wrapper they measure the CPU seconds the step took, which other
jobs on a shared machine do not inflate the way they inflate wall time (see common.Timing).
"""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

time.perf_counter = time.process_time

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        sys.path.insert(0, str(Path(args[0]).resolve().parent))
        runpy.run_path(args[0], run_name="__main__")
