"""``align compare`` with a staleness axis: every objective on samples of weights N steps old
(train.async fixed), with and without the importance correction where it takes one; the report
says what each N cost in gold at matched KL and judges the CoPG claim on these runs."""

from __future__ import annotations

import json

from align.config import validate
from align.jobs.compare.config import CompareRecipe, run_recipe
from align.jobs.compare.staleness import StalenessAxis, expand, stale_claim
from align.jobs.compare.study import run_study


def test_the_axis_expands_into_one_run_per_staleness_and_correction() -> None:
    entries = expand(
        [{"name": "copg", "beta": 0.05, "k": 2}, {"name": "rloo", "beta": 0.05, "k": 2, "label": "r"}],
        StalenessAxis(max_staleness=[2, 0], corrections=["none", "token_mask"]),
    )
    labels = [e["label"] for e in entries]
    # CoPG takes no correction; N = 0 samples from the trained policy: nothing to correct
    assert labels == ["copg_beta0.05_s0", "copg_beta0.05_s2", "r_s0", "r_s2", "r_s2_token_mask"]
    assert entries[3]["train"]["async"] == {"max_staleness": 2, "mode": "fixed"}
    assert entries[3]["generation"]["importance_correction"] == {"mode": "none"}  # not the async default
    assert entries[4]["generation"]["importance_correction"] == {"mode": "token_mask"}


def test_the_claim_is_judged_on_the_uncorrected_runs_at_the_largest_staleness() -> None:
    def family(fresh: float, lagged: float) -> dict:
        runs = {"a": (0, fresh), "b": (4, lagged), "c": (4, fresh)}
        return {
            "runs": {
                k: {"staleness": n, "correction": "none" if k != "c" else "token_mask", "regularised": v}
                for k, (n, v) in runs.items()
            }
        }

    table = {"copg": family(0.5, 0.47), "rloo": family(0.5, 0.3)}  # gains from 0.1: 0.4; CoPG loses 0.03
    claim = stale_claim(table, {"reward": 0.1})
    assert claim["reproduces"] is True and "copg 0.500 at N = 0 vs 0.470 at N = 4 (within 20%" in claim["line"]
    table["rloo"] = family(0.5, 0.45)
    assert stale_claim(table, {"reward": 0.1})["reproduces"] is False
    assert stale_claim({"copg": table["copg"]}, {"reward": 0.1})["reproduces"] is None


def test_a_staleness_study_runs_and_reports_each_cost(tiny_model_dir, tiny_data_files, tmp_path) -> None:
    out = tmp_path / "study"
    raw = {
        "out": str(out),
        "seeds": [0],
        "threads": 1,
        "reward": [{"name": "length", "options": {"target": 12, "unit": "chars"}}],
        "samples_per_step": 8,
        "staleness": {"max_staleness": [0, 2], "corrections": ["sequence_mask"]},
        "base": {
            "model": {"path": str(tiny_model_dir)},
            "data": {"train": str(tiny_data_files["prompts"]), "eval_prompts": str(tiny_data_files["eval_prompts"])},
            "generation": {"max_new_tokens": 6},
            "train": {"steps": 3, "lr": 1e-3},
        },
        "objectives": [{"name": "rloo", "k": 2, "beta": 0.05}],
        "eval": {"every": 3, "n_prompts": 4},
    }
    study = validate(CompareRecipe, raw)
    names = [s.run_name for s in study.objectives]
    assert names == ["rloo_beta0.05_s0", "rloo_beta0.05_s2_sequence_mask"]  # N = 0: the uncorrected baseline
    corrected = run_recipe(study, study.objectives[-1], 0)
    assert corrected.train.async_.max_staleness == 2 and corrected.sampler_correction().mode == "sequence_mask"
    assert run_recipe(study, study.objectives[0], 0).sampler_correction() is None
    report = run_study(study, progress=False)
    for name in names:
        records = [json.loads(x) for x in (out / "runs" / name / "seed0" / "metrics.jsonl").read_text().splitlines()]
        assert [r["staleness"] for r in records] == ([0.0, 1.0, 2.0] if "_s2" in name else [0.0] * 3)
        assert ("is_ratio_mean" in records[-1]) == name.endswith("sequence_mask")
    table = report["staleness"]
    assert set(table) == {"rloo"} and [r["staleness"] for r in table["rloo"]["runs"].values()] == [0, 2]
    claim = next(c for c in report["claims"] if c["claim"].startswith("CoPG: on samples N steps stale"))
    assert claim["reproduces"] is None and "not measured" in claim["line"]  # no copg run here
    text = (out / "report.md").read_text()
    assert "What staleness cost" in text and "rloo: gold at KL" in text and "N=2 sequence_mask" in text
