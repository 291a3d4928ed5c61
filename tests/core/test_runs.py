"""Run directories belong to one run; logs and checkpoints survive interruptions; exit codes say
how a run ended (issue: nothing lost, nothing mixed)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_recipe, run_metrics, stop_at

from align.checkpoint import write_manifest
from align.config import RecipeError, validate
from align.recipe import Recipe
from align.trainer import train


def _cli(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align.cli", *argv], capture_output=True, text=True, **kwargs)


def _recipe_file(recipe, path: Path) -> Path:
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    return path


def test_a_second_run_into_a_finished_run_is_refused_before_models_load(tiny_model_dir, tiny_data_files, tmp_path):
    run = tmp_path / "run"
    recipe = make_recipe(tiny_model_dir, tiny_data_files, run, "sft", steps=2, batch_size=4)
    train(recipe)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    path = _recipe_file(
        recipe.model_copy(update={"model": recipe.model.model_copy(update={"path": "/nope"})}), tmp_path / "again.yaml"
    )
    out = _cli("train", str(path), timeout=120)  # a missing model: the refusal must come first
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"output.dir: {str(run)!r} already holds a run" in err
    assert "resume=latest" in err and "output.overwrite=true" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before  # nothing written


def test_overwrite_replaces_the_old_run_whole(tiny_model_dir, tiny_data_files, tmp_path):
    """Old higher-numbered checkpoints used to survive and make keep_last prune the new run's own."""
    run = tmp_path / "run"
    train(make_recipe(tiny_model_dir, tiny_data_files, run, "sft", steps=5, batch_size=4))
    recipe = make_recipe(tiny_model_dir, tiny_data_files, run, "sft", steps=2, batch_size=4)
    recipe = recipe.model_copy(update={"output": recipe.output.model_copy(update={"overwrite": True})})
    summary = train(recipe)
    assert summary["steps"] == 2
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-000002"]
    assert [r["step"] for r in run_metrics(run)] == [1, 2]


def test_overwrite_replaces_only_an_align_run(tiny_model_dir, tiny_data_files, tmp_path):
    """A directory whose checkpoints/ and recipe.yaml are someone else's is no align run: even
    output.overwrite=true refuses it and deletes nothing. A run from before the marker (its
    checkpoints say so) is still one: it resumes."""
    mine = tmp_path / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "checkpoints" / "m.bin").write_bytes(b"weights")
    (mine / "recipe.yaml").write_text("my: recipe\n")
    recipe = make_recipe(tiny_model_dir, tiny_data_files, mine, "sft", steps=1, batch_size=4)
    for output in ({"overwrite": True}, {"overwrite": False}):
        with pytest.raises(RecipeError, match=r"holds checkpoints, recipe.yaml, which no align run wrote"):
            train(recipe.model_copy(update={"output": recipe.output.model_copy(update=output)}))
    assert (mine / "checkpoints" / "m.bin").read_bytes() == b"weights"
    assert (mine / "recipe.yaml").read_text() == "my: recipe\n" and not (mine / ".align-run").exists()

    run = tmp_path / "run"
    recipe = make_recipe(tiny_model_dir, tiny_data_files, run, "sft", steps=1, batch_size=4)
    train(recipe)
    (run / ".align-run").unlink()  # as a run written before the marker existed
    resumed = recipe.model_copy(update={"resume": "latest", "train": recipe.train.model_copy(update={"steps": 2})})
    assert train(resumed)["steps"] == 2 and (run / ".align-run").is_file()


def test_a_live_run_holds_the_directory_and_a_dead_ones_lock_is_taken_over(tiny_model_dir, tiny_data_files, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        recipe = make_recipe(tiny_model_dir, tiny_data_files, run, "sft", steps=1, batch_size=4)
        with pytest.raises(RecipeError, match=rf"is in use by another run \(pid {live.pid} on "):
            train(recipe)
    finally:
        live.kill()
        live.wait()
    # the owner is dead now (same host): its lock is taken over and released at the end
    assert train(recipe)["steps"] == 1
    assert not (run / ".lock").exists()


def test_an_empty_or_reused_pid_lock_is_taken_over_and_a_live_one_names_its_file(
    tiny_model_dir, tiny_data_files, tmp_path, capsys
):
    """A lock left empty by a crash (older than a few seconds), or whose pid now belongs to another
    process (its start time differs), does not block the directory forever; a live owner's lock is
    refused with the file named and how to clear it."""
    from align.rundir import _process_start

    recipe = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "sft", steps=1, batch_size=4)
    run = tmp_path / "run"
    run.mkdir()
    lock = run / ".lock"
    lock.write_text("")
    os.utime(lock, (time.time() - 60, time.time() - 60))
    assert train(recipe)["steps"] == 1
    assert "taking over" in capsys.readouterr().out and not lock.exists()

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = {"pid": live.pid, "host": socket.gethostname(), "started": _process_start(live.pid)}
        again = recipe.model_copy(update={"output": recipe.output.model_copy(update={"overwrite": True})})
        lock.write_text(json.dumps(me))
        with pytest.raises(RecipeError) as caught:
            train(again)
        assert f"(if no run uses it, remove {lock})" in str(caught.value)
        lock.write_text(json.dumps({**me, "started": me["started"] - 1}))  # the pid was reused since
        assert train(again)["steps"] == 1
        assert f"pid {live.pid} now belongs to another process" in capsys.readouterr().out
    finally:
        live.kill()
        live.wait()


def test_a_torn_last_metrics_line_is_dropped_on_resume(tiny_model_dir, tiny_data_files, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = make_recipe(tiny_model_dir, tiny_data_files, run, "sft", steps=4, batch_size=4, max_grad_norm=None)
    recipe = recipe.model_copy(update={"output": recipe.output.model_copy(update={"save_every": 2})})

    def stop_at_three(step: int, record: dict) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    train(recipe, on_step=stop_at_three)  # checkpoint at step 2, stopped (and saved) at 3
    (run / "checkpoints" / "step-000003").rename(run / "gone")  # as if killed before the save at 3
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "loss": 0.1')  # a write cut short
    capsys.readouterr()
    assert train(recipe.model_copy(update={"resume": "latest"}))["steps"] == 4
    assert "1 torn line(s) dropped" in capsys.readouterr().out
    assert [r["step"] for r in run_metrics(run)] == [1, 2, 3, 4]  # each step exactly once


def test_a_forged_trainer_state_does_not_run_code_on_resume(tiny_model_dir, tiny_data_files, tmp_path):
    run = tmp_path / "run"
    recipe = make_recipe(tiny_model_dir, tiny_data_files, run, "sft", steps=1, batch_size=4)
    train(recipe)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = run / "checkpoints" / "step-000001" / "trainer_state.pt"
    state.write_bytes(pickle.dumps({"step": Payload()}))
    write_manifest(state.parent)  # a forger rewrites the manifest too: the loader must still refuse
    resumed = recipe.model_copy(update={"resume": "latest", "train": recipe.train.model_copy(update={"steps": 2})})
    with pytest.raises(pickle.UnpicklingError):
        train(resumed)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated_state", "missing_state"])
def test_resume_passes_over_a_damaged_latest_checkpoint(damage, tiny_model_dir, tiny_data_files, tmp_path, capsys):
    """A flipped byte in the weights, a truncated trainer_state.pt or a missing state/ in the newest
    checkpoint: resume=latest says so in one line and continues from the one before, to the same
    weights as an uninterrupted run; a damaged checkpoint named explicitly is refused."""
    import shutil

    from helpers import final_params

    straight = tmp_path / "straight"
    train(make_recipe(tiny_model_dir, tiny_data_files, straight, "sft", steps=3, batch_size=4))
    run = tmp_path / "run"
    recipe = make_recipe(tiny_model_dir, tiny_data_files, run, "sft", steps=3, batch_size=4)
    recipe = recipe.model_copy(update={"output": recipe.output.model_copy(update={"save_every": 1, "keep_last": 3})})
    assert train(recipe, on_step=stop_at(2))["steps"] == 2  # checkpoints at steps 1 and 2
    latest = run / "checkpoints" / "step-000002"
    if damage == "flipped_byte":
        weights = latest / "state" / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "truncated_state":
        state = latest / "trainer_state.pt"
        state.write_bytes(state.read_bytes()[:100])
    else:
        shutil.rmtree(latest / "state")
    capsys.readouterr()
    with pytest.raises(RecipeError, match=r"field 'resume': .*step-000002' is damaged \("):
        train(recipe.model_copy(update={"resume": str(latest)}))
    assert train(recipe.model_copy(update={"resume": "latest"}))["steps"] == 3
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume:")]
    assert len(said) == 1 and "step-000002 is damaged" in said[0]
    a, b = final_params(straight), final_params(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_writes_into_a_run_directory_never_follow_a_planted_link(tiny_model_dir, tiny_data_files, tmp_path):
    """recipe.yaml, recipe_history.jsonl, metrics.jsonl and summary.json planted as links to files
    elsewhere: a resume replaces the links with its own files and writes nothing through them."""
    run = tmp_path / "run"
    recipe = make_recipe(tiny_model_dir, tiny_data_files, run, "sft", steps=1, batch_size=4)
    train(recipe)
    victims = {}
    for name in ("recipe.yaml", "recipe_history.jsonl", "metrics.jsonl", "summary.json"):
        victims[name] = tmp_path / f"victim-{name}"
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(victims[name])  # dangling: a write through it would create the victim
    resumed = recipe.model_copy(update={"resume": "latest", "train": recipe.train.model_copy(update={"steps": 2})})
    assert train(resumed)["steps"] == 2
    assert not any(victim.exists() for victim in victims.values())
    for name in victims:
        assert (run / name).is_file() and not (run / name).is_symlink(), name
    assert [r["step"] for r in run_metrics(run)] == [2]  # the link held no steps of this run
    assert json.loads((run / "recipe_history.jsonl").read_text())["changes"]["train.steps"]["now"] == 2


def test_a_reward_that_fails_mid_run_is_one_line_naming_the_last_checkpoint(tiny_model_dir, tiny_data_files, tmp_path):
    """A reward that raises at its third call (step 3): `align train` prints one line naming the
    reward, the error and the checkpoint to resume from, and exits 1."""
    (tmp_path / "flaky.py").write_text(
        "calls = []\n"
        "def score(prompts, completions, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3:\n"
        "        raise ValueError('the judge is down')\n"
        "    return [float(len(c)) for c in completions]\n"
    )
    recipe = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "rloo", steps=4, batch_size=4)
    raw = recipe.model_dump(mode="json")
    raw["reward"] = [{"name": "python", "options": {"path": str(tmp_path / "flaky.py"), "function": "score"}}]
    raw["output"]["save_every"] = 1
    out = _cli("train", str(_recipe_file(validate(Recipe, raw), tmp_path / "r.yaml")), cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("align train: reward 'python' raised ValueError: the judge is down; last checkpoint ")
    assert line.endswith("step-000002 (fix the reward, then resume=latest)") and "Traceback" not in out.stderr


def test_a_signal_stop_exits_128_plus_the_signal(tiny_model_dir, tiny_data_files, tmp_path):
    run = tmp_path / "run"
    recipe = make_recipe(tiny_model_dir, tiny_data_files, run, "sft", steps=100_000, batch_size=2)
    path = _recipe_file(recipe, tmp_path / "long.yaml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "align.cli", "train", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.2)
    while time.time() < deadline and not (run / "metrics.jsonl").read_text().strip():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in out
    assert list((run / "checkpoints").glob("step-*/trainer_state.pt"))


def test_resume_refuses_trajectory_changes_and_applies_and_records_the_rest(tiny_model_dir, tiny_data_files, tmp_path):
    run = tmp_path / "run"
    recipe = make_recipe(tiny_model_dir, tiny_data_files, run, "rloo", steps=2, batch_size=4, lr_scheduler="constant")
    train(recipe)
    started_with = (run / "recipe.yaml").read_text()
    raw = recipe.model_dump(mode="json")
    from align.config import validate
    from align.recipe import Recipe

    def resumed(**sections) -> Recipe:
        data = {**raw, "resume": "latest"}
        for section, fields in sections.items():
            data[section] = {**data[section], **fields}
        return validate(Recipe, data)

    for section, fields, named in [
        ("objective", {"beta": 0.5}, "objective.beta"),
        ("objective", {"k": 4}, "objective.k"),
        ("model", {"path": str(tmp_path / "other")}, "model.path"),
        ("train", {"batch_size": 8, "steps": 4}, "train.batch_size"),
        ("train", {"seed": 9, "steps": 4}, "train.seed"),
    ]:
        with pytest.raises(RecipeError, match=rf"was trained with other {named}"):
            train(resumed(**{section: fields}))
    with pytest.raises(RecipeError, match="train.steps: 1 is below the checkpoint's step 2"):
        train(resumed(train={"steps": 1}))

    # a new lr is applied from the resume on, and recorded; recipe.yaml still says what steps 1-2 used
    assert train(resumed(train={"steps": 4, "lr": 1e-3}))["steps"] == 4
    assert [r["lr"] for r in run_metrics(run)] == [5e-3, 5e-3, 1e-3, 1e-3]
    assert (run / "recipe.yaml").read_text() == started_with
    history = [json.loads(line) for line in (run / "recipe_history.jsonl").read_text().splitlines()]
    assert history == [
        {"from_step": 2, "changes": {"train.lr": {"was": 5e-3, "now": 1e-3}, "train.steps": {"was": 2, "now": 4}}}
    ]


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_usable(
    tiny_model_dir, tiny_data_files, tmp_path, monkeypatch
):
    import errno

    import align.checkpoint as checkpoint_mod
    from align.checkpoint import CheckpointError

    run = tmp_path / "run"
    recipe = make_recipe(tiny_model_dir, tiny_data_files, run, "sft", steps=3, batch_size=4)
    recipe = recipe.model_copy(update={"output": recipe.output.model_copy(update={"save_every": 1})})
    real_fsync = checkpoint_mod._fsync_tree

    def full_at_step_two(path):
        if path.name == ".tmp-step-000002":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(path)

    monkeypatch.setattr(checkpoint_mod, "_fsync_tree", full_at_step_two)
    with pytest.raises(CheckpointError) as caught:
        train(recipe)
    message = str(caught.value)
    assert "\n" not in message and str(run / "checkpoints" / ".tmp-step-000002") in message
    assert "No space left on device" in message and "MiB free" in message and "step-000001 is intact" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]  # no .tmp left
    monkeypatch.setattr(checkpoint_mod, "_fsync_tree", real_fsync)
    assert train(recipe.model_copy(update={"resume": "latest"}))["steps"] == 3


def test_a_full_disk_in_a_safetensors_write_is_one_line_and_leaves_nothing_half_written(
    tiny_model_dir, tiny_data_files, tmp_path, monkeypatch
):
    """safetensors reports a full disk as its own ``SafetensorError`` (neither OSError nor
    RuntimeError): the save still ends in one line, the temporary directory removed."""
    import safetensors.torch as safetensors_torch
    from safetensors import SafetensorError

    from align.checkpoint import CheckpointError

    run = tmp_path / "run"
    recipe = make_recipe(tiny_model_dir, tiny_data_files, run, "sft", steps=3, batch_size=4)
    recipe = recipe.model_copy(update={"output": recipe.output.model_copy(update={"save_every": 1})})
    real_serialize = safetensors_torch.serialize_file

    def full_at_step_two(tensors, filename, *args, **kwargs):
        if ".tmp-step-000002" in str(filename):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_serialize(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors_torch, "serialize_file", full_at_step_two)
    with pytest.raises(CheckpointError) as caught:
        train(recipe)
    message = str(caught.value)
    assert "\n" not in message and "No space left on device" in message and "step-000001 is intact" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]  # no .tmp left


def test_leftovers_of_interrupted_saves_and_prunes_are_swept_at_start(
    tiny_model_dir, tiny_data_files, tmp_path, capsys
):
    run = tmp_path / "run"
    recipe = make_recipe(tiny_model_dir, tiny_data_files, run, "sft", steps=1, batch_size=4)
    train(recipe)
    root = run / "checkpoints"
    (root / ".del-step-000000" / "model").mkdir(parents=True)  # killed while pruning
    (root / ".tmp-step-000007" / "state").mkdir(parents=True)  # killed while saving
    capsys.readouterr()
    resumed = recipe.model_copy(update={"resume": "latest", "train": recipe.train.model_copy(update={"steps": 2})})
    train(resumed)
    assert "removed leftovers of an interrupted save or prune" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002"]


@pytest.fixture(scope="module")
def bad_inputs(tiny_model_dir, tmp_path_factory):
    """A recipe file on the tiny model, bad data files, and a model whose weights cannot load."""
    import shutil

    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "ok.jsonl").write_text('{"prompt": "the film"}\n{"prompt": "the cast"}\n')
    (root / "latin1.jsonl").write_bytes(b'{"prompt": "the caf\xe9 film"}\n')
    (root / "long.jsonl").write_text(json.dumps({"prompt": " ".join(["the film was good"] * 60)}) + "\n")
    (root / "no_prompt.jsonl").write_text('{"text": "the film"}\n')
    (root / "rows.xyz").write_text("the film\n")
    (root / "empty.jsonl").write_text("\n")
    (root / "no_prompt_row.jsonl").write_text('{"prompt": "the film"}\n{"text": "the cast"}\n')
    broken = root / "broken_weights"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    recipe = root / "r.yaml"
    recipe.write_text(
        f"model: {{path: {tiny_model_dir}}}\ndata: {{train: {root / 'ok.jsonl'}}}\n"
        "objective: {name: rloo, k: 2}\nreward: [{name: length, options: {target: 8}}]\n"
        "train: {steps: 1, batch_size: 1}\noutput: {report: false}\n"
    )
    return root


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.train={root}/latin1.jsonl"], "not UTF-8 text"),
        (["reward=[{{name: length, options: {{target: ten}}}}]"], "options.target: expected float, got 'ten'"),
        (["reward=[{{name: length, options: {{target: 8}}, clip: [3, 1]}}]"], "clip: expected [lo, hi] with lo <= hi"),
        (["objective.name=ipo", "objective.beta=0"], "ipo: beta must be > 0"),
        (["objective.name=copg", "objective.beta=0"], "copg: beta must be > 0"),
        (["objective.name=dpo", "objective.beta=0"], "dpo: beta must be > 0"),
        (["data.train={root}/long.jsonl"], "exceeds the model's 64 positions"),
        (['data.prompt_template="{{prompt"'], "field 'data.prompt_template': not a format string"),
        (["prepare=quickstart", "model.path={root}/sft_modle"], "model.path: prepare: quickstart builds its policy"),
        (["data.train={root}/no_prompt.jsonl", "model.path={root}/broken_weights"], "missing column 'prompt'"),
        (["model.path={root}/no_such_model"], "model.path: no such directory"),
        (["data.train={root}/rows.xyz"], ".xyz is not a data format align reads"),
        (["data.train={root}/empty.jsonl"], "data '{root}/empty.jsonl': the file is empty (no rows)"),
        (["data.train=someone/no-such-dataset"], "data 'someone/no-such-dataset': cannot be loaded"),
        # the report's held-out prompts are read before the models load, not after training
        (["data.eval_prompts={root}/missing.jsonl", "output.report=true"], "missing.jsonl': no such file"),
        (
            ["data.eval_prompts={root}/no_prompt_row.jsonl", "output.report=true"],
            "row 1: column 'prompt' is empty or not text",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(bad_inputs, overrides, expected, capsys):
    """``align train`` in this process (its ``main``, as the console script calls it); the installed
    command in a process of its own is the next test."""
    from align.cli import main

    run = bad_inputs / "run"
    argv = [o.format(root=bad_inputs) for o in overrides]
    code = main(["train", str(bad_inputs / "r.yaml"), *argv, f"output.dir={run}"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err[-2000:]
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected.format(root=bad_inputs) in err, err
    assert not run.exists()
    assert not (bad_inputs / "sft_modle").exists() and not (bad_inputs / "data").exists()


def test_bad_input_through_the_installed_command(bad_inputs):
    run = bad_inputs / "run"
    out = _cli("train", str(bad_inputs / "r.yaml"), f"data.train={bad_inputs}/latin1.jsonl", f"output.dir={run}")
    err = out.stderr.strip()
    assert out.returncode == 2 and len(err.splitlines()) == 1 and "not UTF-8 text" in err, err[-2000:]
    assert not run.exists()


def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(bad_inputs, tmp_path, capsys):
    """An existing file as a run directory, a path under a file, a directory as a samples file, no
    prompts to sample: one line naming the field, exit 2, before a model loads or a study runs."""
    a_file = bad_inputs / "ok.jsonl"
    cases = [
        (["train", str(bad_inputs / "r.yaml"), f"output.dir={a_file}"], "output.dir: ", "is an existing file"),
        (["train", str(bad_inputs / "r.yaml"), f"output.dir={a_file}/run"], "output.dir: ", "lies under the file"),
        (["bandit", f"out={a_file}"], "out: ", "is an existing file; expected a directory path"),
        (["sample", str(bad_inputs / "r.yaml"), f"out={tmp_path}"], "out: ", "is an existing directory"),
        (["sample", str(bad_inputs / "r.yaml"), "n=0"], "n: ", "expected at least 1 prompt, got 0"),
        (["sample", str(bad_inputs / "r.yaml"), "n=many"], "n: ", "expected a whole number, got 'many'"),
    ]
    from align.cli import main

    for argv, field, expected in cases:
        code = main(list(argv))
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, (argv, err[-1000:])
        assert field in err and expected in err, err


def test_out_of_memory_is_one_line_and_the_same_command_starts_over(
    tiny_model_dir, tiny_data_files, tmp_path, monkeypatch, capsys
):  # noqa: E501
    """The allocator failing mid-run: one line naming it, the last checkpoint and what to lower,
    exit 1; before any checkpoint, the same command (no overwrite) starts the run over."""
    import align.trainer
    from align.cli import main

    real_step = align.trainer.train_step
    calls = []

    def step_then_fail(run, accelerator):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes.")
        return real_step(run, accelerator)

    monkeypatch.setattr(align.trainer, "train_step", step_then_fail)
    run = tmp_path / "run"
    path = _recipe_file(make_recipe(tiny_model_dir, tiny_data_files, run, "rloo", steps=3), tmp_path / "r.yaml")
    fail_at = 1  # before any checkpoint
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err  # in this process stderr also holds the progress bars
    said = [line for line in err.splitlines() if line.startswith("align ")]
    assert len(said) == 1 and "Traceback" not in err, err
    err = said[0]
    assert err.startswith("align train: out of memory (DefaultCPUAllocator"), err
    assert "lower train.batch_size" in err and "no checkpoint was saved yet" in err
    calls.clear()
    fail_at = 3  # the retry, same command: it starts over, saves after step 1, then fails at step 3
    assert main(["train", str(path), "output.save_every=1"]) == 1
    captured = capsys.readouterr()
    assert "starting over a run that stopped before its first checkpoint" in captured.out
    assert f"last checkpoint {run / 'checkpoints' / 'step-000002'} (resume=latest)" in captured.err.strip()
    calls.clear()
    fail_at = 0
    assert main(["train", str(path), "output.save_every=1", "resume=latest"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
