"""``align sample RUN_DIR|RECIPE [n=N] [out=FILE] [key=value ...]``: completions from a trained
policy (a run directory's ``final/``, else its last checkpoint; or a recipe's ``model.path``) on
the recipe's eval prompts (else its training prompts), scored by the recipe's rewards, written as
JSONL and shown as a table."""

from __future__ import annotations

import json
from pathlib import Path

from align.config import RecipeError, check_output_path, load_recipe


def _policy_dir(run_dir: Path) -> Path:
    from align.checkpoint import list_checkpoints

    if (run_dir / "final").is_dir():
        return run_dir / "final"
    found = list_checkpoints(run_dir)
    if not found:
        raise RecipeError(f"sample: {str(run_dir)!r} holds no final/ and no checkpoint")
    return found[-1] / "model"


def main(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from align.evaluation import EVAL_SEED_OFFSET, eval_prompts, sample_prompts
    from align.models import Models, load_saved_policy, load_tokenizer
    from align.recipe import Recipe
    from align.rewards_adapter import build_reward
    from align.run_data import OnlineData

    if args.recipe is None:
        raise RecipeError("sample: a run directory or a recipe is required")
    options = {k: v for k, v in (o.split("=", 1) for o in args.overrides) if k in ("n", "out")}
    overrides = [o for o in args.overrides if o.split("=", 1)[0] not in ("n", "out")]
    try:
        n = int(options.get("n", 8))
    except ValueError:
        raise RecipeError(f"sample: n: expected a whole number, got {options['n']!r}") from None
    if n < 1:
        raise RecipeError(f"sample: n: expected at least 1 prompt, got {n}")
    source = Path(args.recipe)
    if source.is_dir():
        recipe = load_recipe(Recipe, source / "recipe.yaml", [*overrides, "resume=null"])
        policy_path, out = _policy_dir(source), Path(options.get("out", source / "samples.jsonl"))
    else:
        recipe = load_recipe(Recipe, args.recipe, overrides)
        policy_path, out = Path(recipe.model.path), Path(options.get("out", "samples.jsonl"))
    check_output_path(out, "out", "file")  # before sampling, not after it
    device = torch.device("cpu")
    tokenizer = load_tokenizer(recipe)
    dataset = OnlineData(recipe, tokenizer) if recipe.objective.online else None
    prompts, columns, label, messages = eval_prompts(recipe, dataset, tokenizer, limit=n)
    if not prompts:
        raise RecipeError("sample: no prompts (set data.eval_prompts, or use an online recipe's data.train)")
    if source.is_dir():  # a run's saved policy: whole weights, or its LoRA adapters on the base
        policy = load_saved_policy(recipe, policy_path, device)
    else:  # a recipe: its model as it stands (LoRA adapters are not trained yet)
        from transformers import AutoModelForCausalLM

        from align.models import torch_dtype

        policy = AutoModelForCausalLM.from_pretrained(recipe.model.path, dtype=torch_dtype(recipe.model.dtype)).eval()
    models = Models(policy, None, tokenizer, tokenizer.eos_token_id, tokenizer.pad_token_id)
    rollout = sample_prompts(recipe, models, policy, prompts, recipe.train.seed + EVAL_SEED_OFFSET, 1, device)
    texts = list(rollout.texts)
    scores, components = [None] * len(texts), {}
    if recipe.reward:
        reward = build_reward(recipe.reward, device)
        scored = reward.score(prompts, texts, columns, update=False, messages=messages)
        components = scored.components
        scores = [None if s != s else float(s) for s in scored.total.tolist()]  # NaN: no reward scored it
    rows = [
        {
            "prompt": p,
            "completion": c,
            "reward": s,
            **{k: None if v[i] != v[i] else float(v[i]) for k, v in components.items()},
        }
        for i, (p, c, s) in enumerate(zip(prompts, texts, scores))
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = Table(title=f"{policy_path}: {len(rows)} samples on {label}")
    for column in ("prompt", "completion", "reward"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["prompt"], r["completion"], "-" if r["reward"] is None else f"{r['reward']:.3f}")
    Console().print(table)
    print(f"align sample: {len(rows)} samples written to {out}")
    return 0
