"""RLOO step 0, align against TRL on the same completions: the gradients of the first step.

    .venv/bin/python benchmarks/step0_rloo.py [--model NAME ...] [--tolerance REL]

Why gradients, not loss values: at step 0 TRL's RLOO loss is −mean(min(ρ·A, clip(ρ)·A)) with
ρ = exp(log π − log π_old) = 1, so its value is −mean(A), which is 0 by construction (each
prompt's leave-one-out advantages sum to 0); align's is the REINFORCE surrogate
−mean(A · log π(y)). The two are different numbers with the same gradient −mean(A ∇log π(y)),
and that gradient is the step. So this compares it, parameter by parameter.

For each model (default: every benchmark model): a data file of the benchmark's first 4 prompts
(one batch, so both sides train on the same prompts at step 0); ``align.trainer.train`` runs
one step of vs_trl_rloo.py's recipe in this process, its rollout recorded and every gradient
saved as it reaches the optimizer; TRL's RLOOTrainer (its venv, ``_trl_rloo_worker.py``) runs one
step of its matching config with generation replaced by align's completions for each prompt,
and saves its gradients the same way. Both clip at 1.0 before the step, so both sides' gradient
norms (before clipping) are printed too.

Position ids: align feeds every forward position ids from the attention mask (cumsum − 1), the
ones ``generate`` samples with. TRL's log-prob forwards pass only the mask, so transformers falls
back to 0 … L−1 and a left-padded row is scored at positions shifted by its padding -- a no-op
for RoPE models (only relative offsets matter) but not for GPT-2's learned absolute positions
(the pattern of trl#6800). By default TRL's policy and reference get the mask's position ids
too, so what is compared is the estimator; ``--trl-positions-as-shipped`` leaves TRL as it is,
which on GPT-2 shows the difference that shift makes.

Prints, per model, the largest gradient difference relative to the largest gradient entry and
the cosine between the flattened gradients; exits 1 when that or the relative difference of the
gradient norms (clipping hides a common scale) is above ``--tolerance`` for any model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MODELS, TRL_PYTHON, ensure_assets, run_json  # noqa: E402

PROMPTS = 4  # one step's batch: both sides see exactly these prompts at step 0


def _align_step0(recipe_raw: dict) -> tuple[list[dict], dict, dict]:
    """One align step in this process: (the rollout's completions per prompt, gradients by name, metrics)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    import align.native_engine as engine
    import align.trainer as trainer_lib
    from align.recipe import Recipe

    completions: dict[tuple, list[list[int]]] = {}
    models: dict = {}
    grads: dict = {}
    real_generate, real_train_on_batch = engine.generate, trainer_lib.train_on_batch

    def recording_generate(*args, **kwargs):
        rollout = real_generate(*args, **kwargs)
        lengths = rollout.completion_mask.sum(-1).tolist()
        for row in range(rollout.prompt_ids.shape[0]):
            prompt = tuple(rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist())
            completions.setdefault(prompt, []).append(rollout.completion_ids[row, : lengths[row]].tolist())
        return rollout

    def capturing_train_on_batch(ctx, *args, **kwargs):
        models["policy"] = ctx.models.policy
        return real_train_on_batch(ctx, *args, **kwargs)

    def save_first_grads(optimizer, args, kwargs):
        if not grads and "policy" in models:
            named = models["policy"].named_parameters()
            grads.update({n: p.grad.detach().clone() for n, p in named if p.grad is not None})

    metrics: dict = {}
    engine.generate, trainer_lib.train_on_batch = recording_generate, capturing_train_on_batch
    hook = register_optimizer_step_pre_hook(save_first_grads)
    try:
        trainer_lib.train(Recipe.model_validate(recipe_raw), on_step=lambda step, record: metrics.update(record))
    finally:
        hook.remove()
        engine.generate, trainer_lib.train_on_batch = real_generate, real_train_on_batch
    entries = [{"prompt_ids": list(p), "completion_ids": c} for p, c in completions.items()]
    return entries, grads, metrics


def compare(align_grads: dict, trl_grads: dict) -> tuple[float, float, str]:
    """(max |Δ| / max |g_align|, cosine of the flattened gradients, the parameter of the largest Δ)."""
    import torch

    if set(align_grads) != set(trl_grads):
        missing = sorted(set(align_grads) ^ set(trl_grads))
        raise SystemExit(f"the two sides' parameters differ: {missing[:6]}")
    names = sorted(align_grads)
    a = torch.cat([align_grads[n].double().flatten() for n in names])
    b = torch.cat([trl_grads[n].double().flatten() for n in names])
    scale = float(a.abs().max())
    worst = max(names, key=lambda n: float((align_grads[n].double() - trl_grads[n].double()).abs().max()))
    cosine = float(torch.dot(a, b) / (a.norm() * b.norm()))
    return float((a - b).abs().max()) / scale, cosine, worst


def check(
    name: str,
    model: Path,
    prompt_file: Path,
    new_tokens: int,
    tolerance: float,
    positions_as_shipped: bool = False,
    max_prompt_tokens: int | None = None,
) -> tuple[bool, float]:
    """One model's step 0 on the first PROMPTS prompts of ``prompt_file``: prints the comparison,
    returns (within ``tolerance``, max |Δ| / max |g|) (benchmarks/step0_grid.py runs it over the grid)."""
    import torch
    import vs_trl_rloo

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompts = work / "prompts.jsonl"
        lines = [line for line in prompt_file.read_text().splitlines() if line.strip()][:PROMPTS]
        prompts.write_text("\n".join(lines) + "\n")
        recipe = vs_trl_rloo.align_recipe(model, prompts, new_tokens, 1)
        recipe["output"]["dir"] = str(work / "align")
        if max_prompt_tokens is not None:
            recipe["data"]["max_prompt_tokens"] = max_prompt_tokens
        entries, align_grads, metrics = _align_step0(recipe)
        (work / "completions.json").write_text(json.dumps(entries))
        env = {"STEP0_COMPLETIONS": str(work / "completions.json"), "STEP0_GRADS": str(work / "trl_grads.pt")}
        if not positions_as_shipped:
            env["STEP0_MASK_POSITIONS"] = "1"
        argv_trl = [
            TRL_PYTHON,
            str(Path(__file__).resolve().parent / "_trl_rloo_worker.py"),
            str(model),
            str(prompts),
            str(new_tokens),
            "1",
            str(vs_trl_rloo.LR),
            str(work / "trl"),
        ]
        result, _ = run_json(argv_trl, env)
        if not result.get("step0_grads"):
            raise SystemExit(f"{name}: the TRL worker saved no gradients")
        trl_grads = torch.load(work / "trl_grads.pt")
    rel, cosine, worst = compare(align_grads, trl_grads)
    samples = sum(len(e["completion_ids"]) for e in entries)
    tokens = sum(len(c) for e in entries for c in e["completion_ids"])
    print(
        f"{name}: {samples} completions ({tokens} tokens) on both sides; clipped gradients max |Δ| / max |g| "
        f"= {rel:.2e} (at {worst}), cosine {cosine:.9f}; grad norm before clipping align "
        f"{metrics.get('grad_norm', float('nan')):.6g}, TRL {result['grad_norm'][0]:.6g}; loss align "
        f"{metrics.get('loss', float('nan')):.6g} (surrogate), TRL {result['loss'][0]:.3g} "
        "(−mean A: 0 by construction)"
    )
    norm_align, norm_trl = metrics.get("grad_norm", float("nan")), result["grad_norm"][0]
    # clipping divides both by their own norm: the norms before it must agree as well
    return rel <= tolerance and abs(norm_align - norm_trl) <= tolerance * abs(norm_trl), rel


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), action="append", help="repeatable; default: all")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |Δgrad| / max |grad| allowed")
    parser.add_argument(
        "--trl-positions-as-shipped", action="store_true", help="TRL's forwards without position ids (see above)"
    )
    args = parser.parse_args(argv)
    paths = ensure_assets()
    shipped = args.trl_positions_as_shipped
    failed = [
        size
        for size in args.model or list(MODELS)
        if not check(size, paths[size], paths["prompts"], MODELS[size]["new_tokens"], args.tolerance, shipped)[0]
    ]
    if failed:
        print(f"above tolerance {args.tolerance:g}: {', '.join(failed)}")
        return 1
    print(f"all within {args.tolerance:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
