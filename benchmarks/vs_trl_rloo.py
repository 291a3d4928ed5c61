"""align RLOO against TRL's RLOOTrainer on the same work, seconds per optimizer step.

    .venv/bin/python benchmarks/vs_trl_rloo.py [--medium | --model NAME] [--rounds N] [--steps N]
        [--threads N] [--cpu-time] [--same-allocator]

The same locally built policy (benchmarks/common.py), the same prompts, k = 4 completions of
4 prompts per step, exactly 24 new tokens (128 with --medium; EOS masked until then on both
sides), β = 0.05, lr 1e-5 constant, gradient clipping 1.0, fp32, dropout off, the same length
reward. Each side runs in its own interpreter (align: `align train` in the align venv; TRL: its
side venv), the two alternating run after run; a run's time is the median step after
WARMUP_STEPS, the reported time the median over runs.

align: `step_s` per step from RUN/metrics.jsonl (rollout → rewards → log-probs → loss →
backward → optimizer step). TRL: a TrainerCallback's on_step_begin → on_step_end (the same
work; the Trainer's logging after each step is outside both).

``--threads``/``--cpu-time``: see common.Timing (``--threads 1 --cpu-time`` for a machine other
jobs share). ``--same-allocator``: TRL runs with the glibc allocator settings align applies to
itself (align.allocator), as environment variables.

Then the step's FLOPs from the shapes (benchmarks/flops.py: generation, policy forward and
backward, reference forward) and each side's fraction of the fp32 GEMM peak measured in the same
run (benchmarks/peak.py). ``--model``: GPT-2 (tiny, medium), Llama (untied head) or Qwen2 (tied),
both with grouped KV heads, at two sizes (common.MODELS).

Last line: ratio=<TRL seconds per step / align seconds per step>.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    LENGTH_TARGET,
    MODELS,
    TRL_PYTHON,
    TUNED_ALLOCATOR_ENV,
    add_comparison_args,
    alternate,
    ensure_assets,
    flops_line,
    load_average,
    model_name,
    padded_prompt_tokens,
    run_align,
    run_json,
    steady,
    step_shape,
    timing_from,
)
from flops import rloo_step  # noqa: E402
from peak import measure as measure_peak  # noqa: E402

LR = 1e-5
LORA_R = 8


def align_recipe(model: Path, prompts: Path, new_tokens: int, steps: int) -> dict:
    return {
        "model": {"path": str(model)},
        "data": {"train": str(prompts)},
        "objective": {"name": "rloo", "k": 4, "beta": 0.05},
        "reward": [{"name": "length", "options": {"target": LENGTH_TARGET, "unit": "words"}}],
        # no min_new_tokens: align refuses it online (the loss would score a filtered sampler). With
        # the benchmark models' random weights and 32k vocabulary EOS has p ≈ 1/32k per token, so
        # completions run to max_new_tokens all but always; the mean length is printed to show it
        "generation": {"max_new_tokens": new_tokens, "temperature": 1.0},
        "train": {"steps": steps, "batch_size": 4, "lr": LR, "lr_scheduler": "constant", "max_grad_norm": 1.0},
        "output": {"report": False, "save_model": False, "sample_every": 0},
    }


def lora_targets(architecture: str) -> list[str]:
    """The attention projections LoRA adapts on each benchmark architecture (both sides the same)."""
    return ["c_attn"] if architecture == "gpt2" else ["q_proj", "v_proj"]


def _align_steps(recipe: dict, work: Path, timing, new_tokens: int, rss: list[float]) -> list[float]:
    result = run_align(recipe, work, timing)
    rss.append(result["peak_rss_mib"])
    lengths = [x for x in result["completion_length"] if x is not None]
    if lengths:
        print(f"  align mean completion length {statistics.fmean(lengths):.2f} of {new_tokens} tokens")
    return result["step_s"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_comparison_args(parser, "TRL")
    parser.add_argument("--lora", action="store_true", help="both sides train LoRA r=8, α=16 on the attention")
    args = parser.parse_args(argv)
    size = model_name(args)
    new_tokens = MODELS[size]["new_tokens"]
    timing = timing_from(args)
    trl_env = {**timing.env(), **(TUNED_ALLOCATOR_ENV if args.same_allocator else {})}
    paths = ensure_assets()
    print(
        f"RLOO, {size} model, k=4 × 4 prompts, {new_tokens} new tokens, {args.steps} steps; {timing.describe()}"
        f"{'; TRL with the tuned allocator' if args.same_allocator else ''}; {load_average()}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        recipe = align_recipe(paths[size], paths["prompts"], new_tokens, args.steps)
        targets = lora_targets(MODELS[size].get("architecture", "gpt2"))
        if args.lora:  # the reference is the base with adapters off, on both sides
            recipe["model"]["lora"] = {"r": LORA_R, "alpha": 2 * LORA_R, "target_modules": targets}
        trl_argv = timing.wrap(
            [
                TRL_PYTHON,
                str(Path(__file__).resolve().parent / "_trl_rloo_worker.py"),
                str(paths[size]),
                str(paths["prompts"]),
                str(new_tokens),
                str(args.steps),
                str(LR),
                str(work / "trl"),
                ",".join(targets) if args.lora else "",
            ]
        )
        rss: dict[str, list[float]] = {"align": [], "trl": []}

        def trl_steps(r: int) -> float:
            result, peak_mib = run_json(trl_argv, trl_env)
            rss["trl"].append(peak_mib)
            return steady(result["step_s"])

        runs = alternate(
            {"align": lambda r: steady(_align_steps(recipe, work, timing, new_tokens, rss["align"])), "trl": trl_steps},
            args.rounds,
        )

    align_s, trl_s = statistics.median(runs["align"]), statistics.median(runs["trl"])
    print(f"align  {align_s:.4f} s/step (runs: {', '.join(f'{v:.4f}' for v in runs['align'])})")
    print(f"TRL    {trl_s:.4f} s/step (runs: {', '.join(f'{v:.4f}' for v in runs['trl'])})")
    # the same step's FLOPs from the shapes (benchmarks/flops.py), against the GEMM peak measured now
    shape = step_shape(paths[size])
    rows = 4 * 4
    prompt = round(padded_prompt_tokens(paths["prompts"], paths[size], 4))
    parts = rloo_step(shape, rows, prompt, new_tokens)
    peak = measure_peak(threads=args.threads)
    print(f"peak   fp32 GEMM {peak / 1e9:.1f} GFLOP/s (benchmarks/peak.py, this run); prompt width {prompt} tokens")
    print(flops_line("align", parts, align_s, peak))
    print(flops_line("TRL", parts, trl_s, peak))
    align_mib, trl_mib = statistics.median(rss["align"]), statistics.median(rss["trl"])
    print(
        f"memory peak RSS{' (LoRA r=8)' if args.lora else ''}: align {align_mib:.0f} MiB, TRL {trl_mib:.0f} MiB "
        f"(TRL ÷ align {trl_mib / align_mib:.2f})"
    )
    print(f"ratio={trl_s / align_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
