#!/usr/bin/env bash
# SLURM batch template for every distributed stage: one launcher (torchrun) per node, NGPU processes each.
#
#   sbatch --nodes=4 --gpus-per-node=8 scripts/train_slurm.sh stage1 model=qwen3-0.6b engine=zero2 \
#       engine.global_batch_size=4096 engine.micro_batch_size=64 engine.grad_cache=true data.train_files=[/data/synth/*.jsonl]
#   sbatch --nodes=2 scripts/train_slurm.sh stage2 model=qwen3-8b engine=zero3 model.init_from=outputs/stage1/final
#   sbatch --nodes=1 scripts/train_slurm.sh rerank model=qwen3-0.6b engine=zero2
#
# Stages: stage1, stage2, rerank (training), filter, mine (sharded scoring / encoding).
# The batch step re-runs this script under `srun` (one task per node); inside each task the SLURM
# environment is mapped to the launcher's by qwen3train.cli.slurm: NNODES, NODE_RANK (SLURM_NODEID),
# MASTER_ADDR (first host of SLURM_JOB_NODELIST), MASTER_PORT (derived from the job id), NGPU (GPUs on
# the node). Checkpoints resume: resubmitting the same command continues the run (same node count for ZeRO).
#SBATCH --job-name=qwen3train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
# SIGTERM 5 minutes before the time limit (to the job's steps: srun passes it to the launcher, torchrun to the
# ranks): training finishes its step, saves a checkpoint and stops with status 143; resubmit the same command
# (or requeue the job) to continue from there. Mining and filtering keep their finished chunks.
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out
set -euo pipefail
STAGE=${1:-}
case "$STAGE" in
  stage1|stage2|rerank|filter|mine) shift ;;
  *) echo "error: usage: sbatch scripts/train_slurm.sh <stage1|stage2|rerank|filter|mine> [hydra overrides...] (got '${STAGE}')" >&2; exit 2 ;;
esac
cd "${QWEN3TRAIN_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}"
PY=${PY:-.venv/bin/python}
if [ -z "${QWEN3TRAIN_IN_SRUN:-}" ]; then
  # the batch step: one task per node, each runs the branch below
  export QWEN3TRAIN_IN_SRUN=1
  exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash "$0" "$STAGE" "$@"
fi
exports=$("$PY" -m qwen3train.cli.slurm)
eval "$exports"
echo "[train_slurm] node $NODE_RANK/$NNODES on $(hostname): $NGPU processes, master $MASTER_ADDR:$MASTER_PORT, stage $STAGE" >&2
# NCCL picks the interface itself; set NCCL_SOCKET_IFNAME / NCCL_IB_HCA for your fabric if needed.
export NGPU NNODES NODE_RANK MASTER_ADDR MASTER_PORT PY
exec bash scripts/launch.sh --config-name="$STAGE" "$@"
