"""``align --help`` and each command's ``--help`` say what every command takes and point at the
recipe schema; ``align schema`` lists every recipe field from the validating models."""

from __future__ import annotations

import pytest

from align import cli
from align.jobs.schema import field_rows, recipe_schema
from align.recipe import Recipe


def test_top_level_help_lists_every_command_and_the_schema(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for name, (_, help_text, _) in cli.COMMANDS.items():
        assert name in text and help_text.split()[0] in text
    assert "align schema" in text


@pytest.mark.parametrize("command", ["train", "sft", "sample", "rm", "overopt"])
def test_command_help_points_at_the_recipe_schema(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "RECIPE" in text and "align schema" in text
    assert "OVERRIDES" in text


def test_schema_lists_every_field_and_refuses_an_unknown_section(capsys):
    keys = [row[0] for row in field_rows(Recipe)]
    for key in ("data.system_prompt", "data.chat_template_kwargs", "data.eval_fraction", "train.steps", "output.dir"):
        assert key in keys
    assert {k.split(".")[0] for k in keys} >= set(Recipe.model_fields)
    assert cli.main(["schema", "generation"]) == 0
    assert "max_new_tokens" in capsys.readouterr().out
    assert cli.main(["schema", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no train recipe section 'nope'" in err[0]


@pytest.mark.parametrize(
    "job,keys",
    [
        ("train", ("objective.beta", "generation.max_new_tokens")),
        ("rm", ("model", "train.epochs")),
        ("compare", ("samples_per_step", "objectives.label", "objectives.train")),
        ("overopt", ("proxy.pairs", "bon.n", "objectives.beta")),
        ("bandit", ("sampler", "objectives.data", "objectives.beta", "sequence.vocab_size")),
    ],
)
def test_schema_covers_every_jobs_recipe(job, keys, capsys):
    """Each job's recipe fields, read from the model it is validated with; a second word narrows
    to a section, and the objective entry's fields are the same in every kind."""
    assert cli.main(["schema", job]) == 0
    out = capsys.readouterr().out
    assert f"{job} recipe fields" in out
    rows = [row[0] for row in field_rows(recipe_schema(job))]
    assert set(keys) <= set(rows)
    top = rows[-1].split(".")[0]  # the last section: shown alone, without the first field
    assert cli.main(["schema", job, top]) == 0
    narrowed = capsys.readouterr().out
    shown = [line.split("  ")[0] for line in narrowed.splitlines()[1:]]  # piped: a plain line a field
    assert top in shown and rows[0] not in shown
    assert cli.main(["schema", job, "nope"]) == 2
    assert f"no {job} recipe section 'nope'" in capsys.readouterr().err


def test_schema_refuses_an_unknown_job_with_one_line(capsys):
    assert cli.main(["schema", "nope", "model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no job 'nope'" in err[0] and "bandit" in err[0]


def test_a_finished_command_leaves_the_process_group_and_a_failed_one_does_not(tmp_path, capsys):
    """Gloo's threads left to interpreter exit can abort a finished multi-process run (SIGABRT):
    a command that succeeded destroys the process group; one that failed leaves it (another rank
    may still be inside a collective)."""
    import torch.distributed as dist

    init = f"file://{tmp_path / 'rendezvous'}"
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        assert cli.main(["schema", "nope"]) == 2
        assert dist.is_initialized()
        assert cli.main(["schema", "generation"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    capsys.readouterr()


def test_schema_lists_every_objectives_and_rewards_options_plainly_when_piped(capsys):
    """``align schema objective.options`` / ``reward.options``: each registered objective's and
    reward's options with their defaults, read from their constructors; piped, one plain line a field."""
    import losses
    import rewards

    assert cli.main(["schema", "objective.options"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "objective.options.clip_high  float  0.2  (grpo)" in lines
    assert all(f"objective {name}  section" in "\n".join(lines) for name in losses.REGISTRY)
    assert cli.main(["schema", "reward.options"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "reward.options.target  (required)  (length)" in lines
    assert all(any(line.startswith(f"reward {name}  section") for line in lines) for name in rewards.REGISTRY)
    assert cli.main(["schema", "generation"]) == 0
    assert "generation.max_new_tokens  int  32" in capsys.readouterr().out.splitlines()
