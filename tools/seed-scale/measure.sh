#!/usr/bin/env bash
# The seed's memory, measured: `pretrain --dry-run` of tools/seed-scale/colossal-llama2.toml on the
# emulated device's shapes mode (LLAMA_CPT_EMU_MODE=shapes: device memory is address space only,
# nothing executes; a virtual world of --world ranks), beside zero-plan's figure.
#
#   tools/seed-scale/measure.sh           # the seed's table (docs/seed-scale.md), Markdown
#   tools/seed-scale/measure.sh --check   # CI: TinyLlama-1.1B at 2,048 context, world 8, ZeRO-1/2,
#                                         # checkpointing on and off: measured within 5% of the plan
#
# Needs target/release/pretrain (--features cuda) and target/emu-lib (tools/emu-check.sh makes it).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
LIB=${LIB:-$PWD/target/emu-lib}
BIN=target/release/pretrain
[ -x "$BIN" ] && [ -e "$LIB/libcuda.so" ] || { echo "needs $BIN (--features cuda) and $LIB/libcuda.so" >&2; exit 2; }

# dry MODEL MICRO ZERO CHECKPOINT SEQ WORLD → the first stage's summary line (all stages train
# every parameter, so the first is the seed's peak), or the error.
dry() {
    LLAMA_CPT_EMU_MODE=shapes LLAMA_CPT_EMU_MEMORY_GIB=1024 LD_LIBRARY_PATH="$LIB" "$BIN" \
        --config tools/seed-scale/colossal-llama2.toml --device cuda --dry-run --dry-run-steps 2 --world "$6" \
        --plan-card "${CARD:-a800}" --set "model.config=$1.json" --set "data.micro_batch_rows=$2" \
        --set "parallel.zero_stage=$3" --set "model.checkpoint_layers=$4" --set "data.seq_len=$5" \
        --set "stages.0.global_batch_rows=$(( $6 * $2 * 8 ))" --set "stages.1.global_batch_rows=$(( $6 * $2 * 8 ))" 2>&1 |
        grep -m1 '^dry-run summary' || echo "failed"
}
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }

if [ "${1:-}" = "--check" ]; then
    status=0
    for zero in 1 2; do
        for ck in true false; do
            line=$(dry tinyllama-1.1b 1 "$zero" "$ck" 2048 8)
            ratio=$(field ratio "$line")
            ok=$(awk -v r="${ratio:-0}" 'BEGIN { print (r >= 0.95 && r <= 1.05) ? "ok" : "off" }')
            echo "tinyllama-1.1b seq 2048 world 8 ZeRO-$zero checkpointing=$ck: measured $(field measured_gib "$line") GiB, plan $(field plan_gib "$line") GiB, ratio ${ratio:-?} ($ok)"
            [ "$ok" = ok ] || status=1
        done
    done
    exit $status
fi

echo "| model (V = 69,104) | ZeRO | micro-batch | checkpointing | measured peak in use (GiB) | plan (GiB) | measured / plan | reserved (GiB) | fits 80 GB | dry run (s) |"
echo "|---|---|---:|---|---:|---:|---:|---:|---|---:|"
row() {
    local t0 line
    t0=$(date +%s%N)
    line=$(dry "$1" "$2" "$3" "$4" 4096 64)
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %.1f |\n' "$1" "$3" "$2" "$4" \
        "$(field measured_gib "$line")" "$(field plan_gib "$line")" "$(field ratio "$line")" \
        "$(field reserved_gib "$line")" "$(field fits "$line")" "$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { print (b - a) / 1e9 }')"
}
# The largest micro-batch (1, 2, 4, … 64) whose measured peak fits, for each model.
largest() {
    local best=0 mb=1 line
    while [ $mb -le 64 ]; do
        line=$(dry "$1" "$mb" "$2" true 4096 64)
        [ "$(field fits "$line")" = true ] || break
        best=$mb
        mb=$(( mb * 2 ))
    done
    echo $best
}
for model in llama2-7b-69104 llama2-13b-69104; do
    row "$model" 1 2 true
    row "$model" 1 2 false
    row "$model" 1 1 true
    mb=$(largest "$model" 2)
    [ "$mb" -gt 1 ] && row "$model" "$mb" 2 true
done
row llama2-70b-69104 1 2 true
