#!/usr/bin/env bash
# The CUDA path without a GPU: the twin of tools/device-check.sh, run on the emulated device
# (emu/: the driver, cuBLASLt and NCCL as one shared object, llama-cpt's kernels compiled for the
# host). Builds what it needs, then runs
#   - the emulator's own tests (cargo test -p llama-cpt-emu),
#   - every CUDA test of tests/cuda_kernels.rs, the #[ignore]d GPU tests included, in thread
#     order and again with the block's threads in reverse and random order,
#   - the seed-scale memory check (tools/seed-scale/measure.sh --check: the shapes-only device),
#   - the embedded default `pretrain --device cuda` in f32 and bf16, compared step by step with
#     the CPU runs (bound below), `evaluate` and `generate --device cuda` against the CPU,
#   - the sanitizer runs (emu/cxx/tests/sanitizers.sh: planted bugs caught; tools/emu-sanitize.sh:
#     every entry point under ASan and TSan on the CUDA tests' shapes), the mpirun + NCCL rows
#     (tools/emu-nccl-check.sh),
# and prints one table last (check, result, figure); exits non-zero on any failure.
#
# The emulated path is chosen only by the library path: target/emu-lib/ holds libcuda.so,
# libcublasLt.so and libnccl.so, three links to target/release/libllama_cpt_emu.so (the loader
# maps one file once, so the three share its state). LLAMA_CPT_EMU_DEVICE=a100 emulates an
# A100 instead of the default H100 (emu/README.md).
#
# Usage: tools/emu-check.sh [--quick]   (--quick: skip the mpirun and sanitizer rows)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
quick=0
[ "${1:-}" = "--quick" ] && quick=1
OUT=${EMU_CHECK_OUT:-target/emu-check}
rm -rf "$OUT"
mkdir -p "$OUT"
start=$(date +%s)
rows=()
status=0
# row NAME PASS|FAIL FIGURE
row() {
    rows+=("$1	$2	$3")
    [ "$2" = PASS ] || status=1
    printf '== %s: %s (%s) [%ds]\n' "$1" "$2" "$3" "$(( $(date +%s) - start ))"
}
# shellcheck disable=SC2054  # "cuda,mpi" is one cargo argument, the comma is meant
FEATURES=(--release --features cuda,mpi)

echo "== build (emulator, binaries, CUDA test binary)"
if ! cargo build --release -p llama-cpt-emu >"$OUT/build.log" 2>&1 ||
    ! cargo build "${FEATURES[@]}" --bin pretrain --bin evaluate --bin generate >>"$OUT/build.log" 2>&1 ||
    ! cargo test "${FEATURES[@]}" --test cuda_kernels --no-run >>"$OUT/build.log" 2>&1; then
    tail -30 "$OUT/build.log"
    row build FAIL "see $OUT/build.log"
    printf '%s\n' "${rows[@]}"
    exit 1
fi
row build PASS "$(( $(date +%s) - start )) s"

LIB=target/emu-lib
mkdir -p "$LIB"
for name in libcuda.so libcuda.so.1 libcublasLt.so libnccl.so libnccl.so.2; do
    ln -sfn ../release/libllama_cpt_emu.so "$LIB/$name"
done
EMU_ENV=(env "LD_LIBRARY_PATH=$PWD/$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
BIN=target/release

# The emulator's own tests (streams, driver, cuBLASLt against ops::matmul, kernels side, NCCL).
t0=$(date +%s)
if cargo test --release -p llama-cpt-emu >"$OUT/emu-tests.log" 2>&1; then
    row emu-unit-tests PASS "$(grep -E '^test result' "$OUT/emu-tests.log" | awk '{s+=$4} END {print s}') passed ($(( $(date +%s) - t0 )) s)"
else
    row emu-unit-tests FAIL "see $OUT/emu-tests.log"
fi

# Every CUDA test, the ignored GPU tests included, on the emulated card, in thread order and then
# with the block's threads run in other orders (LLAMA_CPT_EMU_SCHEDULE): a missing barrier whose
# race thread order happens to avoid gives a wrong result in one of them (planted: the dK/dV
# kernel's loop-start barrier fails under both, the forward's under thread order and reverse).
# All three draw the same inputs (one CUDA_TEST_SEED) and run a launch's blocks one after the other
# (LLAMA_CPT_EMU_THREADS=1: the atomic adds of the fused attention backward then land in one
# order), and log a digest of every kernel's buffers after each run (LLAMA_CPT_EMU_DIGEST_LOG):
# the three logs must agree bit for bit, so a race that changes a result by less than a test's
# tolerance is still caught, with the kernel named.
seed=${CUDA_TEST_SEED:-$(( (RANDOM << 15) | RANDOM ))}
for schedule in thread-order reverse random:1; do
    t0=$(date +%s)
    name=cuda-tests-schedule-$schedule log="$OUT/cuda-tests-${schedule%%:*}.log"
    [ "$schedule" = thread-order ] && name=cuda-tests log="$OUT/cuda-tests.log"
    rm -f "$OUT/digests-${schedule%%:*}.log"
    if "${EMU_ENV[@]}" LLAMA_CPT_EMU_SCHEDULE="$schedule" CUDA_TEST_SEED="$seed" LLAMA_CPT_EMU_THREADS=1 \
        LLAMA_CPT_EMU_DIGEST_LOG="$PWD/$OUT/digests-${schedule%%:*}.log" \
        cargo test "${FEATURES[@]}" --test cuda_kernels -- --include-ignored --test-threads=1 >"$log" 2>&1; then
        row "$name" PASS "$(grep -E '^test result' "$log" | sed 's/test result: ok. //; s/;.*//') (seed $seed, $(( $(date +%s) - t0 )) s)"
    else
        row "$name" FAIL "$(grep -E '\.\.\. FAILED' "$log" | sed 's/^test //; s/ \.\.\. FAILED//' | paste -sd' '), see $log"
    fi
done
# compare_digests A B: "" when the two logs hold the same launches with the same digests, else the
# first launch of A (in launch order) that B does not have, or the two counts.
compare_digests() {
    local a=$1 b=$2
    if [ "$(wc -l <"$a")" != "$(wc -l <"$b")" ]; then
        echo "$(wc -l <"$a") launches against $(wc -l <"$b")"
        return
    fi
    awk 'NR == FNR { missing[$0] = 1; next } { seq = $1; $1 = ""; if (substr($0, 2) in missing) { print "launch #" seq ":" $0; exit } }' \
        <(comm -23 <(cut -d' ' -f2- "$a" | sort) <(cut -d' ' -f2- "$b" | sort)) <(sort -n "$a")
}
first=""
for schedule in reverse random; do
    first=$(compare_digests "$OUT/digests-thread-order.log" "$OUT/digests-$schedule.log")
    [ -n "$first" ] && first="thread order vs $schedule: $(echo "$first" | cut -c1-100)" && break
done
if [ ! -s "$OUT/digests-thread-order.log" ]; then
    row cuda-tests-bit-for-bit FAIL "no digests logged, see $OUT/cuda-tests.log"
elif [ -n "$first" ]; then
    row cuda-tests-bit-for-bit FAIL "$first"
else
    row cuda-tests-bit-for-bit PASS "$(wc -l <"$OUT/digests-thread-order.log") launches, every buffer identical in thread order, reverse and random:1"
fi

# The seed's memory on the shapes-only device (#23): a real TinyLlama-1.1B step at 2,048 context as
# rank 0 of a virtual world of 8, ZeRO-1/2 with and without checkpointing, within 5% of the plan.
t0=$(date +%s)
if LIB="$PWD/$LIB" bash tools/seed-scale/measure.sh --check >"$OUT/seed-scale.log" 2>&1; then
    row seed-scale-memory PASS "4 configurations within 5% of zero-plan ($(grep -oE 'ratio [0-9.]+' "$OUT/seed-scale.log" | awk '{print $2}' | paste -sd/), $(( $(date +%s) - t0 )) s)"
else
    row seed-scale-memory FAIL "$(grep -v '(ok)' "$OUT/seed-scale.log" | head -1 | cut -c1-120), see $OUT/seed-scale.log"
fi

# The embedded default model and data, a few steps of each stage with 2 rows of 128 tokens (the
# emulated kernels run a few hundred tokens a second on 2 cores), every step logged, one
# validation batch at each stage's end.
STEPS=(--set stages.0.steps=3 --set stages.1.steps=2 --set data.micro_batch_rows=2 --set stages.0.global_batch_rows=2
    --set stages.1.global_batch_rows=2 --set run.log_every=1 --set run.eval_batches=1 --set run.checkpoint_every=1000)
pretrain() { # name device precision
    local dir="$OUT/pretrain-$1"
    "${EMU_ENV[@]}" timeout 900 "$BIN/pretrain" --device "$2" --precision "$3" "${STEPS[@]}" --out "$dir" >"$dir.log" 2>&1
}
for p in f32 bf16; do
    pretrain "cpu-$p" cpu "$p" || row "pretrain-cpu-$p" FAIL "see $OUT/pretrain-cpu-$p.log"
done
# Bound of |loss_cuda - loss_cpu| per step (see README "The CUDA path without a GPU"), from
# E(t) = max over s <= t of |loss_cpu_bf16(s) - loss_cpu_f32(s)|, what rounding the model to bf16
# moves the loss on the CPU, plus f32 round-off of the loss (1e-5 relative). The embedded default
# has head_dim 64 and GQA 2:1, so both CUDA runs take the tensor-core attention.
# - f32: the CUDA run rounds a subset of what a bf16 run rounds (the attention tiles fed to the
#   tensor cores, P included): B = E.
# - bf16: the CUDA run is another bf16 rounding of the same f32 model (Cpu::bf16's tensors,
#   possibly to the neighbouring value where a different summation order crosses a rounding
#   boundary, and P): each of the two runs lies within about E of the f32 run, so B = 2E.
compare() { # precision cuda_run cpu_run
    python3 - "$OUT/pretrain-$2/metrics.jsonl" "$OUT/pretrain-$3/metrics.jsonl" \
        "$OUT/pretrain-cpu-f32/metrics.jsonl" "$OUT/pretrain-cpu-bf16/metrics.jsonl" "$1" <<'PYEOF'
import json, sys
factor = 2.0 if sys.argv[5] == "bf16" else 1.0
def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if "loss" in r}
got, want, f32, bf16 = (losses(p) for p in sys.argv[1:5])
steps = sorted(want)
assert steps and sorted(got) == steps, f"steps differ: {sorted(got)} vs {steps}"
worst, envelope, ok = 0.0, 0.0, True
for s in steps:
    envelope = max(envelope, abs(bf16[s] - f32[s]))
    bound = factor * envelope + 1e-5 * abs(want[s])
    d = abs(got[s] - want[s])
    worst = max(worst, d / bound)
    print(f"step {s}: cuda {got[s]:.6f} cpu {want[s]:.6f} |diff| {d:.2e} bound {bound:.2e}")
    ok &= d <= bound
print(f"FIGURE max |diff|/bound {worst:.2f} over {len(steps)} steps")
sys.exit(0 if ok else 1)
PYEOF
}
for p in f32 bf16; do
    t0=$(date +%s)
    if ! pretrain "cuda-$p" cuda "$p"; then
        row "pretrain-cuda-$p" FAIL "see $OUT/pretrain-cuda-$p.log"
    elif compare "$p" "cuda-$p" "cpu-$p" >"$OUT/compare-$p.log" 2>&1; then
        row "pretrain-cuda-$p" PASS "$(grep FIGURE "$OUT/compare-$p.log" | sed 's/FIGURE //') ($(( $(date +%s) - t0 )) s)"
    else
        row "pretrain-cuda-$p" FAIL "$(tail -1 "$OUT/compare-$p.log"), see $OUT/compare-$p.log"
    fi
done

# evaluate and generate on a model the CPU trained through the whole embedded default (44 steps, a
# few seconds), so that greedy decoding has something to say.
timeout 600 "$BIN/pretrain" --device cpu --out "$OUT/pretrain-cpu-full" >"$OUT/pretrain-cpu-full.log" 2>&1
MODEL="$OUT/pretrain-cpu-full/stage-knowledge-replay"
if [ -d "$MODEL" ]; then
    for dev in cpu cuda; do
        "${EMU_ENV[@]}" timeout 600 "$BIN/evaluate" --model "$MODEL" --text "heldout=$OUT/pretrain-cpu-full/data/heldout-text.jsonl" --json "$OUT/eval-$dev.json" --device "$dev" >"$OUT/eval-$dev.log" 2>&1
        "${EMU_ENV[@]}" timeout 600 "$BIN/generate" --model "$MODEL" --prompt "The " --max-new-tokens 24 --ids --device "$dev" >"$OUT/generate-$dev.json" 2>"$OUT/generate-$dev.log"
    done
    if python3 - "$OUT/eval-cpu.json" "$OUT/eval-cuda.json" >"$OUT/compare-eval.log" 2>&1 <<'PYEOF'
import json, sys
def numbers(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, float(x)
cpu, cuda = (dict(numbers(json.load(open(p)))) for p in sys.argv[1:3])
assert cpu.keys() == cuda.keys(), f"fields differ: {cpu.keys() ^ cuda.keys()}"
# f32 forward only, and at head_dim 32 attention is the f32 simple kernel (no bf16 tiles): the
# numbers differ by f32 summation order alone, accumulated over the held-out set: 1e-4 relative.
worst = max(abs(cuda[k] - cpu[k]) / max(abs(cpu[k]), 1e-12) for k in cpu)
print(f"FIGURE max relative difference {worst:.2e} over {len(cpu)} numbers")
sys.exit(0 if worst <= 1e-4 else 1)
PYEOF
    then
        row evaluate-cuda PASS "$(grep FIGURE "$OUT/compare-eval.log" | sed 's/FIGURE //')"
    else
        row evaluate-cuda FAIL "$(tail -1 "$OUT/compare-eval.log"), see $OUT/eval-cuda.log"
    fi
    if [ -s "$OUT/generate-cpu.json" ] && python3 - "$OUT/generate-cpu.json" "$OUT/generate-cuda.json" >"$OUT/compare-generate.log" 2>&1 <<'PYEOF'
import json, sys
def ids(path):
    d = json.load(open(path))
    return d["ids"] if isinstance(d, dict) else d
cpu, cuda = ids(sys.argv[1]), ids(sys.argv[2])
print(f"FIGURE {len(cuda)} greedy tokens, {'identical' if cpu == cuda else 'DIFFERENT'}: cpu {cpu} cuda {cuda}")
sys.exit(0 if cpu == cuda else 1)
PYEOF
    then
        row generate-cuda PASS "$(grep FIGURE "$OUT/compare-generate.log" | sed 's/FIGURE //' | cut -c1-60)"
    else
        row generate-cuda FAIL "$(tail -1 "$OUT/compare-generate.log" | cut -c1-120), see $OUT/generate-cuda.log"
    fi
else
    row evaluate-cuda FAIL "no model from the CPU run, see $OUT/pretrain-cpu-full.log"
    row generate-cuda FAIL "no model from the CPU run, see $OUT/pretrain-cpu-full.log"
fi

if [ $quick = 0 ]; then
    # The emulated compute-sanitizer (E1): memcheck with ASan, racecheck with TSan.
    t0=$(date +%s)
    if bash emu/cxx/tests/sanitizers.sh "$OUT/sanitizers" >"$OUT/sanitizers.log" 2>&1; then
        row sanitizers PASS "$(grep -oE 'all [0-9]+ checks passed' "$OUT/sanitizers.log") (ASan: shared and global off-by-one caught; TSan: missing barrier caught; a barrier thread order hides shown in reverse and random order; $(( $(date +%s) - t0 )) s)"
    else
        row sanitizers FAIL "see $OUT/sanitizers.log"
    fi
    # Every entry point of cuda/*.cu under the sanitizers, on the CUDA tests' shapes
    # (tools/emu-sanitize.sh): memcheck and initcheck with ASan, exact-size allocations and 0x7f
    # poison over every test; racecheck with TSan over the kernel tests.
    for mode in address thread; do
        t0=$(date +%s)
        name=memcheck-every-kernel
        [ $mode = thread ] && name=racecheck-every-kernel
        log="$OUT/sanitize-$mode.log"
        if EMU_SANITIZE_OUT="$OUT/sanitize-$mode" tools/emu-sanitize.sh $mode >"$log" 2>&1; then
            row "$name" PASS "$(tail -1 "$log" | sed 's/^emu-sanitize [a-z]*: //')"
        else
            row "$name" FAIL "$(tail -1 "$log" | cut -c1-160)"
        fi
    done
    # ---- mpirun + NCCL rows (E3: tools/emu-nccl-check.sh prints name, result, figure lines) ----
    if [ -x tools/emu-nccl-check.sh ] || [ -f tools/emu-nccl-check.sh ]; then
        while IFS=$'\t' read -r name result figure; do
            [ -n "$name" ] && row "$name" "$result" "$figure"
        done < <(bash tools/emu-nccl-check.sh "$LIB" "$OUT/nccl" 2>"$OUT/nccl-check.stderr")
    fi
    # ---- end of the mpirun rows ----
fi

echo
echo "emu-check: $(( $(date +%s) - start )) s on $(nproc) cores"
printf '%-36s %-6s %s\n' check result figure
for r in "${rows[@]}"; do
    IFS=$'\t' read -r name result figure <<<"$r"
    printf '%-36s %-6s %s\n' "$name" "$result" "$figure"
done
exit $status
