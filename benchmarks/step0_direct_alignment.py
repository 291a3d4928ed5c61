"""KTO, SimPO and ORPO at step 0, align against TRL on the same batch: the loss and the gradient of
every parameter.

    .venv/bin/python benchmarks/step0_direct_alignment.py [--model NAME ...] [--tolerance REL]

For each model (default: the tiny GPT-2 and the tiny Llama of benchmarks/common.py) and each case
below, align's trainer (``align.trainer.train``) runs ONE step on a data file that is exactly one
batch -- its own data reading, tokenisation, batch path (for KTO the mismatched completions rotated
over the step, their no-grad forwards, z₀ from the whole step's statistics), log-prob forwards and
objective -- with plain SGD and no clipping, and every gradient is saved as it reaches the
optimizer. TRL (its venv, ``_trl_direct_worker.py``) builds its trainer -- CPOTrainer with
``loss_type="simpo"``, ORPOTrainer, KTOTrainer -- and runs its loss code once on the token ids align
trained on, in align's order (for KTO: align's rows with align's rotation as TRL's
``KL_completion_ids``), then backward. Printed per case: both losses, |Δloss|, and the largest
gradient differences, ‖Δg‖/‖g‖ over all parameters and max |Δg| / max |g|; exit 1 for a checked case
when |Δloss| > ``--tolerance`` (1e-6) or ‖Δg‖/‖g‖ > max(tolerance, 3 × the fp32 rounding floor).

``--dtype`` (default float64): both sides' weights and forwards (float64 copies of the models are
written for the run). In float64 TRL's loss code is exact and what is left is align's log-softmax,
which its log-prob path takes in fp32 by design. With ``--dtype float32`` the worker also runs TRL
in float64: TRL's own fp32 gradient is 2–9e-7 (‖Δ‖/‖g‖) from it on these models, the order of the
align–TRL differences, so the gradient gate allows 3× that floor; each line prints both sides'
distance to TRL's float64 result.

The cases:

* ``simpo``: the paper's SimPO (β 2, γ 1, no NLL) on the first 8 pairs of the benchmark corpus;
* ``simpo+nll``: β 2, γ 0.5, label_smoothing 0.1, cpo_alpha 0.5 -- TRL's NLL is a token mean over
  its micro-batch's chosen completions, align's a per-pair mean (losses/simpo.py), which coincide
  when every chosen completion has the same length: prompts "<s>" (one token) and completions cut
  to 4 tokens (``data.max_completion_tokens``);
* ``orpo`` (λ = 0.1) on that equal-length batch, where TRL's NLL -- a token mean over the chosen
  sequences, prompt tokens included -- coincides with the paper's per-pair form align uses (the one
  prompt token is never predicted);
* ``orpo (general)``: the same objective on the first 8 pairs, NOT checked: TRL's NLL also trains
  the prompt tokens and weighs long chosen completions more, and the printed difference is that;
* ``kto`` (β 0.1, λ_D 1, λ_U 1.5): the 8 pairs as 16 unpaired rows (chosen: label true, rejected:
  false), the reference a differently initialised twin of the policy, so r and z₀ are not 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import TRL_PYTHON, ensure_assets, run_json  # noqa: E402

PAIRS = 8
WORKER = str(Path(__file__).resolve().parent / "_trl_direct_worker.py")
DEFAULT_MODELS = ("tiny", "llama_small")
SIMPO_NLL = {"beta": 2.0, "simpo_gamma": 0.5, "label_smoothing": 0.1, "cpo_alpha": 0.5}
KTO = {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.5}
# (label, objective, options -- TRL's names, the same on both sides --, data, checked)
CASES = [
    ("simpo", "simpo", {"beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 0.0}, "pairs", True),
    ("simpo+nll", "simpo", SIMPO_NLL, "equal", True),
    ("orpo", "orpo", {"beta": 0.1}, "equal", True),
    ("orpo (general)", "orpo", {"beta": 0.1}, "pairs", False),
    ("kto", "kto", KTO, "unpaired", True),
]
EQUAL_TOKENS = 4  # completions cut to this many tokens in the "equal" batch


def write_data(pairs_file: Path, work: Path) -> dict[str, Path]:
    """The three one-batch files: the first pairs, the same with one-token prompts, the same as unpaired rows."""
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines() if line.strip()][:PAIRS]
    files = {"pairs": rows, "equal": [{**r, "prompt": "<s>"} for r in rows]}
    files["unpaired"] = [
        {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
        for r in rows
        for side in ("chosen", "rejected")
    ]
    out = {}
    for name, content in files.items():
        out[name] = work / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(row) + "\n" for row in content))
    return out


def weights_as(model: Path, dtype: str, out: Path) -> Path:
    """``model`` (with its tokenizer) saved with ``dtype`` weights under ``out``; itself for float32."""
    if dtype == "float32":
        return model
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, out / name)
    return out


def align_recipe(model: Path, data: Path, kind: str, objective: str, options: dict, reference: Path, out: Path) -> dict:
    options = dict(options)
    rows = PAIRS * 2 if kind == "unpaired" else PAIRS
    recipe = {
        "model": {"path": str(model), "dtype": "auto"},  # the weights' own dtype (--dtype)
        "data": {"train": str(data), **({"max_completion_tokens": EQUAL_TOKENS} if kind == "equal" else {})},
        "objective": {"name": objective, "beta": options.pop("beta"), "options": options},
        "train": {"steps": 1, "batch_size": rows, "optimizer": "sgd", "lr": 1e-9, "max_grad_norm": None},
        "output": {"dir": str(out), "report": False, "save_model": False, "sample_every": 0},
    }
    if objective == "kto":
        recipe["reference"] = str(reference)
    return recipe


def align_step0(raw: dict) -> tuple[dict, dict, dict]:
    """One step of align's trainer in this process: (the token ids of its batch, in the step's order;
    the gradients by parameter name; the step's logged metrics)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    import align.trainer as trainer_lib
    from align.batches import BatchLayout, local_rows
    from align.models import load_tokenizer
    from align.recipe import Recipe
    from align.run_data import OfflineData

    recipe = Recipe.model_validate(raw)
    tokenizer = load_tokenizer(recipe)
    data = OfflineData(recipe, tokenizer, tokenizer.eos_token_id)
    layout = BatchLayout(recipe.train.batch_size, seed=recipe.train.seed)
    rows = local_rows(layout, len(data), 0, 1, 0)  # the trainer's rows of step 0, in its order
    batch = {"prompt_ids": [data.prompt_ids[i] for i in rows]}
    if data.paired:
        batch.update(
            chosen_ids=[data.completion_ids[0][i] for i in rows], rejected_ids=[data.completion_ids[1][i] for i in rows]
        )
    else:
        rotated = local_rows(layout, len(data), 0, 1, 0, rotated=True)
        batch.update(
            completion_ids=[data.completion_ids[0][i] for i in rows],
            kl_completion_ids=[data.completion_ids[0][j] for j in rotated],
            labels=[data.labels[i] for i in rows],
        )
    policy, grads, metrics = {}, {}, {}
    real = trainer_lib.train_on_batch

    def capture(ctx, *args, **kwargs):
        policy["model"] = ctx.models.policy
        return real(ctx, *args, **kwargs)

    def save_grads(optimizer, args, kwargs):
        if not grads and "model" in policy:
            grads.update(
                {n: p.grad.detach().clone() for n, p in policy["model"].named_parameters() if p.grad is not None}
            )

    trainer_lib.train_on_batch = capture
    hook = register_optimizer_step_pre_hook(save_grads)
    try:
        trainer_lib.train(recipe, on_step=lambda step, record: metrics.update(record))
    finally:
        hook.remove()
        trainer_lib.train_on_batch = real
    return batch, grads, metrics


def compare(ours: dict, theirs: dict) -> tuple[float, float, str]:
    """(‖Δg‖ / ‖g‖ over all parameters flattened, max |Δg| / max |g|, the parameter of the largest |Δg|)."""
    import torch

    if set(ours) != set(theirs):
        raise SystemExit(f"the two sides' parameters differ: {sorted(set(ours) ^ set(theirs))[:6]}")
    names = sorted(ours)
    a = torch.cat([ours[n].double().flatten() for n in names])
    b = torch.cat([theirs[n].double().flatten() for n in names])
    diffs = {n: float((ours[n].double() - theirs[n].double()).abs().max()) for n in names}
    worst = max(names, key=diffs.get)
    return float((a - b).norm() / a.norm()), diffs[worst] / float(a.abs().max()), worst


def run_case(
    paths: dict, size: str, case: tuple, files: dict, work: Path, dtype: str
) -> tuple[float, float, float, str]:
    """(|Δloss|, ‖Δg‖ / ‖g‖ between align and TRL, the fp32 rounding floor -- ‖Δg‖ / ‖g‖ between TRL's
    fp32 and float64 gradients --, the lines that say it) of one case on one model."""
    import torch

    label, objective, options, kind, checked = case
    out = work / f"{size}-{label.replace(' ', '_')}"
    raw = align_recipe(paths[size], files[kind], kind, objective, options, paths[f"{size}_ref"], out / "align")
    batch, grads, metrics = align_step0(raw)
    if kind == "equal" and len({len(c) for c in batch["chosen_ids"]}) != 1:
        raise SystemExit(f"{size}: the equal-length batch has chosen completions shorter than {EQUAL_TOKENS} tokens")
    # TRL's side in the weights' dtype, and in float64: the exact value of its maths
    spec = {
        "objective": objective,
        "options": options,
        "model": str(paths[size]),
        "dtypes": list(dict.fromkeys([dtype, "float64"])),
        **batch,
    }
    if objective == "kto":
        spec["reference"] = str(paths[f"{size}_ref"])
    (out / "spec.json").write_text(json.dumps(spec))
    results, _ = run_json([TRL_PYTHON, WORKER, str(out / "spec.json"), str(out / "trl_grads.pt")])
    trl = torch.load(out / "trl_grads.pt")
    result, exact = results[dtype], results["float64"]
    rel, max_rel, worst = compare(grads, trl[dtype])
    floor = compare(trl["float64"], trl[dtype])[:2]  # TRL's own rounding: its gradient against its float64 one
    ours = compare(trl["float64"], grads)[:2]
    loss_diff = abs(metrics["loss"] - result["loss"])
    line = (
        f"{size:12s} {label:15s} loss align {metrics['loss']:.8f} TRL {result['loss']:.8f} |Δ| {loss_diff:.1e}; "
        f"gradient ‖Δ‖/‖g‖ {rel:.1e}, max |Δ| / max |g| {max_rel:.1e} (at {worst})"
    )
    if objective == "kto":
        line += f"; z0 align {metrics['kl']:.6g}, TRL {result['metrics']['kl']:.6g}"
    line += (
        ""
        if dtype == "float64"
        else f"\n{'':28s} TRL in float64: loss {exact['loss']:.8f}; {dtype} gradients against it (‖Δ‖/‖g‖, max): "
        f"TRL {floor[0]:.1e}, {floor[1]:.1e}; align {ours[0]:.1e}, {ours[1]:.1e}"
    )
    if not checked:
        line += "  [not checked: TRL's NLL trains the prompt and is a token mean]"
    return loss_diff, rel, floor[0], line


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help=f"repeatable; default: {', '.join(DEFAULT_MODELS)}")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-6,
        help="|Δloss| allowed, and ‖Δg‖/‖g‖ (or 3x TRL's own fp32-vs-float64 ‖Δg‖/‖g‖ where that is larger)",
    )
    parser.add_argument(
        "--dtype", choices=["float64", "float32"], default="float64", help="both sides' weights and forwards"
    )
    args = parser.parse_args(argv)
    assets = ensure_assets()
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = write_data(assets["pairs"], work)
        for size in args.model or DEFAULT_MODELS:
            paths = {
                name: weights_as(assets[name], args.dtype, work / f"{name}-{args.dtype}")
                for name in (size, f"{size}_ref")
            }
            for case in CASES:
                loss_diff, rel, floor, line = run_case(paths, size, case, files, work, args.dtype)
                print(line, flush=True)
                # fp32 rounding alone moves TRL's own gradient by `floor` from its float64 value
                if case[4] and not (loss_diff <= args.tolerance and rel <= max(args.tolerance, 3 * floor)):
                    failed.append(f"{size} {case[0]}")
    if failed:
        print(f"above tolerance {args.tolerance:g}: {', '.join(failed)}")
        return 1
    print(f"all checked cases within {args.tolerance:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
