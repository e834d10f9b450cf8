#!/usr/bin/env bash
# Multi-node training: run this on every node (same arguments), e.g.
#   NNODES=2 MASTER_ADDR=node0 ./launch/torchrun_multinode.sh configs/dlrm_criteo.toml --set train.epochs=1
# Each node starts one worker per GPU; workers meet through torchrun's c10d rendezvous.
set -euo pipefail
config=${1:?usage: torchrun_multinode.sh CONFIG [--set k=v ...]}
shift
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l | awk '{print ($1 > 0) ? $1 : 2}')}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-rectrain}
PY=${PY:-$(dirname "$0")/../.venv/bin/python}
exec "$PY" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID" \
  -m trainer train --config "$config" "$@"
