"""launch/: every accelerate config loads and is accepted by the launcher; the Slurm script is sound."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
CONFIGS = sorted(LAUNCH.glob("*.yaml"))
EXPECTED = {
    "cpu.yaml": (DistributedType.NO, 1),
    "cpu_ddp2.yaml": (DistributedType.MULTI_GPU, 2),  # started by torchrun, runs as MULTI_CPU: see file
    "single_gpu.yaml": (DistributedType.NO, 1),
    "ddp.yaml": (DistributedType.MULTI_GPU, 8),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 8),
    "deepspeed_zero3.yaml": (DistributedType.DEEPSPEED, 8),
    "fsdp.yaml": (DistributedType.FSDP, 8),
    "cpu_fsdp2.yaml": (DistributedType.FSDP, 2),  # CPU processes: see align/distributed.py
    "cpu_zero2.yaml": (DistributedType.DEEPSPEED, 2),
    "cpu_zero3.yaml": (DistributedType.DEEPSPEED, 2),
}


def test_every_config_is_listed():
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED)
    readme = (LAUNCH / "README.md").read_text()
    for name in [*EXPECTED, "slurm_multinode.sh"]:
        assert f"launch/{name}" in readme


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_with_accelerate(path: Path):
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type, config.num_processes) == EXPECTED[path.name]
    # values here would be exported as ACCELERATE_* variables that override the trainer's own settings
    assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(config.deepspeed_config)
    if config.distributed_type == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["deepspeed_multinode_launcher"] == "standard"  # srun starts each node


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_launcher_accepts_config(path: Path):
    """Run accelerate launch's own validation and environment set-up, then build its plugins from it."""
    launch = pytest.importorskip("accelerate.commands.launch")
    validate = getattr(launch, "_validate_launch_command", None)
    if validate is None:
        pytest.skip("this accelerate version has no _validate_launch_command")
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    argv = ["--config_file", str(path), "-m", "align.cli", "train", "recipe.yaml"]
    args, defaults, _ = validate(launch.launch_command_parser().parse_args(argv))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env
        with mock.patch.dict(os.environ, env):
            plugin = DeepSpeedPlugin()
        assert plugin.zero_stage == defaults.deepspeed_config["zero_stage"]
        assert plugin.gradient_accumulation_steps == "auto"  # filled from the Accelerator
    elif args.use_fsdp:
        env = prepare_multi_gpu_env(args)
        with mock.patch.dict(os.environ, env):
            plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    elif args.multi_gpu:
        env = prepare_multi_gpu_env(args)
        assert env["ACCELERATE_MIXED_PRECISION"] == defaults.mixed_precision
    else:
        cmd, env = prepare_simple_launcher_cmd_env(args)
        assert cmd[-4:] == ["-m", "align.cli", "train", "recipe.yaml"]


PROBE = """
import torch
from accelerate import Accelerator

acc = Accelerator()
total = acc.reduce(torch.tensor([float(acc.process_index + 1)]), "sum")
kind = acc.distributed_type.value
print(f"rank={acc.process_index} world={acc.num_processes} type={kind} sum={float(total)}")
acc.end_training()  # destroy the gloo group: without it, exit sometimes aborts
"""


def test_cpu_ddp2_really_starts_two_gloo_processes(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "cpu_ddp2.yaml")]
    out = subprocess.run(
        [*cmd, "--main_process_port", "0", str(script)], capture_output=True, text=True, env=env, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # both processes print to one pipe: their lines may interleave, so match records, not lines
    found = sorted(re.findall(r"rank=\d+ world=\d+ type=\w+ sum=[\d.]+", out.stdout))
    assert found == [f"rank={r} world=2 type=MULTI_CPU sum=3.0" for r in (0, 1)], out.stdout


def test_slurm_script_parses():
    subprocess.run(["bash", "-n", str(LAUNCH / "slurm_multinode.sh")], check=True)


def test_slurm_script_builds_the_launch_command(tmp_path):
    """Dry run with stand-ins for scontrol, srun (as the task on node 1) and accelerate."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": 'printf "gpu-node-07\\ngpu-node-08\\n"',
        "srun": 'while [[ $1 == --* ]]; do shift; done; SLURM_NODEID=1 exec "$@"',
        "accelerate": 'printf "%s\\n" "$@" > "$ARGS_OUT"',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    args_out = tmp_path / "args.txt"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "ARGS_OUT": str(args_out),
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_JOB_ID": "123456",
        "CONFIG": "launch/fsdp.yaml",
    }
    script = LAUNCH / "slurm_multinode.sh"
    subprocess.run(["bash", str(script), "recipes/x.yaml", "train.steps=5"], env=env, check=True, timeout=30)
    argv = args_out.read_text().splitlines()

    def option(name: str) -> str:
        return argv[argv.index(name) + 1]

    assert argv[0] == "launch" and "--same_network" in argv
    assert option("--config_file") == "launch/fsdp.yaml"
    assert option("--num_machines") == "2" and option("--num_processes") == "8"  # 2 nodes x 4 GPUs
    assert option("--machine_rank") == "1"  # expanded on the node, not at submission
    assert option("--main_process_ip") == "gpu-node-07"
    assert option("--main_process_port") == str(20000 + 123456 % 20000)
    assert argv[-5:] == ["-m", "align.cli", "train", "recipes/x.yaml", "train.steps=5"]

    no_recipe = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert no_recipe.returncode == 2 and "usage" in no_recipe.stderr
