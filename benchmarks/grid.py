"""Speed on the shapes users bring: align and TRL side by side over a grid of model and prompt shapes.

    .venv/bin/python benchmarks/grid.py [--shapes NAME,NAME] [--rounds R] [--steps N] [--dpo] [--threads T]

The base shape is a medium Llama built independently of the named benchmark models: hidden 256,
4 layers, 8 heads / 4 KV heads, intermediate 688 (8/3·h rounded to a multiple of 16, as Llama
rounds it), a 32k byte-level BPE vocabulary, untied head, prompts of ~4 tokens. Each other shape
changes one axis of it: intermediate 2·h (512) and 3.5·h (896); prompts of ~32 and ~128 tokens
(lengths drawn from [L/2, 3L/2], so a batch is left-padded unevenly); a 128k vocabulary; a tied
head; Qwen2 (its QKV biases). The small shapes (hidden 64, 2 layers, 4 heads) take the base and
the two costliest axes (128k vocabulary, ~128-token prompts).

Per shape: align RLOO and TRL's RLOOTrainer (4 prompts × k 4, exactly 128 new tokens medium, 24
small; β 0.05; fp32) alternating run after run, the median step after the warm-up steps; align's
phase split from its metrics (generation, scoring, reference forward, the rest of the step: policy
forward, backward, optimizer); the fraction of the fp32 GEMM peak measured at the start of this run
(benchmarks/peak.py) that the step's FLOPs (benchmarks/flops.py) reach; both peak RSS. ``--dpo``:
DPO (16 pairs a step) the same way. Prints one Markdown table (benchmarks/README.md keeps it).

Assets go to benchmarks/.cache/grid/ (tokenizers, models, prompt files), built once.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BENCH,
    CACHE,
    TRL_PYTHON,
    WARMUP_STEPS,
    Timing,
    alternate,
    ensure_assets,
    load_average,
    padded_prompt_tokens,
    pseudo_words,
    run_align,
    run_json,
    steady,
    step_shape,
)
from flops import rloo_step  # noqa: E402
from peak import measure as measure_peak  # noqa: E402
from vs_trl_rloo import LR, align_recipe  # noqa: E402

from align.step_metrics import PHASES  # noqa: E402

GRID = CACHE / "grid"
MEDIUM = {"n_layer": 4, "n_embd": 256, "n_head": 8, "intermediate_size": 688}
SMALL = {"n_layer": 2, "n_embd": 64, "n_head": 4, "intermediate_size": 176}
BASE = {"architecture": "llama", "vocab": 32_000, "prompt": 4, "tied": False}
SHAPES: dict[str, dict] = {
    "medium": {**MEDIUM, **BASE},
    "medium ffn 2h": {**MEDIUM, **BASE, "intermediate_size": 512},
    "medium ffn 3.5h": {**MEDIUM, **BASE, "intermediate_size": 896},
    "medium prompt 32": {**MEDIUM, **BASE, "prompt": 32},
    "medium prompt 128": {**MEDIUM, **BASE, "prompt": 128},
    "medium vocab 128k": {**MEDIUM, **BASE, "vocab": 128_000},
    "medium tied": {**MEDIUM, **BASE, "tied": True},
    "medium qwen2": {**MEDIUM, **BASE, "architecture": "qwen2"},
    "small": {**SMALL, **BASE},
    "small vocab 128k": {**SMALL, **BASE, "vocab": 128_000},
    "small prompt 128": {**SMALL, **BASE, "prompt": 128},
}
MAX_PROMPT_TOKENS = 256  # above the longest grid prompt (~192 tokens): no prompt is cut


def new_tokens(name: str) -> int:
    """Exactly this many new tokens per completion (the benchmark models' EOS is all but never drawn)."""
    return 128 if name.startswith("medium") else 24


# ------------------------------------------------------------------------------------------ assets


def tokenizer(vocab: int) -> Path:
    """A byte-level BPE of exactly ``vocab`` tokens, trained on generated reviews and pseudo-words
    (enough distinct words that the merges reach 128k)."""
    from align.jobs.quickstart.corpus import atomic_dir, generate_reviews, train_tokenizer

    def build(out: Path) -> None:
        words = 60_000 if vocab <= 32_000 else 1_500_000
        tok = train_tokenizer(generate_reviews(4000) + pseudo_words(words, seed=vocab), out, vocab_size=vocab)
        if len(tok) != vocab:
            raise RuntimeError(f"tokenizer has {len(tok)} tokens, expected {vocab}")

    return atomic_dir(GRID / f"tokenizer_{vocab // 1000}k", build)


def model(name: str, seed: int = 0) -> Path:
    """The shape's model, random weights from ``seed`` (0: the policy; 1: a reference, step0_grid.py)."""
    from transformers import AutoTokenizer

    from align.jobs.quickstart.corpus import atomic_dir, build_tiny_model

    shape = SHAPES[name]

    def build(out: Path) -> None:
        tok = AutoTokenizer.from_pretrained(tokenizer(shape["vocab"]))
        build_tiny_model(
            tok,
            out,
            n_layer=shape["n_layer"],
            n_embd=shape["n_embd"],
            n_head=shape["n_head"],
            n_positions=512,
            seed=seed,
            architecture=shape["architecture"],
            tie_word_embeddings=shape["tied"],
            intermediate_size=shape["intermediate_size"],
        )

    suffix = "" if seed == 0 else f"_seed{seed}"
    return atomic_dir(GRID / (name.replace(" ", "_").replace(".", "") + suffix), build)


def prompts(length: int, short: Path) -> Path:
    """~``length``-token prompts, each of a length drawn from [L/2, 3L/2] (the base: the corpus's)."""
    from transformers import AutoTokenizer

    from align.jobs.quickstart.corpus import atomic_dir

    if length == 4:
        return short

    def build(out: Path) -> None:
        tok = AutoTokenizer.from_pretrained(tokenizer(32_000))
        rng = random.Random(length)
        words = " ".join(pseudo_words(200_000, seed=7)).split()
        rows, at = [], 0
        for _ in range(512):
            target = rng.randint(length // 2, 3 * length // 2)
            text = []
            while len(tok(" ".join(text))["input_ids"]) < target:
                text.append(words[at % len(words)])
                at += 1
            rows.append({"prompt": " ".join(text)})
        (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    return atomic_dir(GRID / f"prompts_{length}", build) / "prompts.jsonl"


# ------------------------------------------------------------------------------------------ sides


def phase_split(records: list[dict]) -> dict[str, float]:
    """align's median seconds per phase over the steps after the warm-up."""
    kept = records[WARMUP_STEPS:] or records
    return {k: statistics.median(r.get(k, 0.0) for r in kept) for k in PHASES}


def side_by_side(align_run, trl_argv: list[str], timing: Timing, rounds: int) -> dict:
    """align and TRL alternating; medians of each run's steady step, align's phases, peak RSS."""
    rss: dict[str, list[float]] = {"align": [], "trl": []}
    splits: list[dict[str, float]] = []

    def align_once(_r: int) -> float:
        result = align_run()
        rss["align"].append(result["peak_rss_mib"])
        splits.append(phase_split(result["records"]))
        return steady(result["step_s"])

    def trl_once(_r: int) -> float:
        result, peak_mib = run_json(trl_argv, timing.env())
        rss["trl"].append(peak_mib)
        return steady(result["step_s"])

    runs = alternate({"align": align_once, "trl": trl_once}, rounds)
    align_s, trl_s = statistics.median(runs["align"]), statistics.median(runs["trl"])
    return {
        "align_s": align_s,
        "trl_s": trl_s,
        "ratio": trl_s / align_s,
        "phases": {k: statistics.median(s[k] for s in splits) for k in PHASES},
        "rss": {side: statistics.median(v) for side, v in rss.items()},
    }


def rloo_row(name: str, work: Path, args, timing: Timing, peak: float, short: Path) -> dict:
    shape = SHAPES[name]
    model_dir, prompt_file = model(name), prompts(shape["prompt"], short)
    tokens = new_tokens(name)
    recipe = align_recipe(model_dir, prompt_file, tokens, args.steps)
    recipe["data"]["max_prompt_tokens"] = MAX_PROMPT_TOKENS
    trl_argv = timing.wrap(
        [TRL_PYTHON, str(BENCH / "_trl_rloo_worker.py"), str(model_dir), str(prompt_file), str(tokens)]
        + [str(args.steps), str(LR), str(work / "trl"), ""]
    )
    row = side_by_side(lambda: run_align(recipe, work, timing), trl_argv, timing, args.rounds)
    width = round(padded_prompt_tokens(prompt_file, model_dir, 4))
    flops = rloo_step(step_shape(model_dir), 16, width, tokens)["total"]
    return {**row, "peak_fraction": flops / row["align_s"] / peak, "prompt_width": width}


def dpo_row(name: str, work: Path, args, timing: Timing, pairs: Path) -> dict:
    from vs_trl_dpo import LR as DPO_LR
    from vs_trl_dpo import WORKER
    from vs_trl_dpo import align_recipe as dpo_recipe

    model_dir = model(name)
    recipe = dpo_recipe(model_dir, pairs, args.steps, average=False)
    trl_argv = timing.wrap(
        [TRL_PYTHON, WORKER, "time", str(model_dir), str(pairs), "sigmoid", str(args.steps), str(DPO_LR)]
        + [str(work / "trl_dpo"), "0"]
    )
    return side_by_side(lambda: run_align(recipe, work, timing), trl_argv, timing, args.rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shape names (default: all)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dpo", action="store_true", help="DPO side by side too")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; expected some of {list(SHAPES)}")
    timing = Timing(threads=args.threads)
    assets = ensure_assets()
    for name in names:  # built before any timing
        model(name), prompts(SHAPES[name]["prompt"], assets["prompts"])
    peak = measure_peak(threads=args.threads)
    print(
        f"grid: {len(names)} shapes, {args.rounds} rounds × {args.steps} steps; fp32 GEMM peak {peak / 1e9:.1f} "
        f"GFLOP/s; {timing.describe()}; {load_average()}"
    )
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in names:
            print(f"{name}: RLOO")
            rows[name] = {"rloo": rloo_row(name, work, args, timing, peak, assets["prompts"])}
            if args.dpo:
                print(f"{name}: DPO")
                rows[name]["dpo"] = dpo_row(name, work, args, timing, assets["pairs"])
    # the machine's peak moves with its neighbours (121.7 and 165.4 GFLOP/s minutes apart, 2026-12-07):
    # measured again at the end, the fractions are against the higher of the two
    end_peak = measure_peak(threads=args.threads)
    for row in rows.values():
        row["rloo"]["peak_fraction"] *= peak / max(peak, end_peak)
    peaks = f"{peak / 1e9:.1f} GFLOP/s at the start, {end_peak / 1e9:.1f} at the end"
    print(f"\nfp32 GEMM peak {peaks}; {load_average()}\n")
    head = "| shape | align RLOO s/step | TRL s/step | × TRL | % of peak | gen / score / ref / rest s "
    head += "| RSS align / TRL MiB |"
    if args.dpo:
        head += " DPO align / TRL s/step | DPO × TRL |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, row in rows.items():
        r = row["rloo"]
        split = " / ".join(f"{r['phases'][k]:.2f}" for k in PHASES)
        line = (
            f"| {name} | {r['align_s']:.3f} | {r['trl_s']:.3f} | {r['ratio']:.2f} | {100 * r['peak_fraction']:.0f} % "
            f"| {split} | {r['rss']['align']:.0f} / {r['rss']['trl']:.0f} |"
        )
        if args.dpo:
            d = row["dpo"]
            line += f" {d['align_s']:.3f} / {d['trl_s']:.3f} | {d['ratio']:.2f} |"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
