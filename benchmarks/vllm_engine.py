"""Rollout engines side by side: align's native decode loop against the colocated vLLM engine
(``generation.engine: vllm``), on the medium Llama and Qwen2 benchmark models (4 layers, 256 wide,
8 heads of 32, 30k vocabulary; positions widened to 1024 for 512 new tokens), fp32.

    python benchmarks/vllm_engine.py                  # 128 and 512 new tokens, 16 and 64 rows
    python benchmarks/vllm_engine.py --quick          # 128 new tokens, 16 rows
    python benchmarks/vllm_engine.py --profile        # also: where the vLLM engine's rollout goes (cProfile)

For each (model, new tokens, rows per rollout): generation tokens/s of each engine (median of
``--repeats`` rollouts after one warm-up, every row exactly that many tokens: no EOS), the weight
sync's seconds (the vLLM engine, once per training step), and a whole RLOO training step
(rollout, reward, log-probs, backward, optimizer; median after warm-up) with each engine. The
ratio column is native tokens/s over vLLM's: on this CPU the native loop is the speed path and vLLM
a correctness vehicle; on a GPU the order reverses (benchmarks/gpu_check.sh has the vLLM rows).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, MODELS, _build_model, ensure_assets, load_average  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def wide_model(name: str) -> Path:
    """The benchmark model ``name`` with 1024 positions (same weights' shapes otherwise)."""
    from align.jobs.quickstart.corpus import atomic_dir

    def build(out: Path) -> None:
        saved = dict(MODELS[name])
        MODELS[name] = {**saved, "n_positions": 1024}
        try:
            _build_model(out, name, seed=0)
        finally:
            MODELS[name] = saved

    return atomic_dir(CACHE / f"{name}_1024", build)


def setup(model: Path, prompts: Path, engine: str, new_tokens: int, rows: int, workdir: Path):
    from align.config import validate
    from align.distributed import make_accelerator
    from align.recipe import Recipe
    from align.run_setup import setup_run
    from align.trainer import run_settings

    recipe = validate(
        Recipe,
        {
            "model": {"path": str(model)},
            "data": {"train": str(prompts), "max_prompt_tokens": 64},
            "objective": {"name": "rloo", "k": 4, "beta": 0.05},
            "reward": [{"name": "length", "options": {"target": 10, "unit": "words"}}],
            "generation": {"max_new_tokens": new_tokens, "engine": engine},
            "train": {"steps": 100, "batch_size": rows // 4, "lr": 1e-5, "lr_scheduler": "constant"},
            "output": {"dir": str(workdir / f"{engine}-{new_tokens}-{rows}"), "report": False, "sample_every": 0},
        },
    )
    accelerator = make_accelerator(1)
    run = setup_run(run_settings(recipe), accelerator)
    run.sampling = replace(run.sampling, eos_token_ids=())  # every row exactly new_tokens long
    return run, accelerator


def time_rollouts(run, repeats: int) -> tuple[float, int]:
    """Median seconds of a rollout after one warm-up, and its generated tokens."""
    from align.trainer import rollout

    rows = list(range(run.settings.layout.batch_size))
    seconds, tokens = [], 0
    for i in range(repeats + 1):
        started = time.perf_counter()
        sampled = rollout(run, rows, step=i)
        if i:
            seconds.append(time.perf_counter() - started)
        tokens = int(sampled.completion_mask.sum())
    return statistics.median(seconds), tokens


def time_steps(run, accelerator, steps: int) -> float:
    from align.trainer import train_step

    seconds = [train_step(run, accelerator)["step_s"] for _ in range(steps + 1)]
    return statistics.median(seconds[1:])


def time_sync(run, repeats: int = 5) -> float:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run.engine.sync_weights()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def profile_rollout(run) -> str:
    from align.trainer import rollout

    profiler = cProfile.Profile()
    profiler.enable()
    rollout(run, list(range(run.settings.layout.batch_size)), step=99)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(14)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 new tokens, 16 rows only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="whole training steps timed per engine")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--models", default="llama_medium,qwen2_medium")
    args = parser.parse_args(argv)
    assets = ensure_assets()
    grid = [(128, 16)] if args.quick else [(128, 16), (128, 64), (512, 16), (512, 64)]
    print(f"load average before: {load_average()}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = wide_model(name)
            for new_tokens, rows in grid:
                row = {"model": name, "new_tokens": new_tokens, "rows": rows}
                for engine in ("native", "vllm"):
                    run, accelerator = setup(model, assets["prompts"], engine, new_tokens, rows, Path(tmp))
                    seconds, tokens = time_rollouts(run, args.repeats)
                    row[f"{engine}_tokens_per_s"] = tokens / seconds
                    if engine == "vllm":
                        row["sync_s"] = time_sync(run)
                        if args.profile:
                            print(f"--- vLLM rollout profile, {name}, {new_tokens} tokens × {rows} rows")
                            print(profile_rollout(run))
                    if new_tokens == 128:  # a whole training step (the 512-token step is the rollout's story)
                        row[f"{engine}_step_s"] = time_steps(run, accelerator, args.steps)
                print(json.dumps(row), flush=True)
                results.append(row)
    print(f"\nload average after: {load_average()}")
    header = f"{'model':<14}{'new':>5}{'rows':>6}{'native tok/s':>14}{'vLLM tok/s':>12}{'native/vLLM':>12}"
    print(header + f"{'sync s':>8}{'native step s':>15}{'vLLM step s':>13}")
    for r in results:
        ratio = r["native_tokens_per_s"] / r["vllm_tokens_per_s"]
        steps = f"{r.get('native_step_s', float('nan')):>15.2f}{r.get('vllm_step_s', float('nan')):>13.2f}"
        print(
            f"{r['model']:<14}{r['new_tokens']:>5}{r['rows']:>6}{r['native_tokens_per_s']:>14.0f}"
            f"{r['vllm_tokens_per_s']:>12.0f}{ratio:>12.1f}{r['sync_s']:>8.3f}{steps}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
