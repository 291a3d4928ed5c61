#!/usr/bin/env bash
# The GPU check: one GPU, under ten minutes, prints one table (benchmarks/gpu_check.py says what
# each row is). Run it whenever a machine with a GPU is at hand; put the table in benchmarks/README.md.
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from a set-up checkout (README)
#   bash benchmarks/gpu_check.sh --smoke    # anywhere: the same pipeline on the CPU, tiny model
# TRL rows need a venv with trl: TRL_PYTHON=/path/to/trl-venv/bin/python (skipped when absent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${ALIGN_PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
timeout 590 "$PYTHON" benchmarks/gpu_check.py "$@"
