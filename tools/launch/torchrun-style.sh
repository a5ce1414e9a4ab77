#!/usr/bin/env bash
# No MPI, no Slurm: this script starts one node's ranks itself, giving each process the
# torchrun-style environment RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Run it
# once on every node with the same NNODES, MASTER_ADDR and MASTER_PORT and that node's NODE_RANK.
#
#   CONFIG=runs/cpt.toml tools/launch/torchrun-style.sh                           # one node, 8 GPUs
#   NNODES=8 NODE_RANK=3 MASTER_ADDR=node01 CONFIG=… tools/launch/torchrun-style.sh  # node 3 of 8
#
# For GPU ranks (NCCL, rendezvous over TCP). CPU ranks communicate through MPI and must be started
# by mpirun or srun (single-node.sh, slurm.sbatch) instead.
#
# Environment (defaults in brackets): CONFIG (required), NNODES [1], NODE_RANK [0],
# NPROC_PER_NODE [8], MASTER_ADDR [127.0.0.1; required with NNODES > 1], MASTER_PORT [29500],
# DEVICE [cuda], ZERO_STAGE [1], BIN [target/release/pretrain], LOG_DIR [logs/launch].
set -euo pipefail

: "${CONFIG:?set CONFIG to the TOML file of the run}"
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
DEVICE=${DEVICE:-cuda}
ZERO_STAGE=${ZERO_STAGE:-1}
BIN=${BIN:-target/release/pretrain}
LOG_DIR=${LOG_DIR:-logs/launch}
if (( NNODES > 1 )); then
    : "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0 (the same on every node)}"
fi
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
export MASTER_PORT=${MASTER_PORT:-29500}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
WORLD_SIZE=$((NNODES * NPROC_PER_NODE))
mkdir -p "$LOG_DIR"

pids=()
stop() {
    # End only the ranks this script started.
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM

for ((local = 0; local < NPROC_PER_NODE; local++)); do
    rank=$((NODE_RANK * NPROC_PER_NODE + local))
    RANK=$rank WORLD_SIZE=$WORLD_SIZE LOCAL_RANK=$local \
        "$BIN" --config "$CONFIG" --device "$DEVICE" --set "parallel.zero_stage=$ZERO_STAGE" "$@" \
        >"$LOG_DIR/rank-$rank.log" 2>&1 &
    pids+=("$!")
    echo "rank $rank (local $local) pid $! → $LOG_DIR/rank-$rank.log" >&2
done

# Wait for all (the ranks are this shell's only children); if one fails, stop the rest (they would
# otherwise wait for the collective timeout).
status=0
for ((left = ${#pids[@]}; left > 0; left--)); do
    if ! wait -n; then
        status=1
        echo "a rank failed; stopping the others (see $LOG_DIR)" >&2
        stop
        wait || true
        break
    fi
done
exit "$status"
