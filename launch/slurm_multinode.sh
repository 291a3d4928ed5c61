#!/bin/bash
# Multi-node training on Slurm: one `accelerate launch` per node (srun), each starting one process per
# GPU; the first node of the allocation hosts the rendezvous.
#
#   sbatch launch/slurm_multinode.sh recipes/X.yaml [key=value ...]
#   CONFIG=launch/fsdp.yaml sbatch --nodes 4 launch/slurm_multinode.sh recipes/X.yaml train.steps=500
#
# CONFIG picks the accelerate config (default: DeepSpeed ZeRO-2); its num_processes and num_machines
# are overridden here from the allocation. Submit from the repository root: paths are relative to it.
#SBATCH --job-name=align
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch launch/slurm_multinode.sh RECIPE [key=value ...]" >&2
    exit 2
fi
RECIPE=$1
shift

export CONFIG=${CONFIG:-launch/deepspeed_zero2.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
export NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))  # accelerate counts processes over all machines
# read all names rather than `| head -n 1`: under pipefail, head closing the pipe early can kill
# scontrol with SIGPIPE and fail the job
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MAIN_PROCESS_IP=${NODES[0]}
export MAIN_PROCESS_IP
# a port derived from the job id, so two jobs sharing a first node do not collide
export MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TOKENIZERS_PARALLELISM=false

echo "align: ${SLURM_NNODES} nodes x ${GPUS_PER_NODE} GPUs, rendezvous ${MAIN_PROCESS_IP}:${MAIN_PROCESS_PORT}," \
    "config ${CONFIG}, recipe ${RECIPE} $*"

# Single quotes: SLURM_NODEID is set per task by srun, so it must expand on each node, not here.
srun --kill-on-bad-exit=1 bash -c '
    exec accelerate launch \
        --config_file "$CONFIG" \
        --num_machines "$SLURM_NNODES" \
        --num_processes "$NUM_PROCESSES" \
        --machine_rank "$SLURM_NODEID" \
        --main_process_ip "$MAIN_PROCESS_IP" \
        --main_process_port "$MAIN_PROCESS_PORT" \
        --rdzv_backend static \
        --same_network \
        -m align.cli train "$@"
' align "$RECIPE" "$@"
