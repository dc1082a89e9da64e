#!/usr/bin/env bash
# Launch a qwen3train entry point on NGPU processes per node with torchrun (never the deepspeed
# launcher: it appends --local_rank, which Hydra's command line rejects).
#   NGPU=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash scripts/launch.sh --config-name=stage1 model=qwen3-0.6b
set -euo pipefail
PY=${PY:-python}
NGPU=${NGPU:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-auto}  # auto: a free port on one node, 29511 across nodes (qwen3train.cli.ranks)
ENTRY=${ENTRY:-qwen3train.cli.main}
if [ "$NGPU" = "1" ] && [ "$NNODES" = "1" ]; then
  exec "$PY" -m "$ENTRY" "$@"
fi
# through qwen3train.cli.ranks: a user's mistake on any rank ends as its one line and status 2
exec "$PY" -m qwen3train.cli.ranks --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --nproc_per_node "$NGPU" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m "$ENTRY" "$@"
