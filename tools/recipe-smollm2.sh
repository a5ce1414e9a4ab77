#!/usr/bin/env bash
# The Colossal-LLaMA-2 recipe, end to end, on the one real model the project can reach
# (SmolLM2-135M-Instruct), on a CPU: docs/recipe-smollm2.md.
#
#   fetch model + corpora → import-gguf → train / held-out split → extend-vocab (Chinese pieces
#   learnt on the Chinese training split) → prepare-data (zh + English replay) → pretrain
#   (stage 1 "embeddings": embeddings only; stage 2 "zh-cpt": zh 3 : en 1, bucket order) →
#   evaluate base / extended / result → generate → OUT/results.md + OUT/results.json
#
# Every step is printed, keyed on its settings and on the steps before it, and skipped when a
# finished run with the same key is found in OUT (OUT/.steps/), so a rerun only redoes what
# changed; an interrupted pretrain resumes from its newest checkpoint.
#
# Knobs (environment):
#   OUT              output folder                      (default runs/smollm2-zh)
#   STAGE1_STEPS     stage 1 (embeddings only) steps    (default 20)
#   STAGE2_STEPS     stage 2 (full CPT) steps           (default 60)
#   SEQ_LEN          training sequence length           (default 256)
#   THREADS          CPU threads                        (default: all cores)
#   ROWS             rows per optimizer step            (default 8; MICRO_ROWS per micro-batch, default 2)
#   STAGE1_LR / STAGE2_LR                               (default 5e-4 / 1e-4)
#   TARGET_VOCAB     tokenizer size after extension     (default 57152 = 49152 + 8000)
#   EVAL_ZH_DOCS / EVAL_EN_DOCS  held-out documents scored by evaluate (0 = all; default 0 / 200)
#   MC_SHOTS         shots for the multiple-choice samples (default 5)
#   EVAL_EXTENDED    1: also score the extended, untrained model (default 1)
#   EVAL_EVERY       pretrain validation every N steps (default 0: off)
#   CHECKPOINT_EVERY pretrain checkpoints every N steps (default 0: stage ends only)
#   GEN_TOKENS       new tokens per generation          (default 16)
#   EN_PROMPT        the English prompt                 (default "The capital of France is")
#   BIN_DIR          the llama-cpt binaries             (default target/release)
#   SKIP_FETCH=1     do not run tools/fetch-{model,corpora}.sh (the files must be there)
#   PYTHON           python3 for the split and the report (standard library only)
#   MACHINE_NOTE     a sentence about the machine for results.md
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/runs/smollm2-zh}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BIN_DIR="${BIN_DIR:-$ROOT/target/release}"
PY="${PYTHON:-python3}"
STAGE1_STEPS="${STAGE1_STEPS:-20}"
STAGE2_STEPS="${STAGE2_STEPS:-60}"
SEQ_LEN="${SEQ_LEN:-256}"
THREADS="${THREADS:-$(nproc)}"
ROWS="${ROWS:-8}"
MICRO_ROWS="${MICRO_ROWS:-2}"
STAGE1_LR="${STAGE1_LR:-5e-4}"
STAGE2_LR="${STAGE2_LR:-1e-4}"
TARGET_VOCAB="${TARGET_VOCAB:-57152}"
EVAL_ZH_DOCS="${EVAL_ZH_DOCS:-0}"
EVAL_EN_DOCS="${EVAL_EN_DOCS:-200}"
MC_SHOTS="${MC_SHOTS:-5}"
EVAL_EXTENDED="${EVAL_EXTENDED:-1}"
EVAL_EVERY="${EVAL_EVERY:-0}"
CHECKPOINT_EVERY="${CHECKPOINT_EVERY:-0}"
CHECKPOINT_LAYERS="${CHECKPOINT_LAYERS:-false}"
GEN_TOKENS="${GEN_TOKENS:-16}"
ZH_PROMPT="离离原上草，"
EN_PROMPT="${EN_PROMPT:-The capital of France is}"
SKIP_FETCH="${SKIP_FETCH:-0}"
MACHINE_NOTE="${MACHINE_NOTE:-}"
CORPORA="${CORPORA_DIR:-$ROOT/data/corpora}"
GGUF="${MODELS_DIR:-$ROOT/data/models}/SmolLM2-135M-Instruct.Q4_1.gguf"
# evaluate and generate have no --threads: rayon reads this.
export RAYON_NUM_THREADS="$THREADS"

BASE="$OUT/models/base"
EXT="$OUT/models/extended"
DATA="$OUT/data"
PREP="$OUT/prepared"
TRAIN="$OUT/train"
RESULT="$TRAIN/stage-zh-cpt"
EVAL="$OUT/eval"
LOGS="$OUT/logs"
STAMPS="$OUT/.steps"
mkdir -p "$STAMPS" "$LOGS" "$EVAL"

for b in import-gguf extend-vocab prepare-data pretrain evaluate generate tokenizer-report; do
    [[ -x "$BIN_DIR/$b" ]] || { echo "recipe: $BIN_DIR/$b is missing: cargo build --release --bins (or set BIN_DIR)" >&2; exit 1; }
done

hash() { printf '%s' "$*" | sha256sum | cut -c1-16; }

# step NAME KEY: run do_NAME unless OUT/.steps/NAME holds KEY (a finished run with these settings).
step() {
    local name="$1" key="$2"
    if [[ -f "$STAMPS/$name" && "$(cat "$STAMPS/$name")" == "$key" ]]; then
        echo "== recipe: [$name] up to date, skipped"
        return
    fi
    rm -f "$STAMPS/$name"
    echo "== recipe: [$name] $(date -u +%H:%M:%S) UTC"
    local t0
    t0=$(date +%s%N)
    "do_$name"
    awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f\n", (b - a) / 1e9 }' > "$STAMPS/$name.seconds"
    printf '%s' "$key" > "$STAMPS/$name"
    echo "== recipe: [$name] done in $(cat "$STAMPS/$name.seconds") s"
}

# 1. Model and corpora (both scripts return at once when their files are there).
do_fetch() {
    if [[ "$SKIP_FETCH" == 1 ]]; then
        [[ -f "$GGUF" && -f "$CORPORA/zh/tang300.jsonl" ]] || { echo "recipe: SKIP_FETCH=1 but $GGUF or $CORPORA is missing" >&2; exit 1; }
    else
        "$ROOT/tools/fetch-model.sh"
        "$ROOT/tools/fetch-corpora.sh"
    fi
}
step fetch "$(hash fetch "$SKIP_FETCH" "$GGUF" "$CORPORA")"
K_FETCH="$(cat "$STAMPS/fetch")"

# 2. GGUF → HF directory (F32).
do_import() {
    "$BIN_DIR/import-gguf" "$GGUF" "$BASE" --force 2>&1 | tee "$LOGS/import.log"
}
K_IMPORT="$(hash "$K_FETCH" import)"
step import "$K_IMPORT"

# 3. Train / held-out split (tools/recipe/split.py).
do_split() {
    "$PY" "$ROOT/tools/recipe/split.py" "$CORPORA" "$DATA" "$EVAL_ZH_DOCS" "$EVAL_EN_DOCS"
}
K_SPLIT="$(hash "$K_FETCH" split "$EVAL_ZH_DOCS" "$EVAL_EN_DOCS" "$(sha256sum "$ROOT/tools/recipe/split.py")")"
step split "$K_SPLIT"

# 4. Vocabulary extension: Chinese pieces learnt on the Chinese training split, new rows = mean of
#    the old rows of each piece's old tokens.
do_extend() {
    "$BIN_DIR/extend-vocab" --base "$BASE" --out "$EXT" --overwrite \
        --corpus "$DATA/zh-train.jsonl" --target-size "$TARGET_VOCAB" \
        --measure zh="$DATA/zh-heldout.jsonl" --measure en="$DATA/en-heldout.jsonl" 2>&1 | tee "$LOGS/extend-vocab.log"
}
K_EXTEND="$(hash "$K_IMPORT" "$K_SPLIT" extend "$TARGET_VOCAB")"
step extend "$K_EXTEND"

# 5. Shards with the extended tokenizer: zh and en (replay) for training, held-out for validation.
do_prepare() {
    rm -rf "$PREP"
    "$BIN_DIR/prepare-data" --tokenizer "$EXT/tokenizer.json" --model-config "$EXT/config.json" \
        --output "$PREP" --threads "$THREADS" --no-progress \
        --input zh="$DATA/zh-train.jsonl" --input en="$DATA/en-train.jsonl" \
        --input zh-heldout="$DATA/zh-heldout.jsonl" --input en-heldout="$DATA/eval-en.jsonl" 2>&1 | tee "$LOGS/prepare-data.log"
}
K_PREPARE="$(hash "$K_EXTEND" prepare)"
step prepare "$K_PREPARE"

# 6. Continual pre-training, two stages (config from tools/recipe/smollm2-zh.toml).
W1=$(( STAGE1_STEPS / 10 ))
W2=$(( STAGE2_STEPS / 10 ))
sed -e "s|@MODEL@|$EXT|" -e "s|@PREPARED@|$PREP|g" -e "s|@TRAIN_DIR@|$TRAIN|" \
    -e "s|@SEQ_LEN@|$SEQ_LEN|" -e "s|@MICRO_ROWS@|$MICRO_ROWS|" -e "s|@ROWS@|$ROWS|g" \
    -e "s|@STAGE1_STEPS@|$STAGE1_STEPS|" -e "s|@STAGE2_STEPS@|$STAGE2_STEPS|" \
    -e "s|@STAGE1_LR@|$STAGE1_LR|" -e "s|@STAGE2_LR@|$STAGE2_LR|" \
    -e "s|@STAGE1_WARMUP@|$W1|" -e "s|@STAGE2_WARMUP@|$W2|" \
    -e "s|@CHECKPOINT_EVERY@|$CHECKPOINT_EVERY|" -e "s|@EVAL_EVERY@|$EVAL_EVERY|" \
    -e "s|@CHECKPOINT_LAYERS@|$CHECKPOINT_LAYERS|" \
    "$ROOT/tools/recipe/smollm2-zh.toml" > "$OUT/smollm2-zh.toml.tmp"
mv "$OUT/smollm2-zh.toml.tmp" "$OUT/smollm2-zh.toml"
K_PRETRAIN="$(hash "$K_PREPARE" "$(cat "$OUT/smollm2-zh.toml")")"
do_pretrain() {
    # Same settings as an interrupted run: resume from its checkpoint; otherwise start afresh.
    if [[ -d "$TRAIN" && "$(cat "$STAMPS/pretrain.started" 2>/dev/null)" != "$K_PRETRAIN" ]]; then
        rm -rf "$TRAIN"
    fi
    printf '%s' "$K_PRETRAIN" > "$STAMPS/pretrain.started"
    "$BIN_DIR/pretrain" --config "$OUT/smollm2-zh.toml" --threads "$THREADS" 2>&1 | tee -a "$LOGS/pretrain.log"
    # Make the result a complete HF directory (tokenizer_config.json: the same BOS handling as base).
    for f in tokenizer_config.json generation_config.json; do
        [[ -f "$RESULT/$f" || ! -f "$EXT/$f" ]] || cp "$EXT/$f" "$RESULT/$f"
    done
}
step pretrain "$K_PRETRAIN"

# 7. Evaluation: tokens/char, bits/char on held-out zh / en and the 离离原上草 poem, MC samples.
FIX="$ROOT/tests/fixtures/eval"
do_tokenizers() {
    "$BIN_DIR/tokenizer-report" --tokenizer base="$BASE/tokenizer.json" --tokenizer extended="$EXT/tokenizer.json" \
        --set zh="$DATA/zh-heldout.jsonl" --set en="$DATA/en-heldout.jsonl" --json > "$EVAL/tokenizers.json.tmp"
    mv "$EVAL/tokenizers.json.tmp" "$EVAL/tokenizers.json"
    "$BIN_DIR/tokenizer-report" --tokenizer base="$BASE/tokenizer.json" --tokenizer extended="$EXT/tokenizer.json" \
        --set zh="$DATA/zh-heldout.jsonl" --set en="$DATA/en-heldout.jsonl"
}
step tokenizers "$(hash "$K_EXTEND" tokenizers)"

evaluate() { # evaluate NAME MODEL_DIR [--mc ...]
    local name="$1" model="$2"
    shift 2
    "$BIN_DIR/evaluate" --model "$model" --json "$EVAL/$name.json" \
        --text zh_heldout="$DATA/eval-zh.jsonl" --text en_heldout="$DATA/eval-en.jsonl" --text grass="$DATA/grass.jsonl" \
        "$@" 2>&1 | tee "$LOGS/evaluate-$name.log"
}
MC_ARGS=(--shots "$MC_SHOTS" --mc mmlu="$FIX/mmlu" --mc cmmlu="$FIX/cmmlu" --mc ceval="$FIX/ceval" --mc agieval="$FIX/agieval" --mc gaokao="$FIX/gaokao")
generate() { # generate NAME MODEL_DIR
    local name="$1" model="$2"
    "$BIN_DIR/generate" --model "$model" --prompt "$ZH_PROMPT" --max-new-tokens "$GEN_TOKENS" > "$EVAL/gen-$name-zh.txt"
    "$BIN_DIR/generate" --model "$model" --prompt "$EN_PROMPT" --max-new-tokens "$GEN_TOKENS" > "$EVAL/gen-$name-en.txt"
    echo "$name: $(cat "$EVAL/gen-$name-zh.txt")"
    echo "$name: $(cat "$EVAL/gen-$name-en.txt")"
}
K_EVAL="$(hash "$K_SPLIT" "$MC_SHOTS" "$GEN_TOKENS" "$EN_PROMPT")"
do_eval_base() {
    evaluate base "$BASE" "${MC_ARGS[@]}"
    generate base "$BASE"
}
step eval_base "$(hash "$K_IMPORT" "$K_EVAL" base)"
do_eval_extended() {
    if [[ "$EVAL_EXTENDED" == 1 ]]; then
        evaluate extended "$EXT"
    else
        rm -f "$EVAL/extended.json"
    fi
}
step eval_extended "$(hash "$K_EXTEND" "$K_EVAL" "$EVAL_EXTENDED" extended)"
do_eval_result() {
    evaluate result "$RESULT" "${MC_ARGS[@]}"
    generate result "$RESULT"
}
step eval_result "$(hash "$K_PRETRAIN" "$K_EVAL" result)"

# 8. results.json + results.md (always rewritten).
cat > "$OUT/settings.json" <<EOF
{
  "stage1_steps": $STAGE1_STEPS, "stage2_steps": $STAGE2_STEPS, "seq_len": $SEQ_LEN,
  "rows": $ROWS, "micro_rows": $MICRO_ROWS, "stage1_lr": $STAGE1_LR, "stage2_lr": $STAGE2_LR,
  "zh_en_weights": "3:1", "ordering": "bucket", "checkpoint_layers": $CHECKPOINT_LAYERS,
  "target_vocab": $TARGET_VOCAB, "threads": $THREADS, "eval_zh_docs": $EVAL_ZH_DOCS,
  "eval_en_docs": $EVAL_EN_DOCS, "mc_shots": $MC_SHOTS, "gen_tokens": $GEN_TOKENS,
  "zh_prompt": "$ZH_PROMPT", "en_prompt": $("$PY" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$EN_PROMPT"),
  "machine_note": $("$PY" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$MACHINE_NOTE")
}
EOF
echo "== recipe: [report] $(date -u +%H:%M:%S) UTC"
"$PY" "$ROOT/tools/recipe/report.py" "$OUT"
echo "== recipe: done -> $OUT/results.md, $OUT/results.json"
