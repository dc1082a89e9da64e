#!/usr/bin/env bash
# SLURM array job for stage 0: each array task generates the shards with index % N == its place in the array.
# Shards are written atomically, so a preempted task resubmitted later resumes where it stopped;
# the job that finds every shard finished assembles pairs.jsonl and stats.json (two that finish together
# both do, each through its own temporary files); the pairs equal one job's.
#
#   sbatch --array=0-63 scripts/synth_slurm.sh /data/corpus/*.jsonl
#   MODEL=Qwen/Qwen3-8B TP=1 ARGS="shard_size=512 sampling.temperature=0.6" sbatch --array=1-16 scripts/synth_slurm.sh ...
# Any array spelling works (--array=1-16, 0-63:2, 0-63%8): the task's place is (id - min) / step.
#SBATCH --job-name=qwen3train-synth
#SBATCH --gpus-per-task=4
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
set -euo pipefail
N=${SLURM_ARRAY_TASK_COUNT:-1}
I=$(( (${SLURM_ARRAY_TASK_ID:-0} - ${SLURM_ARRAY_TASK_MIN:-0}) / ${SLURM_ARRAY_TASK_STEP:-1} ))
PY=${PY:-.venv/bin/python}
CORPUS=$(printf '%s,' "$@"); CORPUS="[${CORPUS%,}]"
read -r -a EXTRA <<< "${ARGS:-}"  # more Hydra overrides of configs/synth.yaml
exec "$PY" -m qwen3train.cli.main --config-name=synth "corpus=$CORPUS" backend=vllm generator="${MODEL:-Qwen/Qwen3-32B}" \
  tensor_parallel_size="${TP:-4}" shard_index="$I" num_shards="$N" output_dir="${OUT:-outputs/synth}" ${EXTRA[@]+"${EXTRA[@]}"}
