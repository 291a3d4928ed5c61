"""GSPO and CISPO at step 0, align against TRL's GRPOTrainer on one fixed batch: loss and gradient.

    .venv/bin/python benchmarks/step0_policy_gradients.py [--model NAME ...] [--dtype float64|float32]
        [--tolerance REL] [--trl-kl-as-shipped]

For each model (default: ``llama_small`` and ``tiny``, a GPT-2; see common.MODELS) one batch is
fixed: 2 prompts of 6 random token ids (equal length: no left padding, so TRL's forwards, which
pass no position ids, score the same positions as align's) with k = 4 completions each of 3 to 10
random tokens (right-padded), random rewards. align computes the group-normalised advantages from
the rewards (losses/grpo.py, the same for both objectives; tests/losses/test_new_policy_gradients.py
checks them against TRL's formula) and π_old's log-probs as its own perturbed by noise, so that
π_old ≠ π_θ and the clips act (GSPO's ε is 3e-4: a noise of 2e-3 a token moves sequence ratios
out of [1 − ε_low, 1 + ε_high]; CISPO's cap 1.2 is crossed by about a fifth of the tokens under a
noise of 0.3); the reference's log-probs come from the model's ``*_ref`` twin. align's side:
``align.logprobs.completion_logprobs`` (its fused head), the objective, backward. TRL's side (its
venv, ``_trl_grpo_worker.py``): a GRPOTrainer with the matching config, its ``_compute_loss`` on
the same batch (the advantages and π_old's and the reference's log-probs given, as
``_generate_and_score_completions`` would have left them), backward. Cases:

    gspo            importance_sampling_level="sequence", loss_type="grpo", ε 3e-4 / 4e-4, β 0
    gspo_kl         the same with β = 0.04 (the k3 term per token)
    gspo_token_mean loss_type="dapo" (align's aggregation token_mean)
    cispo           loss_type="cispo", epsilon_high = 1.2 (align's clip_max), β 0
    cispo_kl        the same with β = 0.04

TRL's KL term: since TRL 1.x ``use_bias_correction_kl`` (default True) multiplies the k3 term by
the differentiable importance ratio, which changes its gradient even on-policy (to ∇KL(π ‖ π_ref));
align's k3 loss term is the unweighted one (gradient ∇KL(π_ref ‖ π) on-policy, losses/grpo.py),
TRL's with ``use_bias_correction_kl=False``, which the KL cases set. ``--trl-kl-as-shipped``
leaves TRL's default and shows that difference.

``--dtype``: both sides' weights and forwards (default float64). Either side's log-softmax over the
vocabulary runs in fp32 whatever the weights (align's fused head, TRL's chunked log-prob), which
bounds the agreement near 1e-6 of the largest gradient entry.

Prints per model and case the loss of both sides, |Δloss| and the largest gradient difference
relative to the largest gradient entry; exits 1 when either is above ``--tolerance`` (default
1e-6, issue 32's acceptance line).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MODELS, TRL_PYTHON, ensure_assets, run_json  # noqa: E402
from step0_rloo import compare  # noqa: E402

K, PROMPTS, PROMPT_TOKENS, MAX_NEW = 4, 2, 6, 10
GSPO_EPS = {"clip_low": 3e-4, "clip_high": 4e-4}
TRL_GSPO = {"importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4}
NO_KL_WEIGHT = {"use_bias_correction_kl": False}  # align's k3 term (see the module docstring)
# case: (align objective, its options, π_old's noise per token, TRL's GRPOConfig loss fields)
CASES = {
    "gspo": ("gspo", {**GSPO_EPS, "beta": 0.0}, 2e-3, {**TRL_GSPO, "loss_type": "grpo", "beta": 0.0}),
    "gspo_kl": (
        "gspo",
        {**GSPO_EPS, "beta": 0.04},
        2e-3,
        {**TRL_GSPO, "loss_type": "grpo", "beta": 0.04, **NO_KL_WEIGHT},
    ),
    "gspo_token_mean": (
        "gspo",
        {**GSPO_EPS, "beta": 0.0, "aggregation": "token_mean"},
        2e-3,
        {**TRL_GSPO, "loss_type": "dapo", "beta": 0.0},
    ),
    "cispo": ("cispo", {"clip_max": 1.2, "beta": 0.0}, 0.3, {"loss_type": "cispo", "epsilon_high": 1.2, "beta": 0.0}),
    "cispo_kl": (
        "cispo",
        {"clip_max": 1.2, "beta": 0.04},
        0.3,
        {"loss_type": "cispo", "epsilon_high": 1.2, "beta": 0.04, **NO_KL_WEIGHT},
    ),
}


def trl_fields(case: str, as_shipped: bool) -> dict:
    """The case's GRPOConfig loss fields; ``as_shipped``: TRL's own default for the KL weighting."""
    return {k: v for k, v in CASES[case][3].items() if not (as_shipped and k in NO_KL_WEIGHT)}


def fixed_batch(vocab: int, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    B = PROMPTS * K
    prompts = torch.randint(3, vocab, (PROMPTS, PROMPT_TOKENS), generator=g).repeat_interleave(K, 0)
    lengths = torch.randint(3, MAX_NEW + 1, (B,), generator=g)
    mask = (torch.arange(MAX_NEW)[None] < lengths[:, None]).long()
    completions = torch.randint(3, vocab, (B, MAX_NEW), generator=g) * mask  # padding: token 0
    return {
        "prompt_ids": prompts,
        "prompt_mask": torch.ones_like(prompts),
        "completion_ids": completions,
        "completion_mask": mask,
        "rewards": torch.randn(B, generator=g, dtype=torch.float64),
        "group": torch.arange(PROMPTS).repeat_interleave(K),
        "noise": torch.randn(B, MAX_NEW, generator=g, dtype=torch.float64),
    }


def align_side(model_dir: Path, ref_dir: Path, batch: dict, dtype: str) -> tuple[dict, dict, dict]:
    """Per case: align's loss and gradients, and the inputs TRL's _compute_loss is given."""
    import torch
    from transformers import AutoModelForCausalLM

    import losses
    from align.logprobs import completion_logprobs

    ids = [batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")]
    DTYPE = getattr(torch, dtype)
    mask = batch["completion_mask"].to(DTYPE)
    ref_model = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=DTYPE).eval()
    with torch.no_grad():
        ref = completion_logprobs(ref_model, *ids)
    results, grads, trl_inputs = {}, {}, {}
    for case, (name, options, noise, _) in CASES.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE).eval()
        logprobs = completion_logprobs(model, *ids)
        old = (logprobs.detach() + noise * batch["noise"].to(DTYPE)) * mask
        loss_batch = losses.LossBatch(
            logprobs=logprobs,
            mask=mask,
            ref_logprobs=ref,
            rewards=batch["rewards"].to(DTYPE),
            group=batch["group"],
            old_logprobs=old,
        )
        objective = losses.build(name, **options)
        loss, metrics = objective(loss_batch)
        loss.backward()
        grads[case] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[case] = {"loss": float(loss.detach()), "clip_fraction": metrics["clip_fraction"]}
        advantages = objective.advantages(loss_batch)[0]
        trl_inputs[case] = {
            "prompt_ids": batch["prompt_ids"],
            "prompt_mask": batch["prompt_mask"],
            "completion_ids": batch["completion_ids"],
            "completion_mask": batch["completion_mask"],
            "advantages": advantages,
            "old_per_token_logps": old,
            "ref_per_token_logps": ref,
            "num_items_in_batch": mask.sum(),
        }
    return results, grads, trl_inputs


def main(argv: list[str]) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", choices=sorted(MODELS), action="append", help="repeatable; default: llama_small, tiny"
    )
    parser.add_argument(
        "--dtype", choices=["float64", "float32"], default="float64", help="both models' weights and forwards"
    )
    parser.add_argument(
        "--trl-kl-as-shipped", action="store_true", help="TRL's default use_bias_correction_kl=True (see above)"
    )
    parser.add_argument("--tolerance", type=float, default=1e-6, help="max |Δloss| and max |Δgrad| / max |grad|")
    args = parser.parse_args(argv)
    paths = ensure_assets()
    failed = []
    for size in args.model or ["llama_small", "tiny"]:
        batch = fixed_batch(30_000)
        ours, align_grads, trl_inputs = align_side(paths[size], paths[f"{size}_ref"], batch, args.dtype)
        with tempfile.TemporaryDirectory() as tmp:
            spec, out = Path(tmp) / "batch.pt", Path(tmp) / "trl_grads.pt"
            cases = {
                case: {"fields": trl_fields(case, args.trl_kl_as_shipped), "batch": trl_inputs[case]} for case in CASES
            }
            torch.save({"model_dir": str(paths[size]), "k": K, "dtype": args.dtype, "cases": cases}, spec)
            worker = Path(__file__).resolve().parent / "_trl_grpo_worker.py"
            result, _ = run_json([TRL_PYTHON, str(worker), str(spec), str(out)])
            trl_grads = torch.load(out)
        for case in CASES:
            rel, cosine, worst = compare(align_grads[case], trl_grads[case])
            loss_align, loss_trl = ours[case]["loss"], result["loss"][case]
            print(
                f"{size} {case:15s} loss align {loss_align:+.9f} TRL {loss_trl:+.9f} "
                f"|Δ| {abs(loss_align - loss_trl):.1e}; max |Δgrad| / max |grad| {rel:.1e} (at {worst}), "
                f"cosine {cosine:.12f}; clipped {ours[case]['clip_fraction']:.2f}"
            )
            if not (abs(loss_align - loss_trl) <= args.tolerance and rel <= args.tolerance):
                failed.append(f"{size}/{case}")
    if failed:
        print(f"above tolerance {args.tolerance:g}: {', '.join(failed)}")
        return 1
    print(f"all within {args.tolerance:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
