#!/usr/bin/env bash
# Several nodes, one rank per GPU, started by Open MPI's mpirun over a hostfile (see
# hostfile.example: one line per node, "slots" = GPUs). Run it on the first node of the hostfile;
# every node needs the same paths (shared filesystem or identical copies) and passwordless ssh.
#
#   HOSTFILE=tools/launch/hostfile.example CONFIG=runs/cpt.toml tools/launch/multi-node.sh
#
# Environment (defaults in brackets): HOSTFILE and CONFIG (required), GPUS_PER_NODE [8],
# DEVICE [cuda], ZERO_STAGE [1], BIN [$PWD/target/release/pretrain], MASTER_ADDR [first host of the
# hostfile], MASTER_PORT [29500], MPI_IFACE (interface for Open MPI's own TCP traffic),
# MPIRUN_ARGS (extra mpirun flags). The NCCL_* defaults below suit an InfiniBand cluster; override
# any of them in the environment (tools/launch/README.md says what each does). Every NCCL_*,
# LLAMA_CPT_* and CUDA_DEVICE_MAX_CONNECTIONS set here is forwarded to every rank.
set -euo pipefail

: "${HOSTFILE:?set HOSTFILE (lines: \"node01 slots=8\")}"
: "${CONFIG:?set CONFIG to the TOML file of the run}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
DEVICE=${DEVICE:-cuda}
ZERO_STAGE=${ZERO_STAGE:-1}
BIN=${BIN:-$PWD/target/release/pretrain}

hosts=$(grep -vE '^\s*(#|$)' "$HOSTFILE" | awk '{print $1}')
nodes=$(wc -l <<<"$hosts")
NPROC=${NPROC:-$((nodes * GPUS_PER_NODE))}
export MASTER_ADDR=${MASTER_ADDR:-$(head -n1 <<<"$hosts")}
export MASTER_PORT=${MASTER_PORT:-29500}

# NCCL over InfiniBand (override per cluster; see README.md).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker0,virbr0}
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_IB_RETRY_CNT=${NCCL_IB_RETRY_CNT:-7}
# NCCL_IB_HCA (e.g. =mlx5_0,mlx5_1,…), NCCL_IB_GID_INDEX (RoCE: often 3) and NCCL_NET_GDR_LEVEL
# are cluster-specific: set them in the environment when NCCL_DEBUG=INFO shows the wrong choice.

forward=(-x MASTER_ADDR -x MASTER_PORT -x PATH)
while IFS= read -r v; do forward+=(-x "$v"); done < <(compgen -e | grep -E '^(LD_LIBRARY_PATH|NCCL_.*|LLAMA_CPT_.*|CUDA_DEVICE_MAX_CONNECTIONS|RUST_BACKTRACE)$' || true)

mca=()
[[ -n ${MPI_IFACE:-} ]] && mca=(--mca btl_tcp_if_include "$MPI_IFACE" --mca oob_tcp_if_include "$MPI_IFACE")

echo "launching $NPROC ranks on $nodes nodes ($GPUS_PER_NODE per node), rendezvous at $MASTER_ADDR:$MASTER_PORT" >&2
# ppr:N:node puts N consecutive ranks on each node, so OMPI_COMM_WORLD_LOCAL_RANK = GPU index.
# shellcheck disable=SC2086
exec mpirun -np "$NPROC" --hostfile "$HOSTFILE" --map-by "ppr:$GPUS_PER_NODE:node" --bind-to none \
    "${mca[@]}" ${MPIRUN_ARGS:-} "${forward[@]}" \
    "$BIN" --config "$CONFIG" --device "$DEVICE" --set "parallel.zero_stage=$ZERO_STAGE" "$@"
