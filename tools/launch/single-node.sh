#!/usr/bin/env bash
# One node, one rank per GPU (or per CPU slice), started by Open MPI's mpirun.
#
#   CONFIG=runs/cpt.toml tools/launch/single-node.sh [more pretrain flags…]
#   NPROC=4 DEVICE=cpu THREADS=4 CONFIG=… tools/launch/single-node.sh   # CPU ranks (build with --features mpi)
#
# Environment (defaults in brackets): CONFIG (required), NPROC [8], DEVICE [cuda], ZERO_STAGE [1],
# BIN [target/release/pretrain], THREADS (CPU ranks: rayon threads per rank), MASTER_ADDR
# [127.0.0.1], MASTER_PORT [29500], MPIRUN_ARGS (extra mpirun flags, e.g. --allow-run-as-root).
# Every NCCL_* and LLAMA_CPT_* variable set here is forwarded to the ranks.
set -euo pipefail

: "${CONFIG:?set CONFIG to the TOML file of the run}"
NPROC=${NPROC:-8}
DEVICE=${DEVICE:-cuda}
ZERO_STAGE=${ZERO_STAGE:-1}
BIN=${BIN:-target/release/pretrain}
# GPU ranks share NCCL's unique id through a TCP rendezvous at MASTER_ADDR:MASTER_PORT (rank 0 listens).
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
export MASTER_PORT=${MASTER_PORT:-29500}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

[[ -x $BIN ]] || { echo "no $BIN: build it first (cargo build --release --features cuda, or --features mpi for CPU ranks)" >&2; exit 1; }

forward=(-x MASTER_ADDR -x MASTER_PORT -x PATH)
while IFS= read -r v; do forward+=(-x "$v"); done < <(compgen -e | grep -E '^(LD_LIBRARY_PATH|NCCL_.*|LLAMA_CPT_.*|CUDA_DEVICE_MAX_CONNECTIONS|RUST_BACKTRACE)$' || true)

threads=()
[[ -n ${THREADS:-} ]] && threads=(--threads "$THREADS")

# --bind-to none: the trainer picks its GPU from its local rank and runs its own thread pool;
# Open MPI's default core binding would squeeze each rank's threads onto one core.
# shellcheck disable=SC2086
exec mpirun -np "$NPROC" --map-by slot --bind-to none ${MPIRUN_ARGS:-} "${forward[@]}" \
    "$BIN" --config "$CONFIG" --device "$DEVICE" --set "parallel.zero_stage=$ZERO_STAGE" "${threads[@]}" "$@"
