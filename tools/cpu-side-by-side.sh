#!/usr/bin/env bash
# CPU training-step speed: llama-cpt (criterion bench benches/train_step.rs) and PyTorch eager
# (tools/torch_cpu_step.py) on the same model, batch and thread count, in one run.
# Usage: tools/cpu-side-by-side.sh   (uses .venv/bin/python unless LLAMA_CPT_PYTHON is set)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${LLAMA_CPT_PYTHON:-.venv/bin/python}
THREADS=${RAYON_NUM_THREADS:-$(nproc)}
export RAYON_NUM_THREADS=$THREADS
cargo bench --bench train_step -- --noplot 2>&1 | grep -E "time:|thrpt:" || true
est=target/criterion/cpu/train_step_4x256_seq256_batch8/new/estimates.json
ours=$(python3 -c "import json;print(json.load(open('$est'))['mean']['point_estimate']/1e9)")
theirs_line=$($PY tools/torch_cpu_step.py --threads "$THREADS")
echo "$theirs_line"
theirs=$(echo "$theirs_line" | sed -E 's/.*seconds: ([0-9.]+).*/\1/')
python3 - "$ours" "$theirs" "$THREADS" <<'PY'
import sys
ours, theirs, threads = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
tok = 8 * 256
print(f"| engine | s/step | tokens/s |\n|---|---|---|")
print(f"| llama-cpt (cpu, {threads} threads) | {ours:.3f} | {tok/ours:.0f} |")
print(f"| PyTorch eager ({threads} threads) | {theirs:.3f} | {tok/theirs:.0f} |")
print(f"ratio llama-cpt / PyTorch tokens/s: {theirs/ours:.2f}")
PY
