"""``align compare`` with direct alignment: offline objectives trained from the SFT policy on one
preference set the study builds from the task (two SFT samples per prompt, labelled by the gold
plus a length bonus), scored like the online runs; the length-drift verdict carries its numbers.
The same study puts its online run on a staleness axis (the axis itself: test_compare_staleness.py)."""

from __future__ import annotations

import json

import pytest
import yaml

from align.config import RecipeError, validate
from align.jobs.compare.config import CompareRecipe, load_study, run_recipe
from align.jobs.compare.preferences import order_pairs
from align.jobs.compare.report import length_drift_claim
from align.jobs.compare.study import run_study


def direct_compare(model_dir, data: dict, out) -> dict:
    return {
        "out": str(out),
        "seeds": [0],
        "threads": 1,
        "reward": [{"name": "sentiment"}],
        "samples_per_step": 8,
        "preferences": {"prompts": 12, "length_bonus": 1.0, "seed": 3},
        # the online run on the staleness axis too (tests/jobs/test_compare_staleness.py): one study
        "staleness": {"max_staleness": [0, 2], "corrections": ["sequence_mask"]},
        "base": {
            "model": {"path": str(model_dir)},
            "data": {"train": str(data["prompts"]), "eval_prompts": str(data["eval_prompts"])},
            "generation": {"max_new_tokens": 6},
            "train": {"steps": 2, "lr": 1e-3},
        },
        "objectives": [
            {"name": "dpo", "beta": 0.1, "label": "dpo"},
            {"name": "dpo", "beta": 1.0, "average_logprobs": True, "label": "dpo_avg"},
            {"name": "rloo", "k": 2, "beta": 0.05},
        ],
        "eval": {"every": 1, "n_prompts": 4},
    }


def test_labels_are_gold_plus_the_length_bonus_by_hand() -> None:
    prompts = ["p0", "p1", "p2", "p3"]
    texts = ["short", "a longer one", "x", "yy", "same", "same", "good", "bad"]
    lengths = [2, 6, 1, 2, 3, 3, 4, 4]
    gold = [0.5, 0.0, 0.0, 0.0, 0.1, 0.2, 0.3, -0.3]
    rows, stats = order_pairs(prompts, texts, lengths, gold, length_bonus=1.0, budget=8)
    # p0: 0.5 + 2/8 = 0.75 < 0.0 + 6/8 = 0.75? equal -> dropped; p1: 1/8 < 2/8 -> "yy"
    # p2: identical texts -> dropped; p3: equal lengths, gold decides -> "good"
    assert rows == [
        {"prompt": "p1", "chosen": "yy", "rejected": "x"},
        {"prompt": "p3", "chosen": "good", "rejected": "bad"},
    ]
    assert stats["pairs"] == 2 and stats["dropped"] == 2
    assert stats["chosen_longer_fraction"] == 0.5 and stats["gold_agrees_fraction"] == 0.5
    rows, stats = order_pairs(prompts[:1], texts[:2], lengths[:2], gold[:2], length_bonus=2.0, budget=8)
    assert rows[0]["chosen"] == "a longer one" and stats["gold_agrees_fraction"] == 0.0


def summary(name: str, average: bool, kl: list[float], length: list[float], gold: list[float]) -> dict:
    options = {"average_logprobs": True} if average else {}
    return {
        "objective": {"name": name, "options": options},
        "online": False,
        "kl": kl,
        "length": length,
        "gold": gold,
        "final": {"length": length[-1]},
    }


def test_the_verdict_reads_each_family_at_its_matched_kl() -> None:
    objectives = {
        "dpo": summary("dpo", False, [0.0, 1.0, 2.0], [10.0, 14.0, 18.0], [0.0, 0.2, 0.3]),
        # the averaged run moves further in KL but less in length at KL 2 (14 vs 18)
        "dpo_avg": summary("dpo", True, [0.0, 2.0, 4.0], [10.0, 14.0, 30.0], [0.0, 0.3, 0.1]),
    }
    claim = length_drift_claim(objectives, {"length": 10.0})
    assert claim["reproduces"] is True
    assert "dpo: length +8.00 summed vs +4.00 averaged tokens at KL 2.000" in claim["line"]
    objectives["dpo_avg"]["length"] = [10.0, 20.0, 30.0]
    assert length_drift_claim(objectives, {"length": 10.0})["reproduces"] is False
    assert length_drift_claim({"dpo": objectives["dpo"]}, {"length": 10.0})["reproduces"] is None


def test_offline_objectives_train_on_the_built_set_and_the_report_judges_them(
    tiny_model_dir, tiny_data_files, tmp_path
) -> None:
    out = tmp_path / "study"
    study = validate(CompareRecipe, direct_compare(tiny_model_dir, tiny_data_files, out))
    report = run_study(study, progress=False)
    pairs = [json.loads(line) for line in (out / "preferences" / "pairs.jsonl").read_text().splitlines()]
    unpaired = [json.loads(line) for line in (out / "preferences" / "unpaired.jsonl").read_text().splitlines()]
    stats = json.loads((out / "preferences" / "stats.json").read_text())
    assert len(pairs) == stats["pairs"] == report["preferences"]["pairs"] and 0 < len(pairs) <= 12
    assert stats["pairs"] + stats["dropped"] == 12
    assert len(unpaired) == 2 * len(pairs) and [r["label"] for r in unpaired[:2]] == [True, False]
    assert all(p["chosen"] != p["rejected"] and p["chosen"].strip() for p in pairs)
    for name in ("dpo", "dpo_avg"):
        spec = next(s for s in study.objectives if s.run_name == name)
        recipe = run_recipe(study, spec, 0)
        assert recipe.data.train == str(out / "preferences" / "pairs.jsonl") and recipe.train.batch_size == 4
        o = report["objectives"][name]
        assert not o["online"] and o["prompts_per_step"] == 4 and o["steps"] == [0, 1, 2]
        metrics = [json.loads(x) for x in (out / "runs" / name / "seed0" / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 2 and all("rewards/margins" in m for m in metrics)
    # the staleness axis expands the online entry only: N = 0 uncorrected, N = 2 corrected
    assert [o.run_name for o in study.objectives] == [
        "dpo",
        "dpo_avg",
        "rloo_beta0.05_s0",
        "rloo_beta0.05_s2_sequence_mask",
    ]
    corrected = run_recipe(study, study.objectives[-1], 0)
    assert corrected.train.async_.max_staleness == 2 and corrected.sampler_correction().mode == "sequence_mask"
    assert run_recipe(study, study.objectives[2], 0).sampler_correction() is None
    for name in ("rloo_beta0.05_s0", "rloo_beta0.05_s2_sequence_mask"):
        records = [json.loads(x) for x in (out / "runs" / name / "seed0" / "metrics.jsonl").read_text().splitlines()]
        assert [r["staleness"] for r in records] == ([0.0, 1.0] if "_s2" in name else [0.0, 0.0])
        assert ("is_ratio_mean" in records[-1]) == name.endswith("sequence_mask")
        assert report["objectives"][name]["online"]
    table = report["staleness"]
    assert set(table) == {"rloo"} and [r["staleness"] for r in table["rloo"]["runs"].values()] == [0, 2]
    stale = next(c for c in report["claims"] if c["claim"].startswith("CoPG: on samples N steps stale"))
    assert stale["reproduces"] is None and "not measured" in stale["line"]  # no copg run here
    assert "What staleness cost" in (out / "report.md").read_text()
    claim = next(c for c in report["claims"] if c["claim"].startswith("Averaging log-likelihoods"))
    assert claim["reproduces"] in (True, False) and "dpo: length" in claim["line"]
    assert "preference pairs of SFT samples" in (out / "report.md").read_text()


def test_offline_objectives_need_a_preference_set(tiny_model_dir, tiny_data_files, tmp_path) -> None:
    raw = direct_compare(tiny_model_dir, tiny_data_files, tmp_path / "out")
    raw.pop("preferences")
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError) as err:
        load_study(path)
    message = str(err.value)
    assert "objectives: ['dpo', 'dpo'] train on a fixed dataset" in message and "add a preferences section" in message
    assert "\n" not in message
