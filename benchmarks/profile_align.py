"""Where align's step time goes: cProfile over the steady-state steps of an RLOO or DPO run.

    .venv/bin/python benchmarks/profile_align.py rloo|dpo [--medium | --model NAME | --grid SHAPE] [--steps N] [--top N]

Runs ``align.trainer.train`` in this process on the recipe of vs_trl_rloo.py / vs_trl_dpo.py,
switches the profiler on after WARMUP_STEPS steps (start-up and warm-up are left out) and
prints the functions with the most time, as a share of the profiled step time: own time
(tottime, where the CPU is) and cumulative time (cumtime, which code path it is under).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MODELS, WARMUP_STEPS, ensure_assets  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("objective", choices=["rloo", "dpo"])
    parser.add_argument("--medium", action="store_true")
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="a benchmark model by name")
    parser.add_argument("--grid", default=None, help="a shape of benchmarks/grid.py ('medium', ...)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    size = args.model or ("medium" if args.medium else "tiny")
    paths = ensure_assets()
    import vs_trl_dpo
    import vs_trl_rloo

    from align.recipe import Recipe
    from align.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        model, prompts, new_tokens = paths.get(size), paths["prompts"], MODELS.get(size, {}).get("new_tokens")
        if args.grid:
            import grid

            shape = grid.SHAPES[args.grid]
            size, model = args.grid, grid.model(args.grid)
            prompts = grid.prompts(shape["prompt"], paths["prompts"])
            new_tokens = grid.new_tokens(args.grid)
        if args.objective == "rloo":
            raw = vs_trl_rloo.align_recipe(model, prompts, new_tokens, args.steps)
            if args.grid:
                raw["data"]["max_prompt_tokens"] = grid.MAX_PROMPT_TOKENS
        else:
            raw = vs_trl_dpo.align_recipe(model, paths["pairs"], args.steps, average=False)
        raw["output"]["dir"] = str(Path(tmp) / "run")
        recipe = Recipe.model_validate(raw)
        profiler = cProfile.Profile()
        window: dict[str, float] = {}

        def on_step(step: int, record: dict) -> None:
            if step == WARMUP_STEPS:
                window["start"] = time.perf_counter()
                profiler.enable()
            elif step == args.steps:
                profiler.disable()
                window["seconds"] = time.perf_counter() - window["start"]

        train(recipe, on_step=on_step)
    steps = args.steps - WARMUP_STEPS
    total = window["seconds"]
    print(f"{args.objective}, {size} model: {steps} profiled steps, {total / steps:.4f} s/step (under cProfile)")
    stats = pstats.Stats(profiler, stream=io.StringIO())
    for key, title in (("tottime", "own time"), ("cumulative", "cumulative time")):
        print(f"\ntop {args.top} by {title} (% of profiled step time)")
        stats.sort_stats(key)
        for func in stats.fcn_list[: args.top]:
            _, ncalls, tottime, cumtime, _ = stats.stats[func]
            filename, line, name = func
            where = name if filename == "~" else f"{_short(filename)}:{line}({name})"
            seconds = tottime if key == "tottime" else cumtime
            print(f"  {100 * seconds / total:6.1f} %  {ncalls / steps:8.1f} calls/step  {where}")
    return 0


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/work/main/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
