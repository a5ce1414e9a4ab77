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
#   - the sanitizer runs (emu/cxx/tests/sanitizers.sh), the mpirun + NCCL rows
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

# Every CUDA test, the ignored GPU tests included, on the emulated card.
t0=$(date +%s)
if "${EMU_ENV[@]}" cargo test "${FEATURES[@]}" --test cuda_kernels -- --include-ignored --test-threads=1 >"$OUT/cuda-tests.log" 2>&1; then
    row cuda-tests PASS "$(grep -E '^test result' "$OUT/cuda-tests.log" | sed 's/test result: ok. //; s/;.*//') ($(( $(date +%s) - t0 )) s)"
else
    row cuda-tests FAIL "$(grep -cE '\.\.\. FAILED' "$OUT/cuda-tests.log") failed, see $OUT/cuda-tests.log"
fi

# The same tests with the block's threads run in other orders (LLAMA_CPT_EMU_SCHEDULE): a missing
# barrier whose race thread order happens to avoid gives a wrong result in one of them (planted:
# the dK/dV kernel's loop-start barrier fails under both, the forward's under thread order and
# reverse).
for schedule in reverse random:1; do
    t0=$(date +%s)
    log="$OUT/cuda-tests-${schedule%%:*}.log"
    if "${EMU_ENV[@]}" LLAMA_CPT_EMU_SCHEDULE="$schedule" cargo test "${FEATURES[@]}" --test cuda_kernels -- --include-ignored --test-threads=1 >"$log" 2>&1; then
        row "cuda-tests-schedule-$schedule" PASS "$(grep -E '^test result' "$log" | sed 's/test result: ok. //; s/;.*//') ($(( $(date +%s) - t0 )) s)"
    else
        row "cuda-tests-schedule-$schedule" FAIL "$(grep -E '\.\.\. FAILED' "$log" | sed 's/^test //; s/ \.\.\. FAILED//' | paste -sd' '), see $log"
    fi
done

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
