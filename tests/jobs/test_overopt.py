"""``align overopt``: the maths (Gao fits, best-of-n KL, KL estimators against an exact sequence KL)
and the report of a real two-checkpoint study on the tiny model."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from align import cli
from align.config import validate
from align.evaluation import evaluate_policy
from align.jobs.overopt.metrics import (
    bon_kl,
    distinct_n,
    divergence,
    fit_gao_bon,
    fit_gao_rl,
    gao_bon,
    gao_rl,
    histogram_kl,
)
from align.jobs.overopt.report import summarize_objective
from align.jobs.overopt.study import OveroptRecipe, best_of_n, load_policy, run_recipe, run_study
from align.recipe import Recipe

# --------------------------------------------------------------------------------------------
# maths


def test_gao_rl_fit_recovers_alpha_gamma():
    d = np.linspace(0.0, 6.0, 25)
    exact = gao_rl(d, 1.3, 0.45)
    fit = fit_gao_rl(d, exact)
    assert fit["alpha"] == pytest.approx(1.3, abs=1e-9)
    assert fit["gamma"] == pytest.approx(0.45, abs=1e-9)
    # the peak of d(α − γ log d): derivative α − γ(log d + 1) = 0
    assert fit["d_peak"] == pytest.approx(math.exp(1.3 / 0.45 - 1))
    assert fit["gold_peak"] == pytest.approx(float(gao_rl([fit["d_peak"]], 1.3, 0.45)[0]))
    noisy = exact + np.random.default_rng(0).normal(0, 0.01, d.shape)
    fit = fit_gao_rl(d, noisy)
    assert fit["alpha"] == pytest.approx(1.3, abs=0.03) and fit["gamma"] == pytest.approx(0.45, abs=0.02)


def test_gao_bon_fit_recovers_alpha_gamma():
    d = np.sqrt([bon_kl(n) for n in (1, 2, 4, 8, 16, 32, 64, 128)])
    fit = fit_gao_bon(d, gao_bon(d, 0.8, 0.12))
    assert fit["alpha"] == pytest.approx(0.8, abs=1e-9) and fit["gamma"] == pytest.approx(0.12, abs=1e-9)
    assert fit["d_peak"] == pytest.approx(0.8 / 0.24)


def test_bon_kl_formula_matches_exact_best_of_n():
    """Best-of-n over a fine uniform grid of M distinct rewards: P(i) = (i/M)^n − ((i−1)/M)^n exactly;
    its KL to the uniform π_ref tends to log n − (n−1)/n as M grows."""
    M = 200_000
    i = np.arange(1, M + 1, dtype=float)
    for n in (1, 2, 4, 16, 64):
        p = (i / M) ** n - ((i - 1) / M) ** n
        exact = float(np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0) * M), 0.0)))
        assert bon_kl(n) == pytest.approx(exact, abs=2e-3), n
    assert bon_kl(1) == 0.0
    with pytest.raises(ValueError):
        bon_kl(0)


def test_best_of_n_selects_by_proxy_reports_gold():
    proxy = [[0.1, 0.9, 0.5, 0.2]]
    gold = [[1.0, -1.0, 2.0, 3.0]]
    out = best_of_n([1, 2, 4], proxy, gold)
    assert out["gold"] == [pytest.approx(1.25), pytest.approx((-1.0 + 2.0) / 2), -1.0]
    assert out["proxy"] == [pytest.approx(0.425), pytest.approx(0.7), 0.9]
    assert out["kl"] == [bon_kl(1), bon_kl(2), bon_kl(4)]


def test_distinct_n_and_divergence():
    assert distinct_n(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    assert distinct_n([""], 2) == 0.0
    assert divergence([0.0, 0.5, 0.8, 0.6, 0.3], [0.0, 1.0, 2.0, 3.0, 4.0]) == 2
    assert divergence([0.0, 0.5, 0.8, 0.9, 1.0], [0.0, 1.0, 2.0, 3.0, 4.0]) is None  # gold keeps rising
    assert divergence([0.0, 0.5, 0.8, 0.6, 0.3], [0.0, 1.0, 2.0, 1.5, 1.0]) is None  # proxy falls too


def test_histogram_kl():
    rng = np.random.default_rng(0)
    same = histogram_kl(rng.normal(0, 1, 4000), rng.normal(0, 1, 4000))
    shifted = histogram_kl(rng.normal(0, 1, 4000), rng.normal(2, 1, 4000))
    assert 0 <= same < 0.02 and shifted > 1.0  # N(0,1) vs N(2,1): KL = 2, binned a little less
    assert histogram_kl([1.0, 2.0, 2.0], [2.0, 1.0, 2.0]) == pytest.approx(0.0)  # same scores, any order
    assert histogram_kl([3.0], [3.0]) == pytest.approx(0.0)  # a single value: one bin


def test_summary_of_a_synthetic_rise_and_fall():
    d = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    per_seed = {}
    for seed, shift in ((0, 0.0), (1, 0.02), (2, -0.02)):
        gold = -0.5 + gao_rl(d, 0.6, 0.45) + shift
        per_seed[seed] = [
            {
                "step": 10 * c,
                "kl": float(d[c] ** 2),
                "kl_k3": float(d[c] ** 2),
                "gold": float(gold[c]),
                "proxy": float(c),
            }
            for c in range(5)
        ]
    out = summarize_objective(per_seed, {"name": "rloo", "beta": 0.01})
    assert out["steps"] == [0, 10, 20, 30, 40]
    assert out["kl"] == pytest.approx((d**2).tolist())
    assert out["gold"] == pytest.approx((-0.5 + gao_rl(d, 0.6, 0.45)).tolist())
    assert out["peak_gold"] == max(out["gold"]) and out["peak_step"] == 10 * int(np.argmax(out["gold"]))
    assert out["final_gold"] == out["gold"][-1] and out["final_proxy"] == 4.0 and out["final_kl"] == 16.0
    assert out["gao_fit"]["alpha"] == pytest.approx(0.6, abs=1e-6)
    assert out["gao_fit"]["gamma"] == pytest.approx(0.45, abs=1e-6)
    assert out["divergence"]["step"] == out["peak_step"] and out["overoptimized"]


def test_fluency_reward_is_the_mean_token_loglik_under_the_model(tiny_model_dir):
    """rewards/fluency.py against the trainer's own log-probs (align/logprobs.py), EOS included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rewards
    from align.logprobs import completion_logprobs

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts, completions = ["the plot", "i thought the", "the cast"], [" was great .", " music was dull", ""]
    mean = rewards.build("fluency", model=str(tiny_model_dir), batch_size=2)(prompts, completions)
    total = rewards.build("fluency", model=str(tiny_model_dir), reduction="sum")(prompts, completions)
    for prompt, completion, got_mean, got_sum in zip(prompts, completions, mean, total):
        context = torch.tensor([tokenizer(prompt)["input_ids"]])
        target = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        target = torch.tensor([target])
        with torch.no_grad():
            logp = completion_logprobs(model, context, torch.ones_like(context), target, torch.ones_like(target))
        assert got_sum == pytest.approx(float(logp.sum()), abs=1e-4)
        assert got_mean == pytest.approx(float(logp.mean()), abs=1e-5)


# --------------------------------------------------------------------------------------------
# KL estimators against the exact sequence KL


def _next_token_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].float().log_softmax(-1)


@torch.no_grad()
def exact_sequence_kl(policy, reference, prompt_ids: list[int], eos: int) -> dict[str, float]:
    """KL(π‖π_ref) over all completions of at most 2 tokens (a completion ends at EOS), and the exact
    second moments of the k1 and k3 sequence sums (for the Monte-Carlo tolerance)."""
    prompt = torch.tensor([prompt_ids])
    lp1, lq1 = _next_token_logprobs(policy, prompt)[0], _next_token_logprobs(reference, prompt)[0]
    V = lp1.shape[0]
    seconds = torch.cat([prompt.repeat(V, 1), torch.arange(V)[:, None]], dim=1)
    lp2, lq2 = _next_token_logprobs(policy, seconds), _next_token_logprobs(reference, seconds)  # [V, V]
    p1 = lp1.exp().double()
    d1 = (lp1 - lq1).double()
    d2 = (lp2 - lq2).double()
    p2 = lp2.exp().double()
    k3 = lambda d: torch.expm1(-d) + d  # noqa: E731
    stops = torch.zeros(V, dtype=torch.bool)
    stops[eos] = True
    # sequences y1 = EOS have one token; every other y1 is followed by one more token
    k1_seq = torch.where(stops[:, None], d1[:, None], d1[:, None] + d2)  # [V, V]
    k3_seq = torch.where(stops[:, None], k3(d1)[:, None], k3(d1)[:, None] + k3(d2))
    weight = torch.where(stops[:, None], p1[:, None] * (torch.arange(V) == 0)[None, :], p1[:, None] * p2)
    return {
        "kl": float((weight * k1_seq).sum()),
        "k1_second_moment": float((weight * k1_seq**2).sum()),
        "k3_second_moment": float((weight * k3_seq**2).sum()),
        "kl_k3_expectation": float((weight * k3_seq).sum()),
        "mass": float(weight.sum()),
    }


def test_kl_estimators_match_exact_sequence_kl(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.models import Models

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    prompt = "the plot"
    exact = exact_sequence_kl(policy, reference, tokenizer(prompt)["input_ids"], tokenizer.eos_token_id)
    assert exact["mass"] == pytest.approx(1.0, abs=1e-6)
    assert exact["kl_k3_expectation"] == pytest.approx(exact["kl"], rel=1e-6)  # both unbiased, exactly
    assert exact["kl"] > 0.2

    recipe = validate(Recipe, _minimal(tiny_model_dir))  # evaluate_policy reads generation, data, seed
    models = Models(policy, reference, tokenizer, tokenizer.eos_token_id, tokenizer.pad_token_id)
    n = 4000
    out = evaluate_policy(recipe, models, policy, [prompt] * n, None, torch.device("cpu"))
    for key, second in (("kl_k1", "k1_second_moment"), ("kl_k3", "k3_second_moment")):
        se = math.sqrt((exact[second] - exact["kl"] ** 2) / n)
        assert 5 * se < 0.25 * exact["kl"]  # the check can tell a wrong estimator from noise
        assert abs(out[key] - exact["kl"]) < 5 * se, (key, out[key], exact["kl"], se)


def _minimal(model_dir) -> dict:
    return {
        "model": {"path": str(model_dir)},
        "data": {"train": "unused.jsonl"},
        "objective": {"name": "sft"},
        "generation": {"max_new_tokens": 2},
        "train": {"seed": 0},
    }


# --------------------------------------------------------------------------------------------
# a real (tiny) study: two checkpoints per run


def tiny_study(model_dir: Path, data: dict[str, Path], out: Path) -> dict:
    return {
        "description": "tiny",
        "out": str(out),
        "seeds": [0, 1],
        "threads": 1,
        "keep_checkpoints": True,
        "gold": [
            {"name": "sentiment"},
            {"name": "fluency", "weight": 0.5, "options": {"model": str(model_dir)}},
        ],
        "proxy": {"pairs": 24, "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "device": "cpu"}},
        "base": {
            "model": {"path": str(model_dir)},
            "data": {"train": str(data["demos"]), "eval_prompts": str(data["eval_prompts"])},
            "generation": {"max_new_tokens": 6},
            "train": {"steps": 2, "batch_size": 4, "lr": 1e-3},
        },
        "objectives": [{"name": "rloo", "k": 2, "beta": 0.01}, {"name": "rcfd", "k": 2, "beta": 0.0}],
        "eval": {"every": 1, "n_prompts": 6},
        "bon": {"n": [1, 2], "n_prompts": 4},
    }


@pytest.fixture(scope="module")
def study_run(tiny_model_dir, tiny_data_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("overopt")
    study = validate(OveroptRecipe, tiny_study(tiny_model_dir, tiny_data_files, out))
    report = run_study(study, progress=False)
    return study, report, out


def test_report_has_documented_keys_and_consistent_numbers(study_run):
    study, report, out = study_run
    saved = json.loads((out / "report.json").read_text())
    assert saved["objectives"].keys() == {"rloo_beta0.01", "rcfd_beta0"}
    for name, obj in saved["objectives"].items():
        for key in ("kl", "gold", "proxy", "peak_gold", "final_gold", "final_proxy", "final_kl", "gao_fit", "std"):
            assert key in obj, (name, key)
        assert obj["steps"] == [0, 1, 2]
        assert len(obj["kl"]) == len(obj["gold"]) == len(obj["proxy"]) == 3
        assert obj["kl"][0] == 0.0  # step 0 is the reference itself
        assert obj["final_gold"] == obj["gold"][-1] and obj["final_proxy"] == obj["proxy"][-1]
        assert obj["final_kl"] == obj["kl"][-1] and obj["peak_gold"] == max(obj["gold"])
        for key in ("kl", "gold", "proxy"):  # curves are the means of each seed's evaluation records
            records = {
                seed: json.loads((out / "runs" / name / f"seed{seed}" / "eval.json").read_text())["records"]
                for seed in (0, 1)
            }
            per_seed = [[r[key] for r in records[seed]] for seed in (0, 1)]
            assert obj[key] == pytest.approx(np.mean(per_seed, axis=0).tolist())
            assert obj["per_seed"]["0"][key] == pytest.approx(per_seed[0])
    # step 0 is the same initial policy for every objective
    assert saved["objectives"]["rloo_beta0.01"]["per_seed"]["1"]["gold"][0] == pytest.approx(
        saved["objectives"]["rcfd_beta0"]["per_seed"]["1"]["gold"][0]
    )
    bon = saved["best_of_n"]
    assert bon["n"] == [1, 2] and bon["kl"] == pytest.approx([0.0, math.log(2) - 0.5])
    assert saved["proxy"]["pairs"] > 0 and "findings" in saved
    assert "proxy_hist_kl" in saved["objectives"]["rcfd_beta0"]["final"]  # the data has demonstrations
    for file in ("report.md", "gold_proxy_vs_kl.png", "curves_vs_step.png"):
        assert (out / file).is_file()
    assert "rloo_beta0.01" in (out / "report.md").read_text()


def test_report_numbers_match_an_independent_evaluation(study_run):
    """Re-score the last checkpoint of one run from scratch: the report's gold and KL are those numbers."""
    import rewards
    from align.jobs.overopt.study import held_out_prompts
    from align.models import load_models

    study, report, out = study_run
    spec = study.objectives[0]
    recipe = run_recipe(study, spec, seed=1)
    models = load_models(recipe, torch.device("cpu"), need_reference=True)
    policy = load_policy(Path(recipe.output.dir) / "checkpoints" / "step-000002" / "model", recipe, "cpu")
    prompts = held_out_prompts(study, recipe, study.eval.n_prompts)
    sampled = evaluate_policy(recipe, models, policy, prompts, None, torch.device("cpu"))
    gold = rewards.build_combined([c.model_dump(exclude_none=True) for c in study.gold])
    expected = float(np.mean(gold(prompts, sampled["texts"])))
    per_seed = report["objectives"][spec.run_name]["per_seed"]["1"]
    assert per_seed["gold"][-1] == pytest.approx(expected, abs=1e-6)
    assert per_seed["kl"][-1] == pytest.approx(sampled["kl_k1"], abs=1e-5)


def test_cli_recipe_errors_exit_2(tmp_path, tiny_model_dir, tiny_data_files, capsys):
    raw = tiny_study(tiny_model_dir, tiny_data_files, tmp_path / "out")
    raw["base"]["objective"] = {"name": "rloo"}
    path = tmp_path / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["overopt", str(path)]) == 2
    assert "set by the study" in capsys.readouterr().err
    raw = tiny_study(tiny_model_dir, tiny_data_files, tmp_path / "out")
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["overopt", str(path), "objectives=[{name: rloo, beta: -1}]"]) == 2
    assert cli.main(["overopt", str(path), "objectives=[{name: dpo}]"]) == 2  # offline: not against the proxy
    assert "fixed dataset" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # errors stop before anything is written
