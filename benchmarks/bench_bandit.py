"""Wall time of `align bandit recipes/bandit/default.yaml` (budget: < 20 s on 2 CPU cores).

    python benchmarks/bench_bandit.py [RECIPE.yaml] [key=value ...]

Runs the real command in a subprocess (start-up included), then prints the seconds and the
per-objective final KL to the analytic target.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    recipe = argv[0] if argv and argv[0].endswith((".yaml", ".yml")) else str(ROOT / "recipes/bandit/default.yaml")
    overrides = [a for a in argv if "=" in a]
    exe = Path(sys.executable).parent / "align"
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([str(exe), "bandit", recipe, *overrides, f"out={out}"], check=True, capture_output=True)
        seconds = time.perf_counter() - start
        results = json.loads((Path(out) / "results.json").read_text())
    print(f"{Path(recipe).name}: {seconds:.2f} s wall (training {results['seconds']:.2f} s)")
    for label, result in results["objectives"].items():
        kl = result["final"].get("kl_to_target")
        if kl is not None:
            print(f"  {label:<14} KL to target {statistics.fmean(kl):.2e} ± {statistics.pstdev(kl):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
