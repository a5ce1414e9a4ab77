#!/usr/bin/env bash
# CPU training-step speed, llama-cpt vs PyTorch, in one run, same thread count, f32, on two shapes:
# the bench shape (benches/train_step.rs: 4 layers, hidden 256, vocab 32k, 8 x 256) and SmolLM2-135M
# (30 layers, hidden 576, 9/3 heads, FFN 1536, vocab 49,152, tied; 4 x 512). Each engine runs in
# its own process (so each peak RSS is its own): examples/cpu_step.rs, tools/torch_cpu_step.py
# eager (SDPA), and the same under torch.compile (inductor; compiled in the untimed warm-up).
# Prints a table and, last, one line per shape:
#   ratio <shape> llama-cpt/pytorch tokens/s: X | vs torch.compile: Y | peak RSS MiB ... | GEMM ... % of FMA peak
# Usage: tools/cpu-side-by-side.sh [--smoke]   (--smoke: a tiny shape, checks the script in a minute)
# Env: LLAMA_CPT_PYTHON (default .venv/bin/python), RAYON_NUM_THREADS (default: all cores),
#      LLAMA_CPT_FEATURES (cargo features of the build, default cuda,mpi as CI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${LLAMA_CPT_PYTHON:-.venv/bin/python}
THREADS=${RAYON_NUM_THREADS:-$(nproc)}
export RAYON_NUM_THREADS=$THREADS
FEATURES=${LLAMA_CPT_FEATURES-cuda,mpi}

# shape:ours-warmup:ours-steps:eager-warmup:eager-steps:compile-warmup:compile-steps
if [[ "${1:-}" == "--smoke" ]]; then
  RUNS=("smoke:1:2:1:2:1:2")
elif [[ -z "${1:-}" ]]; then
  # ≈ 10 minutes on 2 cores: a SmolLM2 step is ≈ 1.7 TFLOP.
  RUNS=("bench:2:8:2:8:2:8" "smollm2:1:3:1:3:2:3")
else
  echo "usage: $0 [--smoke]" >&2
  exit 2
fi

cargo build --quiet --release --features "$FEATURES" --example cpu_step
BIN=target/release/examples/cpu_step

results=$(mktemp)
trap 'rm -f "$results"' EXIT
{
  echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') threads $THREADS"
  echo "# $(grep -m1 'model name' /proc/cpuinfo) | load average $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$results"
for run in "${RUNS[@]}"; do
  IFS=: read -r shape ow os ew es cw cs <<<"$run"
  "$BIN" --shape "$shape" --warmup "$ow" --steps "$os" | tee -a "$results"
  "$PY" tools/torch_cpu_step.py --shape "$shape" --threads "$THREADS" --warmup "$ew" --steps "$es" | tee -a "$results"
  "$PY" tools/torch_cpu_step.py --shape "$shape" --threads "$THREADS" --compile --warmup "$cw" --steps "$cs" | tee -a "$results"
done
"$PY" tools/cpu_side_by_side_report.py "$results" "$THREADS"
