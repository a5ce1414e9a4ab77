#!/usr/bin/env bash
# The emulated compute-sanitizer over every kernel the CUDA tests launch (#24 item 3): builds the
# emulator with its C++ side (the block runtime and every cuda/*.cu compiled for the host) under
# AddressSanitizer (`address`: memcheck, out-of-bounds global, shared and local accesses) or
# ThreadSanitizer (`thread`: racecheck, shared-memory accesses between two threads of a block not
# ordered by a barrier or a warp collective), preloads the sanitizer's runtime into the
# uninstrumented Rust test binary, and runs every test of tests/cuda_kernels.rs (the #[ignore]d
# GPU ones included) on it with
#   - every device allocation exactly the size asked for (LLAMA_CPT_CUDA_EXACT_ALLOC=1; the
#     emulator's heap blocks get ASan's red zones), so one element past a buffer is a report,
#   - a log of the kernels that ran (LLAMA_CPT_EMU_KERNEL_LOG): an entry point of cuda/*.cu that no
#     test launched fails the run, by name,
#   - under `address`, device and shared memory poisoned with 0x7f bytes (3.4e38 as f32 and bf16)
#     instead of NaN (LLAMA_CPT_EMU_POISON, and LLAMA_CPT_CUDA_POISON=huge for the outputs the
#     tests poison themselves): the initcheck, a kernel that reads memory nobody wrote gives a huge
#     value where NaN could have been skipped by fmaxf or a comparison.
# Fails on any report; the report's summary line names the kernel and the source line.
# Usage: tools/emu-sanitize.sh address|thread [test name...]   (needs libasan / libtsan of CXX,
# default c++). The sanitized library lives in its own target directory, target/emu-MODE.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
mode=${1:-}
case $mode in
    address) runtime_lib=libasan.so poison=0x7f test_poison=huge ;;
    thread) runtime_lib=libtsan.so poison=0xff test_poison=nan ;;
    *)
        echo "usage: tools/emu-sanitize.sh address|thread [test name...]" >&2
        exit 2
        ;;
esac
shift
OUT=${EMU_SANITIZE_OUT:-target/emu-sanitize-$mode}
TARGET=target/emu-$mode
mkdir -p "$OUT"
rm -f "$OUT/kernels.log" "$OUT/tests.log"

if ! LLAMA_CPT_EMU_SANITIZE=$mode CARGO_TARGET_DIR=$TARGET cargo build --release -p llama-cpt-emu >"$OUT/build.log" 2>&1; then
    tail -20 "$OUT/build.log"
    echo "emu-sanitize $mode: building the sanitized emulator failed (see $OUT/build.log)"
    exit 1
fi
lib=$TARGET/emu-lib
mkdir -p "$lib"
for name in libcuda.so libcuda.so.1 libcublasLt.so libnccl.so libnccl.so.2; do
    ln -sfn ../release/libllama_cpt_emu.so "$lib/$name"
done
if ! cargo test --release --features cuda,mpi --test cuda_kernels --no-run >"$OUT/test-build.log" 2>&1; then
    tail -20 "$OUT/test-build.log"
    echo "emu-sanitize $mode: building tests/cuda_kernels.rs failed (see $OUT/test-build.log)"
    exit 1
fi
binary=$(sed -n 's/.*(\(target\/release\/deps\/cuda_kernels-[0-9a-f]*\)).*/\1/p' "$OUT/test-build.log" | tail -1)
runtime=$(${CXX:-c++} -print-file-name=$runtime_lib)
if [ -z "$binary" ] || [ ! -f "$runtime" ]; then
    echo "emu-sanitize $mode: no test binary ('$binary') or no $runtime_lib ('$runtime')"
    exit 1
fi

# The tests, each in a process of its own (a report names its test; times per test in the log):
# under `address` every test of the file but the side-by-side script's, which runs PyTorch in a
# child process that would inherit the preload and launches none of our kernels; under `thread`
# (10-50x slower) the kernel tests, which launch every entry point, not the model-level ones that
# launch the same kernels again at other shapes. Arguments replace the list.
if [ $# -gt 0 ]; then
    tests=("$@")
elif [ "$mode" = address ]; then
    mapfile -t tests < <("$binary" --include-ignored --list 2>/dev/null | sed -n 's/: test$//p' |
        grep -vx the_side_by_side_script_runs_and_pairs_every_row_with_pytorch)
else
    tests=(upload_download_clone_and_elementwise embedding_forward_and_deterministic_backward rmsnorm_forward_backward_matches_cpu
        rope_both_directions_match_cpu attention_tensor_core_kernels_match_cpu attention_pipelined_forward_matches_the_cpu_and_the_tiled_kernel
        attention_fused_backward_matches_the_deterministic_one_and_the_cpu attention_simple_kernels_match_cpu swiglu_forward_backward_matches_cpu
        cross_entropy_matches_cpu_with_ignored_targets sum_squares_and_adamw_match_cpu bf16_casts_round_to_nearest_even
        mixed_precision_kernels_match_the_bf16_cpu_reference fused_adamw_writes_the_master_and_its_bf16_parameter
        multi_tensor_adamw_equals_one_launch_per_tensor)
fi
# halt_on_error: the first report ends the test's process. ignore_noninstrumented_modules: only
# the instrumented kernels' accesses count for TSan, not the Rust side's memcpy and free, whose
# synchronisation (futexes) TSan cannot see.
export LD_PRELOAD_LIB=$runtime LIB_DIR=$PWD/$lib POISON=$poison TEST_POISON=$test_poison BINARY=$binary TEST_OUT=$PWD/$OUT/tests
run_one() { # test name: its log in $TEST_OUT/NAME.log, ending with a line of its exit status and
    # time; the kernels it ran, at which launch shapes, in $TEST_OUT/NAME.kernels
    local t0 rc
    t0=$(date +%s)
    env LD_PRELOAD="$LD_PRELOAD_LIB" LD_LIBRARY_PATH="$LIB_DIR" LLAMA_CPT_CUDA_EXACT_ALLOC=1 \
        LLAMA_CPT_EMU_KERNEL_LOG="$TEST_OUT/$1.kernels" LLAMA_CPT_EMU_POISON="$POISON" LLAMA_CPT_CUDA_POISON="$TEST_POISON" \
        RUST_BACKTRACE=0 \
        ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 \
        TSAN_OPTIONS=halt_on_error=1:ignore_noninstrumented_modules=1:report_signal_unsafe=0 \
        "$BINARY" --include-ignored --test-threads=1 --exact "$1" >"$TEST_OUT/$1.log" 2>&1
    rc=$?
    echo "emu-sanitize: $1: exit $rc, $(( $(date +%s) - t0 )) s" >>"$TEST_OUT/$1.log"
}
export -f run_one
rm -rf "$TEST_OUT"
mkdir -p "$TEST_OUT"
# Side by side, one per core (TSan runs a launch's blocks one at a time, ASan's small launches
# leave cores idle).
start=$(date +%s)
printf '%s\n' "${tests[@]}" | xargs -P "$(nproc)" -I{} bash -c 'run_one "$1"' _ {}
for t in "${tests[@]}"; do
    cat "$TEST_OUT/$t.log" >>"$OUT/tests.log"
    [ -f "$TEST_OUT/$t.kernels" ] && sed "s/\$/ test=$t/" "$TEST_OUT/$t.kernels" >>"$OUT/kernels.log"
done
# Per entry point: the launch shapes it ran at and the tests that ran it (their problem shapes are
# in tests/cuda_kernels.rs).
awk '$1 == "ran" { t = $6; sub(/^test=/, "", t); g = $3 " " $4 " " $5
        if (!(($2, g) in seen)) { seen[$2, g] = 1; n[$2]++ }
        if (!(($2, t) in had)) { had[$2, t] = 1; tests[$2] = tests[$2] (tests[$2] == "" ? "" : ", ") t } }
    END { for (k in n) printf "%s: %d launch shapes; %s\n", k, n[k], tests[k] }' "$OUT/kernels.log" | sort >"$OUT/coverage.txt"
for t in "${tests[@]}"; do
    log=$TEST_OUT/$t.log
    if grep -q "Sanitizer" "$log"; then
        # The entry point is the kernel the runtime's trampoline called (the top frames may be
        # helpers inlined into it).
        kernel=$(grep -m1 -oE 'Trampoline<&[A-Za-z0-9_]+>' "$log" | sed 's/Trampoline<&//; s/>//')
        echo "emu-sanitize $mode: REPORT in kernel ${kernel:-?} (test $t): $(grep -m1 '^SUMMARY' "$log" | cut -c1-200) (log $log)"
        exit 1
    fi
    if ! grep -q "test result: ok. 1 passed" "$log"; then
        echo "emu-sanitize $mode: $t failed ($(tail -1 "$log" | sed 's/^emu-sanitize: //'); log $log)"
        exit 1
    fi
done
seconds=$(( $(date +%s) - start ))
entries=$(sed -n 's/^entry \([^ ]*\).*/\1/p' "$OUT/kernels.log" | sort -u)
ran=$(sed -n 's/^ran \([^ ]*\).*/\1/p' "$OUT/kernels.log" | sort -u)
missed=$(comm -23 <(echo "$entries") <(echo "$ran"))
if [ $# -eq 0 ] && [ -n "$missed" ]; then
    echo "emu-sanitize $mode: these kernels never ran under the sanitizer: $(echo "$missed" | paste -sd' ')"
    exit 1
fi
echo "emu-sanitize $mode: ${#tests[@]} tests passed, $(echo "$ran" | grep -c .) of $(echo "$entries" | grep -c .) kernels ran, no report (${seconds} s; shapes per kernel: $OUT/coverage.txt)"
