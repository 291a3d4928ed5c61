"""Online DPO step 0, align against TRL on the same batch: the loss and every parameter's gradient.

    .venv/bin/python benchmarks/step0_online_dpo.py [--model NAME ...] [--tolerance REL]

For each model (default: llama_small, qwen2_small; GPT-2's learned positions would see TRL's
position ids shifted by left padding, see step0_rloo.py) and each loss_type (sigmoid, ipo): the
benchmark's first 4 prompts, two completions each (token ids drawn once, uneven lengths), rewards
that order some pairs each way and tie one (TRL keeps a tie with the first sample chosen: align's
``ties: first``). align computes the loss through its own log-prob path (``completion_logprobs``,
the trainer's) and ``losses.build("online_dpo")``; TRL's OnlineDPOTrainer runs one
``training_step`` on the same weights with its generation replaced by these ids
(``_trl_online_dpo_worker.py``, TRL's venv). Both at temperature 1 (TRL scores at 1 whatever it
samples at). Weights in float64 by default, so what differs is the two implementations' maths, not
the summation order (align's fused head still forms log-probs in fp32: ~1e-7 relative remains;
``--dtype float32``: ~1e-6). Prints the loss difference and the largest gradient difference
relative to the largest gradient entry; exits 1 above ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import TRL_PYTHON, ensure_assets, run_json  # noqa: E402

PROMPTS = 4
NEW_TOKENS = 6
BETA = 0.1


def make_batch(tokenizer, prompts: list[str]) -> dict:
    """TRL's layout: rows 0..P−1 the first sample of each prompt, P..2P−1 the second."""
    import torch

    g = torch.Generator().manual_seed(0)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"][:12] for p in prompts] * 2
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids = [[pad] * (width - len(ids)) + ids for ids in encoded]
    prompt_mask = [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded]
    lengths = [NEW_TOKENS, 3, 5, NEW_TOKENS, 2, NEW_TOKENS, 4, 1]
    completion_ids, completion_mask = [], []
    for n in lengths:
        ids = torch.randint(10, len(tokenizer) - 10, (n,), generator=g).tolist()
        completion_ids.append(ids + [pad] * (NEW_TOKENS - n))
        completion_mask.append([1] * n + [0] * (NEW_TOKENS - n))
    # pairs (i, i+P): second better, first better, a tie (TRL: first chosen), first better
    rewards = [0.1, 0.7, 0.4, 0.9, 0.5, 0.2, 0.4, -0.3]
    return {
        "prompts": prompts,
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "rewards": rewards,
    }


def align_side(spec: dict) -> tuple[float, dict]:
    import torch
    from transformers import AutoModelForCausalLM

    import losses
    from align.logprobs import completion_logprobs

    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"]))
    ref = AutoModelForCausalLM.from_pretrained(spec["ref"], dtype=getattr(torch, spec["dtype"]))
    ids = {k: torch.tensor(spec[k]) for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    args = (ids["prompt_ids"], ids["prompt_mask"], ids["completion_ids"], ids["completion_mask"], 1.0)
    logprobs = completion_logprobs(policy, *args)
    with torch.no_grad():
        ref_logprobs = completion_logprobs(ref, *args)
    P = len(spec["prompts"])
    batch = losses.LossBatch(
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        mask=ids["completion_mask"].float(),
        rewards=torch.tensor(spec["rewards"]),
        group=torch.arange(2 * P) % P,
    )
    objective = losses.build("online_dpo", beta=spec["beta"], loss_type=spec["loss_type"], ties="first")
    loss, _ = objective(batch)
    loss.backward()
    return float(loss), {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}


def compare(model: str, loss_type: str, dtype: str, paths: dict, workdir: Path) -> dict:
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths[model])
    prompts = [json.loads(line)["prompt"] for line in Path(paths["prompts"]).read_text().splitlines()[:PROMPTS]]
    spec = {
        "model": str(paths[model]),
        "ref": str(paths[f"{model}_ref"]),
        "beta": BETA,
        "loss_type": loss_type,
        "dtype": dtype,
    }
    spec.update(make_batch(tokenizer, prompts))
    batch_path, out_path = workdir / f"{model}_{loss_type}.json", workdir / f"{model}_{loss_type}.pt"
    batch_path.write_text(json.dumps(spec))
    run_json([TRL_PYTHON, str(Path(__file__).parent / "_trl_online_dpo_worker.py"), str(batch_path), str(out_path)])
    trl = torch.load(out_path)
    loss, grads = align_side(spec)
    assert grads.keys() == trl["grads"].keys(), "the two sides trained different parameters"
    scale = max(float(g.abs().max()) for g in grads.values())
    diff = max(float((grads[n] - trl["grads"][n]).abs().max()) for n in grads)
    return {"loss_align": loss, "loss_trl": trl["loss"], "loss_diff": abs(loss - trl["loss"]), "grad_rel": diff / scale}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="benchmark model (default: llama_small, qwen2_small)")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument(
        "--dtype",
        default="float64",
        choices=["float64", "float32"],
        help="both sides' weights (float64: what differs is the maths, not the summation order)",
    )
    args = parser.parse_args()
    paths = ensure_assets()
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.model or ["llama_small", "qwen2_small"]:
            for loss_type in ("sigmoid", "ipo"):
                r = compare(model, loss_type, args.dtype, paths, Path(tmp))
                worst = max(worst, r["loss_diff"] / max(abs(r["loss_trl"]), 1e-12), r["grad_rel"])
                print(
                    f"{model:12s} {loss_type:8s} loss align {r['loss_align']:.8f} trl {r['loss_trl']:.8f} "
                    f"|Δ| {r['loss_diff']:.2e}  max |Δgrad| / max |grad| {r['grad_rel']:.2e}"
                )
    ok = worst <= args.tolerance
    print(f"{'all within' if ok else 'OUTSIDE'} {args.tolerance:g} (worst {worst:.2e})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
