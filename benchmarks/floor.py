"""align's RLOO step against the same compute as a bare PyTorch loop: the framework's overhead.

    .venv/bin/python benchmarks/floor.py [--medium] [--rounds N] [--steps N]
        [--threads N] [--cpu-time] [--same-allocator]

The align side is the recipe of vs_trl_rloo.py (`align train`, step_s from metrics.jsonl); the
bare side is benchmarks/_bare_rloo_worker.py: one KV-cache sampling loop, one policy forward
and backward, one reference forward, one clipped AdamW step, nothing else. Both run in the
align venv, in fresh subprocesses, alternately.

``--threads``/``--cpu-time``: see common.Timing. ``--same-allocator``: the bare loop runs with
the glibc allocator settings align applies to itself (align.allocator), as environment
variables -- the floor of the same compute on the same allocator.

Last line: ratio=<align seconds per step / bare loop seconds per step>.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ALIGN_PYTHON,
    MODELS,
    TUNED_ALLOCATOR_ENV,
    add_comparison_args,
    alternate,
    ensure_assets,
    load_average,
    model_name,
    run_align,
    run_json,
    steady,
    timing_from,
)
from vs_trl_rloo import LR, align_recipe  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_comparison_args(parser, "bare loop")
    args = parser.parse_args(argv)
    size = model_name(args)
    new_tokens = MODELS[size]["new_tokens"]
    timing = timing_from(args)
    bare_env = {**timing.env(), **(TUNED_ALLOCATOR_ENV if args.same_allocator else {})}
    paths = ensure_assets()
    print(
        f"RLOO step vs bare loop, {size} model, k=4 × 4 prompts, {new_tokens} new tokens; {timing.describe()}"
        f"{'; bare loop with the tuned allocator' if args.same_allocator else ''}; {load_average()}"
    )
    bare_argv = timing.wrap(
        [
            ALIGN_PYTHON,
            str(Path(__file__).resolve().parent / "_bare_rloo_worker.py"),
            str(paths[size]),
            str(paths["prompts"]),
            str(new_tokens),
            str(args.steps),
            str(LR),
        ]
    )
    with tempfile.TemporaryDirectory() as tmp:
        recipe = align_recipe(paths[size], paths["prompts"], new_tokens, args.steps)
        runs = alternate(
            {
                "align": lambda r: steady(run_align(recipe, Path(tmp), timing)["step_s"]),
                "bare": lambda r: steady(run_json(bare_argv, bare_env)[0]["step_s"]),
            },
            args.rounds,
        )
    align_s, bare_s = statistics.median(runs["align"]), statistics.median(runs["bare"])
    print(f"align  {align_s:.4f} s/step (runs: {', '.join(f'{v:.4f}' for v in runs['align'])})")
    print(f"bare   {bare_s:.4f} s/step (runs: {', '.join(f'{v:.4f}' for v in runs['bare'])})")
    print(f"ratio={align_s / bare_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
