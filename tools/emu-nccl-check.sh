#!/usr/bin/env bash
# The mpirun + NCCL rows of tools/emu-check.sh: `pretrain --device cuda` under `mpirun -np 2/3`
# with ZeRO-1 and ZeRO-2 against one process, the NCCL fault test (SIGSTOP / SIGKILL one of three
# ranks: the others stop with the watchdog's error, and a restart resumes), and SIGKILL of one of
# three ranks started without a launcher (the others notice the death themselves), and the host
# syncs per step that `--profile` counts at 2 ranks and two depths; then the same across simulated
# nodes (mpirun over two network namespaces, torchrun-style launches per node with a node that
# dies and one that never joins, Slurm's sbatch with a cancel and a requeue). All are the
# `#[ignore]`d CUDA tests of tests/parallel_mpi.rs and tests/multi_node.rs, run on the emulated device.
#
# Usage: tools/emu-nccl-check.sh LIBDIR LOGDIR
#   LIBDIR holds the emulated libcuda.so / libcublasLt.so / libnccl.so (tools/emu-check.sh makes
#   it); logs go to LOGDIR. Prints one tab-separated line per check: name, PASS|FAIL, figure.
#   Exits non-zero if a check failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
libdir=$(realpath "${1:?usage: $0 LIBDIR LOGDIR}")
logdir=${2:?usage: $0 LIBDIR LOGDIR}
mkdir -p "$logdir"
export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# One emulated card per local rank of the largest job.
export LLAMA_CPT_EMU_GPUS=3
# These runs hold N ranks to one process at f32 tolerances (loss 1e-5, parameters 5e-4 of their
# max): the f32 attention kernels, since the tensor-core ones round their tiles to bf16 and a
# different reduction order across world sizes moves values across bf16 rounding boundaries
# (measured with the tensor-core kernels on the head_dim 64 default: parameters 5.5e-3 apart).
export LLAMA_CPT_ATTN=simple
status=0

# row NAME TEST FIGURE_PATTERN [TEST_FILE]: runs one ignored test of tests/TEST_FILE.rs
# [parallel_mpi]; the figure is what its output matches of the pattern (the test prints its
# measurements), and the time taken.
row() {
    local name=$1 test=$2 pattern=$3 file=${4:-parallel_mpi} log="$logdir/$1.log" t0 secs figure
    t0=$(date +%s)
    if cargo test --release --features cuda,mpi --test "$file" -- --ignored --exact "$test" --nocapture --test-threads=1 >"$log" 2>&1; then
        secs=$(( $(date +%s) - t0 ))
        figure=$(grep -oE "$pattern" "$log" | tr '\n' ';' | sed 's/;$//')
        printf '%s\tPASS\t%s (%d s)\n' "$name" "${figure:-}" "$secs"
    else
        secs=$(( $(date +%s) - t0 ))
        printf '%s\tFAIL\tsee %s (%d s)\n' "$name" "$log" "$secs"
        status=1
    fi
}

row mpirun-nccl-np2-np3-zero1-zero2 nccl_at_2_and_3_ranks_with_zero_1_and_2_follows_one_process 'NCCL [23] ranks, ZeRO-[12]: [^(]*'
row mpirun-nccl-profile-np2 nccl_steps_sync_the_host_three_times_at_any_depth 'NCCL 2 ranks, [0-9]+ layers, ZeRO-[02]: [0-9.]+ host syncs per step'
row mpirun-nccl-fault-np3 a_dead_or_stalled_nccl_rank_stops_the_others_and_the_run_resumes 'SIG[A-Z]+ to rank 1 of 3: job stopped after [0-9.]+s'
row nccl-kill-no-launcher-np3 a_killed_nccl_rank_is_named_by_the_others_without_a_launcher_to_end_them 'the others stopped after [0-9.]+m?s'
# Across simulated nodes (tools/sim-nodes.sh: network namespaces; needs root), tests/multi_node.rs.
row nodes-mpirun-nccl-2x nccl_multi_node_script_on_two_nodes_follows_one_process 'NCCL 4 ranks on 2 nodes \(multi-node.sh\), ZeRO-2: [^(]*' multi_node
row nodes-torchrun-2x torchrun_style_on_two_nodes_trains_names_a_dead_node_and_resumes '(ZeRO-2: loss [^(]*|node0.s ranks stopped after [0-9.]+m?s|resumed from step [0-9]+)' multi_node
row nodes-never-joins a_node_that_never_joins_is_named_not_waited_for 'node0 stopped after [0-9.]+m?s' multi_node
row nodes-slurm slurm_sbatch_trains_and_resumes_after_a_cancel_and_a_requeue '(loss ≤ [^ ]+ against one process|gone after [0-9.]+m?s|parameters bit-identical|parameters within bounds)' multi_node
exit $status
