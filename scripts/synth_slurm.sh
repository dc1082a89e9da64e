#!/usr/bin/env bash
# SLURM array job for stage 0: each array task generates the shards with index % N == its id.
# Shards are written atomically, so a preempted task resubmitted later resumes where it stopped;
# the job that finds every shard finished assembles pairs.jsonl and stats.json.
#
#   sbatch --array=0-63 scripts/synth_slurm.sh /data/corpus/*.jsonl
#SBATCH --job-name=qwen3train-synth
#SBATCH --gpus-per-task=4
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
set -euo pipefail
N=${SLURM_ARRAY_TASK_COUNT:-1}
I=${SLURM_ARRAY_TASK_ID:-0}
CORPUS=$(printf '%s,' "$@"); CORPUS="[${CORPUS%,}]"
.venv/bin/python -m qwen3train.cli.main --config-name=synth "corpus=$CORPUS" backend=vllm generator=${MODEL:-Qwen/Qwen3-32B} \
  tensor_parallel_size=4 shard_index="$I" num_shards="$N" output_dir=${OUT:-outputs/synth}
