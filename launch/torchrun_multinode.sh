#!/usr/bin/env bash
# Multi-node training: run this on every node (same arguments), e.g.
#   NNODES=2 MASTER_ADDR=node0 ./launch/torchrun_multinode.sh configs/dlrm_criteo.toml --set train.epochs=1
# Each node starts one worker per GPU through `rectrain launch` (torchrun underneath); workers
# meet through torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT.
#
# What `rectrain launch` adds to a bare torchrun (see trainer/commands/launch.py):
#   - a config or data error stops this node's workers at once, is printed as one line
#     (`rectrain: error: ...`) and exits with code 2: it is never retried;
#   - a crash (a killed or failed worker) restarts the worker group up to MAX_RESTARTS times; the
#     restarted workers resume from the latest complete checkpoint. If it keeps failing, one line
#     names the rank and exit code and the log file with torchrun's full output; exit code 1.
#   - torchrun's own output goes to that log file (under LAUNCH_LOG_DIR/<host> if set, else a
#     temporary directory kept only after a crash); worker stdout (progress) is shown as usual.
# With several nodes each node has its own launcher: a config or data error stops the node that
# hits it (normally all do); the others' workers then fail and are restarted or stopped by
# torchrun as for any crash.
set -euo pipefail
config=${1:?usage: torchrun_multinode.sh CONFIG [--set k=v ...]}
shift
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l | awk '{print ($1 > 0) ? $1 : 2}')}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-rectrain}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PY=${PY:-$(dirname "$0")/../.venv/bin/python}
log_dir=()
if [[ -n "${LAUNCH_LOG_DIR:-}" ]]; then
  log_dir=(--log-dir "$LAUNCH_LOG_DIR/$(hostname)")
fi
exec "$PY" -m trainer launch \
  --nnodes "$NNODES" --nproc "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS" \
  --rdzv "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" ${log_dir[@]+"${log_dir[@]}"} \
  -- train --config "$config" "$@"
