"""Server mode (align/vllm_server.py): ``align vllm-serve`` in a subprocess on CPU (vLLM's CPU build),
a tiny Llama (head size 32), the trainer in this process talking to it over HTTP.

After a 5-step RLOO run the server's log-probs of fresh samples equal the trained policy's (the
weights went over by file and were reloaded in place); with ``train.async`` the server generates
the samples of the version the schedule says; a server that is not there is one line before any
model loads; a server killed mid-run stops the run with a checkpoint. The kill is the module's last
test: it takes the module's server down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from helpers import free_port, make_recipe, make_tiny_model_dir, run_metrics

from align.cli import main as cli_main
from align.config import RecipeError, validate
from align.distributed import make_accelerator
from align.logprobs import completion_logprobs
from align.recipe import Recipe
from align.rollout import trim_left
from align.run_setup import setup_run
from align.trainer import TrainingError, rollout, run_settings, train, train_step
from align.vllm_server import check_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A vLLM server (``align vllm-serve``) on a tiny Llama, up for the module's tests."""
    model = make_tiny_model_dir(tmp_path_factory.mktemp("served"), n_embd=64, n_head=2, architecture="llama")
    port = free_port()
    log = open(tmp_path_factory.mktemp("server_log") / "server.log", "w")  # noqa: SIM115 (open for the module)
    cmd = [sys.executable, "-m", "align.cli", "vllm-serve", str(model), "--port", str(port), "--dtype", "float32"]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.close()
                pytest.fail(f"the server did not start: {open(log.name).read()[-3000:]}")
            time.sleep(1)
    yield {"model": model, "port": port, "proc": proc}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()


def server_generation(server, **extra) -> dict:
    return {"engine": "vllm", "vllm": {"mode": "server", "server_port": server["port"]}, **extra}


def test_a_run_against_the_server_syncs_its_weights(server, tiny_data_files, tmp_path):
    """5 RLOO steps sampled by the server: every step's samples came from the weights it trains
    (ratio 1), the server holds version 5, and its log-probs of fresh samples equal the trained
    policy's; the policy moved (the initial weights' log-probs differ)."""
    recipe = make_recipe(
        server["model"], tiny_data_files, tmp_path / "run", "rloo", generation=server_generation(server), steps=5
    )
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"lr": 3e-3})})
    settings = run_settings(recipe)
    accelerator = make_accelerator(1)
    run = setup_run(settings, accelerator)
    records = [train_step(run, accelerator) for _ in range(5)]
    for record in records:
        assert abs(record["is_ratio_mean"] - 1) < 1e-4 and record["engine_logprob_diff"] < 1e-5
    sampled = rollout(run, list(range(8)), step=10_000, version=run.step)  # fresh keys, the trained weights
    info = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{server['port']}/weight_info").read())
    assert info["weight_version"] == "5" and sampled.policy_version == 5
    prompt_ids, prompt_mask = trim_left(sampled.prompt_ids, sampled.prompt_mask)
    mask = sampled.completion_mask.bool()
    assert int(mask.sum()) > 20
    with torch.no_grad():
        trained = completion_logprobs(
            run.models.policy, prompt_ids, prompt_mask, sampled.completion_ids, sampled.completion_mask, 1.0
        )
        initial = completion_logprobs(
            run.models.reference, prompt_ids, prompt_mask, sampled.completion_ids, sampled.completion_mask, 1.0
        )
    assert float((trained - sampled.sampler_logprobs)[mask].abs().max()) < 1e-5
    assert float((initial - sampled.sampler_logprobs)[mask].abs().max()) > 1e-3


@pytest.mark.parametrize("mode", ["fixed", "bounded"])
def test_async_samples_come_from_the_scheduled_version(mode, server, tiny_data_files, tmp_path):
    """fixed N = 1: the server samples step t's batch with the weights of t − 1 while step t − 1
    trains (its log-probs differ from the trained weights' from step 1 on, and equal them at step 0);
    bounded N = 1: never older than 1."""
    run = tmp_path / "run"
    recipe = make_recipe(
        server["model"],
        tiny_data_files,
        run,
        "rloo",
        generation=server_generation(server),
        steps=4,
        lr=3e-3,
        **{"async": {"max_staleness": 1, "mode": mode}},
    )
    train(recipe)
    records = run_metrics(run)
    staleness = [r["staleness"] for r in records]
    if mode == "fixed":
        assert staleness == [0, 1, 1, 1]
        assert records[0]["engine_logprob_diff"] < 1e-5
        assert all(r["engine_logprob_diff"] > 1e-4 for r in records[1:])
    else:
        assert max(staleness) <= 1 and len(records) == 4


def test_no_server_is_one_line_before_any_model_loads(tiny_model_dir, tiny_data_files, tmp_path, capsys):
    port = free_port()
    recipe = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "rloo")
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe.model_dump(mode="json")))
    overrides = ["generation.engine=vllm", "generation.vllm.mode=server", f"generation.vllm.server_port={port}"]
    code = cli_main(["train", str(path), *overrides, "generation.vllm.server_timeout=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"no vLLM server at http://127.0.0.1:{port}" in err[0]
    assert f"start one with: align vllm-serve {tiny_model_dir} --host 127.0.0.1 --port {port}" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_budget_longer_than_the_server_holds_is_one_line(server, tiny_data_files, tmp_path):
    generation = server_generation(server)
    recipe = make_recipe(server["model"], tiny_data_files, tmp_path / "run", "rloo", generation=generation)
    with pytest.raises(RecipeError, match="100 tokens, more than the server's max_model_len 64; restart it with"):
        check_server(recipe, 100)
    check_server(recipe, 64)


@pytest.mark.parametrize(
    "vllm, message",
    [
        ({"mode": "server", "dtype": "bfloat16"}, "dtype: in mode: server the server's own setting"),
        ({"mode": "server", "enable_sleep_mode": True}, "enable_sleep_mode: the colocated engine's"),
        ({"weights_dir": "/tmp"}, "weights_dir: read in mode: server only"),
    ],
)
def test_server_settings_are_checked(vllm, message):
    raw = {"model": {"path": "m"}, "data": {"train": "d"}, "objective": {"name": "rloo"}}
    with pytest.raises(ValueError, match=message):
        validate(Recipe, {**raw, "generation": {"engine": "vllm", "vllm": vllm}})


def test_a_server_killed_mid_run_stops_it_with_a_checkpoint(server, tiny_data_files, tmp_path):
    """The module's last test: the server is killed after step 2; the run stops at step 3's rollout
    with one message naming the server and the checkpoint of step 2, not a hang."""
    run = tmp_path / "run"
    recipe = make_recipe(server["model"], tiny_data_files, run, "rloo", generation=server_generation(server), steps=5)

    def kill_after_two(step: int, record: dict) -> None:
        if step == 2:
            os.killpg(server["proc"].pid, signal.SIGKILL)
            server["proc"].wait()

    started = time.monotonic()
    with pytest.raises(TrainingError) as stopped:
        train(recipe, on_step=kill_after_two)
    message = str(stopped.value)
    assert f"the vLLM server at http://127.0.0.1:{server['port']} stopped answering" in message
    assert "resume=latest" in message and f"checkpoint {run / 'checkpoints' / 'step-000002'}" in message
    assert time.monotonic() - started < 120
    assert len(run_metrics(run)) == 2 and (run / "checkpoints" / "step-000002").is_dir()
