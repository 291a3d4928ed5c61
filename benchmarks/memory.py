"""Peak RSS of align's RLOO step: full fine-tuning against LoRA with the shared reference.

    .venv/bin/python benchmarks/memory.py [--model tiny|medium] [--steps N] [--rounds N]

Each configuration runs in a fresh process (`align train`, a few steps); its peak RSS is the
child's own ``ru_maxrss`` (``os.wait4``). A third process only imports align's trainer and
loads the policy once: the baseline every run pays (interpreter, torch, transformers, one copy
of the weights). Over that baseline, full fine-tuning adds the frozen reference copy, the
gradients and AdamW's two moments (≈ 4 × the parameter bytes, plus activations); LoRA with
``model.lora: {r: 8, target_modules: [c_attn]}`` takes its reference from the same weights with
the adapters switched off, so its extra is the adapters, their optimizer state and the
activations, and no second copy of the base weights.

Last line: ratio=<LoRA peak RSS / full fine-tuning peak RSS>.

``--checkpointing``: full fine-tuning with ``train.gradient_checkpointing: true`` against without
(peak RSS and the median step after warm-up), last line ratio=<with / without peak RSS>.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ALIGN_PYTHON,
    MODELS,
    RESULT_PREFIX,
    ensure_assets,
    load_average,
    run_align,
    run_json,
    steady,
)
from vs_trl_rloo import align_recipe  # noqa: E402

BASELINE = f"""
import json, resource, sys
import align.trainer
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print({RESULT_PREFIX!r} + json.dumps({{
    "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}}))
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="medium")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per configuration")
    parser.add_argument("--checkpointing", action="store_true", help="with and without gradient checkpointing")
    args = parser.parse_args(argv)
    paths = ensure_assets()
    new_tokens = MODELS[args.model]["new_tokens"]
    print(f"peak RSS, RLOO on the {args.model} model, {args.steps} steps; {load_average()}")
    recipe = align_recipe(paths[args.model], paths["prompts"], new_tokens, args.steps)
    if args.checkpointing:
        return compare_checkpointing(recipe, args.rounds)
    lora = {**recipe, "model": {**recipe["model"], "lora": {"r": 8, "target_modules": ["c_attn"]}}}
    peaks: dict[str, list[float]] = {"baseline": [], "full": [], "lora": []}
    param_bytes = 0
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            base, _ = run_json([ALIGN_PYTHON, "-c", BASELINE, str(paths[args.model])])
            param_bytes = base["param_bytes"]
            peaks["baseline"].append(base["rss_mib"])
            peaks["full"].append(run_align(recipe, Path(tmp))["peak_rss_mib"])
            peaks["lora"].append(run_align(lora, Path(tmp))["peak_rss_mib"])
    params_mib = param_bytes / 2**20
    peak = {name: statistics.median(values) for name, values in peaks.items()}
    print(f"base model parameters: {params_mib:.1f} MiB ({param_bytes / 4 / 1e6:.2f} M fp32)")
    for name, label in (("baseline", "load only"), ("full", "full fine-tuning"), ("lora", "LoRA r=8 c_attn")):
        extra = peak[name] - peak["baseline"]
        print(
            f"{label:<18} peak RSS {peak[name]:7.1f} MiB   over baseline {extra:7.1f} MiB "
            f"= {extra / params_mib:5.2f} × parameter bytes   (runs: {json.dumps(peaks[name])})"
        )
    print(f"ratio={peak['lora'] / peak['full']:.2f}")
    return 0


def compare_checkpointing(recipe: dict, rounds: int) -> int:
    ckpt = {**recipe, "train": {**recipe["train"], "gradient_checkpointing": True}}
    peaks: dict[str, list[float]] = {"without": [], "with": []}
    steps: dict[str, list[float]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            order = [("without", recipe), ("with", ckpt)]
            for name, config in order if i % 2 == 0 else order[::-1]:  # alternating: A B, B A, ...
                result = run_align(config, Path(tmp))
                peaks[name].append(result["peak_rss_mib"])
                steps[name].append(steady(result["step_s"]))
    for name in ("without", "with"):
        print(
            f"{name:<8} gradient checkpointing: peak RSS {statistics.median(peaks[name]):7.1f} MiB, "
            f"step {statistics.median(steps[name]):.3f} s   (runs: {peaks[name]}, {[round(x, 3) for x in steps[name]]})"
        )
    print(f"step time ratio with/without: {statistics.median(steps['with']) / statistics.median(steps['without']):.2f}")
    print(f"ratio={statistics.median(peaks['with']) / statistics.median(peaks['without']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
