"""align DPO against TRL's DPOTrainer on the same work, seconds per optimizer step, and the
step-0 loss of both on the same batch.

    .venv/bin/python benchmarks/vs_trl_dpo.py [--medium | --model NAME] [--rounds N] [--steps N] [--trl-precompute-ref]
        [--threads N] [--cpu-time] [--same-allocator]

Two variants, each timed alternately (align run, TRL run, TRL run, align run, ...):

* summed log-probs: align ``dpo`` against TRL ``loss_type=["sigmoid"]``;
* length-averaged: align ``dpo`` with ``average_logprobs: true`` against TRL
  ``loss_type=["sigmoid_norm"]`` (TRL ≥ 1.x has it: the per-sequence log-ratio divided by the
  completion length, the same quantity).

16 pairs per step, β = 0.1, lr 1e-5 constant, clipping 1.0, fp32, dropout off, the same pairs
file. align computes the reference log-probs once before training (start-up, not timed) and
TRL by default runs the reference forward in every step; ``--trl-precompute-ref`` turns on
TRL's ``precompute_ref_log_probs`` for the like-for-like comparison.

Step-0 check: the first 16 pairs of the file, policy = the model, reference = a differently
initialised twin (with reference = policy every DPO loss is exactly log 2, which would prove
nothing). TRL's loss comes from its own collator and ``compute_loss``; align's from its own
data encoding, log-prob and objective code. The token ids each side built are compared too.

``--threads``/``--cpu-time``: see common.Timing. ``--same-allocator``: TRL runs with the glibc
allocator settings align applies to itself (align.allocator), as environment variables.

Last line: ratio=<TRL seconds per step / align seconds per step> (summed variant; the
length-averaged ratio is printed just above).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DPO_BETA,
    TRL_PYTHON,
    TUNED_ALLOCATOR_ENV,
    add_comparison_args,
    alternate,
    ensure_assets,
    flops_line,
    load_average,
    model_name,
    padded_pair_tokens,
    run_align,
    run_json,
    steady,
    step_shape,
    timing_from,
)
from flops import dpo_step  # noqa: E402
from peak import measure as measure_peak  # noqa: E402

LR = 1e-5
PAIRS_PER_STEP = 16
WORKER = str(Path(__file__).resolve().parent / "_trl_dpo_worker.py")


def align_recipe(model: Path, pairs: Path, steps: int, average: bool, reference: Path | None = None) -> dict:
    recipe = {
        "model": {"path": str(model)},
        "data": {"train": str(pairs)},
        "objective": {"name": "dpo", "beta": DPO_BETA, "options": {"average_logprobs": average}},
        "train": {
            "steps": steps,
            "batch_size": PAIRS_PER_STEP,
            "lr": LR,
            "lr_scheduler": "constant",
            "max_grad_norm": 1.0,
        },
        "output": {"report": False, "save_model": False, "sample_every": 0},
    }
    if reference is not None:
        recipe["reference"] = str(reference)
    return recipe


def align_step0(model: Path, reference: Path, pairs: Path, average: bool, n: int) -> dict:
    """align's loss on the first ``n`` pairs in file order, through align's own code path."""
    import torch

    import losses
    from align import data as data_lib
    from align.logprobs import completion_logprobs
    from align.models import load_models
    from align.recipe import Recipe
    from align.run_data import OfflineData

    recipe = Recipe.model_validate(align_recipe(model, pairs, 1, average, reference))
    device = torch.device("cpu")
    models = load_models(recipe, device, need_reference=True)
    dataset = OfflineData(recipe, models.tokenizer, models.eos_token_id)
    rows = list(range(n))
    p_ids, p_mask = data_lib.pad([dataset.prompt_ids[i] for _ in range(2) for i in rows], models.pad_token_id, "left")
    c_ids, c_mask = data_lib.pad(
        [dataset.completion_ids[t][i] for t in range(2) for i in rows], models.pad_token_id, "right"
    )
    models.policy.eval()
    with torch.no_grad():
        policy = completion_logprobs(models.policy, p_ids, p_mask, c_ids, c_mask)
        ref = completion_logprobs(models.reference, p_ids, p_mask, c_ids, c_mask)
    batch = losses.LossBatch(
        logprobs=policy,
        mask=c_mask.float(),
        ref_logprobs=ref,
        pairs=torch.stack([torch.arange(n), torch.arange(n) + n], 1),
    )
    loss, _ = recipe.objective.build()(batch, num_units=n)
    return {
        "loss": float(loss),
        "prompt_ids": [dataset.prompt_ids[i] for i in rows],
        "chosen_ids": [dataset.completion_ids[0][i] for i in rows],
        "rejected_ids": [dataset.completion_ids[1][i] for i in rows],
    }


def step0_check(paths: dict, size: str, loss_type: str, average: bool, work: Path) -> tuple[str, float, bool]:
    """(a line saying it, |Δloss|, whether the two agree: identical token ids and |Δloss| ≤ 1e-5·max(1, |loss|))."""
    ours = align_step0(paths[size], paths[f"{size}_ref"], paths["pairs"], average, PAIRS_PER_STEP)
    theirs, _ = run_json(
        [
            TRL_PYTHON,
            WORKER,
            "check",
            str(paths[size]),
            str(paths["pairs"]),
            loss_type,
            str(paths[f"{size}_ref"]),
            str(PAIRS_PER_STEP),
            str(work / "trl-check"),
        ]
    )
    same_ids = all(ours[key] == theirs[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids"))
    diff = abs(ours["loss"] - theirs["loss"])
    agree = same_ids and diff <= 1e-5 * max(1.0, abs(ours["loss"]))
    line = (
        f"step-0 loss on the first {PAIRS_PER_STEP} pairs: align {ours['loss']:.7f}, TRL {theirs['loss']:.7f}, "
        f"|diff| {diff:.1e}; identical token ids: {same_ids} -> {'agree' if agree else 'DISAGREE'}"
    )
    return line, diff, agree


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl-precompute-ref", action="store_true", help="TRL precompute_ref_log_probs=True")
    add_comparison_args(parser, "TRL")
    args = parser.parse_args(argv)
    size = model_name(args)
    timing = timing_from(args)
    trl_env = {**timing.env(), **(TUNED_ALLOCATOR_ENV if args.same_allocator else {})}
    paths = ensure_assets()
    precompute = "1" if args.trl_precompute_ref else "0"
    print(
        f"DPO, {size} model, {PAIRS_PER_STEP} pairs per step, {args.steps} steps, "
        f"TRL precompute_ref_log_probs={args.trl_precompute_ref}; {timing.describe()}"
        f"{'; TRL with the tuned allocator' if args.same_allocator else ''}; {load_average()}"
    )
    shape = step_shape(paths[size])
    width, completion = padded_pair_tokens(paths["pairs"], paths[size], PAIRS_PER_STEP)
    peak = measure_peak(threads=args.threads)
    print(f"peak fp32 GEMM {peak / 1e9:.1f} GFLOP/s (benchmarks/peak.py, this run); padded width {width:.0f} tokens")
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for loss_type, average in (("sigmoid", False), ("sigmoid_norm", True)):
            label = f"align dpo average_logprobs={str(average).lower()} vs TRL {loss_type}"
            print(label)
            print("  " + step0_check(paths, size, loss_type, average, work)[0])
            recipe = align_recipe(paths[size], paths["pairs"], args.steps, average)
            trl_argv = timing.wrap(
                [
                    TRL_PYTHON,
                    WORKER,
                    "time",
                    str(paths[size]),
                    str(paths["pairs"]),
                    loss_type,
                    str(args.steps),
                    str(LR),
                    str(work / "trl"),
                    precompute,
                ]
            )
            runs = alternate(
                {
                    "align": lambda r, recipe=recipe: steady(run_align(recipe, work, timing)["step_s"]),
                    "trl": lambda r, argv=trl_argv: steady(run_json(argv, trl_env)[0]["step_s"]),
                },
                args.rounds,
            )
            align_s, trl_s = statistics.median(runs["align"]), statistics.median(runs["trl"])
            ratios[loss_type] = trl_s / align_s
            print(f"  align  {align_s:.4f} s/step (runs: {', '.join(f'{v:.4f}' for v in runs['align'])})")
            print(f"  TRL    {trl_s:.4f} s/step (runs: {', '.join(f'{v:.4f}' for v in runs['trl'])})")
            print(f"  ratio {loss_type}: {ratios[loss_type]:.2f}")
            # align caches the reference log-probs once; TRL computes them every step unless precomputed
            ours = dpo_step(shape, PAIRS_PER_STEP, round(width), round(completion), reference=False)
            theirs = dpo_step(shape, PAIRS_PER_STEP, round(width), round(completion), not args.trl_precompute_ref)
            print("  " + flops_line("align", ours, align_s, peak))
            print("  " + flops_line("TRL", theirs, trl_s, peak))
    print(f"ratio_sigmoid_norm={ratios['sigmoid_norm']:.2f}")
    print(f"ratio={ratios['sigmoid']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
