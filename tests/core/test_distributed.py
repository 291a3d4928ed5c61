"""2 processes == 1 (align/distributed.py): `accelerate launch` over gloo DDP at the same global
batch gives the 1-process run's weights and every metric it logs. The sharded launches (FSDP2,
DeepSpeed ZeRO) are in test_sharded.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import SGD_LR, final_params, free_port, make_recipe, max_diff, run_metrics

from align.step_metrics import TIMINGS  # measured per process: not comparable


@pytest.mark.parametrize(
    "key, fields",
    [
        # (DPO on 2 processes: the sharded tests' ZeRO-2, ZeRO-3 and FSDP2 cases)
        # rloo's path plus the reward whitened over both processes (plain rloo: the sharded tests)
        ("rloo_whitened", {}),
        ("grpo_token", {}),
        ("rcfd_two", {}),
        ("reinforce_pp", {}),  # returns whitened over both processes, the group mean subtracted first
        # ppo's one-pass path and more: π_old and V_old kept before the first of 2 × 2 updates
        ("ppo", {"mini_batches": 2, "updates_per_batch": 2}),
        # KTO's z₀: mismatched completions rotated over the whole step, their mean over both processes
        ("kto", {}),
    ],
)
def test_two_process_ddp_equals_one_process(key, fields, tiny_model_dir, tiny_data_files, tmp_path):
    """accelerate launch --cpu --num_processes 2 (batch 4 each) == 1 process (batch 8); with 2
    mini-batches each process's half of every mini-batch."""
    import yaml

    runs, logged = {}, {}
    for procs, batch in [(1, 8), (2, 4)]:
        run = tmp_path / f"p{procs}"
        recipe = make_recipe(
            tiny_model_dir,
            tiny_data_files,
            run,
            key,
            batch_size=batch // fields.get("mini_batches", 1),
            optimizer="sgd",
            lr=SGD_LR[key],
            max_grad_norm=None,
            **fields,
        )
        path = tmp_path / f"p{procs}.yaml"
        path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
        # `accelerate launch --cpu` starts one process unless mpirun is installed; torchrun's
        # launcher (--multi_gpu) with ACCELERATE_USE_CPU gives real gloo DDP on CPU
        launcher = ["--multi_gpu"] if procs > 1 else ["--cpu"]
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *launcher,
            "--num_processes",
            str(procs),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            "-m",
            "align.cli",
            "train",
            str(path),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[procs] = final_params(run)
        logged[procs] = run_metrics(run)
    assert max_diff(runs[1], runs[2]) < 2e-5
    # the logged metrics too: completions stop at unequal lengths ("e"), so the processes hold
    # unequal token counts and only sums over every process give one process's numbers
    first = logged[1][0]
    assert {"loss", "kl_k1", "tokens", "reward_mean", "reward_std", "entropy"} <= set(first) or key in ("dpo", "kto")
    for one, two in zip(logged[1], logged[2], strict=True):
        assert set(one) == set(two)
        for name in sorted(set(one) - TIMINGS):
            tolerance = 1e-6 if one["step"] == 1 else 1e-4  # step 2 starts from weights equal to 2e-5
            assert two[name] == pytest.approx(one[name], rel=tolerance, abs=tolerance), (name, one["step"])
