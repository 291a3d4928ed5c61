"""``align compare`` on a tiny model: every objective × seed from one SFT policy with the same
samples per step; the report's curves are the runs' own evaluation records, step 0 is the SFT
policy against itself (win-rate ½, KL 0), each run's cost is measured in its own process, and the
paper-claim lines carry their numbers; bad recipes fail in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from align.config import RecipeError, validate
from align.jobs.compare.config import CompareRecipe, load_study, run_recipe
from align.jobs.compare.report import gold_at_kl
from align.jobs.compare.study import run_study, win_rate

REPLAY = {"replay": {"capacity_steps": 2, "mix": 0.0}}


def tiny_compare(model_dir: Path, data: dict[str, Path], out: Path) -> dict:
    return {
        "out": str(out),
        "seeds": [0, 1],
        "threads": 1,
        "reward": [{"name": "length", "options": {"target": 12, "unit": "chars"}}],
        "gold": [{"name": "sentiment"}],
        "samples_per_step": 8,
        "base": {
            "model": {"path": str(model_dir)},
            "data": {"train": str(data["prompts"]), "eval_prompts": str(data["eval_prompts"])},
            "generation": {"max_new_tokens": 6},
            "train": {"steps": 2, "lr": 1e-3},
        },
        "objectives": [
            {"name": "rloo", "k": 2, "beta": 0.05},
            {"name": "rloo", "k": 4, "beta": 0.05, "label": "rloo_k4"},
            {"name": "ppo", "k": 2, "beta": 0.05},
            {"name": "copg", "k": 2, "beta": 0.05, "label": "copg"},
            {"name": "copg", "k": 2, "beta": 0.05, "label": "copg_replay", "train": REPLAY},
            {"name": "rloo", "k": 2, "beta": 0.05, "label": "rloo_replay", "train": REPLAY},
        ],
        "eval": {"every": 1, "n_prompts": 6},
    }


@pytest.fixture(scope="module")
def compared(tiny_model_dir, tiny_data_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    study = validate(CompareRecipe, tiny_compare(tiny_model_dir, tiny_data_files, out))
    return study, run_study(study, progress=False), out


def test_every_run_shares_the_budget_and_the_report_is_its_records(compared):
    study, report, out = compared
    saved = json.loads((out / "report.json").read_text())
    assert saved["objectives"].keys() == {
        "rloo_beta0.05",
        "rloo_k4",
        "ppo_beta0.05",
        "copg",
        "copg_replay",
        "rloo_replay",
    }
    for name, o in saved["objectives"].items():
        assert o["prompts_per_step"] * o["k"] == 8 and o["steps"] == [0, 1, 2]
        spec = next(s for s in study.objectives if s.run_name == name)
        assert run_recipe(study, spec, 0).train.batch_size == o["prompts_per_step"]
        runs = {s: json.loads((out / "runs" / name / f"seed{s}" / "eval.json").read_text()) for s in (0, 1)}
        for key in ("gold", "kl", "win_rate", "reward"):
            per_seed = [[r[key] for r in runs[s]["records"]] for s in (0, 1)]
            assert o[key] == pytest.approx(np.mean(per_seed, axis=0).tolist())
        # step 0 is the SFT policy scored against itself: every prompt a tie, no KL
        assert o["win_rate"][0] == 0.5 and o["kl"][0] == pytest.approx(0.0, abs=1e-6)
        cost = o["cost"]
        assert cost["seconds"] > 0 and cost["tokens_per_s"] > 0 and cost["peak_rss_mib"] > 50
        assert cost["wall_seconds"] > cost["seconds"]  # the run's process start and model loading
        metrics = [
            json.loads(line) for line in (out / "runs" / name / "seed0" / "metrics.jsonl").read_text().splitlines()
        ]
        assert len(metrics) == 2 and all(m["tokens"] > 0 for m in metrics)
    assert saved["objectives"]["copg_replay"]["train"]["replay"]["capacity_steps"] == 2
    assert saved["gold_at_matched_kl"]["copg"] == pytest.approx(
        gold_at_kl(saved["objectives"]["copg"], saved["matched_kl"])
    )
    for file in ("report.md", "curves_vs_step.png", "gold_vs_kl.png"):
        assert (out / file).is_file()


def test_claims_are_judged_from_the_runs_they_name(compared):
    _, report, out = compared
    basics, copg = report["claims"]
    assert isinstance(basics["reproduces"], bool) and "rloo_k4" in basics["line"] and "ppo_beta0.05" in basics["line"]
    rloo, ppo = report["objectives"]["rloo_k4"], report["objectives"]["ppo_beta0.05"]
    kl = min(max(rloo["kl"]), max(ppo["kl"]))
    holds = gold_at_kl(rloo, kl) >= gold_at_kl(ppo, kl) and rloo["cost"]["seconds"] < ppo["cost"]["seconds"]
    assert basics["reproduces"] == holds and f"{kl:.3f}" in basics["line"]
    assert isinstance(copg["reproduces"], bool)
    for name in ("copg", "copg_replay", "rloo_beta0.05", "rloo_replay"):
        assert f"{report['objectives'][name]['regularised']:.3f}" in copg["line"]
    md = (out / "report.md").read_text()
    assert basics["line"] in md and copg["line"] in md


def test_win_rate_and_the_frontier_by_hand():
    assert win_rate([1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.5, 0.1]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    curve = {"kl": [0.0, 2.0, 1.0], "gold": [0.0, 1.0, 0.8]}  # checkpoints out of KL order
    assert gold_at_kl(curve, 1.5) == pytest.approx(0.9) and gold_at_kl(curve, 0.5) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"samples_per_step": 6}, "samples_per_step: 6 is not a multiple of rloo_k4's k = 4"),
        (
            {"base": {"model": {"path": "m"}, "data": {"train": "d"}, "train": {"batch_size": 4}}},
            "base.train.batch_size",
        ),
        ({"objectives": [{"name": "dpo"}]}, "objectives: ['dpo'] train on a fixed dataset"),
        (
            {"base": {"model": {"path": "m"}, "data": {"train": "d"}, "reward": []}},
            "base: ['reward'] are set by the study",
        ),
    ],
)
def test_bad_recipes_fail_in_one_line(change, message, tiny_model_dir, tiny_data_files, tmp_path):
    import yaml

    raw = {**tiny_compare(tiny_model_dir, tiny_data_files, tmp_path / "out"), **change}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError) as err:
        load_study(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_missing_data_file_is_one_line_before_any_run_starts(tiny_model_dir, tiny_data_files, tmp_path):
    """base.data.train that does not exist: `align compare` says so in one line (exit 2) before
    any run is launched or the study directory is made -- not a failed child's traceback."""
    import subprocess
    import sys

    import yaml

    raw = tiny_compare(tiny_model_dir, tiny_data_files, tmp_path / "out")
    raw["base"]["data"]["train"] = str(tmp_path / "missing.jsonl")
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "align.cli", "compare", str(path)], capture_output=True, text=True)
    err = out.stderr.strip()
    assert out.returncode == 2 and len(err.splitlines()) == 1, err[-1500:]
    assert f"data '{tmp_path / 'missing.jsonl'}': no such file" in err and not (tmp_path / "out").exists()


def test_a_study_directory_is_replaced_only_when_told(tiny_model_dir, tiny_data_files, tmp_path, capsys):
    """`align compare` into a directory another study made: refused unless overwrite=true; into one
    holding anything else: refused, nothing touched; both before a run starts, one line, exit 2."""
    import yaml

    from align.cli import main
    from align.jobs.study import STUDY_MARKER

    out = tmp_path / "out"
    out.mkdir()
    (out / STUDY_MARKER).write_text("{}\n")
    (out / "report.json").write_text("{}")
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(tiny_compare(tiny_model_dir, tiny_data_files, out)))
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a study; replace it with overwrite=true" in err
    (out / STUDY_MARKER).unlink()
    assert main(["compare", str(path), "overwrite=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds report.json, which no align study wrote" in err
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
